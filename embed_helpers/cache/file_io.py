"""Reading and locking the JSONL cache file: chunked scans in bounded memory, flock.

Writers append under an exclusive `fcntl.flock`; readers take the shared lock only to learn
how far the file is complete, then read without it. A compaction replaces the file by a
rename: `lock_current` retries until it holds the lock of the file now at the path.
`find_caches` looks for other cache files (the doctor's "elsewhere").
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ..constants import SCAN_CHUNK_BYTES
from .format import meta_at, vector_at


def raw_chunks(fd: int, start: int, end: int) -> Iterator[tuple[int, bytes, int]]:
    """(file offset of buf, buf, length of its complete lines) over [start, end).

    Each read starts where the last complete line ended (re-reading a partial line is
    cheaper than joining buffers). A tail without a newline is never yielded.
    """
    pos, size = start, SCAN_CHUNK_BYTES
    while pos < end:
        buf = os.pread(fd, min(size, end - pos), pos)
        stop = buf.rfind(b"\n") + 1
        if not stop:
            if pos + len(buf) >= end or not buf:
                return
            size *= 2  # a line longer than a chunk
            continue
        yield pos, buf, stop
        pos, size = pos + stop, SCAN_CHUNK_BYTES


def raw_lines(fd: int, start: int, end: int) -> Iterator[tuple[int, bytes, int, int]]:
    """(file offset, buffer, start, newline index) of each complete line in [start, end)."""
    for base, buf, stop in raw_chunks(fd, start, end):
        p, find = 0, buf.find
        while (nl := find(b"\n", p, stop)) >= 0:
            yield base + p, buf, p, nl
            p = nl + 1


@contextmanager
def flocked(fd: int, mode: int) -> Iterator[None]:
    fcntl.flock(fd, mode)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def lock_current(path: Path, flags: int, mode: int = fcntl.LOCK_EX) -> int:
    """Open `path` and lock it, retrying if a compaction replaced the file meanwhile."""
    while True:
        fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, mode)
        try:
            if os.path.samestat(os.stat(path), os.fstat(fd)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # closing drops the lock on the replaced file


def scan_records(path: Path, vectors: bool = False) -> Iterator[tuple[int, dict | None]]:
    """(offset, every field but the vector) per line; None for a bad or torn line. With
    `vectors`, the record holds its decoded vector too (None for a bad vector).

    Reads the file as it is when called (sized under the shared lock) in bounded memory.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with flocked(fd, fcntl.LOCK_SH):
            size = os.fstat(fd).st_size
        end = 0
        for off, buf, p, nl in raw_lines(fd, 0, size):
            meta = meta_at(buf, p, nl)
            if vectors and meta is not None:
                meta["vector"] = vector_at(buf, p, nl)
            yield off, meta
            end = off + nl - p + 1
        if end < size:
            yield end, None
    finally:
        os.close(fd)


#: Folders never searched for other cache files.
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", ".pgdata",
             ".ipynb_checkpoints", ".pytest_cache", ".tox", "site-packages"}
#: How deep and how many other cache files the doctor looks for.
_MAX_DEPTH, _MAX_OTHERS = 4, 20


def find_caches(roots: Iterable[Path], exclude: Path | None = None) -> list[Path]:
    """Cache files (`*.jsonl` whose first line is a cache entry) under `roots`."""
    seen, result = set(), []
    for root in roots:
        root = Path(root).resolve()
        for folder, dirs, files in os.walk(root):
            depth = len(Path(folder).relative_to(root).parts)
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and depth < _MAX_DEPTH)
            for name in sorted(files):
                candidate = Path(folder, name).resolve()
                if name.endswith(".jsonl") and candidate != exclude \
                        and candidate not in seen and _looks_like_cache(candidate):
                    seen.add(candidate)
                    result.append(candidate)
                    if len(result) >= _MAX_OTHERS:
                        return result
    return result


def _looks_like_cache(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(200)
    except OSError:
        return False
    return head.startswith(b'{"key":"') or (b'"key"' in head and b'"dim"' in head)
