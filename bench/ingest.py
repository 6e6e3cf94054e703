"""Step 9 (per row) versus Step 9b (batched, pipelined) versus a direct client, on the fake
server's latency profiles; and 100k cached rows written.

    .venv/bin/python bench/ingest.py            # everything (about 1.5 minutes on 2 cores)
    .venv/bin/python bench/ingest.py --quick    # 200 abstracts, no 100k run (under a minute)
    .venv/bin/python bench/ingest.py --profile ollama-gpu

Each Step 9b figure is a whole `python -m embed_helpers ingest` run as a user types it
(start-up included; no EMBEDDING_DIM, no --no-index: the CLI decides on the index and says
so). The "direct client" is what a user could write in 30 lines with `requests`: the same
texts, batches and concurrency against the same server, vectors decoded, nothing written.
Servers, database and state: see bench/common.py.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import numpy as np
import pandas as pd

from common import (FakeServer, Workspace, busy_shares, cli_ingest, index_line, print_header,
                    print_table, pubmed_csv, start_servers)
from fake_server import PROFILES

from embed_helpers import db
from embed_helpers.backends import get_backend
from embed_helpers.cache.jsonl import EmbeddingCache
from embed_helpers.steps import Target
from embed_helpers.identity import Identity
from embed_helpers.per_row import ingest_per_row

DIM = 768
FAKE_KEY = {"OPENAI_API_KEY": "bench"}  # the fake server takes any key
#: profile -> (ours (cold CLI) / direct client at most, at this many texts)
TARGETS = {"ollama-gpu": (1.2, 2000), "hosted-api": (2.0, 1000)}

# profile -> (server overrides, backend settings, texts, Step 9 rows measured)
SCENARIOS = {
    "ollama-gpu": ({}, dict(EMBEDDING_BACKEND="ollama", EMBED_BATCH_SIZE=512,
                            EMBED_MAX_CONCURRENCY=2), 2000, 2000),
    "hosted-api": (dict(rate_429=0.0), dict(EMBEDDING_BACKEND="llm_api", EMBED_BATCH_SIZE=125,
                                            EMBED_MAX_CONCURRENCY=8), 1000, 100),
    "flaky": ({}, dict(EMBEDDING_BACKEND="ollama", EMBED_BATCH_SIZE=100, EMBED_MAX_CONCURRENCY=2,
                       EMBED_MAX_RETRIES=10, EMBED_BACKOFF_MS=20), 2000, 0),
}


#: The direct client: ~30 lines a user might write instead, run as its own process (like
#: our CLI) so that both pay Python's start, their imports and reading the CSV.
DIRECT_CLIENT = """
import base64, csv, sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np, requests
path, url, backend, batch, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
with open(path, newline="") as f:
    texts = [row["text"] for row in csv.DictReader(f)]
session = requests.Session()
session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=workers))
def embed(chunk):
    if backend == "ollama":
        r = session.post(url + "/api/embed", json={"model": "nomic-embed-text", "input": chunk}, timeout=60)
        r.raise_for_status()
        return np.asarray(r.json()["embeddings"], dtype=np.float32)
    r = session.post(url + "/v1/embeddings", json={"model": "text-embedding-3-small", "input": chunk,
                                                    "encoding_format": "base64"}, timeout=60)
    r.raise_for_status()
    items = sorted(r.json()["data"], key=lambda item: item["index"])
    return np.stack([np.frombuffer(base64.b64decode(i["embedding"]), "<f4") for i in items])
with ThreadPoolExecutor(workers) as pool:
    parts = list(pool.map(embed, [texts[i:i + batch] for i in range(0, len(texts), batch)]))
assert sum(len(p) for p in parts) == len(texts)
"""


def direct_client(url: str, backend: str, csv_path, batch: int, workers: int) -> float:
    """Wall seconds of the direct client's whole process: batches, `workers` in flight,
    base64 on the OpenAI-compatible route, floats on Ollama's (it has no base64);
    vectors decoded, nothing written."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", DIRECT_CLIENT, str(csv_path), url, backend,
                    str(batch), str(workers)], check=True)
    return time.perf_counter() - start


def least_time(profile: str, texts: int, batch: int) -> float:
    """The server's least possible busy time for `texts` at `batch` (its latency model only)."""
    model = PROFILES[profile]
    waves = math.ceil(math.ceil(texts / batch) / model.slots)
    per_slot = math.ceil(texts / model.slots)
    return (waves * model.per_request_ms + per_slot * model.per_text_ms) / 1000


def idle(server: FakeServer) -> str:
    """Share of the time between the server's first and last request when it had no work."""
    busy = server.busy()
    return f"{1 - busy_shares([busy])[0]:.1%}" if len(busy) > 1 else ""


def backend_env(url: str, settings: dict) -> dict:
    return dict(OLLAMA_HOST=url, OPENAI_BASE_URL=url + "/v1", **FAKE_KEY, **settings)


def step9(frame: pd.DataFrame, table: str, url: str, settings: dict, ws: Workspace
          ) -> tuple[float, int]:
    s = ws.settings(**backend_env(url, {**settings, "EMBED_MAX_CONCURRENCY": 1}))
    with get_backend(s) as backend:
        start = time.perf_counter()
        report = ingest_per_row(frame, Target(table, "pmid", "text"), settings=s, conn=ws.conn,
                                backend=backend, progress=False)
    return time.perf_counter() - start, report.rows_written


def profile_rows(name: str, frame: pd.DataFrame, ws: Workspace, notes: list[str],
                 ratios: list[list]) -> list[list]:
    server_opts, settings, n, step9_rows = SCENARIOS[name]
    (server,) = start_servers(1, name, DIM, **server_opts)
    url, rows, n = server.url, [], min(n, len(frame))
    table = f"bench_{name.replace('-', '_')}"
    try:
        csv, grown = ws.tmp / f"{name}.csv", ws.tmp / f"{name}-grow.csv"
        frame.head(n).to_csv(csv, index=False)
        frame.head(n + 20).to_csv(grown, index=False)
        least = least_time(name, n, settings["EMBED_BATCH_SIZE"])
        if step9_rows:
            measured = min(step9_rows, n)
            server.reset()
            wall, written = step9(frame.head(measured), table + "_step9", url, settings, ws)
            ws.drop(table + "_step9")
            scaled = wall * n / measured
            label = "Step 9 (per row)" if measured == n else \
                f"Step 9 (per row; {measured} rows measured, time scaled to {n})"
            rows.append([name, label, "", f"{scaled:.2f}", measured, measured, written,
                         f"{scaled / least:.1f}x", idle(server)])
        direct = None
        if name in TARGETS:
            server.reset()
            direct = direct_client(url, settings["EMBEDDING_BACKEND"], csv,
                                   settings["EMBED_BATCH_SIZE"], settings["EMBED_MAX_CONCURRENCY"])
            counts = server.counts()
            rows.append([name, "direct client (requests, writes nothing)", f"{direct:.2f}",
                         "", counts["requests"], counts["texts"], "", f"{direct / least:.2f}x",
                         idle(server)])
        runs = [("Step 9b cold", csv, True), ("Step 9b warm rerun", csv, False),
                ("Step 9b grow +20", grown, False)]
        if name == "flaky":
            runs = [(f"Step 9b cold, run {i}", csv, True) for i in (1, 2, 3)]
        for label, data, fresh in runs:
            cache = f"{name}.jsonl"
            if fresh:
                ws.drop(table)
                (ws.tmp / cache).unlink(missing_ok=True)
            server.reset()
            wall, report, done = cli_ingest(data, table, ws.subprocess_env(
                cache, **backend_env(url, settings)), ws.tmp / "r.json", id_col="pmid")
            counts = server.counts()
            stored = db.count_rows(ws.conn, table)["rows"]
            if label.startswith("Step 9b cold") and index_line(done.stdout) not in notes:
                notes.append(index_line(done.stdout))
            if label == "Step 9b cold" and direct:
                limit, at = TARGETS[name]
                met = ("yes" if wall / direct <= limit else "NO") if n == at else \
                    f"n/a (target is at {at:,} texts)"
                ratios.append([name, n, settings["EMBED_BATCH_SIZE"],
                               settings["EMBED_MAX_CONCURRENCY"], f"{direct:.2f}", f"{wall:.2f}",
                               f"{wall / direct:.2f}x", f"<= {limit}x", met,
                               f"{report['wall_s']:.2f}", f"{report['wall_s'] / direct:.2f}x"])
            rows.append([name, label, f"{wall:.2f}", f"{report['wall_s']:.2f}", counts["requests"],
                         report["texts_embedded"], stored,
                         f"{wall / least:.2f}x" if "cold" in label else "", idle(server)])
        rows.append([name, "least possible (server model)", f"{least:.2f}", "", "", n, "", "1.00x",
                     "0%"])
    finally:
        ws.drop(table)
        server.stop()
    return rows


def big_run(ws: Workspace, n: int = 100_000) -> list:
    """100k synthetic rows whose vectors are all cached under the identity the product
    uses: the write path alone (--no-index: the index build is not the write path)."""
    (server,) = start_servers(1, "ollama-gpu", DIM, per_request_ms=0, per_text_ms=0)
    try:
        cache = EmbeddingCache(ws.tmp / "big.jsonl")
        texts = [f"synthetic clinical note {i}" for i in range(n)]
        pd.DataFrame({"pmid": [str(i) for i in range(n)], "text": texts}).to_csv(
            ws.tmp / "big.csv", index=False)
        identity = Identity("ollama:/api/embed", "nomic-embed-text", DIM, True)
        rng = np.random.default_rng(0)
        for start in range(0, n, 5000):
            vectors = rng.standard_normal((len(texts[start:start + 5000]), DIM)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            cache.put_many(identity, texts[start:start + 5000], vectors)
        cache.close()
        env = ws.subprocess_env("big.jsonl", **backend_env(server.url, dict(
            EMBEDDING_BACKEND="ollama", EMBED_BATCH_SIZE=512)))
        code = ("import resource, runpy, sys; sys.argv = ['embed_helpers'] + sys.argv[1:]\n"
                "try:\n    runpy.run_module('embed_helpers', run_name='__main__')\n"
                "except SystemExit:\n    pass\n"
                "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, "ingest", "--data",
                               str(ws.tmp / "big.csv"), "--id-col", "pmid", "--text-col", "text",
                               "--table", "bench_big", "-q", "--no-index",
                               "--report", str(ws.tmp / "big.json")],
                              env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        report = json.loads((ws.tmp / "big.json").read_text())
        rss = int(done.stdout.split("MAXRSS_KB")[-1]) / 1024
        stored = db.count_rows(ws.conn, "bench_big")["rows"]
        return [n, DIM, stored, report["texts_embedded"], server.counts()["requests"],
                f"{report['wall_s']:.1f}", f"{report['rows_written'] / report['wall_s']:,.0f}",
                f"{wall:.1f}", f"{rss:,.0f}"]
    finally:
        ws.drop("bench_big")
        server.stop()


def python_startup() -> float:
    """What any client in a fresh process pays first: Python with requests and numpy."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import requests, numpy"], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 abstracts, no 100k run")
    parser.add_argument("--profile", choices=sorted(SCENARIOS), action="append")
    args = parser.parse_args()
    csv_all, data_note = pubmed_csv()
    if args.quick:
        for key, (srv, st, _n, s9) in list(SCENARIOS.items()):
            SCENARIOS[key] = (srv, st, 200, min(s9, 50 if key == "ollama-gpu" else 20))
    frame = pd.read_csv(csv_all, dtype=str)
    with Workspace() as ws:
        print_header("Ingestion: Step 9, Step 9b and a direct client", [
            data_note, ws.describe(), f"vectors: {DIM} dims; fake servers in processes of their "
            f"own; Python start-up with requests and numpy here: {python_startup():.2f} s"])
        rows, notes, ratios = [], [], []
        for name in args.profile or SCENARIOS:
            rows += profile_rows(name, frame, ws, notes, ratios)
        print_table(["profile", "run", "wall s (CLI)", "ingest s", "requests", "texts embedded",
                     "rows in table", "vs least possible", "server idle"], rows)
        if ratios:
            print("Ours (cold CLI run, start-up included) against the direct client; "
                  "\"ingest s\" is the run's own wall time (report.wall_s, no start-up):\n")
            print_table(["profile", "texts", "batch", "concurrency", "direct client s",
                         "ours cold CLI s", "ratio", "target", "met", "ours ingest s",
                         "ratio (ingest s)"], ratios)
        for note in notes:
            print(f"index decision of a cold run: {note}  ")
        print()
        if not args.quick:
            print("100k rows, every vector in the cache (the write path; --no-index):\n")
            print_table(["rows", "dims", "rows in table", "texts embedded", "requests",
                         "ingest s", "rows/s", "wall s", "peak RSS MB"], [big_run(ws)])


if __name__ == "__main__":
    main()
