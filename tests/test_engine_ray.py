"""Step 9b on Ray: one local Ray instance for this module, two real fake servers, a real
PostgreSQL. The same guarantees as the local engine: same rows, same vectors, duplicate ids
resolved the same way, failures listed, a killed worker or driver loses nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from fake_server import FakeEmbeddingServer, LatencyModel, expected_vector

from embed_helpers import db
from embed_helpers.backends import get_backend
from embed_helpers.cache.tools import carry_file, open_cache
from embed_helpers.constants import PROJECT_ROOT, RAY_BATCHES_PER_BLOCK
from embed_helpers.steps import Target
from embed_helpers.errors import DatabaseError
from embed_helpers.texts import batch_embed
from embed_helpers.config import replace_settings
from embed_helpers.workflow import ingest

ray = pytest.importorskip("ray", reason="Ray Data is not installed (requirements-ray.txt)")
DIM, BATCH = 16, 10
BLOCK = RAY_BATCHES_PER_BLOCK * BATCH


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100_000_000,
             log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture
def make(make_settings, fresh_database):
    """Settings for two or more servers, with a cache table of this test's own."""
    def settings_for(servers, **extra):
        values = dict(EMBEDDING_BACKEND="ollama", OLLAMA_HOST=",".join(s.url for s in servers),
                      EMBED_BATCH_SIZE=BATCH, EMBED_MAX_CONCURRENCY=2,
                      EMBED_CACHE_BACKEND="postgres", EMBED_CACHE_URL=fresh_database)
        values.update(extra)
        return make_settings(**values)
    return settings_for


@pytest.fixture
def servers():
    with FakeEmbeddingServer(DIM) as a, FakeEmbeddingServer(DIM) as b:
        yield a, b


def frame(n, start=0, prefix="note"):
    return pd.DataFrame({"id": [f"r{i}" for i in range(start, start + n)],
                         "text": [f"{prefix} {i} about visit {i % 13}" for i in range(start, start + n)]})


def run(df, table, settings, conn):
    with get_backend(settings) as backend, open_cache(settings) as cache:
        return ingest(df, Target(table, "id", "text"), settings=settings, conn=conn,
                      backend=backend, cache=cache, progress=False)


def stored(conn, table):
    with conn.cursor() as cur:
        cur.execute(f'SELECT id, text, embedding FROM "{table}" ORDER BY id')
        rows = {r[0]: (r[1], r[2].to_numpy()) for r in cur.fetchall()}
    conn.rollback()
    return rows


def texts_sent(servers):
    return sum(s.total_texts() for s in servers)


def test_same_table_as_the_local_engine(make, servers, conn, table):
    df = pd.concat([frame(150), pd.DataFrame({
        "id": ["r3", "empty-1", "r140", "r3", "empty-2"],     # r3 repeats across blocks
        "text": ["r3 changed once", "", "r140 changed", "r3 changed twice, this one wins", None]})])
    ray_report = run(df, table, make(servers, EMBED_ENGINE="ray"), conn)
    local_table = table + "_local"
    local = run(df, local_table, make(servers), conn)
    try:
        a, b = stored(conn, table), stored(conn, local_table)
        assert a.keys() == b.keys() and len(a) == 150
        assert a["r3"][0] == "r3 changed twice, this one wins" == b["r3"][0]
        assert a["r140"][0] == "r140 changed"
        for row_id, (text, vector) in a.items():
            assert text == b[row_id][0]
            np.testing.assert_allclose(vector, b[row_id][1], atol=1e-6)
            np.testing.assert_allclose(vector, expected_vector(text, DIM), atol=1e-6)
        assert sorted(ray_report.empty_ids) == ["empty-1", "empty-2"] == sorted(local.empty_ids)
        assert ray_report.rows_read == local.rows_read == 155
        assert ray_report.rows_duplicate == local.rows_duplicate == 3
        assert ray_report.engine == "ray" and ray_report.workers
    finally:
        db.drop_table(conn, local_table)


def test_rerun_sends_nothing_and_the_local_engine_shares_the_cache(make, servers, conn,
                                                                  table):
    settings = make(servers, EMBED_ENGINE="ray")
    first = run(frame(90), table, settings, conn)
    assert first.rows_written == 90 and texts_sent(servers) == 90
    for s in servers:
        s.reset()
    again = run(frame(90), table, settings, conn)
    assert again.rows_unchanged == 90 and again.rows_written == 0
    assert texts_sent(servers) == 0
    # the local engine, on another table, finds every vector in the shared cache table
    other = table + "_other"
    try:
        local = run(frame(90), other, make(servers), conn)
        assert local.rows_written == 90 and local.texts_embedded == 0 and texts_sent(servers) == 0
    finally:
        db.drop_table(conn, other)


def test_failed_rows_are_listed_and_the_cli_exits_3(make, servers, conn, table, tmp_path):
    for s in servers:
        s.poison = {"note 7 about visit 7"}
    data = tmp_path / "in.csv"
    frame(60).to_csv(data, index=False)
    settings = make(servers)
    env = dict(os.environ, EMBEDDING_BACKEND="ollama", OLLAMA_HOST=settings.OLLAMA_HOST,
               EMBED_BATCH_SIZE=str(BATCH), EMBED_RUNS_DIR=str(tmp_path / "runs"),
               EMBED_CACHE_BACKEND="postgres", EMBED_CACHE_URL=str(settings.EMBED_CACHE_URL),
               RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONPATH=str(PROJECT_ROOT))
    done = subprocess.run([sys.executable, "-m", "embed_helpers", "ingest", "--data", str(data),
                           "--id-col", "id", "--text-col", "text", "--table", table,
                           "--engine", "ray", "-q"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 3, done.stderr[-3000:]
    listed = list((tmp_path / "runs").glob("failures-*.jsonl"))
    assert [json.loads(line)["id"] for line in listed[0].open()] == ["r7"]
    assert len(stored(conn, table)) == 59


def _worker_pids():
    import psutil
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if "BlockWorker" in " ".join(p.info["cmdline"] or [])]


def test_a_worker_killed_mid_run_loses_nothing(make, conn, table):
    slow = LatencyModel(40, 0.5, slots=2)
    with FakeEmbeddingServer(DIM, slow) as a, FakeEmbeddingServer(DIM, slow) as b:
        settings = make((a, b), EMBED_ENGINE="ray", EMBED_WORKERS=2)
        n = 30 * BLOCK
        result = {}
        thread = threading.Thread(target=lambda: result.update(
            report=run(frame(n), table, settings, conn=db.connect(settings))))
        thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (db.table_dimension(conn, table)
                                                    and db.count_rows(conn, table)["rows"] >= 4 * BLOCK):
            time.sleep(0.05)
        pids = _worker_pids()
        assert pids, "no worker process found"
        os.kill(pids[0], signal.SIGKILL)
        thread.join(timeout=300)
        assert result["report"].rows_written <= n
        rows = stored(conn, table)
        assert len(rows) == n  # every row exactly once (the id is the primary key)
        again = texts_sent((a, b)) - n
        assert 0 <= again <= 2 * BLOCK, f"{again} texts embedded again"


def test_a_killed_driver_then_a_rerun_embeds_only_what_is_missing(make, conn, table,
                                                                 tmp_path):
    slow = LatencyModel(30, 0.5, slots=2)
    with FakeEmbeddingServer(DIM, slow) as a:
        settings = make((a,))
        data = tmp_path / "in.csv"
        n = 25 * BLOCK
        frame(n).to_csv(data, index=False)
        # A short EMBEDDING_TIMEOUT: the killed run's leases on its texts in flight end soon.
        env = dict(os.environ, EMBEDDING_BACKEND="ollama", OLLAMA_HOST=a.url,
                   EMBED_BATCH_SIZE=str(BATCH), EMBED_MAX_CONCURRENCY="2", EMBEDDING_TIMEOUT="2",
                   EMBED_CACHE_BACKEND="postgres", EMBED_CACHE_URL=str(settings.EMBED_CACHE_URL),
                   RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONPATH=str(PROJECT_ROOT))
        args = [sys.executable, "-m", "embed_helpers", "ingest", "--data", str(data), "--id-col",
                "id", "--text-col", "text", "--table", table, "--engine", "ray", "-q"]
        driver = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and driver.poll() is None and not (
                db.table_dimension(conn, table) and db.count_rows(conn, table)["rows"] >= 3 * BLOCK):
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        before = db.count_rows(conn, table)["rows"]
        assert 0 < before < n, "the driver must be killed midway"
        time.sleep(1)  # its workers go with it
        cached = len(open_cache(settings))
        a.reset()
        rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert a.total_texts() == n - cached  # only what the shared cache lacked
        assert len(stored(conn, table)) == n


def test_a_block_the_database_refuses_fails_the_run_whole(make, servers, conn, table):
    settings = make(servers, EMBED_ENGINE="ray")
    db.create_table(conn, table, "id", "text", DIM)
    with conn.cursor() as cur:  # the database refuses one row: its whole block is refused
        cur.execute(f'ALTER TABLE "{table}" ADD CONSTRAINT no_r77 CHECK (id <> \'r77\')')
    conn.commit()
    with pytest.raises(DatabaseError, match=r"PostgreSQL refused while writing rows.*no_r77"):
        run(frame(3 * BLOCK), table, settings, conn)
    ids = set(stored(conn, table))
    block_of_77 = {f"r{i}" for i in range(BLOCK, 2 * BLOCK)}
    assert not ids & block_of_77  # nothing of that block is half-written


DRIVER_TEXTS = [f"note {i} about visit {i % 9}" for i in range(36)] + \
    ["note 3 about visit 3", " ".join(f"Sentence {n} of a long summary about care {n % 4}."
                                      for n in range(30))]


def _drive(name, settings, conn, table):
    """Embed DRIVER_TEXTS with one driver; its vectors in input order."""
    from embed_helpers.embedder import Embedder
    df = pd.DataFrame({"id": [f"d{i}" for i in range(len(DRIVER_TEXTS))], "text": DRIVER_TEXTS})
    with get_backend(settings) as backend, open_cache(settings) as cache:
        if name == "batch_embed":
            return batch_embed(DRIVER_TEXTS, backend, cache=cache, on_failure="return").vectors
        if name == "Embedder":
            with Embedder(settings, backend=backend, cache=cache) as embedder:
                futures = [embedder.submit(t) for t in DRIVER_TEXTS]
                return np.stack([f.result() if not f.exception() else np.full(DIM, np.nan)
                                 for f in futures])
        ingest(df, Target(table, "id", "text"), settings=settings, conn=conn, backend=backend,
               cache=cache, progress=False)
    vectors = db.fetch_vectors(conn, table, "id", df.id)
    return np.stack([vectors.get(i, np.full(DIM, np.nan)) for i in df.id])


def _entries(settings):
    with open_cache(settings) as cache:
        return {e["key"]: np.asarray(e["vector"]).tobytes() for e in cache.entries()}


def test_every_driver_sends_caches_and_returns_the_same(make_settings, conn, table,
                                                       fresh_database):
    """The local engine, the Ray engine, batch_embed and the Embedder run one sequence: on the
    same rows, with the PostgreSQL store, the same texts sent, cache entries and vectors;
    under the cache-only brake, none of them sends a request."""
    import psycopg2
    from embed_helpers.workflow import plan_ingest
    seen = {}
    for name in ("local", "ray", "batch_embed", "Embedder"):
        admin = psycopg2.connect(fresh_database)  # each driver starts from an empty cache
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS embedding_cache, embedding_cache_leases")
        admin.close()
        with FakeEmbeddingServer(DIM) as server:
            settings = make_settings(EMBEDDING_BACKEND="ollama", OLLAMA_HOST=server.url,
                                     EMBED_BATCH_SIZE=BATCH, EMBED_MAX_INPUT_TOKENS=60,
                                     EMBED_CACHE_BACKEND="postgres", EMBED_CACHE_URL=fresh_database,
                                     EMBED_ENGINE="ray" if name == "ray" else "local")
            vectors = _drive(name, settings, conn, f"{table}_{name.lower()}")
            sent = sorted(t for body in server.bodies for t in body["input"])
            seen[name] = (server.total_requests(), sent, _entries(settings), vectors)
            server.reset()
            braked = replace_settings(settings, EMBED_CACHE_ONLY=True)
            _drive(name, braked, conn, f"{table}_{name.lower()}_braked")
            assert server.total_requests() == 0, f"{name} paid under EMBED_CACHE_ONLY"
            if name == "local":  # the plan's probe too
                with get_backend(braked) as backend, open_cache(braked) as cache:
                    plan_ingest(pd.DataFrame({"id": ["x"], "text": ["never seen"]}),
                                Target(table, "id", "text"), settings=braked, conn=conn,
                                backend=backend, cache=cache, probe=True)
                assert server.total_requests() == 0
    local = seen["local"]
    for name, (requests, sent, entries, vectors) in seen.items():
        assert sent == local[1], name
        assert entries == local[2], name
        np.testing.assert_array_equal(vectors, local[3], err_msg=name)
        if name != "Embedder":  # its batches are whatever arrived together
            assert requests == local[0], name
    for suffix in ("local", "ray", "batch_embed", "embedder"):
        for extra in ("", "_braked"):
            db.drop_table(conn, f"{table}_{suffix}{extra}")


def test_a_silently_truncating_server_is_measured_once_and_chunked_on_ray(make, conn, table):
    """infinity-like servers (they read 64 of their tokens, say nothing): the measured window
    is shared through the cache table, and no stored chunk is longer than what they read."""
    with FakeEmbeddingServer(DIM, truncate_at=64, known_models={"acme"}) as a, \
            FakeEmbeddingServer(DIM, truncate_at=64, known_models={"acme"}) as b:
        df = pd.DataFrame({"id": [f"r{i}" for i in range(60)],
                           "text": [" ".join(f"Finding {n} of note {i} is stable." for n in range(12))
                                    for i in range(60)]})
        settings = make([a, b], EMBEDDING_BACKEND="llm_api", OPENAI_EMBED_MODEL="acme",
                        OPENAI_BASE_URL=f"{a.openai_url} {b.openai_url}", EMBED_ENGINE="ray",
                        EMBED_CHUNK_OVERLAP=4)
        report = run(df, table, settings, conn)
        measuring = [body for s in (a, b) for body in s.bodies if len(body["input"]) > 2 and
                     all(body["input"][-1].startswith(t) for t in body["input"])]
    assert report.rows_failed == 0 and report.long_texts["origin"] == "measured"
    assert report.long_texts["over"] == 60 and 1 <= len(measuring) <= 2  # at most one a server
    with conn.cursor() as cur:
        cur.execute(f'SELECT id, char_start, char_end FROM "{table}_chunks"')
        spans = cur.fetchall()
    conn.rollback()
    texts = dict(zip(df["id"], df["text"]))
    assert spans and all(len(texts[i][s:e].encode()) <= 4 * 64 for i, s, e in spans)


def test_switching_to_ray_after_a_local_run_with_the_jsonl_cache_pays_nothing(
        make, servers, conn, table, caplog):
    """`make run PARAMS="ENGINE=ray RESET_TABLE=True"` after a local run: the Ray engine's
    table store gets what the JSONL file holds (once, then only what was appended)."""
    settings = make(servers, EMBED_CACHE_BACKEND="jsonl")  # EMBED_CACHE_URL: this test's
    local = run(frame(90), table, settings, conn)
    assert local.texts_embedded == 90 and texts_sent(servers) == 90
    for s in servers:
        s.reset()
    db.drop_table(conn, table)  # RESET_TABLE=True
    with caplog.at_level("INFO", logger="embed_helpers.cache.tools"):
        switched = run(frame(90), table, replace(settings, EMBED_ENGINE="ray"), conn)
    assert switched.rows_written == 90 and switched.texts_embedded == 0
    assert texts_sent(servers) == 0 and "90 new entries carried from" in caplog.text
    assert stored(conn, table)["r7"][0] == "note 7 about visit 7"
    np.testing.assert_allclose(stored(conn, table)["r7"][1],
                               expected_vector("note 7 about visit 7", DIM), atol=1e-6)
    # Five more rows through the local engine; the next Ray run carries those five only.
    assert run(frame(95), table + "_b", settings, conn).texts_embedded == 95 - 90
    for s in servers:
        s.reset()
    caplog.clear()
    with caplog.at_level("INFO", logger="embed_helpers.cache.tools"):
        again = run(frame(95), table, replace(settings, EMBED_ENGINE="ray"), conn)
    db.drop_table(conn, table + "_b")
    assert again.rows_written == 5 and again.texts_embedded == 0 and texts_sent(servers) == 0
    assert "5 new entries carried from" in caplog.text
    with open_cache(make(servers)) as table_store:  # nothing left to carry: no file read
        assert carry_file(settings.EMBED_CACHE_PATH, table_store) == 0 and len(table_store) == 95


def test_a_reembed_on_ray_swaps_in_the_other_models_vectors(make, conn, table):
    """The workers fill the shadow table and record its model; the swap carries the record."""
    from embed_helpers import provenance
    from embed_helpers.reembed import SUFFIX
    df = frame(25)
    with FakeEmbeddingServer(DIM, vectors_by_model=True) as server:
        run(df, table, make([server], OLLAMA_EMBED_MODEL="model-a"), conn)
        report = run(df, table, make([server], OLLAMA_EMBED_MODEL="model-b", EMBED_ENGINE="ray",
                                     EMBED_REEMBED=1), conn)
    assert report.engine == "ray" and report.table == table and report.rows_written == 25
    rows = stored(conn, table)
    assert len(rows) == 25 and db.table_dimension(conn, table + SUFFIX) is None
    for text, vector in rows.values():
        np.testing.assert_allclose(vector, expected_vector(text, DIM, model="model-b"), atol=1e-6)
    assert provenance.read(conn, table)[1].identity["model"] == "model-b"


def test_ray_writes_kept_columns_and_sources_and_sync_runs_after_it(make, servers, conn, table):
    from embed_helpers.readers import SOURCE_KEY
    df = frame(60).assign(year=[str(2000 + i % 5) for i in range(60)], **{SOURCE_KEY: "a.csv"})
    settings = make(servers, EMBED_ENGINE="ray", EMBED_SYNC=1)

    def go(rows):
        with get_backend(settings) as backend, open_cache(settings) as cache:
            return ingest(rows, Target(table, "id", "text", keep_cols="year"), settings=settings,
                          conn=conn, backend=backend, cache=cache, progress=False,
                          scope=["a.csv"])
    assert go(df).rows_written == 60
    with conn.cursor() as cur:
        cur.execute(f'SELECT id, source, metadata FROM "{table}"')
        rows = {r[0]: (r[1], r[2]) for r in cur.fetchall()}
    conn.rollback()
    assert len(rows) == 60 and rows["r7"] == ("a.csv", {"year": "2002"})
    sent = texts_sent(servers)
    report = go(df.iloc[6:])
    assert report.sync["rows_deleted"] == 6 and texts_sent(servers) == sent
    assert set(stored(conn, table)) == {f"r{i}" for i in range(6, 60)}
