"""The Ray engine on 1, 2 and 4 servers against the local engine on one; and a written model
of where the limit lies at 8, 32 and 128 GPUs, with this machine's write rates.

    .venv/bin/python bench/scale.py            # 40,000 texts (about 4.5 minutes on 2 cores)
    .venv/bin/python bench/scale.py --quick    # 4,000 texts, Ray K = 2 and 4 (under a minute)

Servers: the fake server's `ollama-gpu` profile (12 ms/request + 1.5 ms/text, one slot),
32-dim vectors (small: the fakes' JSON encoding must not stand in for GPU time), each in a
process of its own. Runs: EMBED_BATCH_SIZE=512, EMBED_MAX_CONCURRENCY=2; Ray with
EMBED_WORKERS=K on K servers, the local engine on one server, both through
`workflow.ingest` on the CSV file, as `ingest` does. One local Ray is started
here and reused by every run. Servers, database and state: see bench/common.py.
"""
from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import time

import numpy as np

from common import (Workspace, busy_shares, busy_window, print_header, print_table,
                    start_servers, synthetic_texts)

from embed_helpers import db, workflow
from embed_helpers.backends import get_backend
from embed_helpers.cache.postgres import TABLE as CACHE_TABLE, PostgresCache
from embed_helpers.cache.tools import open_cache
from embed_helpers.csv_rows import read_csv_columns
from embed_helpers.steps import Target
from embed_helpers.identity import Identity

DIM, BATCH, PER_SERVER = 32, 512, 2
TARGETS = {2: 1.8, 4: 3.2}       # speedup over the local engine on one server, at least
GPU_RATE = (1000, 3000)          # texts/s per A100, nomic-embed-text class, ~300-token texts
PG_MB_S = (500, 1000)            # heap + WAL MB/s one PostgreSQL server absorbs (NVMe), assumed


def run_settings(ws: Workspace, servers, engine: str, workers: int | None = None):
    extra = dict(EMBED_WORKERS=workers, EMBED_CACHE_BACKEND="postgres") if engine == "ray" else {}
    return ws.settings(f"{engine}.jsonl", EMBEDDING_BACKEND="ollama", EMBED_ENGINE=engine,
                       OLLAMA_HOST=",".join(s.url for s in servers), EMBED_BATCH_SIZE=BATCH,
                       EMBED_MAX_CONCURRENCY=PER_SERVER, **extra)


def ingest_once(ws: Workspace, servers, engine: str, source, target: Target):
    """One run through `workflow.ingest` (the plan, then the engine EMBED_ENGINE names, as
    `ingest --engine ray` does); returns (report, seconds)."""
    settings = run_settings(ws, servers, engine, len(servers))
    start = time.perf_counter()
    rows = read_csv_columns(source, "id", "text") if isinstance(source, (str, os.PathLike)) \
        else source
    with get_backend(settings) as backend, open_cache(settings) as cache:
        report = workflow.ingest(rows, target, settings=settings, conn=ws.conn,
                                 backend=backend, cache=cache, progress=False)
    return report, time.perf_counter() - start


def measure(ws: Workspace, servers, engine: str, source, n: int, base: dict,
            rerun: bool = True) -> list:
    target = Target(f"bench_scale_{engine}_{len(servers)}", "id", "text")
    ws.drop(target.table)
    with ws.conn.cursor() as cur:  # the PostgreSQL cache of this benchmark's database
        cur.execute(f"DROP TABLE IF EXISTS {CACHE_TABLE}")
    ws.conn.commit()
    (ws.tmp / f"{engine}.jsonl").unlink(missing_ok=True)
    for s in servers:
        s.reset()
    report, wall = ingest_once(ws, servers, engine, source, target)
    spans = [s.busy() for s in servers]
    requests = [s.counts()["requests"] for s in servers]
    start, end = busy_window(spans)
    phase = end - start
    stored = db.count_rows(ws.conn, target.table)["rows"]
    again = "not run (--quick)"
    if rerun:
        for s in servers:
            s.reset()
        report2, seconds = ingest_once(ws, servers, engine, source, target)
        again = (f"{sum(s.counts()['requests'] for s in servers)} ({report2.requests} in report), "
                 f"{seconds:.1f} s")
    ws.drop(target.table)
    if engine == "local":
        base["phase"] = phase
    speedup = base["phase"] / phase
    target_text = ""
    if engine == "ray" and len(servers) in TARGETS:
        goal = TARGETS[len(servers)]
        target_text = f">= {goal}x: {'met' if round(speedup, 2) >= goal else 'MISSED'}"
    workers = " / ".join(str(w["rows"]) for w in report.workers.values()) if report.workers else ""
    return [engine, len(servers), len(servers) if engine == "ray" else "",
            len(report.workers) or "", f"{stored:,} of {n:,}",
            f"{wall:.1f}", f"{phase:.1f}", f"{n / phase:,.0f}", f"{speedup:.2f}x", target_text,
            " / ".join(f"{b:.0%}" for b in busy_shares(spans)), " / ".join(map(str, requests)),
            workers, "" if report.ray_startup_s is None else f"{report.ray_startup_s:.2f}",
            again]


def copy_rate(ws: Workspace, n: int) -> tuple[float, float]:
    """Rows/s of db.write_rows on 768-dim vectors in blocks of 2,048 rows (a Ray block):
    binary COPY into a new table, then the same rows again (staged upsert)."""
    table = "bench_scale_copy"
    ws.drop(table)
    db.create_table(ws.conn, table, "id", "text", 768)
    rng = np.random.default_rng(0)
    ids = [f"c{i}" for i in range(n)]
    texts = synthetic_texts(n)
    vectors = rng.standard_normal((n, 768)).astype(np.float32)
    rates = []
    for assume_new in (True, False):
        start = time.perf_counter()
        for lo in range(0, n, 2048):
            db.write_rows(ws.conn, table, "id", "text", ids[lo:lo + 2048], texts[lo:lo + 2048],
                          vectors[lo:lo + 2048], assume_new=assume_new)
        rates.append(n / (time.perf_counter() - start))
    ws.drop(table)
    return rates[0], rates[1]


def cache_rate(ws: Workspace, n: int) -> float:
    """Rows/s of PostgresCache.put_many (one INSERT ... ON CONFLICT per batch of 512)."""
    identity = Identity("ollama:/api/embed", "nomic-embed-text", 768, True)
    texts = synthetic_texts(n, prefix="cache ")
    vectors = np.random.default_rng(1).standard_normal((n, 768)).astype(np.float32)
    with PostgresCache(ws.settings()) as cache:
        start = time.perf_counter()
        for lo in range(0, n, BATCH):
            cache.put_many(identity, texts[lo:lo + BATCH], vectors[lo:lo + BATCH])
        seconds = time.perf_counter() - start
    with ws.conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {CACHE_TABLE}")
    ws.conn.commit()
    return n / seconds


def decode_rates(seconds: float) -> dict:
    """Texts/s one core decodes from a 512 x 768 answer: Ollama's JSON floats (as the fake
    server writes them) and OpenAI's base64; and the bytes per vector of each."""
    vectors = np.random.default_rng(2).standard_normal((BATCH, 768)).astype(np.float32)
    floats = json.dumps({"embeddings": vectors.tolist()})
    b64 = json.dumps({"data": [{"index": i, "embedding": base64.b64encode(v.tobytes()).decode()}
                               for i, v in enumerate(vectors)]})
    out = {"json_bytes": len(floats) / BATCH, "b64_bytes": len(b64) / BATCH}
    for name, body, decode in (
            ("json", floats, lambda b: np.asarray(json.loads(b)["embeddings"], dtype=np.float32)),
            ("b64", b64, lambda b: np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
                                             for d in json.loads(b)["data"]]))):
        start, rounds = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            decode(body)
            rounds += 1
        out[name] = rounds * BATCH / (time.perf_counter() - start)
    return out


def model(copy_new: float, copy_upsert: float, cache_put: float, dec: dict) -> None:
    """Where the limit lies at 8, 32 and 128 GPUs: arithmetic with the figures above."""
    lo, hi = GPU_RATE
    per_text = 2 * (3072 + 1200 + 3072 + 200)       # heap + WAL: row (vector, text) + cache
    server = (PG_MB_S[0] * 1e6 / per_text, PG_MB_S[1] * 1e6 / per_text)
    print(f"""### Where the limit lies at 8, 32 and 128 GPUs (a model, with arithmetic)

Assumptions: a nomic-embed-text-class model (137M parameters, 768 dims) embeds {lo:,}-{hi:,}
texts/s of ~300 tokens per A100 (fp16, large batches); one Ray worker per GPU; one
PostgreSQL server absorbs {PG_MB_S[0]:,}-{PG_MB_S[1]:,} MB/s of heap + WAL writes (NVMe; not
measured here). Each text costs it ~{per_text / 1000:.0f} KB: the row (3.1 KB vector + ~1.2 KB
text) and the cache entry (3.1 KB + keys), each written to the heap and the WAL; so one server
takes {server[0]:,.0f}-{server[1]:,.0f} texts/s. Measured on this machine (noisy, {os.cpu_count()}
cores): binary COPY (db.write_rows, 768 dims, blocks of 2,048) {copy_new:,.0f} rows/s per
connection for new rows and {copy_upsert:,.0f} rows/s as a staged upsert (25,000-47,000 rows/s
elsewhere); PostgresCache.put_many {cache_put:,.0f} rows/s per connection; one core decodes
{dec['json']:,.0f} texts/s of JSON floats ({dec['json_bytes'] / 1000:.1f} KB per vector as the
fake writes them; Ollama has no base64) or {dec['b64']:,.0f} texts/s of base64
({dec['b64_bytes'] / 1000:.1f} KB; the OpenAI-compatible route).
""")
    rows = []
    for gpus in (8, 32, 128):
        a, b = gpus * lo, gpus * hi
        rate = lambda per: f"{a * per * 8 / 1e9:.1f}-{b * per * 8 / 1e9:.1f}"  # noqa: E731
        rows.append([gpus, f"{a:,}-{b:,}", f"{a / copy_new:.1f}-{b / copy_new:.1f}",
                     f"{a / cache_put:.1f}-{b / cache_put:.1f}",
                     f"{a * per_text / 1e6:,.0f}-{b * per_text / 1e6:,.0f}",
                     f"{a / server[1]:.1f}-{b / server[0]:.1f}", rate(dec["b64_bytes"]),
                     rate(dec["json_bytes"]), f"{a / dec['json']:.0f}-{b / dec['json']:.0f}"])
    print_table(["GPUs", "texts/s", "table writes, in connections at the COPY rate here",
                 "cache writes, in connections at the put rate here",
                 "PostgreSQL MB/s (heap + WAL)", "PostgreSQL servers needed",
                 "network Gbit/s, base64", "network Gbit/s, JSON floats",
                 "cores to parse JSON floats"], rows)
    gbit = lambda texts, per: texts * per * 8 / 1e9  # noqa: E731
    b64, js = dec["b64_bytes"], dec["json_bytes"]
    print(f"""One worker (one GPU, up to {hi:,} texts/s) uses {hi / copy_new:.0%} of a connection
at this machine's COPY rate and {hi / cache_put:.0%} at its cache rate, on connections of its
own: no worker waits on its own writes. What all workers share is the one PostgreSQL server,
written twice per text.

- 8 GPUs: the GPUs are the limit. {8 * lo:,}-{8 * hi:,} texts/s is within one server's
  {server[0]:,.0f}-{server[1]:,.0f}; the network carries at most {gbit(8 * hi, b64):.1f} Gbit/s in
  base64, {gbit(8 * hi, js):.1f} in JSON floats.
- 32 GPUs: {32 * lo:,}-{32 * hi:,} texts/s. One server is the limit once a GPU does more
  than {server[0] / 32:,.0f}-{server[1] / 32:,.0f} texts/s: the database, the cache table first
  (random-key B-tree inserts, {cache_put:,.0f} rows/s per connection here). JSON floats from
  Ollama would cost {32 * hi / dec['json']:.0f} cores of parsing and {gbit(32 * hi, js):.0f} Gbit/s;
  base64 {gbit(32 * hi, b64):.1f} Gbit/s.
- 128 GPUs: {128 * lo:,}-{128 * hi:,} texts/s needs
  {128 * lo / server[1]:.0f}-{128 * hi / server[0]:.0f} such servers: the database is the limit.
  Ways out: tables sharded over several databases, the cache on a server of its own
  (EMBED_CACHE_URL) or none for one-off loads; base64 on the wire
  ({gbit(128 * hi, b64):.0f} Gbit/s in all, against {gbit(128 * hi, js):.0f} with JSON floats).
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="4,000 texts; Ray on 2 and 4 servers only, one rerun")
    args = parser.parse_args()
    n = 4000 if args.quick else 40_000
    import ray
    import ray.data  # noqa: F401  imported first, so that ingest_ray's quieter loggers stick
    with Workspace() as ws:
        print_header("Scale: the Ray engine", [
            f"data: {n:,} synthetic clinical notes (bench/common.py synthetic_texts)",
            ws.describe(), f"servers: fake `ollama-gpu` (12 ms/request + 1.5 ms/text, 1 slot), "
            f"{DIM}-dim vectors; EMBED_BATCH_SIZE={BATCH}, EMBED_MAX_CONCURRENCY={PER_SERVER}; "
            f"Ray {ray.__version__}"])
        path = ws.tmp / "texts.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "text"])
            writer.writerows((f"s{i}", t) for i, t in enumerate(synthetic_texts(n)))
        columns = {"id": [f"s{i}" for i in range(n)], "text": synthetic_texts(n)}
        servers = start_servers(4, "ollama-gpu", DIM)
        start = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
                 object_store_memory=200_000_000, log_to_driver=False, configure_logging=False)
        startup = time.perf_counter() - start
        rows, base = [], {}
        try:
            rows.append(measure(ws, servers[:1], "local", columns, n, base))
            for k in (2, 4) if args.quick else (1, 2, 4):
                rows.append(measure(ws, servers[:k], "ray", str(path), n, base,
                                    rerun=not args.quick or k == 2))
        finally:
            ray.shutdown()
            for s in servers:
                s.stop()
        print(f"Ray start-up: ray.init(num_cpus={os.cpu_count()}) here took {startup:.1f} s "
              f"(target <= 10 s: {'met' if startup <= 10 else 'MISSED'}); each run's "
              f"report.ray_startup_s is what it paid on top, Ray being up already.\n")
        print_table(["engine", "servers", "EMBED_WORKERS", "workers in report", "rows in table",
                     "wall s", "embedding phase s",
                     "texts/s (phase)", "speedup vs local x1", "target", "busy share per server",
                     "requests per server", "rows per worker", "report.ray_startup_s",
                     "rerun unchanged: requests, s"], rows)
        print("Embedding phase: first request start to last request end over the run's "
              "servers (their GET /_busy).\n")
        copy_new, copy_upsert = copy_rate(ws, 5000 if args.quick else 20_000)
        cache_put = cache_rate(ws, 2048 if args.quick else 10_240)
        model(copy_new, copy_upsert, cache_put, decode_rates(0.3 if args.quick else 1.0))


if __name__ == "__main__":
    main()
