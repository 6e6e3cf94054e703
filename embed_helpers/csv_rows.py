"""Two columns of a CSV file without pandas: the one CSV reader of the project.

Importing pandas costs about 0.2 s, a fifth of a warm rerun's start-up; a file of ids and
texts needs none of it. Every value is text. The reader is strict, because a hand-made CSV
that is read almost right loses data silently: a quote that is never closed swallows every
row after it, and an unquoted comma in a text shifts the fields after it (`1,pain, nausea`
would store the text `pain`; with the header `text,id`, `pain, nausea,42` the id `nausea`).
So a row with more or fewer fields than the header, an empty id, or bytes that are not of
the file's encoding stop the file, with the line they are on. A UTF-8 BOM (Excel's
"CSV UTF-8") is dropped.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Iterator, Sequence

from .constants import INPUT_ERRORS_SHOWN, PREVIEW_CHARS, READ_BLOCK_ROWS
from .errors import DataError

BOM = "\ufeff"
QUOTE_FIX = ('A comma inside a text must be quoted: put the text in double quotes, "like, '
             'this" (a quote inside it is written twice: "").')


def iter_csv_columns(path: Path | str, id_col: str, text_col: str, block: int = READ_BLOCK_ROWS,
                     limit: int | None = None,
                     encoding: str = "utf-8") -> Iterator[tuple[list, list, int]]:
    """(ids, texts, number of the block's first row) for blocks of up to `block` rows.

    Raises DataError at the first row that does not have the header's number of fields,
    and, once the file (or `limit`) is read, when some ids are empty (their lines listed).
    """
    for ids, texts, first, _kept in iter_csv_blocks(path, id_col, text_col, block, limit, encoding):
        yield ids, texts, first


def iter_csv_blocks(path: Path | str, id_col: str, text_col: str, block: int = READ_BLOCK_ROWS,
                    limit: int | None = None, encoding: str = "utf-8",
                    keep: Sequence[str] = ()) -> Iterator[tuple[list, list, int, dict]]:
    """`iter_csv_columns` plus the `keep` columns of each block ({column: values}; an empty
    field is None: a CSV cannot tell an empty text from a missing value)."""
    path = Path(path)
    csv.field_size_limit(sys.maxsize)  # abstracts can exceed csv's 128 KB default
    line = 0
    try:
        with open(path, newline="", encoding=_python_codec(encoding)) as fh:
            reader = csv.reader(fh, strict=True)
            header = _header(path, next(reader, []), id_col, text_col, keep)
            i, j = header.index(id_col), header.index(text_col)
            extra = {c: header.index(c) for c in keep}
            ids, texts, seen, first, no_id = [], [], 0, 0, []
            kept: dict[str, list] = {c: [] for c in keep}
            line = reader.line_num
            for row in reader:
                if limit is not None and seen >= limit:
                    break
                start, line = line + 1, reader.line_num  # a quoted text may span lines
                if not row:
                    continue
                if len(row) != len(header):
                    raise _ragged(path, start, row, header)
                row_id = row[i].strip()
                if not row_id:
                    no_id.append(start)
                ids.append(row_id)
                texts.append(row[j])
                for column, at in extra.items():
                    kept[column].append(row[at] or None)
                seen += 1
                if len(ids) >= block:
                    yield ids, texts, first, kept
                    first, ids, texts, kept = seen, [], [], {c: [] for c in keep}
            if no_id:
                raise _empty_ids(path, no_id, id_col)
            if ids:
                yield ids, texts, first, kept
    except UnicodeDecodeError as exc:
        raise _undecodable(path, encoding, exc) from None
    except csv.Error as exc:
        raise DataError(f"{path}, line {line + 1}: {_explain(exc)}. No row was ingested from "
                        f"this file: fix it and run again.") from None


def _python_codec(encoding: str) -> str:
    """utf-8 read as utf-8-sig: the same text, minus a BOM at the start."""
    return "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding


def _header(path: Path, header: list[str], id_col: str, text_col: str,
            keep: Sequence[str] = ()) -> list[str]:
    if header and header[0].startswith(BOM):  # a BOM in another encoding's clothes
        header[0] = header[0][1:]
    absent = [c for c in (id_col, text_col) if c not in header]
    if absent:
        raise DataError(f"{path.name} has no column {', '.join(map(repr, absent))}; its "
                        f"columns are: {', '.join(header)}. Set ID_COL and TEXT_COL (--id-col, "
                        "--text-col) to two of them.")
    absent = [c for c in keep if c not in header]
    if absent:
        raise DataError(f"{path.name} has no column {', '.join(map(repr, absent))} to keep; its "
                        f"columns are: {', '.join(header)}. Set KEEP_COLS (--keep-cols) to some "
                        "of them.")
    return header


def _ragged(path: Path, line: int, row: list[str], header: list[str]) -> DataError:
    shown = ",".join(row)
    shown = shown[:PREVIEW_CHARS] + ("..." if len(shown) > PREVIEW_CHARS else "")
    return DataError(f"{path}, line {line}: {len(row)} fields where the header "
                     f"({','.join(header)}) has {len(header)}: {shown!r}. {QUOTE_FIX} No row "
                     "was ingested from this file: fix it and run again.")


def _empty_ids(path: Path, lines: list[int], id_col: str) -> DataError:
    shown = ", ".join(map(str, lines[:INPUT_ERRORS_SHOWN]))
    more = f" and {len(lines) - INPUT_ERRORS_SHOWN} more" if len(lines) > INPUT_ERRORS_SHOWN else ""
    return DataError(f"{path}: {len(lines)} row(s) have an empty id in {id_col!r} (lines "
                     f"{shown}{more}). Every row needs an id: fill them in, or choose another "
                     "ID_COL (--id-col).")


def _undecodable(path: Path, encoding: str, exc: UnicodeDecodeError) -> DataError:
    """Which line holds the bytes that are not `encoding` (found again, line by line)."""
    where = ""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as bad:
                where = f", line {number} (byte {raw[bad.start:bad.start + 1]!r} at column " \
                        f"{bad.start + 1})"
                break
    return DataError(f"{path}{where}: not valid {encoding} ({exc.reason}). If the file was "
                     "saved in another encoding (Excel's plain \"CSV\" on Windows is cp1252), "
                     "pass --encoding cp1252 (EMBED_INPUT_ENCODING=cp1252), or save it as "
                     "\"CSV UTF-8\".")


def _explain(exc: csv.Error) -> str:
    if "unexpected end of data" in str(exc):
        return ("a quoted field starts here and its closing quote never comes (an "
                "unterminated \"): every row after it would be swallowed into one text")
    return f"not valid CSV ({exc})"


def read_csv_columns(path: Path | str, id_col: str, text_col: str, limit: int | None = None,
                     encoding: str = "utf-8") -> dict[str, list]:
    """{id_col: [...], text_col: [...]} for the first `limit` rows (all when None)."""
    ids, texts = [], []
    for block_ids, block_texts, _first in iter_csv_columns(path, id_col, text_col, limit=limit,
                                                           encoding=encoding):
        ids += block_ids
        texts += block_texts
    return {id_col: ids, text_col: texts}
