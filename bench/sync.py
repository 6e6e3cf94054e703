"""Sync and kept columns, as a user runs them from the CLI: what each run sends, keeps and costs.

    python bench/sync.py [--rows 1000] [--big 20000] [--quick]

The issue's acceptance, at its scale: ingest 1,000 abstracts with `--sync --keep-cols`,
remove 100 rows from the CSV and run again (900 rows left, no chunk of a removed row, 0
requests), remove 800 (refused, exit 1, nothing deleted), change one row's journal alone (one
row updated, 0 requests). Then what sync adds to a warm rerun of a larger table (every row
unchanged: the plan's count, the anti-join and the delete). `year` and `journal` are
synthetic columns added to the abstracts (the shared file has only pmid and text).
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time

from common import Workspace, cli_ingest, print_header, print_table, pubmed_csv, start_servers, \
    synthetic_texts

JOURNALS = ("BMJ", "Lancet", "JAMA", "NEJM", "PLoS One")


def write(path, rows) -> None:
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["pmid", "text", "year", "journal"])
        out.writerows(rows)


def abstracts(n: int) -> list[tuple]:
    source, _ = pubmed_csv()
    with open(source, newline="") as fh:
        rows = [(r["pmid"], r["text"]) for r in csv.DictReader(fh)][:n]
    if len(rows) < n:  # the 200-row sample: more rows of synthetic notes
        rows += [(f"s{i}", t) for i, t in enumerate(synthetic_texts(n - len(rows)))]
    return [(pmid, text, str(2000 + i % 24), JOURNALS[i % 5]) for i, (pmid, text) in enumerate(rows)]


def counts(ws: Workspace, table: str) -> tuple[int, int, int]:
    """Rows stored, chunks stored, and chunks whose row is gone (must stay 0)."""
    with ws.conn.cursor() as cur:
        cur.execute(f'SELECT count(*) FROM "{table}"')
        rows = cur.fetchone()[0]
        cur.execute(f"SELECT count(*), count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM "
                    f'"{table}" t WHERE t.pmid = c.pmid)) FROM "{table}_chunks" c')
        chunks, orphans = cur.fetchone()
    ws.conn.rollback()
    return rows, chunks, orphans


def acceptance(ws: Workspace, url: str, n: int) -> list[list]:
    rows, path, table = abstracts(n), ws.tmp / "abstracts.csv", "sync_bench"
    env = ws.subprocess_env(EMBEDDING_BACKEND="ollama", OLLAMA_HOST=url,
                            EMBED_MAX_INPUT_TOKENS=400)  # some abstracts are split in chunks
    flags = ("--sync", "--keep-cols", "year,journal", "--no-index")
    out, report_path = [], ws.tmp / "report.json"

    def step(what, data):
        write(path, data)
        wall, report, _ = cli_ingest(path, table, env, report_path, id_col="pmid", extra=flags)
        out.append([what, report["requests"], report["sync"]["rows_deleted"],
                    report["sync"]["rows_metadata_updated"], *counts(ws, table), f"{wall:.2f}"])
    step(f"ingest {n:,} abstracts", rows)
    kept = rows[n // 10:]
    step(f"remove {n // 10:,} rows, --sync", kept)
    journal = [r[:3] + ("Nature",) if i == 0 else r for i, r in enumerate(kept)]
    step("change one row's journal", journal)
    write(path, journal[: len(journal) // 9])  # 800 of 900 gone
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "embed_helpers", "ingest", "--data", str(path),
                           "--id-col", "pmid", "--text-col", "text", "--table", table, "-q",
                           *flags], env=env, capture_output=True, text=True)
    out.append([f"remove {len(journal) - len(journal) // 9} more: exit {done.returncode} "
                f"({done.stderr.strip()[7:60]}...)", 0, 0, 0, *counts(ws, table),
                f"{time.perf_counter() - start:.2f}"])
    ws.drop(table)
    return out


def overhead(ws: Workspace, url: str, n: int) -> list[list]:
    """A warm rerun of `n` unchanged rows, without sync and with it (best of three)."""
    path, table = ws.tmp / "notes.csv", "sync_overhead"
    write(path, [(f"n{i}", t, str(2000 + i % 24), JOURNALS[i % 5])
                 for i, t in enumerate(synthetic_texts(n))])
    env = ws.subprocess_env(EMBEDDING_BACKEND="ollama", OLLAMA_HOST=url)
    cli_ingest(path, table, env, ws.tmp / "r.json", id_col="pmid", extra=("--sync", "--no-index"))
    out = []
    for what, extra in (("warm rerun", ()), ("warm rerun --sync", ("--sync",)),
                        ("warm rerun --sync --keep-cols year,journal",
                         ("--sync", "--keep-cols", "year,journal"))):
        walls = [cli_ingest(path, table, env, ws.tmp / "r.json", id_col="pmid",
                            extra=(*extra, "--no-index"))[0] for _ in range(3)]
        out.append([what, f"{n:,}", f"{min(walls):.2f}"])
    ws.drop(table)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--big", type=int, default=20000)
    parser.add_argument("--quick", action="store_true", help="200 and 5,000 rows")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.big = 200, 5000
    server = start_servers(1, None, 384)[0]
    try:
        with Workspace() as ws:
            print_header("Sync and kept columns", [pubmed_csv()[1], ws.describe()])
            print_table(["run", "requests", "rows deleted", "metadata updated", "rows stored",
                         "chunks stored", "chunks of removed rows", "wall s"], acceptance(ws, server.url, args.rows))
            print()
            print_table(["run", "rows, all unchanged", "wall s (best of 3)"],
                        overhead(ws, server.url, args.big))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
