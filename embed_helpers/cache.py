"""The embedding cache: one JSONL file, content-addressed, crash-safe, shared.

The index maps 32-byte key digests to byte offsets, never to vectors: vectors are read
from the file on a hit. Writers append one batch per `os.write` under an exclusive
`fcntl.flock`; readers take the shared lock only to learn how far the file is complete.
The format is in `cache_format`.
"""
from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .cache_format import (cache_key, digest, digest_at, encode_line, flocked, index_chunk,
                           lock_current, raw_chunks, raw_lines, text_sha256, variant_sha256,
                           vector_at)
from .cache_doctor import cache_stats, format_stats  # noqa: F401  (the CLI imports them here)
from .config import _path

__all__ = ["CacheStats", "EmbeddingCache", "cache_key", "cache_stats", "compact",
           "format_stats", "text_sha256", "variant_sha256"]

log = logging.getLogger(__name__)


#: get_many reads lines that lie within this many bytes of each other in one call.
READ_SPAN_BYTES = 8 << 20


@dataclass(frozen=True)
class CacheStats:
    entries: int
    hits: int
    misses: int
    written: int
    skipped_lines: int

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0


class EmbeddingCache:
    """Key -> vector over one JSONL file; safe to share between threads and processes.

    Args:
        path: the cache file; a relative path is taken from the project root.
        read_only: never create or write the file (`put_many` raises PermissionError).
    """

    def __init__(self, path: Path | str, *, read_only: bool = False):
        self.path = _path(path)
        self.read_only = read_only
        self._lock = threading.RLock()
        self._fd: int | None = None
        self._hits = self._misses = self._written = 0
        self._reset()
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._refresh()
        log.info("cache %s: %d entries (%d bad lines skipped)", self.path, len(self._index),
                 self._skipped)

    def _reset(self) -> None:
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
            keys, offsets, bad_offsets, longest = index_chunk(buf, stop)
            self._index.update(zip(keys, [base + o for o in offsets]))
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

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Vectors for the keys that are cached (float32, dim as written); counts hits."""
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

    def _read_many(self, wanted: list[tuple[int, str]]):
        """(offset, key, vector or None) for offsets in file order, reading nearby lines
        with one pread per span instead of one per line."""
        longest = max(self._max_line, 4096)
        i = 0
        while i < len(wanted):
            start, j = wanted[i][0], i
            while j + 1 < len(wanted) and wanted[j + 1][0] + longest - start <= READ_SPAN_BYTES:
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

    def put_many(self, entries: Sequence[tuple[str, np.ndarray]], *, route: str, model: str,
                 normalized: bool, texts: Sequence[str]) -> None:
        """Append new entries in one locked write, flushed to the OS before returning.

        Keys already in the file (written by anyone) are not written again. Rows that are
        not finite vectors (failed embeddings) are skipped with a warning.

        Raises:
            ValueError: a key is not `cache_key(route, model, len(vector), normalized, text)`.
        """
        if len(entries) != len(texts):
            raise ValueError(f"{len(entries)} entries but {len(texts)} texts")
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        lines: dict[bytes, bytes] = {}
        for (key, vector), text in zip(entries, texts):
            vec = np.asarray(vector, dtype="<f4")
            if vec.ndim != 1 or vec.size == 0 or not np.isfinite(vec).all():
                log.warning("cache: not caching a bad vector for %r", text[:60])
                continue
            if key != cache_key(route, model, vec.size, normalized, text):
                raise ValueError(f"key {key[:12]}... is not cache_key({route!r}, {model!r}, "
                                 f"{vec.size}, {normalized}, text) for {text[:60]!r}")
            lines[bytes.fromhex(key)] = encode_line(key, vec, route=route, model=model,
                                                    normalized=normalized, text=text, ts=ts)
        if not lines:
            return
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
                    return
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
            finally:
                os.close(fd)  # releases the lock

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self._index), self._hits, self._misses, self._written,
                              self._skipped)

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
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"<EmbeddingCache {self.path} entries={len(self._index)}>"


def compact(path: Path | str) -> dict:
    """Rewrite the cache without duplicate keys and bad lines, atomically, under the lock.

    Every vector is decoded and checked. The new file is written beside the old one,
    fsynced and renamed over it; caches open in other processes follow the rename on
    their next lookup. The last line of a duplicated key wins, as in the index.

    Returns:
        path, lines_before, entries, duplicates_removed, bad_lines_removed,
        bytes_before, bytes_after.
    """
    path = _path(path)
    result = {"path": str(path), "lines_before": 0, "entries": 0, "duplicates_removed": 0,
              "bad_lines_removed": 0, "bytes_before": 0, "bytes_after": 0}
    if not path.exists():
        return result
    fd = lock_current(path, os.O_RDONLY)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.compact")
    try:
        size = result["bytes_before"] = os.fstat(fd).st_size
        keep: dict[bytes, tuple[int, int]] = {}
        end = 0
        for off, buf, p, nl in raw_lines(fd, 0, size):
            result["lines_before"] += 1
            end = off + nl - p + 1
            vector = vector_at(buf, p, nl)
            if vector is None:
                result["bad_lines_removed"] += 1
                continue
            key = digest_at(buf, p, nl)
            result["duplicates_removed"] += key in keep
            keep[key] = (off, nl - p + 1)
        if end < size:
            result["lines_before"] += 1
            result["bad_lines_removed"] += 1
        with open(tmp, "wb") as out:
            start = stop = 0
            for off, length in sorted(keep.values()) + [(-1, 0)]:  # (-1, 0): flush the last run
                if off != stop or stop - start > (8 << 20):  # copy runs of adjacent lines
                    out.write(os.pread(fd, stop - start, start))
                    start = off
                stop = off + length
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, os.fstat(fd).st_mode & 0o777)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)
        result["entries"], result["bytes_after"] = len(keep), path.stat().st_size
    finally:
        os.close(fd)  # releases the lock; writers waiting on the old file retry the new one
        tmp.unlink(missing_ok=True)
    log.info("cache %s compacted: %d entries, %d duplicates and %d bad lines removed",
             path, result["entries"], result["duplicates_removed"], result["bad_lines_removed"])
    return result
