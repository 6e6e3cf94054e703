"""The run report: what a run read, skipped, embedded, wrote, and what it cost.

Shown at the end of Step 9b and of the CLI, saved as JSON beside the executed
notebook, so a user can see that the run saved time and money.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


def merge_intervals(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping intervals.

    >>> merge_intervals([(0, 2), (1, 3), (5, 6)])
    4
    >>> merge_intervals([])
    0
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
    texts_unique: int = 0
    texts_embedded: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_path: str = ""
    cache_entries_written: int = 0
    cache_lines_skipped: int = 0
    requests: int = 0
    retries: int = 0
    failures_path: str = ""
    wall_s: float = 0.0
    server_busy_s: float = 0.0
    db_s: float = 0.0
    client_only_s: float = 0.0
    gpu_hourly_usd: float | None = None
    #: one entry per written batch: [seconds since start, cumulative rows, request latency s]
    timeline: list[list[float]] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.rows_written / self.wall_s if self.wall_s else 0.0

    @property
    def cache_hit_rate(self) -> float:
        looked = self.cache_hits + self.cache_misses
        return self.cache_hits / looked if looked else 0.0

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

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(rows_per_s=round(self.rows_per_s, 1),
                    cache_hit_rate=round(self.cache_hit_rate, 4), cost_usd=self.cost_usd)
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
            f"embedding: {self.texts_embedded} texts embedded in {self.requests} requests "
            f"({self.retries} retries); cache {self.cache_hits} hits / {self.cache_misses} misses",
        ]
        if self.empty_ids:
            shown = ", ".join(self.empty_ids[:5]) + (" ..." if len(self.empty_ids) > 5 else "")
            lines.append(f"ids with empty text (not sent): {shown}")
        if self.failures_path:
            lines.append(f"failures listed in {self.failures_path}")
        if timings:
            wall = self.wall_s or 1e-9
            lines.append(
                f"wall {self.wall_s:.2f} s, {self.rows_per_s:,.0f} rows/s; server busy "
                f"{self.server_busy_s / wall:.0%}, database {self.db_s / wall:.0%}, "
                f"client only {self.client_only_s / wall:.0%}")
            if self.cost_usd is not None:
                lines.append(f"cost at ${self.gpu_hourly_usd}/h: ${self.cost_usd:.4f}")
        return lines

    def __str__(self) -> str:
        return "\n".join(self.summary_lines())


def utc_stamp() -> str:
    """The UTC time in run output names (`runs/run-<stamp>.ipynb`): sortable, no colons."""
    from datetime import datetime, timezone
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"


def default_report_path() -> Path:
    """runs/report-<UTC time>.json, for notebook runs not given RUN_REPORT_PATH."""
    from .constants import RUNS_DIR
    return RUNS_DIR / f"report-{utc_stamp()}.json"


def plot_timeline(report: RunReport):
    """One plot: cumulative rows over time, with each batch's request latency."""
    import matplotlib.pyplot as plt

    fig, rows_ax = plt.subplots(figsize=(7, 3))
    points = report.timeline
    rows_ax.plot([p[0] for p in points], [p[1] for p in points], color="tab:blue")
    rows_ax.set_xlabel("seconds since start")
    rows_ax.set_ylabel("rows written", color="tab:blue")
    timed = [p for p in points if p[2] is not None]
    if timed:
        latency_ax = rows_ax.twinx()
        latency_ax.scatter([p[0] for p in timed], [p[2] for p in timed], s=10, color="tab:orange")
        latency_ax.set_ylabel("request latency (s)", color="tab:orange")
    rows_ax.set_title(f"{report.rows_written} rows in {report.wall_s:.1f} s "
                      f"({report.requests} requests, {report.cache_hits} cache hits)")
    fig.tight_layout()
    return fig
