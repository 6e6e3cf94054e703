"""Thin, explicit SQL: connect, create tables, find unchanged rows, write.

Every write is keyed by row id and idempotent, so many workers can ingest shards of one
data set into one PostgreSQL at once and a rerun never duplicates rows. Every function
passes `db_guard.guarded`: a server that fails or goes away becomes a `DatabaseError`
that says what to do. Search and the index are in `retrieval`."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import psycopg2
from pgvector.psycopg2 import register_vector
from psycopg2 import sql
from psycopg2.extras import execute_values

from .config import Settings, mask_url
from .constants import LOOKUP_CHUNK_IDS
from .copy_format import chunks_payload, copy_new_rows, copy_rows, create_stage, rows_payload
from .db_guard import EXTERNAL, check_once, create_racing, guarded
from .errors import DatabaseError, DataError
from .printing import dsn_problem, without_password
from .storage import check_table, column_sql, column_storage
from .table_names import check_schema, regclass_text, table_ident

log = logging.getLogger(__name__)


def connect(settings: Settings):
    """A connection with pgvector ready: DATABASE_URL, or the embedded server (checked
    once per data folder: see `db_guard.check_once`)."""
    pgdata = None
    if settings.DATABASE_URL:
        url, where = str(settings.DATABASE_URL), mask_url(settings.DATABASE_URL)
    else:
        from .pg_embedded import embedded_uri
        pgdata = Path(settings.EMBED_PGDATA)
        url = embedded_uri(pgdata)
        where = f"embedded PostgreSQL ({settings.EMBED_PGDATA})"
    problem = dsn_problem(url)
    if problem:  # libpq's own message would quote part of the password
        raise DatabaseError(f"Cannot connect to PostgreSQL at {where}: {problem}. Fix "
                            "DATABASE_URL (or EMBED_CACHE_URL), or unset it to use the "
                            "embedded server.")
    try:
        conn = psycopg2.connect(url, application_name="embed_helpers")
    except (psycopg2.OperationalError, psycopg2.ProgrammingError) as exc:
        raise DatabaseError(f"Cannot connect to PostgreSQL at {where}: "
                            f"{without_password(str(exc).strip(), url)}. Check DATABASE_URL, "
                            "or unset it to use the embedded server.") from None
    ensure_vector_extension(conn)
    register_vector(conn)
    conn.rollback()  # register_vector's lookup left a transaction open
    if pgdata is not None:
        check_once(conn, pgdata)
    log.info("connected to %s", where)
    return conn


@guarded("creating the vector extension")
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
        except psycopg2.errors.FeatureNotSupported as exc:
            conn.rollback()
            raise DatabaseError(f"This PostgreSQL has no pgvector ({str(exc).strip()}). "
                                f"{EXTERNAL}.") from None


@guarded("asking the server for its versions")
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


@guarded("reading the dimension of {table}")
def table_dimension(conn, table: str) -> int | None:  # None: no such table
    with conn.cursor() as cur:
        cur.execute("SELECT a.atttypmod FROM pg_attribute a WHERE a.attrelid = to_regclass(%s) "
                    "AND a.attname = 'embedding' AND NOT a.attisdropped", (regclass_text(table),))
        row = cur.fetchone()
    conn.rollback()
    if row is None:
        check_schema(conn, table)  # s1.docs: s1 must exist (we do not create schemas)
    return row[0] if row and row[0] > 0 else None


@guarded("creating {table}")
def create_table(conn, table: str, id_col: str, text_col: str, dim: int, storage="vector") -> None:
    """CREATE TABLE IF NOT EXISTS, and refuse a table made for another dimension or type."""
    check_table(conn, table, storage)  # EMBED_STORAGE: vector or halfvec (`storage`)
    _create(conn, table, dim, sql.SQL("CREATE TABLE IF NOT EXISTS {t} ({id} text PRIMARY KEY, "
                                      "{text} text NOT NULL, embedding {col})").format(
        t=table_ident(table), id=sql.Identifier(id_col), text=sql.Identifier(text_col),
        col=column_sql(storage, dim)))


@guarded("creating {table}")
def create_chunks_table(conn, table: str, id_col: str, dim: int, storage="vector") -> None:
    """`<table>_chunks`: one vector per chunk of a long row, with its character span."""
    _create(conn, table, dim, sql.SQL(
        "CREATE TABLE IF NOT EXISTS {t} ({id} text NOT NULL, chunk int NOT NULL, "
        "char_start int NOT NULL, char_end int NOT NULL, embedding {col} NOT NULL, "
        "PRIMARY KEY ({id}, chunk))").format(t=table_ident(table), id=sql.Identifier(id_col),
                                            col=column_sql(storage, dim)))


def _create(conn, table: str, dim: int, statement: sql.Composable) -> None:
    existing = table_dimension(conn, table)
    if existing is not None and existing != dim and not count_rows(conn, table)["rows"]:
        # Left by a run stopped at its first batch (a wrong EMBEDDING_DIM): nothing to lose.
        log.warning("table %s is empty and made for %d dimensions: made again for %d",
                    table, existing, dim)
        drop_table(conn, table)
        existing = None
    if existing is not None and existing != dim:
        raise DataError(f"Table {table} stores vectors of dimension {existing}, but the model "
                        f"gives {dim}. Use another TABLE_NAME (or --table), or drop the table "
                        "if its vectors came from another model.")
    if existing is None and not create_racing(conn, statement):
        _create(conn, table, dim, statement)  # another worker's: check its dimension


@guarded("reading which rows of {table} are stored")
def stored_state(conn, table: str, id_col: str, text_col: str, chunks_table: str,
                 ids: Sequence[str]) -> dict[str, tuple[str, bool]]:
    """id -> (md5 of the stored text, whether it has chunks) for ids that have a vector.

    Comparing md5 needs no extra column, so an existing table works as is.
    """
    if table_dimension(conn, table) is None:
        return {}
    names = dict(t=table_ident(table), id=sql.Identifier(id_col), text=sql.Identifier(text_col),
                 c=table_ident(chunks_table))
    has_chunks = sql.SQL("EXISTS (SELECT 1 FROM {c} WHERE {c}.{id} = {t}.{id})").format(**names) \
        if table_dimension(conn, chunks_table) else sql.SQL("false")
    query = sql.SQL("SELECT {id}, md5({text}), {has} FROM {t} WHERE {id} = ANY(%s) "
                    "AND embedding IS NOT NULL").format(has=has_chunks, **names)
    found: dict[str, tuple[str, bool]] = {}
    with conn.cursor() as cur:
        for start in range(0, len(ids), LOOKUP_CHUNK_IDS):
            cur.execute(query, (list(ids[start:start + LOOKUP_CHUNK_IDS]),))
            found.update((row_id, (md5, chunked)) for row_id, md5, chunked in cur.fetchall())
    conn.rollback()
    return found


@guarded("writing rows to {table}")
def write_rows(conn, table: str, id_col: str, text_col: str, ids: Sequence[str],
               texts: Sequence[str], vectors: np.ndarray, *, upsert: bool = True,
               method: str = "copy", assume_new: bool = False, chunks: Sequence = (),
               chunks_table: str | None = None) -> int:
    """Write one batch, and the chunks of its long rows, in one transaction.

    `method="copy"`: binary COPY into a temporary staging table, then one
    INSERT ... ON CONFLICT. With `assume_new` (no id of the batch was stored when the run
    was planned) the rows are copied straight into the table, about twice as fast; if
    another writer stored one of them meanwhile, the batch falls back to the upsert.
    `method="execute_values"`: the classic path. Ids must be unique within the batch.
    Chunks (id, number, start, end, vector) replace every chunk stored for these ids.
    """
    if not len(ids):
        return 0
    # Decided before the transaction starts: these statements end their own transactions.
    replace_chunks = bool(chunks_table) and (bool(chunks) or table_dimension(conn, chunks_table))
    if chunks and table_dimension(conn, chunks_table) is None:  # of the row table's type
        create_chunks_table(conn, chunks_table, id_col, vectors.shape[1], column_storage(conn, table))
    with conn.cursor() as cur:
        written = _insert(conn, cur, table, id_col, text_col, ids, texts, vectors, upsert=upsert,
                          method=method, assume_new=assume_new) if ids else set()
        if replace_chunks:  # rows kept as they were (UPSERT off) keep their chunks too
            _replace_chunks(conn, cur, chunks_table, id_col,
                            [i for i in ids if written is None or i in written],
                            [c for c in chunks if written is None or c[0] in written])
    conn.commit()
    return len(ids)


def _insert(conn, cur, table: str, id_col: str, text_col: str, ids, texts, vectors, *,
            upsert: bool, method: str, assume_new: bool) -> set[str] | None:
    """The rows' INSERT; returns the ids written when not all were (UPSERT off), else None."""
    names = dict(t=table_ident(table), id=sql.Identifier(id_col), text=sql.Identifier(text_col))
    tail = _conflict(upsert, id_col, text_col) + \
        (sql.SQL("") if upsert else sql.SQL(" RETURNING {id}").format(**names))
    if method == "execute_values":
        rows = execute_values(cur, sql.SQL("INSERT INTO {t} ({id}, {text}, embedding) VALUES %s ")
                              .format(**names).as_string(conn) + tail.as_string(conn),
                              list(zip(ids, texts, vectors)), page_size=len(ids), fetch=not upsert)
        return None if upsert else {r[0] for r in rows}
    if method != "copy":
        raise ValueError(f"unknown write method {method!r}: copy or execute_values")
    storage = column_storage(cur, table)  # binary COPY sends the column's own type
    payload = rows_payload(ids, texts, vectors, storage)
    if assume_new and copy_new_rows(conn, cur, table, id_col, text_col, payload):
        return None
    stage = create_stage(cur, storage)
    copy_rows(conn, cur, stage, ["id", "txt", "embedding"], payload)
    cur.execute(sql.SQL("INSERT INTO {t} ({id}, {text}, embedding) SELECT id, txt, embedding "
                        "FROM {s} ").format(s=sql.Identifier(stage), **names) + tail)
    return None if upsert else {r[0] for r in cur.fetchall()}


def _replace_chunks(conn, cur, table: str, id_col: str, ids: Sequence[str],
                    chunks: Sequence) -> None:
    """Delete the stored chunks of `ids` and copy in the new ones (same transaction). The
    row table's row locks, taken first, keep two writers of one id from interleaving."""
    cur.execute(sql.SQL("DELETE FROM {t} WHERE {id} = ANY(%s)").format(
        t=table_ident(table), id=sql.Identifier(id_col)), (list(ids),))
    if chunks:
        copy_rows(conn, cur, table, [id_col, "chunk", "char_start", "char_end", "embedding"],
              chunks_payload(chunks, column_storage(cur, table)))


def _conflict(upsert: bool, id_col: str, text_col: str) -> sql.Composable:
    """ON CONFLICT clause: update (UPSERT on) or keep the stored row."""
    if not upsert:
        return sql.SQL("ON CONFLICT ({id}) DO NOTHING").format(id=sql.Identifier(id_col))
    return sql.SQL("ON CONFLICT ({id}) DO UPDATE SET {text} = EXCLUDED.{text}, "
                   "embedding = EXCLUDED.embedding").format(
        id=sql.Identifier(id_col), text=sql.Identifier(text_col))


@guarded("writing a row to {table}")
def insert_one(conn, table: str, id_col: str, text_col: str, row_id: str, text: str,
               vector: np.ndarray, chunks: Sequence = ()) -> None:
    """Step 9's per-row write: one INSERT (and its chunks) and one commit (the baseline)."""
    chunks_table = f"{table}_chunks"
    replace_chunks = bool(chunks) or table_dimension(conn, chunks_table)
    if chunks and table_dimension(conn, chunks_table) is None:
        create_chunks_table(conn, chunks_table, id_col, len(vector), column_storage(conn, table))
    with conn.cursor() as cur:
        cur.execute(sql.SQL("INSERT INTO {t} ({id}, {text}, embedding) VALUES (%s, %s, %s) ")
                    .format(t=table_ident(table), id=sql.Identifier(id_col),
                            text=sql.Identifier(text_col)) + _conflict(True, id_col, text_col),
                    (row_id, text, np.asarray(vector, dtype=np.float32)))
        if replace_chunks:
            _replace_chunks(conn, cur, chunks_table, id_col, [row_id], chunks)
    conn.commit()


@guarded("counting the rows of {table}")
def count_rows(conn, table: str, ids: Iterable[str] | None = None, id_col: str = "id") -> dict:
    """Rows, rows with a vector, the distinct dimensions stored, and chunks of long rows;
    of the given ids only, when given (a run's own rows, in a table others write to too)."""
    where = sql.SQL(" WHERE {id} = ANY(%(ids)s)") if ids is not None else sql.SQL("")
    id_col = sql.Identifier(id_col)
    params = {"ids": [str(i) for i in ids]} if ids is not None else {}
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT count(*), count(embedding), "
                            "array_agg(DISTINCT vector_dims(embedding)) FROM {t}").format(
            t=table_ident(table)) + where.format(id=id_col), params)
        rows, with_vector, dims = cur.fetchone()
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (regclass_text(f"{table}_chunks"),))
        chunks = 0
        if cur.fetchone()[0]:
            cur.execute(sql.SQL("SELECT count(*) FROM {t}").format(
                t=table_ident(f"{table}_chunks")) + where.format(id=id_col), params)
            chunks = cur.fetchone()[0]
    conn.rollback()
    return {"rows": rows, "with_vector": with_vector, "dims": sorted(d for d in dims or [] if d),
            "chunks": chunks}


@guarded("reading vectors of {table}")
def fetch_vectors(conn, table: str, id_col: str, ids: Iterable[str]) -> dict[str, np.ndarray]:
    """Stored vectors by id (for parity checks)."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT {id}, embedding FROM {t} WHERE {id} = ANY(%s)").format(
            id=sql.Identifier(id_col), t=table_ident(table)), (list(ids),))
        rows = {r[0]: np.asarray(r[1].to_numpy(), dtype=np.float32) for r in cur.fetchall()}
    conn.rollback()
    return rows


@guarded("dropping {table}")
def drop_table(conn, table: str) -> None:
    """DROP TABLE IF EXISTS, with its chunks table (the notebook's RESET_TABLE)."""
    with conn.cursor() as cur:
        for name in (f"{table}_chunks", table):
            cur.execute(sql.SQL("DROP TABLE IF EXISTS {t}").format(t=table_ident(name)))
    conn.commit()
