"""Synthea's CSV export into one context text per patient (Steps 3-5 for Synthea input).

Six files (`patients`, `conditions`, `medications`, `allergies`, `careplans`,
`immunizations`) are read as text, cleaned (dates, whitespace, rows of unknown patients),
and turned into one deterministic text per patient: what describes the patient's health
now, no names or identifiers, ages counted to the data set's latest date so the text (and
its cache key) never drifts. GUIDE.md explains the format.
"""
from __future__ import annotations

import logging
import re
from datetime import datetime
from pathlib import Path

import pandas as pd

from .constants import PROJECT_ROOT, project_path
from .errors import DataError

logger = logging.getLogger(__name__)

SYNTHEA_TABLES = ("patients", "conditions", "medications", "allergies", "careplans",
                  "immunizations")
#: Columns the context builder reads; other columns may come and go between Synthea releases.
_EVENT = ("START", "STOP", "PATIENT", "DESCRIPTION")
SYNTHEA_REQUIRED = {"patients": ("Id", "BIRTHDATE", "DEATHDATE", "GENDER", "RACE", "ETHNICITY",
                                 "MARITAL", "CITY", "COUNTY"),
                    "conditions": _EVENT, "medications": _EVENT, "allergies": _EVENT,
                    "careplans": (*_EVENT, "REASONDESCRIPTION"),
                    "immunizations": ("DATE", "PATIENT", "DESCRIPTION")}
DATE_COLUMNS = ("BIRTHDATE", "DEATHDATE", "START", "STOP", "DATE")
CONTEXT_ID, CONTEXT_TEXT = "patient_id", "context_text"
#: (table, heading, items listed before "and N more"). Long lists mostly repeat the same kind
#: of finding, and a small local model reads only the first ~256 word pieces of a text.
SECTIONS = (("conditions", "Active conditions", 15), ("medications", "Current medications", 10),
            ("allergies", "Allergies", 10), ("careplans", "Active care plans", 10),
            ("immunizations", "Immunizations", 10))
MARITAL = {"M": "married", "S": "single", "D": "divorced", "W": "widowed"}
# SNOMED semantic tags ("(disorder)", "(finding)") end most descriptions; they add no meaning
# to a patient summary and would dominate its shared vocabulary.
_SEMANTIC_TAG = re.compile(r"\s*\((disorder|finding|procedure|substance|situation|person|"
                           r"organism|record artifact|regime/therapy|observable entity)\)$")



def missing_file(path: Path, what: str) -> DataError:
    return DataError(f"{what} not found: {path} (relative paths are resolved from the project "
                     f"root, {PROJECT_ROOT})")


def load_synthea(folder: str | Path) -> dict[str, pd.DataFrame]:
    """Step 3 for Synthea: read the six CSVs of a Synthea export as strings.

    Everything is read as text so nothing is guessed (ids, codes, costs with float noise);
    dates are parsed in `clean_synthea`.
    """
    root = project_path(folder)
    if not root.is_dir():
        raise missing_file(root, "Synthea folder")
    absent = [f"{n}.csv" for n in SYNTHEA_TABLES if not (root / f"{n}.csv").is_file()]
    if absent:
        raise DataError(f"Synthea folder {root} lacks {', '.join(absent)}; it needs all of "
                        f"{', '.join(n + '.csv' for n in SYNTHEA_TABLES)}.")
    tables = {}
    for name in SYNTHEA_TABLES:
        df = pd.read_csv(root / f"{name}.csv", dtype=str)
        lacking = [c for c in SYNTHEA_REQUIRED[name] if c not in df.columns]
        if lacking:
            raise DataError(f"{root / name}.csv has no column {', '.join(lacking)}; its "
                            f"columns are: {', '.join(df.columns)}")
        tables[name] = df
    logger.info("loaded Synthea from %s: %s", root,
                ", ".join(f"{n} {len(t)}" for n, t in tables.items()))
    return tables


def _clean_text(s: pd.Series) -> pd.Series:
    """Strip, collapse inner whitespace runs, and turn empty strings into missing values."""
    s = s.str.strip().str.replace(r"\s+", " ", regex=True)
    return s.mask(s == "")


def _parse_dates(s: pd.Series) -> pd.Series:
    # Plain dates and "...Z" UTC timestamps share one column type: naive UTC datetimes.
    parsed = pd.to_datetime(s, utc=True, format="ISO8601", errors="coerce").dt.tz_localize(None)
    bad = int((parsed.isna() & s.notna()).sum())
    if bad:
        logger.warning("%d values of %s are not dates; treated as missing", bad, s.name)
    return parsed


def clean_synthea(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Step 4: strip whitespace, parse dates, drop rows of unknown patients (logs counts).

    Returns new DataFrames; the input dict is left as it was.
    """
    out = {}
    for name, df in tables.items():
        out[name] = df = df.copy()
        for col in df.columns:
            df[col] = _clean_text(df[col])
            if col in DATE_COLUMNS:
                df[col] = _parse_dates(df[col])
    patients = out["patients"]
    keep = patients["Id"].notna() & ~patients["Id"].duplicated()
    if not keep.all():
        logger.warning("patients: dropped %d rows with an empty or repeated Id", (~keep).sum())
    out["patients"] = patients[keep].reset_index(drop=True)
    known = set(out["patients"]["Id"])
    for name in SYNTHEA_TABLES[1:]:
        df = out[name]
        ok = df["PATIENT"].isin(known)
        out[name] = df[ok].reset_index(drop=True)
        logger.info("clean %s: kept %d rows, dropped %d of unknown patients",
                    name, int(ok.sum()), int((~ok).sum()))
    return out


def age_years(birth: datetime, end: datetime) -> int:
    """Whole years from `birth` to `end`.

    >>> age_years(datetime(2000, 7, 14), datetime(2021, 7, 13))
    20
    >>> age_years(datetime(2000, 7, 13), datetime(2021, 7, 13))
    21
    """
    return end.year - birth.year - ((end.month, end.day) < (birth.month, birth.day))


def label(description: str) -> str:
    """A description without its trailing SNOMED semantic tag.

    >>> label("Acute bronchitis (disorder)")
    'Acute bronchitis'
    >>> label("Hib (PRP-OMP)")
    'Hib (PRP-OMP)'
    """
    return _SEMANTIC_TAG.sub("", description)


def format_list(items, cap: int) -> str:
    """De-duplicate, sort (case-insensitively), cap at `cap` items, join with "; ".

    Items may contain commas, hence the semicolon.

    >>> format_list(["b", "A", "b"], cap=5)
    'A; b'
    >>> format_list(["d", "c", "b", "a"], cap=2)
    'a; b; and 2 more'
    >>> format_list([], cap=5)
    'none recorded'
    """
    unique = sorted(set(items), key=lambda s: (s.casefold(), s))
    if not unique:
        return "none recorded"
    shown = "; ".join(unique[:cap])
    return shown if len(unique) <= cap else f"{shown}; and {len(unique) - cap} more"


def reference_date(tables: dict[str, pd.DataFrame]) -> datetime:
    """The latest date anywhere in the tables: "today" for ages, so output never drifts.

    Works on raw (string) or cleaned tables.
    """
    latest = [(df[c] if pd.api.types.is_datetime64_any_dtype(df[c])
               else _parse_dates(_clean_text(df[c]))).max()
              for df in tables.values() for c in DATE_COLUMNS if c in df.columns]
    latest = [d for d in latest if pd.notna(d)]
    if not latest:
        raise DataError("the Synthea tables hold no dates; cannot compute ages")
    return max(latest).to_pydatetime()


def _demographics(p, as_of: datetime) -> str:
    gender = p.GENDER if pd.notna(p.GENDER) else "gender unknown"
    parts = [{"F": "female", "M": "male"}.get(gender, gender)]
    if pd.notna(p.BIRTHDATE):
        if pd.notna(p.DEATHDATE):
            parts.append(f"died {p.DEATHDATE:%Y-%m-%d} at age "
                         f"{age_years(p.BIRTHDATE, p.DEATHDATE)}")
        else:
            parts.append(f"age {age_years(p.BIRTHDATE, as_of)}")
    elif pd.notna(p.DEATHDATE):
        parts.append(f"died {p.DEATHDATE:%Y-%m-%d}")
    for field, value in (("race", p.RACE), ("ethnicity", p.ETHNICITY),
                         ("marital status", MARITAL.get(p.MARITAL, p.MARITAL))):
        if pd.notna(value):
            parts.append(f"{field} {value}")
    place = ", ".join(v for v in (p.CITY, p.COUNTY) if pd.notna(v))
    if place:
        parts.append(f"lives in {place}")
    return "; ".join(parts)


def _items(df: pd.DataFrame, text: pd.Series) -> dict[str, list[str]]:
    return text.groupby(df["PATIENT"]).agg(list).to_dict() if len(df) else {}


def build_contexts(tables: dict[str, pd.DataFrame], *,
                   as_of: datetime | None = None) -> pd.DataFrame:
    """Step 5: one deterministic context text per patient, in patients.csv order.

    Format (one line per section; lists de-duplicated, sorted, capped with "and N more",
    SNOMED tags like "(disorder)" removed, empty lists written "none recorded")::

        Patient: female; age 14; race white; ethnicity nonhispanic; lives in Morecambe, Lancashire
        Active conditions: <STOP empty>
        Current medications: <STOP empty>
        Allergies: <STOP empty>
        Active care plans: <plan (for reason)>, STOP empty
        Immunizations: <vaccine (latest YYYY-MM-DD)>, one per distinct vaccine

    Age is at death, else at `as_of` (default: the latest date in the data, `reference_date`),
    never today, so the text and its cached embedding do not drift. Names, SSN, passport,
    driver's licence, address, postcode and coordinates are never included. Raw
    `load_synthea` tables are accepted too (they are cleaned first).

    Returns:
        DataFrame(patient_id, context_text, gender).
    """
    if not pd.api.types.is_datetime64_any_dtype(tables["patients"]["BIRTHDATE"]):
        tables = clean_synthea(tables)  # raw load_synthea output: dates are still strings
    as_of = as_of or reference_date(tables)
    active = {n: tables[n][tables[n]["STOP"].isna() & tables[n]["DESCRIPTION"].notna()]
              for n in ("conditions", "medications", "allergies", "careplans")}
    sections = {n: _items(df, df["DESCRIPTION"].map(label)) for n, df in active.items()}
    plans = active["careplans"]
    # Built per row, not with Series arithmetic: with pyarrow installed, pandas gives an
    # all-missing reason column a float dtype, and "str + float" raises.
    sections["careplans"] = _items(plans, pd.Series(
        [label(d) if pd.isna(r) else f"{label(d)} (for {label(r)})"
         for d, r in zip(plans["DESCRIPTION"], plans["REASONDESCRIPTION"])],
        index=plans.index, dtype=object))
    imm = tables["immunizations"].dropna(subset=["DESCRIPTION"])
    latest = imm.groupby(["PATIENT", "DESCRIPTION"], as_index=False)["DATE"].max()
    sections["immunizations"] = _items(latest, latest["DESCRIPTION"] + latest["DATE"].map(
        lambda d: f" (latest {d:%Y-%m-%d})" if pd.notna(d) else ""))
    rows = []
    for p in tables["patients"].itertuples(index=False):
        lines = [f"Patient: {_demographics(p, as_of)}"]
        lines += [f"{heading}: {format_list(sections[n].get(p.Id, []), cap)}"
                  for n, heading, cap in SECTIONS]
        rows.append((p.Id, "\n".join(lines), p.GENDER if pd.notna(p.GENDER) else None))
    # gender beside the text: a column a search can be filtered on (KEEP_COLS=gender)
    df = pd.DataFrame(rows, columns=[CONTEXT_ID, CONTEXT_TEXT, "gender"])
    logger.info("built %d patient contexts (ages as of %s)", len(df), f"{as_of:%Y-%m-%d}")
    return df


def first_patients(tables: dict[str, pd.DataFrame], n: int) -> dict[str, pd.DataFrame]:
    from .readers import check_limit
    check_limit(n)  # head(-5) would drop the last five
    # Trim before cleaning so Step 4 does not report the other patients' rows as "unknown".
    patients = tables["patients"].head(n)
    ids = set(patients["Id"].str.strip())
    out = {name: df[df["PATIENT"].str.strip().isin(ids)] for name, df in tables.items()
           if name != "patients"}
    return {"patients": patients, **out}
