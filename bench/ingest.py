"""Step 9 (per row) versus Step 9b (batched, pipelined) on the fake server's latency profiles.

    .venv/bin/python bench/ingest.py            # everything (about 3 minutes)
    .venv/bin/python bench/ingest.py --quick    # 200 abstracts, no 100k run

The server runs in its own process (so it does not compete with the client for the GIL)
and the embedded PostgreSQL is kept running by this script, as a database server would be.
Each Step 9b figure is a whole `python -m embed_helpers ingest` run, start-up included.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from fake_server import PROFILES  # noqa: E402

from embed_helpers import db  # noqa: E402
from embed_helpers.backends import get_backend  # noqa: E402
from embed_helpers.cache import EmbeddingCache, cache_key  # noqa: E402
from embed_helpers.config import load_settings  # noqa: E402
from embed_helpers.workflow import ingest_per_row  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "pubmed_abstracts" / "abstracts.csv"
SAMPLE = ROOT / "data" / "sample" / "pubmed" / "abstracts.csv"
DIM = 768
FAKE_KEY = {"OPENAI_API_KEY": "bench"}  # the fake server takes any key

# profile -> (server latency options, backend settings, texts, Step 9 rows measured)
SCENARIOS = {
    "ollama-gpu": (dict(profile="ollama-gpu"),
                   dict(EMBEDDING_BACKEND="ollama", EMBED_BATCH_SIZE=512, EMBED_MAX_CONCURRENCY=2),
                   2000, 2000),
    "hosted-api": (dict(profile="hosted-api", rate_429=0.0),
                   dict(EMBEDDING_BACKEND="llm_api", EMBED_ENCODING="base64",
                        EMBED_BATCH_SIZE=125, EMBED_MAX_CONCURRENCY=8), 1000, 100),
    "flaky": (dict(profile="flaky"),
              dict(EMBEDDING_BACKEND="ollama", EMBED_BATCH_SIZE=100, EMBED_MAX_CONCURRENCY=2,
                   EMBED_MAX_RETRIES=10, EMBED_BACKOFF_MS=20), 2000, 0),
}


def least_time(profile: str, texts: int, batch: int) -> float:
    """The server's least possible busy time for `texts` at `batch` (its latency model only)."""
    model = PROFILES[profile]
    requests = math.ceil(texts / batch)
    waves = math.ceil(requests / model.slots)
    return waves * model.per_request_ms / 1000 + math.ceil(texts / model.slots) * model.per_text_ms / 1000


def start_server(profile: str, **override) -> tuple[subprocess.Popen, str]:
    code = ("import sys, dataclasses; sys.path.insert(0, %r); from fake_server import *; "
            "m = dataclasses.replace(PROFILES[%r], **%r); s = FakeEmbeddingServer(%d, m); "
            "print('READY', s.url, flush=True); s._httpd.serve_forever(0.05)"
            % (str(ROOT / "tests"), profile, override, DIM))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    return proc, line[1]


def server_counts(url: str) -> dict:
    import requests
    counts = requests.get(url + "/_stats", timeout=5).json()
    counts = counts.get("counts", counts)
    return {"requests": sum(c["requests"] for c in counts.values()),
            "texts": sum(c["texts"] for c in counts.values())}


def server_idle(url: str) -> str:
    """Share of the time between the server's first and last request when it had no work."""
    import requests

    from embed_helpers.report import merge_intervals
    busy = [tuple(span) for span in requests.get(url + "/_busy", timeout=5).json()]
    if len(busy) < 2:
        return ""
    span = max(e for _, e in busy) - min(s for s, _ in busy)
    return f"{1 - merge_intervals(busy) / span:.1%}"


def reset_server(url: str) -> None:
    import requests
    requests.post(url + "/_reset", timeout=5)


def env_for(url: str, settings: dict, cache: Path) -> dict:
    # EMBEDDING_DIM as a user's .env would have it: no probe request before the run.
    env = dict(os.environ, OLLAMA_HOST=url, OPENAI_BASE_URL=url + "/v1", **FAKE_KEY,
               EMBED_CACHE_PATH=str(cache), PYTHONPATH=str(ROOT), EMBEDDING_DIM=str(DIM),
               EMBED_ENV_FILE="")  # the developer's .env must not redirect the benchmark
    env.update({k: str(v) for k, v in settings.items()})
    return env


def cli_ingest(csv: Path, table: str, env: dict, report: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "embed_helpers", "ingest", "--data", str(csv),
                           "--id-col", "pmid", "--text-col", "text", "--table", table, "-q",
                           "--no-index", "--report", str(report)], env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 3):
        raise SystemExit(done.stderr)
    return wall, json.loads(report.read_text())


def step9(csv: Path, rows: int, table: str, url: str, settings: dict, conn) -> tuple[float, int]:
    env = {k: str(v) for k, v in settings.items() if k != "EMBED_BATCH_SIZE"}
    env.update(OLLAMA_HOST=url, OPENAI_BASE_URL=url + "/v1", **FAKE_KEY,
               EMBED_MAX_CONCURRENCY="1")
    s = load_settings(environ=env, env_file="/nonexistent")
    df = pd.read_csv(csv, dtype=str).head(rows)
    with get_backend(s) as backend:
        start = time.perf_counter()
        report = ingest_per_row(df, id_col="pmid", text_col="text", table=table, settings=s,
                                conn=conn, backend=backend, progress=False)
    return time.perf_counter() - start, report.rows_written


def profile_table(name: str, csv_all: Path, work: Path, conn) -> list[list]:
    server_opts, settings, n, step9_rows = SCENARIOS[name]
    proc, url = start_server(**server_opts)
    rows = []
    try:
        csv = work / f"{name}.csv"
        grown = work / f"{name}-grow.csv"
        frame = pd.read_csv(csv_all, dtype=str)
        frame.head(n).to_csv(csv, index=False)
        frame.head(n + 20).to_csv(grown, index=False)
        n = min(n, len(frame))
        least = least_time(name, n, settings["EMBED_BATCH_SIZE"])
        table = f"bench_{name.replace('-', '_')}"
        if step9_rows:
            db.drop_table(conn, table + "_step9")
            measured = min(step9_rows, n)
            reset_server(url)
            wall, written = step9(csv, measured, table + "_step9", url, settings, conn)
            scaled = wall * n / measured
            label = "Step 9 (per row)" if measured == n else \
                f"Step 9 (per row; {measured} rows measured, time scaled to {n})"
            rows.append([name, label, "", f"{scaled:.2f}", measured, measured, written,
                         f"{scaled / least:.1f}x", server_idle(url)])
        runs = [("Step 9b cold", csv, True), ("Step 9b warm rerun", csv, False),
                ("Step 9b grow +20", grown, False)]
        if name == "flaky":
            runs = [(f"Step 9b cold, run {i}", csv, True) for i in (1, 2, 3)]
        for label, data, fresh in runs:
            cache = work / f"{name}.jsonl"
            if fresh:
                db.drop_table(conn, table)
                cache.unlink(missing_ok=True)
            reset_server(url)
            wall, report = cli_ingest(data, table, env_for(url, settings, cache), work / "r.json")
            counts = server_counts(url)
            stored = db.count_rows(conn, table)["rows"]
            ratio = f"{wall / least:.2f}x" if "cold" in label else ""
            rows.append([name, label, f"{wall:.2f}", f"{report['wall_s']:.2f}",
                         counts["requests"], report["texts_embedded"], stored, ratio,
                         server_idle(url)])
        rows.append([name, "least possible (server model)", f"{least:.2f}", "", "", n, "", "1.00x",
                     "0%"])
    finally:
        proc.terminate()
    return rows


def big_run(conn, work: Path, n: int = 100_000) -> list:
    """100k synthetic rows whose vectors are all cached: the write path alone."""
    proc, url = start_server("ollama-gpu", per_request_ms=0, per_text_ms=0)
    try:
        cache_path = work / "big.jsonl"
        cache_path.unlink(missing_ok=True)
        texts = [f"synthetic clinical note {i}" for i in range(n)]
        pd.DataFrame({"pmid": [str(i) for i in range(n)], "text": texts}).to_csv(
            work / "big.csv", index=False)
        rng = np.random.default_rng(0)
        cache = EmbeddingCache(cache_path)
        for start in range(0, n, 5000):
            chunk = texts[start:start + 5000]
            vectors = rng.standard_normal((len(chunk), DIM)).astype(np.float32)
            cache.put_many([(cache_key("ollama:/api/embed", "nomic-embed-text", DIM, True, t), v)
                            for t, v in zip(chunk, vectors)], route="ollama:/api/embed",
                           model="nomic-embed-text", normalized=True, texts=chunk)
        cache.close()
        db.drop_table(conn, "bench_big")
        env = env_for(url, dict(EMBEDDING_BACKEND="ollama", EMBED_BATCH_SIZE=512), cache_path)
        code = ("import resource, runpy, sys; sys.argv = ['embed_helpers'] + sys.argv[1:]\n"
                "try:\n    runpy.run_module('embed_helpers', run_name='__main__')\n"
                "except SystemExit:\n    pass\n"
                "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, "ingest", "--data", str(work / "big.csv"),
                               "--id-col", "pmid", "--text-col", "text", "--table", "bench_big",
                               "-q", "--no-index", "--report", str(work / "big.json")],
                              env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        report = json.loads((work / "big.json").read_text())
        rss = int(done.stdout.split("MAXRSS_KB")[-1]) / 1024
        stored = db.count_rows(conn, "bench_big")["rows"]
        db.drop_table(conn, "bench_big")
        return [n, DIM, stored, report["texts_embedded"], f"{report['wall_s']:.1f}",
                f"{report['rows_written'] / report['wall_s']:,.0f}", f"{wall:.1f}", f"{rss:,.0f}"]
    finally:
        proc.terminate()


def print_table(header: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 abstracts, no 100k run")
    parser.add_argument("--profile", choices=sorted(SCENARIOS), action="append")
    args = parser.parse_args()
    csv_all = SHARED if SHARED.is_file() else SAMPLE
    if csv_all == SAMPLE:
        print(f"note: {SHARED} not found; using the 200-row sample")
    settings = load_settings(environ={k: v for k, v in os.environ.items() if k == "DATABASE_URL"},
                             env_file="/nonexistent")
    conn = db.connect(settings)  # holds the embedded server up for the whole benchmark
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.quick:
            for key, (srv, st, _n, s9) in list(SCENARIOS.items()):
                SCENARIOS[key] = (srv, st, 200, min(s9, 50))
        rows = []
        for name in args.profile or SCENARIOS:
            rows += profile_table(name, csv_all, work, conn)
        print_table(["profile", "run", "wall s (CLI)", "ingest s", "requests", "texts embedded",
                     "rows in table", "vs least possible", "server idle"], rows)
        if not args.quick:
            print_table(["rows", "dims", "rows in table", "texts embedded", "ingest s",
                         "rows/s", "wall s", "peak RSS MB"], [big_run(conn, work)])
    conn.close()


if __name__ == "__main__":
    main()
