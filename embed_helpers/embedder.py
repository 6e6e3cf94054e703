"""`Embedder`: one text at a time for the caller, batches for the server.

Code that embeds one entity name or passage at a time (`await embedder.aembed(name)` per
entity, papers processed concurrently) sends one request per text with any per-text
client, and a one-slot server like Ollama only queues them. Here concurrent calls are
gathered until a batch is full (EMBED_BATCH_SIZE) or EMBED_COALESCE_MS has passed since
the first of them, and each batch goes through the same sequence as every other driver
(`sequence.EmbedSequence`: cache first, the cache-only brake, leases, retries, bisection,
long texts). Each caller gets its own vector, or an error about its own text only.

It also answers LangChain's `Embeddings` interface (`embed_documents`, `embed_query` and
their async forms) without importing LangChain, so a LangChain pipeline gets the cache,
the batching and the retries by swapping one object.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import numpy as np

from . import windows
from .errors import EmbeddingFailures
from .resilient import Failure, preview
from .sequence import EmbedSequence, Tally, batch_size
from .steps import is_missing

log = logging.getLogger(__name__)

_DEFAULT = object()   # "open the configured cache" (None means no cache at all)
_STOP = object()


class _Callers:
    """The sink of one gathered batch: each row is one caller's future."""

    def __init__(self, texts: list[str], futures: list[Future]):
        self.texts, self.futures = texts, futures

    def deliver(self, done) -> None:
        for row, vector in zip(done.rows, done.vectors):
            self.futures[row].set_result(vector)

    def fail(self, rows: list[int], failure: Failure) -> None:
        for row in rows:
            mine = Failure(0, preview(self.texts[row]), failure.reason, failure.status)
            self.futures[row].set_exception(EmbeddingFailures([mine], total=1))


class Embedder:
    """Embed single texts from many threads or coroutines; they travel in batches.

    Args:
        settings: default `load_settings()`.
        backend: default `get_backend(settings)` (closed with the embedder).
        cache: a cache store; default the configured one (EMBED_CACHE_BACKEND); None: none.
    """

    def __init__(self, settings=None, *, backend=None, cache=_DEFAULT):
        from .backends import get_backend
        from .cache.tools import open_cache
        from .config import load_settings
        self.settings = settings or (backend.settings if backend is not None else load_settings())
        self._own_backend, self._own_cache = backend is None, cache is _DEFAULT
        self.backend = backend or get_backend(self.settings)
        self.cache = open_cache(self.settings) if cache is _DEFAULT else cache
        self.sequence = EmbedSequence(self.backend, self.cache, self.settings)
        self.tally, self._lock = Tally(), threading.Lock()
        self._calls = self._batches = self._gathered = 0
        self._before = self.backend.stats()
        self._queue: queue.Queue = queue.Queue()
        # One batch more than the server's slots: while one is settled (cached, handed to
        # its callers) or gathered, the server already has the next.
        self._slots = threading.Semaphore(self.backend.slots + 1)
        self._pool = ThreadPoolExecutor(self.backend.slots + 1, thread_name_prefix="embedder")
        self._dispatcher = threading.Thread(target=self._dispatch, name="embedder-gather",
                                            daemon=True)
        self._dispatcher.start()
        self._closed = False

    # --- one text ------------------------------------------------------------------
    def submit(self, text: str) -> Future:
        """A future of the vector of `text` (float32); thread-safe."""
        if self._closed:
            raise RuntimeError("this Embedder is closed")
        future: Future = Future()
        if is_missing(text):
            future.set_exception(EmbeddingFailures(
                [Failure(0, preview(str(text)), "empty text: nothing to embed")], total=1))
            return future
        with self._lock:
            self._calls += 1
        self._queue.put((str(text), future))
        return future

    def embed(self, text: str) -> np.ndarray:
        """The vector of `text`, waiting for its batch; raises `EmbeddingFailures` naming
        the text when it alone failed, or the error that stopped its whole batch."""
        return self.submit(text).result()

    async def aembed(self, text: str) -> np.ndarray:
        """`embed` for asyncio: the event loop stays free while the batch is in flight."""
        return await asyncio.wrap_future(self.submit(text))

    def embed_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        futures = [self.submit(t) for t in texts]
        return [f.result() for f in futures]

    async def aembed_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        return list(await asyncio.gather(*(self.aembed(t) for t in texts)))

    # --- LangChain's Embeddings ----------------------------------------------------
    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [v.tolist() for v in self.embed_many(texts)]

    def embed_query(self, text: str) -> list[float]:
        return self.embed(text).tolist()

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return [v.tolist() for v in await self.aembed_many(texts)]

    async def aembed_query(self, text: str) -> list[float]:
        return (await self.aembed(text)).tolist()

    # --- gathering -----------------------------------------------------------------
    def _dispatch(self) -> None:
        """Wait for a free request slot, then gather calls until the batch is full or the
        coalescing wait since its first call has passed; the batch goes out on the pool."""
        size, wait_s = batch_size(self.settings, self.backend), self.settings.EMBED_COALESCE_MS / 1000
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, deadline, stop = [first], time.monotonic() + wait_s, False
            self._slots.acquire()  # calls that arrive meanwhile join this batch
            while len(batch) < size:
                try:
                    item = self._queue.get(timeout=max(deadline - time.monotonic(), 0)) \
                        if deadline > time.monotonic() else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._pool.submit(self._send, batch)
            if stop:
                return

    def _send(self, batch: list[tuple[str, Future]]) -> None:
        texts, futures = [t for t, _ in batch], [f for _, f in batch]
        try:
            pieces = windows.pieces_for(self.backend, self.cache, self.settings,
                                        [str(i) for i in range(len(texts))], texts)
            tally = self.sequence.run(pieces, _Callers(texts, futures), slots=1)
            with self._lock:
                self.tally.add(tally)
                self._batches += 1
                self._gathered += len(batch)
        except BaseException as exc:  # the whole batch failed: every caller hears why
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
        finally:
            self._slots.release()
            for future in futures:  # a row neither delivered nor failed would hang its caller
                if not future.done():
                    future.set_exception(RuntimeError("no vector and no error came back"))

    # --- what it did ---------------------------------------------------------------
    def stats(self) -> dict:
        """Calls, batches gathered, requests and texts sent, cache hits, the mean batch."""
        now = self.backend.stats()
        with self._lock:
            calls, batches, gathered, tally = self._calls, self._batches, self._gathered, self.tally
            requests = now.get("requests", 0) - self._before.get("requests", 0)
            return {"calls": calls, "batches": batches, "requests": requests,
                    "texts_embedded": tally.embedded, "cache_hits": tally.hits,
                    "failed": tally.failed,
                    "mean_batch_size": round(gathered / batches, 2) if batches else 0.0}

    def doctor(self, texts: Sequence[str]) -> str:
        """Why these texts miss the cache (`cache/doctor.py`), as for the other drivers."""
        from .cache.doctor import doctor_report
        return doctor_report(self.cache, self.sequence.identity(), texts=list(texts))

    def close(self) -> None:
        """Finish the calls already made, then release the backend and the cache."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._dispatcher.join()
        self._pool.shutdown(wait=True)
        if self._own_backend:
            self.backend.close()
        if self._own_cache and self.cache is not None:
            self.cache.close()

    def __enter__(self) -> "Embedder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Embedder {self.backend!r} cache={self.cache.describe() if self.cache else None}>"
