"""KEEP_COLS: other columns of the input stored beside the vector (metadata jsonb), updated
alone without a request, and filtered on in searches, with an HNSW index and without."""
import csv

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fake_server import expected_vector

from embed_helpers import readers, retrieval
from embed_helpers.backends import get_backend
from embed_helpers.errors import DataError
from embed_helpers.steps import Target
from embed_helpers.workflow import ingest, open_cache, rows_of, semantic_search

DIM = 32
JOURNALS = ("BMJ", "Lancet", "JAMA")


def write(path, rows, header=("pmid", "text", "title", "year", "journal")):
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(header)
        out.writerows(rows)
    return path


def abstracts(n, rare=()):
    return [(f"p{i}", f"abstract {i} on trial {i % 7}", f"Title {i}",
             str(2000 + i % 20), "Rare" if i in rare else JOURNALS[i % 3]) for i in range(n)]


@pytest.fixture
def run(fake_server, make_settings, conn, table):
    def go(path, keep=("title", "year", "journal"), **overrides):
        settings = make_settings(EMBEDDING_BACKEND="ollama", OLLAMA_HOST=fake_server.url,
                                 EMBED_BATCH_SIZE=50, **overrides)
        target = Target(table, "pmid", "text", keep_cols=keep)
        columns = readers.read_columns(path, "pmid", "text", keep=keep, with_source=True)
        with get_backend(settings) as backend:
            return ingest(columns, target, settings=settings, conn=conn, backend=backend,
                          cache=open_cache(settings), progress=False,
                          scope=readers.source_labels(path))
    return go


def stored(conn, table):
    with conn.cursor() as cur:
        cur.execute(f'SELECT pmid, source, metadata FROM "{table}"')
        rows = {r[0]: (r[1], r[2]) for r in cur.fetchall()}
    conn.rollback()
    return rows


def test_kept_columns_are_stored_and_a_metadata_change_alone_sends_nothing(run, fake_server,
                                                                         conn, table, tmp_path):
    rows = abstracts(60)
    path = write(tmp_path / "abstracts.csv", rows)
    first = run(path)
    assert first.rows_written == 60
    assert stored(conn, table)["p7"] == ("abstracts.csv", {"title": "Title 7", "year": "2007",
                                                           "journal": "Lancet"})
    fake_server.reset()
    unchanged = run(path)
    assert unchanged.rows_unchanged == 60 and unchanged.sync["rows_metadata_updated"] == 0
    write(path, [r[:4] + ("NEJM",) if r[0] == "p7" else r for r in rows])
    report = run(path)
    assert fake_server.total_requests() == 0
    assert report.sync["rows_metadata_updated"] == 1 and report.rows_unchanged == 59
    assert report.rows_written == 0
    assert stored(conn, table)["p7"][1]["journal"] == "NEJM"
    assert "metadata updated: 1 rows (nothing embedded)" in report.summary_lines()


def test_a_kept_column_that_is_not_in_the_input_is_refused_with_the_columns(tmp_path, conn,
                                                                            table):
    path = write(tmp_path / "abstracts.csv", abstracts(3))
    with pytest.raises(DataError, match=r"'volume' to keep; its columns are: pmid, text, title"):
        readers.read_columns(path, "pmid", "text", keep=("volume",))
    frame = pd.DataFrame({"pmid": ["1"], "text": ["a"], "year": ["2020"]})  # the notebook's path
    with pytest.raises(DataError, match=r"'volume', not in the input. Columns that exist: pmid, "
                                        r"text, year"):
        rows_of(frame, Target(table, "pmid", "text", keep_cols=("year", "volume")))
    with pytest.raises(DataError, match="the id or text column"):
        Target(table, "pmid", "text", keep_cols=("text",))


def test_parquet_keeps_its_types(run, conn, table, tmp_path):
    path = tmp_path / "abstracts.parquet"
    pq.write_table(pa.table({"pmid": ["p1", "p2"], "text": ["one", "two"],
                             "year": [2019, 2020], "score": [0.5, None]}), path)
    run(path, keep=("year", "score"))
    assert stored(conn, table)["p2"] == ("abstracts.parquet", {"year": 2020, "score": None})


def selective(run, tmp_path, rare):
    path = write(tmp_path / "abstracts.csv", abstracts(300, rare=rare))
    run(path)
    return expected_vector("abstract 0 on trial 0", DIM)


@pytest.mark.parametrize("index", [False, True])
def test_a_filtered_search_returns_only_matching_rows_and_k_of_them(run, conn, table, tmp_path,
                                                                    index):
    rare = set(range(5, 300, 25))  # 12 of 300 rows: a plain HNSW scan (ef_search 40) sees ~2
    query = selective(run, tmp_path, rare)
    if index:
        assert retrieval.create_hnsw_index(conn, table, DIM)
        with conn.cursor() as cur:  # small table: make the planner take the index
            cur.execute("SET enable_seqscan = off")
        conn.commit()
    try:
        hits = retrieval.search(conn, table, "pmid", "text", query, 10, where={"journal": "Rare"})
        assert len(hits) == 10 and {h[0] for h in hits} <= {f"p{i}" for i in rare}
        assert [h[1] for h in hits] == sorted((h[1] for h in hits), reverse=True)
        years = retrieval.search(conn, table, "pmid", "text", query, 5,
                                 where={"year": [2001, 2002], "journal": "BMJ"})
        assert years and all(int(h[0][1:]) % 20 in (1, 2) and int(h[0][1:]) % 3 == 0
                             for h in years)
        if index:  # what the filter would give without iterative scans: fewer than k
            with conn.cursor() as cur:
                cur.execute("SET LOCAL hnsw.iterative_scan = off")
                cur.execute(f"SELECT pmid FROM \"{table}\" WHERE metadata->>'journal' = 'Rare' "
                            "ORDER BY embedding <=> %s::vector LIMIT 10", (query,))
                assert len(cur.fetchall()) < 10
                cur.execute(f'EXPLAIN SELECT pmid FROM "{table}" ORDER BY embedding <=> %s::vector '
                            "LIMIT 10", (query,))
                assert "hnsw" in " ".join(r[0] for r in cur.fetchall())
            conn.rollback()
    finally:
        with conn.cursor() as cur:
            cur.execute("RESET enable_seqscan")
        conn.commit()


def test_semantic_search_filters_and_a_table_without_metadata_says_why(run, fake_server, conn,
                                                                       table, tmp_path,
                                                                       make_settings):
    selective(run, tmp_path, rare={3})
    settings = make_settings(EMBEDDING_BACKEND="ollama", OLLAMA_HOST=fake_server.url)
    target = Target(table, "pmid", "text")
    with get_backend(settings) as backend:
        hits = semantic_search(conn, backend, target, "abstract 3", 3, where={"journal": "Rare"})
        assert [h[0] for h in hits] == ["p3"]
        with conn.cursor() as cur:
            cur.execute(f'ALTER TABLE "{table}" DROP COLUMN metadata')
        conn.commit()
        with pytest.raises(DataError, match="KEEP_COLS"):
            semantic_search(conn, backend, target, "abstract 3", 3, where={"journal": "Rare"})
