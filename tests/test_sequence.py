"""One owner of the embedding sequence: the cache-only brake, leases, one retry layer and
run state hold for every driver. Real loopback servers, a real PostgreSQL, real processes."""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pandas as pd
import pytest
from fake_server import FakeEmbeddingServer, LatencyModel, expected_vector

from embed_helpers import db
from embed_helpers.backends import get_backend
from embed_helpers.texts import batch_embed
from embed_helpers.cache.jsonl import EmbeddingCache
from embed_helpers.cache.tools import open_cache
from embed_helpers.constants import PROJECT_ROOT
from embed_helpers.steps import Target
from embed_helpers.errors import BackendError, WrongRoute
from embed_helpers.workflow import plan_ingest, run_plan

DIM = 16
LONG = " ".join(f"Sentence {n} of a long discharge summary about treatment {n % 4}."
                for n in range(30))


def rows(n: int) -> pd.DataFrame:
    texts = [f"visit note {i} about complaint {i % 11}" for i in range(n)]
    texts[3] = texts[7] = LONG + " (row three and seven)"
    return pd.DataFrame({"id": [f"r{i}" for i in range(n)], "text": texts})


def test_a_server_that_fails_everything_costs_max_retries_plus_one_requests(make_settings):
    """One retry layer: `http` retries a 5xx; nobody bisects or retries around it."""
    with FakeEmbeddingServer(DIM, rate_5xx=1.0) as server:
        settings = make_settings(EMBEDDING_BACKEND="llm_api", OPENAI_BASE_URL=server.openai_url,
                                 EMBED_BATCH_SIZE=64, EMBED_MAX_RETRIES=3)
        with get_backend(settings) as backend, pytest.raises(BackendError) as info:
            batch_embed([f"text {i}" for i in range(64)], backend)
        assert server.total_requests() == 3 + 1
    assert "the server is failing" in str(info.value) and "EMBED_MAX_RETRIES" not in str(info.value)


class _StaticFiles(http.server.SimpleHTTPRequestHandler):
    """Python's own static file server: it answers POST with 501, as stdlib does."""

    posts = 0

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        type(self).posts += 1
        self.send_error(501, f"Unsupported method ({self.command!r})")


class _NoPost(_StaticFiles):
    """A route that exists but takes no POST (a reverse proxy's static location)."""

    def do_POST(self) -> None:
        type(self).posts += 1
        self.send_error(405, "Method Not Allowed")


@pytest.mark.parametrize("handler, status", [(_StaticFiles, 501), (_NoPost, 405)])
@pytest.mark.parametrize("backend", ["llm_api", "ollama"])
def test_a_wrong_url_stops_at_once_with_the_fix(make_settings, tmp_path, table, handler, status,
                                                backend):
    """At most 2 requests (Ollama's legacy route would be the second), exit 1 and a message
    about the URL: 200 rows took 206 s and 180 requests before."""
    handler = type("Counted", (handler,), {"posts": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        settings = make_settings(EMBEDDING_BACKEND=backend, OPENAI_BASE_URL=url, OLLAMA_HOST=url)
        with get_backend(settings) as embedder, pytest.raises(WrongRoute) as info:
            batch_embed(list(rows(200).text), embedder)
        assert handler.posts <= 2
        assert f"HTTP {status}" in str(info.value) and "base URL" in str(info.value)
        handler.posts = 0
        csv = tmp_path / "rows.csv"
        rows(200).to_csv(csv, index=False)
        cli = subprocess.run(
            [sys.executable, "-m", "embed_helpers", "ingest", "--data", str(csv), "--id-col", "id",
             "--text-col", "text", "--table", table, "-q", "--backend", backend],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "OPENAI_BASE_URL": url, "OLLAMA_HOST": url,
                 "OPENAI_API_KEY": "sk-test-0000", "EMBED_CACHE_PATH": str(tmp_path / "c.jsonl"),
                 "PYTHONPATH": str(PROJECT_ROOT)})
        assert cli.returncode == 1, cli.stderr
        assert handler.posts <= 2
        assert "base URL" in cli.stderr and "Traceback" not in cli.stderr
    finally:
        server.shutdown()


def test_a_plan_run_again_after_a_run_that_died_writes_every_row(make_settings, conn, table):
    """Run state belongs to the run: the same plan, carried out again after the server went
    away midway, completes every row, the chunked ones included, paying only for the rest."""
    df = rows(60)
    with FakeEmbeddingServer(DIM, fail_after=2) as server:
        settings = make_settings(EMBEDDING_BACKEND="ollama", OLLAMA_HOST=server.url,
                                 EMBED_BATCH_SIZE=8, EMBED_MAX_INPUT_TOKENS=60,
                                 EMBED_MAX_RETRIES=1)
        target = Target(table, "id", "text")
        with get_backend(settings) as backend, open_cache(settings) as cache:
            plan = plan_ingest(df, target, settings=settings, conn=conn, backend=backend,
                               cache=cache)
            assert plan.pieces.long.over == 2
            with pytest.raises(BackendError, match="server is failing"):
                run_plan(plan, conn=conn, backend=backend, cache=cache, settings=settings,
                         progress=False)
            paid = server.total_texts()
            server.fail_after = None
            report = run_plan(plan, conn=conn, backend=backend, cache=cache, settings=settings,
                              progress=False)
        assert server.total_texts() == len(plan.pieces.texts)  # nothing paid twice
        assert report.texts_embedded == len(plan.pieces.texts) - paid
    counts = db.count_rows(conn, table)
    assert counts["rows"] == counts["with_vector"] == 60
    chunks = db.count_rows(conn, table + "_chunks", id_col="id")
    assert chunks["rows"] == 2 * len(plan.pieces.spans[3])
    stored = db.fetch_vectors(conn, table, "id", ["r0", "r59"])
    np.testing.assert_allclose(stored["r0"], expected_vector(df.text[0], DIM),
                               atol=1e-6)


WRITER = """
import sys
from embed_helpers.backends import get_backend
from embed_helpers.texts import batch_embed
from embed_helpers.cache.tools import open_cache
from embed_helpers.config import load_settings
settings = load_settings()
with get_backend(settings) as backend, open_cache(settings) as cache:
    result = batch_embed([f"shared text {i}" for i in range(1000)], backend, cache=cache)
print("embedded", result.texts_embedded)
"""


def test_two_processes_batch_embed_one_shared_cache_pay_once(fresh_database, tmp_path):
    """`batch_embed` takes leases on the PostgreSQL cache: two processes embedding the same
    1,000 new texts pay for at most 1,000 + the batches in flight."""
    latency = LatencyModel(per_request_ms=20, per_text_ms=0.2, slots=4)
    with FakeEmbeddingServer(DIM, latency=latency) as server:
        env = {**os.environ, "EMBEDDING_BACKEND": "ollama", "OLLAMA_HOST": server.url,
               "EMBED_CACHE_BACKEND": "postgres", "EMBED_CACHE_URL": fresh_database,
               "EMBED_BATCH_SIZE": "50", "EMBED_MAX_CONCURRENCY": "2",
               "PYTHONPATH": str(PROJECT_ROOT)}
        procs = [subprocess.Popen([sys.executable, "-c", WRITER], env=env, cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
        embedded = [int(o[0].split()[-1]) for o in outs]
        in_flight = 2 * 2 * 50  # each process: 2 batches of 50 in flight
        assert 1000 <= server.total_texts() <= 1000 + in_flight
        assert sum(embedded) == server.total_texts()
        assert min(embedded) > 0  # both worked: the leases shared the texts out


def test_the_cli_under_the_cache_only_brake_sends_nothing_and_lists_misses_by_id(
        fake_server, tmp_path, conn, table):
    csv = tmp_path / "rows.csv"
    rows(30).to_csv(csv, index=False)
    env = {**os.environ, "EMBEDDING_BACKEND": "ollama", "OLLAMA_HOST": fake_server.url,
           "EMBED_CACHE_PATH": str(tmp_path / "c.jsonl"), "EMBED_RUNS_DIR": str(tmp_path / "runs"),
           "PYTHONPATH": str(PROJECT_ROOT), "EMBED_MAX_INPUT_TOKENS": "60"}
    args = [sys.executable, "-m", "embed_helpers", "ingest", "--data", str(csv), "--id-col", "id",
            "--text-col", "text", "--table", table, "-q", "--limit", "10"]
    assert subprocess.run(args, env=env, capture_output=True, timeout=120).returncode == 0
    fake_server.reset()
    done = subprocess.run(args[:-2], env={**env, "EMBED_CACHE_ONLY": "1"}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert fake_server.total_requests() == 0
    failures = [json.loads(line) for f in (tmp_path / "runs").glob("failures-*.jsonl")
                for line in f.read_text().splitlines()]
    assert sorted(f["id"] for f in failures) == sorted(f"r{i}" for i in range(10, 30))
    assert all("EMBED_CACHE_ONLY" in f["reason"] for f in failures)
    assert db.count_rows(conn, table)["rows"] == 10
    assert len(EmbeddingCache(tmp_path / "c.jsonl", read_only=True)) > 0


def test_a_hung_server_is_tried_twice_not_max_retries_times(make_settings):
    """A server that never answers cost (EMBED_MAX_RETRIES + 1) x EMBEDDING_TIMEOUT before
    (380 s for one batch at the defaults); now one more try, then the fix in words."""
    with FakeEmbeddingServer(DIM, slow_s=1.5, slow_first=100) as server:
        settings = make_settings(EMBEDDING_BACKEND="ollama", OLLAMA_HOST=server.url,
                                 EMBEDDING_TIMEOUT=0.3, EMBED_MAX_RETRIES=5)
        with get_backend(settings) as backend, pytest.raises(BackendError) as info:
            batch_embed(["one text", "another"], backend)
        assert server.total_requests() == 2
    assert "EMBEDDING_TIMEOUT=0.3s (after 2 attempts)" in str(info.value)
    assert "hung" in str(info.value)


def test_a_text_refused_mid_run_as_too_long_is_split_to_the_stated_window(make_settings, conn,
                                                                         table):
    """EMBED_MAX_INPUT_TOKENS set too high: the server refuses the long rows with the limit in
    its message (OpenAI's wording); they are cut to that window and sent again, never lost."""
    df = rows(40)
    with FakeEmbeddingServer(DIM, max_input_tokens=50) as server:
        settings = make_settings(EMBEDDING_BACKEND="ollama", OLLAMA_HOST=server.url,
                                 EMBED_BATCH_SIZE=8, EMBED_MAX_INPUT_TOKENS=4000)
        with get_backend(settings) as backend, open_cache(settings) as cache:
            plan = plan_ingest(df, Target(table, "id", "text"), settings=settings, conn=conn,
                               backend=backend, cache=cache)
            assert plan.pieces.long.over == 0  # nothing is long at 4,000 tokens
            report = run_plan(plan, conn=conn, backend=backend, cache=cache, settings=settings,
                              progress=False)
            assert backend.window.origin == "server" and backend.window.max_tokens < 50
    assert report.rows_failed == 0 and report.rows_written == 40
    with conn.cursor() as cur:
        cur.execute(f'SELECT id, count(*) FROM "{table}_chunks" GROUP BY id ORDER BY id')
        assert [r[0] for r in cur.fetchall()] == ["r3", "r7"]
    conn.rollback()
