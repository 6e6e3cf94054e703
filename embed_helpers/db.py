"""Thin, explicit SQL: connect, create the table, find unchanged rows, write, index, search.

Every write is keyed by row id and idempotent, so many workers can ingest shards
of one data set into one PostgreSQL at once and a rerun never duplicates rows.
"""
from __future__ import annotations

import io
import logging
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import psycopg2
from pgvector.psycopg2 import register_vector
from psycopg2 import sql
from psycopg2.extras import execute_values

from .config import Settings, mask_url
from .constants import HNSW_MAX_VECTOR_DIM, INDEX_MAINTENANCE_WORK_MEM, LOOKUP_CHUNK_IDS
from .errors import DataError

log = logging.getLogger(__name__)

STAGE_TABLE = "_embed_helpers_stage"
#: psycopg2 feeds COPY in chunks of this size; its 8 KB default means thousands of
#: Python calls per batch, each taking the GIL from the embedding threads.
COPY_BUFFER_BYTES = 1 << 20
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)


def connect(settings: Settings):
    """A connection with pgvector ready: DATABASE_URL, or the embedded server."""
    if settings.DATABASE_URL:
        url, where = str(settings.DATABASE_URL), mask_url(settings.DATABASE_URL)
    else:
        from .pg_embedded import embedded_uri
        url = embedded_uri(settings.EMBED_PGDATA)
        where = f"embedded PostgreSQL ({settings.EMBED_PGDATA})"
    try:
        conn = psycopg2.connect(url)
    except psycopg2.OperationalError as exc:
        raise DataError(f"Cannot connect to PostgreSQL at {where}: {str(exc).strip()}. "
                        "Check DATABASE_URL, or unset it to use the embedded server.") from None
    ensure_vector_extension(conn)
    register_vector(conn)
    log.info("connected to %s", where)
    return conn


def ensure_vector_extension(conn) -> None:
    """CREATE EXTENSION IF NOT EXISTS vector, safe when several workers race to it."""
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'")
        if cur.fetchone():
            conn.rollback()
            return
        try:
            cur.execute("CREATE EXTENSION IF NOT EXISTS vector")
            conn.commit()
        except psycopg2.errors.UniqueViolation:  # another worker created it meanwhile
            conn.rollback()


def server_info(conn) -> dict:
    """Where the server is, and its PostgreSQL and pgvector versions (Step 2)."""
    with conn.cursor() as cur:
        cur.execute("SELECT current_setting('server_version'), "
                    "(SELECT extversion FROM pg_extension WHERE extname = 'vector')")
        pg, vector = cur.fetchone()
    conn.rollback()
    info = conn.info
    embedded = info.host.startswith("/") and Path(info.host, "PG_VERSION").is_file()
    where = "embedded pgserver" if embedded else f"{info.host}:{info.port}/{info.dbname}"
    return {"server": where, "postgresql": pg, "pgvector": vector}


def table_dimension(conn, table: str) -> int | None:
    """The dimension of `table.embedding`, or None when the table does not exist."""
    with conn.cursor() as cur:
        cur.execute("SELECT a.atttypmod FROM pg_attribute a WHERE a.attrelid = to_regclass(%s) "
                    "AND a.attname = 'embedding' AND NOT a.attisdropped", (table,))
        row = cur.fetchone()
    conn.rollback()
    return row[0] if row and row[0] > 0 else None


def create_table(conn, table: str, id_col: str, text_col: str, dim: int) -> None:
    """CREATE TABLE IF NOT EXISTS, and refuse a table made for another dimension."""
    existing = table_dimension(conn, table)
    if existing is not None and existing != dim:
        raise DataError(f"Table {table} stores vectors of dimension {existing}, but the model "
                        f"gives {dim}. Use another TABLE_NAME (or --table), or drop the table "
                        "if its vectors came from another model.")
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {t} ({id} text PRIMARY KEY, "
                            "{text} text NOT NULL, embedding vector({dim}))").format(
            t=sql.Identifier(table), id=sql.Identifier(id_col), text=sql.Identifier(text_col),
            dim=sql.Literal(dim)))
    conn.commit()


def stored_text_hashes(conn, table: str, id_col: str, text_col: str,
                       ids: Sequence[str]) -> dict[str, str]:
    """md5 of the stored text for ids that already have a vector.

    Comparing md5 in SQL needs no extra column, so an existing table works as is.
    """
    found: dict[str, str] = {}
    query = sql.SQL("SELECT {id}, md5({text}) FROM {t} WHERE {id} = ANY(%s) "
                    "AND embedding IS NOT NULL").format(
        t=sql.Identifier(table), id=sql.Identifier(id_col), text=sql.Identifier(text_col))
    with conn.cursor() as cur:
        for start in range(0, len(ids), LOOKUP_CHUNK_IDS):
            cur.execute(query, (list(ids[start:start + LOOKUP_CHUNK_IDS]),))
            found.update(cur.fetchall())
    conn.rollback()
    return found


def _copy_payload(ids: Sequence[str], texts: Sequence[str], vectors: np.ndarray) -> bytes:
    """PostgreSQL binary COPY rows (id text, text text, embedding vector).

    Binary COPY skips turning every float into text: about 18x faster than
    `execute_values` on this kind of data (see GUIDE.md, "Writes").
    """
    dim = vectors.shape[1]
    big_endian = np.ascontiguousarray(vectors, dtype=">f4")
    vector_head = struct.pack(">ihh", 4 + 4 * dim, dim, 0)
    out = io.BytesIO()
    out.write(_COPY_HEADER)
    for i, (row_id, text) in enumerate(zip(ids, texts)):
        id_bytes, text_bytes = row_id.encode(), text.encode()
        out.write(struct.pack(">hi", 3, len(id_bytes)))
        out.write(id_bytes)
        out.write(struct.pack(">i", len(text_bytes)))
        out.write(text_bytes)
        out.write(vector_head)
        out.write(big_endian[i].tobytes())
    out.write(b"\xff\xff")
    return out.getvalue()


def write_rows(conn, table: str, id_col: str, text_col: str, ids: Sequence[str],
               texts: Sequence[str], vectors: np.ndarray, *, upsert: bool = True,
               method: str = "copy", assume_new: bool = False) -> int:
    """Write one batch and commit. Returns the number of rows sent.

    `method="copy"`: binary COPY into a temporary staging table, then one
    INSERT ... ON CONFLICT. With `assume_new` (no id of the batch was stored when the run
    was planned) the rows are copied straight into the table, about twice as fast; if
    another writer stored one of them meanwhile, the batch falls back to the upsert.
    `method="execute_values"`: the classic path. Ids must be unique within the batch.
    """
    if not len(ids):
        return 0
    names = dict(t=sql.Identifier(table), id=sql.Identifier(id_col), text=sql.Identifier(text_col))
    conflict = _conflict(upsert, id_col, text_col)
    with conn.cursor() as cur:
        if method == "copy":
            payload = _copy_payload(ids, texts, vectors)
            if assume_new and _copy_new_rows(conn, cur, table, id_col, text_col, payload):
                conn.commit()
                return len(ids)
            cur.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {s} (id text, txt text, "
                                "embedding vector) ON COMMIT DELETE ROWS").format(
                s=sql.Identifier(STAGE_TABLE)))
            cur.copy_expert(sql.SQL("COPY {s} FROM STDIN WITH (FORMAT binary)").format(
                s=sql.Identifier(STAGE_TABLE)).as_string(conn), io.BytesIO(payload),
                size=COPY_BUFFER_BYTES)
            cur.execute(sql.SQL("INSERT INTO {t} ({id}, {text}, embedding) "
                                "SELECT id, txt, embedding FROM {s} ").format(
                s=sql.Identifier(STAGE_TABLE), **names) + conflict)
        elif method == "execute_values":
            execute_values(cur, sql.SQL("INSERT INTO {t} ({id}, {text}, embedding) VALUES %s ")
                           .format(**names).as_string(conn) + conflict.as_string(conn),
                           list(zip(ids, texts, vectors)), page_size=len(ids))
        else:
            raise ValueError(f"unknown write method {method!r}: copy or execute_values")
    conn.commit()
    return len(ids)


def _copy_new_rows(conn, cur, table: str, id_col: str, text_col: str, payload: bytes) -> bool:
    """COPY straight into the table; False (nothing written) when an id already exists."""
    cur.execute("SAVEPOINT new_rows")
    try:
        copy = sql.SQL("COPY {t} ({id}, {text}, embedding) FROM STDIN WITH (FORMAT binary)").format(
            t=sql.Identifier(table), id=sql.Identifier(id_col), text=sql.Identifier(text_col))
        cur.copy_expert(copy.as_string(conn), io.BytesIO(payload), size=COPY_BUFFER_BYTES)
    except psycopg2.errors.UniqueViolation:
        cur.execute("ROLLBACK TO SAVEPOINT new_rows")  # another writer got there first
        return False
    cur.execute("RELEASE SAVEPOINT new_rows")
    return True


def _conflict(upsert: bool, id_col: str, text_col: str) -> sql.Composable:
    """ON CONFLICT clause: update (UPSERT on) or keep the stored row."""
    if not upsert:
        return sql.SQL("ON CONFLICT ({id}) DO NOTHING").format(id=sql.Identifier(id_col))
    return sql.SQL("ON CONFLICT ({id}) DO UPDATE SET {text} = EXCLUDED.{text}, "
                   "embedding = EXCLUDED.embedding").format(
        id=sql.Identifier(id_col), text=sql.Identifier(text_col))


def insert_one(conn, table: str, id_col: str, text_col: str, row_id: str, text: str,
               vector: np.ndarray) -> None:
    """Step 9's per-row write: one INSERT and one commit (kept as the slow baseline)."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("INSERT INTO {t} ({id}, {text}, embedding) VALUES (%s, %s, %s) ")
                    .format(t=sql.Identifier(table), id=sql.Identifier(id_col),
                            text=sql.Identifier(text_col)) + _conflict(True, id_col, text_col),
                    (row_id, text, np.asarray(vector, dtype=np.float32)))
    conn.commit()


def count_rows(conn, table: str) -> dict:
    """Rows, rows with a vector, and the distinct dimensions stored."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT count(*), count(embedding), "
                            "array_agg(DISTINCT vector_dims(embedding)) FROM {t}").format(
            t=sql.Identifier(table)))
        rows, with_vector, dims = cur.fetchone()
    conn.rollback()
    return {"rows": rows, "with_vector": with_vector, "dims": sorted(d for d in dims or [] if d)}


def _index_name(table: str) -> str:
    return f"{table}_embedding_hnsw"


def _vector_expr(dim: int) -> sql.Composable:
    # HNSW indexes `vector` up to 2,000 dimensions; above that, index a halfvec cast.
    if dim > HNSW_MAX_VECTOR_DIM:
        return sql.SQL("(embedding::halfvec({d}))").format(d=sql.Literal(dim))
    return sql.SQL("embedding")


def create_hnsw_index(conn, table: str, dim: int) -> bool:
    """Build the cosine HNSW index after the bulk load; False when it already exists."""
    name = _index_name(table)
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_indexes WHERE indexname = %s", (name,))
        if cur.fetchone():
            conn.rollback()
            return False
        ops = "halfvec_cosine_ops" if dim > HNSW_MAX_VECTOR_DIM else "vector_cosine_ops"
        cur.execute(sql.SQL("SET LOCAL maintenance_work_mem = {m}").format(
            m=sql.Literal(INDEX_MAINTENANCE_WORK_MEM)))
        cur.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {n} ON {t} USING hnsw ({e} {ops})").format(
            n=sql.Identifier(name), t=sql.Identifier(table), e=_vector_expr(dim), ops=sql.SQL(ops)))
    conn.commit()
    return True


def search(conn, table: str, id_col: str, text_col: str, query_vector: np.ndarray,
           k: int = 5) -> list[tuple[str, float, str]]:
    """Nearest rows by cosine distance: (id, similarity, text preview)."""
    dim = len(query_vector)
    expr = _vector_expr(dim)
    qcast = sql.SQL("%s::halfvec({d})").format(d=sql.Literal(dim)) if dim > HNSW_MAX_VECTOR_DIM \
        else sql.SQL("%s::vector")
    query = sql.SQL("SELECT {id}, 1 - ({e} <=> {q}), left({text}, 400) FROM {t} "
                    "WHERE embedding IS NOT NULL ORDER BY {e} <=> {q} LIMIT {k}").format(
        id=sql.Identifier(id_col), text=sql.Identifier(text_col), t=sql.Identifier(table),
        e=expr, q=qcast, k=sql.Literal(k))
    vec = np.asarray(query_vector, dtype=np.float32)
    with conn.cursor() as cur:
        cur.execute(query, (vec, vec))
        rows = [(r[0], round(float(r[1]), 4), r[2]) for r in cur.fetchall()]
    conn.rollback()
    return rows


def fetch_vectors(conn, table: str, id_col: str, ids: Iterable[str]) -> dict[str, np.ndarray]:
    """Stored vectors by id (for parity checks)."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT {id}, embedding FROM {t} WHERE {id} = ANY(%s)").format(
            id=sql.Identifier(id_col), t=sql.Identifier(table)), (list(ids),))
        rows = {r[0]: np.asarray(r[1].to_numpy(), dtype=np.float32) for r in cur.fetchall()}
    conn.rollback()
    return rows


def drop_table(conn, table: str) -> None:
    """DROP TABLE IF EXISTS (the notebook's RESET_TABLE)."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP TABLE IF EXISTS {t}").format(t=sql.Identifier(table)))
    conn.commit()
