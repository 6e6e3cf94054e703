"""EMBED_STORAGE and EMBED_DIMENSIONS: what halfvec and shorter vectors cost in recall@10 and
save in bytes per row, on the shared PubMed retrieval set.

    .venv/bin/python bench/storage.py            # 1,500 abstracts, 500 queries
    .venv/bin/python bench/storage.py --quick    # 800 abstracts, 100 queries

The corpus is ../shared/data/pubmed_abstracts: `search_corpus_extra.csv` (each query's own
abstract, its objective removed) and `abstracts.csv` (distractors); a query is an abstract's
objective, its answer that abstract. The local backend (the bundled all-MiniLM-L6-v2, 384
dims, CPU) embeds the abstracts and the queries once, reading the first 254 tokens of each
(as EMBED_LONG_TEXTS=truncate does: one vector per row, so a row's bytes are its vector).
The 256- and 128-dim vectors are those first values renormalised, which is what
EMBED_DIMENSIONS makes the local backend do (sentence-transformers' truncate_dim:
tests/test_storage.py checks the two agree to 1e-6), so the model runs once. Each
configuration is written to a table of its own by `workflow.insert_rows` (binary COPY, in
halfvec's own format for halfvec) and searched with `retrieval.search` for every query, by an
exact scan and through the HNSW index. MiniLM was not trained for truncation (it is not a
Matryoshka model), so shorter vectors cost it more recall than they cost text-embedding-3 or
nomic-embed-text. Without the shared data it says so and stops. Database: bench/common.py.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import pandas as pd
from psycopg2 import sql

from common import SHARED_DATA, Workspace, print_header, print_table

from embed_helpers import retrieval
from embed_helpers.backends import get_backend
from embed_helpers.steps import Target
from embed_helpers.workflow import insert_rows

K = 10
BATCH = 64
FOLDER = SHARED_DATA / "pubmed_abstracts"
#: (EMBED_STORAGE, EMBED_DIMENSIONS): None is the model's full 384.
CONFIGS = [("vector", None), ("halfvec", None), ("vector", 256), ("halfvec", 256),
           ("vector", 128), ("halfvec", 128)]


def corpus(quick: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    answers = pd.read_csv(FOLDER / "search_corpus_extra.csv", dtype=str)
    others = pd.read_csv(FOLDER / "abstracts.csv", dtype=str)
    queries = pd.read_csv(FOLDER / "queries.csv", dtype=str)
    # Every query's own abstract, and distractors: all of abstracts.csv would triple the
    # embedding time (20 minutes on 2 busy cores) for the same comparison.
    others = others.head(300 if quick else 1000)
    if quick:
        answers, queries = answers.head(500), queries.head(100)
    return pd.concat([answers, others], ignore_index=True), queries


def sizes(conn, table: str) -> tuple[float, float, float]:
    """(mean pg_column_size of a vector, total bytes per row, index bytes per row)."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT avg(pg_column_size(embedding)), count(*), "
                            "pg_total_relation_size({r}), pg_indexes_size({r}) FROM {t}").format(
            t=sql.Identifier(table), r=sql.Literal(table)))
        column, rows, total, indexes = cur.fetchone()
        cur.execute("SELECT pg_relation_size(%s)", (f"{table}_embedding_hnsw",))
        hnsw = cur.fetchone()[0]
    conn.rollback()
    return float(column), total / rows, hnsw / rows


def recall(conn, table: str, vectors, answers: list[str]) -> float:
    hits = 0
    for vector, answer in zip(vectors, answers):
        found = [h[0] for h in retrieval.search(conn, table, "pmid", "text", vector, K)]
        hits += answer in found
    return hits / len(answers)


def embed(backend, texts) -> np.ndarray:
    texts = list(texts)
    return np.vstack([backend.embed_batch(texts[i:i + BATCH]) for i in range(0, len(texts), BATCH)])


def shortened(vectors: np.ndarray, dims: int | None) -> np.ndarray:
    """The first `dims` values, unit length again: what truncate_dim gives."""
    if not dims:
        return vectors
    cut = vectors[:, :dims]
    return (cut / np.linalg.norm(cut, axis=1, keepdims=True)).astype(np.float32)


def run(ws: Workspace, frame: pd.DataFrame, rows: np.ndarray, queries: pd.DataFrame,
        asked: np.ndarray, storage: str, dims: int | None) -> list:
    table = f"bench_storage_{storage}_{dims or 'full'}"
    ws.drop(table)
    vectors, query_vectors = shortened(rows, dims), shortened(asked, dims)
    start = time.perf_counter()
    written = insert_rows(ws.conn, Target(table, "pmid", "text"), frame["pmid"], frame["text"],
                          vectors, method="copy", storage=storage)
    wall = time.perf_counter() - start
    assert written == len(frame)
    answers = queries["pmid"].tolist()
    exact = recall(ws.conn, table, query_vectors, answers)
    retrieval.create_hnsw_index(ws.conn, table, vectors.shape[1])
    indexed = recall(ws.conn, table, query_vectors, answers)
    column, per_row, hnsw = sizes(ws.conn, table)
    ws.drop(table)
    return [f"{storage}({vectors.shape[1]})", f"{wall:.2f}", f"{exact:.3f}", f"{indexed:.3f}",
            f"{column:.0f}", f"{per_row:,.0f}", f"{hnsw:,.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="800 abstracts, 100 queries")
    args = parser.parse_args()
    if not (FOLDER / "queries.csv").is_file():
        print(f"{FOLDER} is absent: this benchmark needs the shared PubMed retrieval set "
              f"(queries with known answers); nothing was measured.")
        sys.exit(0)
    frame, queries = corpus(args.quick)
    with Workspace() as ws:
        print_header("Storage: vector versus halfvec, full width versus EMBED_DIMENSIONS", [
            f"data: {len(frame):,} abstracts of ../shared/data/pubmed_abstracts "
            f"(search_corpus_extra.csv + abstracts.csv), {len(queries)} queries (queries.csv)",
            ws.describe(), "backend: local (bundled all-MiniLM-L6-v2, 384 dims, CPU, not "
            "Matryoshka-trained), the first 254 tokens of each text"])
        start = time.perf_counter()
        with get_backend(ws.settings(EMBEDDING_BACKEND="local")) as backend:
            vectors, asked = embed(backend, frame["text"]), embed(backend, queries["query"])
        print(f"{len(frame) + len(queries):,} texts embedded once in "
              f"{time.perf_counter() - start:.0f} s\n")
        rows = [run(ws, frame, vectors, queries, asked, storage, dims)
                for storage, dims in CONFIGS]
    print(f"recall@{K}: the share of queries whose abstract is among the {K} results, by an "
          f"exact scan and through the HNSW index (m 16, ef_search 40: pgvector's defaults); "
          f"bytes: pg_column_size(embedding) averaged, pg_total_relation_size / rows (heap, "
          f"TOAST, primary key and HNSW index), and the HNSW index alone / rows.\n")
    print_table(["column", "write s", f"recall@{K} exact",
                 f"recall@{K} HNSW", "bytes per vector", "bytes per row, all", "HNSW bytes per row"],
                rows)


if __name__ == "__main__":
    main()
