"""PostgreSQL's binary COPY for our two kinds of rows, rows and chunks: format and statements.

Binary COPY skips turning every float into text: about 18x faster than `execute_values`
on this kind of data (see GUIDE.md, "Writes"). Layout: a header, then per row the field
count and each field as (length, bytes), then a trailer; a pgvector `vector` is
(dim int16, unused int16, dim float32), a `halfvec` the same with float16 (pgvector's
`halfvec_recv`), all big-endian.
"""
from __future__ import annotations

import io
import struct
from typing import Sequence

import numpy as np
import psycopg2
from psycopg2 import sql

from .constants import COPY_BUFFER_BYTES
from .errors import DataError
from .storage import VALUE_BYTES, checked
from .table_names import table_ident

_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_ROWS_FIELDS, _CHUNK_FIELDS = struct.pack(">h", 3), struct.pack(">h", 5)
_STAGE_TABLE = "_embed_helpers_stage"


def _encoded(vectors: np.ndarray, storage: str, ids: Sequence[str]) -> np.ndarray:
    """Big-endian float32 (vector) or float16 (halfvec); a value float16 cannot hold
    (beyond +-65,504: only unnormalised vectors) is refused naming its row."""
    with np.errstate(over="ignore"):  # a value float16 cannot hold becomes inf: refused below
        out = np.ascontiguousarray(vectors, dtype=">f2" if checked(storage) == "halfvec" else ">f4")
    if storage == "halfvec" and not np.isfinite(out).all():
        bad = [ids[i] for i in np.flatnonzero(~np.isfinite(out).all(axis=-1))]
        raise DataError(f"{len(bad)} vector(s) hold values beyond halfvec's range (+-65,504), "
                        f"ids {', '.join(map(str, bad[:5]))}: set EMBED_STORAGE=vector and use "
                        f"another table for this model's (unnormalised) vectors.")
    return out


def _vector_field(vector: np.ndarray, storage: str, row_id: str) -> bytes:
    data = _encoded(np.asarray(vector)[None, :], storage, [row_id]).tobytes()
    size = VALUE_BYTES[storage]
    return struct.pack(">ihh", 4 + len(data), len(data) // size, 0) + data


def rows_payload(ids: Sequence[str], texts: Sequence[str], vectors: np.ndarray,
                 storage: str = "vector") -> bytes:
    """PostgreSQL binary COPY rows (id text, text text, embedding vector or halfvec).

    Binary COPY skips turning every float into text: about 18x faster than
    `execute_values` on this kind of data (see GUIDE.md, "Writes").
    """
    dim = vectors.shape[1]
    big_endian = _encoded(vectors, storage, ids)
    vector_head = struct.pack(">ihh", 4 + VALUE_BYTES[storage] * dim, dim, 0)
    out = io.BytesIO()
    out.write(_COPY_HEADER)
    for i, (row_id, text) in enumerate(zip(ids, texts)):
        id_bytes, text_bytes = row_id.encode(), text.encode()
        out.write(_ROWS_FIELDS + struct.pack(">i", len(id_bytes)))
        out.write(id_bytes)
        out.write(struct.pack(">i", len(text_bytes)))
        out.write(text_bytes)
        out.write(vector_head)
        out.write(big_endian[i].tobytes())
    out.write(b"\xff\xff")
    return out.getvalue()


def chunks_payload(chunks: Sequence[tuple[str, int, int, int, np.ndarray]],
                   storage: str = "vector") -> bytes:
    """Binary COPY rows (id text, chunk int, char_start int, char_end int, embedding)."""
    out = io.BytesIO()
    out.write(_COPY_HEADER)
    for row_id, number, start, end, vector in chunks:
        id_bytes = row_id.encode()
        out.write(_CHUNK_FIELDS + struct.pack(">i", len(id_bytes)) + id_bytes)
        out.write(struct.pack(">iiiiii", 4, number, 4, start, 4, end))
        out.write(_vector_field(vector, storage, row_id))
    out.write(b"\xff\xff")
    return out.getvalue()


def copy_rows(conn, cur, table: str, columns: list[str], payload: bytes) -> None:
    statement = sql.SQL("COPY {t} ({cols}) FROM STDIN WITH (FORMAT binary)").format(
        t=table_ident(table), cols=sql.SQL(", ").join(map(sql.Identifier, columns)))
    cur.copy_expert(statement.as_string(conn), io.BytesIO(payload), size=COPY_BUFFER_BYTES)


def copy_new_rows(conn, cur, table: str, id_col: str, text_col: str, payload: bytes) -> bool:
    """COPY straight into the table; False (nothing written) when an id already exists."""
    cur.execute("SAVEPOINT new_rows")
    try:
        copy_rows(conn, cur, table, [id_col, text_col, "embedding"], payload)
    except psycopg2.errors.UniqueViolation:
        cur.execute("ROLLBACK TO SAVEPOINT new_rows")  # another writer got there first
        return False
    cur.execute("RELEASE SAVEPOINT new_rows")
    return True


def create_stage(cur, storage: str) -> str:
    """The session's staging table for upserts, of the target's vector type; its name."""
    name = _STAGE_TABLE if storage == "vector" else f"{_STAGE_TABLE}_{checked(storage)}"
    cur.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {s} (id text, txt text, embedding {k}) "
                        "ON COMMIT DELETE ROWS").format(s=sql.Identifier(name), k=sql.SQL(storage)))
    return name
