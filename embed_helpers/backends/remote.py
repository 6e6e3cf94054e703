"""What the HTTP backends share: their servers, retries and counters (`http.HttpClient`)."""
from __future__ import annotations

import random
import time
from typing import Callable, ClassVar, Sequence

import numpy as np

from ..config import Settings, urls
from ..errors import EmbeddingValidationError
from ..http import HttpClient
from .base import Backend


class RemoteBackend(Backend):
    """A backend whose model runs behind one or more HTTP servers (`url_setting`)."""

    url_setting: ClassVar[str] = ""
    service: ClassVar[str] = ""

    def __init__(self, settings: Settings, *, server_offset: int = 0,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None,
                 **client):
        super().__init__(settings)
        servers = urls(getattr(settings, self.url_setting))
        k = server_offset % len(servers)  # workers start at different servers
        self.http = HttpClient(servers[k:] + servers[:k], settings, backend=self.name,
                               service=self.service, url_setting=self.url_setting, sleep=sleep,
                               rng=rng, **client)

    @property
    def slots(self) -> int:
        return self.settings.EMBED_MAX_CONCURRENCY * len(self.http.pool)

    def stats(self) -> dict:
        return {**self.http.stats(), "route": self.route}

    def close(self) -> None:
        self.http.close()


def rows_to_array(rows: Sequence[Sequence[float]], expected: int, *, backend: str) -> np.ndarray:
    """Decoded JSON vectors as a float32 (n, dim) array; wrong count or ragged rows raise.

    >>> rows_to_array([[1, 2], [3, 4]], 2, backend="x").shape
    (2, 2)
    """
    if len(rows) != expected:
        raise EmbeddingValidationError(
            f"{backend} returned {len(rows)} vectors for {expected} texts; the server or a "
            f"proxy dropped some. Check the server's logs; nothing was written.")
    lengths = [len(row) for row in rows]
    if lengths and len(set(lengths)) > 1:
        common = max(set(lengths), key=lengths.count)
        odd = [i for i, length in enumerate(lengths) if length != common]
        raise EmbeddingValidationError(
            f"{backend} returned vectors of different lengths {sorted(set(lengths))} in one "
            f"batch (positions {odd[:10]}); nothing was written.", positions=odd)
    return np.asarray(rows, dtype=np.float32).reshape(expected, lengths[0] if lengths else 0)
