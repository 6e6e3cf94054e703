"""Batches above the backends: slicing, splitting, bad-input isolation, validation.

Backends only know `embed_batch(texts)`. Everything that makes a run survive a
real server lives here, once: a batch too large is split in halves (and the size
that worked remembered), a batch failing on its content is bisected until the bad
inputs are found (about log2(batch) extra requests each), and vectors are checked
before anyone writes them. `batch_embed` is the simple face for notebooks.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .constants import BISECT_FAILURE_SLACK, PREVIEW_CHARS
from .errors import (AuthenticationError, BackendError, BackendUnreachable, BadInput,
                     BatchTooLarge, EmbeddingFailures, EmbeddingValidationError, ModelNotFound)

log = logging.getLogger(__name__)

# The dimension each backend object was found to return, so that only the first
# `batch_embed` with a cache and no EMBEDDING_DIM pays a probe request.
_DIMS: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


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


def preview(text: str) -> str:
    """The start of `text` on one line, for error messages.

    >>> preview("a\\nb"), len(preview("x" * 500)) <= 61
    ('a b', True)
    """
    flat = " ".join(str(text).split())
    return flat if len(flat) <= PREVIEW_CHARS else flat[:PREVIEW_CHARS] + "…"


@dataclass
class Failure:
    """One input that got no vector: where it is, what it starts with, why."""

    position: int
    preview: str
    reason: str
    status: int | None = None


class BatchSizer:
    """The batch size that works, shared by all threads of a run.

    It starts at the configured size and only ever shrinks: once a server has
    said "too large" for a size, sending that size again costs a wasted request.
    """

    def __init__(self, size: int):
        self._size = max(int(size), 1)
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        with self._lock:
            return self._size

    def shrink(self, size: int) -> None:
        """Remember that batches of `size` work after a larger one was refused."""
        with self._lock:
            if size < self._size:
                log.info("batch of %d too large for the server; sending %d from now on "
                         "(set EMBED_BATCH_SIZE=%d to skip the split)", self._size, size, size)
                self._size = max(size, 1)


class _Resilient:
    """The state of one `embed_resilient` call."""

    def __init__(self, backend: Any, texts: list[str], sizer: BatchSizer | None,
                 expected_dim: int | None):
        self.backend, self.texts, self.sizer = backend, texts, sizer
        self.expected_dim = self.dim = expected_dim
        self.parts: list[tuple[int, np.ndarray, np.ndarray]] = []  # offset, rows, good mask
        self.failures: list[Failure] = []
        self.failed_in_a_row = 0
        # Bisecting one bad input fails at most ~2*log2(n) requests before a success;
        # far more in a row means the server rejects everything: stop and say so.
        self.max_failed_in_a_row = 2 * math.ceil(math.log2(max(len(texts), 2))) + BISECT_FAILURE_SLACK

    def run(self) -> tuple[np.ndarray, list[Failure]]:
        size = self.sizer.size if self.sizer else len(self.texts)
        for offset in range(0, len(self.texts), size):
            self.solve(offset, self.texts[offset:offset + size])
        out = np.full((len(self.texts), self.dim or 0), np.nan, dtype=np.float32)
        for offset, rows, good in self.parts:
            out[offset:offset + len(rows)][good] = rows[good]
        return out, sorted(self.failures, key=lambda f: f.position)

    def solve(self, offset: int, batch: list[str]) -> bool:
        """Embed `batch` (at `offset`), splitting or bisecting; True when all succeeded."""
        try:
            vectors = self.backend.embed_batch(batch)
        except BatchTooLarge as exc:
            if len(batch) == 1:
                return self.fail(offset, batch[0], exc, "too large for the server even alone")
            half = (len(batch) + 1) // 2
            log.debug("batch of %d too large; splitting", len(batch))
            ok = self.solve(offset, batch[:half])
            # The left half may have taught the sizer a smaller size: use it at once.
            step = min(half, self.sizer.size) if self.sizer else half
            for start in range(half, len(batch), step):
                ok &= self.solve(offset + start, batch[start:start + step])
            if ok and self.sizer:
                self.sizer.shrink(half)
            return ok
        except (BackendUnreachable, AuthenticationError, ModelNotFound):
            raise
        except BackendError as exc:
            content = isinstance(exc, BadInput) or (exc.status or 0) >= 500
            if not content:
                raise  # 429 after all retries, wrong route...: bisecting cannot help
            self.failed_in_a_row += 1
            if self.failed_in_a_row > self.max_failed_in_a_row:
                raise BackendError(
                    f"{self.failed_in_a_row} requests in a row failed while isolating bad "
                    f"inputs: the server seems to reject everything.", backend=exc.backend,
                    status=exc.status, server_message=exc.server_message, hint=exc.hint) from None
            if len(batch) == 1:
                return self.fail(offset, batch[0], exc)
            half = (len(batch) + 1) // 2
            log.debug("batch of %d failed (%s); bisecting", len(batch), exc.status)
            return self.solve(offset, batch[:half]) & self.solve(offset + half, batch[half:])
        self.failed_in_a_row = 0
        return self.accept(offset, batch, np.asarray(vectors, dtype=np.float32))

    def fail(self, offset: int, text: str, exc: BackendError, why: str = "") -> bool:
        reason = exc.server_message or str(exc)
        self.failures.append(Failure(offset, preview(text), f"{why}: {reason}" if why else reason,
                                     exc.status))
        return False

    def accept(self, offset: int, batch: list[str], vectors: np.ndarray) -> bool:
        route = getattr(self.backend, "route", "?")
        model = getattr(self.backend, "model", "?")
        if vectors.ndim != 2 or vectors.shape[0] != len(batch):
            raise EmbeddingValidationError(
                f"{route} returned {vectors.shape[0] if vectors.ndim else 0} vectors for "
                f"{len(batch)} texts; nothing was written. Check the server's logs.")
        dim = vectors.shape[1]
        if dim == 0:
            raise EmbeddingValidationError(
                f"{route} returned empty vectors for model {model!r}; is it an embedding model? "
                f"Check the model setting of the backend.")
        if self.dim is not None and dim != self.dim:
            raise dimension_error(route, model, dim, self.dim, expected=self.expected_dim is not None)
        self.dim = dim
        good = np.isfinite(vectors).all(axis=1)
        for i in np.flatnonzero(~good):
            self.failures.append(Failure(offset + int(i), preview(batch[i]),
                                         "the vector contains NaN or infinite values", None))
        self.parts.append((offset, vectors, good))
        return bool(good.all())


def dimension_error(route: str, model: str, got: int, want: int, *,
                    expected: bool = True) -> EmbeddingValidationError:
    """The message for vectors of the wrong size, saying what to set."""
    if not expected:
        return EmbeddingValidationError(
            f"{route} returned {got}-dim and {want}-dim vectors for model {model!r} in one run; "
            f"nothing was written. Is a load balancer mixing servers with different models?")
    return EmbeddingValidationError(
        f"{route} model {model!r} returns {got}-dim vectors, but {want} are expected "
        f"(EMBEDDING_DIM, or the dimension of the existing table). Nothing was written. "
        f"Either set EMBEDDING_DIM={got} and write to a new table, or choose the model that "
        f"makes {want}-dim vectors.")


def embed_resilient(backend: Any, texts: list[str], *, sizer: BatchSizer | None = None,
                    expected_dim: int | None = None) -> tuple[np.ndarray, list[Failure]]:
    """Embed one logical batch, surviving oversize batches and bad inputs.

    Returns:
        (n, dim) float32 vectors, NaN rows where an input failed, and the failures
        (positions relative to `texts`).
    Raises:
        BackendUnreachable, AuthenticationError, ModelNotFound: nothing can succeed.
        EmbeddingValidationError: wrong count, dimension or empty vectors.
    """
    texts = list(texts)
    if not texts:
        return np.empty((0, expected_dim or 0), dtype=np.float32), []
    return _Resilient(backend, texts, sizer, expected_dim).run()


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
        cache: an `EmbeddingCache` (or None): hits skip the backend, new vectors are
            appended after every batch.
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
        result = _batch_embed([str(t) for t in texts], backend, settings, cache)
    finally:
        if own:
            backend.close()
    if result.failures and on_failure == "raise":
        raise EmbeddingFailures(result.failures, total=len(texts))
    return result


def _batch_embed(texts: list[str], backend: Any, settings: Any, cache: Any) -> EmbedResult:
    first: dict[str, int] = {}
    inverse = np.fromiter((first.setdefault(t, len(first)) for t in texts), dtype=np.int64,
                          count=len(texts))
    unique = list(first)
    requests_before = backend.stats().get("requests", 0)
    vectors: dict[int, np.ndarray] = {}
    failed: dict[int, Failure] = {}
    dim = settings.EMBEDDING_DIM or _DIMS.get(backend)
    todo = list(range(len(unique)))
    sizer = BatchSizer(min(settings.EMBED_BATCH_SIZE, backend.max_batch or settings.EMBED_BATCH_SIZE))
    keys: list[str] | None = None
    hits = embedded = 0

    def store(idx: list[int], rows: np.ndarray, fails: list[Failure]) -> None:
        nonlocal dim, embedded
        if rows.shape[1] and dim is not None and rows.shape[1] != dim:
            raise dimension_error(backend.route, backend.model, rows.shape[1], dim,
                                  expected=settings.EMBEDDING_DIM is not None)
        bad = {f.position for f in fails}
        for f in fails:
            failed[idx[f.position]] = f
        good = [(j, rows[p]) for p, j in enumerate(idx) if p not in bad]
        dim = dim or (rows.shape[1] or None)
        vectors.update(good)
        embedded += len(good)
        if cache is not None and keys is not None and good:
            cache.put_many([(keys[j], v) for j, v in good], route=backend.route,
                           model=backend.model, normalized=backend.normalized,
                           texts=[unique[j] for j, _ in good])

    if cache is not None and unique:
        from .cache import cache_key
        probe = None
        if dim is None:  # the key holds the dimension: learn it from the first text
            probe = embed_resilient(backend, [unique[0]])
            dim, todo = probe[0].shape[1] or None, todo[1:]
        if dim is not None:
            keys = [cache_key(backend.route, backend.model, dim, backend.normalized, t)
                    for t in unique]
            found = cache.get_many([keys[j] for j in todo])
            vectors.update((j, np.asarray(found[keys[j]], np.float32)) for j in todo if keys[j] in found)
            hits, todo = len(found), [j for j in todo if keys[j] not in found]
        if probe is not None:
            store([0], *probe)

    def work(idx: list[int]):
        rows, fails = embed_resilient(backend, [unique[j] for j in idx], sizer=sizer,
                                      expected_dim=dim)
        return idx, rows, fails

    pool = ThreadPoolExecutor(settings.EMBED_MAX_CONCURRENCY, thread_name_prefix="embed")
    try:
        futures = [pool.submit(work, idx) for idx in chunked(todo, settings.EMBED_BATCH_SIZE)]
        for future in as_completed(futures):
            store(*future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

    if dim:
        _DIMS[backend] = dim
    out = np.full((len(unique), dim or 0), np.nan, dtype=np.float32)
    for j, row in vectors.items():
        out[j] = row
    failures = [Failure(i, f.preview, f.reason, f.status)
                for i, j in enumerate(inverse.tolist()) if (f := failed.get(j)) is not None]
    requests = backend.stats().get("requests", 0) - requests_before
    log.info("embedded %d texts (%d distinct, %d from cache) in %d requests; %d failed",
             len(texts), len(unique), hits, requests, len(failures))
    return EmbedResult(out[inverse], failures, requests, embedded, hits)


async def abatch_embed(texts: Sequence[str], backend: Any = None, settings: Any = None, *,
                       cache: Any = None, on_failure: str = "raise") -> EmbedResult:
    """`batch_embed` for asyncio code: runs in a worker thread, the loop stays free."""
    return await asyncio.to_thread(batch_embed, texts, backend, settings, cache=cache,
                                   on_failure=on_failure)
