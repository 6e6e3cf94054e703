"""Steps 3-5 on the bundled sample (and on the full shared data when it is beside the project)."""
import shutil

import numpy as np
import pandas as pd
import pytest

from embed_helpers import csv_rows
from embed_helpers.constants import PROJECT_ROOT, SAMPLE_DIR
from embed_helpers.data import load_input, load_table
from embed_helpers.synthea import build_contexts, clean_synthea, label, load_synthea
from embed_helpers.errors import DataError

SYNTHEA = SAMPLE_DIR / "synthea"
PUBMED = SAMPLE_DIR / "pubmed"
SHARED = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def raw():
    return load_synthea(SYNTHEA)


@pytest.fixture(scope="module")
def contexts(raw):
    return build_contexts(clean_synthea(raw))


def section(text: str, heading: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(heading + ": "))
    return line[len(heading) + 2:].split("; ")


# ---- the sample itself --------------------------------------------------------------------

def test_sample_is_a_consistent_subset_with_the_needed_cases(raw):
    ids = set(raw["patients"]["Id"])
    assert len(ids) == len(raw["patients"]) == 100
    for name, df in raw.items():
        if name != "patients":
            assert set(df["PATIENT"]) <= ids, name
    assert raw["patients"]["DEATHDATE"].notna().sum() > 0
    assert raw["allergies"]["PATIENT"].nunique() > 0
    assert ids - set(raw["medications"]["PATIENT"])
    assert sum(p.stat().st_size for p in SAMPLE_DIR.rglob("*.csv")) < 2_000_000


def test_pubmed_sample_has_every_query_target_once():
    abstracts = pd.read_csv(PUBMED / "abstracts.csv", dtype=str)
    queries = pd.read_csv(PUBMED / "queries.csv", dtype=str)
    assert list(abstracts.columns) == ["pmid", "text"]
    assert abstracts["pmid"].is_unique and len(abstracts) == 200 and len(queries) == 50
    assert set(queries["pmid"]) <= set(abstracts["pmid"])
    assert sum(p.stat().st_size for p in PUBMED.glob("*.csv")) < 500_000


# ---- Step 5: contexts ---------------------------------------------------------------------

def test_one_context_per_patient_in_patients_order(raw, contexts):
    assert list(contexts.columns) == ["patient_id", "context_text", "gender"]
    assert len(contexts) == 100 and contexts["patient_id"].is_unique
    assert list(contexts["patient_id"]) == list(raw["patients"]["Id"])
    assert contexts["context_text"].str.len().min() > 100


def test_contexts_are_deterministic(raw, contexts):
    again = build_contexts(clean_synthea(raw))
    pd.testing.assert_frame_equal(contexts, again)
    # raw (uncleaned) tables are accepted and give the same texts
    pd.testing.assert_frame_equal(contexts, build_contexts(raw))


def test_no_identifiers_in_any_text(raw, contexts):
    everything = "\n".join(contexts["context_text"])
    assert "999-" not in everything  # Synthea's fake SSNs all start with 999
    p = raw["patients"]
    for col in ("SSN", "DRIVERS", "PASSPORT", "FIRST", "LAST", "ADDRESS"):
        for value in p[col].dropna():
            assert value not in everything, (col, value)


def test_active_conditions_listed_and_stopped_ones_not(raw, contexts):
    cond = raw["conditions"].assign(label=raw["conditions"]["DESCRIPTION"].map(label))
    text = dict(zip(contexts["patient_id"], contexts["context_text"]))
    checked_active = checked_stopped = 0
    for pid, rows in cond.groupby("PATIENT"):
        active = set(rows.loc[rows["STOP"].isna(), "label"])
        stopped_only = set(rows.loc[rows["STOP"].notna(), "label"]) - active
        listed = section(text[pid], "Active conditions")
        assert not stopped_only & set(listed), pid
        if not listed[-1].startswith("and "):  # capped lists show only the first items
            assert set(listed) == (active or {"none recorded"}), pid
            checked_active += bool(active)
        checked_stopped += bool(stopped_only)
    assert checked_active > 50 and checked_stopped > 50


def test_deceased_patients_have_age_at_death(raw, contexts):
    dead = raw["patients"].loc[raw["patients"]["DEATHDATE"].notna(), "Id"]
    text = contexts.set_index("patient_id")["context_text"]
    for pid in dead:
        assert " died " in text[pid].splitlines()[0]
    assert (~contexts["context_text"].str.contains(" died ")).sum() == 100 - len(dead)


def test_no_medications_and_allergies_sections(raw, contexts):
    text = contexts.set_index("patient_id")["context_text"]
    no_meds = set(raw["patients"]["Id"]) - set(raw["medications"]["PATIENT"])
    for pid in no_meds:
        assert section(text[pid], "Current medications") == ["none recorded"]
    allergic = raw["allergies"].iloc[0]
    assert label(allergic["DESCRIPTION"]) in section(text[allergic["PATIENT"]], "Allergies")


def test_clean_drops_rows_of_unknown_patients(raw):
    orphan = raw["conditions"].head(1).assign(PATIENT="no-such-patient")
    tables = {**raw, "conditions": pd.concat([raw["conditions"], orphan])}
    cleaned = clean_synthea(tables)
    assert len(cleaned["conditions"]) == len(raw["conditions"])
    assert len(tables["conditions"]) == len(raw["conditions"]) + 1  # input left alone
    assert pd.api.types.is_datetime64_any_dtype(cleaned["medications"]["START"])


# ---- load_input / load_table --------------------------------------------------------------

def test_load_input_synthea_limit_keeps_first_patients_and_their_texts(contexts):
    df, id_col, text_col = load_input("data/sample/synthea", limit=7)
    assert (id_col, text_col) == ("patient_id", "context_text")
    pd.testing.assert_frame_equal(df, contexts.head(7))


def test_load_input_csv_with_relative_path_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    df, id_col, text_col = load_input("data/sample/pubmed/abstracts.csv", "pmid", "text",
                                      limit=5)
    assert (id_col, text_col) == ("pmid", "text") and len(df) == 5
    assert df["pmid"].map(type).eq(str).all()


def test_load_input_csv_needs_columns():
    with pytest.raises(DataError, match="set ID_COL and TEXT_COL.*pmid, text"):
        load_input(PUBMED / "abstracts.csv")


def test_load_input_rejects_other_folders_and_bad_limits(tmp_path):
    with pytest.raises(DataError, match=r"not a Synthea folder \(no patients.csv\)"):
        load_input(tmp_path)
    with pytest.raises(DataError, match="expected a CSV or Parquet file, or a folder of them"):
        load_input(tmp_path, "id", "text")
    for bad in (0, -5):
        with pytest.raises(DataError, match="whole number of rows >= 1"):
            load_input(SYNTHEA, limit=bad)


def test_load_table_missing_column_lists_existing_ones():
    with pytest.raises(DataError) as exc:
        load_table(PUBMED / "queries.csv", "pmid", "abstract")
    assert "'abstract'" in str(exc.value)
    assert "query_id, pmid, query" in str(exc.value)


def test_load_table_missing_file_says_where_it_looked():
    with pytest.raises(DataError) as exc:
        load_table("data/nope.csv", "id", "text")
    message = str(exc.value)
    assert str(PROJECT_ROOT / "data" / "nope.csv") in message and "project root" in message


def test_load_table_reads_ids_as_strings_and_rows_as_they_are(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("id,extra,text\n007,x,first\nNA,y,second\n9,z,\n007,w,again\n")
    df = load_table(path, "id", "text")
    assert list(df.columns) == ["id", "text"]
    # leading zeros kept, "NA" is an id; empty texts and repeats are left to steps.prepare
    assert list(df["id"]) == ["007", "NA", "9", "007"]
    assert list(df["text"]) == ["first", "second", "", "again"]
    assert list(load_table(path, "id", "text", limit=2)["id"]) == ["007", "NA"]


UNTERMINATED = 'id,text\n1,"unterminated text\n2,second row\n'


def test_unterminated_quote_stops_naming_its_line_instead_of_swallowing_rows(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(UNTERMINATED)
    for read in (lambda: load_table(path, "id", "text"),
                 lambda: csv_rows.read_csv_columns(path, "id", "text")):
        with pytest.raises(DataError) as exc:
            read()
        message = str(exc.value)
        assert "line 2:" in message and "unterminated" in message
        assert "No row was ingested" in message


def test_a_quote_closed_later_is_one_multi_line_text(tmp_path):
    path = tmp_path / "ok.csv"
    path.write_text('id,text\n1,"two\nlines"\n2,second row\n')
    assert csv_rows.read_csv_columns(path, "id", "text") == \
        {"id": ["1", "2"], "text": ["two\nlines", "second row"]}


def test_iter_csv_columns_blocks_carry_their_first_row_number(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("id,text\n" + "".join(f"{i},text {i}\n" + ("\n" if i == 3 else "")
                                           for i in range(25)))  # a blank line is no row
    blocks = list(csv_rows.iter_csv_columns(path, "id", "text", block=10))
    assert [(first, len(ids)) for ids, _texts, first in blocks] == [(0, 10), (10, 10), (20, 5)]
    for ids, texts, first in blocks:
        assert ids[0] == str(first) and texts[-1] == f"text {first + len(ids) - 1}"
    limited = list(csv_rows.iter_csv_columns(path, "id", "text", block=10, limit=15))
    assert [(first, len(ids)) for ids, _texts, first in limited] == [(0, 10), (10, 5)]


def test_contexts_when_no_care_plan_has_a_reason(raw, contexts, tmp_path):
    """With pyarrow, pandas gives an all-missing reason column a float dtype: texts are
    built row by row, so plans are listed without "(for ...)"."""
    cleaned = clean_synthea(raw)
    plans = cleaned["careplans"].assign(REASONDESCRIPTION=np.nan)
    assert plans["REASONDESCRIPTION"].dtype == np.float64
    texts = build_contexts({**cleaned, "careplans": plans})
    assert len(texts) == 100 and not texts["context_text"].str.contains("(for ", regex=False).any()
    listed = [section(t, "Active care plans") for t in texts["context_text"]]
    assert any(items != ["none recorded"] for items in listed)
    # the same from the files: a Synthea export whose reason column is empty
    folder = tmp_path / "synthea"
    shutil.copytree(SYNTHEA, folder)
    csv = pd.read_csv(folder / "careplans.csv", dtype=str)
    csv.assign(REASONDESCRIPTION="", REASONCODE="").to_csv(folder / "careplans.csv", index=False)
    df, _, _ = load_input(folder)
    pd.testing.assert_series_equal(df["context_text"], texts["context_text"])
    assert (df["context_text"] != contexts["context_text"]).any()  # reasons were shown before


def test_load_synthea_missing_file(tmp_path):
    folder = tmp_path / "synthea"
    shutil.copytree(SYNTHEA, folder)
    (folder / "allergies.csv").unlink()
    with pytest.raises(DataError, match="lacks allergies.csv"):
        load_synthea(folder)
    with pytest.raises(DataError, match="not found"):
        load_synthea(tmp_path / "absent")


# ---- the full shared data set -------------------------------------------------------------

@pytest.mark.skipif(not (SHARED / "synthea" / "patients.csv").is_file(),
                    reason=f"shared data not found at {SHARED} (../shared/data beside the project)")
def test_full_shared_synthea_gives_543_contexts():
    df, _, _ = load_input(SHARED / "synthea")
    assert len(df) == 543 and df["patient_id"].is_unique
    assert df["context_text"].str.contains(" died ").sum() == 69
