"""Test isolation for every test, doctest and the notebook under nbval: never the developer's
.env, cache, runs folder or tables. Each pytest session gets a database of its own (on the
embedded server, kept running by this process, or on DATABASE_URL's server), a cache file
and a runs folder in a temporary folder; every subprocess (CLI, notebook kernel, Ray
worker) inherits them through the environment.
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from psycopg2.extensions import make_dsn

from embed_helpers.config import load_settings
from embed_helpers.constants import PROJECT_ROOT
from embed_helpers.pg_embedded import pid_alive

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
SESSION_DIR = Path(tempfile.mkdtemp(prefix="embed-helpers-test-"))
atexit.register(shutil.rmtree, SESSION_DIR, ignore_errors=True)

# The tests, the notebook kernel nbval starts and every CLI subprocess inherit this
# environment: never the developer's .env, cache, runs folder or tables, and the notebook
# on the backend its committed outputs were made with.
os.environ["EMBED_ENV_FILE"] = ""
os.environ["EMBEDDING_BACKEND"] = "local"
os.environ.setdefault("EMBED_PGDATA", str(PROJECT_ROOT / ".pgdata-test"))
os.environ["EMBED_CACHE_PATH"] = str(SESSION_DIR / "cache.jsonl")
os.environ["EMBED_RUNS_DIR"] = str(SESSION_DIR / "runs")


def _session_database() -> str:
    """A database of this session's own, on the embedded server (kept running by this
    process) or on the server DATABASE_URL names; dropped at exit. Every subprocess
    reaches it through DATABASE_URL."""
    from embed_helpers import db
    from embed_helpers.pg_embedded import embedded_uri
    base = os.environ.get("DATABASE_URL") or embedded_uri(Path(os.environ["EMBED_PGDATA"]))
    admin = db.connect(load_settings(environ={"DATABASE_URL": base}))
    admin.autocommit = True
    name = f"embed_helpers_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with admin.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE datname LIKE 'embed_helpers_test_%'")
        for (stale,) in cur.fetchall():  # left by a killed session
            if not pid_alive(int(stale.split("_")[3])):
                cur.execute(f'DROP DATABASE IF EXISTS "{stale}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    dsn = make_dsn(base, dbname=name)

    def drop() -> None:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
    atexit.register(drop)
    return dsn


os.environ["DATABASE_URL"] = _session_database()


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core, at most 4 (each has its own database; more only
    compete for the same PostgreSQL and the same Ray)."""
    return max(1, min(4, os.cpu_count() or 1))


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups into the node ids
def pytest_collection_modifyitems(config, items) -> None:
    """With `--dist loadgroup`, a file's tests stay on one worker, in order (modules share
    their fixtures), and every Ray test runs on the same worker: two Ray clusters at once on
    a small machine only time each other out. (nbval's cells ignore the group: `make test`
    runs the notebook in a pytest of its own.)"""
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        names = [item.path.stem, item.name.split("[")[0], *getattr(item, "fixturenames", ())]
        ray = any("ray" in name.split("_") for name in names)  # test_engine_ray, local_ray...
        group = "ray" if ray else re.sub(r"\W", "_", str(item.path.relative_to(PROJECT_ROOT)))
        item.add_marker(pytest.mark.xdist_group(group))  # word characters: xdist parses ids


def pytest_report_header(config):
    shared = SHARED_DATA if SHARED_DATA.is_dir() else "absent (tests that need it are skipped)"
    return [f"PostgreSQL: a database of this session only ({os.environ['DATABASE_URL']})",
            f"../shared data: {shared}", f"cache and runs folder of this session: {SESSION_DIR}"]
