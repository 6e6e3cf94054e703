"""The guide's Ray recipe against a real cluster: `ray start --head` with token
authentication on (Ray 2.60 turns it on when a token exists), then `ingest --engine ray
--ray-address`, as a user types them. One cluster of 2 CPUs for this one test, on ports of
its own, stopped by the test (its own `ray start --block` process, never `ray stop`, which
would end every Ray on the machine)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
from fake_server import FakeEmbeddingServer

from embed_helpers import db
from embed_helpers.constants import PROJECT_ROOT

pytest.importorskip("ray", reason="Ray Data is not installed (requirements-ray.txt)")
RAY = str(Path(sys.executable).with_name("ray"))
PORT_FLAGS = ("--port", "--dashboard-port", "--node-manager-port",
              "--object-manager-port", "--dashboard-agent-grpc-port",
              "--dashboard-agent-listen-port", "--metrics-export-port",
              "--runtime-env-agent-port")


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(PROJECT_ROOT), **extra)
    return env


@pytest.fixture
def token_cluster():
    """(address, token) of a head started as the guide says, token authentication on."""
    token = uuid.uuid4().hex + uuid.uuid4().hex
    temp = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths must fit 107 bytes
    ports = free_ports(len(PORT_FLAGS))
    flags = [f"{flag}={port}" for flag, port in zip(PORT_FLAGS, ports)]
    log = Path(temp, "head.log")
    # A busy machine starts Ray's agents slowly: give them longer than Ray's defaults.
    env = clean_env(RAY_AUTH_TOKEN=token, RAY_agent_register_timeout_ms="180000",
                    RAY_raylet_start_wait_time_s="180")
    with open(log, "w") as out:
        head = subprocess.Popen([RAY, "start", "--head", "--block", "--num-cpus=2",
                                 "--include-dashboard=false", "--disable-usage-stats",
                                 f"--temp-dir={temp}/t", *flags], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{ports[0]}"
    deadline = time.monotonic() + 240
    while head.poll() is None and "Ray runtime started" not in log.read_text() \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    said = log.read_text()
    if head.poll() is not None or "Ray runtime started" not in said:
        head.kill()
        head.wait()
        pytest.fail(f"ray start --head did not start:\n{said[-3000:]}")
    assert "Token authentication is enabled" in said, said[-3000:]
    try:
        yield address, token
    finally:
        head.send_signal(signal.SIGTERM)  # --block: the head takes its processes with it
        try:
            head.wait(90)  # it drains for up to 30 s first
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()


def test_ingest_on_a_token_cluster_and_our_errors_without_rays_traceback(
        token_cluster, tmp_path, fresh_database, conn, table):
    address, token = token_cluster
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    pd.DataFrame({"id": [f"r{i}" for i in range(30)], "text": [f"note {i}" for i in range(30)]}
                 ).to_csv(good, index=False)
    pd.DataFrame({"id": ["r1", "", "r3"], "text": ["a", "b", "c"]}).to_csv(bad, index=False)
    with FakeEmbeddingServer(dim=16) as server:
        def ingest(data, **env):
            return subprocess.run(
                [sys.executable, "-m", "embed_helpers", "ingest", "--engine", "ray",
                 "--ray-address", address, "--data", str(data), "--id-col", "id",
                 "--text-col", "text", "--table", table, "-q"],
                env=clean_env(EMBEDDING_BACKEND="ollama", OLLAMA_HOST=server.url,
                              EMBED_CACHE_BACKEND="postgres", EMBED_CACHE_URL=fresh_database,
                              **env), cwd=tmp_path, capture_output=True, text=True, timeout=180)
        done = ingest(good, RAY_AUTH_TOKEN=token)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "30 rows written" in done.stdout and server.total_texts() == 30
        assert db.count_rows(conn, table)["rows"] == 30
        unread = ingest(bad, RAY_AUTH_TOKEN=token)  # refused on the driver, before Ray
        with conn.cursor() as cur:  # an error raised in a worker: the database refuses a row
            cur.execute(f'ALTER TABLE "{table}" ADD CONSTRAINT no_r77 CHECK (id <> \'r77\')')
        conn.commit()
        more = tmp_path / "more.csv"
        pd.DataFrame({"id": ["r77"], "text": ["note 77"]}).to_csv(more, index=False)
        refused = ingest(more, RAY_AUTH_TOKEN=token)
    assert unread.returncode == 1 and "have an empty id" in unread.stderr
    assert refused.returncode == 1 and "no_r77" in refused.stderr
    for done in (unread, refused):
        assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) <= 5, \
            done.stderr[-3000:]
