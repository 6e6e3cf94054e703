"""The one interface every backend implements: `embed_batch(texts) -> vectors`.

Slicing into batches, cache lookups, deduplication, bisection of bad inputs and
validation live once, above the backends (`embed_helpers.steps`). A backend states what
makes its vectors (`identity`), how much text its model reads (`window`), and how many
requests it can take at once (`slots`).
"""
from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, ClassVar, Sequence

import numpy as np

from ..identity import Identity
from ..tokens import EstimatedTokens, Window

if TYPE_CHECKING:
    from ..config import Settings


class Backend:
    """Base class. Subclasses set `name` and `model_setting` and implement `embed_batch`."""

    name: ClassVar[str] = ""
    #: The setting that names this backend's model (OLLAMA_EMBED_MODEL...).
    model_setting: ClassVar[str] = ""
    #: The most texts one request may carry (the server's or model's limit), or None.
    max_batch: int | None = None
    #: Whether the vectors come back with unit length.
    normalized: bool = True

    def __init__(self, settings: "Settings", **_options):
        self.settings = settings
        self.model = getattr(settings, self.model_setting)

    @property
    def route(self) -> str:
        """What, besides the model, decides the vectors: part of every cache key."""
        return self.name

    def identity(self, dim: int | None = None) -> Identity:
        """Route, model, dimension and normalisation: what a cache key is made of. A backend
        that must ask its server first (Ollama's version) does so here, before any lookup."""
        return Identity(self.route, self.model, dim, self.normalized,
                        self.settings.EMBED_DIMENSIONS)

    @cached_property
    def window(self) -> Window:
        """How many tokens one input and one request may hold, and how they are counted."""
        limit = self.settings.EMBED_MAX_INPUT_TOKENS or 512
        source = "EMBED_MAX_INPUT_TOKENS" if self.settings.EMBED_MAX_INPUT_TOKENS \
            else "a cautious default"
        return Window(limit, EstimatedTokens(), source, self.request_budget(None),
                      "setting" if self.settings.EMBED_MAX_INPUT_TOKENS else "assumed")

    def request_budget(self, default: int | None) -> int | None:
        """EMBED_MAX_TOKENS_PER_REQUEST (0 = no limit), else the backend's own limit."""
        asked = self.settings.EMBED_MAX_TOKENS_PER_REQUEST
        if asked is None:
            return default
        return asked or None

    @property
    def price_per_1m_tokens(self) -> tuple[float, str] | None:
        """(USD per million tokens, where that figure comes from), or None: not priced by
        the token (a GPU you rent by the hour: GPU_HOURLY_USD)."""
        price = self.settings.EMBED_PRICE_PER_1M_TOKENS
        return (price, "EMBED_PRICE_PER_1M_TOKENS") if price is not None else None

    @property
    def slots(self) -> int:
        """Requests worth having in flight at once (EMBED_MAX_CONCURRENCY per server)."""
        return self.settings.EMBED_MAX_CONCURRENCY

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        """Embed `texts` in one call; return float32 of shape (len(texts), dim)."""
        raise NotImplementedError

    def stats(self) -> dict:
        """Counters for the run report (requests, retries, per server...)."""
        return {}

    def close(self) -> None:
        """Release connections or models."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} model={self.model!r} route={self.route!r}>"
