"""Tools around the cache stores: open the configured one, summarise, compact, move entries.

`open_cache` is the one place that picks a store (EMBED_CACHE_BACKEND): the JSONL file of
`jsonl`, or the table of `postgres`. `export_entries` / `import_entries` move entries between
them through a JSONL file, e.g. to seed a team's database from a laptop.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from collections import Counter
from pathlib import Path

from ..config import Settings, relative
from ..constants import CACHE_TRANSFER_ROWS, project_path
from .file_io import lock_current, raw_lines, scan_records
from .format import digest, digest_at, vector_at
from .jsonl import EmbeddingCache

log = logging.getLogger(__name__)

#: EMBED_CACHE_BACKEND -> how to open it.
STORES = {
    "jsonl": lambda settings: EmbeddingCache(settings.EMBED_CACHE_PATH),
    "postgres": lambda settings: _postgres(settings),
}


def _postgres(settings: Settings):
    from .postgres import PostgresCache
    return PostgresCache(settings)


def for_engine(settings: Settings) -> Settings:
    """The settings with the cache store the engine can use: under EMBED_ENGINE=ray always
    the PostgreSQL table, since a cache file cannot be shared by workers on several
    machines (said once, when another store is configured). What the file holds is carried
    into the table on the way (`carry_file`), so switching engines pays for nothing again."""
    if settings.EMBED_ENGINE != "ray" or settings.EMBED_CACHE_BACKEND == "postgres":
        return settings
    log.warning("EMBED_CACHE_BACKEND=%s: a cache file cannot be shared by workers on several "
                "machines; the Ray engine uses the PostgreSQL cache table instead "
                "(EMBED_CACHE_URL, else the run's database)", settings.EMBED_CACHE_BACKEND)
    table = replace(settings, EMBED_CACHE_BACKEND="postgres")
    if Path(settings.EMBED_CACHE_PATH).is_file():
        with _postgres(table) as store:
            carry_file(settings.EMBED_CACHE_PATH, store)
    return table


def open_cache(settings: Settings):
    """The cache store EMBED_CACHE_BACKEND names (see `for_engine`), announced."""
    settings = for_engine(settings)
    store = STORES[settings.EMBED_CACHE_BACKEND](settings)
    log.info("embedding cache: %s", store.describe())
    return store


def export_entries(store, path: Path | str) -> int:
    """Write every entry of `store` to a JSONL cache file at `path` (appending what it
    lacks); returns the entries written."""
    target = EmbeddingCache(path)
    written, batch = 0, []
    for entry in store.entries():
        batch.append(entry)
        if len(batch) >= CACHE_TRANSFER_ROWS:
            written += target.put_entries(batch)
            batch = []
    written += target.put_entries(batch)
    target.close()
    return written


def import_entries(path: Path | str, store) -> int:
    """Add the entries of the JSONL cache file at `path` to `store`; returns how many
    were new there."""
    source = project_path(path)
    if not source.is_file():
        raise FileNotFoundError(f"no cache file at {source}")
    written, batch = 0, []
    for entry in EmbeddingCache(source, read_only=True).entries():
        batch.append(entry)
        if len(batch) >= CACHE_TRANSFER_ROWS:
            written += store.put_entries(batch)
            batch = []
    return written + store.put_entries(batch)


def carry_file(path: Path | str, store) -> int:
    """Import the JSONL cache file at `path` into the PostgreSQL `store`: the whole file the
    first time, then only the lines appended since (a marker beside the file remembers, per
    table, how far it got; a compacted or replaced file is read again, and entries the table
    holds cost nothing: ON CONFLICT DO NOTHING). Returns the entries new to the table."""
    path = project_path(path)
    marker = path.with_name(f".{path.name}.carried.json")
    stat, target = path.stat(), _table_key(store)
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        done = {}
    seen = done.get(target, {})
    same = seen.get("inode") == stat.st_ino and seen.get("offset", 0) <= stat.st_size
    start = seen["offset"] if same else 0  # a file compacted, replaced or cut: read it all
    if start >= stat.st_size:
        return 0
    written, batch, torn = 0, [], None
    for offset, record in scan_records(path, vectors=True):
        if offset < start or offset >= stat.st_size:
            continue
        torn = offset if record is None else None  # a last line being written: read it again
        if record is not None and record["vector"] is not None:
            batch.append(record)
        if len(batch) >= CACHE_TRANSFER_ROWS:
            written, batch = written + store.put_entries(batch), []
    written += store.put_entries(batch)
    end = stat.st_size if torn is None else torn
    done[target] = {"inode": stat.st_ino, "offset": end}
    try:
        marker.write_text(json.dumps(done))
    except OSError as exc:  # a read-only folder: the next run reads the file again
        log.debug("cache: cannot write %s: %s", marker, exc)
    (log.warning if written else log.info)(
        "cache: %d new entries carried from %s into %s (later runs carry only what is "
        "appended to the file)", written, relative(path), store.describe())
    return written


def _table_key(store) -> str:
    """Which table a store is: server, database and the table's oid (a table dropped and
    made again is another), hashed: the marker holds no name of the machine."""
    import hashlib
    info = store.conn.info
    with store.conn.cursor() as cur:
        cur.execute("SELECT to_regclass('embedding_cache')::oid")
        oid = cur.fetchone()[0]
    store.conn.rollback()
    return hashlib.sha256(f"{info.host}:{info.port}/{info.dbname}/{oid}".encode()).hexdigest()[:16]


def visible_stores(settings: Settings, store) -> list:
    """The stores other than `store` a run with these settings can see, for the doctor:
    the JSONL file beside the PostgreSQL table, or the table (when it exists) beside the
    file. One that cannot be opened is left out, said at debug level."""
    from ..errors import EmbedHelpersError
    if getattr(store, "conn", None) is not None:
        path = Path(settings.EMBED_CACHE_PATH)
        return [EmbeddingCache(path, read_only=True)] if path.is_file() else []
    if not (settings.DATABASE_URL or settings.EMBED_CACHE_URL
            or Path(settings.EMBED_PGDATA, "PG_VERSION").is_file()):
        return []
    from .. import db
    from .postgres import tables_exist, cache_settings
    try:
        conn = db.connect(cache_settings(settings))
        found = tables_exist(conn)
        conn.close()
        return [_postgres(settings)] if found else []
    except EmbedHelpersError as exc:
        log.debug("doctor: the cache table cannot be read: %s", exc)
        return []


def summary(store) -> dict:
    """`cache stats` of either store."""
    path = getattr(store, "path", None)
    return cache_stats(path) if isinstance(path, Path) else store.summary()


def cache_stats(path: Path | str) -> dict:
    """Size, entries, duplicates, bad lines and entries per settings of a cache file."""
    path = project_path(path)
    stats = {"path": relative(path), "exists": path.is_file(), "bytes": 0, "lines": 0,
             "entries": 0, "duplicates": 0, "bad_lines": 0, "by_settings": [],
             "oldest": None, "newest": None}
    if not stats["exists"]:
        return stats
    stats["bytes"] = path.stat().st_size
    keys, groups = set(), Counter()
    for _offset, meta in scan_records(path):
        stats["lines"] += 1
        if meta is None:
            stats["bad_lines"] += 1
            continue
        key = digest(meta["key"])
        if key in keys:
            stats["duplicates"] += 1
            continue
        keys.add(key)
        groups[(meta.get("route"), meta.get("model"), meta["dim"], meta.get("normalized"))] += 1
        ts = meta.get("ts")
        if isinstance(ts, str):  # ISO 8601 UTC: string order is time order
            stats["oldest"] = min(stats["oldest"] or ts, ts)
            stats["newest"] = max(stats["newest"] or ts, ts)
    stats["entries"] = len(keys)
    stats["by_settings"] = [{"route": r, "model": m, "dim": d, "normalized": n, "entries": c}
                            for (r, m, d, n), c in groups.most_common()]
    return stats


def format_stats(stats: dict) -> str:
    """A printable summary of `cache_stats`."""
    if not stats["exists"]:
        return f"cache: {stats['path']} (missing)"
    size = f" ({stats['bytes'] / 1e6:.1f} MB)" if stats["bytes"] is not None else ""
    lines = [f"cache: {stats['path']}{size}",
             f"entries: {stats['entries']}  duplicates: {stats['duplicates']}  "
             f"bad lines: {stats['bad_lines']}  written: {stats['oldest']} .. {stats['newest']}"]
    for g in stats["by_settings"]:
        lines.append(f"  {g['entries']:>9}  route={g['route']!r} model={g['model']!r} "
                     f"dim={g['dim']} normalized={g['normalized']}")
    return "\n".join(lines)


def compact(path: Path | str) -> dict:
    """Rewrite the cache without duplicate keys and bad lines, atomically, under the lock.

    Every vector is decoded and checked. The new file is written beside the old one,
    fsynced and renamed over it; caches open in other processes follow the rename on
    their next lookup. The last line of a duplicated key wins, as in the index.

    Returns:
        path, lines_before, entries, duplicates_removed, bad_lines_removed,
        bytes_before, bytes_after.
    """
    path = project_path(path)
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
        _write_beside(fd, sorted(keep.values()), tmp, path)
        result["entries"], result["bytes_after"] = len(keep), path.stat().st_size
    finally:
        os.close(fd)  # releases the lock; writers waiting on the old file retry the new one
        tmp.unlink(missing_ok=True)
    log.info("cache %s compacted: %d entries, %d duplicates and %d bad lines removed",
             path, result["entries"], result["duplicates_removed"], result["bad_lines_removed"])
    return result


def _write_beside(fd: int, lines: list[tuple[int, int]], tmp: Path, path: Path) -> None:
    """Copy the (offset, length) lines of `fd` to `tmp`, fsync it and rename it over `path`:
    a crash leaves the old file or the new one, never half of one."""
    with open(tmp, "wb") as out:
        start = stop = 0
        for off, length in lines + [(-1, 0)]:  # (-1, 0): flush the last run
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
