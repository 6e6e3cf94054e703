"""Long texts through Step 9b and Step 9: chunks stored and searchable, nothing paid twice,
an edited row re-embeds only its changed chunks, token budgets kept, the policies honoured."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from fake_server import expected_vector

from embed_helpers import db, retrieval
from embed_helpers.backends import get_backend
from embed_helpers.steps import Target
from embed_helpers.pieces import mean_vector
from embed_helpers.per_row import ingest_per_row, parity_check
from embed_helpers.workflow import ingest, open_cache

DIM = 32
WINDOW = 60  # EMBED_MAX_INPUT_TOKENS: the fake server's model "reads" 58 tokens (2 for specials)


def sentence(i: int, n: int) -> str:
    return f"Sentence {n} of record {i} reports a finding about visit {n % 5} and its follow-up."


def record(i: int, sentences: int) -> str:
    return " ".join(sentence(i, n) for n in range(sentences))


def frame(long_rows=4, short_rows=6):
    rows = [(f"long{i}", record(i, 12)) for i in range(long_rows)]
    rows += [(f"short{i}", f"a short note number {i}") for i in range(short_rows)]
    return pd.DataFrame(rows, columns=["id", "text"])


@pytest.fixture
def settings(fake_server, make_settings):
    def make(**extra):
        values = dict(EMBEDDING_BACKEND="ollama", OLLAMA_HOST=fake_server.url, EMBED_BATCH_SIZE=8,
                      EMBED_MAX_INPUT_TOKENS=WINDOW, EMBED_CHUNK_OVERLAP=8)
        values.update(extra)
        return make_settings(**values)
    return make


def run(df, table, settings, conn):
    with get_backend(settings) as backend:
        return ingest(df, Target(table, "id", "text"), settings=settings, conn=conn,
                      backend=backend, cache=open_cache(settings), progress=False)


def chunks_of(conn, table, row_id):
    with conn.cursor() as cur:
        cur.execute(f'SELECT chunk, char_start, char_end, embedding FROM "{table}_chunks" '
                    f"WHERE id = %s ORDER BY chunk", (row_id,))
        rows = cur.fetchall()
    conn.rollback()
    return rows


def test_long_rows_are_chunked_stored_and_paid_once(settings, fake_server, conn, table):
    s = settings()
    report = run(frame(), table, s, conn)
    assert report.rows_written == 10 and report.long_texts["over"] == 4
    assert db.count_rows(conn, table)["chunks"] == report.chunks_written == report.long_texts["chunks"]
    text = record(0, 12)
    chunks = chunks_of(conn, table, "long0")
    assert len(chunks) >= 3 and chunks[0][1] == 0 and chunks[-1][2] == len(text)
    pieces = [text[start:end] for _k, start, end, _v in chunks]
    for (_k, _s, _e, vector), piece in zip(chunks, pieces):  # every chunk is what was sent
        np.testing.assert_array_equal(vector.to_numpy(), expected_vector(piece, DIM))
    stored = db.fetch_vectors(conn, table, "id", ["long0", "short0"])
    np.testing.assert_allclose(stored["long0"], mean_vector(np.stack(
        [expected_vector(p, DIM) for p in pieces])), atol=1e-6)
    np.testing.assert_array_equal(stored["short0"], expected_vector("a short note number 0", DIM))
    sent = [t for b in fake_server.bodies for t in b["input"]]
    assert len(sent) == len(set(sent)) and text not in sent  # each piece once, no whole long text
    fake_server.reset()
    again = run(frame(), table, s, conn)
    assert again.rows_unchanged == 10 and fake_server.total_requests() == 0


def test_editing_one_row_re_embeds_only_its_changed_chunks(settings, fake_server, conn, table):
    s = settings()
    run(frame(), table, s, conn)
    before = {t for b in fake_server.bodies for t in b["input"]}
    df = frame()
    edited = record(2, 12).replace("Sentence 11 of record 2", "The last sentence of record 2, edited,")
    df.loc[df.id == "long2", "text"] = edited
    fake_server.reset()
    report = run(df, table, s, conn)
    sent = [t for b in fake_server.bodies for t in b["input"]]
    changed = [edited[start:end] for _k, start, end, _v in chunks_of(conn, table, "long2")]
    assert report.rows_written == 1 and report.rows_unchanged == 9
    assert sent and set(sent) == {c for c in changed if c not in before}
    assert len(sent) < len(changed)  # the unchanged chunks came from the cache


def test_search_finds_a_long_row_by_its_best_chunk(settings, conn, table, fake_server):
    s = settings()
    run(frame(), table, s, conn)
    text = record(3, 12)
    piece = chunks_of(conn, table, "long3")[-1]
    query = text[piece[1]:piece[2]]
    hit = retrieval.search_spans(conn, table, "id", "text", expected_vector(query, DIM), k=1)[0]
    assert hit[0] == "long3" and hit[1] == pytest.approx(1.0, abs=1e-5)
    assert hit[3] == (piece[1], piece[2]) and hit[2] == query[:400]


def test_request_token_budget_is_kept_and_every_row_lands(fake_server, make_settings, conn, table):
    fake_server.max_tokens_per_request = 600
    s = make_settings(EMBEDDING_BACKEND="llm_api", OPENAI_BASE_URL=fake_server.openai_url,
                      EMBED_BATCH_SIZE=64,
                      EMBED_MAX_TOKENS_PER_REQUEST=600)
    df = pd.DataFrame({"id": [f"b{i}" for i in range(120)],
                       "text": [record(i, 3) for i in range(120)]})
    report = run(df, table, s, conn)
    assert report.rows_written == 120 and report.rows_failed == 0
    assert max(fake_server.tokens_per_request) <= 600 and 400 not in fake_server.statuses
    assert fake_server.total_texts() == 120


def test_fail_lists_long_rows_and_truncate_cuts_them(settings, fake_server, conn, table):
    failed = run(frame(), table, settings(EMBED_LONG_TEXTS="fail"), conn)
    assert failed.rows_failed == 4 and failed.rows_written == 6
    listed = [json.loads(line) for line in open(failed.failures_path)]
    assert sorted(f["id"] for f in listed) == [f"long{i}" for i in range(4)]
    assert all("EMBED_LONG_TEXTS=fail" in f["reason"] for f in listed)
    assert not any(t.startswith("Sentence") for b in fake_server.bodies for t in b["input"])
    other = table + "_cut"
    try:
        cut = run(frame(), other, settings(EMBED_LONG_TEXTS="truncate"), conn)
        assert cut.rows_written == 10 and cut.chunks_written == 0 and cut.long_texts["over"] == 4
        assert "CUT" in "\n".join(cut.summary_lines())
    finally:
        db.drop_table(conn, other)


def test_step_9_prepares_long_rows_as_step_9b_does(settings, conn, table, fake_server):
    s = settings()
    run(frame(), table, s, conn)
    target = Target(table, "id", "text")
    per_row = table + "_step9"
    try:
        with get_backend(s) as backend:
            step9 = ingest_per_row(frame(), Target(per_row, "id", "text"), settings=s,
                                   conn=conn, backend=backend, progress=False)
            check = parity_check(conn, backend, frame(), target, s)
        assert step9.rows_written == 10
        a = db.fetch_vectors(conn, table, "id", frame().id)
        b = db.fetch_vectors(conn, per_row, "id", frame().id)
        for row_id in a:
            np.testing.assert_allclose(a[row_id], b[row_id], atol=1e-6)
        assert db.count_rows(conn, per_row)["chunks"] == db.count_rows(conn, table)["chunks"]
        assert check["same_vectors"] and check["same_top3"]
    finally:
        db.drop_table(conn, per_row)
