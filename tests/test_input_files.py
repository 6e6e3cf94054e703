"""Input files as a user writes them by hand: every row is read exactly, or the run stops with
the file line before anything is paid. Hand-made CSVs in tmp_path, the one reader of both
engines (`readers`), and the CLI against a real loopback server and a real PostgreSQL."""
from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import pytest
from test_cli import cli, cli_env

from embed_helpers import db, readers, steps
from embed_helpers.csv_rows import iter_csv_columns
from embed_helpers.data import load_input
from embed_helpers.errors import DataError
from embed_helpers.synthea import first_patients, load_synthea

# The examples: an unquoted comma shifts the fields after it.
RAGGED = {
    "more fields": ("id,text\n1,fine\n2,Patient reports pain, nausea, and fever\n", 3),
    "shifted id": ("text,id\nfine,1\nPatient reports pain, nausea,42\n", 3),
    "missing field": ("id,text,source\n1,fine,a\n2,no source\n", 3),
    "after a multi-line text": ('id,text\n1,"two\nlines"\n2,a, b\n', 4),
}


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize("case", RAGGED)
def test_a_ragged_row_stops_the_file_with_its_line_and_the_fix(tmp_path, case):
    text, line = RAGGED[case]
    path = write(tmp_path / "hand.csv", text)
    bad_row = text.splitlines()[line - 1]
    for read in (lambda: readers.read_columns(path, "id", "text"),
                 lambda: list(iter_csv_columns(path, "id", "text", block=1)),
                 lambda: load_input(path, "id", "text")):
        with pytest.raises(DataError) as exc:
            read()
        message = str(exc.value)
        assert f"hand.csv, line {line}:" in message, message
        assert bad_row[:20] in message and "must be quoted" in message
        assert "No row was ingested" in message


def test_the_same_texts_quoted_are_read_exactly(tmp_path):
    path = write(tmp_path / "ok.csv", 'text,id\n"Patient reports pain, nausea",42\n')
    assert readers.read_columns(path, "id", "text") == \
        {"id": ["42"], "text": ["Patient reports pain, nausea"]}


def test_a_bom_is_dropped_and_the_file_reads_cleanly(tmp_path):
    path = write(tmp_path / "excel.csv", "\ufeffid,text\n1,héllo\n")
    assert readers.read_columns(path, "id", "text") == {"id": ["1"], "text": ["héllo"]}
    df, _, _ = load_input(path, "id", "text")
    assert list(df["id"]) == ["1"]


def test_bytes_of_another_encoding_name_their_line_and_the_option(tmp_path):
    path = write(tmp_path / "win.csv", "id,text\n1,plain\n2,café au lait\n", "cp1252")
    with pytest.raises(DataError) as exc:
        readers.read_columns(path, "id", "text")
    message = str(exc.value)
    assert "win.csv, line 3" in message and "--encoding cp1252" in message
    assert readers.read_columns(path, "id", "text", encoding="cp1252")["text"] == \
        ["plain", "café au lait"]


def test_empty_ids_are_named_by_file_line(tmp_path):
    path = write(tmp_path / "ids.csv", 'id,text\n1,a\n,b\n3,"two\nlines"\n  ,d\n')
    with pytest.raises(DataError) as exc:
        readers.read_columns(path, "id", "text")
    assert "2 row(s) have an empty id in 'id' (lines 3, 6)" in str(exc.value)


def test_an_all_empty_text_column_is_an_error(tmp_path):
    path = write(tmp_path / "empty.csv", "id,text,other\n1,,x\n2, \u200b,y\n")
    with pytest.raises(DataError, match="all 2 rows have an empty text in 'text'"):
        readers.read_columns(path, "id", "text")


def test_invisible_only_texts_count_as_empty():
    rows = steps.prepare(["a", "b", "c", "d"], ["\u200b\u200b", "\ufeff \u00a0", "x\u200b", "\u2060"])
    assert rows.ids == ["c"] and rows.empty_ids == ["a", "b", "d"]


def test_duplicate_ids_are_named():
    rows = steps.prepare(["7", "8", "7", "9", "7"], ["a", "b", "c", "d", "e"])
    assert rows.duplicate_ids == 2 and rows.repeated == ["7 (3 rows)"]


def test_negative_or_zero_limits_are_refused(tmp_path):
    path = write(tmp_path / "rows.csv", "id,text\n1,a\n2,b\n")
    for bad in (-5, 0, True, 1.5):
        with pytest.raises(DataError, match="whole number of rows >= 1"):
            readers.read_columns(path, "id", "text", limit=bad)
    tables = load_synthea("data/sample/synthea")
    with pytest.raises(DataError, match="whole number of rows >= 1"):
        first_patients(tables, -5)
    assert len(first_patients(tables, 5)["patients"]) == 5


def test_parquet_and_folders_are_read_by_the_one_reader(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    write(folder / "a.csv", "id,text\n1,one\n2,two\n")
    pd.DataFrame({"id": [3, 4], "text": ["three", "four"]}).to_parquet(folder / "b.parquet")
    write(folder / "notes.txt", "not input")
    expected = {"id": ["1", "2", "3", "4"], "text": ["one", "two", "three", "four"]}
    assert readers.read_columns(folder, "id", "text") == expected
    assert readers.read_columns(folder, "id", "text", limit=3)["id"] == ["1", "2", "3"]
    assert readers.read_columns(folder / "b.parquet", "id", "text")["id"] == ["3", "4"]
    df, _, _ = load_input(folder, "id", "text")
    assert list(df["id"]) == expected["id"]
    with pytest.raises(DataError, match="absent.csv not found"):
        readers.read_columns(tmp_path / "absent.csv", "id", "text")


# ---- the CLI: exit 1 with the line, nothing paid, nothing stored -------------------------

def ingest(env, tmp_path, data, table, *extra):
    return cli("ingest", "--data", str(data), "--id-col", "id", "--text-col", "text",
               "--table", table, "-q", "--no-index", *extra, env=env, cwd=tmp_path)


def test_cli_refuses_bad_files_before_any_request(fake_server, tmp_path, conn, table):
    env = cli_env(fake_server, tmp_path)
    cases = {"ragged.csv": (RAGGED["shifted id"][0], "line 3:"),
             "noid.csv": ("id,text\n1,a\n,b\n", "(lines 3)"),
             "blank.csv": ("id,text\n1,\u200b\n2,\n", "all 2 rows have an empty text")}
    for name, (text, expected) in cases.items():
        done = ingest(env, tmp_path, write(tmp_path / name, text), table)
        assert done.returncode == 1 and expected in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    negative = ingest(env, tmp_path, write(tmp_path / "ok.csv", "id,text\n1,a\n"), table,
                      "--limit", "-5")
    assert negative.returncode == 1 and "whole number of rows >= 1" in negative.stderr
    assert fake_server.total_requests() == 0 and db.table_dimension(conn, table) is None


def test_cli_encoding_option_and_bom(fake_server, tmp_path, conn, table):
    env = cli_env(fake_server, tmp_path)
    win = write(tmp_path / "win.csv", "id,text\n1,café\n", "cp1252")
    refused = ingest(env, tmp_path, win, table)
    assert refused.returncode == 1 and "--encoding cp1252" in refused.stderr
    assert ingest(env, tmp_path, win, table, "--encoding", "cp1252").returncode == 0
    bom = write(tmp_path / "bom.csv", "\ufeffid,text\n2,naïve\n\n3,\u200b\u200b\n")
    done = ingest(env, tmp_path, bom, table)
    assert done.returncode == 0, done.stderr
    with conn.cursor() as cur:
        cur.execute(f'SELECT id, text FROM "{table}" ORDER BY id')
        assert cur.fetchall() == [("1", "café"), ("2", "naïve")]  # 3 is empty: not stored
    conn.rollback()


def test_cli_reads_a_folder_of_csv_and_parquet_with_the_local_engine(fake_server, tmp_path,
                                                                     conn, table):
    folder = tmp_path / "parts"
    folder.mkdir()
    write(folder / "a.csv", "id,text\n1,one\n")
    pd.DataFrame({"id": ["2"], "text": ["two"]}).to_parquet(folder / "b.parquet")
    done = ingest(cli_env(fake_server, tmp_path), tmp_path, folder, table)
    assert done.returncode == 0, done.stderr
    assert db.count_rows(conn, table)["rows"] == 2


def test_cli_plan_names_duplicate_ids(fake_server, tmp_path, table):
    data = write(tmp_path / "dup.csv", "id,text\n7,a\n8,b\n7,c\n")
    done = cli("plan", "--data", str(data), "--id-col", "id", "--text-col", "text", "--table",
               table, "--no-probe", env=cli_env(fake_server, tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    figures = dict(line.split("  ", 1) for line in done.stdout.splitlines() if "  " in line)
    assert figures["duplicate ids (last wins)"].strip() == "1"
    assert figures["ids repeated"].strip() == "7 (2 rows)"


def test_help_is_specific(tmp_path):
    import subprocess
    import sys
    from embed_helpers.constants import PROJECT_ROOT

    def helps(*args):
        return subprocess.run([sys.executable, "-m", "embed_helpers", *args, "--help"],
                              capture_output=True, text=True, cwd=PROJECT_ROOT).stdout
    plan = helps("plan")
    assert "--data" in plan and "--engine" not in plan and "ray" not in plan.lower()
    assert "--text" in helps("cache", "doctor") and "--to" not in helps("cache", "doctor")
    export = helps("cache", "export")
    assert "--to" in export and "--text" not in export and "write the cache's entries" in export


# ---- table names: as typed, found again, or refused before anything -------------------------

@pytest.fixture
def names(conn):
    """A mixed-case table name, and a schema-qualified one in a new schema; dropped after."""
    tag = uuid.uuid4().hex[:8]
    schema, mixed = f"s_{tag}", f"My_{tag}Table"
    with conn.cursor() as cur:
        cur.execute(f'CREATE SCHEMA "{schema}"')
    conn.commit()
    yield mixed, f"{schema}.docs"
    conn.rollback()
    with conn.cursor() as cur:
        cur.execute(f'DROP SCHEMA "{schema}" CASCADE')
        cur.execute(f'DROP TABLE IF EXISTS "{mixed}_chunks", "{mixed}"')
    conn.commit()


def test_mixed_case_and_schema_tables_are_found_again(fake_server, tmp_path, conn, names):
    long = "word " * 2000  # a long text: its chunks go to <table>_chunks in the same schema
    data = write(tmp_path / "rows.csv", f'id,text\n1,alpha\n2,beta\n3,"{long}"\n')
    env = cli_env(fake_server, tmp_path, EMBED_MAX_INPUT_TOKENS=512)
    for name in names:
        first = ingest(env, tmp_path, data, name, "--batch-size", "4")
        assert first.returncode == 0, first.stderr
        assert "3 rows written" in first.stdout
        fake_server.reset()
        again = ingest(env, tmp_path, data, name)
        assert again.returncode == 0, again.stderr
        assert "0 rows written, 3 unchanged" in again.stdout, again.stdout
        assert fake_server.total_requests() == 0
        assert db.count_rows(conn, name)["rows"] == 3 and db.count_rows(conn, name)["chunks"] > 1
    schema = names[1].split(".")[0]
    with conn.cursor() as cur:
        cur.execute("SELECT table_schema, table_name FROM information_schema.tables WHERE "
                    "table_name LIKE %s OR table_schema = %s ORDER BY 2",
                    (names[0] + "%", schema))
        assert cur.fetchall() == [("public", names[0]), ("public", names[0] + "_chunks"),
                                  (schema, "docs"), (schema, "docs_chunks")]
    conn.rollback()
    vector = db.fetch_vectors(conn, names[1], "id", ["1"])["1"]
    from embed_helpers.retrieval import create_hnsw_index, search
    assert create_hnsw_index(conn, names[1], len(vector))
    assert search(conn, names[1], "id", "text", np.asarray(vector), k=1)[0][0] == "1"


@pytest.mark.parametrize("name", ['"quoted"', "x; drop table y", "", "a.b.c", "my table",
                                  "t" * 64, "s." + "t" * 50])
def test_names_postgresql_cannot_take_are_refused_before_anything(fake_server, tmp_path, conn,
                                                                  name):
    with pytest.raises(DataError, match="TABLE_NAME"):
        steps.Target(name, "id", "text")
    data = write(tmp_path / "rows.csv", "id,text\n1,alpha\n")
    done = ingest(cli_env(fake_server, tmp_path), tmp_path, data, name)
    assert done.returncode == 1 and "TABLE_NAME (--table)" in done.stderr, done.stderr
    assert fake_server.total_requests() == 0


def test_a_missing_schema_is_named_before_any_request(fake_server, tmp_path):
    data = write(tmp_path / "rows.csv", "id,text\n1,alpha\n")
    done = ingest(cli_env(fake_server, tmp_path), tmp_path, data, "nosuchschema.docs")
    assert done.returncode == 1, done.stderr
    assert "schema 'nosuchschema' does not exist" in done.stderr and "CREATE SCHEMA" in done.stderr
    assert fake_server.total_requests() == 0


def test_cli_ray_engine_refuses_a_ragged_file_with_its_line(fake_server, tmp_path, conn, table):
    pytest.importorskip("ray", reason="Ray Data is not installed (requirements-ray.txt)")
    data = write(tmp_path / "ragged.csv", RAGGED["shifted id"][0])
    done = ingest(cli_env(fake_server, tmp_path), tmp_path, data, table, "--engine", "ray")
    assert done.returncode == 1 and "ragged.csv, line 3:" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and fake_server.total_requests() == 0
    assert db.table_dimension(conn, table) is None
