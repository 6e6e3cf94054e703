"""`batch_embed`: texts in, vectors out, for notebooks and scripts; the steps of `core`.

The same steps as Step 9b, without a table: identical texts are embedded once, cached
vectors are not paid for again, long texts are split (their chunks averaged) as
EMBED_LONG_TEXTS says, batches go out EMBED_MAX_CONCURRENCY at a time per server, and
every batch survives oversize and bad inputs (`resilient`).
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from . import core, windows
from .errors import EmbeddingFailures
from .pieces import Pieces
from .resilient import BatchSizer, Dimension, Failure, preview

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
        result = _embed_texts([str(t) for t in texts], backend, settings, cache)
    finally:
        if own:
            backend.close()
    if result.failures and on_failure == "raise":
        raise EmbeddingFailures(result.failures, total=len(texts))
    return result


def _embed_texts(texts: list[str], backend, settings, cache) -> EmbedResult:
    keep = [i for i, t in enumerate(texts) if t.strip()]
    windows.settle(backend, cache, [texts[i] for i in keep])  # the window, before any Pieces
    pieces = Pieces([str(i) for i in keep], [texts[i] for i in keep], backend.window,
                    settings.EMBED_LONG_TEXTS, settings.EMBED_CHUNK_OVERLAP)
    dimension = Dimension(*core.known_dimension(settings, backend.identity(), cache=cache))
    requests_before = backend.stats().get("requests", 0)
    failed: dict[int, tuple[str, int | None]] = {keep[r]: (reason, None) for r, reason in pieces.failed}
    failed.update({i: ("empty text: nothing to embed", None) for i, t in enumerate(texts)
                   if not t.strip()})
    hits = core.look_up(cache, backend.identity(dimension.value), pieces.texts)
    done = [pieces.deliver_found(hits)]
    embedded = _embed_misses([t for t in pieces.texts if t not in hits], pieces, backend,
                             settings, cache, dimension, done, failed, keep)
    vectors = np.full((len(texts), dimension.value or 0), np.nan, dtype=np.float32)
    for part in done:
        for r, vector in zip(part.rows, part.vectors):
            vectors[keep[r]] = vector
    failures = [Failure(i, preview(texts[i]), *failed[i]) for i in sorted(failed)]
    requests = backend.stats().get("requests", 0) - requests_before
    log.info("embedded %d texts (%d distinct, %d from cache) in %d requests; %d failed",
             len(texts), len(pieces.texts), len(hits), requests, len(failures))
    return EmbedResult(vectors, failures, requests, embedded, len(hits))


def _embed_misses(misses: list[str], pieces: Pieces, backend, settings, cache,
                  dimension: Dimension, done: list, failed: dict, keep: list[int]) -> int:
    """Embed the texts the cache lacks, EMBED_MAX_CONCURRENCY batches per server at a time,
    caching each batch as it returns; returns how many texts were embedded."""
    sizer = BatchSizer(min(settings.EMBED_BATCH_SIZE, backend.max_batch or settings.EMBED_BATCH_SIZE))
    budget = backend.window.request_tokens
    tokens = pieces.token_counts(misses, backend.window) if budget else None
    embedded = 0
    with ThreadPoolExecutor(backend.slots, thread_name_prefix="embed") as pool:
        futures = [pool.submit(core.embed, backend, batch, sizer=sizer, dimension=dimension)
                   for batch in core.batches(misses, sizer.size, tokens, budget)]
        for future in as_completed(futures):
            settled = core.settle(cache, backend.identity(dimension.value), pieces,
                                  *future.result())
            for rows, f in settled.lost:
                failed.update((keep[r], (f.reason, f.status)) for r in rows)
            embedded += settled.embedded
            done.append(settled.done)
    return embedded


async def abatch_embed(texts: Sequence[str], backend: Any = None, settings: Any = None, *,
                       cache: Any = None, on_failure: str = "raise") -> EmbedResult:
    """`batch_embed` for asyncio code: runs in a worker thread, the loop stays free."""
    return await asyncio.to_thread(batch_embed, texts, backend, settings, cache=cache,
                                   on_failure=on_failure)
