"""A hosted API's rate budget: the client before the rate governor (429s, retried) and with it.

    .venv/bin/python bench/rate_limit.py           # the issue's scenario: 120,000 tokens a minute (~6 min)
    .venv/bin/python bench/rate_limit.py --quick   # 20,000 tokens per 2 s window, batches of 10 (~1 min)

The fake server (tests/fake_server.py, `RateBudget`) keeps a budget of tokens per window in
fixed windows from its first request, sends OpenAI's `x-ratelimit-*` headers on every answer
and a 429 with `retry-after` when a request would overrun it. Texts are 100 of its tokens
each; `batch_embed` with EMBED_MAX_RETRIES=5 and EMBED_BACKOFF_MS=500 (the defaults),
EMBED_MAX_CONCURRENCY=4, and EMBED_BATCH_SIZE=64 (the default) at the issue's budget, 10 with
--quick (a request must fit in a window's budget). Scenarios: two budgets (the issue's 2,400
texts), ten budgets (--quick only); "2 processes" runs two clients at once, each with half
the texts, on one JSONL cache (the budget shared) or on a cache each (--quick only). Throughput is what the server accepted per window
(every window but the last), as a share of the budget: the server's count, not the client's
clock. "before" is today's client without the governor: nothing paces it, 429s are retried.
The server runs in the client's process: what is measured is counted, not timed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, print_header, print_table
from fake_server import FakeEmbeddingServer, RateBudget

from embed_helpers import batch_embed
from embed_helpers.backends.llm_api import OpenAIBackend
from embed_helpers.config import load_settings
from embed_helpers.rate_governor import RateGovernor

BUDGET, QUICK_BUDGET = 120_000, 20_000
CHILD = """
import json, sys
sys.path.insert(0, "bench")
from rate_limit import embed
print(json.dumps(embed(*json.loads(sys.argv[1]))))
"""


class Unpaced(RateGovernor):
    """The client before the governor: it paces nothing and learns nothing (429s counted)."""

    def active(self) -> bool:
        return False

    def observe(self, ticket, status, headers) -> None:
        super().observe(ticket, status, {})


def texts(n: int, tag: str) -> list[str]:
    return [f"{tag:2.2} {i:06d} " + "word " * 77 + "ends." for i in range(n)]  # 400 bytes


def embed(url: str, n: int, tag: str, governed: bool, cache: str, batch: int) -> dict:
    """One client: n texts of 100 tokens; what it sent, waited, and whether it finished."""
    settings = load_settings({"EMBEDDING_BACKEND": "llm_api", "OPENAI_BASE_URL": url,
                              "OPENAI_API_KEY": "sk-bench", "EMBED_MAX_CONCURRENCY": 4,
                              "EMBED_BATCH_SIZE": batch,
                              "EMBED_MAX_INPUT_TOKENS": 512, "EMBED_CACHE_PATH": cache},
                             environ={}, env_file=Path("/nonexistent"))
    backend = OpenAIBackend(settings)
    if not governed:
        backend.http.governor = Unpaced(backend.http.governor.ledger, {})
    started, error = time.perf_counter(), ""
    try:
        batch_embed(texts(n, tag), backend=backend)
    except Exception as exc:  # the run dies, as the CLI's would with exit status 1
        error = type(exc).__name__
    stats = backend.stats()
    return {"wall": time.perf_counter() - started, "error": error,
            "waited": stats["budget_wait_s"], "waits": stats["budget_waits"],
            "refused": stats["rate_limited"]}


def scenario(window: float, budgets: int, governed: bool, processes: int = 1,
             shared: bool = True) -> list:
    tokens, batch = (BUDGET, 64) if window >= 60 else (QUICK_BUDGET, 10)
    n = budgets * tokens // 100
    budget = RateBudget(tokens=tokens, window_s=window)
    with FakeEmbeddingServer(32, budget=budget) as server, tempfile.TemporaryDirectory() as tmp:
        args = [[server.url + "/v1", n // processes, f"p{k}", governed,
                 f"{tmp}/{'c' if shared else k}.jsonl", batch] for k in range(processes)]
        if processes == 1:
            runs = [embed(*args[0])]
        else:
            children = [subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(a)], cwd=ROOT,
                                         stdout=subprocess.PIPE, text=True) for a in args]
            runs = [json.loads(c.communicate()[0]) for c in children]
    fills = [budget.accepted[w][1] for w in sorted(budget.accepted)][:-1]
    share = sum(fills) / (len(fills) * budget.tokens) if fills else float("nan")
    errors = ", ".join(r["error"] for r in runs if r["error"]) or "none"
    together = f", {processes} processes on {'one cache' if shared else 'a cache each'}"
    return [f"{budgets} budgets, {n:,} texts" + (together if processes > 1 else ""),
            "after" if governed else "before", budget.refused,
            f"{'exit 1 (' + errors + ')' if errors != 'none' else 'exit 0'}",
            f"{share:.0%}", f"{max(fills, default=0):,} / {budget.tokens:,}",
            f"{sum(r['waited'] for r in runs):.1f} s ({sum(r['waits'] for r in runs)})",
            f"{max(r['wall'] for r in runs):.1f} s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2 s window instead of 60 s")
    window = 2.0 if parser.parse_args().quick else 60.0
    tokens = QUICK_BUDGET if window < 60 else BUDGET
    print_header("Rate budget: 429s, throughput and time waited",
                 [f"budget {tokens:,} tokens per {window:g} s window, fixed windows, OpenAI's "
                  f"headers; texts of 100 tokens; EMBED_MAX_CONCURRENCY=4"])
    rows = [scenario(window, 2, governed) for governed in (False, True)]
    if window < 60:
        rows += [scenario(window, 10, governed) for governed in (False, True)]
    rows += [scenario(window, 10 if window < 60 else 2, True, processes=2, shared=shared)
             for shared in ((False, True) if window < 60 else (True,))]
    print_table(["scenario", "client", "429s", "run", "throughput (of the budget)",
                 "fullest window", "waited on the budget (requests)", "wall"], rows)


if __name__ == "__main__":
    main()
