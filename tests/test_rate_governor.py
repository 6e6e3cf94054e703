"""The rate governor against a fake server with a budget per window and OpenAI's headers.

Throughput is read from the server's own windows (what each accepted), never from the
client's clock: a window of 0.5 s stands for OpenAI's minute.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from fake_server import FakeEmbeddingServer, RateBudget
from http_helpers import settings_for

from embed_helpers import batch_embed
from embed_helpers.backends.llm_api import OpenAIBackend
from embed_helpers.constants import PROJECT_ROOT
from embed_helpers.rate_governor import grant, key_hash, learn, new_lane
from embed_helpers.rate_headers import LaneHeaders, parse_duration, read_lanes
from embed_helpers.report import RunReport

WINDOW_S, BUDGET = 0.5, 10_000          # tokens per window; the fake counts 4 bytes a token
TEXT_TOKENS, BATCH = 100, 10            # a request of 1,000 tokens: 10 per window


def texts(n, tag=""):
    return [f"{tag}text {i:05d} " + "word " * 77 + "end." for i in range(n)]  # 100 tokens


def budget_settings(server, cache_path, **overrides):
    return settings_for(server, EMBED_BATCH_SIZE=BATCH, EMBED_MAX_CONCURRENCY=4,
                        EMBED_MAX_INPUT_TOKENS=512, EMBED_MAX_RETRIES=10,
                        EMBED_CACHE_PATH=str(cache_path), **overrides)


def fills(budget):
    """Tokens accepted per window, the last (partial) one left out."""
    return [budget.accepted[w][1] for w in sorted(budget.accepted)][:-1]


@pytest.mark.parametrize("raw, seconds", [
    ("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("12ms", 0.012),
    ("8.64s", 8.64), ("0s", 0.0), ("1.5µs", 1.5e-6), ("250us", 2.5e-4), ("17", 17.0),
    ("0.25", 0.25), (" 2s ", 2.0), ("-1", None), ("-1s", None), ("inf", None), ("nan", None),
    ("Infinity", None), ("soon", None), ("", None), (None, None), ("1x", None), ("s", None),
    ("1s2", None), ("1m-2s", None)])
def test_reset_durations_parse_like_openai_writes_them(raw, seconds):
    assert parse_duration(raw) == (pytest.approx(seconds) if seconds is not None else None)


def test_headers_read_by_lane_unknowns_left_out():
    openai = {"x-ratelimit-limit-requests": "5000", "x-ratelimit-limit-tokens": "160000",
              "x-ratelimit-remaining-requests": "4999", "x-ratelimit-remaining-tokens": "159976",
              "x-ratelimit-reset-requests": "12ms", "x-ratelimit-reset-tokens": "9ms"}
    assert read_lanes(openai) == {"requests": LaneHeaders(5000, 4999, 0.012),
                                  "tokens": LaneHeaders(160000, 159976, 0.009)}
    azure = {"X-RateLimit-Remaining-Tokens": "46760", "x-ratelimit-limit-tokens": "-1",
             "x-ratelimit-reset-tokens": "0", "retry-after-ms": "100"}
    assert read_lanes(azure) == {"tokens": LaneHeaders(None, 46760, 0.0)}
    assert read_lanes({"x-ratelimit-remaining-requests": "many"}) == {}
    assert read_lanes({}) == read_lanes(None) == {}


def test_the_gate_holds_a_spent_budget_until_its_reset():
    state = {}
    learn(state, {"tokens": LaneHeaders(1000, 100, 5.0)}, None, {}, True, now=0.0)
    wait, positions = grant(state, {"tokens": 50}, {}, now=0.0)
    assert positions == {"tokens": 0.0} and wait == 0   # 100 remain: 50 fit
    wait, positions = grant(state, {"tokens": 80}, {}, now=0.1)
    assert positions is None and wait == pytest.approx(4.9)   # 50 remain: held to the reset
    wait, positions = grant(state, {"tokens": 80}, {}, now=5.0)
    assert positions is not None   # reset: the whole budget less what went after the snapshot


def test_the_pace_spreads_a_setting_budget_and_the_key_is_not_stored():
    state = {"tokens": new_lane()}
    waits = [grant(state, {"tokens": 600}, {"tokens": 60_000}, now=0.0)[0] for _ in range(7)]
    # 60,000 a minute at 95%: 950 a second, 0.632 s a request; a burst of 0.1 s, then paced
    assert waits == pytest.approx([0, 0.5316, 1.1632, 1.7947, 2.4263, 3.0579, 3.6895], abs=1e-3)
    assert "sk-secret" not in key_hash(["https://api.openai.com/v1"], "sk-secret")


def test_a_late_answer_does_not_overwrite_a_newer_one_and_a_429_is_given_back():
    state = {}
    first = grant(state, {"tokens": 100}, {}, now=0.0)[1]
    second = grant(state, {"tokens": 100}, {}, now=0.0)[1]
    learn(state, {"tokens": LaneHeaders(1000, 800, 2.0)}, second, {"tokens": 100}, True, now=0.1)
    learn(state, {"tokens": LaneHeaders(1000, 900, 1.5)}, first, {"tokens": 100}, True, now=0.2)
    lane = state["tokens"]
    assert lane["base"] - lane["granted"] == 800 and lane["window"] == 2.0
    third = grant(state, {"tokens": 100}, {}, now=0.3)[1]
    learn(state, {"tokens": LaneHeaders(1000, 0, 1.0)}, third, {"tokens": 100}, False, now=0.4)
    assert lane["granted"] == 200 and lane["base"] - lane["granted"] == 0   # refused: not spent
    assert grant(state, {"tokens": 100}, {}, now=0.5) == (pytest.approx(0.9), None)


def test_the_fake_server_speaks_openais_rate_headers(tmp_path):
    with FakeEmbeddingServer(32, budget=RateBudget(tokens=300, requests=2, window_s=60)) as server:
        url = server.url + "/v1/embeddings"
        ok = requests.post(url, json={"input": texts(2), "model": "m"})
        requests.post(url, json={"input": ["x"], "model": "m"})
        refused = requests.post(url, json={"input": ["x"], "model": "m"})
    assert ok.status_code == 200 and refused.status_code == 429
    assert ok.headers["x-ratelimit-limit-tokens"] == "300"
    assert ok.headers["x-ratelimit-remaining-tokens"] == "100"
    assert ok.headers["x-ratelimit-remaining-requests"] == "1"
    assert re.fullmatch(r"(\d+m)?\d+(\.\d+)?s|\d+ms", ok.headers["x-ratelimit-reset-tokens"])
    assert 59 <= parse_duration(ok.headers["x-ratelimit-reset-requests"]) <= 60
    assert refused.headers["retry-after"] == "60"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "requests per min (RPM): Limit 2, Used 2, Requested 1" in refused.json()["error"]["message"]


def test_ten_budgets_run_at_the_budget_with_few_429s(tmp_path):
    budget = RateBudget(tokens=BUDGET, window_s=WINDOW_S)
    with FakeEmbeddingServer(32, budget=budget) as server:
        backend = OpenAIBackend(budget_settings(server, tmp_path / "c.jsonl"))
        before = backend.stats()
        result = batch_embed(texts(10 * BUDGET // TEXT_TOKENS), backend=backend)
        report = RunReport()
        report.add_requests(backend, before)
    assert result.vectors.shape[0] == 1000
    assert budget.refused <= 3 and report.rate_budget["rate_limited"] == budget.refused
    assert all(fill <= BUDGET for fill in fills(budget))
    assert sum(fills(budget)) / (len(fills(budget)) * BUDGET) >= 0.9
    assert report.rate_budget["budget_waits"] > 50 and report.rate_budget["budget_wait_s"] > 0
    assert "s on the rate budget (" in report.summary_lines(timings=False)[1]


def test_a_setting_paces_a_server_that_sends_no_headers(tmp_path):
    budget = RateBudget(tokens=BUDGET, window_s=WINDOW_S, headers=False)
    with FakeEmbeddingServer(32, budget=budget) as server:
        settings = budget_settings(server, tmp_path / "c.jsonl",
                                   EMBED_MAX_TPM=int(BUDGET * 60 / WINDOW_S))
        backend = OpenAIBackend(settings)
        batch_embed(texts(5 * BUDGET // TEXT_TOKENS), backend=backend)
        stats = backend.stats()
    assert budget.refused <= 3 and stats["budget_waits"] > 20
    steady = fills(budget)[1:]   # the first window: before the server's count calibrates ours
    assert sum(steady) / (len(steady) * BUDGET) >= 0.85


CLIENT = """
import json, sys
from pathlib import Path
from embed_helpers import batch_embed, load_settings
from embed_helpers.backends.llm_api import OpenAIBackend
values = json.loads(sys.argv[1])
settings = load_settings(values, environ=dict(__import__("os").environ), env_file=Path("/nonexistent"))
backend = OpenAIBackend(settings)
texts = [f"{values['TAG']}text {i:05d} " + "word " * 77 for i in range(values["N"])]
batch_embed(texts, backend=backend)
print(json.dumps(backend.stats()["budget_waits"]))
"""


@pytest.mark.parametrize("cache", ["jsonl", "postgres"])
def test_two_processes_on_one_cache_share_the_budget(tmp_path, cache):
    budget = RateBudget(tokens=BUDGET, window_s=WINDOW_S)
    with FakeEmbeddingServer(32, budget=budget) as server:
        values = dict(EMBEDDING_BACKEND="llm_api", OPENAI_BASE_URL=server.url + "/v1",
                      OPENAI_API_KEY="sk-shared", EMBED_BATCH_SIZE=BATCH, EMBED_MAX_CONCURRENCY=4,
                      EMBED_MAX_INPUT_TOKENS=512, EMBED_MAX_RETRIES=10, EMBED_BACKOFF_MS=1,
                      EMBED_CACHE_BACKEND=cache, EMBED_CACHE_PATH=str(tmp_path / "c.jsonl"),
                      N=3 * BUDGET // TEXT_TOKENS)
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
        procs = [subprocess.Popen([sys.executable, "-c", CLIENT, json.dumps({**values, "TAG": tag})],
                                  env=env, stdout=subprocess.PIPE, text=True) for tag in "ab"]
        waits = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert server.total_texts() == 2 * values["N"]
    # Each pacing alone to what the headers say draws about a dozen 429s here; together a
    # handful at most (none on a quiet machine; a loaded one delays a ledger update).
    assert budget.refused <= 5 and all(fill <= BUDGET for fill in fills(budget))
    assert sum(fills(budget)) / (len(fills(budget)) * BUDGET) >= 0.85
    assert all(w > 0 for w in waits)
    if cache == "jsonl":   # the budget's file: a hash for the key, never the key
        ledger = Path(str(tmp_path / "c.jsonl") + ".ratelimit.json").read_text()
        assert key_hash([server.url + "/v1"], "sk-shared") in ledger and "sk-shared" not in ledger


def test_a_role_with_table_privileges_only_shares_the_budget(fresh_database, make_settings):
    """What `cache setup-sql` prints makes the budget's table; a role that may not create
    one still paces (alone, and says so) when nobody made it."""
    from psycopg2.extensions import make_dsn
    import psycopg2
    from embed_helpers.cache.postgres import setup_sql
    from embed_helpers.rate_governor import RateGovernor
    from embed_helpers.rate_ledger import PostgresLedger
    roles = ["ledger_a", "ledger_b"]
    admin = psycopg2.connect(fresh_database)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        for role in roles:
            cur.execute(f"CREATE ROLE {role} LOGIN")
    try:
        bare = make_settings(DATABASE_URL=make_dsn(fresh_database, user="ledger_b"),
                             EMBED_CACHE_BACKEND="postgres")
        alone = RateGovernor(PostgresLedger(bare, "k"), {"tokens": 60_000, "requests": None})
        alone.acquire({"input": ["a text"]})
        assert alone.ledger.kind == "memory"   # permission denied: paced in this process
        with admin.cursor() as cur:
            cur.execute(setup_sql("ledger_a"))
        granted = make_settings(DATABASE_URL=make_dsn(fresh_database, user="ledger_a"))
        shared = RateGovernor(PostgresLedger(granted, "k"), {"tokens": 60_000, "requests": None})
        shared.acquire({"input": ["a text"]})
        assert shared.ledger.kind == "postgres" and shared.ledger.knows_budget() is False
        shared.close()
    finally:
        with admin.cursor() as cur:
            for role in roles:
                cur.execute(f"DROP OWNED BY {role}")
                cur.execute(f"DROP ROLE {role}")
        admin.close()
