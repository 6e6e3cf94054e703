"""A cache every machine shares: CLI runs from different working directories, with their own
JSONL files, on one PostgreSQL cache table; runs at the same time; export and import; two
servers, one killed midway."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import time

import pandas as pd
import pytest
from psycopg2.extensions import make_dsn
from fake_server import FakeEmbeddingServer, LatencyModel

from embed_helpers import db
from embed_helpers.constants import PROJECT_ROOT

DIM, N = 24, 1000


def cli_env(servers, cache_url, workdir, **extra):
    env = dict(os.environ, EMBEDDING_BACKEND="ollama",
               OLLAMA_HOST=",".join(s.url for s in servers), EMBED_BATCH_SIZE="100",
               EMBED_CACHE_BACKEND="postgres", EMBED_CACHE_URL=cache_url,
               EMBED_CACHE_PATH=str(workdir / "own.jsonl"), EMBED_RUNS_DIR=str(workdir / "runs"),
               EMBED_BACKOFF_MS="1", PYTHONPATH=str(PROJECT_ROOT))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def ingest(data, table, env, cwd, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "embed_helpers", "ingest", "--data", str(data),
                             "--id-col", "id", "--text-col", "text", "--table", table, "-q",
                             "--report", str(cwd / f"{table}.json"), *extra], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def report(cwd, table) -> dict:
    return json.loads((cwd / f"{table}.json").read_text())


def once(conn, table) -> int:
    with conn.cursor() as cur:
        cur.execute(f'SELECT count(*), count(DISTINCT id) FROM "{table}"')
        rows, distinct = cur.fetchone()
    conn.rollback()
    assert rows == distinct
    return rows


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "texts.csv"
    pd.DataFrame({"id": [f"n{i}" for i in range(N)],
                  "text": [f"discharge note {i}: follow-up in {i % 30} days" for i in range(N)]}
                 ).to_csv(path, index=False)
    return path


@pytest.fixture
def two_dirs(tmp_path):
    a, b = tmp_path / "laptop", tmp_path / "gpu-box"
    a.mkdir()
    b.mkdir()
    return a, b


def test_a_second_run_elsewhere_embeds_nothing(data, two_dirs, fresh_database, conn, table):
    (a, b), other = two_dirs, table + "_b"
    with FakeEmbeddingServer(DIM) as server:
        finish(ingest(data, table, cli_env([server], fresh_database, a), a))
        assert server.total_texts() == N
        server.reset()
        finish(ingest(data, other, cli_env([server], fresh_database, b), b))
        assert server.total_texts() == 0 and report(b, other)["texts_embedded"] == 0
    assert once(conn, table) == once(conn, other) == N
    assert not (a / "own.jsonl").exists() and not (b / "own.jsonl").exists()
    db.drop_table(conn, other)


def test_two_runs_at_once_embed_each_text_about_once(data, two_dirs, fresh_database, conn, table):
    (a, b), other = two_dirs, table + "_b"
    with FakeEmbeddingServer(DIM, LatencyModel(20, 0.2, slots=2)) as server:
        first = ingest(data, table, cli_env([server], fresh_database, a), a)
        second = ingest(data, other, cli_env([server], fresh_database, b), b)
        finish(first)
        finish(second)
        # Each run sends at most EMBED_MAX_CONCURRENCY (1) batch at a time; what the other run
        # had in flight when a text was looked up is the only double payment.
        in_flight = 2 * 100
        assert N <= server.total_texts() <= N + in_flight
    assert once(conn, table) == once(conn, other) == N
    db.drop_table(conn, other)


def test_export_then_import_into_a_fresh_database(data, two_dirs, fresh_database, tmp_path, conn,
                                                  table):
    (a, b), moved = two_dirs, tmp_path / "moved.jsonl"
    admin = conn
    with FakeEmbeddingServer(DIM) as server:
        finish(ingest(data, table, cli_env([server], fresh_database, a), a))
        export = subprocess.run([sys.executable, "-m", "embed_helpers", "cache", "export", "--to",
                                 str(moved)], env=cli_env([server], fresh_database, a), cwd=a,
                                capture_output=True, text=True, timeout=120)
        assert export.returncode == 0 and f"exported {N} entries" in export.stdout, export.stderr
        with admin.cursor() as cur:  # a team's new database
            cur.execute("SELECT current_database()")
            name = cur.fetchone()[0] + "_team"
        admin.rollback()
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        admin.autocommit = False
        team = make_dsn(os.environ["DATABASE_URL"], dbname=name)
        try:
            env = cli_env([server], team, b, DATABASE_URL=team)
            imported = subprocess.run([sys.executable, "-m", "embed_helpers", "cache", "import",
                                       str(moved)], env=env, cwd=b, capture_output=True, text=True,
                                      timeout=120)
            assert imported.returncode == 0 and f"imported {N} new entries" in imported.stdout
            server.reset()
            finish(ingest(data, "notes", env, b))
            assert server.total_texts() == 0 and report(b, "notes")["rows_written"] == N
        finally:
            admin.autocommit = True
            with admin.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.autocommit = False


def test_two_servers_one_killed_midway(data, tmp_path, fresh_database, conn, table):
    model = LatencyModel(30, 0.3, slots=1)
    with FakeEmbeddingServer(DIM, model) as keeps, FakeEmbeddingServer(DIM, model) as dies:
        env = cli_env([keeps, dies], fresh_database, tmp_path, EMBED_MAX_CONCURRENCY=2)
        run = ingest(data, table, env, tmp_path)
        while dies.total_requests() < 2 and run.poll() is None:
            time.sleep(0.01)  # it has started taking requests: now it dies
        dies.stop()
        dies.drop_rate = 1.0
        finish(run)
        assert keeps.total_texts() > 0 and report(tmp_path, table)["rows_failed"] == 0
    assert once(conn, table) == N
    servers = report(tmp_path, table)["servers"]
    assert sum(s["set_aside"] for s in servers.values()) >= 1
