"""The shared cache as a team runs it: a role with table privileges only, and leases whose
holder died. Real PostgreSQL (a fresh database per test: the table name is fixed), real
subprocesses killed with SIGKILL; nothing is mocked and nothing waits on the clock."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import psycopg2
import pytest
from psycopg2.extensions import make_dsn

import embed_helpers
from embed_helpers.sequence import take_or_lease
from embed_helpers.cache.leases import HOST, holder
from embed_helpers.cache.postgres import TABLE, PostgresCache
from embed_helpers.constants import CACHE_LEASE_S
from embed_helpers.identity import Identity

ID = Identity("r", "m", 4, True)
TEXTS = [f"text {i}" for i in range(6)]
IMPORT_ROOT = str(Path(embed_helpers.__file__).parent.parent)
HOLDER = """
import sys
from embed_helpers.cache.postgres import PostgresCache
from embed_helpers.config import load_settings
from embed_helpers.identity import Identity
cache = PostgresCache(load_settings(environ={"DATABASE_URL": sys.argv[1]}))
got = cache.lease(Identity("r", "m", 4, True), [f"text {i}" for i in range(6)])
print("LEASED", len(got), cache.owner, flush=True)
sys.stdin.readline()  # holds its leases until killed
"""


def vectors(n):
    return np.arange(4 * n, dtype="f4").reshape(n, 4) + 1


@pytest.fixture
def settings(make_settings, fresh_database):
    return make_settings(DATABASE_URL=fresh_database)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "embed_helpers", *args], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=IMPORT_ROOT))


@pytest.fixture
def least_privilege(fresh_database):
    """The DSN of a role that may only SELECT/INSERT/UPDATE/DELETE the cache tables, made
    by running what `cache setup-sql` prints, as an administrator would."""
    role = f"runner_{uuid.uuid4().hex[:6]}"
    printed = cli("cache", "setup-sql", "--role", role)
    assert printed.returncode == 0, printed.stderr
    admin = psycopg2.connect(fresh_database)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} LOGIN")
        cur.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        cur.execute(printed.stdout)
        cur.execute("SELECT has_schema_privilege(%s, 'public', 'CREATE')", (role,))
        assert cur.fetchone()[0] is False
    yield make_dsn(fresh_database, user=role)
    with admin.cursor() as cur:
        cur.execute(f"DROP OWNED BY {role}")
        cur.execute(f"DROP ROLE {role}")
    admin.close()


def test_a_role_with_table_privileges_only_shares_the_cache(least_privilege, make_settings):
    runner = make_settings(DATABASE_URL=least_privilege)
    with PostgresCache(runner) as first, PostgresCache(runner) as second:
        assert first.lease(ID, TEXTS) == set(TEXTS) and second.lease(ID, TEXTS) == set()
        assert first.put_many(ID, TEXTS, vectors(6)) == 6
        got = second.get_many(ID, TEXTS)
        assert len(got) == 6 and np.array_equal(got["text 5"], vectors(6)[5])
        assert second.lease(ID, ["new"]) == {"new"} and len(second) == 6


def test_without_the_tables_the_role_is_told_what_it_lacks(make_settings, fresh_database):
    role = f"bare_{uuid.uuid4().hex[:6]}"
    admin = psycopg2.connect(fresh_database)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} LOGIN")
        cur.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        cur.execute("CREATE EXTENSION IF NOT EXISTS vector")
    try:
        with pytest.raises(embed_helpers.DatabaseError, match="permission denied for schema"):
            PostgresCache(make_settings(DATABASE_URL=make_dsn(fresh_database, user=role)))
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP ROLE {role}")
        admin.close()


def test_setup_sql_refuses_a_role_name_it_cannot_write():
    result = cli("cache", "setup-sql", "--role", "x; drop table y")
    assert result.returncode == 1 and "--role" in result.stderr and "Traceback" not in result.stderr


def test_a_killed_holders_leases_are_taken_over_at_once(settings):
    dsn = str(settings.DATABASE_URL)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, dsn], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ,
                                                                        PYTHONPATH=IMPORT_ROOT))
    try:
        _word, leased, *owner = proc.stdout.readline().split()
        assert int(leased) == 6 and holder(" ".join(owner)) == (HOST, proc.pid)
        with PostgresCache(settings) as rerun:
            found, mine, later = take_or_lease(rerun, ID, TEXTS)
            assert (found, mine, sorted(later)) == ({}, [], sorted(TEXTS))  # alive: wait
            reason = rerun.lease_wait_reason()
            assert f"6 texts that run {proc.pid} on {HOST} is embedding now" in reason
            proc.send_signal(signal.SIGKILL)
            proc.wait()  # reaped, as a shell does
            found, mine, later = take_or_lease(rerun, ID, TEXTS)
            assert (mine, later) == (TEXTS, []) and rerun.lease_wait_reason() is None
            assert leases(dsn) == {rerun.owner: 6}
    finally:
        proc.kill()
        proc.wait()


def test_another_hosts_lease_ends_with_its_heartbeat(settings):
    dsn = str(settings.DATABASE_URL)
    with PostgresCache(settings) as mine:
        other = "elsewhere 4242 0a1b"
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:  # a live run on another host
            cur.execute(f"INSERT INTO {TABLE}_leases SELECT decode(k, 'hex'), %s, now() + "
                        f"make_interval(secs => %s) FROM unnest(%s) k",
                        (other, CACHE_LEASE_S, ID.keys(TEXTS[:2])))
        assert mine.lease(ID, TEXTS) == set(TEXTS[2:])
        assert "2 texts that run 4242 on elsewhere" in mine.lease_wait_reason()
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:  # its heartbeat stops
            cur.execute(f"UPDATE {TABLE}_leases SET until = now() - interval '1 second' "
                        "WHERE owner = %s", (other,))
        assert mine.lease(ID, TEXTS) == set(TEXTS) and mine.lease_wait_reason() is None


def test_the_heartbeat_renews_only_leases_still_waiting_for_their_vectors(settings):
    dsn = str(settings.DATABASE_URL)
    with PostgresCache(settings) as mine:
        assert mine.lease(ID, TEXTS) == set(TEXTS)
        mine.put_many(ID, TEXTS[:4], vectors(4))  # stored: lease rows deleted, not renewed
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute(f"UPDATE {TABLE}_leases SET until = now() - interval '1 second'")
        assert mine._leases.renew() == 2 and leases(dsn, live=True) == {mine.owner: 2}
        mine._leases.max_hold = 0.0  # their vectors never came: let them go
        assert mine._leases.renew() == 0 and not mine._leases.held


def leases(dsn, live=False):
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT owner, count(*) FROM {TABLE}_leases "
                    + ("WHERE until > now() " if live else "") + "GROUP BY owner")
        return dict(cur.fetchall())
