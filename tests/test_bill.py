"""The report is the bill: every request and text a run sends is counted where the user
looks, on a cold run, a warm run and a run interrupted midway; a hosted API's tokens are
priced."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
from fake_server import FakeEmbeddingServer, LatencyModel

from embed_helpers.constants import PROJECT_ROOT


def ingest(csv, table, env, report):
    return subprocess.Popen(
        [sys.executable, "-m", "embed_helpers", "ingest", "--data", str(csv), "--id-col", "id",
         "--text-col", "text", "--table", table, "-q", "--report", str(report),
         "--batch-size", "20"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def test_the_report_equals_the_servers_counters_and_prices_tokens(tmp_path, table):
    csv = tmp_path / "rows.csv"
    pd.DataFrame({"id": range(300), "text": [f"abstract {i} on trial {i % 13}" for i in range(300)]}
                 ).to_csv(csv, index=False)
    with FakeEmbeddingServer(32, LatencyModel(20, 0.5, slots=1)) as server:
        env = {**os.environ, "EMBEDDING_BACKEND": "llm_api", "OPENAI_BASE_URL": server.openai_url,
               "OPENAI_EMBED_MODEL": "text-embedding-3-small", "OPENAI_API_KEY": "sk-test-0000",
               "EMBED_CACHE_PATH": str(tmp_path / "c.jsonl"), "EMBED_RUNS_DIR": str(tmp_path / "runs"),
               "PYTHONPATH": str(PROJECT_ROOT)}
        run = ingest(csv, table + "_cut", env, tmp_path / "cut.json")
        while server.total_requests() < 3 and run.poll() is None:
            time.sleep(0.02)
        run.send_signal(signal.SIGINT)  # Ctrl-C midway: the report so far is saved
        _out, err = run.communicate(timeout=120)
        assert run.returncode == 130, err[-2000:]
        [saved] = (tmp_path / "runs").glob("report-*.json")
        cut = json.loads(saved.read_text())
        assert cut["error"].startswith("KeyboardInterrupt")
        assert cut["requests"] == server.total_requests() and cut["texts_sent"] == server.total_texts()
        assert 0 < cut["rows_written"] < 300
        server.reset()
        cold = ingest(csv, table, env, tmp_path / "cold.json")
        assert cold.wait(timeout=120) == 0, cold.stderr.read()[-2000:]
        report = json.loads((tmp_path / "cold.json").read_text())
        assert report["requests"] == report["requests_total"] == server.total_requests()
        assert report["texts_sent"] == report["texts_total"] == server.total_texts()
        assert report["tokens"] == sum(server.tokens_per_request) > 0
        assert abs(report["token_cost_usd"] - report["tokens"] * 0.02 / 1e6) < 1e-12
        server.reset()
        warm = ingest(csv, table, env, tmp_path / "warm.json")
        assert warm.wait(timeout=120) == 0
        again = json.loads((tmp_path / "warm.json").read_text())
        assert again["requests_total"] == server.total_requests() == 0
