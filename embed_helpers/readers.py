"""The one reader of input files, for both engines: a CSV or Parquet file, or a folder of them.

The workflow reads the whole input (`read_columns`) for the plan, whichever engine then
carries it out, so nothing is started or paid for a file that cannot be read exactly.
Every path gives the same rows: the id and text columns, ids as text, files in name order.
"""
from __future__ import annotations

import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

from .constants import INPUT_ERRORS_SHOWN, READ_BLOCK_ROWS
from .csv_rows import iter_csv_blocks
from .errors import DataError

SUFFIXES = (".csv", ".parquet")
#: The column of `read_columns(..., with_source=True)` naming the file each row came from.
SOURCE_KEY = "__source__"


def is_blank(text) -> bool:
    """A text with nothing to embed: empty, or only spaces and invisible characters (zero-width
    spaces, BOMs, no-break spaces, soft hyphens...), which a model would read as "".

    >>> [is_blank(t) for t in ("", " \\u00a0", "\\u200b\\ufeff\\u2060", "\\u00ad", "a\\u200b")]
    [True, True, True, True, False]
    """
    return isinstance(text, str) and all(c.isspace() or unicodedata.category(c) == "Cf"
                                         for c in text)


def repeated_ids(ids) -> list[str]:
    """The first few ids that occur more than once, in input order, with their counts.

    >>> repeated_ids(["a", "b", "a", "c", "b", "a"])
    ['a (3 rows)', 'b (2 rows)']
    """
    counts = Counter(ids)
    shown = [f"{i} ({n} rows)" for i, n in counts.items() if n > 1]
    return shown[:INPUT_ERRORS_SHOWN] + (["..."] if len(shown) > INPUT_ERRORS_SHOWN else [])


def check_limit(limit) -> None:
    """None (no limit) or a whole number of rows >= 1; a negative one would drop rows."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"LIMIT (--limit) must be a whole number of rows >= 1, or 0/None for "
                        f"all rows; got {limit!r}")


def input_files(path: Path) -> list[Path]:
    """The file itself, or the folder's CSV and Parquet files in name order."""
    if path.is_file():
        return [path]
    if not path.exists():
        raise DataError(f"{path} not found: DATA_PATH (--data) must be a CSV or Parquet file, "
                        "or a folder of them (relative paths are from the project root)")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES) \
        if path.is_dir() else []
    if not files:
        raise DataError(f"{path}: expected a CSV or Parquet file, or a folder of them")
    return files


def iter_file_columns(path: Path | str, id_col: str, text_col: str, block: int = READ_BLOCK_ROWS,
                      limit: int | None = None,
                      encoding: str = "utf-8") -> Iterator[tuple[list, list, int]]:
    """(ids, texts, number of the block's first row) of one CSV or Parquet file."""
    for ids, texts, first, _kept in iter_file_blocks(path, id_col, text_col, block, limit,
                                                     encoding):
        yield ids, texts, first


def iter_file_blocks(path: Path | str, id_col: str, text_col: str, block: int = READ_BLOCK_ROWS,
                     limit: int | None = None, encoding: str = "utf-8",
                     keep: Sequence[str] = ()) -> Iterator[tuple[list, list, int, dict]]:
    """`iter_file_columns` plus the `keep` columns ({column: values}) of each block."""
    if str(path).lower().endswith(".parquet"):
        yield from _iter_parquet(Path(path), id_col, text_col, block, limit, keep)
    else:
        yield from iter_csv_blocks(path, id_col, text_col, block, limit, encoding, keep)


def _iter_parquet(path: Path, id_col: str, text_col: str, block: int, limit: int | None,
                  keep: Sequence[str] = ()):
    import pyarrow.parquet as pq
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    absent = [c for c in (id_col, text_col) if c not in names]
    if absent:
        raise DataError(f"{path.name} has no column {', '.join(map(repr, absent))}; its columns "
                        f"are: {', '.join(names)}. Set ID_COL and TEXT_COL "
                        "(--id-col, --text-col) to two of them.")
    if [c for c in keep if c not in names]:
        raise DataError(f"{path.name} has no column {', '.join(repr(c) for c in keep if c not in names)}"
                        f" to keep; its columns are: {', '.join(names)}. Set KEEP_COLS "
                        "(--keep-cols) to some of them.")
    first, no_id = 0, []
    for chunk in parquet.iter_batches(block, columns=list(dict.fromkeys([id_col, text_col, *keep]))):
        ids = [None if v is None else str(v).strip() for v in chunk.column(id_col).to_pylist()]
        texts = chunk.column(text_col).to_pylist()
        end = len(ids) if limit is None else max(limit - first, 0)
        ids, texts = ids[:end], texts[:end]
        kept = {c: chunk.column(c).to_pylist()[:end] for c in keep}
        no_id += [first + n + 1 for n, v in enumerate(ids) if not v]
        if ids and not no_id:
            yield ids, texts, first, kept
        first += len(ids)
        if limit is not None and first >= limit:
            break
    if no_id:
        raise DataError(f"{path}: {len(no_id)} row(s) have no id in {id_col!r} (rows "
                        f"{', '.join(map(str, no_id[:INPUT_ERRORS_SHOWN]))}, counting from 1). "
                        "Every row needs an id: fill them in, or choose another ID_COL.")


def _blocks(path: Path, id_col: str, text_col: str, limit: int | None, encoding: str,
            keep: Sequence[str] = ()):
    """Every block of every file (with the file's name), up to `limit` rows in all; then the
    all-empty check."""
    check_limit(limit)
    rows = filled = 0
    for file in input_files(path):
        left = None if limit is None else limit - rows
        if left is not None and left <= 0:
            break
        for ids, texts, _first, kept in iter_file_blocks(file, id_col, text_col, limit=left,
                                                         encoding=encoding, keep=keep):
            rows += len(ids)
            filled += sum(1 for t in texts if t is not None and not is_blank(t))
            yield ids, texts, kept, file.name
    if rows and not filled:
        raise DataError(f"{path}: all {rows} rows have an empty text in {text_col!r}: nothing to "
                        "embed. Is TEXT_COL (--text-col) the column that holds the texts?")


def source_labels(path: Path | str) -> list[str]:
    """The names sync knows the input's files by (`sync.py`): each file's name, so that a run
    over one file of a folder and a run over the folder agree."""
    return [file.name for file in input_files(Path(path))]


def read_columns(path: Path | str, id_col: str, text_col: str, limit: int | None = None,
                 encoding: str = "utf-8", keep: Sequence[str] = (),
                 with_source: bool = False) -> dict[str, list]:
    """{id_col: [...], text_col: [...]}: the first `limit` rows (all when None) of a CSV or
    Parquet file or a folder of them; plus the `keep` columns (KEEP_COLS), and with
    `with_source` the name of the file each row came from (under SOURCE_KEY)."""
    columns: dict[str, list] = {id_col: [], text_col: [], **{c: [] for c in keep}}
    sources: list[str] = []
    for block_ids, block_texts, kept, name in _blocks(Path(path), id_col, text_col, limit,
                                                      encoding, keep):
        columns[id_col] += block_ids
        columns[text_col] += block_texts
        for column, values in kept.items():
            columns[column] += values
        sources += [name] * len(block_ids)
    return {**columns, SOURCE_KEY: sources} if with_source else columns
