"""The SQL layer against a real PostgreSQL: schema, both write paths, hashes, index, search."""
import numpy as np
import pytest

from embed_helpers import db
from embed_helpers.errors import DataError
from embed_helpers.plan import text_md5


def unit_vectors(n, dim, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("method", ["copy", "execute_values"])
def test_write_round_trip_is_exact_and_idempotent(conn, table, method):
    db.create_table(conn, table, "doc_id", "body", 8)
    ids, texts = ["a", "b", "ü-3"], ["alpha", "beta \t tab", "ünïcode ✓ text"]
    vectors = unit_vectors(3, 8)
    assert db.write_rows(conn, table, "doc_id", "body", ids, texts, vectors, method=method) == 3
    db.write_rows(conn, table, "doc_id", "body", ids, texts, vectors, method=method)
    assert db.count_rows(conn, table) == {"rows": 3, "with_vector": 3, "dims": [8]}
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
    assert db.stored_text_hashes(conn, table, "id", "text", ["x"]) == {"x": text_md5("new")}


def test_stored_hashes_match_python_md5(conn, table):
    db.create_table(conn, table, "id", "text", 4)
    texts = ["plain", "ünïcode ✓", "  spaced  "]
    db.write_rows(conn, table, "id", "text", ["1", "2", "3"], texts, unit_vectors(3, 4))
    hashes = db.stored_text_hashes(conn, table, "id", "text", ["1", "2", "3", "missing"])
    assert hashes == {str(i + 1): text_md5(t) for i, t in enumerate(texts)}


def test_table_for_another_dimension_is_refused(conn, table):
    db.create_table(conn, table, "id", "text", 4)
    db.create_table(conn, table, "id", "text", 4)  # same dimension: fine
    with pytest.raises(DataError, match=r"dimension 4, but the model gives 8.*TABLE_NAME"):
        db.create_table(conn, table, "id", "text", 8)


def test_index_built_once_and_search_finds_the_row(conn, table):
    db.create_table(conn, table, "id", "text", 16)
    vectors = unit_vectors(50, 16)
    db.write_rows(conn, table, "id", "text", [str(i) for i in range(50)],
                  [f"text {i}" for i in range(50)], vectors)
    assert db.create_hnsw_index(conn, table, 16) is True
    assert db.create_hnsw_index(conn, table, 16) is False
    hits = db.search(conn, table, "id", "text", vectors[7], k=3)
    assert hits[0][0] == "7" and hits[0][1] == pytest.approx(1.0, abs=1e-4)


def test_halfvec_index_above_2000_dimensions(conn, table):
    if tuple(int(x) for x in db.server_info(conn)["pgvector"].split(".")[:2]) < (0, 7):
        pytest.skip("pgvector < 0.7 has no halfvec")
    db.create_table(conn, table, "id", "text", 2048)
    vectors = unit_vectors(5, 2048)
    db.write_rows(conn, table, "id", "text", list("abcde"), list("abcde"), vectors)
    assert db.create_hnsw_index(conn, table, 2048)
    assert db.search(conn, table, "id", "text", vectors[2], k=1)[0][0] == "c"
