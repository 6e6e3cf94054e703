"""What the benchmarks share (not a benchmark itself): fake servers, a database, temp state.

Every benchmark in bench/:
- starts its fake embedding servers (tests/fake_server.py) as separate processes, so that
  they do not share the client's GIL;
- keeps the embedded PostgreSQL running for its whole run (one connection held from start
  to end, as a database server would be) and works in a database of its own on it
  (`embed_helpers_bench_<pid>_<hex>`, dropped at the end), so the developer's tables and
  the PostgreSQL cache table `embedding_cache` are never touched; its tables are dropped
  as soon as a scenario is done;
- keeps its cache files and EMBED_RUNS_DIR in a temporary folder, reads no .env
  (EMBED_ENV_FILE="") and passes no setting of the developer's environment to the runs.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
os.environ["EMBED_ENV_FILE"] = ""  # never the developer's .env, here or in any child

import requests  # noqa: E402
from psycopg2.extensions import make_dsn  # noqa: E402

from embed_helpers import db  # noqa: E402
from embed_helpers.config import SPEC, load_settings  # noqa: E402
from embed_helpers.pg_embedded import pid_alive  # noqa: E402
from embed_helpers.report import merge_intervals  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"
PUBMED_SHARED = SHARED_DATA / "pubmed_abstracts" / "abstracts.csv"
PUBMED_SAMPLE = ROOT / "data" / "sample" / "pubmed" / "abstracts.csv"


def pubmed_csv() -> tuple[Path, str]:
    """The shared abstracts when present, else the repository's sample; and a line saying so."""
    if PUBMED_SHARED.is_file():
        return PUBMED_SHARED, "data: ../shared/data/pubmed_abstracts/abstracts.csv (shared)"
    return PUBMED_SAMPLE, ("data: data/sample/pubmed/abstracts.csv (the 200-row sample: "
                           "../shared/data/pubmed_abstracts/abstracts.csv is absent)")


def print_header(title: str, notes: list[str] = ()) -> None:
    """The command, the machine, and what the figures depend on, above the tables."""
    python = os.path.relpath(sys.executable, Path.cwd())
    script = os.path.relpath(sys.argv[0], Path.cwd())
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    mem = next((int(line.split()[1]) / 2**20 for line in _read("/proc/meminfo").splitlines()
                if line.startswith("MemTotal")), 0)
    print(f"## {title}\n")
    print(f"command: `{shlex.join([python, script, *sys.argv[1:]])}`  ")
    print(f"machine: {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), {cpu}, "
          f"{mem:.0f} GiB RAM, load average {os.getloadavg()[0]:.2f} at start; "
          f"Python {platform.python_version()}, {platform.system()} {platform.release()}  ")
    for note in notes:
        print(f"{note}  ")
    print(flush=True)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def print_table(header: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print(flush=True)


# --- fake servers ---------------------------------------------------------------------

class FakeServer:
    """tests/fake_server.py in a process of its own, with a latency profile (overridable)."""

    def __init__(self, profile: str | None, dim: int, **override):
        code = ("import sys, dataclasses; sys.path.insert(0, %r); from fake_server import *; "
                "m = PROFILES.get(%r); m = m and dataclasses.replace(m, **%r); "
                "s = FakeEmbeddingServer(%d, m); print('READY', s.url, flush=True); "
                "s._httpd.serve_forever(0.05)" % (str(ROOT / "tests"), profile, override, dim))
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                     text=True)
        self.url = ""

    def wait_ready(self) -> "FakeServer":
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "READY":
            self.proc.kill()
            raise SystemExit(f"fake server did not start: {line!r}")
        self.url = line[1]
        return self

    def counts(self) -> dict:
        """Requests and texts answered or refused, summed over routes."""
        counts = requests.get(self.url + "/_stats", timeout=5).json()
        return {k: sum(c[k] for c in counts.values()) for k in ("requests", "texts")}

    def busy(self) -> list[tuple[float, float]]:
        """(start, end) of each request's modelled work, CLOCK_MONOTONIC (all processes)."""
        return [tuple(s) for s in requests.get(self.url + "/_busy", timeout=5).json()]

    def reset(self) -> None:
        requests.post(self.url + "/_reset", timeout=10)

    def kill(self) -> None:
        """SIGKILL, as a crashed machine would go."""
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


def start_servers(count: int, profile: str | None, dim: int, **override) -> list[FakeServer]:
    servers = [FakeServer(profile, dim, **override) for _ in range(count)]
    return [s.wait_ready() for s in servers]


def busy_window(span_lists: list[list[tuple[float, float]]]) -> tuple[float, float]:
    """First request start and last request end over all servers (0, 0 when none)."""
    spans = [s for spans in span_lists for s in spans]
    if not spans:
        return 0.0, 0.0
    return min(s for s, _ in spans), max(e for _, e in spans)


def busy_shares(span_lists: list[list[tuple[float, float]]]) -> list[float]:
    """Each server's busy time over the run's embedding phase (first start to last end)."""
    start, end = busy_window(span_lists)
    return [merge_intervals(spans) / (end - start) if end > start else 0.0
            for spans in span_lists]


# --- the database and the runs' state -------------------------------------------------

class Workspace:
    """A temporary folder and a database of this benchmark's own, for one whole run.

    `admin` is held open from start to end: it keeps the embedded server up (when
    DATABASE_URL is unset) so that no run pays for starting it. `conn` is a connection to
    the benchmark's database, whose DSN runs receive as DATABASE_URL.
    """

    def __enter__(self) -> "Workspace":
        self._tmp = tempfile.TemporaryDirectory(prefix="embed-helpers-bench-")
        self.tmp = Path(self._tmp.name)
        base = load_settings(environ={k: os.environ[k] for k in ("DATABASE_URL", "EMBED_PGDATA")
                                      if os.environ.get(k)}, env_file="")
        self.admin = db.connect(base)
        self.admin.autocommit = True
        if base.DATABASE_URL:
            url = str(base.DATABASE_URL)
            self.where = "the PostgreSQL of DATABASE_URL"
        else:
            from embed_helpers.pg_embedded import embedded_uri
            url = embedded_uri(base.EMBED_PGDATA)
            self.where = f"the embedded PostgreSQL ({os.path.relpath(base.EMBED_PGDATA, ROOT)})"
        self.name = f"embed_helpers_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        with self.admin.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database "
                        "WHERE datname LIKE 'embed_helpers_bench_%'")
            for (stale,) in cur.fetchall():  # left by a killed benchmark
                if not pid_alive(int(stale.split("_")[3])):
                    cur.execute(f'DROP DATABASE IF EXISTS "{stale}" WITH (FORCE)')
            cur.execute(f'CREATE DATABASE "{self.name}"')
        self.dsn = make_dsn(url, dbname=self.name)
        self.conn = db.connect(load_settings(environ={"DATABASE_URL": self.dsn}, env_file=""))
        return self

    def describe(self) -> str:
        return (f"state: database {self.name} on {self.where}, dropped at the end; cache files "
                f"and EMBED_RUNS_DIR in a temporary folder; no .env")

    def environ(self, cache: str = "cache.jsonl", **settings) -> dict[str, str]:
        """Settings for a run: none of the developer's, this workspace's database, cache
        file and runs folder, then `settings`."""
        env = {"DATABASE_URL": self.dsn, "EMBED_CACHE_PATH": str(self.tmp / cache),
               "EMBED_RUNS_DIR": str(self.tmp / "runs"), "EMBED_ENV_FILE": ""}
        env.update({k: str(v) for k, v in settings.items()})
        return env

    def settings(self, cache: str = "cache.jsonl", **settings):
        return load_settings(environ=self.environ(cache, **settings), env_file="")

    def subprocess_env(self, cache: str = "cache.jsonl", **settings) -> dict[str, str]:
        """The process environment for a CLI run: os.environ without any setting."""
        env = {k: v for k, v in os.environ.items() if k not in SPEC}
        env.update(PYTHONPATH=str(ROOT), **self.environ(cache, **settings))
        return env

    def drop(self, *tables: str) -> None:
        for table in tables:
            db.drop_table(self.conn, table)

    def __exit__(self, *exc) -> None:
        self.conn.close()
        with self.admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.admin.close()
        self._tmp.cleanup()


def cli_ingest(csv: Path, table: str, env: dict, report: Path, *, id_col: str = "id",
               text_col: str = "text", extra: tuple[str, ...] = ()
               ) -> tuple[float, dict, subprocess.CompletedProcess]:
    """One `python -m embed_helpers ingest` run as a user types it: (wall s, report, run)."""
    report.unlink(missing_ok=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "embed_helpers", "ingest", "--data", str(csv),
                           "--id-col", id_col, "--text-col", text_col, "--table", table, "-q",
                           "--report", str(report), *extra], env=env, capture_output=True,
                          text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 3) or not report.is_file():
        raise SystemExit(f"ingest failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return wall, json.loads(report.read_text()), done


def index_line(stdout: str) -> str:
    """The CLI's line saying whether it built the HNSW index, and why."""
    return next((line for line in stdout.splitlines() if "EMBED_INDEX" in line), "")


# --- data -----------------------------------------------------------------------------

CONDITIONS = ("type 2 diabetes", "essential hypertension", "chronic kidney disease stage 3",
              "asthma", "atrial fibrillation", "COPD", "major depressive disorder",
              "hyperlipidaemia", "osteoarthritis of the knee", "heart failure")
DRUGS = ("metformin 500 mg", "lisinopril 10 mg", "atorvastatin 20 mg", "salbutamol inhaler",
         "apixaban 5 mg", "sertraline 50 mg", "furosemide 40 mg", "insulin glargine")


def synthetic_texts(n: int, prefix: str = "") -> list[str]:
    """`n` distinct clinical-sounding notes of 150-250 characters."""
    return [f"{prefix}Patient {i:06d}: {30 + i % 60}-year-old {'fe' if i % 2 else ''}male with "
            f"{CONDITIONS[i % 10]} since {1990 + i % 33}, also {CONDITIONS[(i // 10) % 10]}; "
            f"takes {DRUGS[i % 8]}; HbA1c {5 + (i % 40) / 10:.1f}%, BP {110 + i % 50}/"
            f"{70 + i % 25}; visit {i % 97 + 1} of the year." for i in range(n)]
