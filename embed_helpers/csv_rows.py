"""Two columns of a CSV file without pandas: the one CSV reader of the project.

Importing pandas costs about 0.2 s, a fifth of a warm rerun's start-up; a file of ids and
texts needs none of it. Every value is text, and an empty id becomes None so that it is
reported instead of stored. A quote that is never closed would swallow every row after it
into one text: the reader is strict, and says on which line the bad field starts.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Iterator

from .errors import DataError


def iter_csv_columns(path: Path | str, id_col: str, text_col: str, block: int = 10_000,
                     limit: int | None = None) -> Iterator[tuple[list, list, int]]:
    """(ids, texts, number of the block's first row) for blocks of up to `block` rows."""
    path = Path(path)
    csv.field_size_limit(sys.maxsize)  # abstracts can exceed csv's 128 KB default
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh, strict=True)
            header = next(reader, [])
            absent = [c for c in (id_col, text_col) if c not in header]
            if absent:
                raise DataError(f"{path.name} has no column {', '.join(map(repr, absent))}; its "
                                f"columns are: {', '.join(header)}. Set ID_COL and TEXT_COL to "
                                "two of them.")
            i, j = header.index(id_col), header.index(text_col)
            ids, texts, seen, first, line = [], [], 0, 0, reader.line_num
            for row in reader:
                if limit is not None and seen >= limit:
                    break
                line = reader.line_num
                if not row:
                    continue
                ids.append(row[i].strip() or None if i < len(row) else None)
                texts.append(row[j] if j < len(row) else None)
                seen += 1
                if len(ids) >= block:
                    yield ids, texts, first
                    first, ids, texts = seen, [], []
            if ids:
                yield ids, texts, first
    except UnicodeDecodeError as exc:
        raise DataError(f"cannot read {path} as a UTF-8 CSV file: {exc}") from None
    except csv.Error as exc:
        raise DataError(f"{path}, line {line + 1}: {_explain(exc)}. No row was ingested from "
                        f"this file: fix it and run again.") from None


def _explain(exc: csv.Error) -> str:
    if "unexpected end of data" in str(exc):
        return ("a quoted field starts here and its closing quote never comes (an "
                "unterminated \"): every row after it would be swallowed into one text")
    return f"not valid CSV ({exc})"


def read_csv_columns(path: Path | str, id_col: str, text_col: str,
                     limit: int | None = None) -> dict[str, list]:
    """{id_col: [...], text_col: [...]} for the first `limit` rows (all when None)."""
    ids, texts = [], []
    for block_ids, block_texts, _first in iter_csv_columns(path, id_col, text_col, limit=limit):
        ids += block_ids
        texts += block_texts
    return {id_col: ids, text_col: texts}
