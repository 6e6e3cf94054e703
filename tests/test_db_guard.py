"""db_guard against the real embedded PostgreSQL: a lost connection becomes a DatabaseError
that says what to do, a crash log is explained, and the server's self-check runs once."""
import json

import numpy as np
import psycopg2
import pytest

from embed_helpers import db, db_guard
from embed_helpers.errors import DatabaseError


def versions(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT current_setting('server_version'), "
                    "(SELECT extversion FROM pg_extension WHERE extname = 'vector')")
        found = list(cur.fetchone())
    conn.rollback()
    return found


def terminate(conn, victim):
    """End `victim`'s backend from another session, as an administrator would."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (victim.get_backend_pid(),))
        assert cur.fetchone()[0] is True
    conn.rollback()


@pytest.mark.parametrize("call", ["count_rows", "write_rows"])
def test_terminated_backend_becomes_a_database_error_saying_run_again(conn, table,
                                                                      make_settings, call):
    db.create_table(conn, table, "id", "text", 2)
    victim = db.connect(make_settings())
    try:
        db.count_rows(victim, table)  # the connection works
        terminate(conn, victim)
        with pytest.raises(DatabaseError) as err:
            if call == "count_rows":
                db.count_rows(victim, table)
            else:
                db.write_rows(victim, table, "id", "text", ["a"], ["a"],
                              np.ones((1, 2), dtype=np.float32))
    finally:
        victim.close()
    message = str(err.value)
    assert not isinstance(err.value, psycopg2.Error)
    assert "The database ended our connection" in message
    assert table in message  # what we were doing
    assert "Run it again" in message
    assert db.count_rows(conn, table)["rows"] == 0  # nothing half-written


def test_illegal_instruction_in_the_log_gives_the_cpu_message(tmp_path):
    log_path = tmp_path / "log"
    log_path.write_text(
        "2025-01-01 00:00:00 UTC LOG:  database system is ready to accept connections\n"
        "2025-01-01 00:00:05 UTC LOG:  server process (PID 4242) was terminated by signal 4: "
        "Illegal instruction\n"
        "2025-01-01 00:00:05 UTC LOG:  terminating any other active server processes\n")
    lost = psycopg2.OperationalError("server closed the connection unexpectedly\n"
                                     "\tThis probably means the server terminated abnormally")
    err = db_guard.diagnose(lost, "building the index on t", log_path)
    message = str(err)
    assert isinstance(err, DatabaseError) and err.signal == 4
    assert "building the index on t" in message
    assert "illegal instruction" in message and "CPU instructions this machine lacks" in message
    assert "DATABASE_URL" in message and "pgvector" in message  # what to do: another server
    assert str(log_path) in message and err.log_path == str(log_path)


def test_other_crash_signals_say_which_and_to_run_again(tmp_path):
    log_path = tmp_path / "log"
    log_path.write_text("LOG:  server process (PID 1) was terminated by signal 4: Illegal "
                        "instruction\nLOG:  server process (PID 2) was terminated by signal 11: "
                        "Segmentation fault\n")
    err = db_guard.diagnose(psycopg2.OperationalError("server closed the connection"),
                            "writing rows to t", log_path)
    assert err.signal == 11  # the latest crash in the log decides
    assert "signal 11 (Segmentation fault)" in str(err) and "Run it again" in str(err)
    assert "CPU instructions" not in str(err)


def test_check_once_runs_once_per_versions(conn, tmp_path):
    marker = tmp_path / ".embed_helpers_check.json"
    assert db_guard.check_once(conn, tmp_path) is True
    assert json.loads(marker.read_text()) == versions(conn)
    with conn.cursor() as cur:  # the check's schema was rolled back
        cur.execute("SELECT to_regnamespace('embed_helpers_check')")
        assert cur.fetchone()[0] is None
    conn.rollback()
    # Unchanged versions: no check, and the marker is left exactly as it is.
    marker.write_text(json.dumps(versions(conn), indent=2))
    kept = marker.read_text()
    assert db_guard.check_once(conn, tmp_path) is False
    assert marker.read_text() == kept


@pytest.mark.parametrize("marker_text", [json.dumps(["9.9", "0.1.0"]), "not json"])
def test_check_once_runs_again_when_the_marker_says_other_versions(conn, tmp_path, marker_text):
    marker = tmp_path / ".embed_helpers_check.json"
    marker.write_text(marker_text)
    assert db_guard.check_once(conn, tmp_path) is True
    assert json.loads(marker.read_text()) == versions(conn)
