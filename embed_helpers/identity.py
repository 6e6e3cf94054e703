"""What makes a vector: the backend's route, the model, the dimension, the normalisation.

A backend states its `Identity` (`Backend.identity(dim)`); every cache key is built here,
by `Identity.key`, and nowhere else. The server that answered is not part of it: servers
that serve the same model share their vectors.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

_SEP = "\x1f"


def cache_key(route: str, model: str, dim: int, normalized: bool, text: str,
              dimensions: int | None = None) -> str:
    """The sha256 hex key of one text under everything that changes its vector.

    The exact text is hashed: no case folding, no whitespace changes (they can change the
    vector; `cache/doctor.py` explains such near misses instead). Fields are joined with
    U+001F, the ASCII unit separator. A text may contain it, but the text is the last
    field and route and model may not (ValueError), dim and the flag are digits, so two
    different field tuples can never join to the same string. `dimensions` (EMBED_DIMENSIONS,
    the width asked of a Matryoshka model) joins the dim field as `256/256`: digits and a
    slash, which no key made without it holds, so unset it leaves every key as it was.

    >>> cache_key("route-a", "nomic-embed-text", 768, True, "hello")[:16]
    '8c27a49d962903c9'
    >>> cache_key("route-a", "m", 384, True, "a") == cache_key("route-a", "m", 384, True, "a ")
    False
    >>> cache_key("route-a", "m", 256, True, "a", 256) == cache_key("route-a", "m", 256, True, "a")
    False
    """
    if _SEP in route or _SEP in model:
        raise ValueError(f"route and model must not contain U+001F: {route!r}, {model!r}")
    width = str(int(dim)) if dimensions is None else f"{int(dim)}/{int(dimensions)}"
    joined = _SEP.join((route, model, width, "1" if normalized else "0", text))
    return hashlib.sha256(joined.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Identity:
    """Everything besides the text that decides a vector; `dim` may be unknown (None)
    until the first batch or the table says it. `dimensions` is the width asked of the
    server (EMBED_DIMENSIONS), None when the model's own width is taken."""

    route: str
    model: str
    dim: int | None
    normalized: bool
    dimensions: int | None = None

    def key(self, text: str) -> str:
        """The cache key of `text` under this identity (the dimension must be known)."""
        if not self.dim:
            raise ValueError("the dimension is not known yet: no cache key can be made")
        return cache_key(self.route, self.model, self.dim, self.normalized, text, self.dimensions)

    def keys(self, texts: Iterable[str]) -> list[str]:
        return [self.key(text) for text in texts]

    def describe(self) -> str:
        """One line for messages and reports.

        >>> Identity("local", "m", 384, True).describe()
        "route 'local', model 'm', dim 384, normalized True"
        >>> Identity("local", "m", 256, True, 256).describe()
        "route 'local', model 'm', dim 256, normalized True, dimensions 256 asked"
        """
        asked = "" if self.dimensions is None else f", dimensions {self.dimensions} asked"
        return (f"route {self.route!r}, model {self.model!r}, dim {self.dim}, "
                f"normalized {self.normalized}{asked}")
