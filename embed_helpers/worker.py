"""One Ray worker: the steps of `core` over one block of rows, set up once per actor.

As in Ray Data's callable classes, `__init__` does the expensive set-up once (the backend
and its model, a database connection, the cache) and `__call__(block) -> summary` is one
pure pass of the core steps over a block, ending in one transaction. The summary (counts,
failures) is all that goes back to the driver.
"""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor


from . import core, db, windows
from .claims import claim_rows
from .constants import CACHE_LEASE_POLL_S
from .pieces import Done, Pieces
from .resilient import BatchSizer, Dimension

log = logging.getLogger(__name__)


class BlockWorker:
    """A Ray Data actor: `map_batches(BlockWorker, fn_constructor_kwargs=...)`."""

    def __init__(self, settings, target: core.Target, run: str, dim: int | None, dim_source: str,
                 concurrency: int, numbers):
        import ray

        from .backends import get_backend
        from .cache_tools import open_cache
        self.settings, self.target, self.run = settings, target, run
        index = ray.get(numbers.next.remote())
        self.name = f"worker-{index}"
        # Worker i starts at server i of OLLAMA_HOST / OPENAI_BASE_URL.
        self.backend = get_backend(settings, server_offset=index)
        self.conn = db.connect(settings)
        self.cache = open_cache(settings)
        self.window = self.backend.window
        self.dimension = Dimension(dim, dim_source or "EMBEDDING_DIM")
        self.table_ready = dim is not None
        self.sizer = BatchSizer(min(settings.EMBED_BATCH_SIZE,
                                    self.backend.max_batch or settings.EMBED_BATCH_SIZE))
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="embed")
        self.concurrency = concurrency
        self.stats = self.backend.stats()

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        ids, texts, seqs = list(batch["id"]), list(batch["text"]), [int(s) for s in batch["seq"]]
        order = sorted(range(len(seqs)), key=seqs.__getitem__)  # input order
        ids, texts, seqs = [ids[i] for i in order], [texts[i] for i in order], [seqs[i] for i in order]
        rows = core.prepare(ids, texts, id_col=self.target.id_col)
        # The position of the row each id keeps: its last one with a text, as `prepare` keeps.
        position = {str(i): s for i, t, s in zip(ids, texts, seqs)
                    if i is not None and not core.is_missing(t)}
        claims = {i: position[i] for i in rows.ids}
        latest = claim_rows(self.conn, self.run, rows.ids, [claims[i] for i in rows.ids])
        lost = len(rows.ids) - len(latest)
        rows = rows.take([k for k, i in enumerate(rows.ids) if i in latest])
        windows.settle(self.backend, self.cache, rows.texts)  # the fact, or one measurement
        self.window = self.backend.window
        todo, unchanged, stored_ids = core.drop_unchanged(self.conn, self.target, rows,
                                                          self.window, self.settings.EMBED_LONG_TEXTS)
        work = rows.take(todo)
        pieces = Pieces(work.ids, work.texts, self.window, self.settings.EMBED_LONG_TEXTS,
                        self.settings.EMBED_CHUNK_OVERLAP)
        failures = [{"id": i, "reason": r, "text_preview": "", "invalid": True}
                    for i, r in rows.invalid]
        failures += [self._failure(pieces, row, reason) for row, reason in pieces.failed]
        done, embedded, hits = self._vectors(pieces, failures)
        written = core.write(self.conn, self.target, pieces, done, upsert=self.settings.UPSERT,
                             assume_new=not any(pieces.ids[r] in stored_ids for r in done.rows),
                             claim=(self.run, claims))
        return self._summary(rows, lost, unchanged, written, done, pieces, embedded, hits,
                             failures, time.perf_counter() - t0)

    def _vectors(self, pieces: Pieces, failures: list[dict]) -> tuple[Done, int, int]:
        """Cached vectors, then the rest embedded (cached as each batch returns): the rows
        they complete, the texts embedded and the cache hits."""
        identity = self.backend.identity(self.dimension.value)
        found = core.look_up(self.cache, identity, pieces.texts)
        parts = [pieces.deliver_found(found)]
        misses = [t for t in pieces.texts if t not in found]
        if self.settings.EMBED_CACHE_ONLY:
            for text in misses:
                failures += [self._failure(pieces, r, "not in the cache (EMBED_CACHE_ONLY=1)")
                             for r in pieces.fail(text)]
            misses = []
        embedded = 0
        while misses:  # texts another run holds come back in the next pass
            budget = self.window.request_tokens
            tokens = pieces.token_counts(misses, self.window) if budget else None
            jobs = [self.pool.submit(core.embed_leased, self.backend, self.cache, batch,
                                     sizer=self.sizer, dimension=self.dimension)
                    for batch in core.batches(misses, self.sizer.size, tokens, budget)]
            misses = []
            for job in jobs:
                found_now, batch, later = job.result()
                misses += later
                settled = core.settle(self.cache, self.backend.identity(self.dimension.value),
                                      pieces, *batch)
                failures += [self._failure(pieces, r, f.reason)
                             for rows, f in settled.lost for r in rows]
                embedded += settled.embedded
                parts += [pieces.deliver_found(found_now), settled.done]
            if misses:
                time.sleep(CACHE_LEASE_POLL_S)
        if not self.table_ready and self.dimension.value:
            db.create_table(self.conn, self.target.table, self.target.id_col, self.target.text_col,
                            self.dimension.value)
            self.table_ready = True
        return Done.merge(parts), embedded, len(found)

    @staticmethod
    def _failure(pieces: Pieces, row: int, reason: str) -> dict:
        return {"id": pieces.ids[row], "reason": reason,
                "text_preview": pieces.row_texts[row][:60]}

    def _summary(self, rows, lost, unchanged, written, done, pieces, embedded, hits, failures,
                 seconds) -> dict:
        stats = self.backend.stats()
        servers = {url: {k: c[k] - self.stats.get("servers", {}).get(url, {}).get(k, 0)
                         for k in ("requests", "texts", "errors", "set_aside")}
                   for url, c in stats.get("servers", {}).items()}
        delta = {k: stats.get(k, 0) - self.stats.get(k, 0) for k in ("requests", "retries")}
        self.stats = stats
        long = {k: getattr(pieces.long, k) for k in ("over", "chunks", "chars", "chars_beyond",
                                                      "window", "exact", "policy", "origin")}
        return {"rows_read": [rows.rows_read], "empty_ids": [json.dumps(rows.empty_ids)],
                "duplicates": [rows.duplicate_ids + lost], "unchanged": [unchanged],
                "written": [written], "chunks": [len(done.chunks)], "texts": [len(pieces.texts)],
                "embedded": [embedded], "hits": [hits], "requests": [delta["requests"]],
                "retries": [delta["retries"]], "failures": [json.dumps(failures)],
                "worker": [self.name], "seconds": [seconds], "dim": [self.dimension.value or 0],
                "servers": [json.dumps(servers)], "long": [json.dumps(long)]}
