"""Metadata beside the vector: the input's other columns (KEEP_COLS) and the file a row came from.

Kept columns go into one `metadata jsonb` column, not one typed column each: a CSV has no
types (guessing would turn the MRN "007" into 7 and fail on the "NA" of row 90,000), a later
run may keep more or fewer columns without an ALTER whose type can clash with what is
stored, and one jsonb column is what LangChain's PGVector (`cmetadata`) and LlamaIndex keep.
CSV values are stored as text, Parquet values with their JSON type. `source` (text) names
the input file of each row, so that sync deletes only within the files a run read.

Both columns are added to a table (ALTER ... ADD COLUMN IF NOT EXISTS) by the first run that
asks for them; a table written without them works as before.
"""
from __future__ import annotations

import json
import math
from datetime import date, datetime, time
from typing import Mapping, Sequence

from psycopg2 import sql
from psycopg2.extras import Json

from .constants import LOOKUP_CHUNK_IDS
from .db_guard import guarded
from .errors import DataError
from .table_names import regclass_text, table_ident

SOURCE_COLUMN, METADATA_COLUMN = "source", "metadata"


def jsonable(value):
    """A value as JSON keeps it: NaN (pandas' missing) is null, dates are ISO text.

    >>> [jsonable(v) for v in (None, float("nan"), 3, 1.5, True, date(2020, 1, 2), "x")]
    [None, None, 3, 1.5, True, '2020-01-02', 'x']
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if hasattr(value, "item"):  # a numpy scalar (pandas)
        return jsonable(value.item())
    return str(value)


def row_metadata(columns: Mapping[str, Sequence], keep: Sequence[str]) -> list[dict]:
    """One {column: value} per input row, for the `keep` columns of a table of columns."""
    if not keep:
        return []
    values = [list(columns[c]) for c in keep]
    return [{c: jsonable(v[n]) for c, v in zip(keep, values)} for n in range(len(values[0]))]


def input_columns(df, target, columns: Sequence[str]) -> dict:
    """`steps.prepare`'s `sources` and `meta` from a table of columns (a DataFrame or a dict
    of lists): the file of each row (readers.SOURCE_KEY) and the KEEP_COLS."""
    from .readers import SOURCE_KEY
    missing = [c for c in target.keep_cols if c not in columns]
    if missing:
        shown = ", ".join(c for c in columns if c != SOURCE_KEY)
        raise DataError(f"KEEP_COLS (--keep-cols) names {', '.join(map(repr, missing))}, not in "
                        f"the input. Columns that exist: {shown}.")
    if not target.annotated:
        return {}
    sources = list(df[SOURCE_KEY]) if SOURCE_KEY in columns else []
    return {"sources": sources, "meta": row_metadata(df, target.keep_cols)}


@guarded("reading the metadata columns of {table}")
def has_columns(conn, table: str) -> bool:
    """Whether `table` has both the source and metadata columns (False: no such table)."""
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                    "AND attname = ANY(%s) AND NOT attisdropped",
                    (regclass_text(table), [SOURCE_COLUMN, METADATA_COLUMN]))
        found = cur.fetchone()[0]
    conn.rollback()
    return found == 2


@guarded("adding the metadata columns to {table}")
def ensure_columns(conn, table: str) -> None:
    """ALTER TABLE ... ADD COLUMN IF NOT EXISTS source, metadata: idempotent, and asked
    first so that a table that has them takes no ALTER's lock."""
    if has_columns(conn, table):
        return
    with conn.cursor() as cur:
        cur.execute(sql.SQL("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {s} text, "
                            "ADD COLUMN IF NOT EXISTS {m} jsonb").format(
            t=table_ident(table), s=sql.Identifier(SOURCE_COLUMN),
            m=sql.Identifier(METADATA_COLUMN)))
    conn.commit()


@guarded("reading the stored metadata of {table}")
def stored(conn, table: str, id_col: str, ids: Sequence[str]) -> dict[str, tuple]:
    """id -> (source, metadata) as stored; {} when the table has no such columns yet."""
    if not ids or not has_columns(conn, table):
        return {}
    query = sql.SQL("SELECT {id}, {s}, {m} FROM {t} WHERE {id} = ANY(%s)").format(
        id=sql.Identifier(id_col), s=sql.Identifier(SOURCE_COLUMN),
        m=sql.Identifier(METADATA_COLUMN), t=table_ident(table))
    found = {}
    with conn.cursor() as cur:
        for start in range(0, len(ids), LOOKUP_CHUNK_IDS):
            cur.execute(query, (list(ids[start:start + LOOKUP_CHUNK_IDS]),))
            found.update((row_id, (source, meta)) for row_id, source, meta in cur.fetchall())
    conn.rollback()
    return found


def differs(stored_value: tuple | None, source: str | None, meta: dict | None) -> bool:
    """Whether a row's stored (source, metadata) is not what the input says now (compared
    as JSON gives them back, so 1.0 and 1 or a tuple and a list are not a change)."""
    if stored_value is None or stored_value[0] != source:
        return True
    # Equal as they are in most runs (CSV text); only else compared as JSON gives them back.
    return stored_value[1] != meta and stored_value[1] != json.loads(json.dumps(meta))


@guarded("writing the metadata of {table}")
def write(conn, table: str, id_col: str, ids: Sequence[str], sources: Sequence,
          metas: Sequence) -> int:
    """Set source and metadata of rows already stored, keyed by id, in one transaction;
    nothing is embedded. Returns the rows updated."""
    if not ids:
        return 0
    ensure_columns(conn, table)
    with conn.cursor() as cur:
        cur.execute(sql.SQL(
            "UPDATE {t} SET {s} = v.s, {m} = v.m FROM (SELECT unnest(%s::text[]) AS id, "
            "unnest(%s::text[]) AS s, unnest(%s::jsonb[]) AS m) v WHERE {t}.{id} = v.id").format(
            t=table_ident(table), id=sql.Identifier(id_col), s=sql.Identifier(SOURCE_COLUMN),
            m=sql.Identifier(METADATA_COLUMN)),
            (list(ids), list(sources), [Json(m) for m in metas]))
        updated = cur.rowcount
    conn.commit()
    return updated


def where_sql(where: Mapping | None, alias: str = "") -> tuple[sql.Composable, dict]:
    """` AND ...` for a search filter, and its named parameters: each key names a kept
    column, its value the value to match (a list: any of them; None: the column is empty).
    Values compare as text (`metadata->>key`), so {"year": 2020} matches a CSV's "2020" and
    a Parquet's 2020 alike. Keys and values are parameters, never formatted in.

    >>> clause, params = where_sql({"year": [2019, 2020], "journal": "Lancet", "x": None})
    >>> params
    {'w0': 'year', 'v0': ['2019', '2020'], 'w1': 'journal', 'v1': 'Lancet', 'w2': 'x'}
    """
    parts, params = [], {}
    column = sql.SQL("{a}{m}").format(a=sql.SQL(f"{alias}." if alias else ""),
                                      m=sql.Identifier(METADATA_COLUMN))
    for n, (key, value) in enumerate((where or {}).items()):
        names = dict(c=column, k=sql.Placeholder(f"w{n}"), v=sql.Placeholder(f"v{n}"))
        params[f"w{n}"] = str(key)
        if value is None:
            parts.append(sql.SQL(" AND {c}->>{k} IS NULL").format(**names))
            continue
        many = isinstance(value, (list, tuple, set))
        parts.append(sql.SQL(" AND {c}->>{k} = ANY({v})" if many else " AND {c}->>{k} = {v}")
                     .format(**names))
        params[f"v{n}"] = [as_text(v) for v in value] if many else as_text(value)
    return sql.Composed(parts), params


def as_text(value) -> str:
    """A filter value as `->>` gives a JSON value back: true/false, numbers as written.

    >>> [as_text(v) for v in (True, 2020, 1.5, "Lancet")]
    ['true', '2020', '1.5', 'Lancet']
    """
    value = jsonable(value)
    return json.dumps(value) if isinstance(value, bool) else str(value)
