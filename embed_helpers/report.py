"""The run report: what a run read, skipped, embedded, wrote, and what it cost (the bill).
Shown at the end of Step 9b and of the CLI, saved as JSON in EMBED_RUNS_DIR."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import relative
from .printing import plural
from .rate_governor import budget_note, budget_since
from .run_files import default_report_path, write_failures
from .sequence import Tally

#: RunReport field -> the backend counter it reads (`HttpClient.stats`).
_COUNTER = {"requests": "requests", "retries": "retries", "texts_sent": "texts",
            "tokens": "tokens"}

log = logging.getLogger(__name__)


def merge_intervals(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping intervals.

    >>> merge_intervals([(0, 2), (1, 3), (5, 6)]), merge_intervals([])
    (4, 0)
    """
    total, end = 0, float("-inf")
    for start, stop in sorted(intervals):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


@dataclass
class RunReport:
    """Counters and timings of one ingestion. Times are seconds since the run started."""

    table: str = ""
    engine: str = "local"
    backend: str = ""
    model: str = ""
    route: str = ""
    dim: int = 0
    batch_size: int = 0
    concurrency: int = 1
    rows_read: int = 0
    rows_empty: int = 0
    empty_ids: list[str] = field(default_factory=list)
    rows_duplicate: int = 0
    rows_unchanged: int = 0
    rows_written: int = 0
    rows_failed: int = 0
    texts_unique: int = 0         # distinct texts sent for the rows to write (chunks counted)
    texts_embedded: int = 0
    chunks_written: int = 0
    long_texts: dict = field(default_factory=dict)
    cache_hits: int = 0
    cache_misses: int = 0
    cache_path: str = ""
    cache_entries_written: int = 0
    cache_lines_skipped: int = 0
    requests: int = 0
    retries: int = 0
    texts_sent: int = 0           # texts the run's successful requests carried
    tokens: int = 0               # tokens the server said it billed (usage), when it says
    rate_budget: dict = field(default_factory=dict)  # waits on it, seconds, 429s (rate_governor)
    #: every request and text the backend sent in the session (`close_bill`)
    requests_total: int | None = None
    texts_total: int | None = None
    probe_texts: int = 0          # texts the plan's probe paid for: cache hits of this run
    failures_path: str = ""
    error: str = ""               # why the run stopped, when it did
    wall_s: float = 0.0
    server_busy_s: float = 0.0
    db_s: float = 0.0
    client_only_s: float = 0.0
    gpu_hourly_usd: float | None = None
    price_per_1m_tokens: float | None = None
    #: per server: requests, texts, errors, times set aside, mean latency
    servers: dict = field(default_factory=dict)
    #: Ray engine, per worker: blocks, rows, rows per second; and Ray's start-up time
    workers: dict = field(default_factory=dict)
    ray_startup_s: float | None = None
    batch: dict = field(default_factory=dict)  # EMBED_HOSTED_MODE=batch: `batch_api.mode.summary`
    sync: dict = field(default_factory=dict)  # metadata updated, rows deleted: `sync.after_run`
    #: one entry per written batch: [seconds since start, cumulative rows]
    timeline: list[list[float]] = field(default_factory=list)
    #: the sequence's own counts and spans, summed over blocks (not saved)
    tally: Tally = field(default_factory=Tally, repr=False)

    @property
    def rows_per_s(self) -> float:
        return self.rows_written / self.wall_s if self.wall_s else 0.0

    @property
    def cache_hit_rate(self) -> float:
        looked = self.cache_hits + self.cache_misses
        return self.cache_hits / looked if looked else 0.0

    @property
    def token_cost_usd(self) -> float | None:
        """What a hosted API bills: the tokens it said it counted (or none were said)."""
        if self.price_per_1m_tokens is None:
            return None
        return self.tokens / 1e6 * self.price_per_1m_tokens

    @property
    def cost_usd(self) -> float | None:
        if self.gpu_hourly_usd is None:
            return None
        return self.wall_s / 3600 * self.gpu_hourly_usd

    def finish_timing(self, wall: float, requests: list[tuple[float, float]],
                      writes: list[tuple[float, float]]) -> None:
        """Split wall time into server busy / database / client-only (they overlap)."""
        self.wall_s = round(wall, 3)
        self.server_busy_s = round(merge_intervals(requests), 3)
        self.db_s = round(merge_intervals(writes), 3)
        self.client_only_s = round(max(0.0, wall - merge_intervals(requests + writes)), 3)

    def add_requests(self, backend, before: dict) -> None:
        """What the backend sent since `before` (its counters): the run's requests."""
        stats = backend.stats()
        self.route = backend.route  # an old Ollama may have moved us to its legacy route
        for name in ("requests", "retries", "texts_sent", "tokens"):
            setattr(self, name, getattr(self, name) + stats.get(_COUNTER[name], 0)
                    - before.get(_COUNTER[name], 0))
        self.rate_budget = budget_since(stats, before, self.rate_budget)
        servers = stats.get("servers", {})
        self.servers = servers if len(servers) > 1 else {}

    def close(self, failures: list[dict], settings, *, wall: float, cache=None,
              error: BaseException | None = None) -> "RunReport":
        """The one place a run's report is completed, for both engines: what the sequence
        did (`tally`, summed over Ray's blocks), the failures (saved as a file), the time.
        A run that dies (`error`) is saved at once in EMBED_RUNS_DIR: a crash has a bill."""
        tally = self.tally
        self.texts_unique = max(self.texts_unique, tally.texts)
        self.texts_embedded = tally.embedded
        self.cache_hits, self.cache_misses = tally.hits, max(self.texts_unique - tally.hits, 0)
        if cache is not None:
            self.cache_entries_written = cache.stats.written
            self.cache_lines_skipped = cache.stats.skipped_lines
        self.rows_failed = len(failures)
        self.failures_path = write_failures(failures, settings.EMBED_RUNS_DIR)
        self.finish_timing(wall, tally.request_spans, tally.sink_spans)
        if error is not None:
            self.error = f"{type(error).__name__}: {error}"
            path = self.save(default_report_path(settings))
            log.warning("the run stopped; its report so far: %s", relative(path))
        return self

    def close_bill(self, backend, path: Path | str | None = None) -> "RunReport":
        """After the steps that follow the run (searches, the parity check): every request
        the backend sent in this session, so the report's totals are the server's bill.
        Re-saves the report at `path` when given."""
        stats = backend.stats()
        self.requests_total = stats.get("requests", 0)
        self.texts_total = stats.get("texts", 0)
        if path is not None:
            self.save(path)
        return self

    @property
    def bill_lines(self) -> list[str]:
        if self.requests_total is None:
            return []
        others = self.requests_total - self.requests
        return [f"bill: {plural(self.requests_total, 'request')}, "
                f"{plural(self.texts_total, 'text')} sent in all: "
                f"{self.requests} by Step 9b, {others} by the other steps (the probes, Step 9's "
                f"sample, the helpers' demo, searches, the parity check)"]

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["tally"]
        data.update(rows_per_s=round(self.rows_per_s, 1),
                    cache_hit_rate=round(self.cache_hit_rate, 4), cost_usd=self.cost_usd,
                    token_cost_usd=self.token_cost_usd)
        return data

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def summary_lines(self, timings: bool = True) -> list[str]:
        """A short, human summary. `timings=False` leaves out what changes run to run."""
        lines = [
            f"table {self.table}: {self.rows_written} rows written, {self.rows_unchanged} unchanged "
            f"(skipped), {self.rows_empty} empty text, {self.rows_duplicate} duplicate ids, "
            f"{self.rows_failed} failed (of {self.rows_read} read)",
            f"embedding: {self.texts_embedded} texts embedded in {plural(self.requests, 'request')} "
            f"({plural(self.retries, 'retry', 'retries')}{budget_note(self.rate_budget)}); cache "
            f"{self.cache_hits} hits / {self.cache_misses} misses",
        ]
        if self.probe_texts:
            lines.append(f"of the cache hits, {self.probe_texts} were paid for by this run's "
                         f"Step 8 probe (its vectors were cached, not paid twice)")
        if self.error:
            lines.append(f"STOPPED: {self.error}")
        long = self.long_texts
        if long.get("over"):
            what = {"chunk": f"split into {long['chunks']} chunks ({self.chunks_written} written)",
                    "truncate": "CUT to the window (EMBED_LONG_TEXTS=truncate)",
                    "fail": "listed as failures (EMBED_LONG_TEXTS=fail)"}[long["policy"]]
            origin = f" ({long['origin']})" if long.get("origin") else ""
            lines.append(f"long texts: {long['over']} over the {long['window']}-token window"
                         f"{'' if long['exact'] else ' (estimated)'}{origin}, {what}; "
                         f"{long['share_beyond']:.1%} of the characters lay beyond it")
        for url, s in self.servers.items():
            latency = "" if s.get("mean_latency_s") is None else \
                f", mean latency {s['mean_latency_s']} s"
            lines.append(f"server {url}: {s['requests']} requests, {s['texts']} texts, "
                         f"{s['errors']} errors, set aside {s['set_aside']}x{latency}")
        for name, w in self.workers.items():
            lines.append(f"worker {name}: {w['blocks']} blocks, {w['rows']} rows, "
                         f"{w['rows_per_s']:.0f} rows/s")
        if self.empty_ids:
            shown = ", ".join(self.empty_ids[:5]) + (" ..." if len(self.empty_ids) > 5 else "")
            lines.append(f"ids with empty text (not sent): {shown}")
        if self.failures_path:
            lines.append(f"failures listed in {relative(self.failures_path)}")
        lines += self.sync.get("lines", []) + self.bill_lines + self.batch.get("lines_in_words", [])
        if timings and self.engine == "ray":
            lines.append(f"wall {self.wall_s:.2f} s, {self.rows_per_s:,.0f} rows/s (Ray start-up "
                         f"{self.ray_startup_s} s)")
        elif timings:
            wall = self.wall_s or 1e-9
            lines.append(
                f"wall {self.wall_s:.2f} s, {self.rows_per_s:,.0f} rows/s; server busy "
                f"{self.server_busy_s / wall:.0%}, database {self.db_s / wall:.0%}, "
                f"client only {self.client_only_s / wall:.0%}")
            if self.cost_usd is not None:
                lines.append(f"cost at ${self.gpu_hourly_usd}/h: ${self.cost_usd:.4f}")
        if self.token_cost_usd is not None:
            lines.append(f"billed tokens {self.tokens:,} at ${self.price_per_1m_tokens}/1M: "
                         f"${self.token_cost_usd:.4f}")
        return lines

    def __str__(self) -> str:
        return "\n".join(self.summary_lines())


def start_report(plan, settings, cache) -> RunReport:
    """A report holding what the plan already knows."""
    rows = plan.rows
    long = plan.pieces.long
    return RunReport(
        table=plan.target.table, engine=settings.EMBED_ENGINE,
        backend=settings.EMBEDDING_BACKEND, model=plan.identity.model,
        route=plan.identity.route, dim=plan.identity.dim or 0, batch_size=plan.batch_size,
        concurrency=settings.EMBED_MAX_CONCURRENCY, rows_read=rows.rows_read,
        rows_empty=len(rows.empty_ids), empty_ids=rows.empty_ids,
        rows_duplicate=rows.duplicate_ids, rows_unchanged=plan.rows_unchanged,
        texts_unique=len(plan.pieces.texts), cache_hits=len(plan.cached),
        probe_texts=plan.probe_texts,
        cache_misses=len(plan.to_embed), cache_path=cache.describe() if cache is not None else "",
        gpu_hourly_usd=settings.GPU_HOURLY_USD,
        price_per_1m_tokens=plan.price_per_1m[0] if plan.price_per_1m else None,
        long_texts={**long.__dict__, "share_beyond": round(long.share_beyond, 4)})
