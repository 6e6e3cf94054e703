"""EMBED_HOSTED_MODE=batch against the fake Batch API (tests/fake_batch_api.py): jobs within
the limits, resuming after a kill without a second submission, the cost, the checks of the
output, failed and expired lines, cancelling. Request counts, never time."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from fake_server import FakeEmbeddingServer, count_tokens, expected_vector

from embed_helpers import db
from embed_helpers.backends import get_backend
from embed_helpers.batch_api import Limits, cut_jobs, run_plan_batch
from embed_helpers.batch_api.jobs import Job, input_file
from embed_helpers.errors import EmbeddingValidationError
from embed_helpers.steps import Target
from embed_helpers.workflow import open_cache, plan_ingest

DIM = 8
SMALL = Limits(inputs_per_line=50, tokens_per_line=None, enqueued_tokens=10**9,
               inputs_per_job=400)


@pytest.fixture
def server():
    with FakeEmbeddingServer(dim=DIM, seed=0) as fake:
        yield fake


@pytest.fixture
def batch_run(server, make_settings, conn, table):
    """Plan and run `df` in batch mode; returns (report, settings)."""
    def go(df, limits=SMALL, **overrides):
        values = dict(EMBEDDING_BACKEND="llm_api", OPENAI_BASE_URL=server.url + "/v1",
                      EMBED_HOSTED_MODE="batch", EMBED_BATCH_POLL_S=0, EMBED_BATCH_SIZE=50,
                      EMBED_MAX_RETRIES=2)
        values.update(overrides)
        settings = make_settings(**values)
        server.batch_api.max_inputs = limits.inputs_per_job  # it refuses a job over the limit
        with get_backend(settings) as backend:
            cache = open_cache(settings)
            target = Target(table, "id", "text")
            plan = plan_ingest(df, target, settings=settings, conn=conn, backend=backend,
                               cache=cache)
            report = run_plan_batch(plan, conn=conn, backend=backend, cache=cache,
                                    settings=settings, progress=False, limits=limits)
            return report.close_bill(backend), settings, plan
    return go


def frame(n):
    return pd.DataFrame({"id": [f"r{i}" for i in range(n)],
                         "text": [f"note {i} of the ward" for i in range(n)]})


def stored(conn, table):
    with conn.cursor() as cur:
        cur.execute(f'SELECT id, text, embedding FROM "{table}"')
        rows = cur.fetchall()
    conn.rollback()
    return rows


def test_120000_texts_go_in_three_jobs_within_the_real_limits():
    texts = [f"t{i}" for i in range(120_000)]
    limits = Limits(inputs_per_line=64, tokens_per_line=300_000, enqueued_tokens=3_000_000)
    jobs = cut_jobs(texts, [count_tokens(t) for t in texts], limits, model="m",
                    encoding="base64", key_of=lambda n: f"job{n}")
    assert len(jobs) == 3
    assert [t for job in jobs for line in job.lines.values() for t in line] == texts
    for job in jobs:
        assert job.inputs <= 50_000 and len(job.lines) <= 50_000 and job.tokens <= 3_000_000
        assert max(len(line) for line in job.lines.values()) <= 64
        assert job.bytes == len(input_file(job, "m", "base64")) <= 200 * 1024 * 1024
    few_tokens = cut_jobs(texts, [2] * len(texts), Limits(64, None, 100_000), model="m",
                          encoding="float", key_of=str)
    assert len(few_tokens) == 3 and max(j.tokens for j in few_tokens) <= 100_000


def test_batch_mode_fills_the_cache_then_writes_with_no_synchronous_request(
        batch_run, server, conn, table):
    report, _settings, plan = batch_run(frame(1000))
    api = server.batch_api
    assert api.creates() == 3 and api.counts["POST /v1/files"] == 3   # 400 inputs per job
    assert server.total_requests("/v1/embeddings") == 0
    rows = stored(conn, table)
    assert sorted(r[0] for r in rows) == sorted(f"r{i}" for i in range(1000))
    for _id, text, vector in rows:
        assert np.array_equal(vector.to_numpy(), expected_vector(text, DIM))
    assert report.batch["requests"] == api.requests() == report.requests  # the bill
    tokens = sum(count_tokens(t) for t in frame(1000)["text"])
    assert report.tokens == tokens
    sync_cost = tokens / 1e6 * 0.02  # text-embedding-3-small's list price
    assert report.token_cost_usd == pytest.approx(sync_cost / 2)
    assert "Batch API: 3 jobs submitted" in str(report)


def test_the_plan_prices_both_modes_and_says_when_results_are_due(
        server, make_settings, conn, table):
    settings = make_settings(EMBEDDING_BACKEND="llm_api", OPENAI_BASE_URL=server.url + "/v1",
                             EMBED_HOSTED_MODE="batch", EMBEDDING_DIM=DIM)
    with get_backend(settings) as backend:
        plan = plan_ingest(frame(100), Target(table, "id", "text"), settings=settings,
                           conn=conn, backend=backend, cache=open_cache(settings))
    rows = dict(plan.as_rows())
    assert rows["batch jobs to submit (request lines)"].startswith("1 (2 lines, 100 inputs)")
    assert "within 24 h" in rows["results due"]
    cost = rows["estimated cost at $0.01/1M tokens (batch)"]
    assert cost.startswith("$") and "synchronously $" in cost
    assert server.batch_api.requests() == 0 and server.total_requests() == 0


@pytest.mark.parametrize("fault, code", [("fail_lines", "HTTP 400"),
                                         ("expire_after", "batch_expired")])
def test_failed_or_expired_lines_are_embedded_synchronously(batch_run, server, fault, code):
    # 120 texts: one job of 3 lines (50, 50, 20); the second fails, or all after the first expire
    setattr(server.batch_api, fault, {1} if fault == "fail_lines" else 1)
    report, _s, _p = batch_run(frame(120), EMBED_BATCH_FAILED="sync")
    assert report.rows_written == 120 and report.rows_failed == 0
    sent = 50 if fault == "fail_lines" else 70
    assert server.total_texts("/v1/embeddings") == sent
    assert report.batch["texts_cached"] == 120 - sent
    assert all(why.startswith(code) for why in report.batch["failed"].values())
    # the bill: batch tokens at half the price, the synchronous ones at the list price
    batch_tokens, sync_tokens = report.batch["tokens"], report.batch["sync_tokens"]
    assert report.token_cost_usd == pytest.approx((batch_tokens * 0.01 + sync_tokens * 0.02) / 1e6)


def test_listed_failures_exit_with_the_rows_and_nothing_synchronous(
        batch_run, server, conn, table):
    server.batch_api.expire_after = 1
    report, _s, _p = batch_run(frame(120), EMBED_BATCH_FAILED="list")
    assert server.total_requests("/v1/embeddings") == 0
    assert report.rows_written == 50 and report.rows_failed == 70
    with open(report.failures_path) as fh:
        listed = [json.loads(line) for line in fh]
    assert len(listed) == 70 and all("the Batch API gave no vector" in f["reason"] for f in listed)
    assert sorted(f["id"] for f in listed) == sorted(f"r{i}" for i in range(50, 120))


@pytest.mark.parametrize("fault, message", [("wrong_dim", "dimension 5"),
                                            ("foreign_line", "custom_id 'not-ours'")])
def test_bad_output_is_refused_and_nothing_is_cached(batch_run, server, conn, table, fault,
                                                     message, make_settings):
    if fault == "wrong_dim":
        server.wrong_dim = 5
    else:
        server.batch_api.foreign_line = True
    with pytest.raises(EmbeddingValidationError, match=message):
        batch_run(frame(60), EMBEDDING_DIM=DIM)
    assert db.table_dimension(conn, table) is None
    saved, = [json.loads(p.read_text())
              for p in make_settings().EMBED_RUNS_DIR.glob("report-*.json")]
    assert message in saved["error"] and saved["requests"] == server.batch_api.requests()
    assert server.total_requests("/v1/embeddings") == 0


def test_a_lost_create_answer_does_not_make_a_second_batch(batch_run, server, conn, table):
    server.batch_api.drop_create_replies = 1
    report, _s, _p = batch_run(frame(100))
    assert len(server.batch_api.batches) == 1 and report.rows_written == 100
    assert server.batch_api.counts["GET /v1/batches"] >= 1


def cli_env(server, tmp_path):
    env = dict(os.environ, EMBEDDING_BACKEND="llm_api", OPENAI_BASE_URL=server.url + "/v1",
               EMBED_CACHE_PATH=str(tmp_path / "cache.jsonl"), EMBED_BATCH_POLL_S="0.01",
               EMBED_RUNS_DIR=str(tmp_path / "runs"), EMBED_BATCH_ENQUEUED_TOKENS="900")
    return env


def test_sigkill_while_jobs_are_pending_then_a_rerun_submits_nothing_twice(
        server, tmp_path, conn, table):
    data = tmp_path / "rows.csv"
    with open(data, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "text"])
        writer.writerows([f"r{i}", f"note {i} of the ward"] for i in range(300))
    args = [sys.executable, "-m", "embed_helpers", "ingest", "--data", str(data), "--id-col",
            "id", "--text-col", "text", "--table", table, "--batch-api", "-q", "--no-index"]
    env = cli_env(server, tmp_path)
    api = server.batch_api
    api.hold = True  # pending until released: the client polls
    api.enqueued_token_limit = 900  # as the account's cap (EMBED_BATCH_ENQUEUED_TOKENS)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(4000):  # until it polls a pending batch (bounded: it may have died)
            if api.counts["GET /v1/batches/{id}"] >= 3 or proc.poll() is not None:
                break
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # 300 texts of ~5 tokens under a cap of 900 enqueued: one job out at a time
    assert api.creates() == 1
    api.hold = False
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    records = [json.loads(x) for x in open(tmp_path / "cache.jsonl.batches.jsonl")]
    batch_ids = [r["batch_id"] for r in records if "batch_id" in r]
    assert len(batch_ids) == len(set(batch_ids)) == len(api.batches) == api.creates() >= 2
    assert all(b["status"] == "completed" for b in api.batches.values())
    assert server.total_requests("/v1/embeddings") == 0
    ids = [r[0] for r in stored(conn, table)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(300))
    assert "Batch API:" in done.stdout and "1 resumed" in done.stdout


def test_no_wait_leaves_jobs_pending_and_a_rerun_collects_them(batch_run, server, conn, table):
    server.batch_api.hold = True
    report, _s, _p = batch_run(frame(500), EMBED_BATCH_WAIT=0)
    assert report.rows_written == 0 and len(report.batch["pending"]) == 2
    assert "pending" in str(report) and server.batch_api.creates() == 2
    server.batch_api.hold = False
    report, _s, _p = batch_run(frame(500))
    assert server.batch_api.creates() == 2  # nothing submitted twice
    assert report.rows_written == 500 and report.batch["jobs_resumed"] == 2
    assert report.batch["jobs_submitted"] == 0
    assert server.total_requests("/v1/embeddings") == 0


def test_the_postgres_cache_keeps_the_jobs_where_another_machine_sees_them(
        batch_run, server, conn, table, fresh_database):
    server.batch_api.hold = True
    pg = dict(EMBED_CACHE_BACKEND="postgres", EMBED_CACHE_URL=fresh_database)
    batch_run(frame(100), EMBED_BATCH_WAIT=0, **pg)
    server.batch_api.hold = False
    # another machine: another JSONL path it never uses, the same shared table
    report, _s, _p = batch_run(frame(100), EMBED_CACHE_PATH="/nonexistent/other.jsonl", **pg)
    assert server.batch_api.creates() == 1 and report.rows_written == 100
    assert report.batch["jobs_resumed"] == 1


def test_batches_list_and_cancel_commands(batch_run, server, make_settings, monkeypatch,
                                          capsys):
    from embed_helpers.cli import main
    server.batch_api.hold = True
    _r, settings, _p = batch_run(frame(60), EMBED_BATCH_WAIT=0)
    for name in ("EMBEDDING_BACKEND", "OPENAI_BASE_URL", "EMBED_CACHE_PATH", "EMBED_RUNS_DIR"):
        monkeypatch.setenv(name, str(getattr(settings, name)))
    assert main(["batches", "list"]) == 0
    listed = capsys.readouterr().out
    assert "batch-" in listed and "submitted/in_progress" in listed and "2 lines" in listed
    assert main(["batches", "cancel", "--all"]) == 0
    assert "cancelling" in capsys.readouterr().out
    assert server.batch_api.counts["POST /v1/batches/{id}/cancel"] == 1
    server.batch_api.hold = False
    report, _s, _p = batch_run(frame(60))  # the cancelled batch kept its first line
    assert report.rows_written == 60 and report.batch["texts_cached"] == 50
    assert server.total_texts("/v1/embeddings") == 10
    assert main(["batches", "cancel", "--all"]) == 1  # none pending: said so
    assert "no pending job" in capsys.readouterr().err


def test_a_kill_between_the_upload_and_the_batch_record_is_resolved_by_the_metadata(
        batch_run, server, conn, table):
    from embed_helpers.errors import BackendUnreachable
    server.batch_api.drop_create_replies = 1  # the batch is made, its answer never arrives
    with pytest.raises(BackendUnreachable):
        batch_run(frame(100), EMBED_MAX_RETRIES=0)
    assert len(server.batch_api.batches) == 1
    report, _s, _p = batch_run(frame(100))  # the record has a file, no batch: look first
    assert server.batch_api.creates() == 1 and len(server.batch_api.batches) == 1
    assert report.rows_written == 100 and report.batch["jobs_resumed"] == 1


def test_a_server_without_the_batch_api_is_told_apart(batch_run, server):
    from embed_helpers.errors import ConfigError
    server.batch_api.absent = True
    with pytest.raises(ConfigError, match="EMBED_HOSTED_MODE=sync for this server"):
        batch_run(frame(10))
    assert server.total_requests("/v1/embeddings") == 0



def test_texts_another_process_put_in_a_job_meanwhile_are_left_to_it(server, make_settings):
    from embed_helpers.batch_api.runner import BatchRunner
    settings = make_settings(EMBEDDING_BACKEND="llm_api", OPENAI_BASE_URL=server.url + "/v1",
                             EMBED_ENCODING="float")
    texts = [f"t{i}" for i in range(30)]
    with get_backend(settings) as backend:
        runner = BatchRunner(backend, open_cache(settings), settings, dim=DIM,
                             limits=Limits(10, None, 10**6), sleep=lambda s: None)
        queue = runner.cut(texts, [1] * 30)  # one job of 3 lines, cut at the start of a run...
        ident = backend.identity()
        # ...then another machine records a job holding t5..t14 before this one submits
        runner.store.update("other", route=ident.route, model=ident.model, state="preparing",
                            lines={"other-0": texts[5:15]}, tokens=10)
        (key, job), = queue
        assert runner.submit(key, job) is not None
        # two processes recorded the same texts at once: the one logged first keeps them
        runner.store.update("late", route=ident.route, model=ident.model, state="preparing",
                            lines={"late-0": texts[:3], "late-1": ["new"]}, tokens=4)
        kept = runner.claim("late", Job({"late-0": texts[:3], "late-1": ["new"]}, 4))
        assert kept.lines == {"late-1": ["new"]}
    sent = [json.loads(line)["body"]["input"] for f in server.batch_api.content.values()
            for line in f.splitlines()]
    assert sorted(t for line in sent for t in line) == sorted(texts[:5] + texts[15:])
    assert [line for line in sent] == [texts[:5], texts[15:20], texts[20:]]


def test_a_batch_the_api_fails_at_validation_is_embedded_synchronously(batch_run, server):
    server.batch_api.enqueued_token_limit = 10  # the account's cap is lower than we were told
    report, _s, _p = batch_run(frame(60))
    assert report.rows_written == 60 and report.batch["texts_cached"] == 0
    assert server.total_texts("/v1/embeddings") == 60
    assert all("the batch ended failed (token_limit_exceeded" in why
               for why in report.batch["failed"].values())
