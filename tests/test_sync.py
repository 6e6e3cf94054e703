"""Sync (EMBED_SYNC): rows that left the input leave the table, within the run's scope, with a
brake; nothing is sent to the server for it. Real PostgreSQL, a real loopback server."""
import csv
import re

import pytest

from embed_helpers import readers
from embed_helpers.backends import get_backend
from embed_helpers.errors import DataError
from embed_helpers.steps import Target
from embed_helpers.sync import SyncRefused
from embed_helpers.workflow import ingest, open_cache, plan_ingest

LONG = " ".join(f"word{i}" for i in range(120))  # over the 64-token window set below: chunks


def write(path, rows):
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["id", "text"])
        out.writerows(rows)
    return path


def abstracts(n, start=0):
    return [(f"a{i}", (LONG if i % 10 == 3 else "") + f" abstract {i}") for i in range(start, start + n)]


@pytest.fixture
def run(fake_server, make_settings, conn, table):
    """ingest(path) as the CLI does it (readers, the files read as the scope)."""
    def go(path, force=False, plan_only=False, **overrides):
        values = dict(EMBEDDING_BACKEND="ollama", OLLAMA_HOST=fake_server.url,
                      EMBED_BATCH_SIZE=16, EMBED_SYNC=1, EMBED_MAX_INPUT_TOKENS=64)
        values.update(overrides)
        settings = make_settings(**values)
        columns = readers.read_columns(path, "id", "text", with_source=True)
        step = plan_ingest if plan_only else ingest
        extra = {} if plan_only else {"progress": False}
        with get_backend(settings) as backend:
            return step(columns, Target(table, "id", "text"), settings=settings, conn=conn,
                        backend=backend, cache=open_cache(settings),
                        scope=readers.source_labels(path), force_delete=force, **extra)
    return go


def ids(conn, table, chunks=False, column="id"):
    with conn.cursor() as cur:
        cur.execute(f'SELECT DISTINCT {column} FROM "{table}{"_chunks" if chunks else ""}"')
        found = {r[0] for r in cur.fetchall()}
    conn.rollback()
    return found


def test_removed_rows_and_their_chunks_are_deleted_without_a_request(run, fake_server, conn,
                                                                     table, tmp_path):
    rows = abstracts(100)
    path = write(tmp_path / "abstracts.csv", rows)
    first = run(path)
    assert first.rows_written == 100 and first.sync["rows_deleted"] == 0
    assert "a3" in ids(conn, table, chunks=True)  # a long row, stored in chunks
    removed = {f"a{i}" for i in range(0, 100, 10)} | {"a3"}  # 11 rows, one of them chunked
    blanked = "a5"  # still in the file, its text now empty: gone from search too
    write(path, [(i, "" if i == blanked else t) for i, t in rows if i not in removed])
    plan = run(path, plan_only=True)
    assert dict(plan.as_rows())["rows to delete (sync: not in the input, or now empty)"] == 12
    fake_server.reset()
    report = run(path)
    assert fake_server.total_requests() == 0
    assert ids(conn, table) == {i for i, _ in rows} - removed - {blanked}
    assert len(ids(conn, table)) == 88
    assert not ids(conn, table, chunks=True) & removed
    assert report.sync["rows_deleted"] == 12 and report.sync["chunks_deleted"] > 0
    assert any(line.startswith("sync: 12 rows deleted") for line in report.summary_lines())


def test_the_brake_refuses_at_plan_time_and_force_delete_lifts_it(run, fake_server, conn,
                                                                  table, tmp_path):
    rows = abstracts(100)
    path = write(tmp_path / "abstracts.csv", rows)
    run(path)
    write(path, rows[:20] + [("new1", "a new abstract")])  # 80 of 100 gone, one new row
    fake_server.reset()
    with pytest.raises(SyncRefused, match=r"80 of the 100 rows .*--force-delete"):
        run(path)
    assert fake_server.total_requests() == 0  # refused before anything was paid
    assert len(ids(conn, table)) == 100 and "new1" not in ids(conn, table)
    report = run(path, force=True)
    assert ids(conn, table) == {i for i, _ in rows[:20]} | {"new1"}
    assert report.sync["rows_deleted"] == 80 and fake_server.total_requests() == 1


def test_a_run_over_one_file_of_a_folder_leaves_the_other_files_rows(run, conn, table, tmp_path):
    folder = tmp_path / "extract"
    folder.mkdir()
    write(folder / "a.csv", abstracts(30))
    write(folder / "b.csv", abstracts(30, start=30))
    run(folder)
    write(folder / "a.csv", abstracts(30)[5:])
    report = run(folder / "a.csv")
    assert report.sync["rows_deleted"] == 5
    assert ids(conn, table) == {f"a{i}" for i in range(5, 60)}
    with conn.cursor() as cur:
        cur.execute(f'SELECT source, count(*) FROM "{table}" GROUP BY source ORDER BY source')
        assert cur.fetchall() == [("a.csv", 25), ("b.csv", 30)]
    conn.rollback()


def test_a_file_that_fails_halfway_deletes_nothing(run, fake_server, conn, table, tmp_path):
    folder = tmp_path / "extract"
    folder.mkdir()
    write(folder / "a.csv", abstracts(20))
    b = write(folder / "b.csv", abstracts(20, start=20))
    run(folder)
    lines = b.read_text().splitlines()
    b.write_text("\n".join(lines[:10] + ["a30,pain, nausea"] + lines[12:]) + "\n")  # ragged
    fake_server.reset()
    with pytest.raises(DataError, match="line 11"):
        run(folder)
    assert len(ids(conn, table)) == 40 and fake_server.total_requests() == 0


def test_rows_with_no_recorded_source_are_left_unless_the_scope_is_the_table(run, conn, table,
                                                                             tmp_path):
    rows = abstracts(40)
    path = write(tmp_path / "abstracts.csv", rows)
    run(path, EMBED_SYNC=0)  # written without sync: no source recorded
    write(path, rows[4:])
    report = run(path)
    assert report.sync["rows_deleted"] == 0 and len(ids(conn, table)) == 40
    assert report.sync["rows_metadata_updated"] == 36  # their source, recorded now
    assert any("4 rows not in the input that have no recorded source" in line
               for line in report.summary_lines())
    report = run(path, EMBED_SYNC_SCOPE="table")
    assert report.sync["rows_deleted"] == 4 and len(ids(conn, table)) == 36


def test_failed_rows_are_not_deleted(run, fake_server, conn, table, tmp_path):
    rows = abstracts(20)
    path = write(tmp_path / "abstracts.csv", rows)
    run(path)
    revised = dict(rows)["a7"] + " revised"
    write(path, [(i, revised if i == "a7" else t) for i, t in rows])
    fake_server.poison = {revised}  # the server refuses the new text: the row fails
    report = run(path)
    assert report.rows_failed == 1 and report.sync["rows_deleted"] == 0
    assert "a7" in ids(conn, table) and len(ids(conn, table)) == 20


def test_cli_flags_sync_keep_cols_and_the_brakes_exit_status(fake_server, conn, table, tmp_path):
    import subprocess
    import sys

    from test_cli import cli_env
    path = tmp_path / "abstracts.csv"
    rows = [(f"p{i}", f"abstract {i}", str(2000 + i)) for i in range(10)]
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([("pmid", "text", "year"), *rows])
    env = cli_env(fake_server, tmp_path)
    base = ["--data", str(path), "--id-col", "pmid", "--text-col", "text", "--table", table]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "embed_helpers", *args], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
    first = cli("ingest", *base, "--sync", "--keep-cols", "year", "-q")
    assert first.returncode == 0, first.stderr
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([("pmid", "text", "year"), *rows[:3]])
    plan = cli("plan", *base, "--sync", "--no-probe", "--force-delete")
    assert plan.returncode == 0
    assert re.search(r"rows to delete \(sync: not in the input, or now empty\) +7\n", plan.stdout)
    refused = cli("ingest", *base, "--sync", "-q")
    assert refused.returncode == 1
    assert "sync would delete 7 of the 10 rows" in refused.stderr and "--force-delete" in refused.stderr
    assert len(ids(conn, table, column="pmid")) == 10
    forced = cli("ingest", *base, "--sync", "--force-delete", "--keep-cols", "year", "-q")
    assert forced.returncode == 0 and "sync: 7 rows deleted (0 chunks) of 10 in scope" in forced.stdout
    assert ids(conn, table, column="pmid") == {"p0", "p1", "p2"}
