"""Step 9b: the one ingestion function behind the notebook and the CLI.

Up to EMBED_MAX_CONCURRENCY requests stay in flight while one writer thread
appends each finished batch to the cache and then writes it to PostgreSQL (one
commit per batch), so embedding, parsing and writes overlap. Rows whose vectors
are already cached are written meanwhile by a second thread on its own
connection, so they never hold up a finished batch. Cache first, database
second: a run killed between the two finds the vectors in the cache next time
and pays nothing again.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import db
from .batching import BatchSizer, embed_resilient
from .cache import cache_key
from .constants import PREVIEW_CHARS, RUNS_DIR, WRITE_CHUNK_ROWS
from .plan import Plan
from .report import RunReport

log = logging.getLogger(__name__)


@dataclass
class Target:
    """Where rows go: a table and its id and text columns."""

    table: str
    id_col: str
    text_col: str


class _Run:
    """State of one ingestion: the plan, the report, and the rows left per text."""

    def __init__(self, plan: Plan, target: Target, backend, cache, settings, progress):
        self.plan, self.target, self.cache, self.backend = plan, target, cache, backend
        self.settings = settings
        self.start = time.perf_counter()
        self.request_spans: list[tuple[float, float]] = []
        self.write_spans: list[tuple[float, float]] = []
        self.failures: list[dict] = []
        self.texts_embedded = 0
        self.lock = threading.Lock()
        self.rows_by_text: dict[str, list[int]] = {}
        for i in plan.todo:
            self.rows_by_text.setdefault(plan.prepared.texts[i], []).append(i)
        self.report = RunReport(
            table=target.table, backend=settings.EMBEDDING_BACKEND, model=plan.model,
            route=plan.route, dim=plan.dim, batch_size=plan.batch_size,
            concurrency=settings.EMBED_MAX_CONCURRENCY, rows_read=plan.prepared.rows_read,
            rows_empty=len(plan.prepared.empty_ids), empty_ids=plan.prepared.empty_ids,
            rows_duplicate=plan.prepared.duplicate_ids, rows_unchanged=plan.rows_unchanged,
            texts_unique=len(plan.keys), cache_path=str(getattr(cache, "path", "")),
            gpu_hourly_usd=settings.GPU_HOURLY_USD)
        self.bar = tqdm(total=len(plan.todo), unit="row", desc="Step 9b", disable=not progress)

    def now(self) -> float:
        return time.perf_counter() - self.start

    def fail(self, text: str, reason: str) -> None:
        with self.lock:
            for i in self.rows_by_text.get(text, []):
                self.failures.append({"id": self.plan.prepared.ids[i], "reason": reason,
                                      "text_preview": text[:PREVIEW_CHARS]})
            self.bar.update(len(self.rows_by_text.get(text, [])))

    def write(self, conn, texts: list[str], vectors: np.ndarray, latency: float) -> None:
        """Store one batch of (text, vector) in the cache, then its rows in the table."""
        t0 = self.now()
        p = self.plan
        if self.cache is not None and latency >= 0:
            # An old Ollama makes the backend fall back to its legacy route mid-run: key the
            # vectors by the route that really made them.
            route, normalized = self.backend.route, self.backend.normalized
            keys = [p.keys[t] if route == p.route else cache_key(route, p.model, p.dim, normalized, t)
                    for t in texts]
            self.cache.put_many(list(zip(keys, vectors)), route=route, model=p.model,
                                normalized=normalized, texts=texts)
        positions = [i for t in texts for i in self.rows_by_text[t]]
        counts = [len(self.rows_by_text[t]) for t in texts]
        row_vectors = vectors if len(positions) == len(texts) else np.repeat(vectors, counts, axis=0)
        ids = [p.prepared.ids[i] for i in positions]
        db.write_rows(conn, self.target.table, self.target.id_col, self.target.text_col, ids,
                      [p.prepared.texts[i] for i in positions], row_vectors,
                      upsert=self.settings.UPSERT,
                      assume_new=not any(i in p.stored_ids for i in ids))
        with self.lock:
            self.report.rows_written += len(positions)
            self.write_spans.append((t0, self.now()))
            self.report.timeline.append([round(self.now(), 3), self.report.rows_written,
                                         round(latency, 3) if latency >= 0 else None])
            self.bar.update(len(positions))

    def write_cached(self, chunks: list[list[str]], embed) -> None:
        """Its own thread and connection: rows whose vectors are cached.

        The next chunk is read from the cache while this one is copied to PostgreSQL;
        an entry that cannot be read back is embedded again.
        """
        conn = db.connect(self.settings)
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="cache-read") as reader:
                pending = reader.submit(self.read_cached, chunks[0])
                for i in range(len(chunks)):
                    hit, vectors, lost = pending.result()
                    if i + 1 < len(chunks):
                        pending = reader.submit(self.read_cached, chunks[i + 1])
                    if hit:
                        self.write(conn, hit, vectors, -1)
                    if lost:
                        log.warning("%d cached vectors could not be read back; embedding them",
                                    len(lost))
                        self.finish_batch(conn, *embed(lost))
        finally:
            conn.close()

    def read_cached(self, texts: list[str]) -> tuple[list[str], np.ndarray | None, list[str]]:
        """Cached vectors of `texts` as one array: (texts found, vectors, texts lost)."""
        found = self.cache.get_many([self.plan.keys[t] for t in texts])
        hit = [t for t in texts if self.plan.keys[t] in found]
        lost = [t for t in texts if self.plan.keys[t] not in found]
        return hit, np.stack([found[self.plan.keys[t]] for t in hit]) if hit else None, lost

    def finish_batch(self, conn, texts, vectors, failures, latency) -> None:
        """Record a batch's failures and write its good vectors."""
        failed = {f.position for f in failures}
        for f in failures:
            self.fail(texts[f.position], f.reason)
        good = [i for i in range(len(texts)) if i not in failed]
        if good:
            with self.lock:
                self.texts_embedded += len(good)
            self.write(conn, [texts[i] for i in good], vectors[good], latency)


def _cached_chunks(run: _Run, texts: list[str]):
    """Cached texts grouped so each write holds about WRITE_CHUNK_ROWS rows."""
    chunk, rows = [], 0
    for text in texts:
        chunk.append(text)
        rows += len(run.rows_by_text[text])
        if rows >= WRITE_CHUNK_ROWS:
            yield chunk
            chunk, rows = [], 0
    if chunk:
        yield chunk


def run_plan(plan: Plan, target: Target, *, conn, backend, cache, settings,
             progress: bool = True, failures_dir: Path = RUNS_DIR) -> RunReport:
    """Carry out a plan: embed what is missing, write what changed. Returns the report."""
    run = _Run(plan, target, backend, cache, settings, progress)
    sizer = BatchSizer(plan.batch_size)
    concurrency = settings.EMBED_MAX_CONCURRENCY
    stats_before = backend.stats() if backend is not None else {}
    for text in [t for t in plan.keys if "\x00" in t]:
        run.fail(text, "text contains a NUL byte, which PostgreSQL cannot store: clean the input")
    cached = [t for t in plan.keys if t in plan.cached and "\x00" not in t]
    to_embed = [t for t in plan.to_embed if "\x00" not in t]
    if settings.EMBED_CACHE_ONLY:
        for text in to_embed:
            run.fail(text, "not in the cache (EMBED_CACHE_ONLY=1): run without it to embed")
        to_embed = []

    def embed(texts: list[str]):
        t0 = run.now()
        vectors, failures = embed_resilient(backend, texts, sizer=sizer, expected_dim=plan.dim)
        run.request_spans.append((t0, run.now()))
        return texts, vectors, failures, run.now() - t0

    with ThreadPoolExecutor(concurrency, thread_name_prefix="embed") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="write") as writer, \
            ThreadPoolExecutor(1, thread_name_prefix="write-cached") as side:
        # Requests go out first so the server starts at once; cached rows are written
        # meanwhile by their own thread, so they never hold up a finished batch.
        chunks = list(_cached_chunks(run, cached))
        side_job = side.submit(run.write_cached, chunks, embed) if chunks else None
        writes = []
        inflight: dict = {}
        pos = 0
        while pos < len(to_embed) or inflight:
            while pos < len(to_embed) and len(inflight) < concurrency:
                batch = to_embed[pos:pos + sizer.size]
                pos += len(batch)
                inflight[pool.submit(embed, batch)] = batch
            done, _ = wait(inflight, return_when=FIRST_COMPLETED)
            for future in done:
                del inflight[future]
                writes.append(writer.submit(run.finish_batch, conn, *future.result()))
            # Back-pressure: hold at most a few finished batches in memory.
            while len(writes) > 2 * concurrency:
                writes.pop(0).result()
        for job in writes + ([side_job] if side_job else []):
            job.result()
    run.bar.close()
    return _finish(run, backend, stats_before, failures_dir)


def _finish(run: _Run, backend, stats_before: dict, failures_dir: Path) -> RunReport:
    report = run.report
    stats = backend.stats() if backend is not None else {}
    if backend is not None:
        report.route = backend.route  # an old Ollama may have moved us to its legacy route
    report.requests = stats.get("requests", 0) - stats_before.get("requests", 0)
    report.retries = stats.get("retries", 0) - stats_before.get("retries", 0)
    report.texts_embedded = run.texts_embedded
    report.cache_hits = len(run.plan.cached)
    report.cache_misses = len(run.plan.to_embed)
    if run.cache is not None:
        cstats = run.cache.stats
        report.cache_entries_written = getattr(cstats, "written", 0)
        report.cache_lines_skipped = getattr(cstats, "skipped_lines", 0)
    report.rows_failed = len(run.failures)
    if run.failures:
        failures_dir.mkdir(parents=True, exist_ok=True)
        # microseconds: workers finishing in the same second keep separate lists
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        path = failures_dir / f"failures-{stamp}.jsonl"
        with open(path, "w") as fh:
            for failure in run.failures:
                fh.write(json.dumps(failure) + "\n")
        report.failures_path = str(path)
        log.warning("%d rows failed; listed in %s", len(run.failures), path)
    report.finish_timing(run.now(), run.request_spans, run.write_spans)
    return report
