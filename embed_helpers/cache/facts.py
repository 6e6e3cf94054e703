"""Small facts a cache store keeps beside its vectors, so that a team learns them once.

A fact is a JSON value under a text key: today the window measured for a server and model
(`windows`). The JSONL store keeps them in a side file, `<cache>.facts.json`; the
PostgreSQL store in a side table, `embedding_cache_facts`. Losing a fact costs one
measurement again, never a wrong vector, so the file is rewritten whole (atomically) and a
race between two writers keeps one of their values.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

FACTS_TABLE = "embedding_cache_facts"
FACTS_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {FACTS_TABLE} (
    key text PRIMARY KEY, value text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())
"""
FACTS_UPSERT = f"""
INSERT INTO {FACTS_TABLE} (key, value) VALUES (%s, %s)
ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, created_at = now()
"""


def facts_path(cache_path: Path) -> Path:
    """The side file of a JSONL cache.

    >>> facts_path(Path("cache/embeddings.jsonl")).as_posix()
    'cache/embeddings.jsonl.facts.json'
    """
    return cache_path.with_name(cache_path.name + ".facts.json")


class FileFacts:
    """`get_fact` / `put_fact` for `cache.EmbeddingCache` (uses its `path`, `read_only`)."""

    path: Path
    read_only: bool

    def _facts(self) -> dict:
        try:
            facts = json.loads(facts_path(self.path).read_text())
        except (OSError, ValueError):
            return {}
        return facts if isinstance(facts, dict) else {}

    def get_fact(self, key: str):
        """The value stored under `key`, or None."""
        return self._facts().get(key)

    def put_fact(self, key: str, value) -> None:
        """Store `value` (JSON) under `key`; a read-only cache keeps nothing."""
        if self.read_only:
            return
        facts = {**self._facts(), key: value}
        target = facts_path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
        with os.fdopen(fd, "w") as out:
            json.dump(facts, out, indent=1, sort_keys=True)
        os.replace(tmp, target)


class TableFacts:
    """`get_fact` / `put_fact` for `postgres.PostgresCache` (uses its `conn`, `_lock`)."""

    _facts_ready = False

    def _facts_table(self) -> None:
        if not self._facts_ready:
            from ..db_guard import create_racing
            create_racing(self.conn, FACTS_SCHEMA)  # another machine may create it at once
            self._facts_ready = True

    def get_fact(self, key: str):
        with self._lock:
            self._facts_table()
            with self.conn.cursor() as cur:
                cur.execute(f"SELECT value FROM {FACTS_TABLE} WHERE key = %s", (key,))
                row = cur.fetchone()
            self.conn.rollback()
        return json.loads(row[0]) if row else None

    def put_fact(self, key: str, value) -> None:
        with self._lock:
            self._facts_table()
            with self.conn.cursor() as cur:
                cur.execute(FACTS_UPSERT, (key, json.dumps(value, sort_keys=True)))
            self.conn.commit()
