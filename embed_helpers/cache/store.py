"""What a cache store is: the methods the embedding sequence, the plan and the tools call.

Two stores implement it, with the same keys (`identity.py`): the JSONL file
(`jsonl.EmbeddingCache`, one machine) and the PostgreSQL table (`postgres.PostgresCache`,
a team). `MemoryStore` is the smallest complete one: a dict, for scripts and tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from ..identity import Identity
from .format import text_sha256, variant_sha256

#: The fields of an exported entry besides its key and vector (`entries`, `put_entries`).
ENTRY_FIELDS = ("route", "model", "dim", "normalized", "text_sha256", "variant_sha256", "ts")


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class CacheStats:
    """What a store did in this process (`entries` -1: the PostgreSQL store does not count)."""

    entries: int
    hits: int
    misses: int
    written: int
    skipped_lines: int

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0


@runtime_checkable
class CacheStore(Protocol):
    """A content-addressed store of vectors, keyed by identity and exact text."""

    #: "jsonl", "postgres" or "memory": what the tools print and the doctor looks for.
    kind: str

    def describe(self) -> str:
        """Where the entries are, in words (a path shown from the project root, a table)."""

    def get_many(self, identity: Identity, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """{text: vector} for the texts it holds under `identity`."""

    def contains(self, identity: Identity, texts: Sequence[str]) -> set[str]:
        """The texts it holds, without reading their vectors (the plan's count)."""

    def lease(self, identity: Identity, texts: Sequence[str]) -> set[str]:
        """The texts this run may embed now; the others another run is embedding (a store
        that cannot tell returns them all)."""

    def lease_wait_reason(self) -> str | None:
        """Why the last `lease` left texts to another run, in words (for a progress bar)."""

    def put_many(self, identity: Identity, texts: Sequence[str], vectors: np.ndarray) -> int:
        """Store vectors (and end their leases); returns how many entries are new."""

    def dims(self, route: str, model: str, normalized: bool) -> list[int]:
        """The dimensions it holds for a model: the dimension without a request."""

    def entries(self) -> Iterator[dict]:
        """Every entry as a JSON-able dict (export, import, the doctor)."""

    def put_entries(self, entries: Sequence[dict]) -> int:
        """Store exported entries as they are; returns how many are new."""

    def get_fact(self, key: str):
        """A small fact learned once and shared (a server's measured window), or None."""

    def put_fact(self, key: str, value) -> None:
        """Remember a fact for every run that uses this store."""

    @property
    def stats(self):
        """A `CacheStats`: entries, hits, misses, written, lines skipped."""

    def close(self) -> None:
        """Release the file or the connection."""


class MemoryStore:
    """A `CacheStore` in a dict: nothing survives the process. No leases: one process."""

    kind = "memory"

    def __init__(self):
        self.data: dict[str, np.ndarray] = {}
        self.meta: dict[str, dict] = {}
        self.facts: dict[str, object] = {}

    def describe(self) -> str:
        return f"in memory ({len(self.data)} entries)"

    def get_many(self, identity: Identity, texts: Sequence[str]) -> dict[str, np.ndarray]:
        return {t: self.data[k] for t, k in zip(texts, identity.keys(texts)) if k in self.data}

    def contains(self, identity: Identity, texts: Sequence[str]) -> set[str]:
        return set(self.get_many(identity, texts))

    def lease(self, identity: Identity, texts: Sequence[str]) -> set[str]:
        return set(texts)

    def lease_wait_reason(self) -> None:
        return None

    def get_fact(self, key: str):
        return self.facts.get(key)

    def put_fact(self, key: str, value) -> None:
        self.facts[key] = value

    def put_many(self, identity: Identity, texts: Sequence[str], vectors: np.ndarray) -> int:
        new = 0
        for text, key, vector in zip(texts, identity.keys(texts), np.asarray(vectors)):
            new += key not in self.data
            self.data[key] = np.asarray(vector, dtype=np.float32)
            self.meta[key] = {"route": identity.route, "model": identity.model,
                              "dim": len(vector), "normalized": identity.normalized,
                              "text_sha256": text_sha256(text),
                              "variant_sha256": variant_sha256(text), "ts": utc_now()}
        return new

    def dims(self, route: str, model: str, normalized: bool) -> list[int]:
        return sorted({m["dim"] for m in self.meta.values()
                       if (m["route"], m["model"], m["normalized"]) == (route, model, normalized)})

    def entries(self) -> Iterator[dict]:
        for key, meta in self.meta.items():
            yield {"key": key, **meta, "vector": self.data[key]}

    def put_entries(self, entries: Sequence[dict]) -> int:
        new = 0
        for entry in entries:
            key = entry["key"]
            new += key not in self.data
            self.data[key] = np.asarray(entry["vector"], dtype=np.float32)
            self.meta[key] = {k: entry[k] for k in ENTRY_FIELDS}
        return new

    @property
    def stats(self):
        return CacheStats(len(self.data), 0, 0, len(self.data), 0)

    def close(self) -> None:
        """Nothing to release."""

    def __len__(self) -> int:
        return len(self.data)
