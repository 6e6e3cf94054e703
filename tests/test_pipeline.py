"""Step 9b end to end: real PostgreSQL, a real loopback embedding server, a real cache file.

Assertions are on rows, vectors and the server's request counters, never on time.
"""
import json

import numpy as np
import pandas as pd
import pytest
from fake_server import expected_vector

from embed_helpers import db
from embed_helpers.backends import get_backend
from embed_helpers.steps import Target
from embed_helpers.workflow import ingest, open_cache, plan_ingest

DIM = 32


@pytest.fixture
def run(fake_server, make_settings, conn, table):
    """ingest(df) against the fake Ollama server; returns the report."""
    def go(df, **overrides):
        values = dict(EMBEDDING_BACKEND="ollama", OLLAMA_HOST=fake_server.url, EMBED_BATCH_SIZE=10)
        values.update(overrides)
        settings = make_settings(**values)
        with get_backend(settings) as backend:
            return ingest(df, Target(table, "id", "text"), settings=settings, conn=conn,
                          backend=backend, cache=open_cache(settings), progress=False)
    return go


def frame(n, start=0):
    return pd.DataFrame({"id": [f"r{i}" for i in range(start, start + n)],
                         "text": [f"abstract number {i}" for i in range(start, start + n)]})


def stored(conn, table):
    with conn.cursor() as cur:
        cur.execute(f'SELECT id, text, embedding FROM "{table}" ORDER BY id')
        rows = cur.fetchall()
    conn.rollback()
    return rows


def test_cold_run_batches_and_stores_aligned_vectors(run, fake_server, conn, table):
    report = run(frame(95))
    # ceil(95 / 10) batches; no probe: the first batch tells the dimension
    assert fake_server.total_requests() == 10
    assert fake_server.total_texts() == 95
    assert report.dim == DIM
    assert report.rows_written == 95 and report.texts_embedded == 95 and report.requests == 10
    for row_id, text, vector in stored(conn, table):
        assert np.array_equal(vector.to_numpy(), expected_vector(text, DIM))


def test_rerun_of_unchanged_data_sends_and_writes_nothing(run, fake_server):
    run(frame(40))
    fake_server.reset()
    report = run(frame(40))
    assert fake_server.total_requests() == 0  # the table knows the dimension: no probe
    assert report.rows_unchanged == 40 and report.rows_written == 0 and report.requests == 0


def test_grow_by_20_rows_embeds_20_texts_in_one_request(run, fake_server, conn, table):
    run(frame(100), EMBED_BATCH_SIZE=64)
    fake_server.reset()
    report = run(pd.concat([frame(100), frame(20, start=100)]), EMBED_BATCH_SIZE=64)
    assert (report.requests, report.texts_embedded, report.rows_written) == (1, 20, 20)
    assert len(stored(conn, table)) == 120


def test_changed_text_is_re_embedded(run, fake_server, conn, table):
    run(frame(5))
    df = frame(5)
    df.loc[2, "text"] = "a corrected abstract"
    fake_server.reset()
    report = run(df)
    assert report.rows_written == 1 and report.texts_embedded == 1
    row = [r for r in stored(conn, table) if r[0] == "r2"][0]
    assert row[1] == "a corrected abstract"
    assert np.array_equal(row[2].to_numpy(), expected_vector("a corrected abstract", DIM))


def test_identical_texts_are_embedded_once(run, fake_server, conn, table):
    df = pd.DataFrame({"id": [f"d{i}" for i in range(30)], "text": ["same text"] * 30})
    report = run(df)
    assert report.texts_embedded == 1 and report.rows_written == 30
    assert fake_server.total_texts() == 1


def test_duplicate_ids_last_wins_before_postgres_sees_them(run, conn, table):
    df = pd.DataFrame({"id": ["a", "b", "a", "a"], "text": ["first", "bee", "second", "third"]})
    report = run(df)
    assert report.rows_duplicate == 2 and report.rows_written == 2
    assert {r[0]: r[1] for r in stored(conn, table)} == {"a": "third", "b": "bee"}


def test_empty_texts_are_never_sent_and_are_listed(run, fake_server, conn, table):
    df = pd.DataFrame({"id": ["ok", "none", "blank", "spaces"],
                       "text": ["real text", None, "", " \n\t "]})
    report = run(df)
    assert report.rows_empty == 3 and set(report.empty_ids) == {"none", "blank", "spaces"}
    assert fake_server.total_texts() == 1
    assert [b["input"] for b in fake_server.bodies] == [["real text"]]
    assert [r[0] for r in stored(conn, table)] == ["ok"]


def test_missing_column_names_the_columns_that_exist(run):
    from embed_helpers.errors import DataError
    with pytest.raises(DataError, match=r"'text'.*Columns that exist: id, body"):
        run(pd.DataFrame({"id": ["1"], "body": ["x"]}))


def test_rejected_texts_go_to_the_failures_file_and_the_rest_lands(run, fake_server, conn, table):
    df = frame(50)
    poison = {"abstract number 7", "abstract number 33"}
    fake_server.poison = poison
    report = run(df)
    assert report.rows_failed == 2 and report.rows_written == 48
    failures = [json.loads(line) for line in open(report.failures_path)]
    assert {f["id"] for f in failures} == {"r7", "r33"}
    assert all(f["reason"] for f in failures)
    assert len(stored(conn, table)) == 48


def test_flaky_server_every_row_lands(run, fake_server, conn, table):
    fake_server.rate_429, fake_server.rate_5xx, fake_server.retry_after_s = 0.2, 0.05, 0.001
    report = run(frame(200), EMBED_MAX_CONCURRENCY=4, EMBED_MAX_RETRIES=10)
    assert report.rows_written == 200 and report.rows_failed == 0 and report.retries > 0
    for row_id, text, vector in stored(conn, table):
        assert np.array_equal(vector.to_numpy(), expected_vector(text, DIM))


def test_second_run_into_a_new_table_is_served_by_the_cache(run, fake_server, conn, table):
    run(frame(60))
    with conn.cursor() as cur:
        cur.execute(f'TRUNCATE "{table}"')
    conn.commit()
    fake_server.reset()
    report = run(frame(60))
    assert report.cache_hits == 60 and report.cache_misses == 0 and report.cache_hit_rate == 1.0
    assert fake_server.total_requests() == 0
    assert len(stored(conn, table)) == 60


def test_model_change_misses_the_cache_and_switching_back_hits(run, fake_server, conn, table):
    run(frame(10), OLLAMA_EMBED_MODEL="model-a")
    for model, expect_hits in (("model-b", 0), ("model-a", 10)):
        with conn.cursor() as cur:
            cur.execute(f'TRUNCATE "{table}"')
        conn.commit()
        report = run(frame(10), OLLAMA_EMBED_MODEL=model)
        assert report.cache_hits == expect_hits


def test_cache_only_mode_sends_nothing_and_reports_misses_by_id(run, fake_server, conn, table):
    run(frame(5))
    fake_server.reset()
    report = run(frame(8), EMBED_CACHE_ONLY=1, EMBEDDING_DIM=DIM)
    assert fake_server.total_requests() == 0
    assert report.rows_failed == 3
    assert {json.loads(line)["id"] for line in open(report.failures_path)} == {"r5", "r6", "r7"}


def test_plan_counts_against_a_known_data_set(fake_server, make_settings, conn, table, run):
    run(frame(30))                        # 30 rows stored
    df = pd.concat([frame(30), frame(12, start=30),
                    pd.DataFrame({"id": ["e", "r31"], "text": ["  ", "abstract number 31"]})])
    settings = make_settings(EMBEDDING_BACKEND="ollama", OLLAMA_HOST=fake_server.url,
                             EMBED_BATCH_SIZE=5, EMBED_EXPECTED_TEXTS_PER_S=4, GPU_HOURLY_USD=3.6)
    fake_server.reset()
    with get_backend(settings) as backend:
        plan = plan_ingest(df, Target(table, "id", "text"), settings=settings, conn=conn,
                           backend=backend, cache=open_cache(settings), dim=DIM)
    figures = dict(plan.as_rows())
    assert figures["rows read"] == 44
    assert figures["rows with empty text (skipped)"] == 1
    assert figures["duplicate ids (last wins)"] == 1
    assert figures["rows already stored unchanged"] == 30
    assert figures["texts over the 2046-token window (estimated)"] == 0
    assert figures["texts to embed"] == 12
    assert figures["requests at batch size 5"] == 3
    assert figures["estimated embedding time"] == "3.0 s"
    assert figures["estimated cost at $3.6/h"] == "$0.0030"
    assert fake_server.total_requests() == 0  # planning costs nothing


def test_nul_bytes_are_reported_not_sent(run, conn, table):
    report = run(pd.DataFrame({"id": ["a", "b"], "text": ["fine", "bad\x00text"]}))
    assert report.rows_failed == 1 and report.rows_written == 1


def test_plan_probe_times_one_batch_and_keeps_its_vectors(fake_server, make_settings, conn,
                                                          table, run):
    settings = make_settings(EMBEDDING_BACKEND="ollama", OLLAMA_HOST=fake_server.url,
                             EMBED_BATCH_SIZE=10, GPU_HOURLY_USD=3.0)
    fake_server.poison = {"abstract number 3"}
    db.create_table(conn, table, "id", "text", DIM)
    with get_backend(settings) as backend:
        plan = plan_ingest(frame(25), Target(table, "id", "text"), settings=settings, conn=conn,
                           backend=backend, cache=open_cache(settings), dim=DIM, probe=True)
    assert plan.texts_per_s and plan.est_cost_usd is not None
    assert len(plan.cached) == 9 and len(plan.to_embed) == 16  # the poison text stays to embed
    fake_server.reset()
    report = run(frame(25))
    assert report.cache_hits == 9 and report.texts_embedded == 15 and report.rows_failed == 1


def test_legacy_ollama_vectors_are_keyed_by_the_legacy_route(run, fake_server, conn, table):
    fake_server.legacy_only = True
    report = run(frame(6), EMBEDDING_DIM=DIM)
    assert report.rows_written == 6
    vectors = {r[0]: r[2].to_numpy() for r in stored(conn, table)}
    assert np.allclose(vectors["r1"], expected_vector("abstract number 1", DIM, normalized=False))
    with conn.cursor() as cur:
        cur.execute(f'TRUNCATE "{table}"')
    conn.commit()
    fake_server.reset()
    again = run(frame(6), EMBEDDING_DIM=DIM)  # a new backend asks /api/version first
    assert again.rows_written == 6 and again.cache_hits == 6 and again.texts_embedded == 0
    assert again.route == "ollama:/api/embeddings" and fake_server.total_requests() == 0


def test_model_with_another_dimension_than_the_table_stops_before_writing(run, fake_server,
                                                                         conn, table):
    run(frame(3))
    fake_server.wrong_dim = 48
    from embed_helpers.errors import EmbeddingValidationError
    with pytest.raises(EmbeddingValidationError, match=r"48-dim.*existing table"):
        run(frame(3, start=10))
    assert len(stored(conn, table)) == 3
