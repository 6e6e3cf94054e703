"""The PostgreSQL cache store: one table, `embedding_cache`, shared by every machine.

Same key as the JSONL store (`Identity.key`: route, model, dimension, normalisation and the
exact text), the vector as little-endian float32 bytes (any dimension), and when it was
written. A lookup is one query per batch; a write is one `INSERT ... ON CONFLICT DO
NOTHING` per batch, its keys sorted so that concurrent writers on any number of machines
take their locks in one order and never deadlock. Nothing is torn: each batch commits whole.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Sequence

import numpy as np
import psycopg2

from ..config import Settings, mask_url
from ..constants import CACHE_LEASE_MAX_S
from ..db_guard import create_racing, guarded
from ..identity import Identity
from ..rate_ledger import setup_sql as rate_budget_sql
from .facts import TableFacts
from .format import text_sha256, variant_sha256
from .leases import Leases

log = logging.getLogger(__name__)

TABLE = "embedding_cache"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    key bytea PRIMARY KEY,
    route text NOT NULL, model text NOT NULL, dim int NOT NULL, normalized boolean NOT NULL,
    text_sha256 bytea NOT NULL, variant_sha256 bytea NOT NULL,
    vector bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX IF NOT EXISTS {TABLE}_settings ON {TABLE} (model, route, normalized, dim);
CREATE TABLE IF NOT EXISTS {TABLE}_leases (
    key bytea PRIMARY KEY, owner text NOT NULL, until timestamptz NOT NULL);
"""
# The distinct dimensions of one model without reading every entry: a loose index scan.
DIMS_SQL = f"""
WITH RECURSIVE d AS (
  (SELECT dim FROM {TABLE} WHERE model = %(m)s AND route = %(r)s AND normalized = %(n)s
   ORDER BY dim LIMIT 1)
  UNION ALL
  SELECT (SELECT dim FROM {TABLE} WHERE model = %(m)s AND route = %(r)s AND normalized = %(n)s
          AND dim > d.dim ORDER BY dim LIMIT 1) FROM d WHERE d.dim IS NOT NULL)
SELECT dim FROM d WHERE dim IS NOT NULL
"""
INSERT_SQL = f"""
WITH done AS (DELETE FROM {TABLE}_leases WHERE key = ANY(%(k)s::bytea[]))
INSERT INTO {TABLE} (key, route, model, dim, normalized, text_sha256, variant_sha256, vector)
SELECT k, %(r)s, %(m)s, %(d)s, %(n)s, t, v, x
FROM unnest(%(k)s::bytea[], %(t)s::bytea[], %(v)s::bytea[], %(x)s::bytea[]) AS u(k, t, v, x)
ORDER BY k
ON CONFLICT (key) DO NOTHING
"""


def cache_settings(settings: Settings) -> Settings:
    """The settings to connect with: EMBED_CACHE_URL, else the run's own database."""
    if settings.EMBED_CACHE_URL:
        return replace(settings, DATABASE_URL=settings.EMBED_CACHE_URL)
    return settings


class PostgresCache(TableFacts):
    """(identity, text) -> vector in a PostgreSQL table; its own connection, used by one
    thread at a time."""

    kind = "postgres"

    def __init__(self, settings: Settings):
        from .. import db
        where = cache_settings(settings)
        self.where = mask_url(where.DATABASE_URL) if where.DATABASE_URL else "the embedded server"
        self.conn = db.connect(where)
        self.conn.autocommit = False
        self._lock = threading.RLock()
        # Renewed while a batch is in flight; a run that died frees its texts in seconds.
        self._leases = Leases(self.conn, self._lock,
                              max_hold=min(2 * settings.EMBEDDING_TIMEOUT, CACHE_LEASE_MAX_S))
        self.hits = self.misses = self.written = 0
        with self._lock:
            if not tables_exist(self.conn):  # a role with table privileges only creates nothing
                _create(self.conn)

    def describe(self) -> str:
        return f"PostgreSQL table {TABLE} ({self.where})"

    def get_many(self, identity: Identity, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached vectors of `texts` under `identity`: one query."""
        by_key = {bytes.fromhex(k): t for k, t in zip(identity.keys(texts), texts)}
        with self._lock:
            rows = _select(self.conn, "SELECT key, vector FROM " + TABLE + " WHERE key = ANY(%s)",
                           list(by_key))
        found = {}
        for key, blob in rows:
            vector = np.frombuffer(bytes(blob), dtype="<f4").copy()
            if vector.size == identity.dim and np.isfinite(vector).all():
                found[by_key[bytes(key)]] = vector
        self.hits += len(found)
        self.misses += len(by_key) - len(found)
        return found

    def contains(self, identity: Identity, texts: Sequence[str]) -> set[str]:
        by_key = {bytes.fromhex(k): t for k, t in zip(identity.keys(texts), texts)}
        with self._lock:
            rows = _select(self.conn, "SELECT key FROM " + TABLE + " WHERE key = ANY(%s)",
                           list(by_key))
        return {by_key[bytes(r[0])] for r in rows}

    def lease(self, identity: Identity, texts: Sequence[str]) -> set[str]:
        """The texts this run may embed now: those no other live run holds (see
        `leases`: a dead run's are taken over; storing the vectors ends a lease). Two
        runs at the same time so never pay for the same batch twice."""
        by_key = {bytes.fromhex(k): t for k, t in zip(identity.keys(texts), texts)}
        return {by_key[k] for k in self._leases.take(list(by_key))}

    def lease_wait_reason(self) -> str | None:
        """Why the last `lease` left texts to another run (for the progress bar), or None."""
        return self._leases.wait_reason

    @property
    def owner(self) -> str:
        """This store's lease holder: `host pid token`."""
        return self._leases.owner

    def put_many(self, identity: Identity, texts: Sequence[str], vectors: np.ndarray) -> int:
        """Insert new entries in one statement (ending their leases); entries another
        writer stored are kept."""
        if len(vectors) != len(texts):
            raise ValueError(f"{len(vectors)} vectors but {len(texts)} texts")
        good = []
        for i, vector in enumerate(vectors):
            vec = np.asarray(vector, dtype="<f4")
            if vec.ndim == 1 and vec.size == identity.dim and np.isfinite(vec).all():
                good.append(i)
            else:
                log.warning("cache: not caching a bad vector for %r", texts[i][:60])
        if not good:
            return 0
        keys = identity.keys([texts[i] for i in good])
        params = {"r": identity.route, "m": identity.model, "d": identity.dim,
                  "n": identity.normalized, "k": [bytes.fromhex(k) for k in keys],
                  "t": [bytes.fromhex(text_sha256(texts[i])) for i in good],
                  "v": [bytes.fromhex(variant_sha256(texts[i])) for i in good],
                  "x": [np.ascontiguousarray(vectors[i], dtype="<f4").tobytes() for i in good]}
        with self._lock:
            written = _insert(self.conn, params)
        self._leases.done(params["k"])
        self.written += written
        return written

    def put_entries(self, entries: Sequence[dict]) -> int:
        """Insert entries as another store holds them (`cache import`)."""
        written = 0
        groups: dict[tuple, list[dict]] = {}
        for e in entries:
            groups.setdefault((e["route"], e["model"], e["dim"], e["normalized"]), []).append(e)
        for (route, model, dim, normalized), group in groups.items():
            params = {"r": route, "m": model, "d": dim, "n": normalized,
                      "k": [bytes.fromhex(e["key"]) for e in group],
                      "t": [bytes.fromhex(e["text_sha256"]) for e in group],
                      "v": [bytes.fromhex(e["variant_sha256"]) for e in group],
                      "x": [np.ascontiguousarray(e["vector"], dtype="<f4").tobytes() for e in group]}
            with self._lock:
                written += _insert(self.conn, params)
        self.written += written
        return written

    def entries(self):
        """Every entry with its vector, streamed with a server-side cursor (`cache export`)."""
        with self._lock:
            with self.conn.cursor(name="embed_helpers_export") as cur:
                cur.itersize = 2000
                cur.execute(f"SELECT encode(key, 'hex'), route, model, dim, normalized, "
                            f"encode(text_sha256, 'hex'), encode(variant_sha256, 'hex'), "
                            f"to_char(created_at AT TIME ZONE 'UTC', "
                            f"'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), vector FROM {TABLE}")
                names = ("key", "route", "model", "dim", "normalized", "text_sha256",
                         "variant_sha256", "ts")
                for row in cur:
                    entry = dict(zip(names, row[:8]))
                    entry["vector"] = np.frombuffer(bytes(row[8]), dtype="<f4").copy()
                    yield entry
            self.conn.rollback()

    def dims(self, route: str, model: str, normalized: bool) -> list[int]:
        with self._lock:
            rows = _select(self.conn, DIMS_SQL, {"m": model, "r": route, "n": normalized})
        return sorted(r[0] for r in rows)

    def find(self, text_hashes: set[str], variant_hashes: set[str]) -> list[dict]:
        """Entries (without vectors) whose text or variant hash is given: for the doctor."""
        with self._lock:
            rows = _select(self.conn, f"SELECT encode(key, 'hex'), route, model, dim, normalized, "
                                      f"encode(text_sha256, 'hex'), encode(variant_sha256, 'hex') "
                                      f"FROM {TABLE} WHERE text_sha256 = ANY(%(t)s) "
                                      f"OR variant_sha256 = ANY(%(v)s)",
                           {"t": [bytes.fromhex(h) for h in text_hashes],
                            "v": [bytes.fromhex(h) for h in variant_hashes]})
        names = ("key", "route", "model", "dim", "normalized", "text_sha256", "variant_sha256")
        return [dict(zip(names, r)) for r in rows]

    def summary(self) -> dict:
        """Entries in all, oldest and newest, and entries per settings: `cache stats`."""
        with self._lock:
            rows = _select(self.conn, f"SELECT route, model, dim, normalized, count(*), "
                                      f"min(created_at), max(created_at) FROM {TABLE} "
                                      f"GROUP BY 1, 2, 3, 4 ORDER BY 5 DESC", None)
        stamps = [r[5] for r in rows] + [r[6] for r in rows]
        return {"path": self.describe(), "exists": True, "bytes": None, "lines": None,
                "entries": sum(r[4] for r in rows), "duplicates": 0, "bad_lines": 0,
                "oldest": min(stamps).isoformat() if stamps else None,
                "newest": max(stamps).isoformat() if stamps else None,
                "by_settings": [{"route": r[0], "model": r[1], "dim": r[2], "normalized": r[3],
                                 "entries": r[4]} for r in rows]}

    def __len__(self) -> int:
        with self._lock:
            return _select(self.conn, f"SELECT count(*) FROM {TABLE}", None)[0][0]

    @property
    def stats(self):
        from .store import CacheStats
        return CacheStats(-1, self.hits, self.misses, self.written, 0)

    def close(self) -> None:
        self._leases.close()
        self.conn.close()

    def __enter__(self) -> "PostgresCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PostgresCache {TABLE} at {self.where}>"


@guarded("creating the cache table")
def _create(conn) -> None:
    create_racing(conn, SCHEMA)  # another machine may create it at the same moment


@guarded("looking for the cache table")
def tables_exist(conn) -> bool:
    """Whether both tables are there (CREATE ... IF NOT EXISTS needs CREATE on the schema
    even when they are)."""
    with conn.cursor() as cur:
        cur.execute(f"SELECT to_regclass('{TABLE}') IS NOT NULL "
                    f"AND to_regclass('{TABLE}_leases') IS NOT NULL")
        found = cur.fetchone()[0]
    conn.rollback()
    return found


def setup_sql(role: str) -> str:
    """The SQL an administrator runs once per database so that `role` shares the cache
    with table privileges only."""
    if not role.replace("_", "").isalnum():
        raise ValueError(f"a role name of letters, digits and _, got {role!r}")
    return ("-- Run as a role that may create tables here, in the database the cache uses.\n"
            "CREATE EXTENSION IF NOT EXISTS vector;\n" + SCHEMA.strip() + "\n"
            f"GRANT USAGE ON SCHEMA public TO {role};\n"
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON {TABLE}, {TABLE}_leases TO {role};\n"
            + rate_budget_sql(role))


@guarded("reading the cache table")
def _select(conn, query: str, params) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(query, (params,) if isinstance(params, list) else params)
        rows = cur.fetchall()
    conn.rollback()
    return rows


@guarded("writing to the cache table")
def _insert(conn, params: dict) -> int:
    for attempt in range(3):
        try:
            with conn.cursor() as cur:
                cur.execute(INSERT_SQL, params)
                written = cur.rowcount
            conn.commit()
            return written
        except psycopg2.errors.DeadlockDetected:  # sorted keys make this all but impossible
            conn.rollback()
            if attempt == 2:
                raise
    return 0
