"""The one interface every backend implements: `embed_batch(texts) -> vectors`.

Slicing into batches, cache lookups, deduplication, bisection of bad inputs and
validation live once, above the backends (`embed_helpers.batching`).
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import numpy as np

from ..config import Settings


class Backend:
    """Base class. Subclasses set `name` and implement `embed_batch`."""

    name: ClassVar[str] = ""
    #: The most texts one request may carry (the server's or model's limit), or None.
    max_batch: int | None = None
    #: Whether the vectors come back with unit length.
    normalized: bool = True

    def __init__(self, settings: Settings):
        self.settings = settings
        self.model = settings.model

    @property
    def route(self) -> str:
        """What, besides the model, decides the vectors: part of every cache key."""
        return self.name

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        """Embed `texts` in one call; return float32 of shape (len(texts), dim)."""
        raise NotImplementedError

    def stats(self) -> dict:
        """Counters for the run report (requests, retries...)."""
        return {}

    def close(self) -> None:
        """Release connections or models."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} model={self.model!r} route={self.route!r}>"
