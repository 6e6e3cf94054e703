"""A password with the characters a URL reserves never shows, in part or whole: in settings,
masks, errors, the CLI's output and the files of the runs folder. The CLI runs as a user
runs it, against the test server, as a role of its own that has this password."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from urllib.parse import quote

import pandas as pd
import pytest
from fake_server import FakeEmbeddingServer
from psycopg2.extensions import parse_dsn

from embed_helpers.config import Secret, load_settings, mask_url
from embed_helpers.constants import PROJECT_ROOT
from embed_helpers.errors import ConfigError, DatabaseError
from embed_helpers.printing import dsn_problem

PASSWORD = "p@ss:w/rd#1"
PIECES = {PASSWORD[i:j] for i in range(len(PASSWORD)) for j in range(i + 3, len(PASSWORD) + 1)}


def leaks(text: str) -> set[str]:
    """Every piece of the password (3 characters or more) that `text` holds."""
    return {piece for piece in PIECES if piece in text}


def test_pieces_cover_the_ones_the_issue_names():
    assert {"p@ss", "ss:w", "w/rd", "rd#1", PASSWORD} <= PIECES and leaks("x p@s y") == {"p@s"}


RAW_URL = f"postgresql://special:{PASSWORD}@127.0.0.1:5432/db"
UNREADABLE = [RAW_URL, f"postgresql://special:{PASSWORD}@/db?host=/tmp",
              f"host=db user=special password='{PASSWORD}",  # unterminated quote
              f"host=db user=special password={PASSWORD} w dbname=x"]  # unquoted space
READABLE = [f"postgresql://special:{quote(PASSWORD, safe='')}@127.0.0.1:5432/db",
            f"host=db user=special password={PASSWORD} dbname=x",
            f"host=db user=special password = '{PASSWORD} x' dbname=x",
            f"postgresql://special@127.0.0.1/db?password={quote(PASSWORD, safe='')}"]


@pytest.mark.parametrize("dsn", UNREADABLE)
def test_an_unreadable_dsn_is_refused_at_load_and_masked_whole(dsn, tmp_path):
    assert mask_url(dsn) == "postgresql://****" or "password=****" in mask_url(dsn)
    assert not leaks(mask_url(dsn)) and not leaks(repr(Secret(dsn)))
    for name in ("DATABASE_URL", "EMBED_CACHE_URL"):
        with pytest.raises(ConfigError) as caught:
            load_settings(env_file=tmp_path / "none", environ={name: dsn})
        message = str(caught.value)
        assert message.startswith(f"{name}: it cannot be read") and not leaks(message)
        assert "URL-encode the password" in message and "%40" in message


@pytest.mark.parametrize("dsn", READABLE)
def test_a_readable_dsn_shows_everything_but_its_password(dsn, tmp_path):
    assert dsn_problem(dsn) is None
    settings = load_settings(env_file=tmp_path / "none",
                             environ={"DATABASE_URL": dsn, "EMBED_CACHE_URL": dsn})
    shown = [repr(settings), str(settings.describe()), repr(settings.DATABASE_URL)]
    assert not leaks(str(shown))
    assert quote(PASSWORD, safe="") not in str(shown) and "****" in mask_url(dsn)
    assert ("127.0.0.1" in mask_url(dsn)) == ("127.0.0.1" in dsn)  # the rest is still shown


def test_db_connect_refuses_an_unreadable_dsn_built_in_code(make_settings):
    from dataclasses import replace
    from embed_helpers import db
    settings = replace(make_settings(), DATABASE_URL=Secret(RAW_URL))  # past load's check
    with pytest.raises(DatabaseError) as caught:
        db.connect(settings)
    assert "URL-encode the password" in str(caught.value) and not leaks(str(caught.value))


@pytest.fixture
def special_role(conn):
    """A login role whose password is PASSWORD, allowed to create tables in the session
    database; its DSN parts (socket dir, database) from the session's DATABASE_URL."""
    name = f"special_{uuid.uuid4().hex[:6]}"
    with conn.cursor() as cur:
        cur.execute(f"CREATE ROLE {name} LOGIN PASSWORD %s", (PASSWORD,))
        cur.execute(f"GRANT CREATE, USAGE ON SCHEMA public TO {name}")
    conn.commit()
    yield name
    with conn.cursor() as cur:
        cur.execute(f"DROP OWNED BY {name}")
        cur.execute(f"DROP ROLE {name}")
    conn.commit()


def run_cli(tmp_path, fake_server, dsn, *args):
    env = dict(os.environ, DATABASE_URL=dsn, EMBEDDING_BACKEND="ollama", OLLAMA_HOST=fake_server.url,
               EMBED_CACHE_PATH=str(tmp_path / "cache.jsonl"), EMBED_RUNS_DIR=str(tmp_path / "runs"),
               PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.run([sys.executable, "-m", "embed_helpers", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def test_the_cli_never_shows_the_password(special_role, tmp_path, table):
    with FakeEmbeddingServer(dim=16, poison={"e f"}) as server:  # a failure list in runs/
        check_cli(special_role, server, tmp_path, table)


def check_cli(special_role, fake_server, tmp_path, table):
    session = parse_dsn(os.environ["DATABASE_URL"])
    where = f"@{quote(session.get('host', ''), safe='')}:{session.get('port', 5432)}" \
        if not session.get("host", "").startswith("/") else "@"
    tail = f"/{session['dbname']}" + (f"?host={quote(session['host'], safe='')}"
                                      if session.get("host", "").startswith("/") else "")
    good = f"postgresql://{special_role}:{quote(PASSWORD, safe='')}{where}{tail}"
    raw = f"postgresql://{special_role}:{PASSWORD}{where}{tail}"
    pd.DataFrame({"id": ["1", "2", "3"], "text": ["a b", "c d", "e f"]}).to_csv(
        tmp_path / "in.csv", index=False)
    args = ("-vv", "ingest", "--data", str(tmp_path / "in.csv"), "--table", table,
            "--id-col", "id", "--text-col", "text")
    ok = run_cli(tmp_path, fake_server, good, *args)
    assert ok.returncode == 3, ok.stderr[-2000:]  # the poisoned row failed, two were written
    assert "2 rows written" in ok.stdout and fake_server.total_requests() >= 1
    plan = run_cli(tmp_path, fake_server, good, "-vv", "plan", *args[2:])
    kv = " ".join(f"{k}={v}" for k, v in session.items() if k not in ("user", "password"))
    keyvalue = run_cli(tmp_path, fake_server, f"{kv} user={special_role} password={PASSWORD}",
                       *args)
    bad = run_cli(tmp_path, fake_server, raw, *args)
    unterminated = run_cli(tmp_path, fake_server, f"{kv} password='{PASSWORD}", *args)
    assert plan.returncode == 0 and keyvalue.returncode == 3, plan.stderr + keyvalue.stderr
    for result in (bad, unterminated):
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "URL-encode the password" in result.stderr
    for result in (ok, plan, keyvalue, bad, unterminated):
        assert not leaks(result.stdout + result.stderr), result.stdout + result.stderr
    files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert files  # the runs' reports are there, and hold no piece of the password
    assert not [p for p in files if leaks(p.read_text(errors="replace"))]


def test_a_secret_given_as_a_notebook_parameter_is_never_written_into_the_notebook(monkeypatch):
    from embed_helpers.notebook import _secrets_to_environment, parse_param
    monkeypatch.delenv("EMBED_CACHE_URL", raising=False)
    dsn = READABLE[0]
    params = dict(parse_param(p) for p in [f"EMBED_CACHE_URL={dsn}", "EMBED_BATCH_SIZE=8"])
    assert _secrets_to_environment(params) == {"EMBED_BATCH_SIZE": 8}  # what papermill writes
    assert os.environ["EMBED_CACHE_URL"] == dsn  # the kernel inherits it
