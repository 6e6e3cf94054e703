"""A source too large to hold, planned and run window by window, on either engine.

Each window of a `sources.PostgresSource` goes through the ordinary steps: `plan_ingest`
(prepare, skip unchanged, the cache) and `run_plan` (the local engine or Ray), so nothing
about dedup, caching or writing exists twice. Memory holds one window. The windows'
reports become one report (`merge_reports`): every request of every window is in it,
so it is still the bill. A later window's row with an id an earlier window had overwrites
it (the writes are upserts keyed by id); within a window the last row of an id wins.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import closing
from dataclasses import fields

from . import sync
from .config import replace_settings
from .plan import Plan
from .report import RunReport
from .errors import DataError
from .sources import PostgresSource, is_postgres_source, open_source
from .steps import Target
from .workflow import plan_ingest, run_plan

log = logging.getLogger(__name__)

#: Report fields that are the same in every window (settings, the backend) or that already
#: hold the whole session (the cache store's counters): the last window's value stands.
LAST = {"table", "engine", "backend", "model", "route", "batch_size", "concurrency",
        "cache_path", "cache_entries_written", "cache_lines_skipped", "requests_total",
        "texts_total", "gpu_hourly_usd", "price_per_1m_tokens", "error"}
#: Recomputed over the whole run (`finish`), from the windows' spans.
TIMES = {"wall_s", "server_busy_s", "db_s", "client_only_s"}
#: long_texts counters that add up over windows (the rest: the last window's, or the max).
LONG_SUMS = ("over", "chars", "chars_beyond", "chunks")


def source_from_args(args, settings) -> PostgresSource | None:
    """The CLI's `--data postgresql://... --query/--source-table`, opened; None for a file."""
    if not is_postgres_source(args.data):
        if args.query or args.source_table:
            raise DataError("--query and --source-table read a PostgreSQL source: give "
                            "--data postgresql://user@host/db with one of them.")
        return None
    return open_source(args.data, query=args.query, table=args.source_table,
                       id_col=args.id_col, text_col=args.text_col, limit=args.limit,
                       window=settings.EMBED_SOURCE_WINDOW, extra_cols=settings.EMBED_KEEP_COLS)


def window_input(window, target: Target, source: PostgresSource) -> dict[str, list]:
    """A window as `plan_ingest` takes it, each row recording the source when sync needs it."""
    return window.columns(target.id_col, target.text_col,
                          source.label if target.record_source else None)


def ingest_source(source: PostgresSource, target: Target, *, settings, conn, backend, cache,
                  progress: bool = True, scope=None, force_delete: bool = False) -> RunReport:
    """Steps 8 and 9b over a source read in windows: each window planned and run like a
    whole input, the reports merged into one. With EMBED_SYNC, the rows that left the
    source are deleted once, after the last window (`sync.after_source`): a window is not
    the source, so the windows themselves run without sync. The source is closed at the end."""
    started = time.perf_counter()
    total, release, ray_start, meta_updated = None, None, 0.0, 0
    try:
        target = sync.target_for(target, settings)  # the rows record the source they came from
        windows_settings = replace_settings(settings, EMBED_SYNC=False)
        with closing(source.windows()) as windows:  # a window that fails ends the cursor
            for window in windows:
                plan = plan_ingest(window_input(window, target, source), target,
                                   settings=windows_settings, conn=conn, backend=backend,
                                   cache=cache)
                if settings.EMBED_ENGINE == "ray" and plan.todo and release is None:
                    from .ray_engine.driver import hold_ray  # once for every window
                    t0 = time.perf_counter()
                    release, ray_start = hold_ray(settings), time.perf_counter() - t0
                offset = time.perf_counter() - started
                part = run_plan(plan, conn=conn, backend=backend, cache=cache,
                                settings=windows_settings, progress=progress)
                part.rows_duplicate += window.repeated_before
                meta_updated += part.sync.get("rows_metadata_updated", 0)
                total = merge_reports(total, part, offset)
    except BaseException:
        if total is not None:
            log.warning("the source's first %d rows were run (%d written) before this window "
                        "stopped; a rerun skips them", total.rows_read, total.rows_written)
        raise
    finally:
        if release is not None:
            release()
        source.close()
    if total is None:  # a source with no rows
        total = RunReport(table=target.table, engine=settings.EMBED_ENGINE,
                          backend=settings.EMBEDDING_BACKEND, model=backend.model,
                          route=backend.route)
    if ray_start:  # the windows found Ray started: its start-up is the run's
        total.ray_startup_s = round((total.ray_startup_s or 0) + ray_start, 2)
    sync.after_source(source, target, conn=conn, settings=settings, report=total,
                      metadata_updated=meta_updated, force=force_delete)
    return finish(total, time.perf_counter() - started)


def merge_reports(total: RunReport | None, part: RunReport, offset: float) -> RunReport:
    """`part` (a window's report, its times from its own start) added into `total`.

    Counters add up, lists are joined, what every window shares is the last window's;
    the failure lists go into one file."""
    if total is None:
        total = RunReport()
    for f in fields(RunReport):
        name, mine, theirs = f.name, getattr(total, f.name), getattr(part, f.name)
        if name in TIMES or name in ("tally", "timeline", "long_texts", "servers", "workers",
                                     "failures_path", "ray_startup_s"):
            continue
        if name in LAST:
            setattr(total, name, theirs if theirs not in (None, "") else mine)
        elif name == "dim":
            total.dim = max(total.dim, part.dim)
        elif isinstance(theirs, bool) or not isinstance(theirs, (int, float, list)):
            setattr(total, name, theirs if theirs not in (None, "") else mine)
        else:  # counters and lists (ids with empty text): the windows' sum
            setattr(total, name, mine + theirs if mine is not None else theirs)
    total.timeline += [[round(t + offset, 3), rows + _rows_before(total, part)]
                       for t, rows in part.timeline]
    _shift_tally(total, part, offset)
    total.long_texts = merge_long(total.long_texts, part.long_texts)
    total.servers = _merged_servers(total.servers, part.servers, part.engine)
    _merge_workers(total.workers, part.workers)
    if part.ray_startup_s is not None:
        total.ray_startup_s = round((total.ray_startup_s or 0) + part.ray_startup_s, 2)
    total.failures_path = _one_failures_file(total.failures_path, part.failures_path)
    return total


def _rows_before(total: RunReport, part: RunReport) -> int:
    """Rows written by the windows before `part` (`total` already counts `part`'s)."""
    return total.rows_written - part.rows_written


def _shift_tally(total: RunReport, part: RunReport, offset: float) -> None:
    tally = part.tally
    tally.request_spans = [(a + offset, b + offset) for a, b in tally.request_spans]
    tally.sink_spans = [(a + offset, b + offset) for a, b in tally.sink_spans]
    total.tally.add(tally)


def merge_long(total: dict, part: dict) -> dict:
    """Two windows' `long_texts` as one: counts added, the longest kept, the window the
    last one's (it may have been measured meanwhile).

    >>> a = dict(over=1, chars=100, chars_beyond=10, chunks=2, longest=600, longest_id="a",
    ...          examples=["a"])
    >>> b = dict(over=2, chars=300, chars_beyond=30, chunks=4, longest=900, longest_id="b",
    ...          examples=["b"])
    >>> m = merge_long(a, b); m["over"], m["longest_id"], m["examples"], m["share_beyond"]
    (3, 'b', ['a', 'b'], 0.1)
    """
    if not total:
        return dict(part)
    merged = {**total, **part}
    for key in LONG_SUMS:
        merged[key] = total.get(key, 0) + part.get(key, 0)
    if total.get("longest", 0) >= part.get("longest", 0):
        merged["longest"], merged["longest_id"] = total.get("longest", 0), total.get("longest_id", "")
    merged["examples"] = (total.get("examples", []) + part.get("examples", []))[:5]
    merged["share_beyond"] = round(merged["chars_beyond"] / merged["chars"], 4) \
        if merged.get("chars") else 0.0
    return merged


def _merged_servers(total: dict, part: dict, engine: str) -> dict:
    """Per-server counts. The local engine's are the backend's session counts (the last
    window's hold them all); Ray's are the window's blocks' (they add up)."""
    if engine != "ray" or not total:
        return {url: dict(s) for url, s in part.items()} or total
    merged = {url: dict(s) for url, s in total.items()}
    for url, counts in part.items():
        server = merged.setdefault(url, {"requests": 0, "texts": 0, "errors": 0,
                                         "set_aside": 0, "mean_latency_s": None})
        for key in ("requests", "texts", "errors", "set_aside"):
            server[key] += counts.get(key, 0)
    return merged


def _merge_workers(total: dict, part: dict) -> None:
    for name, w in part.items():
        mine = total.setdefault(name, {"blocks": 0, "rows": 0, "seconds": 0.0})
        for key in ("blocks", "rows", "seconds"):
            mine[key] += w.get(key, 0)
        mine["rows_per_s"] = mine["rows"] / mine["seconds"] if mine["seconds"] else 0.0


def _one_failures_file(first: str, more: str) -> str:
    """The windows' failure lists in one file (the first window's that had any)."""
    if not more or not first:
        return first or more
    with open(first, "a") as out, open(more) as extra:
        out.write(extra.read())
    os.remove(more)
    return first


def finish(total: RunReport, wall: float) -> RunReport:
    """The merged report's times, over the whole run (reading the source included)."""
    total.finish_timing(wall, total.tally.request_spans, total.tally.sink_spans)
    return total


class StreamPlan:
    """What a run over a source read in windows would do and cost: the windows' plans added
    up (each made by `plan_ingest`, then dropped: memory holds one window)."""

    def __init__(self, source: PostgresSource):
        self.source, self.windows, self.texts_per_s = source, 0, None
        self.counts = dict.fromkeys(
            ("rows read", "rows with empty text (skipped)", "duplicate ids (last wins)",
             "rows already stored unchanged", "rows to write",
             "texts to send (chunks counted, duplicates once)", "texts in the cache",
             "texts to embed", "requests"), 0)
        self.tokens, self.probe_texts, self.long, self.notes = 0, 0, {}, []
        self.batch_size, self.gpu_hourly_usd, self.price_per_1m = 0, None, None
        self.sync: list[tuple[str, object]] = []   # EMBED_SYNC: `sync.source_count`

    def add(self, plan: Plan, repeated_before: int) -> None:
        values = (plan.rows.rows_read, len(plan.rows.empty_ids),
                  plan.rows.duplicate_ids + repeated_before, plan.rows_unchanged,
                  len(plan.todo), len(plan.pieces.texts), len(plan.cached),
                  len(plan.to_embed), plan.requests)
        for key, value in zip(self.counts, values):
            self.counts[key] += value
        self.windows += 1
        self.tokens += plan.tokens_to_embed if plan.price_per_1m is not None else 0
        self.probe_texts += plan.probe_texts
        self.texts_per_s = self.texts_per_s or plan.texts_per_s
        self.long = merge_long(self.long, dict(plan.pieces.long.__dict__))
        self.batch_size, self.gpu_hourly_usd = plan.batch_size, plan.gpu_hourly_usd
        self.price_per_1m = plan.price_per_1m
        self.notes += [n for n in plan.notes if n not in self.notes]

    @property
    def est_seconds(self) -> float | None:
        to_embed = self.counts["texts to embed"]
        if not to_embed:
            return 0.0
        return to_embed / self.texts_per_s if self.texts_per_s else None

    def as_rows(self) -> list[tuple[str, object]]:
        est = self.est_seconds
        rows = [("source", self.source.describe()), ("windows read", self.windows),
                *[(k if k != "requests" else f"requests at batch size {self.batch_size}", v)
                  for k, v in self.counts.items()]]
        if self.long.get("over"):
            rows.insert(7, (f"texts over the {self.long['window']}-token window",
                            f"{self.long['over']} ({self.long['chunks']} chunks, longest "
                            f"{self.long['longest']} tokens, id {self.long['longest_id']})"))
        rows += self.sync
        rows.append(("estimated embedding time", "unknown" if est is None else f"{est:.1f} s"))
        if self.gpu_hourly_usd is not None:
            cost = None if est is None else est / 3600 * self.gpu_hourly_usd
            rows.append((f"estimated cost at ${self.gpu_hourly_usd}/h",
                         "unknown" if cost is None else f"${cost:.4f}"))
        if self.price_per_1m is not None:
            price, where = self.price_per_1m
            rows.append((f"estimated cost at ${price}/1M tokens ({where})",
                         f"${self.tokens / 1e6 * price:.4f} ({self.tokens:,} tokens)"))
        return rows

    def __str__(self) -> str:
        rows = self.as_rows()
        width = max(len(k) for k, _ in rows)
        probe = [f"note: the probe batch embedded {self.probe_texts} texts (now cached)"] \
            if self.probe_texts else []
        return "\n".join([f"{k:<{width}}  {v}" for k, v in rows] + probe
                         + [f"note: {n}" for n in self.notes])


def plan_source(source: PostgresSource, target: Target, *, settings, conn, backend, cache,
                probe: bool = True, scope=None, force_delete: bool = False) -> StreamPlan:
    """Step 8 over a source read in windows: the totals, creating nothing. The first window
    with texts to embed may time one probe batch (cached, so not paid twice). A source is
    its own sync scope (`PostgresSource.label`): `scope` is for files and is not used."""
    totals = StreamPlan(source)
    try:
        target = sync.target_for(target, settings)
        windows_settings = replace_settings(settings, EMBED_SYNC=False)
        with closing(source.windows()) as windows:
            for window in windows:
                plan = plan_ingest(window_input(window, target, source), target,
                                   settings=windows_settings, conn=conn, backend=backend,
                                   cache=cache, probe=probe and totals.texts_per_s is None)
                totals.add(plan, window.repeated_before)
    finally:
        source.close()
    totals.sync = sync.source_count(source, target, conn=conn, settings=settings,
                                    force=force_delete)
    return totals
