"""The JSONL cache store: one file, content-addressed, crash-safe, shared by processes.

The index maps 32-byte key digests to byte offsets, never to vectors: vectors are read
from the file on a hit. Writers append one batch per `os.write` under an exclusive
`fcntl.flock`; readers take the shared lock only to learn how far the file is complete
(the format: `format`; the PostgreSQL store, with the same methods: `postgres`)."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import relative
from ..constants import READ_GAP_BYTES, READ_SPAN_BYTES, project_path
from ..identity import Identity
from .facts import FileFacts
from .file_io import flocked, lock_current, raw_chunks, scan_records
from .format import digest, encode_line, index_chunk, vector_at
from .store import CacheStats

log = logging.getLogger(__name__)


class EmbeddingCache(FileFacts):
    """(identity, text) -> vector over one JSONL file; safe to share between threads and
    processes on one machine (`postgres.PostgresCache` is shared by every machine).

    Args:
        path: the cache file; a relative path is taken from the project root.
        read_only: never create or write the file (`put_many` raises PermissionError).
    """

    kind = "jsonl"

    def __init__(self, path: Path | str, *, read_only: bool = False):
        self.path = project_path(path)
        self.read_only = read_only
        self._lock = threading.RLock()
        self._fd: int | None = None
        self._hits = self._misses = self._written = 0
        self._reset()
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._refresh()
        log.info("cache %s: %d entries (%d bad lines skipped)", relative(self.path),
                 len(self._index), self._skipped)

    def describe(self) -> str:
        return f"JSONL file {relative(self.path)}"

    def _reset(self) -> None:
        self._settings: set[tuple] = set()
        self._index: dict[bytes, int] = {}
        self._scanned, self._torn_at, self._max_line, self._skipped = 0, -1, 0, 0

    def _reopen(self) -> None:
        self.close()
        self._reset()
        flags = os.O_RDONLY if self.read_only else os.O_RDWR | os.O_APPEND | os.O_CREAT
        try:
            self._fd = os.open(self.path, flags | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            return

    def _refresh(self) -> None:
        """Index the lines appended (by anyone) since the last pass; follow a replaced file."""
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None
        if self._fd is None or current is None \
                or not os.path.samestat(current, os.fstat(self._fd)):
            if current is None and self.read_only:
                self.close()
                self._reset()
                return
            self._reopen()
            if self._fd is None:
                return
        with flocked(self._fd, fcntl.LOCK_SH):  # no writer is halfway through a batch
            size = os.fstat(self._fd).st_size
        self._scan(size)

    def _scan(self, size: int) -> None:
        if size < self._scanned:  # truncated by hand: start again
            self._reset()
        off, bad = self._scanned, 0
        for base, buf, stop in raw_chunks(self._fd, self._scanned, size):
            keys, offsets, bad_offsets, longest, settings = index_chunk(buf, stop)
            self._index.update(zip(keys, [base + o for o in offsets]))
            self._settings |= settings
            # A torn tail that a writer has since ended was counted already.
            bad += sum(base + o != self._torn_at for o in bad_offsets)
            self._max_line = max(self._max_line, longest)
            off = base + stop
        if off < size and off != self._torn_at:
            bad += 1
            self._torn_at = off
        if bad:
            self._skipped += bad
            log.warning("cache %s: skipped %d torn or corrupt line(s) between bytes %d and %d",
                        self.path, bad, self._scanned, size)
        self._scanned = off

    def get_many(self, identity: Identity, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached vectors of `texts` under `identity` (float32); counts hits and misses."""
        by_key = dict(zip(identity.keys(texts), texts))
        return {by_key[k]: v for k, v in self.read_keys(list(by_key)).items()}

    def read_keys(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached vectors by cache key (`Identity.key`); counts hits and misses."""
        with self._lock:
            self._refresh()
            wanted, asked = [], set(keys)
            for key in asked:
                offset = self._index.get(digest(key))
                if offset is not None:
                    wanted.append((offset, key))
            found = {}
            for offset, key, vector in self._read_many(sorted(wanted)):
                if vector is None:  # corrupted after it was indexed: a miss, not a crash
                    del self._index[digest(key)]
                    self._skipped += 1
                    log.warning("cache %s: bad vector at byte %d, ignored", self.path, offset)
                else:
                    found[key] = vector
            self._hits += len(found)
            self._misses += len(asked) - len(found)
            return found

    def contains(self, identity: Identity, texts: Sequence[str]) -> set[str]:
        """The texts cached under `identity`, without reading their vectors."""
        with self._lock:
            self._refresh()
            return {t for t, k in zip(texts, identity.keys(texts)) if digest(k) in self._index}

    def lease(self, identity: Identity, texts: Sequence[str]) -> set[str]:
        """Every text: a file on one machine keeps no leases (see `PostgresCache.lease`)."""
        return set(texts)

    def lease_wait_reason(self) -> None:  # no leases: nobody to wait for
        return None

    def dims(self, route: str, model: str, normalized: bool) -> list[int]:
        """Dimensions cached for this route, model and normalisation (no request needed)."""
        with self._lock:
            self._refresh()
            return sorted({d for r, m, d, n in self._settings
                           if (r, m, n) == (route, model, normalized)})

    def _read_many(self, wanted: list[tuple[int, str]]):
        """(offset, key, vector or None) in file order: one pread per span of nearby lines
        (lines far apart are read alone: a span must not fetch megabytes for two lines)."""
        longest = max(self._max_line, 4096)
        i = 0
        while i < len(wanted):
            start, j = wanted[i][0], i
            while j + 1 < len(wanted) and wanted[j + 1][0] - wanted[j][0] <= READ_GAP_BYTES \
                    and wanted[j + 1][0] + longest - start <= READ_SPAN_BYTES:
                j += 1
            buf = os.pread(self._fd, wanted[j][0] + longest - start, start)
            for offset, key in wanted[i:j + 1]:
                p = offset - start
                nl = buf.find(b"\n", p)
                yield offset, key, (vector_at(buf, p, nl, key.encode()) if nl >= 0
                                    else self._read(offset, key.encode()))
            i = j + 1

    def _read(self, offset: int, key: bytes) -> np.ndarray | None:
        size = max(self._max_line, 4096)
        while True:
            buf = os.pread(self._fd, size, offset)
            nl = buf.find(b"\n")
            if nl >= 0 or len(buf) < size:
                return vector_at(buf, 0, nl, key) if nl >= 0 else None
            size *= 2

    def put_many(self, identity: Identity, texts: Sequence[str], vectors: np.ndarray) -> int:
        """Append new entries in one locked write, flushed to the OS before returning;
        returns how many were new.

        Keys already in the file (written by anyone) are not written again. Rows that are
        not finite vectors (failed embeddings) are skipped with a warning.
        """
        if len(vectors) != len(texts):
            raise ValueError(f"{len(vectors)} vectors but {len(texts)} texts")
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        lines: dict[bytes, bytes] = {}
        for key, vector, text in zip(identity.keys(texts), vectors, texts):
            vec = np.asarray(vector, dtype="<f4")
            if vec.ndim != 1 or vec.size != identity.dim or not np.isfinite(vec).all():
                log.warning("cache: not caching a bad vector for %r", text[:60])
                continue
            lines[bytes.fromhex(key)] = encode_line(key, vec, route=identity.route,
                                                    model=identity.model,
                                                    normalized=identity.normalized, text=text, ts=ts)
        return self._append(lines, {(identity.route, identity.model, identity.dim,
                                     identity.normalized)})

    def put_entries(self, entries: Sequence[dict]) -> int:
        """Append exported entries as they are (`cache import`); returns how many are new."""
        lines = {bytes.fromhex(e["key"]): encode_line(
            e["key"], e["vector"], route=e["route"], model=e["model"], normalized=e["normalized"],
            ts=e["ts"], hashes=(e["text_sha256"], e["variant_sha256"])) for e in entries}
        return self._append(lines, {(e["route"], e["model"], e["dim"], e["normalized"])
                                    for e in entries})

    def entries(self):
        """Every valid entry with its vector, in file order (`cache export`)."""
        if self.path.is_file():
            for _offset, record in scan_records(self.path, vectors=True):
                if record is not None and record["vector"] is not None:
                    yield record

    def _append(self, lines: dict[bytes, bytes], settings: set[tuple]) -> int:
        if not lines:
            return 0
        if self.read_only:
            raise PermissionError(f"cache {self.path} was opened read_only")
        with self._lock:
            self._refresh()
            # Another process may have replaced the file after _refresh: lock the current one.
            fd = lock_current(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
            try:
                if self._fd is None or not os.path.samestat(os.fstat(fd), os.fstat(self._fd)):
                    self._reopen()
                size = os.fstat(fd).st_size
                self._scan(size)
                new = [(d, line) for d, line in lines.items() if d not in self._index]
                if not new:
                    return 0
                payload = b"".join(line for _, line in new)
                start = size
                if self._scanned < size:  # a killed writer's torn line: end it first
                    payload, start = b"\n" + payload, size + 1
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view):]
                for key_digest, line in new:
                    self._index[key_digest] = start
                    start += len(line)
                    self._max_line = max(self._max_line, len(line))
                self._scanned = size + len(payload)
                self._written += len(new)
                self._settings |= settings
                return len(new)
            finally:
                os.close(fd)  # releases the lock

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self._index), self._hits, self._misses, self._written, self._skipped)

    def __len__(self) -> int:
        with self._lock:
            self._refresh()
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            self._refresh()
            return isinstance(key, str) and digest(key) in self._index

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "EmbeddingCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()

    def __repr__(self) -> str:
        return f"<EmbeddingCache {relative(self.path)} entries={len(self._index)}>"
