"""Which identity made a table's vectors, recorded on the table, and the check against it.

Two models of one dimension give vectors of one shape, and a row stored unchanged (by md5)
is never sent again: without a record, a run with another model would leave a table
whose stored vectors and new query vectors come from different models. So each table
records what made its vectors: every field of `Identity` (whatever it holds: a field added
there is recorded and compared without a change here) and how long texts were cut
(EMBED_LONG_TEXTS, the overlap, the window). A run of another identity stops before any
request; `reembed` replaces every vector.

The record is the table's COMMENT (a line `embed-helpers provenance: {json}`; a comment of
the user's own is kept above it). A comment lives and dies with its table: DROP TABLE
(RESET_TABLE) takes it along, so a record never outlives its vectors and misjudges a new
table of the same name; a rename (the reembed's swap) carries it, pg_dump keeps it, it
needs no table of ours in the user's schema, and `SELECT obj_description(to_regclass(
'"s1"."Docs"'), 'pg_class')` reads it from any tool.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

from psycopg2 import errors as pg_errors
from psycopg2 import sql

from .db import table_dimension
from .db_guard import guarded
from .errors import TableOfAnotherModel
from .identity import Identity
from .table_names import regclass_text, table_ident

log = logging.getLogger(__name__)

MARKER = "embed-helpers provenance: "


@dataclass(frozen=True)
class Provenance:
    """What made a table's vectors: `identity` (the fields of `Identity`) and `chunking`."""

    identity: dict
    chunking: dict = field(default_factory=dict)

    @classmethod
    def of(cls, identity: Identity, window, settings) -> "Provenance":
        """The record of a run; `window` None: not settled yet (only the policy is known).
        The window counts only where texts are cut (chunk, truncate); the overlap only
        where they are chunked."""
        policy = settings.EMBED_LONG_TEXTS
        chunking = {"long_texts": policy}
        if policy == "chunk":
            chunking["overlap"] = settings.EMBED_CHUNK_OVERLAP
        if window is not None and policy != "fail":
            chunking.update(window=window.max_tokens, counter=window.counter.name)
        return cls(asdict(identity), chunking)

    def made_by(self, identity: Identity) -> "Provenance":
        """This record with the identity that made the vectors (its dimension known)."""
        return Provenance(asdict(identity), self.chunking)

    def differences(self, other: "Provenance") -> list[str]:
        """The fields whose values differ. A field one side lacks is not compared (a record
        written before the field existed, a window not settled yet), nor a dimension one
        side does not know yet; any other None is a value (EMBED_DIMENSIONS unset).

        >>> a = Provenance({"model": "m", "dim": 8, "dimensions": None}, {"long_texts": "chunk"})
        >>> a.differences(Provenance({"model": "m", "dim": None, "dimensions": 4}, {}))
        ['dimensions']
        """
        found = []
        for part in ("identity", "chunking"):
            mine, theirs = getattr(self, part), getattr(other, part)
            for name in mine:
                unknown = name == "dim" and None in (mine[name], theirs.get(name))
                if name in theirs and not unknown and mine[name] != theirs[name]:
                    found.append(name)
        return found

    def describe(self) -> str:
        """`<route> nomic-embed-text (768, normalized; long texts chunk, overlap 32, window
        2044)`: the route, the model, then every other field.

        >>> Provenance({"route": "r", "model": "m", "dim": 8, "normalized": True},
        ...            {"long_texts": "fail"}).describe()
        'r m (8, normalized; long texts fail)'
        """
        rest = dict(self.identity)
        route, model, dim = rest.pop("route", "?"), rest.pop("model", "?"), rest.pop("dim", None)
        norm = rest.pop("normalized", None)
        parts = [f"{dim if dim else 'dimension unknown'}"]
        parts += [] if norm is None else ["normalized" if norm else "not normalized"]
        parts += [f"{k} {v}" for k, v in rest.items()]
        cut = dict(self.chunking)
        how = [f"long texts {cut.pop('long_texts', '?')}"]
        how += [f"{k} {v}" for k, v in cut.items() if k != "counter"]
        return f"{route} {model} ({', '.join(parts)}; {', '.join(how)})"

    def to_json(self) -> str:
        return json.dumps({"identity": self.identity, "chunking": self.chunking}, sort_keys=True)

    @classmethod
    def from_comment(cls, comment: str | None) -> "Provenance | None":
        """The record in a table's comment, or None (no comment, or none of ours)."""
        for line in (comment or "").splitlines():
            if line.startswith(MARKER):
                body = json.loads(line[len(MARKER):])
                return cls(body.get("identity", {}), body.get("chunking", {}))
        return None


@guarded("reading the provenance of {table}")
def read(conn, table: str) -> tuple[bool, Provenance | None]:
    """(whether the table exists, its record or None)."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL, obj_description(to_regclass(%s), "
                    "'pg_class')", (regclass_text(table), regclass_text(table)))
        exists, comment = cur.fetchone()
    conn.rollback()
    return bool(exists), Provenance.from_comment(comment)


def write(conn, table: str, record: Provenance, *, commit: bool = True) -> bool:
    """Set the record as the table's comment, keeping the user's own lines of it. False when
    this role may not (COMMENT needs the table's owner): the run goes on, unrecorded."""
    with conn.cursor() as cur:
        cur.execute("SELECT obj_description(to_regclass(%s), 'pg_class')", (regclass_text(table),))
        old = cur.fetchone()[0] or ""
        kept = [line for line in old.splitlines() if not line.startswith(MARKER)]
        comment = "\n".join(kept + [MARKER + record.to_json()])
        try:
            cur.execute(sql.SQL("COMMENT ON TABLE {t} IS {c}").format(
                t=table_ident(table), c=sql.Literal(comment)))
        except pg_errors.InsufficientPrivilege as exc:
            conn.rollback()
            log.warning("cannot record which model made %s (%s): runs of another model "
                        "are not stopped for this table", table, str(exc).strip())
            return False
    if commit:
        conn.commit()
    return True


def compare(table: str, stored: Provenance, current: Provenance, hint: str = "") -> None:
    """TableOfAnotherModel when the two records differ in any field both hold."""
    fields = stored.differences(current)
    if fields:
        raise TableOfAnotherModel(table, stored, current, fields, hint)


def check(conn, table: str, current: Provenance, hint: str = "") -> list[str]:
    """The plan's check: refuse a table made by another identity; a table without a record
    (made before this release) is adopted at run time: the note says so."""
    exists, stored = read(conn, table)
    if not exists:
        return []
    if stored is None:
        return [f"table {table} has no record of the model that made its vectors (made before "
                f"this release): it is adopted as made by {current.describe()}"]
    if stored.differences(current) and is_empty(conn, table):
        return [f"table {table} is empty: its record ({stored.describe()}) is replaced by this "
                "run's"]
    compare(table, stored, current, hint)
    return []


@guarded("reading {table}")
def is_empty(conn, table: str, lock: bool = False) -> bool:
    """No row in the table. With `lock`, in the caller's transaction after a SHARE lock,
    which waits for a writer's open transaction: its rows count, not only committed ones."""
    with conn.cursor() as cur:
        if lock:
            cur.execute(sql.SQL("LOCK TABLE {t} IN SHARE MODE").format(t=table_ident(table)))
        cur.execute(sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {t})").format(t=table_ident(table)))
        empty = cur.fetchone()[0]
    if not lock:
        conn.rollback()
    return empty


@guarded("recording the provenance of {table}")
def claim(conn, table: str, record: Provenance, replace_empty: bool = False) -> None:
    """At a sink's first vectors (the table exists now): record ours when the table has
    none, else check the one another process may have written since the plan. Serialised
    per table by a transaction lock, so two runs that create one table cannot both record.
    `replace_empty` (a run's start): the record of a table with no row (TRUNCATEd, or left by
    a run stopped before its first write) gives way to ours."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (MARKER + regclass_text(table),))
        cur.execute("SELECT obj_description(to_regclass(%s), 'pg_class')", (regclass_text(table),))
        stored = Provenance.from_comment(cur.fetchone()[0])
    if stored is None or (replace_empty and stored.differences(record)
                          and is_empty(conn, table, lock=True)):
        write(conn, table, record)
        return
    conn.rollback()
    compare(table, stored, record)


def at_run(conn, plan, backend) -> None:
    """Run time, both engines: check again (another process may have written the table
    since the plan), and adopt a table without a record. A table made during the run is
    claimed by the sink at its first vectors instead."""
    if plan.provenance is None:
        return
    stored_dim = table_dimension(conn, plan.target.table)
    if stored_dim:  # else no table yet
        claim(conn, plan.target.table, plan.provenance.made_by(
            backend.identity(plan.identity.dim or stored_dim)), replace_empty=True)


def at_first_vectors(conn, table: str, record: Provenance | None, backend, dim: int) -> None:
    """A sink that has just created (or found) its table: claim it for this identity."""
    if record is not None:
        claim(conn, table, record.made_by(backend.identity(dim)))
