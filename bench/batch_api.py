"""The Batch API mode at scale, against the fake Batch API: jobs, requests, the bill.

    python bench/batch_api.py [--texts 120000] [--quick]

120,000 notes go through `ingest --batch-api` as a user runs it (the CLI); the client is
SIGKILLed once its first batch is pending and run again. The same notes are then embedded
synchronously into another table and cache, to compare the bill. The figures are counts,
not times: jobs and how full they are, requests per route, batches created (never twice),
rows (each once), tokens and cost. Database and state: bench/common.py.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time

import requests
from common import ROOT, Workspace, print_header, print_table, start_servers, synthetic_texts


def batch_stats(url: str) -> dict:
    return requests.get(url + "/_batch_stats", timeout=10).json()


def write_csv(path, texts: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "text"])
        writer.writerows([f"n{i}", t] for i, t in enumerate(texts))


def ingest(ws: Workspace, url: str, data, table: str, cache: str, report, *extra,
           kill_when=None, cap: int = 3_000_000) -> dict:
    """One CLI ingest; with `kill_when(url)`, SIGKILLed once it says so (no report then)."""
    env = ws.subprocess_env(cache, EMBEDDING_BACKEND="llm_api", OPENAI_BASE_URL=url + "/v1",
                            EMBED_BATCH_POLL_S="0.2", EMBEDDING_DIM=8,
                            EMBED_BATCH_ENQUEUED_TOKENS=cap)
    args = [sys.executable, "-m", "embed_helpers", "ingest", "--data", str(data), "--id-col",
            "id", "--text-col", "text", "--table", table, "-q", "--no-index",
            "--report", str(report), *extra]
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if kill_when is not None:
        while proc.poll() is None and not kill_when(url):
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        return {}
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"ingest failed ({proc.returncode}):\n{out[-2000:]}\n{err[-2000:]}")
    return json.loads(report.read_text())


def rows_of(ws: Workspace, table: str) -> tuple[int, int]:
    with ws.conn.cursor() as cur:
        cur.execute(f'SELECT count(*), count(DISTINCT id) FROM "{table}"')
        total, distinct = cur.fetchone()
    ws.conn.rollback()
    return total, distinct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=120_000)
    parser.add_argument("--quick", action="store_true",
                        help="12,000 notes, an enqueued-token cap of 250,000 (tier 1: 3M)")
    args = parser.parse_args()
    n, cap = (12_000, 250_000) if args.quick else (args.texts, 3_000_000)
    with Workspace() as ws:
        print_header("The Batch API mode (bench/batch_api.py)", [ws.describe()])
        server = start_servers(1, None, 8)[0]
        try:
            data = ws.tmp / "notes.csv"
            write_csv(data, synthetic_texts(n))
            pending = lambda url: batch_stats(url)["counts"].get("POST /v1/batches", 0) >= 1  # noqa: E731
            ingest(ws, server.url, data, "batch_notes", "batch.jsonl", ws.tmp / "r0.json",
                   "--batch-api", kill_when=pending, cap=cap)
            killed = batch_stats(server.url)
            batch = ingest(ws, server.url, data, "batch_notes", "batch.jsonl",
                           ws.tmp / "r1.json", "--batch-api", cap=cap)
            after = batch_stats(server.url)
            sync = ingest(ws, server.url, data, "sync_notes", "sync.jsonl", ws.tmp / "r2.json")
            report_tables(n, cap, killed, after, batch, sync, rows_of(ws, "batch_notes"))
        finally:
            server.stop()


def report_tables(n, cap, killed, after, batch, sync, rows) -> None:
    counts = after["counts"]
    print_table(["notes", "enqueued-token cap", "batches when killed", "batches created in all", "distinct batches",
                 "statuses", "rows (distinct)", "synchronous requests of the batch run"],
                [[f"{n:,}", f"{cap:,}", killed["batches"], counts.get("POST /v1/batches", 0),
                  after["batches"], after["statuses"], f"{rows[0]:,} ({rows[1]:,})",
                  batch["requests"] - batch["batch"]["requests"]]])
    print_table(["route", "requests"], [[k, v] for k, v in sorted(counts.items())])
    print_table(["mode", "requests (the report's)", "tokens billed", "USD per 1M", "cost USD"],
                [["batch (rerun after the kill)", batch["requests"], f"{batch['tokens']:,}",
                  f"{batch['price_per_1m_tokens']:.4f}", f"{batch['token_cost_usd']:.6f}"],
                 ["synchronous", sync["requests"], f"{sync['tokens']:,}",
                  f"{sync['price_per_1m_tokens']:.4f}", f"{sync['token_cost_usd']:.6f}"]])
    print(f"cost ratio batch / synchronous: "
          f"{batch['token_cost_usd'] / sync['token_cost_usd']:.3f}")


if __name__ == "__main__":
    main()
