"""Several embedding servers in one run: one server versus two versus four, and one of two
killed midway.

    .venv/bin/python bench/servers.py            # 2,000 and 8,000 texts (under a minute)
    .venv/bin/python bench/servers.py --quick    # 2,000 texts (about 10 s)

Each run is a whole `python -m embed_helpers ingest` (start-up included) with OLLAMA_HOST
set to the comma-separated servers, EMBEDDING_BACKEND=ollama, EMBED_BATCH_SIZE=512 and
EMBED_MAX_CONCURRENCY=2 per server. The servers are the fake server's `ollama-gpu` profile
(12 ms per request + 1.5 ms per text, one slot, batches up to 512), each in a process of its
own. Vectors are 64-dimensional so that the fake servers' JSON encoding and the client's
parsing, on a machine of few cores, do not stand in for the GPU time being measured.
Servers, database and state: see bench/common.py.
"""
from __future__ import annotations

import argparse
import csv
import heapq
import json
import math
import subprocess
import sys
import time

from common import (FakeServer, Workspace, busy_shares, busy_window, cli_ingest, print_header,
                    print_table, start_servers, synthetic_texts)
from fake_server import PROFILES

from embed_helpers import db

DIM, BATCH, PER_SERVER = 64, 512, 2
TARGET = (2, 8000, 1.8)   # two servers on 8,000 texts: at least 1.8x one server's speed


def least_time(texts: int, servers: int) -> float:
    """The servers' least possible time: the batches spread as evenly as they can be."""
    model = PROFILES["ollama-gpu"]
    loads = [0.0] * servers
    sizes = [min(BATCH, texts - i) for i in range(0, texts, BATCH)]
    for size in sorted(sizes, reverse=True):
        seconds = (model.per_request_ms + model.per_text_ms * size) / 1000
        heapq.heapreplace(loads, loads[0] + seconds)
    return max(loads)


def write_csv(ws: Workspace, n: int):
    path = ws.tmp / f"texts-{n}.csv"
    if not path.is_file():
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "text"])
            writer.writerows((f"n{i}", t) for i, t in enumerate(synthetic_texts(n)))
    return path


def env_for(ws: Workspace, servers: list[FakeServer], cache: str) -> dict:
    return ws.subprocess_env(cache, EMBEDDING_BACKEND="ollama", EMBED_BATCH_SIZE=BATCH,
                             EMBED_MAX_CONCURRENCY=PER_SERVER,
                             OLLAMA_HOST=",".join(s.url for s in servers))


def one_run(ws: Workspace, servers: list[FakeServer], n: int, base: dict) -> list:
    table = f"bench_servers_{n}_{len(servers)}"
    ws.drop(table)
    (ws.tmp / "c.jsonl").unlink(missing_ok=True)
    for s in servers:
        s.reset()
    wall, report, _ = cli_ingest(write_csv(ws, n), table, env_for(ws, servers, "c.jsonl"),
                                 ws.tmp / "r.json")
    spans = [s.busy() for s in servers]
    start, end = busy_window(spans)
    phase = end - start
    stored = db.count_rows(ws.conn, table)["rows"]
    ws.drop(table)
    assert stored == n and report["texts_embedded"] == n, (stored, report["texts_embedded"])
    if len(servers) == 1:
        base.update({n: (wall, phase)})
    one_wall, one_phase = base.get(n, (wall, phase))
    least = least_time(n, len(servers))
    speedup = one_wall / wall
    met = ""
    if (len(servers), n) == TARGET[:2]:
        met = f" ({'meets' if speedup >= TARGET[2] else 'MISSES'} >= {TARGET[2]}x)"
    return [n, len(servers), f"{wall:.2f}", f"{n / wall:,.0f}", f"{phase:.2f}",
            f"{n / phase:,.0f}", f"{least:.2f}",
            " / ".join(f"{b:.0%}" for b in busy_shares(spans)),
            " / ".join(str(s.counts()["requests"]) for s in servers),
            f"{speedup:.2f}x{met}", f"{one_phase / phase:.2f}x"]


def killed_run(ws: Workspace, n: int) -> list:
    """Two servers; the second is killed (SIGKILL) once it has answered about half of its
    share of the batches. The run must end with exit status 0 and every row once."""
    servers = start_servers(2, "ollama-gpu", DIM)
    victim, table = servers[1], "bench_servers_killed"
    ws.drop(table)
    report_path = ws.tmp / "killed.json"
    report_path.unlink(missing_ok=True)
    kill_after = max(1, math.ceil(n / BATCH) // 4)
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "embed_helpers", "ingest", "--data", str(write_csv(ws, n)),
             "--id-col", "id", "--text-col", "text", "--table", table, "-q",
             "--report", str(report_path)], env=env_for(ws, servers, "killed.jsonl"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None and len(victim.busy()) < kill_after:
            time.sleep(0.02)
        answered = len(victim.busy())
        victim.kill()
        killed_at = time.perf_counter() - start
        out, err = proc.communicate()
        wall = time.perf_counter() - start
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        counts = db.count_rows(ws.conn, table)
        with ws.conn.cursor() as cur:
            cur.execute(f'SELECT count(DISTINCT id), count(*) FILTER (WHERE id = ANY(%s)) '
                        f'FROM "{table}"', ([f"n{i}" for i in range(n)],))
            distinct, expected = cur.fetchone()
        ws.conn.rollback()
        servers_seen = report.get("servers", {})
        seen = [servers_seen.get(s.url, {}) for s in servers]
        per_server = " / ".join(f"{c.get('requests', '?')} ({c.get('errors', '?')} failed)"
                                for c in seen)
        once = counts["rows"] == distinct == expected == n and counts["with_vector"] == n
        if proc.returncode != 0:
            print(f"killed run: exit {proc.returncode}\n{out}\n{err}", file=sys.stderr)
        return [n, f"2, one SIGKILLed at {killed_at:.1f} s (it had answered {answered} "
                f"request{'s' if answered != 1 else ''})",
                proc.returncode, f"{wall:.2f}", f"{counts['rows']} of {n}",
                "yes" if once else "NO", per_server, report.get("retries", "?"),
                "yes" if proc.returncode == 0 and once else "NO"]
    finally:
        ws.drop(table)
        for s in servers:
            s.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 texts only")
    args = parser.parse_args()
    sizes = [2000] if args.quick else [2000, 8000]
    with Workspace() as ws:
        print_header("Several servers", [
            "data: synthetic clinical notes (bench/common.py synthetic_texts), 150-250 characters",
            ws.describe(), f"servers: fake `ollama-gpu` (12 ms/request + 1.5 ms/text, 1 slot), "
            f"{DIM}-dim vectors (small on purpose: the fakes' JSON and the client's parsing on "
            f"few cores would otherwise be measured); EMBED_BATCH_SIZE={BATCH}, "
            f"EMBED_MAX_CONCURRENCY={PER_SERVER} per server"])
        servers = start_servers(4, "ollama-gpu", DIM)
        rows, base = [], {}
        try:
            for n in sizes:
                for k in (1, 2, 4):
                    rows.append(one_run(ws, servers[:k], n, base))
        finally:
            for s in servers:
                s.stop()
        print_table(["texts", "servers", "wall s (CLI)", "texts/s", "embedding phase s",
                     "texts/s (phase)", "least possible s", "busy share per server",
                     "requests per server", "speedup (wall)", "speedup (phase)"], rows)
        print("Embedding phase: the first request's start to the last one's end, from the "
              "servers' GET /_busy; busy share: each server's busy time in that phase. "
              "Speedups are over one server on the same texts.\n")
        print_table(["texts", "servers", "exit status", "wall s (CLI)", "rows in table",
                     "every row once", "requests per server (failed)", "retries", "passes"],
                    [killed_run(ws, sizes[-1])])


if __name__ == "__main__":
    main()
