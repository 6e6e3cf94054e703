"""Semantic search over a table and its chunks, and the HNSW index that speeds it up.

A row whose text was split is found by its best chunk, and the hit says which characters of
the row matched; other rows are found by their one vector.
"""
from __future__ import annotations

import logging

import numpy as np
from psycopg2 import sql

from .constants import INDEX_AUTO_MIN_ROWS, INDEX_MAINTENANCE_WORK_MEM, SEARCH_OVERFETCH
from .db import table_dimension
from .db_guard import guarded
from .errors import DataError
from .metadata import has_columns, where_sql
from .storage import column_storage, index_parts, query_cast, searched
from .table_names import regclass_text, table_ident, unqualified

log = logging.getLogger(__name__)

INDEX_POLICIES = ("auto", "always", "never")


@guarded("building the index on {table}")
def create_hnsw_index(conn, table: str, dim: int) -> bool:
    """Build the cosine HNSW index (and its chunks table's) after the bulk load; False
    when it already exists."""
    built = False
    for name in (table, f"{table}_chunks"):
        index = f"{name}_embedding_hnsw"
        if table_dimension(conn, name) is None:
            continue
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s)", (regclass_text(index),))  # in the table's schema
            if cur.fetchone()[0] is not None:
                conn.rollback()
                continue
            # halfvec is indexed as it is; a vector over 2,000 dimensions as a halfvec cast
            expr, ops = index_parts(column_storage(cur, name), dim)
            cur.execute(sql.SQL("SET LOCAL maintenance_work_mem = {m}").format(
                m=sql.Literal(INDEX_MAINTENANCE_WORK_MEM)))
            cur.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {n} ON {t} USING hnsw ({e} {ops})")
                        .format(n=unqualified(index), t=table_ident(name),
                                e=expr, ops=sql.SQL(ops)))
        conn.commit()
        built = built or name == table
    return built


@guarded("deciding on the index of {table}")
def index_decision(conn, table: str, policy: str) -> tuple[bool, str]:
    """(build it?, why) under EMBED_INDEX: always, never, or auto (from a row count on)."""
    if policy not in INDEX_POLICIES:
        raise ValueError(f"EMBED_INDEX must be one of {', '.join(INDEX_POLICIES)}, got {policy!r}")
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT count(*) FROM {t}").format(t=table_ident(table)))
        rows = cur.fetchone()[0]
    conn.rollback()
    if policy == "always":
        return True, f"EMBED_INDEX=always: building the HNSW index on {table} ({rows:,} rows)"
    if policy == "never":
        return False, f"EMBED_INDEX=never: no index on {table}; searches scan all {rows:,} rows"
    if rows >= INDEX_AUTO_MIN_ROWS:
        return True, (f"{table} has {rows:,} rows (EMBED_INDEX=auto builds from "
                      f"{INDEX_AUTO_MIN_ROWS:,}): building the HNSW index")
    return False, (f"{table} has {rows:,} rows, under the {INDEX_AUTO_MIN_ROWS:,} from which "
                   f"EMBED_INDEX=auto builds an HNSW index: an exact search is fast at this size "
                   f"(set EMBED_INDEX=always to build it anyway)")


@guarded("searching {table}")
def search(conn, table: str, id_col: str, text_col: str, query_vector: np.ndarray,
           k: int = 5, where: dict | None = None) -> list[tuple[str, float, str]]:
    """The k nearest rows by cosine similarity: (id, similarity, text of the best match).

    For a row split into chunks, the best chunk decides, and the text shown is that
    chunk's span of the row (first 400 characters). `where` keeps only rows whose kept
    columns match (`metadata.where_sql`).
    """
    return [(h[0], h[1], h[2]) for h in search_spans(conn, table, id_col, text_col,
                                                     query_vector, k, where)]


@guarded("searching {table}")
def search_spans(conn, table: str, id_col: str, text_col: str, query_vector: np.ndarray,
                 k: int = 5, where: dict | None = None
                 ) -> list[tuple[str, float, str, tuple[int, int] | None]]:
    """Like `search`, plus the character span that matched (None: the whole row)."""
    dim = len(query_vector)
    chunks = f"{table}_chunks"
    storage = column_storage(conn, table)  # the chunks table is of the row table's type
    names = dict(id=sql.Identifier(id_col), text=sql.Identifier(text_col),
                 t=table_ident(table), c=table_ident(chunks), e=searched(storage, dim),
                 q=query_cast(storage, dim), n=sql.Literal(k * SEARCH_OVERFETCH), k=sql.Literal(k))
    names["w"], params = _filter(conn, table, where)
    names["wc"] = sql.SQL("") if not where else sql.SQL(
        "WHERE EXISTS (SELECT 1 FROM {t} f WHERE f.{id} = {c}.{id}{w})").format(
        t=names["t"], id=names["id"], c=names["c"], w=_filter(conn, table, where, "f")[0])
    if table_dimension(conn, chunks) is None:
        # Materialized, then ordered: relaxed_order may return rows slightly out of order.
        query = sql.SQL("WITH hits AS MATERIALIZED (SELECT {id}, {e} <=> {q} AS d, "
                        "left({text}, 400) AS txt FROM {t} WHERE embedding IS NOT NULL{w} "
                        "ORDER BY {e} <=> {q} LIMIT {k}) "
                        "SELECT {id}, 1 - d, txt, NULL, NULL FROM hits ORDER BY d")
    else:
        query = sql.SQL(
            "WITH r AS (SELECT {id} AS id, {e} <=> {q} AS d FROM {t} WHERE embedding IS NOT NULL{w} "
            "           ORDER BY {e} <=> {q} LIMIT {n}), "
            "c AS (SELECT {id} AS id, char_start, char_end, {e} <=> {q} AS d FROM {c} {wc} "
            "      ORDER BY {e} <=> {q} LIMIT {n}), "
            "hits AS (SELECT id, NULL::int AS s, NULL::int AS e, d FROM r "
            "         WHERE NOT EXISTS (SELECT 1 FROM {c} WHERE {c}.{id} = r.id) "
            "         UNION ALL SELECT id, char_start, char_end, d FROM c), "
            "best AS (SELECT DISTINCT ON (id) id, s, e, d FROM hits ORDER BY id, d) "
            "SELECT b.id, 1 - b.d, left(CASE WHEN b.s IS NULL THEN t.{text} "
            "       ELSE substr(t.{text}, b.s + 1, b.e - b.s) END, 400), b.s, b.e "
            "FROM best b JOIN {t} t ON t.{id} = b.id ORDER BY b.d LIMIT {k}")
    vec = np.asarray(query_vector, dtype=np.float32)
    with conn.cursor() as cur:
        if where and _iterative_scans(cur):  # a selective filter still returns k rows
            cur.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
        cur.execute(query.format(**names), {"q": vec, **params})
        rows = [(r[0], round(float(r[1]), 4), r[2], None if r[3] is None else (r[3], r[4]))
                for r in cur.fetchall()]
    conn.rollback()
    return rows


def _filter(conn, table: str, where: dict | None, alias: str = "") -> tuple[sql.Composable, dict]:
    """The search's filter on kept columns; refused, saying why, on a table that has none."""
    if not where:
        return sql.SQL(""), {}
    if not has_columns(conn, table):
        raise DataError(f"{table} stores no metadata, so `where` cannot filter it: ingest with "
                        "KEEP_COLS (--keep-cols) naming the columns to filter on.")
    return where_sql(where, alias)


def _iterative_scans(cur) -> bool:
    """pgvector 0.8 continues an HNSW scan until enough rows pass the filter (iterative
    index scans); before 0.8 the setting does not exist and a scan stops at ef_search."""
    cur.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    row = cur.fetchone()
    return row is not None and tuple(int(p) for p in row[0].split(".")[:2]) >= (0, 8)
