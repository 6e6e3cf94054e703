"""Sync (EMBED_SYNC, --sync): rows that left the input leave the table, within the run's scope.

The one owner of the delete decision. Which rows are stale: those in scope whose id is not
in the input (an id whose text is now empty counts as gone: a retracted abstract must stop
coming back in searches; a row that failed to embed is still in the input and stays). The
scope: EMBED_SYNC_SCOPE=files (the default) covers the rows recorded as coming from the
files this run read (`metadata.SOURCE_COLUMN`), so a run over one file of a folder leaves
the other files' rows alone, and rows with no recorded source (written by a run without
sync or KEEP_COLS) are left too; EMBED_SYNC_SCOPE=table says the input is the whole table.
The brake: more than EMBED_SYNC_MAX_DELETE of the rows in scope is refused unless
`force` (--force-delete), at plan time before anything is paid, and again in the delete's
own transaction. A read that fails stops before the plan, so it never deletes anything.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

from psycopg2 import sql

from . import metadata
from .db import table_dimension
from .db_guard import guarded
from .errors import ConfigError, DataError
from .table_names import table_ident

log = logging.getLogger(__name__)

SCOPES = ("files", "table")
IDS_TABLE = "_embed_helpers_sync_ids"


class SyncRefused(DataError):
    """Sync would delete more of the table than EMBED_SYNC_MAX_DELETE allows."""


@dataclass(frozen=True)
class Scope:
    """What a sync may delete: `mode` "files" (rows from these `sources`) or "table"."""

    mode: str
    sources: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.mode == "table":
            return "the whole table (EMBED_SYNC_SCOPE=table)"
        return f"the rows from {', '.join(self.sources) or 'no file'}"


@dataclass
class SyncCount:
    """What a sync finds (at plan time) or did (after the run)."""

    in_scope: int = 0           # rows of the table in scope
    stale: int = 0              # of them, not in the input: to delete (or deleted)
    unattributed: int = 0       # rows not in the input with no recorded source, left alone
    chunks: int = 0             # chunks deleted with the rows

    def share(self) -> float:
        return self.stale / self.in_scope if self.in_scope else 0.0


def scope_for(settings, sources: Iterable[str] | None) -> Scope:
    """The scope of a run: the input's files, or the whole table (EMBED_SYNC_SCOPE)."""
    if settings.EMBED_SYNC_SCOPE == "table":
        return Scope("table")
    sources = tuple(sorted(set(s for s in (sources or ()) if s)))
    if not sources:
        raise ConfigError("EMBED_SYNC_SCOPE", "files needs to know which files the input came "
                                              "from, and this input names none (a Synthea folder, "
                                              "or a DataFrame made by hand): set "
                                              "EMBED_SYNC_SCOPE=table if it is the whole table, "
                                              "or read the files with workflow.load_raw / the CLI.")
    return Scope("files", sources)


def kept_ids(rows) -> list[str]:
    """The ids sync keeps: every row of the input with a text (failed ones included), and
    the ones set aside as invalid (they are in the input; fixing them is the user's)."""
    return list(rows.ids) + [row_id for row_id, _reason in rows.invalid]


def _load_ids(cur, ids: Sequence[str]) -> None:
    """The input's ids into a temporary table, for one anti-join instead of a list scan."""
    # No key: the input's ids are unique, and the anti-join hashes them anyway.
    cur.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {i} (id text) ON COMMIT DROP")
                .format(i=sql.Identifier(IDS_TABLE)))
    cur.execute(sql.SQL("INSERT INTO {i} SELECT unnest(%s::text[])")
                .format(i=sql.Identifier(IDS_TABLE)), (list(ids),))
    cur.execute(sql.SQL("ANALYZE {i}").format(i=sql.Identifier(IDS_TABLE)))


def _names(conn, target, scope: Scope) -> dict:
    has = metadata.has_columns(conn, target.table)
    source = sql.Identifier(metadata.SOURCE_COLUMN) if has else sql.SQL("NULL::text")
    in_scope = sql.SQL("true") if scope.mode == "table" else \
        sql.SQL("coalesce({s} = ANY(%(sources)s), false)").format(s=source)
    return dict(t=table_ident(target.table), id=sql.Identifier(target.id_col),
                i=sql.Identifier(IDS_TABLE), src=source, scope=in_scope,
                gone=sql.SQL("NOT EXISTS (SELECT 1 FROM {i} WHERE {i}.id = {t}.{id})").format(
                    i=sql.Identifier(IDS_TABLE), t=table_ident(target.table),
                    id=sql.Identifier(target.id_col)))


def _count(cur, names: dict, scope: Scope) -> SyncCount:
    # A join, not NOT EXISTS: inside FILTER that would be a subquery per row.
    gone = sql.SQL("{i}.id IS NULL").format(i=names["i"])
    cur.execute(sql.SQL("SELECT count(*) FILTER (WHERE {scope}), "
                        "count(*) FILTER (WHERE {scope} AND {gone}), "
                        "count(*) FILTER (WHERE {src} IS NULL AND NOT {scope} AND {gone}) "
                        "FROM {t} LEFT JOIN {i} ON {i}.id = {t}.{id}").format(
        **{**names, "gone": gone}), {"sources": list(scope.sources)})
    return SyncCount(*cur.fetchone())


@guarded("counting the rows sync would delete")
def count_missing(conn, target, source_ids: Sequence[str], scope: Scope) -> SyncCount:
    """How many rows in scope are not in the input; nothing is changed (the plan)."""
    if table_dimension(conn, target.table) is None:
        return SyncCount()
    names = _names(conn, target, scope)
    with conn.cursor() as cur:
        _load_ids(cur, source_ids)
        found = _count(cur, names, scope)
    conn.rollback()
    return found


def check_brake(count: SyncCount, settings, target, *, force: bool) -> None:
    """Refuse a sync that would delete more than EMBED_SYNC_MAX_DELETE of the rows in scope."""
    limit = settings.EMBED_SYNC_MAX_DELETE
    if force or not count.stale or count.share() <= limit:
        return
    raise SyncRefused(
        f"sync would delete {count.stale:,} of the {count.in_scope:,} rows of {target.table} in "
        f"its scope ({count.share():.0%}, over EMBED_SYNC_MAX_DELETE={limit:g}): nothing was "
        "deleted or embedded. If the input really lost those rows, run again with "
        "--force-delete (or raise EMBED_SYNC_MAX_DELETE); if not, check DATA_PATH: a file may "
        "be missing, cut short or read with another ID_COL.")


@guarded("deleting the rows that left the input")
def delete_missing(conn, target, source_ids: Sequence[str], scope: Scope, settings, *,
                   force: bool = False) -> SyncCount:
    """Delete the rows in `scope` whose id is not in `source_ids`, and their chunks, in one
    transaction; the brake is checked again inside it (the table may have changed since
    the plan). A driver that reads its input in windows calls this once, at the end, with
    every id it saw."""
    if table_dimension(conn, target.table) is None:
        return SyncCount()
    names = _names(conn, target, scope)
    chunks = table_dimension(conn, target.chunks_table) is not None
    with conn.cursor() as cur:
        _load_ids(cur, source_ids)
        found = _count(cur, names, scope)
        try:
            check_brake(found, settings, target, force=force)
        except SyncRefused:
            conn.rollback()
            raise
        cur.execute(sql.SQL("DELETE FROM {t} WHERE {scope} AND {gone} RETURNING {id}")
                    .format(**names), {"sources": list(scope.sources)})
        gone = [r[0] for r in cur.fetchall()]
        if chunks and gone:
            cur.execute(sql.SQL("DELETE FROM {c} WHERE {id} = ANY(%s)").format(
                c=table_ident(target.chunks_table), id=names["id"]), (gone,))
            found.chunks = cur.rowcount
    conn.commit()
    found.stale = len(gone)
    log.info("sync deleted %d rows (%d chunks) of %s", found.stale, found.chunks, target.table)
    return found


def plan_lines(count: SyncCount, scope: Scope) -> list[tuple[str, object]]:
    """The plan's rows about sync."""
    rows = [("rows to delete (sync: not in the input, or now empty)", count.stale),
            ("sync scope", f"{scope.describe()}: {count.in_scope:,} rows")]
    if count.unattributed:
        rows.append(("rows not in the input with no recorded source (left)", count.unattributed))
    return rows


def report_lines(count: SyncCount | None, metadata_updated: int) -> list[str]:
    """The report's lines about metadata updates and sync."""
    lines = [f"metadata updated: {metadata_updated} rows (nothing embedded)"] \
        if metadata_updated else []
    if count is not None:
        lines.append(f"sync: {count.stale} rows deleted ({count.chunks} chunks) of "
                     f"{count.in_scope} in scope")
        if count.unattributed:
            lines.append(f"sync left {count.unattributed} rows not in the input that have no "
                         "recorded source (EMBED_SYNC_SCOPE=table deletes them too)")
    return lines


def report_sync(count: SyncCount | None, metadata_updated: int) -> dict:
    """The report's `sync` field: what was updated and deleted, and its lines."""
    return {"rows_metadata_updated": metadata_updated,
            "rows_deleted": count.stale if count else 0,
            "chunks_deleted": count.chunks if count else 0,
            "lines": report_lines(count, metadata_updated)}


def target_for(target, settings):
    """The target a run writes: with EMBED_SYNC each row's source is recorded; KEEP_COLS
    from EMBED_KEEP_COLS when the target names none."""
    from dataclasses import replace
    keep = target.keep_cols or settings.EMBED_KEEP_COLS
    if (settings.EMBED_SYNC and not target.record_source) or keep != target.keep_cols:
        return replace(target, keep_cols=keep, record_source=target.record_source or
                       settings.EMBED_SYNC)
    return target


def prepare_plan(plan, conn, settings, df, scope=None, *, force: bool = False) -> None:
    """The plan's sync: its scope, the rows it would delete, and the brake (refused here,
    before anything is paid). A partial read (LIMIT) is refused: it would delete the rest."""
    plan.force_delete = force
    if not settings.EMBED_SYNC:
        return
    attrs = getattr(df, "attrs", {})
    if attrs.get("partial"):
        raise ConfigError("EMBED_SYNC", "with LIMIT (--limit) the input is only part of the "
                                        "source, and sync would delete the rest: drop one of them.")
    sources = scope if scope is not None else attrs.get("sources") or plan.rows.sources
    plan.sync_scope = scope_for(settings, sources)
    plan.sync_count = count_missing(conn, plan.target, kept_ids(plan.rows), plan.sync_scope)
    check_brake(plan.sync_count, settings, plan.target, force=force)


def after_run(plan, *, conn, settings, report):
    """After either engine: rows changed in metadata only are updated (nothing embedded),
    then with EMBED_SYNC the rows that left the input are deleted; both into the report."""
    updated = 0
    if plan.meta_changed:
        notes = plan.rows.annotations()
        ids = [plan.rows.ids[i] for i in plan.meta_changed]
        updated = metadata.write(conn, plan.target.table, plan.target.id_col, ids,
                                 [notes.get(i, (None, None))[0] for i in ids],
                                 [notes.get(i, (None, None))[1] for i in ids])
    count = None
    if settings.EMBED_SYNC and plan.sync_scope is not None:
        count = delete_missing(conn, plan.target, kept_ids(plan.rows), plan.sync_scope,
                               settings, force=plan.force_delete)
    report.sync = report_sync(count, updated)
    return report


def source_count(source, target, *, conn, settings, force: bool = False
                 ) -> list[tuple[str, object]]:
    """The plan's sync rows for a source read in windows, once every id is read; the
    brake is said here, before anything is paid."""
    if not settings.EMBED_SYNC or not source.complete:
        return []
    scope = scope_for(settings, [source.label])
    count = count_missing(conn, target, list(source.ids_seen), scope)
    check_brake(count, settings, target, force=force)
    return plan_lines(count, scope)


def after_source(source, target, *, conn, settings, report, metadata_updated: int = 0,
                 force: bool = False) -> None:
    """After the last window of a source: with EMBED_SYNC, the rows of this source that it
    no longer has are deleted (`delete_missing`), once, with every id read; a source that
    was not read to its end deletes nothing. `metadata_updated`: the windows' sum."""
    updated, count = metadata_updated, None
    if settings.EMBED_SYNC:
        if not source.complete:
            raise DataError("the source was not read to its end, so sync deletes nothing: run "
                            "again without --limit once the source reads whole.")
        count = delete_missing(conn, target, list(source.ids_seen),
                               scope_for(settings, [source.label]), settings, force=force)
    report.sync = report_sync(count, updated)
