"""The steps around the embedding sequence, as plain functions over rows.

    prepare -> drop_unchanged -> Pieces (long texts) -> [sequence.EmbedSequence] -> write

`prepare` and `drop_unchanged` decide which rows need vectors (the plan runs them), the
sequence gets the vectors, `write` stores rows in one transaction. Nothing here keeps
state between calls.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Sequence

from . import db, dimensions, metadata
from .errors import DataError
from .identity import Identity
from .pieces import Done, Pieces
from .readers import is_blank, repeated_ids
from .setting_values import column_names
from .table_names import check_table_name
from .tokens import Window

log = logging.getLogger(__name__)

NUL_REASON = "text contains a NUL byte, which PostgreSQL cannot store: clean the input"


@dataclass(frozen=True)
class Target:
    """Where rows go: a table and its id and text columns; long rows' chunks go to
    `<table>_chunks`. `keep_cols` (KEEP_COLS) are stored beside the vector in `metadata`;
    with them, or with `record_source` (EMBED_SYNC turns it on), each row's source file too."""

    table: str
    id_col: str
    text_col: str
    keep_cols: tuple[str, ...] = ()
    record_source: bool = False

    def __post_init__(self):
        check_table_name(self.table)  # refused before anything is created or paid
        object.__setattr__(self, "keep_cols", column_names(self.keep_cols))  # "a,b" or a list
        clash = [c for c in self.keep_cols if c in (self.id_col, self.text_col)]
        if clash:
            raise DataError(f"KEEP_COLS names {', '.join(clash)}, the id or text column: it is "
                            "stored already; keep only other columns.")
        ours = {metadata.SOURCE_COLUMN, metadata.METADATA_COLUMN} & {self.id_col, self.text_col}
        if ours and self.annotated:
            raise DataError(f"The id or text column is named {', '.join(sorted(ours))}, a column "
                            "sync and KEEP_COLS add to the table: rename it in the input.")

    @property
    def annotated(self) -> bool:
        """Whether rows carry a source and metadata (`metadata.py`)."""
        return bool(self.keep_cols) or self.record_source

    @property
    def chunks_table(self) -> str:
        return f"{self.table}_chunks"


@dataclass
class Rows:
    """Rows ready to embed: unique ids (the last of a repeated id wins), non-empty texts."""

    ids: list[str]
    texts: list[str]
    rows_read: int
    empty_ids: list[str] = field(default_factory=list)
    duplicate_ids: int = 0
    invalid: list[tuple[str, str]] = field(default_factory=list)   # (id, reason)
    repeated: list[str] = field(default_factory=list)  # a few of the ids that repeat
    sources: list = field(default_factory=list)   # the file of each row, when recorded
    meta: list = field(default_factory=list)      # {kept column: value} of each row

    def take(self, positions: Sequence[int]) -> "Rows":
        pick = (lambda values: [values[i] for i in positions] if values else [])
        return Rows(pick(self.ids), pick(self.texts), self.rows_read, self.empty_ids,
                    self.duplicate_ids, self.invalid, self.repeated, pick(self.sources),
                    pick(self.meta))

    def annotations(self) -> dict[str, tuple]:
        """id -> (source, metadata) of every row, for the writes; {} when none are kept."""
        if not self.sources and not self.meta:
            return {}
        sources, meta = self.sources or [None] * len(self.ids), self.meta or [None] * len(self.ids)
        return dict(zip(self.ids, zip(sources, meta)))


def is_missing(value) -> bool:
    """None, NaN (pandas' missing) or a text of only spaces and invisible characters."""
    return value is None or value != value or is_blank(value)


def prepare(ids: Sequence, texts: Sequence, *, id_col: str = "id", sources: Sequence = (),
            meta: Sequence = ()) -> Rows:
    """Drop empty texts (listing their ids), resolve repeated ids (last wins), and set
    aside texts PostgreSQL cannot store.

    >>> r = prepare(["a", "b", "a", "c", "d"], ["x", " ", "y", None, "n\\x00"])
    >>> r.ids, r.texts, r.empty_ids, r.duplicate_ids, [i for i, _ in r.invalid]
    (['a'], ['y'], ['b', 'c'], 1, ['d'])
    """
    ids, texts = list(ids), list(texts)
    no_id = [row for row, value in enumerate(ids) if value is None or value != value]
    if no_id:
        shown = ", ".join(map(str, no_id[:10])) + (" ..." if len(no_id) > 10 else "")
        raise DataError(f"{len(no_id)} row(s) have no id in {id_col!r} (rows {shown}). Every row "
                        "needs an id: fix the input or choose another ID_COL.")
    last: dict[str, str] = {}   # id -> text; re-inserting moves a repeated id to its last place
    origin: dict[str, int] = {}  # id -> the input row its text came from (its source, metadata)
    empty_ids, kept = [], 0
    for n, (row_id, text) in enumerate(zip(map(str, ids), texts)):
        if is_missing(text):
            empty_ids.append(row_id)
            continue
        kept += 1
        last.pop(row_id, None)
        last[row_id], origin[row_id] = str(text), n
    if empty_ids:
        log.warning("%d rows with empty text are not sent (ids: %s%s)", len(empty_ids),
                    ", ".join(empty_ids[:5]), " ..." if len(empty_ids) > 5 else "")
    repeated = repeated_ids([i for i, t in zip(map(str, ids), texts) if not is_missing(t)])
    if kept > len(last):
        log.warning("%d rows repeat an id already seen (%s); the last one of each id wins",
                    kept - len(last), ", ".join(repeated))
    invalid = [(i, NUL_REASON) for i, t in last.items() if "\x00" in t]
    for row_id, _ in invalid:
        del last[row_id]
    pick = (lambda values: [values[origin[i]] for i in last] if len(values) else [])
    return Rows(list(last), list(last.values()), len(ids), empty_ids, kept - len(last) - len(invalid),
                invalid, repeated, pick(list(sources)), pick(list(meta)))


def text_md5(text: str) -> str:
    """The hash PostgreSQL's md5(text) gives, to spot rows stored unchanged."""
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def drop_unchanged(conn, target: Target, rows: Rows, window: Window | None = None,
                   policy: str = "chunk") -> tuple[list[int], int, set[str]]:
    """Positions of rows to write, the count stored unchanged, and the ids already stored.

    A row is unchanged when its stored text has the same md5 and it has a vector; with
    EMBED_LONG_TEXTS=chunk a long row must also have its chunks (a row stored before
    chunking existed is embedded again, in chunks).
    """
    stored = db.stored_state(conn, target.table, target.id_col, target.text_col,
                             target.chunks_table, rows.ids)
    if not stored:
        return list(range(len(rows.ids))), 0, set()
    same = [i for i, (row_id, text) in enumerate(zip(rows.ids, rows.texts))
            if row_id in stored and stored[row_id][0] == text_md5(text)]
    redo = set()
    if window is not None and policy == "chunk":
        check = [i for i in same if not stored[rows.ids[i]][1]
                 and len(rows.texts[i].encode("utf-8", "surrogatepass")) > window.max_tokens]
        counts = window.counter.count([rows.texts[i] for i in check])
        redo = {i for i, n in zip(check, counts) if n > window.max_tokens}
    unchanged = set(same) - redo
    todo = [i for i in range(len(rows.ids)) if i not in unchanged]
    return todo, len(unchanged), set(stored)


def known_dimension(settings, identity: Identity, *, conn=None, table: str | None = None,
                    cache=None) -> tuple[int | None, str]:
    """The dimension without a request, and where it comes from: EMBEDDING_DIM, else the
    table, else the cache (when it holds exactly one for this model); (None, "") when only
    the first batch can tell. EMBED_DIMENSIONS, when set, is the dimension asked for."""
    asked, source = dimensions.expected(settings)
    if asked:
        return asked, source
    if settings.EMBEDDING_DIM:
        return settings.EMBEDDING_DIM, "EMBEDDING_DIM"
    if conn is not None and table:
        dim = db.table_dimension(conn, table)
        if dim:
            return dim, f"the dimension of the existing table {table}"
    if cache is not None:
        dims = cache.dims(identity.route, identity.model, identity.normalized)
        if len(dims) == 1:
            return dims[0], "the dimension the cache holds for this model"
    return None, ""


def in_cache(cache, identity: Identity, texts: Sequence[str]) -> set[str]:
    """Which texts the cache holds, without reading their vectors (for the plan)."""
    if cache is None or not texts or not identity.dim:
        return set()
    return cache.contains(identity, list(texts))


def write(conn, target: Target, pieces: Pieces, done: Done, *, upsert: bool,
          assume_new: bool, annotations: dict | None = None) -> int:
    """Write completed rows (and the chunks of long ones) in one transaction; then, for an
    annotated target, their source and metadata (`annotations`: id -> (source, metadata)),
    keyed by id: a run stopped between the two leaves rows the next run sees as changed in
    metadata only, and updates without embedding."""
    if not done.rows:
        return 0
    row_ids = [pieces.ids[r] for r in done.rows]
    chunks = [(pieces.ids[r], k, start, end, vector) for r, k, start, end, vector in done.chunks]
    written = db.write_rows(conn, target.table, target.id_col, target.text_col, row_ids,
                            [pieces.row_texts[r] for r in done.rows], done.vectors, upsert=upsert,
                            assume_new=assume_new, chunks=chunks, chunks_table=target.chunks_table)
    if target.annotated and annotations:
        notes = [annotations.get(i, (None, None)) for i in row_ids]
        metadata.write(conn, target.table, target.id_col, row_ids, [n[0] for n in notes],
                       [n[1] for n in notes])
    return written
