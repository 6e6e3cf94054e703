"""Where the rate governor keeps a budget's state, so processes sharing a key share it.

One interface, `transact(change) -> result`: `change(state, now)` runs with the state of
this key locked (a dict it may modify) and the store's clock, and its result comes back.
Three stores: in this process only (`MemoryLedger`); a file beside the JSONL cache under
an exclusive `fcntl.flock` (`FileLedger`: the processes of one machine); a row per key in
the cache's PostgreSQL (`PostgresLedger`: every machine on the shared cache, the
database's clock for all of them). The key is a hash of the servers and the API key.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .config import Settings

log = logging.getLogger(__name__)

TABLE = "embedding_rate_budget"
Change = Callable[[dict, float], Any]
#: One row per key: what `cache setup-sql` would have an administrator create.
DDL = (f"CREATE TABLE IF NOT EXISTS {TABLE} (key_hash text PRIMARY KEY, state jsonb NOT NULL, "
       f"updated_at timestamptz NOT NULL DEFAULT now())")


def knows(state: dict) -> bool:
    """Whether a stored state holds a budget someone learned."""
    return any(isinstance(lane, dict) and lane.get("limit") for lane in state.values())


class MemoryLedger:
    """The state in this process: threads of one client share it."""

    kind = "memory"

    def __init__(self, key: str = ""):
        self.key, self.state, self._lock = key, {}, threading.Lock()

    def knows_budget(self) -> bool:
        with self._lock:
            return knows(self.state)

    def transact(self, change: Change) -> Any:
        with self._lock:
            return change(self.state, time.time())

    def close(self) -> None:
        pass


class FileLedger:
    """{key: state} in a JSON file, read and rewritten under an exclusive flock."""

    kind = "file"

    def __init__(self, path: Path | str, key: str):
        self.path, self.key, self._lock = Path(path), key, threading.Lock()

    def knows_budget(self) -> bool:
        if not self.path.is_file():
            return False
        return self.transact(lambda state, now: knows(state))

    def transact(self, change: Change) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                states = _read_json(fd)
                state = states.setdefault(self.key, {})
                result = change(state, time.time())
                data = json.dumps(states).encode()
                os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, 0)
                os.write(fd, data)
                return result
            finally:
                os.close(fd)  # closing releases the flock

    def close(self) -> None:
        pass


def _read_json(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    try:
        states = json.loads(b"".join(chunks) or b"{}")
    except ValueError:  # a torn write by a killed process: start the budget afresh
        log.warning("the rate budget file could not be read; starting it afresh")
        return {}
    return states if isinstance(states, dict) else {}


class PostgresLedger:
    """A row (key_hash, state jsonb) per key: a change is one transaction holding the row
    (`SELECT ... FOR UPDATE`), with the database's clock, so machines whose clocks
    disagree still pace one budget."""

    kind = "postgres"

    def __init__(self, settings: Settings, key: str):
        self.settings, self.key, self._lock, self._conn = settings, key, threading.Lock(), None
        self._ready = False  # the table is there

    def _connection(self):
        if self._conn is None:
            from . import db
            from .cache.postgres import cache_settings
            self._conn = db.connect(cache_settings(self.settings))
            self._conn.autocommit = False
        return self._conn

    def _exists(self, cur) -> bool:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (TABLE,))
        return bool(cur.fetchone()[0])

    def knows_budget(self) -> bool:
        with self._lock:
            conn = self._connection()
            with conn.cursor() as cur:  # asking creates nothing: a run with no budget leaves no table
                row = None
                if self._exists(cur):
                    cur.execute(f"SELECT state FROM {TABLE} WHERE key_hash = %s", (self.key,))
                    row = cur.fetchone()
            conn.rollback()
        return bool(row and knows(row[0]))

    def transact(self, change: Change) -> Any:
        from psycopg2.extras import Json
        with self._lock:
            conn = self._connection()
            try:
                with conn.cursor() as cur:
                    missing = not self._ready and not self._exists(cur)
                if missing:  # a role with table privileges only creates nothing
                    from .db_guard import create_racing
                    conn.rollback()
                    create_racing(conn, DDL)
                self._ready = True
                with conn.cursor() as cur:
                    cur.execute(f"INSERT INTO {TABLE} (key_hash, state) VALUES (%s, '{{}}') "
                                f"ON CONFLICT (key_hash) DO NOTHING", (self.key,))
                    cur.execute(f"SELECT state, extract(epoch FROM clock_timestamp()) FROM {TABLE} "
                                f"WHERE key_hash = %s FOR UPDATE", (self.key,))
                    state, now = cur.fetchone()
                    result = change(state, float(now))
                    cur.execute(f"UPDATE {TABLE} SET state = %s, updated_at = now() "
                                f"WHERE key_hash = %s", (Json(state), self.key))
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
        return result

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def ledger_path(settings: Settings) -> Path:
    """The file beside the JSONL cache: `<cache>.ratelimit.json`."""
    cache = Path(settings.EMBED_CACHE_PATH)
    return cache.with_name(cache.name + ".ratelimit.json")


def open_ledger(settings: Settings, key: str):
    """The ledger of the configured cache: its PostgreSQL (always under Ray, as the cache
    is), else the file beside the JSONL cache. Nothing is opened until it is used."""
    if settings.EMBED_CACHE_BACKEND == "postgres" or settings.EMBED_ENGINE == "ray":
        return PostgresLedger(settings, key)
    return FileLedger(ledger_path(settings), key)


def setup_sql(role: str) -> str:
    """The budget's table for `cache setup-sql`: created by an administrator, used by a
    role with table privileges only (the role name is checked by the caller)."""
    return DDL + ";\n" + f"GRANT SELECT, INSERT, UPDATE ON {TABLE} TO {role};\n"
