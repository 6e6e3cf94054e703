"""How vectors are stored: pgvector's `vector` (float32) or `halfvec` (float16, half the bytes).

EMBED_STORAGE picks the column type of a new table, and its chunks table follows the row
table. A table keeps the type it was made with: a run that asks for the other is refused
before anything is paid (`check_table`), never cast quietly. Writes, the index and searches
read the column's type from the catalog (`column_storage`), so a table made either way is
written, indexed and searched as it is. halfvec needs pgvector >= 0.7.
"""
from __future__ import annotations

from psycopg2 import sql

from .constants import HALFVEC_MAX_INDEX_DIM, HNSW_MAX_VECTOR_DIM, VECTOR_MAX_DIM
from .errors import DataError
from .table_names import regclass_text

STORAGES = ("vector", "halfvec")
#: What one value of each type takes on disk, in bytes.
VALUE_BYTES = {"vector": 4, "halfvec": 2}


def checked(storage: str) -> str:
    """`storage` when it is a type we write; anything else never reaches the SQL."""
    if storage not in STORAGES:
        raise ValueError(f"EMBED_STORAGE must be one of {', '.join(STORAGES)}, got {storage!r}")
    return storage


def column_sql(storage: str, dim: int) -> sql.Composable:
    """The column type, `vector(384)` or `halfvec(256)`; a dimension either type cannot
    hold is refused here, before any table exists.

    >>> column_sql("halfvec", 256).seq[0].string, column_sql("halfvec", 256).seq[2].wrapped
    ('halfvec', 256)
    """
    if dim > VECTOR_MAX_DIM:
        raise DataError(f"The model gives {dim}-dim vectors; pgvector stores at most "
                        f"{VECTOR_MAX_DIM:,} ({checked(storage)}). Set EMBED_DIMENSIONS to "
                        f"{HALFVEC_MAX_INDEX_DIM} or less with a Matryoshka model.")
    return sql.SQL("{kind}({dim})").format(kind=sql.SQL(checked(storage)), dim=sql.Literal(dim))


def column_storage(conn_or_cur, table: str) -> str | None:
    """'vector' or 'halfvec', the type of `table`'s embedding column; None: no such table.

    Runs in the caller's transaction (writes call it between their statements), and ends
    none: a caller outside one ends the transaction this opens."""
    if not hasattr(conn_or_cur, "fetchone"):  # a connection
        with conn_or_cur.cursor() as cur:
            return column_storage(cur, table)
    conn_or_cur.execute("SELECT t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
                        "WHERE a.attrelid = to_regclass(%s) AND a.attname = 'embedding' "
                        "AND NOT a.attisdropped", (regclass_text(table),))
    row = conn_or_cur.fetchone()
    return row[0] if row else None


def check_table(conn, table: str, storage: str) -> None:
    """Refuse a run whose EMBED_STORAGE is not the type of the table it writes to (and of
    its chunks table): a silent cast would store what was not asked for."""
    for name in (table, f"{table}_chunks"):
        existing = column_storage(conn, name)
        conn.rollback()
        if existing is not None and existing != checked(storage):
            raise DataError(
                f"Table {name} stores its vectors as {existing}, but EMBED_STORAGE={storage}. "
                f"Set EMBED_STORAGE={existing} to add to it, or use another TABLE_NAME (or "
                f"--table) for {storage}; nothing was sent or written.")


def searched(storage: str | None, dim: int) -> sql.Composable:
    """What the index covers and searches compare: the column itself, or for a `vector`
    wider than HNSW indexes (2,000 dimensions), a halfvec cast of it."""
    if storage != "halfvec" and dim > HNSW_MAX_VECTOR_DIM:
        return sql.SQL("(embedding::halfvec({d}))").format(d=sql.Literal(dim))
    return sql.SQL("embedding")


def index_parts(storage: str | None, dim: int) -> tuple[sql.Composable, str]:
    """(what the HNSW index covers, its operator class); halfvec indexes up to 4,000."""
    if (storage == "halfvec" or dim > HNSW_MAX_VECTOR_DIM) and dim > HALFVEC_MAX_INDEX_DIM:
        raise DataError(f"HNSW indexes halfvec up to {HALFVEC_MAX_INDEX_DIM:,} dimensions, and "
                        f"this table has {dim:,}: set EMBED_INDEX=never (an exact search), or "
                        f"EMBED_DIMENSIONS to {HALFVEC_MAX_INDEX_DIM} or less.")
    halfvec = storage == "halfvec" or dim > HNSW_MAX_VECTOR_DIM
    return searched(storage, dim), "halfvec_cosine_ops" if halfvec else "vector_cosine_ops"


def query_cast(storage: str | None, dim: int) -> sql.Composable:
    """The query vector's cast, of the type the index covers (else the index is not used)."""
    if storage == "halfvec" or dim > HNSW_MAX_VECTOR_DIM:
        return sql.SQL("%(q)s::halfvec({d})").format(d=sql.Literal(dim))
    return sql.SQL("%(q)s::vector")
