"""Which model made a table: recorded on it, checked before any request and at run time, and
`--reembed` replacing every vector through a shadow table swapped in at once. Real parts:
PostgreSQL, a loopback server whose models give different vectors (`vectors_by_model`)."""
from __future__ import annotations

import uuid

import numpy as np
import pytest
from fake_server import FakeEmbeddingServer, expected_vector

from embed_helpers import db, provenance, retrieval, workflow
from embed_helpers.backends import get_backend
from embed_helpers.cache.tools import open_cache
from embed_helpers.errors import ModelMismatch, TableOfAnotherModel
from embed_helpers.reembed import SUFFIX
from embed_helpers.steps import Target

DIM = 32
A, B = "nomic-embed-text", "mxbai-embed-large"
TEXTS = [f"trial {i} of drug {i % 3} in adults with condition {i % 5}" for i in range(12)]
LONG = " ".join(f"word{k} of a long methods section" for k in range(60))  # chunked at 64 tokens


@pytest.fixture
def server():
    with FakeEmbeddingServer(DIM, vectors_by_model=True, context_length=64) as fake:
        yield fake


@pytest.fixture
def settings_of(make_settings, server):
    def make(model=A, backend="ollama", **extra):
        return make_settings(EMBEDDING_BACKEND=backend, OLLAMA_HOST=server.url,
                             OLLAMA_EMBED_MODEL=model, OPENAI_BASE_URL=server.openai_url,
                             OPENAI_EMBED_MODEL=model, OPENAI_API_KEY="sk-test-0000",
                             EMBED_BATCH_SIZE=5, EMBED_MAX_INPUT_TOKENS=64, **extra)
    return make


def plan_run(settings, conn, table, ids, texts, run=True):
    backend, cache = get_backend(settings), open_cache(settings)
    plan = workflow.plan_ingest({"id": list(ids), "text": list(texts)}, Target(table, "id", "text"),
                                settings=settings, conn=conn, backend=backend, cache=cache)
    if not run:
        return plan, None
    return plan, workflow.run_plan(plan, conn=conn, backend=backend, cache=cache,
                                   settings=settings, progress=False)


def vectors(conn, table):
    return db.fetch_vectors(conn, table, "id", [str(i) for i in range(100)] + ["long"])


def test_another_model_of_the_same_dimension_is_refused_before_any_request(
        settings_of, server, conn, table):
    ids = [str(i) for i in range(len(TEXTS))]
    plan_run(settings_of(A), conn, table, ids, TEXTS)
    server.reset()
    with pytest.raises(ModelMismatch) as stopped:
        plan_run(settings_of(B), conn, table, ids, TEXTS + [])
    message = str(stopped.value)
    assert f"table {table} was made by ollama:/api/embed {A} ({DIM}, normalized" in message
    assert f"this run is ollama:/api/embed {B}" in message and "model differs" in message
    assert "--table" in message and "--reembed" in message
    assert server.total_requests() == 0  # nothing paid, not even a probe
    stored = vectors(conn, table)
    assert len(stored) == len(TEXTS)
    assert np.allclose(stored["3"], expected_vector(TEXTS[3], DIM, model=A), atol=1e-6)


def test_another_backend_with_the_same_model_is_refused(settings_of, server, conn, table):
    plan_run(settings_of(A), conn, table, ["1", "2"], TEXTS[:2])
    server.reset()
    with pytest.raises(TableOfAnotherModel) as stopped:
        plan_run(settings_of(A, backend="llm_api"), conn, table, ["1", "2"], TEXTS[:2])
    assert stopped.value.fields == ["route"]
    assert server.total_requests() == 0


def test_other_chunking_is_refused_and_a_longer_window_of_fail_is_not(settings_of, server,
                                                                       conn, table):
    plan_run(settings_of(A), conn, table, ["1"], [LONG])
    with pytest.raises(TableOfAnotherModel) as stopped:
        plan_run(settings_of(A, EMBED_CHUNK_OVERLAP=8), conn, table, ["1"], [LONG], run=False)
    assert stopped.value.fields == ["overlap"]
    with pytest.raises(TableOfAnotherModel) as stopped:
        plan_run(settings_of(A, EMBED_LONG_TEXTS="truncate"), conn, table, ["1"], [LONG], run=False)
    assert stopped.value.fields == ["long_texts"]


def test_an_emptied_table_takes_the_next_runs_model(settings_of, server, conn, table):
    plan_run(settings_of(A), conn, table, ["1"], TEXTS[:1])
    with conn.cursor() as cur:
        cur.execute(f'TRUNCATE "{table}"')
    conn.commit()
    plan, report = plan_run(settings_of(B), conn, table, ["1"], TEXTS[:1])
    assert any("is empty" in note for note in plan.notes) and report.rows_written == 1
    assert provenance.read(conn, table)[1].identity["model"] == B


def test_a_table_from_before_provenance_is_adopted(settings_of, server, conn, table):
    db.create_table(conn, table, "id", "text", DIM)
    db.write_rows(conn, table, "id", "text", ["1"], [TEXTS[1]],
                  np.stack([expected_vector(TEXTS[1], DIM, model=A)]))
    assert provenance.read(conn, table) == (True, None)
    plan, report = plan_run(settings_of(A), conn, table, ["1", "2"], TEXTS[1:3])
    assert any("no record of the model" in note for note in plan.notes)
    assert report.rows_written == 1 and report.rows_unchanged == 1
    record = provenance.read(conn, table)[1]
    assert record.identity["model"] == A and record.identity["dim"] == DIM
    with pytest.raises(ModelMismatch):
        plan_run(settings_of(B), conn, table, ["1"], TEXTS[1:2], run=False)


def test_the_run_checks_again_what_another_process_wrote_since_the_plan(settings_of, server,
                                                                         conn, table):
    plan_a, _ = plan_run(settings_of(A), conn, table, ["1"], TEXTS[:1], run=False)  # no table yet
    plan_run(settings_of(B), conn, table, ["2"], TEXTS[1:2])  # B makes the table meanwhile
    backend = get_backend(settings_of(A))
    with pytest.raises(ModelMismatch, match="model differs"):
        workflow.run_plan(plan_a, conn=conn, backend=backend, cache=open_cache(settings_of(A)),
                          settings=settings_of(A), progress=False)
    assert set(vectors(conn, table)) == {"2"}  # nothing of A's written


@pytest.fixture
def qualified(conn):
    """`s_x.Docs_x`: a schema-qualified, mixed-case name; the schema dropped after."""
    schema, name = f"s_{uuid.uuid4().hex[:8]}", f"Docs_{uuid.uuid4().hex[:6]}"
    with conn.cursor() as cur:
        cur.execute(f'CREATE SCHEMA "{schema}"')
    conn.commit()
    yield f"{schema}.{name}"
    conn.rollback()
    with conn.cursor() as cur:
        cur.execute(f'DROP SCHEMA "{schema}" CASCADE')
    conn.commit()


def test_reembed_replaces_every_vector_once(settings_of, server, conn, qualified):
    table = qualified
    ids = [str(i) for i in range(len(TEXTS))] + ["long"]
    plan_run(settings_of(A), conn, table, ids, TEXTS + [LONG])
    assert retrieval.create_hnsw_index(conn, table, DIM)
    server.reset()
    # The input holds only some rows, one with a new text: the rest come from the table.
    texts = {**dict(zip(ids, TEXTS + [LONG])), "2": "trial 2, amended"}
    plan, report = plan_run(settings_of(B, EMBED_REEMBED=1), conn, table, ids[:4], [
        texts[i] for i in ids[:4]])
    assert plan.target.table == table + SUFFIX and report.table == table
    stored = vectors(conn, table)
    assert set(stored) == set(ids)
    for row_id in ids[:-1]:
        assert np.allclose(stored[row_id], expected_vector(texts[row_id], DIM, model=B), atol=1e-6)
    with conn.cursor() as cur:
        cur.execute(f'SELECT char_start, char_end, embedding FROM {regclass(table + "_chunks")} '
                    "WHERE id = 'long' ORDER BY chunk")
        chunks = cur.fetchall()
        cur.execute("SELECT to_regclass(%s), to_regclass(%s)",
                    (regclass(table + SUFFIX), regclass(table + "_embedding_hnsw")))
        shadow, index = cur.fetchone()
    conn.rollback()
    assert len(chunks) > 1 and all(np.allclose(v.to_numpy(), expected_vector(LONG[s:e], DIM, model=B),
                                               atol=1e-6) for s, e, v in chunks)
    assert shadow is None and index is not None  # the HNSW index was made again, same name
    with conn.cursor() as cur:
        cur.execute("SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                    "WHERE i.indrelid = to_regclass(%s)", (regclass(table),))
        names = sorted(r[0] for r in cur.fetchall())
    conn.rollback()
    short = table.split(".")[1]
    assert names == [f"{short}_embedding_hnsw", f"{short}_pkey"]  # the shadow's, renamed
    assert provenance.read(conn, table)[1].identity["model"] == B
    sent = server.total_texts()
    assert sent == len(set(TEXTS[:2] + TEXTS[3:]) | {"trial 2, amended"}) + len(chunks)
    server.reset()
    again, report = plan_run(settings_of(B, EMBED_REEMBED=1), conn, table, ids[:4],
                             [texts[i] for i in ids[:4]])
    assert again.reembed is None and any("nothing to replace" in n for n in again.notes)
    assert server.total_requests() == 0 and report.rows_unchanged == 4


def test_reembed_waits_for_rows_an_ordinary_run_changed_meanwhile(settings_of, server, conn,
                                                                   table):
    ids = ["1", "2", "3"]
    plan_run(settings_of(A), conn, table, ids, TEXTS[:3])
    backend_b, settings_b = get_backend(settings_of(B, EMBED_REEMBED=1)), settings_of(B, EMBED_REEMBED=1)
    plan = workflow.plan_ingest({"id": ids, "text": TEXTS[:3]}, Target(table, "id", "text"),
                                settings=settings_b, conn=conn, backend=backend_b,
                                cache=open_cache(settings_b))
    # An ordinary run of the old model writes a new row while the reembed is planned.
    normal, _ = plan_run(settings_of(A), conn, table, ["4"], TEXTS[3:4])
    assert not any("pending" in n for n in normal.notes)  # the shadow does not exist yet
    workflow.run_plan(plan, conn=conn, backend=backend_b, cache=open_cache(settings_b),
                      settings=settings_b, progress=False)
    assert provenance.read(conn, table)[1].identity["model"] == A  # not swapped: row 4 is missing
    normal, _ = plan_run(settings_of(A), conn, table, ["5"], TEXTS[4:5])
    assert any("reembed of" in n and "pending" in n for n in normal.notes)
    plan_run(settings_b, conn, table, ids, TEXTS[:3])
    stored = vectors(conn, table)
    assert set(stored) == {"1", "2", "3", "4", "5"}
    assert np.allclose(stored["4"], expected_vector(TEXTS[3], DIM, model=B), atol=1e-6)
    assert provenance.read(conn, table)[1].identity["model"] == B
    db.drop_table(conn, table + SUFFIX)


def regclass(name):
    from embed_helpers.table_names import regclass_text
    return regclass_text(name)


def test_cli_stops_another_model_then_reembeds_through_a_kill(tmp_path, conn, table):
    """The flag, the exit status and the message; SIGKILL midway, rerun: every row once, no
    text paid twice, the old table readable throughout."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from fake_server import LatencyModel

    from embed_helpers.cache.jsonl import EmbeddingCache
    from embed_helpers.constants import PROJECT_ROOT
    n, batch, dim = 200, 10, 16
    texts = [f"abstract {i} on cohort {i % 7}" for i in range(n)]
    data = tmp_path / "abstracts.csv"
    data.write_text("pmid,abstract\n" + "".join(f"{1000 + i},{t}\n" for i, t in enumerate(texts)))
    args = [sys.executable, "-m", "embed_helpers", "ingest", "--data", str(data), "--id-col",
            "pmid", "--text-col", "abstract", "--table", table, "--batch-size", str(batch), "-q"]
    with FakeEmbeddingServer(dim, LatencyModel(30, 0.5), vectors_by_model=True) as server:
        def env(model):
            return dict(os.environ, EMBEDDING_BACKEND="ollama", OLLAMA_HOST=server.url,
                        OLLAMA_EMBED_MODEL=model, EMBED_CACHE_PATH=str(tmp_path / "cache.jsonl"),
                        PYTHONPATH=str(PROJECT_ROOT))

        def run(model, *extra):
            return subprocess.run(args + list(extra), env=env(model), cwd=tmp_path,
                                  capture_output=True, text=True, timeout=300)
        assert run(A).returncode == 0
        old = db.fetch_vectors(conn, table, "pmid", ["1007"])["1007"]
        server.reset()
        refused = run(B)
        assert refused.returncode == 1 and server.total_requests() == 0
        assert f"was made by ollama:/api/embed {A}" in refused.stderr
        assert "--reembed" in refused.stderr and "--table" in refused.stderr
        proc = subprocess.Popen(args + ["--reembed"], env=env(B), cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if db.table_dimension(conn, table + SUFFIX) and \
                        db.count_rows(conn, table + SUFFIX)["rows"] >= 60:
                    break
                assert db.count_rows(conn, table)["rows"] == n  # searches read the old table
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            in_shadow = db.count_rows(conn, table + SUFFIX)["rows"]
            assert 0 < in_shadow < n, "the run must be killed midway"
            assert np.array_equal(db.fetch_vectors(conn, table, "pmid", ["1007"])["1007"], old)
            cached_b = len(EmbeddingCache(tmp_path / "cache.jsonl")) - n  # A's entries aside
            assert cached_b >= in_shadow and server.total_texts() - cached_b <= batch
            server.reset()
            rerun = run(B, "--reembed")
            assert rerun.returncode == 0, rerun.stderr
            assert server.total_texts() == n - cached_b  # only what the cache lacked
        finally:
            proc.kill()
            db.drop_table(conn, table + SUFFIX)
    stored = db.fetch_vectors(conn, table, "pmid", [str(1000 + i) for i in range(n)])
    assert len(stored) == n and db.table_dimension(conn, table + SUFFIX) is None
    assert all(np.allclose(stored[str(1000 + i)], expected_vector(t, dim, model=B), atol=1e-6)
               for i, t in enumerate(texts))
