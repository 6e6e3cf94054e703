"""Step 9 against Step 9b, as a table and as one picture a reader takes in at a glance.

The table and the picture read only run reports (`report.RunReport`): requests, seconds,
rows per second, where the time went (server, database, client) and what was paid for
against what came from the cache.
"""
from __future__ import annotations

from .printing import plural
from .report import RunReport


def comparison_rows(per_row: RunReport | None, batched: RunReport) -> list[tuple[str, ...]]:
    """(what, Step 9, Step 9b) rows; Step 9's column is "-" when it did not run."""
    def figures(r: RunReport | None) -> list[str]:
        if r is None:
            return ["-"] * 5
        return [str(r.rows_written), str(r.requests), f"{r.wall_s:.2f}",
                f"{r.rows_per_s:,.0f}", f"{r.wall_s / r.rows_written * 1000:.1f}"
                if r.rows_written else "-"]
    names = ["rows written", "requests", "seconds", "rows/s", "ms per row"]
    return [(name, a, b) for name, a, b in zip(names, figures(per_row), figures(batched))]


def comparison_table(per_row: RunReport | None, batched: RunReport) -> str:
    """Step 9 (one request and one commit per row) beside Step 9b (batched), as text.

    >>> a = RunReport(rows_written=20, requests=20, wall_s=2.0)
    >>> b = RunReport(rows_written=100, requests=2, wall_s=0.5)
    >>> print(comparison_table(a, b))
    what          Step 9 (per row)  Step 9b (batched)
    rows written  20                100
    requests      20                2
    seconds       2.00              0.50
    rows/s        10                200
    ms per row    100.0             5.0
    """
    rows = [("what", "Step 9 (per row)", "Step 9b (batched)")] + comparison_rows(per_row, batched)
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows)


def plot_run(batched: RunReport, per_row: RunReport | None = None):
    """Three panels: seconds per 1,000 rows and requests per 100 rows of Step 9 and Step 9b;
    where Step 9b's time went; the texts paid for against those from the cache."""
    import matplotlib.pyplot as plt

    fig, (speed, time_ax, paid) = plt.subplots(1, 3, figsize=(11, 3))
    runs = [("Step 9", per_row), ("Step 9b", batched)] if per_row else [("Step 9b", batched)]
    names = [n for n, _ in runs]
    per_k = [r.wall_s / max(r.rows_written, 1) * 1000 for _, r in runs]
    reqs = [r.requests / max(r.rows_written, 1) * 100 for _, r in runs]
    x = range(len(runs))
    speed.bar([i - 0.2 for i in x], per_k, 0.4, label="seconds / 1,000 rows", color="tab:blue")
    speed.bar([i + 0.2 for i in x], reqs, 0.4, label="requests / 100 rows", color="tab:orange")
    speed.set_xticks(list(x), names)
    speed.set_yscale("log")
    speed.legend(fontsize=8)
    speed.set_title("per row against batched")
    wall = batched.wall_s or 1e-9
    parts = {"server busy": batched.server_busy_s, "database": batched.db_s,
             "client only": batched.client_only_s}
    time_ax.barh(list(parts), [v / wall * 100 for v in parts.values()], color="tab:green")
    time_ax.set_xlim(0, 100)
    time_ax.set_xlabel("% of Step 9b's wall time (they overlap)")
    time_ax.set_title(f"Step 9b: {batched.wall_s:.1f} s")
    paid_texts, cached = batched.texts_embedded, batched.cache_hits
    paid.bar(["embedded (paid)", "from the cache"], [paid_texts, cached],
             color=["tab:red", "tab:gray"])
    paid.set_title(f"texts, for {plural(batched.requests, 'request')}")
    for i, v in enumerate([paid_texts, cached]):
        paid.annotate(str(v), (i, v), ha="center", va="bottom")
    fig.tight_layout()
    return fig
