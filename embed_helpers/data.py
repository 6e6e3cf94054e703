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
from .synthea import (CONTEXT_ID, CONTEXT_TEXT, _first_patients, _missing,  # noqa: F401
                      build_contexts, clean_synthea, load_synthea, reference_date)

logger = logging.getLogger(__name__)

def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer or None (no limit), got {limit!r}")


def _header(path: Path) -> list[str]:
    try:
        return list(pd.read_csv(path, nrows=0).columns)
    except (pd.errors.EmptyDataError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read {path} as a CSV file with a header row: {exc}") from exc


def load_table(path: str | Path, id_col: str, text_col: str,
               limit: int | None = None) -> pd.DataFrame:
    """Step 3 for a plain CSV: read only the id and text columns, ids as strings.

    Rows come back as read: empty texts and repeated ids are the plan's business
    (`steps.prepare` lists and resolves them); an empty id becomes missing (None) so it
    is reported rather than stored as "".

    Returns:
        DataFrame with columns [id_col, text_col], first `limit` rows when given.
    """
    _check_limit(limit)
    p = project_path(path)
    if not p.is_file():
        raise _missing(p, "CSV file")
    from .csv_rows import read_csv_columns  # the one CSV reader: strict about quotes
    df = pd.DataFrame(read_csv_columns(p, id_col, text_col, limit), columns=[id_col, text_col],
                      dtype=object)
    logger.info("loaded %d rows from %s", len(df), p)
    return df


def load_input(path: str | Path, id_col: str | None = None, text_col: str | None = None,
               limit: int | None = None) -> tuple[pd.DataFrame, str, str]:
    """Steps 3-5 for DATA_PATH: a Synthea folder gives patient contexts, a CSV file its rows.

    `limit` keeps the first N patients (Synthea, patients.csv order) or the first N rows.

    Returns:
        (DataFrame, id column name, text column name).
    """
    _check_limit(limit)
    p = project_path(path)
    if p.is_dir():
        if not (p / "patients.csv").is_file():
            raise DataError(f"{p} is a folder without patients.csv; DATA_PATH must be a Synthea "
                            "CSV folder or a CSV file")
        if id_col not in (None, "", CONTEXT_ID) or text_col not in (None, "", CONTEXT_TEXT):
            logger.warning("ID_COL/TEXT_COL (%s, %s) ignored for a Synthea folder: its "
                           "columns are %s, %s", id_col, text_col, CONTEXT_ID, CONTEXT_TEXT)
        tables = load_synthea(p)
        # Ages count to the whole data set's latest date, so a patient's text (and cache key)
        # is the same with or without a limit.
        as_of = reference_date(tables)
        if limit is not None:
            tables = _first_patients(tables, limit)
        return build_contexts(clean_synthea(tables), as_of=as_of), CONTEXT_ID, CONTEXT_TEXT
    if not p.exists():
        raise _missing(p, "DATA_PATH")
    if not id_col or not text_col:
        raise DataError(f"{p.name} is a CSV file: set ID_COL and TEXT_COL to two of its "
                        f"columns: {', '.join(_header(p))}")
    return load_table(p, id_col, text_col, limit), id_col, text_col
