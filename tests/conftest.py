"""Shared fixtures: real PostgreSQL (embedded, or DATABASE_URL), a real loopback
embedding server, settings isolated from the developer's .env and cache."""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))  # so tests and benchmarks can `import fake_server`

from embed_helpers.config import load_settings  # noqa: E402
from embed_helpers.constants import PROJECT_ROOT  # noqa: E402

# The tests, the notebook kernel nbval starts and every CLI subprocess inherit this
# environment: never the developer's .env, never their cache or embedded database, and the
# notebook on the backend its committed outputs were made with. DATABASE_URL is used only
# when it is set in the environment itself (point it at a scratch database).
os.environ["EMBED_ENV_FILE"] = ""
os.environ["EMBEDDING_BACKEND"] = "local"
os.environ.setdefault("EMBED_PGDATA", str(PROJECT_ROOT / ".pgdata-test"))
os.environ.setdefault("EMBED_CACHE_PATH", str(PROJECT_ROOT / ".cache" / "test-embeddings.jsonl"))

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture
def make_settings(tmp_path):
    """Settings from explicit values only: no .env, no stray environment, cache in tmp."""
    def make(**overrides):
        environ = {"EMBED_CACHE_PATH": str(tmp_path / "cache.jsonl"), "EMBED_BACKOFF_MS": "1",
                   "EMBED_PGDATA": os.environ["EMBED_PGDATA"]}
        if os.environ.get("DATABASE_URL"):
            environ["DATABASE_URL"] = os.environ["DATABASE_URL"]
        environ.update({k: str(v) for k, v in overrides.items()})
        return load_settings(env_file=tmp_path / "no.env", environ=environ)
    return make


@pytest.fixture(scope="session")
def conn():
    """One real PostgreSQL connection for the session (tables are per test)."""
    from embed_helpers import db
    environ = {k: os.environ[k] for k in ("DATABASE_URL", "EMBED_PGDATA") if os.environ.get(k)}
    connection = db.connect(load_settings(environ=environ))
    yield connection
    connection.close()


@pytest.fixture
def table(conn):
    """A fresh table name, dropped afterwards (tests may run beside other writers)."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    yield name
    conn.rollback()
    with conn.cursor() as cur:
        cur.execute(f'DROP TABLE IF EXISTS "{name}"')
    conn.commit()


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
    return [f"PostgreSQL: {where}", f"../shared data: {shared}"]
