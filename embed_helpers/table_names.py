"""Table names as the user typed them: `docs`, `MyTable` (case kept), `s1.docs` (schema s1).

Every statement that names a table passes through here, so a name is written the same way
when a table is created and when it is looked up again (`to_regclass` reads its argument
as SQL, where `MyTable` would mean `mytable` and `s1.docs` a table of that name). Derived
names follow in the same schema: `s1.docs_chunks`, index `s1.docs_embedding_hnsw`.
A name PostgreSQL would change (longer than 63 bytes) or that is most likely a mistake
(quotes, spaces, a semicolon) is refused before anything is created or paid.
"""
from __future__ import annotations

import re

from psycopg2 import sql

from .constants import LONGEST_DERIVED_SUFFIX, MAX_NAME_BYTES
from .errors import DataError

#: Letters (any alphabet), digits, _, $ and -: all are kept as typed (the names are quoted).
PART = re.compile(r"[\w$-]+")
RULE = ("a table name is letters, digits, _, $ or -, optionally after a schema and a dot "
        "(s1.docs); it is used exactly as typed, case included, so write it without quotes")


def split_name(name: str, max_bytes: int = MAX_NAME_BYTES) -> tuple[str | None, str]:
    """(schema or None, table) of a name, or DataError saying why PostgreSQL cannot take it.

    >>> split_name("s1.docs"), split_name("MyTable")
    (('s1', 'docs'), (None, 'MyTable'))
    """
    parts = str(name).split(".") if isinstance(name, str) else []
    if not 1 <= len(parts) <= 2 or not all(PART.fullmatch(p) for p in parts):
        raise DataError(f"table name {name!r} cannot be used: {RULE}. Set TABLE_NAME (--table).")
    for part in parts:
        if len(part.encode("utf-8")) > max_bytes:
            raise DataError(f"table name {name!r}: {part!r} is {len(part.encode('utf-8'))} bytes; "
                            f"PostgreSQL keeps only {MAX_NAME_BYTES} bytes of a name"
                            + ("" if max_bytes == MAX_NAME_BYTES else
                               f", and {LONGEST_DERIVED_SUFFIX!r} is added to it for the chunks "
                               f"table's index, so at most {max_bytes}")
                            + ". Choose a shorter TABLE_NAME (--table).")
    return (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def check_table_name(name: str) -> str:
    """The name itself, when it and every name made from it are valid; else DataError."""
    split_name(name, MAX_NAME_BYTES - len(LONGEST_DERIVED_SUFFIX.encode()))
    return name


def table_ident(name: str) -> sql.Identifier:
    """`"s1"."docs"` / `"MyTable"`: the name for a statement."""
    schema, table = split_name(name)
    return sql.Identifier(table) if schema is None else sql.Identifier(schema, table)


def regclass_text(name: str) -> str:
    """The argument of `to_regclass` that finds the table the statements create.

    >>> regclass_text("s1.docs"), regclass_text("MyTable")
    ('"s1"."docs"', '"MyTable"')
    """
    return ".".join(f'"{part}"' for part in split_name(name) if part is not None)


def unqualified(name: str) -> sql.Identifier:
    """The table part alone: an index is named without its schema (it takes its table's)."""
    return sql.Identifier(split_name(name)[1])


def schema_of(name: str) -> str | None:
    return split_name(name)[0]


def check_schema(conn, name: str) -> None:
    """DataError when `name` is schema-qualified and the schema does not exist.

    Schemas are not created for a run: one is the database owner's to make (a run's role
    often may not), and a mistyped schema would otherwise be created quietly beside the
    real one."""
    schema = schema_of(name)
    if schema is None:
        return
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        found = cur.fetchone()
    conn.rollback()
    if not found:
        raise DataError(f"table {name}: the schema {schema!r} does not exist in this database. "
                        f"Create it first (CREATE SCHEMA {regclass_text(schema)};), or name a table "
                        "without a schema to use the default one (public).")
