"""The one boundary where PostgreSQL failures become our errors, and the embedded server's
one-time self-check.

A backend that dies mid-statement shows up in psycopg2 as a bare "server closed the
connection unexpectedly". Every function of `db` passes through `guarded`, which turns it
into a `DatabaseError` saying what we were doing, what the server's log says happened
(a CPU instruction the build needs, an administrator's `pg_terminate_backend`, a crash),
which log to read, and what to do.
"""
from __future__ import annotations

import functools
import json
import logging
import re
from pathlib import Path
from typing import Callable

import psycopg2

from .constants import DB_LOG_TAIL_BYTES
from .errors import DatabaseError

log = logging.getLogger(__name__)

RERUN = ("Run it again: every batch is one transaction, so nothing is half-written, rows "
         "already stored are skipped and vectors already paid for come from the cache.")
EXTERNAL = ("Set DATABASE_URL to a PostgreSQL with pgvector >= 0.7, for example `docker run -d "
            "--name pgvector -e POSTGRES_PASSWORD=postgres -p 5432:5432 pgvector/pgvector:pg17` "
            "and DATABASE_URL=postgresql://postgres:postgres@localhost:5432/postgres in .env")
_SIGNAL = re.compile(r"terminated by signal (\d+): ([^\n]*)")
CHECK_SQL = """
CREATE SCHEMA embed_helpers_check;
CREATE TABLE embed_helpers_check.t (id int PRIMARY KEY, e vector(3));
INSERT INTO embed_helpers_check.t
  SELECT i, ARRAY[i, 3 - i % 3, 1 + i % 2]::real[]::vector FROM generate_series(1, 30) i;
CREATE INDEX ON embed_helpers_check.t USING hnsw (e vector_cosine_ops);
CREATE INDEX ON embed_helpers_check.t USING hnsw ((e::halfvec(3)) halfvec_cosine_ops);
SET LOCAL enable_seqscan = off;
SELECT id FROM embed_helpers_check.t ORDER BY e <=> '[1,1,1]' LIMIT 3;
SELECT l2_normalize(e), e <-> '[1,2,3]', e <#> '[1,2,3]' FROM embed_helpers_check.t LIMIT 3;
"""


def log_file(conn_or_pgdata) -> Path | None:
    """The embedded server's log file, or None for another server."""
    if isinstance(conn_or_pgdata, Path):
        return conn_or_pgdata / "log"
    host = getattr(getattr(conn_or_pgdata, "info", None), "host", "") or ""
    return Path(host) / "log" if host.startswith("/") and (Path(host) / "log").is_file() else None


def diagnose(exc: Exception, what: str, log_path: Path | None) -> DatabaseError:
    """A DatabaseError that says what happened while doing `what` and what to do."""
    said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    tail = _tail(log_path)
    where = f"the server's log, {log_path}" if log_path else "the PostgreSQL server's log"
    crash = _SIGNAL.findall(tail)
    if crash and crash[-1][0] == "4":
        return DatabaseError(
            f"The embedded PostgreSQL crashed while {what}: a backend was terminated by signal 4 "
            f"(illegal instruction). Its build uses CPU instructions this machine lacks. See "
            f"{where}. {EXTERNAL}, then run again.", log_path=str(log_path or ""), signal=4)
    if crash:
        number, detail = crash[-1]
        return DatabaseError(
            f"PostgreSQL crashed while {what}: a backend was terminated by signal {number} "
            f"({detail.strip()}). See {where}. {RERUN}", log_path=str(log_path or ""),
            signal=int(number))
    if "administrator command" in said or "administrator command" in tail[-2000:]:
        return DatabaseError(
            f"The database ended our connection while {what} (an administrator, "
            f"pg_terminate_backend, or a server shutdown). {RERUN}", log_path=str(log_path or ""))
    if isinstance(exc, psycopg2.InterfaceError) or "closed the connection" in said \
            or "connection" in said.lower():
        return DatabaseError(
            f"The connection to PostgreSQL was lost while {what} ({said}). See {where}. {RERUN}",
            log_path=str(log_path or ""))
    return DatabaseError(f"PostgreSQL failed while {what}: {said}", log_path=str(log_path or ""))


def guarded(what: str) -> Callable:
    """Decorate a `db` function taking the connection first: failures of the connection or
    the server become a `DatabaseError` naming `what` (may use {table})."""
    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapper(conn, *args, **kwargs):
            try:
                return func(conn, *args, **kwargs)
            except psycopg2.Error as exc:
                doing = what.format(table=args[0] if args and isinstance(args[0], str) else "")
                if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
                    raise diagnose(exc, doing, log_file(conn)) from None
                _rollback(conn)
                said = (getattr(exc, "pgerror", None) or str(exc)).strip()
                raise DatabaseError(f"PostgreSQL refused while {doing}: {said} Nothing of this "
                                    f"batch was written (one transaction).") from None
        return wrapper
    return decorate


def create_racing(conn, statement) -> bool:
    """Run a CREATE ... IF NOT EXISTS and commit; False when another worker created the same
    thing at the same moment (IF NOT EXISTS does not cover that race: PostgreSQL raises)."""
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
        conn.commit()
        return True
    except (psycopg2.errors.UniqueViolation, psycopg2.errors.DuplicateTable,
            psycopg2.errors.DuplicateObject):
        conn.rollback()
        return False


def _rollback(conn) -> None:
    try:
        conn.rollback()
    except psycopg2.Error:
        pass


def _tail(path: Path | None) -> str:
    if path is None or not path.is_file():
        return ""
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - DB_LOG_TAIL_BYTES))
        return fh.read().decode("utf-8", "replace")


def check_once(conn, pgdata: Path) -> bool:
    """Build a tiny HNSW index and query it in a throwaway schema (rolled back), once per
    data folder and server version; True when the check ran now.

    A build of pgvector that needs CPU instructions this machine lacks dies here, with a
    clear message, instead of in the middle of a run.
    """
    with conn.cursor() as cur:
        cur.execute("SELECT current_setting('server_version'), "
                    "(SELECT extversion FROM pg_extension WHERE extname = 'vector')")
        versions = list(cur.fetchone())
    conn.rollback()
    marker = pgdata / ".embed_helpers_check.json"
    try:
        if json.loads(marker.read_text()) == versions:
            return False
    except (OSError, ValueError):
        pass
    try:
        with conn.cursor() as cur:
            cur.execute(CHECK_SQL)
        conn.rollback()
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        raise diagnose(exc, "checking the embedded server (a tiny HNSW index)", log_file(pgdata)) \
            from None
    marker.write_text(json.dumps(versions))
    log.info("embedded PostgreSQL %s with pgvector %s passed its check", *versions)
    return True
