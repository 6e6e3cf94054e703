"""Fixtures: a real PostgreSQL connection and fresh table names, fresh databases, a real
loopback embedding server, settings isolated in tmp_path. The environment itself is
isolated by the project's root conftest.py."""
from __future__ import annotations

import os
import sys
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
