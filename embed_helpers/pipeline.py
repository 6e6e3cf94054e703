"""The local engine: Step 9b in this process, the steps of `core` pipelined on threads.

Up to `backend.slots` requests stay in flight (EMBED_MAX_CONCURRENCY per server) while one
writer thread stores each finished batch in the cache and then writes the rows it
completes to PostgreSQL (one transaction per batch), so embedding, parsing and writes
overlap. Rows whose vectors are already cached are written meanwhile by a second thread on
its own connection, so they never hold up a finished batch. Cache first, database second:
a run killed between the two finds the vectors in the cache next time and pays nothing
again.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np
from tqdm import tqdm

from . import core, db
from .constants import CACHE_LEASE_POLL_S, PREVIEW_CHARS, WRITE_CHUNK_ROWS
from .plan import Plan
from .report import RunReport, start_report
from .resilient import BatchSizer, Dimension

log = logging.getLogger(__name__)


class _Run:
    """State of one ingestion: the plan, the report, the failures, the dimension."""

    def __init__(self, plan: Plan, *, backend, cache, settings, progress: bool):
        self.plan, self.backend, self.cache, self.settings = plan, backend, cache, settings
        self.start = time.perf_counter()
        self.dimension = Dimension(plan.identity.dim, plan.dim_source or "EMBEDDING_DIM")
        self.table_ready = plan.identity.dim is not None
        self.request_spans: list[tuple[float, float]] = []
        self.write_spans: list[tuple[float, float]] = []
        self.failures: list[dict] = []
        self.texts_embedded = 0
        self.lock = threading.Lock()
        self.report = start_report(plan, settings, cache)
        self.bar = tqdm(total=len(plan.todo), unit="row", desc="Step 9b", disable=not progress)

    def now(self) -> float:
        return time.perf_counter() - self.start

    def fail_rows(self, rows: list[int], reason: str) -> None:
        pieces = self.plan.pieces
        with self.lock:
            for row in rows:
                self.failures.append({"id": pieces.ids[row], "reason": reason,
                                      "text_preview": pieces.row_texts[row][:PREVIEW_CHARS]})
            self.bar.update(len(rows))

    def fail_known(self) -> list[str]:
        """Rows that fail before any request: NUL bytes, long texts under `fail`, and cache
        misses in cache-only mode. Returns the texts left to embed."""
        plan = self.plan
        with self.lock:
            self.failures += [{"id": i, "reason": r, "text_preview": ""} for i, r in plan.rows.invalid]
        for row, reason in plan.pieces.failed:
            self.fail_rows([row], reason)
        if not self.settings.EMBED_CACHE_ONLY:
            return plan.to_embed
        for text in plan.to_embed:
            self.fail_rows(plan.pieces.fail(text),
                           "not in the cache (EMBED_CACHE_ONLY=1): run without it to embed")
        return []

    def finish_batch(self, conn, found: dict, texts, vectors, failures, latency: float) -> None:
        """The writer thread: cache a batch's vectors, then write the rows it completes
        (and those of the texts another run cached meanwhile: `found`)."""
        if found:
            with self.lock:
                self.report.cache_hits += len(found)
                self.report.cache_misses -= len(found)
            self.write(conn, self.plan.pieces.deliver_found(found), -1)
        if not len(texts):
            return
        settled = core.settle(self.cache, self.backend.identity(self.dimension.value),  # the
                              self.plan.pieces, texts, vectors, failures)  # route that made them
        for rows, failure in settled.lost:
            self.fail_rows(rows, failure.reason)
        with self.lock:
            self.texts_embedded += settled.embedded
        if not self.table_ready and settled.embedded:
            db.create_table(conn, self.plan.target.table, self.plan.target.id_col,
                            self.plan.target.text_col, vectors.shape[1])
            self.table_ready = True
        self.write(conn, settled.done, latency)

    def write(self, conn, done, latency: float) -> None:
        t0 = self.now()
        assume_new = not any(self.plan.pieces.ids[r] in self.plan.stored_ids for r in done.rows)
        core.write(conn, self.plan.target, self.plan.pieces, done, upsert=self.settings.UPSERT,
                   assume_new=assume_new)
        with self.lock:
            self.report.rows_written += len(done.rows)
            self.report.chunks_written += len(done.chunks)
            self.write_spans.append((t0, self.now()))
            self.report.timeline.append([round(self.now(), 3), self.report.rows_written,
                                         round(latency, 3) if latency >= 0 else None])
            self.bar.update(len(done.rows))
            if latency >= 0 and not self.bar.disable \
                    and len(servers := self.backend.stats().get("servers", {})) > 1:
                self.bar.set_postfix_str(" ".join(  # requests and mean latency per server
                    f"{url.split('//')[-1]}:{s['requests']}req/{s['mean_latency_s'] or 0:.2f}s"
                    for url, s in servers.items()), refresh=False)

    def write_cached(self, chunks: list[list[str]], embed) -> None:
        """Its own thread and connection: rows whose vectors are cached. The next chunk is
        read from the cache while this one is copied; an entry that cannot be read back is
        embedded again."""
        conn = db.connect(self.settings)
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="cache-read") as reader:
                pending = reader.submit(self.read_cached, chunks[0])
                for i in range(len(chunks)):
                    hit, vectors, lost = pending.result()
                    if i + 1 < len(chunks):
                        pending = reader.submit(self.read_cached, chunks[i + 1])
                    if hit:
                        self.write(conn, self.plan.pieces.deliver(hit, vectors), -1)
                    if lost:
                        log.warning("%d cached vectors could not be read back; embedding them",
                                    len(lost))
                        found, *batch, _later = embed(lost)
                        self.finish_batch(conn, found, *batch)
        finally:
            conn.close()

    def read_cached(self, texts: list[str]) -> tuple[list[str], np.ndarray | None, list[str]]:
        """Cached vectors of `texts` as one array: (texts found, vectors, texts lost)."""
        found = core.look_up(self.cache, self.plan.identity, texts)
        hit = [t for t in texts if t in found]
        return hit, np.stack([found[t] for t in hit]) if hit else None, \
            [t for t in texts if t not in found]


def _cached_chunks(plan: Plan) -> list[list[str]]:
    """Cached texts grouped so each write holds about WRITE_CHUNK_ROWS rows."""
    chunks, chunk, rows = [], [], 0
    for text in (t for t in plan.pieces.texts if t in plan.cached):
        chunk.append(text)
        rows += len(plan.pieces.rows_of(text))
        if rows >= WRITE_CHUNK_ROWS:
            chunks.append(chunk)
            chunk, rows = [], 0
    return chunks + ([chunk] if chunk else [])


def run_plan(plan: Plan, *, conn, backend, cache, settings, progress: bool = True) -> RunReport:
    """Carry out a plan: embed what is missing, write what changed. Returns the report.
    With EMBED_ENGINE=ray the plan's rows go to the Ray engine instead (`engine_ray`)."""
    if settings.EMBED_ENGINE == "ray":
        from .engine_ray import ingest_ray
        rows = {plan.target.id_col: plan.rows.ids, plan.target.text_col: plan.rows.texts}
        return ingest_ray(rows, plan.target, settings=settings, progress=progress)
    run = _Run(plan, backend=backend, cache=cache, settings=settings, progress=progress)
    stats_before = backend.stats()
    sizer = BatchSizer(plan.batch_size)

    def embed(texts: list[str]):
        """One batch: what another run cached meanwhile, our request for the rest, and the
        texts another run is embedding right now (retried after this pass)."""
        t0 = run.now()
        found, batch, later = core.embed_leased(backend, cache, texts, sizer=sizer,
                                                dimension=run.dimension)
        if batch[0]:
            run.request_spans.append((t0, run.now()))
        return (found, *batch, run.now() - t0, later)

    with ThreadPoolExecutor(backend.slots, thread_name_prefix="embed") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="write") as writer, \
            ThreadPoolExecutor(1, thread_name_prefix="write-cached") as side:
        # Requests go out first so the server starts at once; cached rows are written
        # meanwhile by their own thread, so they never hold up a finished batch.
        chunks = _cached_chunks(plan)
        side_job = side.submit(run.write_cached, chunks, embed) if chunks else None
        pending, writes = run.fail_known(), []
        while pending:
            pending = _one_pass(pending, plan, backend, sizer, pool, writer, writes, embed,
                                lambda *result: run.finish_batch(conn, *result))
            if pending:  # another run holds them: its vectors will be in the cache shortly
                log.info("%d texts are being embedded by another run: waiting for its vectors",
                         len(pending))
                time.sleep(CACHE_LEASE_POLL_S)
        for job in writes + ([side_job] if side_job else []):
            job.result()
    run.bar.close()
    return run.report.finish(run, backend, stats_before, settings)


def _one_pass(texts, plan, backend, sizer, pool, writer, writes, embed, finish) -> list[str]:
    """Send `texts` in batches, `backend.slots` at a time, each finished batch handed to the
    writer; returns the texts another run was embedding (to look up again)."""
    budget = plan.window.request_tokens
    tokens = plan.pieces.token_counts(texts, plan.window) if budget else None
    batches = core.batches(texts, lambda: sizer.size, tokens, budget)
    inflight, later = {}, []
    while True:
        while len(inflight) < backend.slots and (batch := next(batches, None)):
            inflight[pool.submit(embed, batch)] = batch
        if not inflight:
            return later
        done, _ = wait(inflight, return_when=FIRST_COMPLETED)
        for future in done:
            del inflight[future]
            *result, deferred = future.result()
            later += deferred
            writes.append(writer.submit(finish, *result))
        while len(writes) > 2 * backend.slots:  # back-pressure: few batches held in memory
            writes.pop(0).result()
