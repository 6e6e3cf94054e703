"""Batch jobs kept beside the cache, so a rerun or another machine resumes and never resubmits.

A job's record is a log of entries (JSON objects with its `key`): the texts of each line
once, then each change of state. Reading merges a key's entries in order, last value wins.
Appending is all a writer does, so a process killed between two steps leaves a record that
says how far it got. Beside the JSONL cache the log is a file (`<cache>.batches.jsonl`,
appended under `flock`); beside the PostgreSQL cache it is a table next to
`embedding_cache`, which every machine sees.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from ..config import relative
from ..errors import ConfigError

#: A job's states, in order: recorded before upload; file uploaded; batch created; its
#: vectors cached (or its lines given up: failed, expired, cancelled).
PREPARING, UPLOADED, SUBMITTED, COLLECTED = "preparing", "uploaded", "submitted", "collected"
TABLE = "embedding_batch_jobs"


def merge(entries) -> dict[str, dict]:
    """{job key: its record}, entries merged in order.

    >>> merge([{"key": "a", "state": "preparing"}, {"key": "a", "state": "submitted"}])
    {'a': {'key': 'a', 'state': 'submitted'}}
    """
    records: dict[str, dict] = {}
    for entry in entries:
        records.setdefault(entry["key"], {}).update(entry)
    return records


class FileLog:
    """The job log beside a JSONL cache: one JSON entry per line."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def describe(self) -> str:
        return f"file {relative(self.path)}"

    def append(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(entry) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)  # one write of a whole line: a reader never sees half of it
            os.fsync(fd)
        finally:
            os.close(fd)

    def entries(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line torn by a full disk: the entries before it stand
                continue
        return out


class TableLog:
    """The job log beside the PostgreSQL cache: a table every machine shares."""

    def __init__(self, conn):
        self.conn = conn
        with conn.cursor() as cur:
            cur.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (seq bigserial PRIMARY KEY, "
                        f"key text NOT NULL, entry jsonb NOT NULL, "
                        f"at timestamptz NOT NULL DEFAULT now())")
        conn.commit()

    def describe(self) -> str:
        return f"table {TABLE}"

    def append(self, entry: dict) -> None:
        with self.conn.cursor() as cur:
            cur.execute(f"INSERT INTO {TABLE} (key, entry) VALUES (%s, %s)",
                        (entry["key"], json.dumps(entry)))
        self.conn.commit()

    def entries(self) -> list[dict]:
        with self.conn.cursor() as cur:
            cur.execute(f"SELECT entry FROM {TABLE} ORDER BY seq")
            rows = cur.fetchall()
        self.conn.commit()
        return [row[0] for row in rows]


class JobStore:
    """The records of batch jobs, over one log (`FileLog` or `TableLog`)."""

    def __init__(self, log):
        self.log = log

    @classmethod
    def beside(cls, cache) -> "JobStore":
        """The store next to `cache`: its file's sibling, or a table in its database."""
        if getattr(cache, "kind", "") == "jsonl":
            return cls(FileLog(cache.path.with_name(cache.path.name + ".batches.jsonl")))
        if getattr(cache, "kind", "") == "postgres":
            return cls(TableLog(cache.conn))
        raise ConfigError("EMBED_HOSTED_MODE", "batch needs a cache that outlives the process "
                                               "(EMBED_CACHE_BACKEND=jsonl or postgres): the "
                                               "jobs and their vectors are kept there")

    def describe(self) -> str:
        return self.log.describe()

    def update(self, key: str, **fields) -> None:
        self.log.append({"key": key, **fields})

    def records(self) -> list[dict]:
        return list(merge(self.log.entries()).values())

    def open_records(self, route: str, model: str) -> list[dict]:
        """The jobs of this model whose vectors are not cached yet (not collected)."""
        return [r for r in self.records() if r.get("route") == route
                and r.get("model") == model and r.get("state") != COLLECTED]
