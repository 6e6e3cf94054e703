"""Shared fixtures: a real PostgreSQL (a database of this session's own on the embedded
server, or on DATABASE_URL's), a real loopback embedding server, settings isolated from
the developer's .env, cache and runs folder."""
from __future__ import annotations

import atexit
import os
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg2
import pytest
from psycopg2.extensions import make_dsn, parse_dsn

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))  # so tests and benchmarks can `import fake_server`

from embed_helpers.config import load_settings  # noqa: E402
from embed_helpers.constants import PROJECT_ROOT  # noqa: E402

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
SESSION_DIR = Path(tempfile.mkdtemp(prefix="embed-helpers-test-"))

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
            if not _pid_alive(int(stale.split("_")[3])):
                cur.execute(f'DROP DATABASE IF EXISTS "{stale}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    dsn = make_dsn(base, dbname=name)

    def drop() -> None:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
    atexit.register(drop)
    return dsn


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


os.environ["DATABASE_URL"] = _session_database()


@pytest.fixture
def make_settings(tmp_path):
    """Settings from explicit values only: no .env, no stray environment, cache in tmp."""
    def make(**overrides):
        environ = {"EMBED_CACHE_PATH": str(tmp_path / "cache.jsonl"), "EMBED_BACKOFF_MS": "1",
                   "EMBED_RUNS_DIR": str(tmp_path / "runs"),
                   "DATABASE_URL": os.environ["DATABASE_URL"]}
        environ.update({k: str(v) for k, v in overrides.items()})
        return load_settings(env_file=tmp_path / "no.env", environ=environ)
    return make


@pytest.fixture(scope="session")
def conn():
    """One real PostgreSQL connection for the session (tables are per test)."""
    from embed_helpers import db
    connection = db.connect(load_settings(environ={"DATABASE_URL": os.environ["DATABASE_URL"]}))
    yield connection
    connection.close()


@pytest.fixture
def table(conn):
    """A fresh table name, dropped afterwards with its chunks table."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    yield name
    conn.rollback()
    with conn.cursor() as cur:
        cur.execute(f'DROP TABLE IF EXISTS "{name}_chunks", "{name}"')
    conn.commit()


@pytest.fixture
def fresh_database():
    """The DATABASE_URL of a new, empty database (for the shared cache table), dropped after."""
    session = os.environ["DATABASE_URL"]
    admin = psycopg2.connect(session)
    admin.autocommit = True
    name = f"{parse_dsn(session)['dbname']}_{uuid.uuid4().hex[:6]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    yield make_dsn(session, dbname=name)
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture
def fake_server():
    """A real HTTP embedding server on 127.0.0.1 speaking the OpenAI and Ollama formats."""
    from fake_server import FakeEmbeddingServer
    with FakeEmbeddingServer(dim=32, seed=0) as server:
        yield server


def pytest_report_header(config):
    where = "DATABASE_URL" if os.environ.get("DATABASE_URL") else \
        f"embedded pgserver ({os.environ['EMBED_PGDATA']})"
    shared = SHARED_DATA if SHARED_DATA.is_dir() else "absent (tests that need it are skipped)"
    return [f"PostgreSQL: {where}, database of this session only", f"../shared data: {shared}",
            f"cache and runs folder of this session: {SESSION_DIR}"]
