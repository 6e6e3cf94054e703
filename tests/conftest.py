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

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture
def make_settings(tmp_path):
    """Settings from explicit values only: no .env, no stray environment, cache in tmp."""
    def make(**overrides):
        environ = {"EMBED_CACHE_PATH": str(tmp_path / "cache.jsonl"), "EMBED_BACKOFF_MS": "1"}
        if os.environ.get("DATABASE_URL"):
            environ["DATABASE_URL"] = os.environ["DATABASE_URL"]
        environ.update({k: str(v) for k, v in overrides.items()})
        return load_settings(env_file=tmp_path / "no.env", environ=environ)
    return make


@pytest.fixture(scope="session")
def conn():
    """One real PostgreSQL connection for the session (tables are per test)."""
    from embed_helpers import db
    environ = {"DATABASE_URL": os.environ["DATABASE_URL"]} if os.environ.get("DATABASE_URL") else {}
    connection = db.connect(load_settings(env_file="/nonexistent", environ=environ))
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
    where = "DATABASE_URL" if os.environ.get("DATABASE_URL") else "embedded pgserver (.pgdata/)"
    shared = SHARED_DATA if SHARED_DATA.is_dir() else "absent (tests that need it are skipped)"
    return [f"PostgreSQL: {where}", f"../shared data: {shared}"]
