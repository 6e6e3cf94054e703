"""A PostgreSQL source: rows read where they live, in windows, through a server-side cursor.

Text that already lives in PostgreSQL (clinical notes) need not be exported to CSV first:
`--data postgresql://... --query "SELECT id, text FROM notes"` (or `--source-table notes`)
reads the query's rows through a named cursor, EMBED_SOURCE_WINDOW rows at a time, so a
run's memory holds one window, not the table. The connection is its own, read-only and
separate from the target's (the source may be the same database or another one), and its
DSN is shown masked like DATABASE_URL's.

Ids are cast to text (`id::text`) alike in every window. A read that fails part-way raises;
`complete` is true only once the cursor ran out with no LIMIT, so sync can trust `ids_seen`.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import psycopg2
from psycopg2 import sql

from .constants import INPUT_ERRORS_SHOWN, SOURCE_WINDOW_ROWS
from .errors import DatabaseError, DataError
from .printing import dsn_problem, mask_url, without_password
from .readers import SOURCE_KEY, check_limit, is_blank
from .table_names import regclass_text

log = logging.getLogger(__name__)

SCHEMES = ("postgresql://", "postgres://")
CURSOR_NAME = "embed_helpers_source"
#: What the user's query runs inside: a subquery, so PostgreSQL casts the id for us.
ALIAS = "embed_source"


def is_postgres_source(data) -> bool:
    """Whether `--data` names a PostgreSQL source rather than a file.

    >>> is_postgres_source("postgresql://u@db/x"), is_postgres_source("data/notes.csv")
    (True, False)
    """
    return isinstance(data, str) and data.lower().startswith(SCHEMES)


@dataclass
class SourceWindow:
    """One window of source rows: ids (text), texts (None when NULL), the extra columns."""

    ids: list[str]
    texts: list
    extras: dict[str, list] = field(default_factory=dict)
    first: int = 0              # the source row number of its first row, from 0
    repeated_before: int = 0    # rows whose id an earlier window already had

    def columns(self, id_col: str, text_col: str, source: str | None = None) -> dict[str, list]:
        """The window as `plan_ingest` takes it: {column: values}; each row may record
        `source` (readers.SOURCE_KEY), as a file's rows record the file."""
        named = {SOURCE_KEY: [source] * len(self.ids)} if source else {}
        return {id_col: self.ids, text_col: self.texts, **self.extras, **named}


def clean_query(query: str) -> str:
    """The query as it can stand inside a subquery: no trailing semicolons.

    >>> clean_query("  SELECT id, text FROM notes ;\\n")
    'SELECT id, text FROM notes'
    """
    text = str(query or "").strip()
    while text.endswith(";"):
        text = text[:-1].rstrip()
    if not text:
        raise DataError("--query is empty: give the SELECT that returns the id and text "
                        "columns, e.g. --query \"SELECT id, text FROM notes\".")
    return text


def pick_columns(returned: Sequence[str], id_col: str | None, text_col: str | None,
                 extra: Sequence[str] = ()) -> tuple[str, str]:
    """The id and text columns among those the query returns: as named, else the first
    column for the id and the first other one for the text.

    >>> pick_columns(["note_id", "body", "ward"], None, None)
    ('note_id', 'body')
    >>> pick_columns(["ward", "body", "note_id"], "note_id", None)
    ('note_id', 'ward')
    """
    names = list(returned)
    id_col = id_col or (names[0] if names else None)
    text_col = text_col or next((n for n in names if n != id_col), None)
    wanted = [c for c in (id_col, text_col, *extra) if c]
    missing = [c for c in wanted if c not in names]
    if missing or len(wanted) < 2:
        raise DataError(f"The source returns the column(s) {', '.join(map(repr, names))}; "
                        f"{', '.join(map(repr, missing)) or 'a text column'} "
                        f"{'is' if len(missing) == 1 else 'are'} not among them. Name them "
                        "with --id-col and --text-col (ID_COL / TEXT_COL), or select them "
                        "in --query (e.g. SELECT note_id AS id, body AS text FROM notes).")
    twice = sorted({c for c in wanted if names.count(c) > 1})
    if twice:
        raise DataError(f"The source returns more than one column named "
                        f"{', '.join(map(repr, twice))}: name them apart in --query "
                        "(SELECT n.id AS note_id, ...).")
    return id_col, text_col


class PostgresSource:
    """Rows of a query (or a table) in a PostgreSQL database, read window by window.

    Open with `open_source`; iterate `windows()` once; `ids_seen` holds every id read
    (empty texts included), `complete` says whether that was the whole source.
    """

    def __init__(self, dsn: str, *, query: str | None = None, table: str | None = None,
                 id_col: str | None = None, text_col: str | None = None,
                 extra_cols: Sequence[str] = (), limit: int | None = None,
                 window: int = SOURCE_WINDOW_ROWS):
        if (query is None) == (table is None):
            raise DataError("A PostgreSQL source needs exactly one of --query \"SELECT id, "
                            "text FROM notes\" or --source-table notes.")
        check_limit(limit)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise DataError(f"EMBED_SOURCE_WINDOW must be a whole number of rows >= 1; got "
                            f"{window!r}")
        self._dsn = str(dsn)
        self.where = mask_url(self._dsn)
        self.query = clean_query(query) if table is None else _select_all(table)
        self.what = f"query {self.query!r}" if table is None else f"table {table}"
        self.id_col, self.text_col, self.extra_cols = id_col, text_col, tuple(extra_cols)
        self.limit, self.window = limit, window
        self.ids_seen: set[str] = set()
        self.rows_read = self.rows_with_text = 0
        self.complete, self._conn, self._started = False, None, False

    def __repr__(self) -> str:
        return f"PostgresSource({self.where!r}, {self.what})"

    @property
    def label(self) -> str:
        """The rows' recorded source and a sync's scope: the table, or the query's hash."""
        digest = hashlib.sha256(self.query.encode()).hexdigest()[:12]
        return f"postgresql {self.what}" if self.what.startswith("table ") else \
            f"postgresql query {digest}"

    def describe(self) -> str:
        return (f"PostgreSQL {self.where}, {self.what}, read in windows of {self.window:,} "
                f"rows (EMBED_SOURCE_WINDOW)")

    def open(self) -> "PostgresSource":
        """Connect read-only and learn the columns (the query is checked by PostgreSQL
        here, before anything is embedded or paid)."""
        self._conn = connect_readonly(self._dsn, self.where)
        statement = sql.SQL("SELECT * FROM ({query}) AS {alias} LIMIT 0").format(
            query=sql.SQL(self.query), alias=sql.Identifier(ALIAS))
        try:
            with self._conn.cursor() as cur:
                cur.execute(statement)
                returned = [d.name for d in cur.description]
            self._conn.rollback()  # hold no lock on the source until it is read
            self.id_col, self.text_col = pick_columns(returned, self.id_col, self.text_col,
                                                      self.extra_cols)
            self.extra_cols = tuple(c for c in self.extra_cols
                                    if c not in (self.id_col, self.text_col))
        except (psycopg2.Error, DataError) as exc:
            self.close()
            raise self._failed(exc) if isinstance(exc, psycopg2.Error) else exc from None
        return self

    def statement(self) -> sql.Composed:
        """The query the cursor runs: the user's, inside a subquery that casts the id and
        the text to text (as PostgreSQL writes them) and keeps the extra columns."""
        def col(name):
            return sql.SQL("{a}.{c}").format(a=sql.Identifier(ALIAS), c=sql.Identifier(name))
        picked = [sql.SQL("{c}::text").format(c=col(self.id_col)),
                  sql.SQL("{c}::text").format(c=col(self.text_col)),
                  *[col(name) for name in self.extra_cols]]
        limit = sql.SQL("") if self.limit is None else \
            sql.SQL(" LIMIT {n}").format(n=sql.Literal(self.limit))
        return sql.SQL("SELECT {cols} FROM ({query}) AS {alias}{limit}").format(
            cols=sql.SQL(", ").join(picked), query=sql.SQL(self.query),
            alias=sql.Identifier(ALIAS), limit=limit)

    def windows(self) -> Iterator[SourceWindow]:
        """The rows, EMBED_SOURCE_WINDOW at a time, through one server-side cursor."""
        if self._conn is None or self._started:
            raise DataError("a PostgreSQL source is read once, after open(): open it again "
                            "to read it again")
        self._started = True
        try:
            with self._conn.cursor(name=CURSOR_NAME) as cur:
                cur.itersize = self.window
                cur.execute(self.statement())
                while True:
                    rows = cur.fetchmany(self.window)
                    if not rows:
                        break
                    yield self._window(rows)
        except psycopg2.Error as exc:
            raise self._failed(exc) from None
        finally:
            self.close()
        self._finish()

    def _window(self, rows: list[tuple]) -> SourceWindow:
        first = self.rows_read
        ids = [r[0] for r in rows]
        no_id = [first + n + 1 for n, v in enumerate(ids) if v is None]
        if no_id:
            shown = ", ".join(map(str, no_id[:INPUT_ERRORS_SHOWN]))
            raise DataError(f"{len(no_id)} row(s) of the source have no id in "
                            f"{self.id_col!r} (rows {shown}, counting from 1). Every row "
                            f"needs an id: add WHERE {self.id_col} IS NOT NULL to --query, "
                            "or choose another --id-col.")
        texts = [r[1] for r in rows]
        extras = {name: [r[2 + k] for r in rows] for k, name in enumerate(self.extra_cols)}
        repeated = len({i for i, t in zip(ids, texts) if i in self.ids_seen
                        and t is not None and not is_blank(t)})
        self.ids_seen.update(ids)
        self.rows_read += len(rows)
        self.rows_with_text += sum(1 for t in texts if t is not None and not is_blank(t))
        log.info("source rows %d-%d read", first + 1, self.rows_read)
        return SourceWindow(ids, texts, extras, first, repeated)

    def _finish(self) -> None:
        """After the last window: the whole source was read unless LIMIT stopped it."""
        self.complete = self.limit is None or self.rows_read < self.limit
        if self.rows_read and not self.rows_with_text:
            raise DataError(f"all {self.rows_read} rows of the source have an empty text in "
                            f"{self.text_col!r}: nothing to embed. Is --text-col the column "
                            "that holds the texts?")

    def _failed(self, exc: psycopg2.Error) -> Exception:
        """A failed read in words: the query's own error (with the fix), or a lost
        connection (the read stops: rows after it were not read)."""
        diag = getattr(exc, "diag", None)
        said = " ".join(filter(None, (getattr(diag, "message_primary", None),
                                      getattr(diag, "message_hint", None))))
        said = without_password(said or str(exc).strip().splitlines()[0], self._dsn)
        done = "Nothing was embedded or written." if not self.rows_read else \
            (f"The first {self.rows_read} rows were read before it failed; what their "
             "windows wrote stays, and a rerun skips it.")
        if _connection_lost(exc):
            return DatabaseError(f"The connection to the source {self.where} was lost after "
                                 f"{self.rows_read} rows ({said}). The read stops here: the "
                                 f"rest of the source was not read. {done}")
        return DataError(f"The source {self.what} failed in PostgreSQL: {said}. Try it in "
                         f"psql, fix --query (or --source-table) and run again; it runs as "
                         f"SELECT ... FROM (<query>) AS {ALIAS}, read-only. {done}")

    def close(self) -> None:
        if not self.closed:
            self._conn.close()

    @property
    def closed(self) -> bool:
        return self._conn is None or bool(self._conn.closed)

    def __enter__(self) -> "PostgresSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _connection_lost(exc: psycopg2.Error) -> bool:
    """The connection went (a network error, a server shutdown, pg_terminate_backend), as
    against the query failing (a statement timeout, too, is the query's: 57014)."""
    code = exc.pgcode or ""
    return isinstance(exc, psycopg2.InterfaceError) or (
        isinstance(exc, psycopg2.OperationalError) and (not code or code[:2] == "08"
                                                        or code[:3] == "57P"))


def _select_all(table: str) -> str:
    """`SELECT * FROM "s1"."notes"`: the table as typed, case kept (`table_names`' rule)."""
    try:
        return f"SELECT * FROM {regclass_text(table)}"
    except DataError as exc:
        raise DataError(str(exc).replace("TABLE_NAME (--table)", "--source-table")) from None


def connect_readonly(dsn: str, where: str):
    """A connection of the source's own, read-only: its transaction can write nothing, in
    the same database as the target or another one."""
    problem = dsn_problem(dsn)
    if problem:  # libpq's own message would quote part of the password
        raise DatabaseError(f"Cannot connect to the source {where}: {problem}. Fix --data.")
    try:
        conn = psycopg2.connect(dsn, application_name="embed_helpers_source")
        conn.set_session(readonly=True)
    except psycopg2.Error as exc:
        raise DatabaseError(f"Cannot connect to the source {where}: "
                            f"{without_password(str(exc).strip(), dsn)}. Check the URL in "
                            "--data (user, password, host, database).") from None
    return conn


def open_source(dsn: str, **options) -> PostgresSource:
    """A PostgreSQL source, connected and its columns checked (see `PostgresSource`)."""
    return PostgresSource(dsn, **options).open()
