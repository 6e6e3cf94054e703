"""A PostgreSQL source read in windows: the ingesting process's peak memory does not grow
with the rows, and a rerun after changing 10 rows embeds 10 texts.

    .venv/bin/python bench/pg_source.py            # 10,000 and 100,000 rows
    .venv/bin/python bench/pg_source.py --quick    # 2,000 and 20,000 rows (under a minute)

A source table of short synthetic clinical notes is made in the benchmark's own database;
each figure is one `python -m embed_helpers ingest` process as a user types it, against
the fake server (no latency model), its peak resident memory read as it exits (VmHWM of
/proc/self/status: on Linux ru_maxrss would carry over the benchmark's own peak, which a
child inherits across fork and exec). Beside it, the same rows as a CSV file, which a run
reads whole.
Servers, database and state: see bench/common.py.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from urllib.parse import quote

from common import (ROOT, Workspace, print_header, print_table, start_servers,
                    synthetic_texts)
from psycopg2.extensions import parse_dsn

DIM = 384
ROWS, QUICK_ROWS = (10_000, 100_000), (2_000, 20_000)
WINDOW = 10_000
SETTINGS = dict(EMBEDDING_BACKEND="llm_api", OPENAI_API_KEY="bench", EMBED_BATCH_SIZE=256,
                EMBED_MAX_CONCURRENCY=2, EMBED_SOURCE_WINDOW=WINDOW)


def as_url(dsn: str) -> str:
    """A key=value DSN as the postgresql:// URL a user passes to --data."""
    p = parse_dsn(dsn)
    query = "&".join(f"{k}={quote(p[k], safe='/')}" for k in ("host", "port") if k in p)
    password = f":{quote(p['password'], safe='')}" if p.get("password") else ""
    return f"postgresql://{quote(p.get('user', ''), safe='')}{password}@/{p['dbname']}?{query}"


def make_source(ws: Workspace, rows: int) -> None:
    """Table `notes` (note_id bigint, body text) with `rows` notes, and the same as CSV."""
    import io
    texts = synthetic_texts(rows)
    buffer = io.StringIO("".join(f"{i}\t{t}\n" for i, t in enumerate(texts)))
    with ws.conn.cursor() as cur:
        cur.execute("CREATE TABLE notes (note_id bigint PRIMARY KEY, body text NOT NULL)")
        cur.copy_expert("COPY notes FROM STDIN", buffer)
    ws.conn.commit()


def write_csv(ws: Workspace, rows: int):
    path = ws.tmp / f"notes-{rows}.csv"
    with ws.conn.cursor() as cur, open(path, "w") as out:
        cur.copy_expert(f"COPY (SELECT note_id, body FROM notes WHERE note_id < {rows} "
                        "ORDER BY note_id) TO STDOUT WITH (FORMAT csv, HEADER)", out)
    ws.conn.rollback()
    return path


#: `python -m embed_helpers` that writes its own peak RSS (kB) to argv[1] as it exits.
PEAK_CLI = """
import atexit, runpy, sys
out = sys.argv.pop(1)
def peak():
    with open('/proc/self/status') as status:
        kb = next(line.split()[1] for line in status if line.startswith('VmHWM:'))
    with open(out, 'w') as f:
        f.write(kb)
atexit.register(peak)
runpy.run_module('embed_helpers', run_name='__main__')
"""


def ingest(ws: Workspace, url: str, data: list[str], table: str, cache: str,
           **settings) -> dict:
    """One CLI ingest: its wall time, peak RSS (MiB) and report."""
    report, peak = ws.tmp / f"{table}.json", ws.tmp / f"{table}.peak"
    env = ws.subprocess_env(cache=cache, OPENAI_BASE_URL=url + "/v1", **SETTINGS, **settings)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_CLI, str(peak), "ingest", *data,
                           "--table", table, "-q", "--no-index", "--report", str(report)],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"ingest failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return {"wall": wall, "peak_mib": int(peak.read_text()) / 1024,
            **json.loads(report.read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    sizes = QUICK_ROWS if parser.parse_args().quick else ROWS
    with Workspace() as ws:
        server = start_servers(1, None, DIM)[0]
        try:
            make_source(ws, max(sizes))
            print_header("A PostgreSQL source read in windows", [
                ws.describe(), f"fake server, no latency model, dim {DIM}; llm_api, batch "
                f"256, 2 in flight; EMBED_SOURCE_WINDOW={WINDOW:,}; --no-index"])
            source = as_url(ws.dsn)
            table, rerun = [], None
            for n in sizes:
                query = f"SELECT note_id, body FROM notes WHERE note_id < {n}"
                pg = ingest(ws, server.url, ["--data", source, "--query", query], f"pg_{n}",
                            f"cache-pg-{n}.jsonl")
                with ws.conn.cursor() as cur:  # a cache table of this run's own
                    cur.execute("DROP TABLE IF EXISTS embedding_cache, embedding_cache_leases")
                ws.conn.commit()
                shared = ingest(ws, server.url, ["--data", source, "--query", query],
                                f"pg_shared_{n}", "unused.jsonl", EMBED_CACHE_BACKEND="postgres")
                csv = ingest(ws, server.url, ["--data", str(write_csv(ws, n)), "--id-col",
                                              "note_id", "--text-col", "body"], f"csv_{n}",
                             f"cache-csv-{n}.jsonl")
                table.append([f"{n:,}", f"{pg['rows_written']:,}"] + [
                    f"{r['peak_mib']:.0f} MiB, {r['wall']:.1f} s" for r in (pg, shared, csv)])
                rerun = (n, query)
            print_table(["rows", "written", "PostgreSQL source, JSONL cache: peak RSS, wall",
                         "PostgreSQL source, PostgreSQL cache", "CSV file (read whole), JSONL "
                         "cache"], table)
            n, query = rerun
            with ws.conn.cursor() as cur:  # ten notes amended, spread over the windows
                cur.execute(f"UPDATE notes SET body = body || ' (amended)' "
                            f"WHERE note_id % {n // 10} = 7")
                changed = cur.rowcount
            ws.conn.commit()
            server.reset()
            again = ingest(ws, server.url, ["--data", source, "--query", query],
                           f"pg_{n}", f"cache-pg-{n}.jsonl")
            print_table(["rerun of the largest source after", "rows unchanged", "rows written",
                         "texts embedded (report)", "texts the server got", "peak RSS", "wall"],
                        [[f"{changed} rows changed", f"{again['rows_unchanged']:,}",
                          again["rows_written"], again["texts_embedded"],
                          server.counts()["texts"], f"{again['peak_mib']:.0f} MiB",
                          f"{again['wall']:.1f} s"]])
        finally:
            server.stop()


if __name__ == "__main__":
    main()
