"""The SQL layer against a real PostgreSQL: schema, both write paths, chunks, stored state,
index and search (embed_helpers.retrieval)."""
import threading
import uuid

import numpy as np
import pytest

from embed_helpers import db, retrieval
from embed_helpers.constants import INDEX_AUTO_MIN_ROWS
from embed_helpers.steps import text_md5
from embed_helpers.errors import DataError

LONG = "First part of a long text. Second part of it. Third and last part."


def unit_vectors(n, dim, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def spans_of(text):
    """Character spans of the sentences of `text` (the chunks of a split row)."""
    out, start = [], 0
    for end in [i + 1 for i, ch in enumerate(text) if ch == "."]:
        out.append((start, end))
        start = end + 1
    return out


def chunk_rows(row_id, spans, seed=0):
    vectors = unit_vectors(len(spans), 8, seed)
    return [(row_id, k, s, e, vectors[k]) for k, (s, e) in enumerate(spans)]


def stored_chunks(conn, table, id_col="id"):
    with conn.cursor() as cur:
        cur.execute(f'SELECT "{id_col}", chunk, char_start, char_end FROM "{table}_chunks" '
                    "ORDER BY 1, 2")
        rows = cur.fetchall()
    conn.rollback()
    return rows


def regclass(conn, name):
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)::text", (name,))
        found = cur.fetchone()[0]
    conn.rollback()
    return found


@pytest.mark.parametrize("method", ["copy", "execute_values"])
def test_write_round_trip_is_exact_and_idempotent(conn, table, method):
    db.create_table(conn, table, "doc_id", "body", 8)
    ids, texts = ["a", "b", "ü-3"], ["alpha", "beta \t tab", "ünïcode ✓ text"]
    vectors = unit_vectors(3, 8)
    assert db.write_rows(conn, table, "doc_id", "body", ids, texts, vectors, method=method) == 3
    db.write_rows(conn, table, "doc_id", "body", ids, texts, vectors, method=method)
    assert db.count_rows(conn, table) == {"rows": 3, "with_vector": 3, "dims": [8], "chunks": 0}
    stored = db.fetch_vectors(conn, table, "doc_id", ids)
    for i, row_id in enumerate(ids):
        assert np.array_equal(stored[row_id], vectors[i])  # float32 survives exactly


def test_upsert_updates_and_upsert_off_keeps(conn, table):
    db.create_table(conn, table, "id", "text", 4)
    first, second = unit_vectors(1, 4, 1), unit_vectors(1, 4, 2)
    db.write_rows(conn, table, "id", "text", ["x"], ["old"], first)
    db.write_rows(conn, table, "id", "text", ["x"], ["new"], second, upsert=False)
    assert np.array_equal(db.fetch_vectors(conn, table, "id", ["x"])["x"], first[0])
    db.write_rows(conn, table, "id", "text", ["x"], ["new"], second, upsert=True)
    assert np.array_equal(db.fetch_vectors(conn, table, "id", ["x"])["x"], second[0])
    state = db.stored_state(conn, table, "id", "text", f"{table}_chunks", ["x"])
    assert state == {"x": (text_md5("new"), False)}


def test_stored_state_hashes_match_python_md5(conn, table):
    db.create_table(conn, table, "id", "text", 4)
    texts = ["plain", "ünïcode ✓", "  spaced  "]
    db.write_rows(conn, table, "id", "text", ["1", "2", "3"], texts, unit_vectors(3, 4))
    state = db.stored_state(conn, table, "id", "text", f"{table}_chunks",
                            ["1", "2", "3", "missing"])
    assert state == {str(i + 1): (text_md5(t), False) for i, t in enumerate(texts)}
    assert db.stored_state(conn, f"{table}_absent", "id", "text", "nope", ["1"]) == {}


def test_table_for_another_dimension_is_refused(conn, table):
    db.create_table(conn, table, "id", "text", 4)
    db.create_table(conn, table, "id", "text", 4)  # same dimension: fine
    db.write_rows(conn, table, "id", "text", ["a"], ["x"], unit_vectors(1, 4))
    with pytest.raises(DataError, match=r"dimension 4, but the model gives 8.*TABLE_NAME"):
        db.create_table(conn, table, "id", "text", 8)
    assert db.table_dimension(conn, table) == 4 and db.count_rows(conn, table)["rows"] == 1


def test_an_empty_table_of_another_dimension_is_made_again(conn, table):
    """A run stopped at its first batch by a wrong EMBEDDING_DIM left an empty table: the
    corrected rerun must not be blocked by it (it holds nothing to lose)."""
    db.create_table(conn, table, "id", "text", 4)
    db.create_table(conn, table, "id", "text", 8)
    assert db.table_dimension(conn, table) == 8


def test_concurrent_create_table_of_one_new_name_does_not_fail(conn, table, make_settings):
    """Worker A's CREATE TABLE is in flight (uncommitted) when worker B's create_table
    starts: B waits on A's catalogue rows, then sees A's table instead of failing."""
    other = db.connect(make_settings())
    errors = []
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE TABLE IF NOT EXISTS "{table}" (id text PRIMARY KEY, '
                        "text text NOT NULL, embedding vector(4))")

        def worker():
            try:
                db.create_table(other, table, "id", "text", 4)
            except Exception as exc:  # reported below, with its type
                errors.append(exc)
        thread = threading.Thread(target=worker)
        thread.start()
        pid, blocked = other.get_backend_pid(), False
        with conn.cursor() as cur:  # wait until B is blocked on A's uncommitted catalogue rows
            for _ in range(400):
                cur.execute("SELECT pg_stat_clear_snapshot()")  # else one view per transaction
                cur.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,))
                blocked = (cur.fetchone() or [None])[0] == "Lock"
                if blocked or not thread.is_alive():
                    break
                threading.Event().wait(0.05)
        assert blocked  # B really raced A's CREATE
        conn.commit()  # A's table appears; B's CREATE now collides with it
        thread.join(timeout=60)
        assert not thread.is_alive() and errors == []
        assert db.table_dimension(other, table) == 4
        # and two create_table calls started together on another new name
        name, barrier = f"{table}_b", threading.Barrier(2)

        def racer(c):
            barrier.wait()
            try:
                db.create_table(c, name, "id", "text", 4)
            except Exception as exc:
                errors.append(exc)
        threads = [threading.Thread(target=racer, args=(c,)) for c in (conn, other)]
        [t.start() for t in threads]
        [t.join(timeout=60) for t in threads]
        assert errors == [] and db.table_dimension(conn, name) == 4
    finally:
        other.close()
        conn.rollback()
        db.drop_table(conn, f"{table}_b")


# ---- chunks of long rows ---------------------------------------------------------------------

def test_chunks_written_replaced_and_dropped_when_row_becomes_short(conn, table):
    chunks_table = f"{table}_chunks"
    db.create_table(conn, table, "id", "text", 8)
    two = LONG[:LONG.index(" Third")]
    db.write_rows(conn, table, "id", "text", ["long", "short"], [two, "short"],
                  unit_vectors(2, 8), chunks=chunk_rows("long", spans_of(two)),
                  chunks_table=chunks_table)
    assert regclass(conn, chunks_table) == chunks_table
    assert stored_chunks(conn, table) == [("long", 0, 0, 26), ("long", 1, 27, 45)]
    assert db.count_rows(conn, table)["chunks"] == 2
    state = db.stored_state(conn, table, "id", "text", chunks_table, ["long", "short"])
    assert state == {"long": (text_md5(two), True), "short": (text_md5("short"), False)}
    # rewritten with three chunks: the two old ones are gone
    db.write_rows(conn, table, "id", "text", ["long"], [LONG], unit_vectors(1, 8, 3),
                  chunks=chunk_rows("long", spans_of(LONG), 4), chunks_table=chunks_table)
    assert [c[1:] for c in stored_chunks(conn, table)] == [(k, *s) for k, s in
                                                           enumerate(spans_of(LONG))]
    # the row becomes short: it keeps no chunk
    db.write_rows(conn, table, "id", "text", ["long"], ["now short"], unit_vectors(1, 8, 5),
                  chunks_table=chunks_table)
    assert stored_chunks(conn, table) == [] and db.count_rows(conn, table)["chunks"] == 0
    assert db.stored_state(conn, table, "id", "text", chunks_table, ["long"]) == \
        {"long": (text_md5("now short"), False)}


@pytest.mark.parametrize("method", ["copy", "execute_values"])
def test_upsert_off_keeps_a_stored_rows_chunks(conn, table, method):
    chunks_table = f"{table}_chunks"
    db.create_table(conn, table, "id", "text", 8)
    db.write_rows(conn, table, "id", "text", ["x"], [LONG], unit_vectors(1, 8),
                  chunks=chunk_rows("x", spans_of(LONG)), chunks_table=chunks_table)
    before = stored_chunks(conn, table)
    other = LONG.replace("First", "Other")
    db.write_rows(conn, table, "id", "text", ["x", "y"], [other, other], unit_vectors(2, 8, 1),
                  chunks=chunk_rows("x", spans_of(other)[:2]) + chunk_rows("y", spans_of(other)),
                  chunks_table=chunks_table, upsert=False, method=method)
    assert [c for c in stored_chunks(conn, table) if c[0] == "x"] == before  # kept as stored
    assert len([c for c in stored_chunks(conn, table) if c[0] == "y"]) == 3  # the new row's
    assert db.stored_state(conn, table, "id", "text", chunks_table, ["x"])["x"][0] == \
        text_md5(LONG)


def test_drop_table_drops_its_chunks_table(conn, table):
    db.create_table(conn, table, "id", "text", 8)
    db.write_rows(conn, table, "id", "text", ["x"], [LONG], unit_vectors(1, 8),
                  chunks=chunk_rows("x", spans_of(LONG)), chunks_table=f"{table}_chunks")
    db.drop_table(conn, table)
    assert regclass(conn, table) is None and regclass(conn, f"{table}_chunks") is None


# ---- retrieval: search and the index ---------------------------------------------------------

def test_index_built_once_and_search_finds_the_row(conn, table):
    db.create_table(conn, table, "id", "text", 16)
    vectors = unit_vectors(50, 16)
    db.write_rows(conn, table, "id", "text", [str(i) for i in range(50)],
                  [f"text {i}" for i in range(50)], vectors)
    assert retrieval.create_hnsw_index(conn, table, 16) is True
    assert retrieval.create_hnsw_index(conn, table, 16) is False
    hits = retrieval.search(conn, table, "id", "text", vectors[7], k=3)
    assert hits[0][0] == "7" and hits[0][1] == pytest.approx(1.0, abs=1e-4)
    assert hits[0][2] == "text 7"
    assert retrieval.search_spans(conn, table, "id", "text", vectors[7], k=1)[0][3] is None


def test_search_ranks_a_split_row_by_its_best_chunk_and_shows_its_span(conn, table):
    e = np.eye(8, dtype=np.float32)
    near = 0.9 * e[1] + np.sqrt(1 - 0.81).astype(np.float32) * e[2]
    spans = spans_of(LONG)
    row_vector = (e[0] + e[1] + e[4]) / np.sqrt(3)  # the mean: 0.577 to the query
    db.create_table(conn, table, "id", "text", 8)
    db.write_rows(conn, table, "id", "text", ["long", "near", "far"], [LONG, "near", "far"],
                  np.stack([row_vector, near, e[3]]).astype(np.float32),
                  chunks=[("long", k, *spans[k], v) for k, v in enumerate((e[0], e[1], e[4]))],
                  chunks_table=f"{table}_chunks")
    query = e[1]  # what the second chunk says
    hits = retrieval.search(conn, table, "id", "text", query, k=2)
    assert [h[0] for h in hits] == ["long", "near"]  # by row vectors "near" would come first
    assert hits[0][1] == pytest.approx(1.0, abs=1e-4) and hits[1][1] == pytest.approx(0.9, 1e-3)
    assert hits[0][2] == "Second part of it." == LONG[slice(*spans[1])]
    assert hits[1][2] == "near"
    full = retrieval.search_spans(conn, table, "id", "text", query, k=3)
    assert [(h[0], h[3]) for h in full] == [("long", spans[1]), ("near", None), ("far", None)]


def test_index_decision_auto_always_never(conn, table):
    db.create_table(conn, table, "id", "text", 2)
    db.write_rows(conn, table, "id", "text", list("abcde"), list("abcde"), unit_vectors(5, 2))
    build, why = retrieval.index_decision(conn, table, "auto")
    assert build is False and "5 rows" in why and f"{INDEX_AUTO_MIN_ROWS:,}" in why
    assert "EMBED_INDEX=always" in why  # says how to build it anyway
    build, why = retrieval.index_decision(conn, table, "always")
    assert build is True and "EMBED_INDEX=always" in why
    build, why = retrieval.index_decision(conn, table, "never")
    assert build is False and "EMBED_INDEX=never" in why and "5 rows" in why
    with pytest.raises(ValueError, match="EMBED_INDEX"):
        retrieval.index_decision(conn, table, "sometimes")


def test_index_decision_auto_builds_from_the_threshold(conn, table):
    n = INDEX_AUTO_MIN_ROWS
    db.create_table(conn, table, "id", "text", 2)
    db.write_rows(conn, table, "id", "text", [str(i) for i in range(n)], ["t"] * n,
                  unit_vectors(n, 2))
    build, why = retrieval.index_decision(conn, table, "auto")
    assert build is True and f"{n:,} rows" in why and "EMBED_INDEX=auto" in why


def test_index_covers_the_chunks_table_too(conn, table):
    db.create_table(conn, table, "id", "text", 8)
    db.write_rows(conn, table, "id", "text", ["x"], [LONG], unit_vectors(1, 8),
                  chunks=chunk_rows("x", spans_of(LONG)), chunks_table=f"{table}_chunks")
    assert retrieval.create_hnsw_index(conn, table, 8) is True
    assert regclass(conn, f"{table}_embedding_hnsw") == f"{table}_embedding_hnsw"
    assert regclass(conn, f"{table}_chunks_embedding_hnsw") == f"{table}_chunks_embedding_hnsw"
    assert retrieval.create_hnsw_index(conn, table, 8) is False


def test_index_of_the_same_name_in_another_schema_does_not_stop_ours(conn, table):
    schema = f"other_{uuid.uuid4().hex[:8]}"
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE SCHEMA "{schema}"')
            cur.execute(f'CREATE TABLE "{schema}"."{table}" (embedding vector(4))')
            cur.execute(f'CREATE INDEX "{table}_embedding_hnsw" ON "{schema}"."{table}" '
                        "USING hnsw (embedding vector_cosine_ops)")
        conn.commit()
        db.create_table(conn, table, "id", "text", 4)
        db.write_rows(conn, table, "id", "text", ["a"], ["a"], unit_vectors(1, 4))
        assert retrieval.create_hnsw_index(conn, table, 4) is True
        assert regclass(conn, f"public.{table}_embedding_hnsw") == f"{table}_embedding_hnsw"
    finally:
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        conn.commit()


def test_halfvec_index_above_2000_dimensions(conn, table):
    if tuple(int(x) for x in db.server_info(conn)["pgvector"].split(".")[:2]) < (0, 7):
        pytest.skip("pgvector < 0.7 has no halfvec")
    db.create_table(conn, table, "id", "text", 2048)
    vectors = unit_vectors(5, 2048)
    db.write_rows(conn, table, "id", "text", list("abcde"), list("abcde"), vectors)
    assert retrieval.create_hnsw_index(conn, table, 2048)
    assert retrieval.search(conn, table, "id", "text", vectors[2], k=1)[0][0] == "c"
