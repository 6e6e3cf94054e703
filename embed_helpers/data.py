"""Steps 3-5: load the input rows, clean them, and build one text per row to embed.

Two kinds of input: a Synthea CSV export folder (six files -> one context text per patient) or
any CSV file with an id column and a text column. Relative paths are resolved from the project
root, never from the current directory (papermill and nbval run from different folders).
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from .constants import project_path
from .errors import DataError
from .readers import check_limit as _check_limit
from .synthea import (CONTEXT_ID, CONTEXT_TEXT, first_patients, missing_file,  # noqa: F401
                      build_contexts, clean_synthea, load_synthea, reference_date)

logger = logging.getLogger(__name__)



def _header(path: Path) -> list[str]:
    try:
        return list(pd.read_csv(path, nrows=0).columns)
    except (pd.errors.EmptyDataError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read {path} as a CSV file with a header row: {exc}") from exc


def load_table(path: str | Path, id_col: str, text_col: str, limit: int | None = None,
               encoding: str | None = None, keep=(), with_source: bool = False) -> pd.DataFrame:
    """Step 3 for a CSV or Parquet file or a folder of them: read only the id and text
    columns, ids as strings (`readers.read_columns`, the reader of both engines).

    Rows come back as read: empty texts and repeated ids are the plan's business
    (`steps.prepare` lists and resolves them); a row that cannot be read exactly (fields
    shifted by an unquoted comma, an empty id) stops the load with its file line.

    `encoding`: the files' text encoding; None = EMBED_INPUT_ENCODING (environment, .env).
    `keep`: more columns to read (KEEP_COLS); `with_source`: each row's file name too, and
    the files read in `df.attrs` (what sync's scope is, `sync.py`).

    Returns:
        DataFrame with columns [id_col, text_col], first `limit` rows when given.
    """
    _check_limit(limit)
    if encoding is None:  # the notebook's path: its settings come from the same place
        from .config import load_settings
        encoding = load_settings().EMBED_INPUT_ENCODING
    p = project_path(path)
    if not p.exists():
        raise missing_file(p, "CSV file")
    from .readers import SOURCE_KEY, read_columns, source_labels
    columns = [id_col, text_col, *keep] + ([SOURCE_KEY] if with_source else [])
    df = pd.DataFrame(read_columns(p, id_col, text_col, limit, encoding, keep, with_source),
                      columns=columns, dtype=object)
    if with_source:
        df.attrs.update(sources=source_labels(p), partial=limit is not None)
    logger.info("loaded %d rows from %s", len(df), p)
    return df


def load_input(path: str | Path, id_col: str | None = None, text_col: str | None = None,
               limit: int | None = None, encoding: str | None = None, keep=(),
               with_source: bool = False) -> tuple[pd.DataFrame, str, str]:
    """Steps 3-5 for DATA_PATH: a Synthea folder gives patient contexts; a CSV or Parquet
    file, or a folder of them, its rows.

    `limit` keeps the first N patients (Synthea, patients.csv order) or the first N rows.

    Returns:
        (DataFrame, id column name, text column name).
    """
    _check_limit(limit)
    p = project_path(path)
    if is_synthea(p):
        if id_col not in (None, "", CONTEXT_ID) or text_col not in (None, "", CONTEXT_TEXT):
            logger.warning("ID_COL/TEXT_COL (%s, %s) ignored for a Synthea folder: its "
                           "columns are %s, %s", id_col, text_col, CONTEXT_ID, CONTEXT_TEXT)
        tables = load_synthea(p)
        # Ages count to the whole data set's latest date, so a patient's text (and cache key)
        # is the same with or without a limit.
        as_of = reference_date(tables)
        if limit is not None:
            tables = first_patients(tables, limit)
        return build_contexts(clean_synthea(tables), as_of=as_of), CONTEXT_ID, CONTEXT_TEXT
    if not p.exists():
        raise missing_file(p, "DATA_PATH")
    if not id_col or not text_col:
        columns = f": {', '.join(_header(p))}" if p.is_file() and p.suffix != ".parquet" else ""
        raise DataError(f"{p.name} is not a Synthea folder (no patients.csv): set ID_COL and "
                        f"TEXT_COL (--id-col, --text-col) to two of its columns{columns}")
    return load_table(p, id_col, text_col, limit, encoding, keep, with_source), id_col, text_col


def is_synthea(path: Path) -> bool:
    """A Synthea CSV export folder (patients.csv and the rest), not a folder of plain files."""
    return path.is_dir() and (path / "patients.csv").is_file()
