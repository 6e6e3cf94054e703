"""`--reembed` (EMBED_REEMBED=1): every vector of a table made again by this run's identity.

The new vectors go into a shadow table, `<table>__reembed` (and its `_chunks`), through the
ordinary plan and run (either engine, the cache, leases, resumable: a killed reembed run
again finds the shadow table and writes only the rows it lacks, and the cache holds what
was paid). The shadow's rows are the table's own rows, with this run's input over them (its
text wins for its ids, as in an ordinary run). When every row is in, one transaction swaps
the shadow in: the old tables are dropped, the shadow renamed, its indexes renamed (an HNSW
index the old table had is built on the shadow first, so the swap holds its lock only for
the renames), and the record travels with it (it is the shadow's comment). Until then
searches read the old table; ordinary runs may still write to it under its own model: rows
they change are found at the swap, which then waits for one more `--reembed` to catch up.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from psycopg2 import sql

from . import provenance
from .db import table_dimension
from .db_guard import guarded
from .errors import DataError
from .provenance import Provenance
from .retrieval import create_hnsw_index
from .steps import Rows, Target, is_missing
from .table_names import regclass_text, schema_of, table_ident, unqualified

log = logging.getLogger(__name__)

SUFFIX = "__reembed"


@dataclass(frozen=True)
class Reembed:
    """A plan that builds a shadow: the table it replaces, and the ids of the run's input."""

    table: str
    input_ids: frozenset


def guard(conn, target: Target, rows: Rows, backend, settings):
    """The plan's check once the window is settled: (target, rows, Reembed or None, notes).
    Under EMBED_REEMBED the target may become the shadow; a table (or a shadow) of another
    identity stops the plan here, before its probe."""
    current = Provenance.of(backend.identity(), backend.window, settings)
    job, notes = None, []
    if settings.EMBED_REEMBED:
        target, rows, job, notes = redirect(conn, target, rows, current)
    hint = "" if job is None else (f"{target.table} holds a reembed by another model, not "
                                   "finished: run again with that model to finish it, or drop "
                                   f"{target.table} to start over (what was paid is cached).")
    notes += provenance.check(conn, target.table, current, hint)
    if job is None and pending(conn, target.table):
        notes.append(f"a reembed of {target.table} is pending ({target.table}{SUFFIX}): this "
                     "run writes to the table; the next --reembed catches these rows up")
    return target, rows, job, notes


def shadow_of(target: Target) -> Target:
    name = target.table + SUFFIX
    try:
        return Target(name, target.id_col, target.text_col)
    except DataError:
        raise DataError(f"--reembed builds the new vectors in {name}, beside {target.table}, and "
                        "that name is too long for PostgreSQL: copy the table to a shorter name "
                        "first, or ingest into another table (--table).") from None


def pending(conn, table: str) -> bool:
    """Whether a reembed of `table` was started and not swapped in yet."""
    return provenance.read(conn, table + SUFFIX)[0]


def redirect(conn, target: Target, rows: Rows, current: Provenance):
    """(target, rows, Reembed or None, notes) of a plan under EMBED_REEMBED: the shadow and
    every row of the table when its vectors are of another identity (or unknown, or a
    reembed is pending); the table itself when there is nothing to replace."""
    exists, stored = provenance.read(conn, target.table)
    if not exists:
        return target, rows, None, [f"EMBED_REEMBED: {target.table} does not exist yet: an "
                                    "ordinary run makes it"]
    if stored is not None and not stored.differences(current) and not pending(conn, target.table):
        return target, rows, None, [f"EMBED_REEMBED: the vectors of {target.table} were made by "
                                    "this run's identity: nothing to replace, an ordinary run"]
    shadow = shadow_of(target)
    merged, from_table = merge(conn, target, rows)
    made_by = stored.describe() if stored else "an unrecorded model"
    return shadow, merged, Reembed(target.table, frozenset(rows.ids)), [
        f"EMBED_REEMBED: the vectors of {target.table} ({made_by}) are made again into "
        f"{shadow.table}: {len(merged.ids):,} rows ({from_table:,} of them only in the table), "
        f"swapped in when every row is there; searches read {target.table} until then"]


@guarded("reading the rows of {table}")
def stored_rows(conn, table: str, id_col: str, text_col: str) -> dict[str, str]:
    """id -> text of every row of the table."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT {id}, {text} FROM {t} ORDER BY {id}").format(
            id=sql.Identifier(id_col), text=sql.Identifier(text_col), t=table_ident(table)))
        found = dict(cur.fetchall())
    conn.rollback()
    return found


def merge(conn, target: Target, rows: Rows) -> tuple[Rows, int]:
    """The table's rows with the input's over them, and how many came from the table only."""
    texts = {i: t for i, t in stored_rows(conn, target.table, target.id_col,
                                          target.text_col).items() if not is_missing(t)}
    only_table = len(set(texts) - set(rows.ids))
    texts.update(zip(rows.ids, rows.texts))
    return Rows(list(texts), list(texts.values()), rows.rows_read + only_table, rows.empty_ids,
                rows.duplicate_ids, rows.invalid, rows.repeated), only_table


def finish(conn, plan, report):
    """After a reembed plan's run: swap the shadow in when every row is there; else say
    what is missing (the old table keeps serving, a rerun continues)."""
    job = plan.reembed
    if job is None or report.error:
        return report
    if report.rows_failed:
        log.warning("%s is not swapped in: %d rows failed (see %s); %s keeps its old vectors. "
                    "Fix them and run with --reembed again", plan.target.table,
                    report.rows_failed, report.failures_path, job.table)
        return report
    count, examples = swap(conn, plan, report.dim)
    if count:
        log.warning("%s is not swapped in: %d rows of %s changed or are missing in it since "
                    "(e.g. %s); run with --reembed again to catch up", plan.target.table, count,
                    job.table, ", ".join(map(str, examples)))
        return report
    record = provenance.read(conn, job.table)[1]
    log.warning("%s now holds the vectors of %s (swapped in from %s)", job.table,
                record.describe() if record else "this run", plan.target.table)
    report.table = job.table
    return report


def _stale(cur, job: Reembed, plan) -> tuple[int, list]:
    """Rows of the old table the shadow lacks, or holds with another text (this run's own
    ids aside: their text is the input's)."""
    names = dict(id=sql.Identifier(plan.target.id_col), text=sql.Identifier(plan.target.text_col),
                 o=table_ident(job.table), s=table_ident(plan.target.table))
    cur.execute(sql.SQL(
        "SELECT count(*), (array_agg(o.{id} ORDER BY o.{id}))[1:5] FROM {o} o "
        "LEFT JOIN {s} s ON s.{id} = o.{id} WHERE o.embedding IS NOT NULL AND "
        "(s.{id} IS NULL OR s.embedding IS NULL OR "
        "(md5(s.{text}) <> md5(o.{text}) AND NOT o.{id} = ANY(%s)))").format(**names),
        (sorted(job.input_ids),))
    count, examples = cur.fetchone()
    return count, examples or []


def _indexes(cur, table: str) -> list[str]:
    cur.execute("SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE i.indrelid = to_regclass(%s)", (regclass_text(table),))
    return [r[0] for r in cur.fetchall()]


@guarded("swapping in the reembedded {table}")
def swap(conn, plan, dim: int) -> tuple[int, list]:
    """One transaction: check nothing changed, drop the old tables, rename the shadow and
    its indexes. Returns (rows not caught up, some of their ids): 0 when swapped."""
    job, shadow = plan.reembed, plan.target.table
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (regclass_text(f"{job.table}_embedding_hnsw"),))
        had_index = cur.fetchone()[0]
    conn.rollback()
    dim = dim or table_dimension(conn, shadow)
    if had_index and dim:  # built before the swap's lock, outside it
        create_hnsw_index(conn, shadow, dim)
    schema = schema_of(job.table)
    with conn.cursor() as cur:
        # Writers of the old table wait from here; readers go on until the DROP.
        cur.execute(sql.SQL("LOCK TABLE {t} IN SHARE ROW EXCLUSIVE MODE").format(
            t=table_ident(job.table)))
        count, examples = _stale(cur, job, plan)
        if count:
            conn.rollback()
            return count, examples
        for old in (f"{job.table}_chunks", job.table):
            cur.execute(sql.SQL("DROP TABLE IF EXISTS {t}").format(t=table_ident(old)))
        for old, new in ((job.table, shadow), (f"{job.table}_chunks", f"{shadow}_chunks")):
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", (regclass_text(new),))
            if not cur.fetchone()[0]:
                continue
            indexes = _indexes(cur, new)
            cur.execute(sql.SQL("ALTER TABLE {t} RENAME TO {n}").format(
                t=table_ident(new), n=unqualified(old)))
            prefix, keep = unqualified(new).strings[0], unqualified(old).strings[0]
            for index in (i for i in indexes if i.startswith(prefix)):  # `x__reembed_pkey`
                ident = sql.Identifier(index) if schema is None else sql.Identifier(schema, index)
                cur.execute(sql.SQL("ALTER INDEX {i} RENAME TO {n}").format(
                    i=ident, n=sql.Identifier(keep + index[len(prefix):])))
    conn.commit()
    return 0, []
