"""`batch_embed`: texts in, vectors out, for notebooks and scripts; and `chunked`.

The same sequence as Step 9b (`sequence.EmbedSequence`), without a table: identical texts are
embedded once, cached vectors are not paid for again (EMBED_CACHE_ONLY=1 pays for none),
a shared cache's leases keep two processes from paying twice, long texts are split (their
chunks averaged) as EMBED_LONG_TEXTS says, batches go out EMBED_MAX_CONCURRENCY at a time
per server, and every batch survives oversize and bad inputs (`resilient`).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from . import steps, windows
from .errors import EmbeddingFailures
from .pieces import Pieces
from .resilient import Dimension, Failure, preview
from .sequence import EmbedSequence
from .steps import is_missing

log = logging.getLogger(__name__)


def chunked(iterable: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` items (the last one shorter).

    >>> list(chunked(range(5), 2))
    [[0, 1], [2, 3], [4]]
    >>> list(chunked([], 3))
    []
    """
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    iterator = iter(iterable)
    while chunk := list(islice(iterator, size)):
        yield chunk


@dataclass
class EmbedResult:
    """What `batch_embed` did. Rows of `vectors` are NaN where a text failed."""

    vectors: np.ndarray
    failures: list[Failure] = field(default_factory=list)
    requests: int = 0
    texts_embedded: int = 0  # distinct texts the backend embedded (not from cache)
    cache_hits: int = 0      # distinct texts found in the cache


def batch_embed(texts: Sequence[str], backend: Any = None, settings: Any = None, *,
                cache: Any = None, on_failure: str = "raise") -> EmbedResult:
    """Embed `texts` in input order: deduplicated, cached, batched, concurrent.

    Args:
        backend: default `get_backend(settings)`, closed afterwards.
        settings: default the backend's, else `load_settings()`.
        cache: a cache store (`open_cache(settings)`) or None: hits skip the backend, new
            vectors are stored after every batch.
        on_failure: "raise" raises `EmbeddingFailures` after the good vectors are
            cached; "return" lists the failures in the result.
    """
    if on_failure not in ("raise", "return"):
        raise ValueError(f"on_failure must be 'raise' or 'return', got {on_failure!r}")
    if settings is None:
        from .config import load_settings
        settings = backend.settings if backend is not None else load_settings()
    own = backend is None
    if own:
        from .backends import get_backend
        backend = get_backend(settings)
    try:
        result = _embed_texts(["" if is_missing(t) else str(t) for t in texts], backend,
                              settings, cache)
    finally:
        if own:
            backend.close()
    if result.failures and on_failure == "raise":
        raise EmbeddingFailures(result.failures, total=len(texts))
    return result


class _Vectors:
    """The sink of `batch_embed`: each row's vector at its input position, or its failure."""

    def __init__(self, texts: list[str], keep: list[int], pieces: Pieces):
        self.texts, self.keep, self.pieces = texts, keep, pieces
        self.vectors: np.ndarray | None = None
        self.failed: dict[int, Failure] = {}

    def deliver(self, done) -> None:
        if self.vectors is None:
            self.vectors = np.full((len(self.texts), done.vectors.shape[1]), np.nan, np.float32)
        self.vectors[[self.keep[r] for r in done.rows]] = done.vectors

    def fail(self, rows: list[int], failure: Failure) -> None:
        for r in rows:
            i = self.keep[r]
            self.failed[i] = Failure(i, preview(self.texts[i]), failure.reason, failure.status)


def _embed_texts(texts: list[str], backend, settings, cache) -> EmbedResult:
    keep = [i for i, t in enumerate(texts) if not is_missing(t)]
    pieces = windows.pieces_for(backend, cache, settings, [str(i) for i in keep],
                                [texts[i] for i in keep])
    dim, source = steps.known_dimension(settings, backend.identity(), cache=cache)
    sequence = EmbedSequence(backend, cache, settings,
                             dimension=Dimension(dim, source or "EMBEDDING_DIM"))
    requests_before = backend.stats().get("requests", 0)
    sink = _Vectors(texts, keep, pieces)
    sink.failed.update({i: Failure(i, preview(t), "empty text: nothing to embed")
                        for i, t in enumerate(texts) if is_missing(t)})
    tally = sequence.run(pieces, sink)
    vectors = sink.vectors if sink.vectors is not None else \
        np.full((len(texts), sequence.dimension.value or 0), np.nan, dtype=np.float32)
    failures = [sink.failed[i] for i in sorted(sink.failed)]
    requests = backend.stats().get("requests", 0) - requests_before
    log.info("embedded %d texts (%d distinct, %d from cache) in %d requests; %d failed",
             len(texts), len(pieces.texts), tally.hits, requests, len(failures))
    return EmbedResult(vectors, failures, requests, tally.embedded, tally.hits)


async def abatch_embed(texts: Sequence[str], backend: Any = None, settings: Any = None, *,
                       cache: Any = None, on_failure: str = "raise") -> EmbedResult:
    """`batch_embed` for asyncio code: runs in a worker thread, the loop stays free."""
    return await asyncio.to_thread(batch_embed, texts, backend, settings, cache=cache,
                                   on_failure=on_failure)
