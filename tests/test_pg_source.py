"""A PostgreSQL source read in windows through a server-side cursor: a source table in the
session's database, a real loopback embedding server, both engines. Windows of 7 rows, so
every source spans several."""
from __future__ import annotations

import json
import os
import re
import uuid
from urllib.parse import quote

import numpy as np
import pytest
from fake_server import EMBED, OPENAI, FakeEmbeddingServer, expected_vector
from psycopg2.extensions import parse_dsn

from embed_helpers import cli, db
from embed_helpers.backends import get_backend
from embed_helpers.cache.tools import open_cache
from embed_helpers.errors import DatabaseError, DataError
from embed_helpers.sources import PostgresSource, open_source
from embed_helpers.steps import Target
from embed_helpers.streaming import ingest_source, plan_source

DIM, WINDOW = 16, 7
PASSWORD = "p@ss:w/rd%1"   # every character a URL must encode


def source_url(password: str = "", dbname: str | None = None) -> str:
    """The session's database as a postgresql:// URL (the embedded server trusts its
    socket, so any password is accepted and none is needed)."""
    parts = parse_dsn(os.environ["DATABASE_URL"])
    password = password or parts.get("password", "")
    where = "&".join(f"{k}={parts[k]}" for k in ("host", "port") if k in parts)
    return (f"postgresql://{parts.get('user', '')}:{quote(password, safe='')}@/"
            f"{dbname or parts['dbname']}?{where}")


@pytest.fixture
def notes(conn):
    """A source table of 40 notes with integer ids; notes 5 and 23 have no text."""
    name = f"src_{uuid.uuid4().hex[:8]}"
    with conn.cursor() as cur:
        cur.execute(f'CREATE TABLE "{name}" (note_id int PRIMARY KEY, ward text, body text)')
        cur.execute(f'INSERT INTO "{name}" SELECT i, $$ward $$ || i % 3, CASE WHEN i IN (5, 23) '
                    f'THEN NULL ELSE $$note $$ || i || $$ about visit $$ || i % 4 END '
                    f'FROM generate_series(1, 40) i')
    conn.commit()
    yield name
    with conn.cursor() as cur:
        cur.execute(f'DROP TABLE IF EXISTS "{name}"')
    conn.commit()


@pytest.fixture
def server():
    with FakeEmbeddingServer(DIM) as s:
        yield s


@pytest.fixture
def settings(make_settings, server):
    return make_settings(EMBEDDING_BACKEND="llm_api", OPENAI_BASE_URL=server.url + "/v1",
                         OPENAI_API_KEY="sk-test-0000", EMBED_BATCH_SIZE=4)


def stream(settings, conn, table, source, plan=False):
    with get_backend(settings) as backend, open_cache(settings) as cache:
        run = plan_source if plan else ingest_source
        return run(source, Target(table, source.id_col, source.text_col), settings=settings,
                   conn=conn, backend=backend, cache=cache, **({} if plan else {"progress": False}))


def stored(conn, table):
    with conn.cursor() as cur:
        cur.execute(f'SELECT note_id, body, embedding FROM "{table}"')
        rows = {r[0]: (r[1], r[2].to_numpy()) for r in cur.fetchall()}
    conn.rollback()
    return rows


def test_windows_ingest_then_a_rerun_after_ten_changes_embeds_ten(settings, server, conn,
                                                                   notes, table):
    query = f'SELECT note_id, body, ward FROM "{notes}" ORDER BY note_id'
    source = open_source(source_url(), query=query, window=WINDOW, extra_cols=("ward",))
    report = stream(settings, conn, table, source)
    rows = stored(conn, table)
    assert len(rows) == 38 and rows["7"][0] == "note 7 about visit 3"   # ids cast to text
    for text, vector in rows.values():
        np.testing.assert_allclose(vector, expected_vector(text, DIM), atol=1e-6)
    assert (report.rows_read, report.rows_empty, report.rows_written) == (40, 2, 38)
    assert sorted(report.empty_ids) == ["23", "5"]
    assert report.requests == server.total_requests(OPENAI) and report.texts_embedded == 38
    assert source.complete and source.ids_seen == {str(i) for i in range(1, 41)}
    assert [rows for _t, rows in report.timeline][-1] == 38   # counted over the windows
    assert [t for t, _r in report.timeline] == sorted(t for t, _r in report.timeline)

    with conn.cursor() as cur:   # ten notes change, in several windows
        cur.execute(f'UPDATE "{notes}" SET body = body || $$ (amended)$$ WHERE note_id % 4 = 1 '
                    f'AND body IS NOT NULL')
        assert cur.rowcount == 9
        cur.execute(f'UPDATE "{notes}" SET body = $$now written$$ WHERE note_id = 5')
    conn.commit()
    server.reset()
    again = stream(settings, conn, table, open_source(source_url(), query=query, window=WINDOW))
    assert server.total_texts(OPENAI) == 10 and again.texts_embedded == 10
    assert (again.rows_written, again.rows_unchanged, again.rows_empty) == (10, 29, 1)
    assert again.requests == server.total_requests(OPENAI)
    assert stored(conn, table)["9"][0] == "note 9 about visit 1 (amended)"


def test_a_later_window_overwrites_an_earlier_row_of_the_same_id(settings, conn, notes, table):
    query = (f'SELECT n.note_id % 10 AS note_id, body FROM "{notes}" n WHERE body IS NOT NULL '
             f'ORDER BY n.note_id')   # seven ids in a row: distinct in a window, not across
    report = stream(settings, conn, table, open_source(source_url(), query=query, window=WINDOW))
    rows = stored(conn, table)
    assert sorted(rows) == [str(i) for i in range(10)]
    assert rows["3"][0] == "note 33 about visit 1"   # the last row of id 3, in the last window
    assert report.rows_read == 38 and report.rows_duplicate == 28


def test_failures_of_several_windows_are_listed_in_one_file(settings, server, conn, notes,
                                                            table):
    server.poison = {"note 3 about visit 3", "note 30 about visit 2"}   # windows 1 and 5
    report = stream(settings, conn, table, open_source(source_url(), table=notes, window=WINDOW,
                                                       id_col="note_id", text_col="body"))
    assert report.rows_failed == 2 and report.rows_written == 36
    with open(report.failures_path) as listed:
        assert sorted(json.loads(line)["id"] for line in listed) == ["3", "30"]
    assert len(list((settings.EMBED_RUNS_DIR).glob("failures-*.jsonl"))) == 1


def test_an_empty_source_is_a_run_of_nothing(settings, server, conn, notes, table):
    source = open_source(source_url(), query=f'SELECT note_id, body FROM "{notes}" WHERE false')
    report = stream(settings, conn, table, source)
    assert (report.rows_read, report.rows_written, report.table) == (0, 0, table)
    assert source.complete and server.total_requests() == 0
    assert db.table_dimension(conn, table) is None


def test_the_plan_streams_counts_and_creates_nothing(settings, server, conn, notes, table):
    source = open_source(source_url(), table=notes, window=WINDOW)
    plan = stream(settings, conn, table, source, plan=True)
    assert (source.id_col, source.text_col) == ("note_id", "ward")   # first columns: ward
    assert plan.windows == 6 and plan.counts["rows read"] == 40
    assert plan.counts["texts to embed"] + plan.probe_texts == 3      # "ward 0..2"
    assert db.table_dimension(conn, table) is None
    assert "windows read" in str(plan) and "texts to embed" in str(plan)


def test_a_window_holds_ids_as_text_and_the_extra_columns(notes):
    source = open_source(source_url(), query=f'SELECT * FROM "{notes}" ORDER BY note_id',
                         id_col="note_id", text_col="body", extra_cols=("ward", "note_id"),
                         window=WINDOW, limit=10)
    first, second = list(source.windows())
    assert first.ids == [str(i) for i in range(1, 8)] and first.texts[4] is None
    assert first.extras == {"ward": [f"ward {i % 3}" for i in range(1, 8)]}
    assert (second.first, second.ids) == (7, ["8", "9", "10"])
    assert not source.complete and source.closed   # --limit read only a part


def test_missing_columns_are_named_with_those_the_query_returns(notes):
    with pytest.raises(DataError) as err:
        open_source(source_url(), query=f'SELECT note_id, ward FROM "{notes}"',
                    id_col="note_id", text_col="body")
    assert "'body'" in str(err.value) and "'note_id', 'ward'" in str(err.value)
    with pytest.raises(DataError, match="exactly one of --query"):
        PostgresSource(source_url(), query="SELECT 1", table=notes)
    with pytest.raises(DataError, match="EMBED_SOURCE_WINDOW"):   # never a read of nothing
        PostgresSource(source_url(), table=notes, window=0)


def test_a_bad_query_is_said_in_words_before_anything_is_paid(settings, server, conn, notes,
                                                             table):
    with pytest.raises(DataError) as err:
        open_source(source_url(), query="SELECT note_id, body FROM no_such_notes")
    assert "no_such_notes" in str(err.value) and "does not exist" in str(err.value)
    assert "Nothing was embedded" in str(err.value)
    # a row that fails only when read (here the 20th): the run stops there, never
    # silently short, and the source is not complete
    query = f'SELECT note_id, body, 1 / (note_id - 20) AS bad FROM "{notes}"'  # insert order
    source = open_source(source_url(), query=query, window=WINDOW, extra_cols=("bad",))
    with pytest.raises(DataError, match="division by zero"):
        stream(settings, conn, table, source)
    assert not source.complete and source.rows_read == 14
    assert server.total_requests(OPENAI) > 0 and len(stored(conn, table)) == 13


def test_a_connection_lost_mid_read_raises_and_the_source_is_not_complete(conn, notes):
    source = open_source(source_url(), table=notes, window=WINDOW)
    windows = source.windows()
    assert len(next(windows).ids) == WINDOW
    with conn.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'embed_helpers_source' AND datname = "
                    "current_database()")
    conn.rollback()
    with pytest.raises(DatabaseError, match="was lost after 7 rows"):
        list(windows)
    assert not source.complete and source.rows_read == WINDOW and source.closed


def test_the_source_connection_is_read_only(conn, notes):
    purge = f'"{notes}_purge"'
    with conn.cursor() as cur:   # a function that deletes, called by the query
        cur.execute(f'CREATE FUNCTION {purge}() RETURNS bigint LANGUAGE sql AS $$ WITH gone AS '
                    f'(DELETE FROM "{notes}" RETURNING 1) SELECT count(*) FROM gone $$')
    conn.commit()
    try:
        source = open_source(source_url(), query=f'SELECT note_id, body, {purge}() FROM "{notes}"')
        with pytest.raises(DataError, match="read-only transaction"):
            list(source.windows())
        assert source.closed
        with conn.cursor() as cur:
            cur.execute(f'SELECT count(*) FROM "{notes}"')
            assert cur.fetchone()[0] == 40
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP FUNCTION {purge}")
        conn.commit()


def test_the_dsn_password_is_masked_everywhere():
    url = source_url(PASSWORD, dbname="no_such_database_here")
    secrets = (PASSWORD, quote(PASSWORD, safe=""))
    source = PostgresSource(url, query="SELECT 1, 2")
    shown = [repr(source), source.describe()]
    with pytest.raises(DatabaseError) as err:
        source.open()
    shown.append(str(err.value))
    assert "no_such_database_here" in str(err.value)
    unencoded = url.replace(quote(PASSWORD, safe=""), PASSWORD)   # refused, masked whole
    with pytest.raises(DatabaseError, match="URL-encoded") as err:
        open_source(unencoded, query="SELECT 1, 2")
    shown.append(str(err.value))
    for text in shown:
        assert "****" in text and not any(s in text for s in secrets), text


def test_cli_ingest_and_plan_from_a_table(settings, server, conn, notes, table, monkeypatch,
                                          capsys):
    for name in ("EMBEDDING_BACKEND", "OPENAI_BASE_URL", "OPENAI_API_KEY", "EMBED_CACHE_PATH",
                 "EMBED_RUNS_DIR"):
        monkeypatch.setenv(name, str(getattr(settings, name)))
    monkeypatch.setenv("EMBED_SOURCE_WINDOW", str(WINDOW))
    args = ["--data", source_url(PASSWORD), "--source-table", notes, "--id-col", "note_id",
            "--text-col", "body", "--table", table]
    assert cli.main(["plan", *args, "--no-probe"]) == 0
    assert cli.main(["ingest", *args, "-q", "--no-index"]) == 0
    out = capsys.readouterr().out
    assert "postgresql://postgres:****@" in out and quote(PASSWORD, safe="") not in out
    assert re.search(r"^rows read +40$", out, re.M) and re.search(r"^windows read +6$", out, re.M)
    assert "38 rows written" in out and len(stored(conn, table)) == 38
    assert cli.main(["ingest", "--data", "data/x.csv", "--query", "SELECT 1"]) == 1
    assert "--data postgresql://" in capsys.readouterr().err


def test_the_ray_engine_runs_every_window_on_one_ray(make_settings, server, conn, notes, table,
                                                     fresh_database):
    ray = pytest.importorskip("ray", reason="Ray Data is not installed (requirements-ray.txt)")
    assert not ray.is_initialized()   # the run starts Ray once for all its windows, then ends it
    settings = make_settings(EMBEDDING_BACKEND="ollama", OLLAMA_HOST=server.url,
                             EMBED_BATCH_SIZE=4, EMBED_ENGINE="ray", EMBED_WORKERS=1,
                             EMBED_CACHE_BACKEND="postgres", EMBED_CACHE_URL=fresh_database)
    source = open_source(source_url(), query=f'SELECT note_id, body FROM "{notes}" '
                                             f'WHERE note_id <= 20', window=WINDOW)
    report = stream(settings, conn, table, source)
    assert not ray.is_initialized() and report.ray_startup_s > 0
    rows = stored(conn, table)
    assert len(rows) == 19 and report.rows_written == 19 and report.engine == "ray"
    for text, vector in rows.values():
        np.testing.assert_allclose(vector, expected_vector(text, DIM), atol=1e-6)
    assert report.requests == server.total_requests(EMBED) and report.texts_embedded == 19
    assert server.total_texts(EMBED) == 19
    assert sum(w["rows"] for w in report.workers.values()) == 19


def test_sync_after_the_last_window_deletes_what_left_the_source_and_the_brake_holds(
        make_settings, server, conn, table, notes):
    """With EMBED_SYNC the windows run without it (a window is not the source) and the rows
    that left the source go once, after the last window: 6 of 38 deleted with 0 requests,
    though every window alone lacks most rows. Over the brake: refused by the plan and the
    run, nothing deleted; --keep-cols stores the source's other columns."""
    settings = make_settings(EMBEDDING_BACKEND="llm_api", OPENAI_BASE_URL=server.url + "/v1",
                             OPENAI_API_KEY="sk-test-0000", EMBED_BATCH_SIZE=4, EMBED_SYNC=1,
                             EMBED_KEEP_COLS="ward")

    def source():
        return open_source(source_url(), table=notes, window=WINDOW, id_col="note_id",
                           text_col="body", extra_cols=settings.EMBED_KEEP_COLS)
    assert stream(settings, conn, table, source()).rows_written == 38
    with conn.cursor() as cur:
        cur.execute(f'SELECT metadata, source FROM "{table}" WHERE note_id = \'7\'')
        assert cur.fetchone() == ({"ward": "ward 1"}, f"postgresql table {notes}")
        cur.execute(f'DELETE FROM "{notes}" WHERE note_id BETWEEN 30 AND 35')
    conn.commit()
    server.reset()
    report = stream(settings, conn, table, source())
    assert report.sync["rows_deleted"] == 6 and server.total_requests() == 0
    assert len(stored(conn, table)) == 32
    with conn.cursor() as cur:
        cur.execute(f'DELETE FROM "{notes}" WHERE note_id > 8')
    conn.commit()
    with pytest.raises(DataError, match="force-delete"):
        stream(settings, conn, table, source(), plan=True)
    with pytest.raises(DataError, match="force-delete"):
        stream(settings, conn, table, source())
    assert len(stored(conn, table)) == 32
