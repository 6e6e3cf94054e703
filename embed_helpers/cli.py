"""`python -m embed_helpers ingest | plan | run | cache ...`: the notebook's code path, no Jupyter.

Exit status: 0 done; 1 an error stopped the run (message says what to do);
3 the run finished but some rows failed (listed in the failures file); 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .errors import ConfigError, EmbedHelpersError

log = logging.getLogger("embed_helpers")
EXIT_ERROR, EXIT_ROWS_FAILED, EXIT_INTERRUPTED = 1, 3, 130


#: CLI flags that override a setting for one run.
FLAG_SETTINGS = {"backend": "EMBEDDING_BACKEND", "batch_size": "EMBED_BATCH_SIZE",
                 "concurrency": "EMBED_MAX_CONCURRENCY", "engine": "EMBED_ENGINE",
                 "ray_address": "RAY_ADDRESS", "workers": "EMBED_WORKERS",
                 "encoding": "EMBED_INPUT_ENCODING", "sync": "EMBED_SYNC",
                 "sync_scope": "EMBED_SYNC_SCOPE", "keep_cols": "EMBED_KEEP_COLS"}


def _settings(args):
    from .config import load_settings
    return load_settings({name: getattr(args, flag, None) for flag, name in FLAG_SETTINGS.items()})


def _data_path(args) -> Path:
    """A shell user means a path from where they stand; failing that, from the project root."""
    from .constants import project_path
    return Path(args.data).resolve() if Path(args.data).exists() else project_path(args.data)


def _load(args, settings):
    """Steps 3-5: CSV or Parquet files through `readers` (no pandas to import), else Synthea."""
    path = _data_path(args)
    encoding = settings.EMBED_INPUT_ENCODING
    if args.id_col and args.text_col and not (path / "patients.csv").is_file():
        from .readers import read_columns
        return read_columns(path, args.id_col, args.text_col, args.limit, encoding,
                            settings.EMBED_KEEP_COLS, with_source=True), args.id_col, args.text_col
    from .data import load_input
    return load_input(path, args.id_col, args.text_col, args.limit, encoding)


def _target(args, id_col: str, text_col: str, settings):
    from .steps import Target
    default = "patient_embeddings" if id_col == "patient_id" else "embeddings"
    return Target(default if args.table is None else args.table, id_col, text_col,
                  keep_cols=settings.EMBED_KEEP_COLS)


def _prepare(args):
    """Steps 1-5 shared by `ingest` and `plan`: settings, data, database, backend, cache."""
    from . import db
    from .backends import get_backend
    from .cache.tools import open_cache

    settings = _settings(args)
    df, id_col, text_col = _load(args, settings)
    target = _target(args, id_col, text_col, settings)
    if settings.EMBED_SYNC and args.limit:
        raise ConfigError("--sync", "with --limit the input is only part of the source, and "
                                    "sync would delete the rest: drop one of them.")
    conn = db.connect(settings)
    backend = get_backend(settings)
    cache = open_cache(settings)
    print(f"input {args.data}: {len(df[id_col])} rows; table {target.table}; backend "
          f"{settings.EMBEDDING_BACKEND} ({backend.model}); cache {cache.describe()}")
    return settings, df, target, conn, backend, cache


def cmd_ingest(args) -> int:
    from .workflow import ingest

    settings, df, target, conn, backend, cache = _prepare(args)
    report = ingest(df, target, settings=settings, conn=conn, backend=backend, cache=cache,
                    progress=not args.quiet, scope=_scope(args), force_delete=args.force_delete)
    report.close_bill(backend)
    return _close(args, report, conn, target, settings)


def _close(args, report, conn, target, settings) -> int:
    from .workflow import build_index
    if not args.no_index and report.dim:
        print(build_index(conn, target, settings, report.dim))
    print("\n".join(report.summary_lines()))
    print(f"total {time.perf_counter() - args.started:.2f} s (start-up included)")
    if args.report:
        report.save(args.report)
    if report.rows_failed:
        from .config import relative
        print(f"{report.rows_failed} rows failed: see {relative(report.failures_path)}",
              file=sys.stderr)
        return EXIT_ROWS_FAILED
    return 0


def cmd_plan(args) -> int:
    """Step 8 only: counts and estimates; creates nothing (the probe batch is cached)."""
    from .workflow import plan_ingest

    settings, df, target, conn, backend, cache = _prepare(args)
    print(plan_ingest(df, target, settings=settings, conn=conn, backend=backend, cache=cache,
                      probe=not args.no_probe, scope=_scope(args), force_delete=args.force_delete))
    return 0


def _scope(args) -> list[str]:
    """The files sync may delete rows of: those this run reads (`readers.source_labels`)."""
    from .readers import source_labels
    path = _data_path(args)
    return [] if (path / "patients.csv").is_file() else source_labels(path)


def cmd_run(args) -> int:
    from .notebook import run_notebook

    path, report = run_notebook(args.param, args.out)
    print(f"executed notebook: {path}")
    if report:
        print(f"rows written {report['rows_written']}, texts embedded {report['texts_embedded']}, "
              f"cache hits {report['cache_hits']}, rows unchanged {report['rows_unchanged']}, "
              f"failed {report['rows_failed']}")
    print(f"seconds: {time.perf_counter() - args.started:.1f}")
    return EXIT_ROWS_FAILED if report and report["rows_failed"] else 0


def cmd_cache(args) -> int:
    from .cache import tools as cache_tools
    from .cache.jsonl import EmbeddingCache
    from .config import load_settings, replace_settings

    if args.action == "setup-sql":  # needs no settings and no database
        from .cache.postgres import setup_sql
        try:
            print(setup_sql(args.role), end="")
        except ValueError as exc:
            raise ConfigError("--role", str(exc)) from None
        return 0
    settings = load_settings()
    if args.path:
        settings = replace_settings(settings, EMBED_CACHE_PATH=args.path,
                                    EMBED_CACHE_BACKEND="jsonl")
    if args.action == "compact":
        if settings.EMBED_CACHE_BACKEND != "jsonl":
            print("compact: the postgres store needs none (one row per key, nothing torn)")
            return 0
        for key, value in cache_tools.compact(settings.EMBED_CACHE_PATH).items():
            print(f"{key}: {value}")
        return 0
    if args.action == "stats" and settings.EMBED_CACHE_BACKEND == "jsonl":
        print(cache_tools.format_stats(cache_tools.cache_stats(settings.EMBED_CACHE_PATH)))
        return 0
    store = cache_tools.open_cache(settings) if settings.EMBED_CACHE_BACKEND != "jsonl" \
        else EmbeddingCache(settings.EMBED_CACHE_PATH, read_only=True)
    if args.action == "stats":
        print(cache_tools.format_stats(cache_tools.summary(store)))
    elif args.action == "export":
        print(f"exported {cache_tools.export_entries(store, args.file)} entries from "
              f"{store.describe()} to {args.file}")
    elif args.action == "import":
        store = cache_tools.open_cache(settings)
        print(f"imported {cache_tools.import_entries(args.file, store)} new entries from "
              f"{args.file} into {store.describe()}")
    else:
        from .backends import get_backend
        from .cache.doctor import doctor_report
        with get_backend(settings) as backend:
            print(doctor_report(store, backend.identity(settings.EMBEDDING_DIM),
                                texts=getattr(args, "text", None) or None,
                                also=cache_tools.visible_stores(settings, store)))
    return 0


def _add_run_flags(p, name: str) -> None:
    p.add_argument("--data", default="data/sample/synthea",
                   help="Synthea folder, or a CSV or Parquet file, or a folder of them")
    p.add_argument("--id-col", help="id column of a CSV")
    p.add_argument("--text-col", help="text column of a CSV")
    p.add_argument("--table", help="target table (default patient_embeddings / embeddings)")
    p.add_argument("--limit", type=int, help="only the first N rows (N >= 1)")
    p.add_argument("--encoding", help="EMBED_INPUT_ENCODING: the CSV files' text encoding "
                                      "(default utf-8; e.g. cp1252)")
    p.add_argument("--backend", help="EMBEDDING_BACKEND for this run")
    p.add_argument("--batch-size", help="EMBED_BATCH_SIZE for this run")
    p.add_argument("--concurrency", help="EMBED_MAX_CONCURRENCY for this run")
    p.add_argument("--keep-cols", help="EMBED_KEEP_COLS: columns stored beside the vector")
    p.add_argument("--sync", action="store_const", const="1",
                   help="EMBED_SYNC: delete the rows whose ids left the input (in scope)")
    p.add_argument("--sync-scope", choices=("files", "table"), help="EMBED_SYNC_SCOPE")
    p.add_argument("--force-delete", action="store_true",
                   help="let sync delete more than EMBED_SYNC_MAX_DELETE of the rows in scope")
    if name == "ingest":
        p.add_argument("--engine", choices=("local", "ray"), help="EMBED_ENGINE for this run")
        p.add_argument("--ray-address", help="RAY_ADDRESS: join this Ray cluster")
        p.add_argument("--workers", help="EMBED_WORKERS: Ray workers")
        p.add_argument("--report", help="also save the run report as JSON here")
        p.add_argument("--no-index", action="store_true", help="no HNSW index, whatever EMBED_INDEX")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    else:
        p.add_argument("--no-probe", action="store_true",
                       help="no timing request (estimate only with EMBED_EXPECTED_TEXTS_PER_S)")


#: `cache` actions and what each does (its own --help).
CACHE_ACTIONS = {
    "stats": "entries, size and settings of the cache",
    "doctor": "why texts miss the cache: the model, dimension or settings that differ",
    "compact": "rewrite the JSONL cache without duplicate keys and torn lines",
    "export": "write the cache's entries to a JSONL file (--to FILE.jsonl)",
    "import": "add the entries of a JSONL file to the configured cache",
    "setup-sql": "print the SQL an administrator runs to create the shared cache tables and "
                 "grant them to a role that has no CREATE on the schema",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m embed_helpers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (("ingest", cmd_ingest, "run Steps 3-9b: embed and store"),
                             ("plan", cmd_plan, "Step 8: what a run would do and cost")):
        p = sub.add_parser(name, help=text)
        p.set_defaults(func=func)
        _add_run_flags(p, name)
    p = sub.add_parser("run", help="execute notebooks/run.ipynb with papermill")
    p.set_defaults(func=cmd_run)
    p.add_argument("--param", "-p", action="append", default=[], metavar="NAME=VALUE",
                   help="notebook parameter, repeatable (e.g. --param EMBED_BATCH_SIZE=128)")
    p.add_argument("--out", help="executed notebook path (default runs/run-<UTC time>.ipynb)")
    p = sub.add_parser("cache", help="inspect, repair or move the embedding cache")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in CACHE_ACTIONS.items():
        a = actions.add_parser(action, help=text, description=text)
        a.set_defaults(func=cmd_cache)
        a.add_argument("--path", help="a JSONL cache file instead of the configured store")
        if action == "import":
            a.add_argument("file", help="the JSONL file to read (a `cache export`)")
        elif action == "export":
            a.add_argument("--to", dest="file", required=True, metavar="FILE.jsonl",
                           help="the JSONL file to write")
        elif action == "doctor":
            a.add_argument("--text", action="append",
                           help="explain why this text misses (repeatable)")
        elif action == "setup-sql":
            a.add_argument("--role", default="embed_user",
                           help="the role that runs ingestions (default embed_user)")
    return parser


def main(argv=None, started: float | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "cache" and args.action in ("export", "import"):
        args.file = str(Path(args.file).resolve())  # a shell user means from where they stand
    args.started = started or time.perf_counter()
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, so that a reader gone away (`| head`) is caught below
        return code
    except EmbedHelpersError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `... | head` closed our stdout: not an error of the run
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:  # the run saved its report so far (EMBED_RUNS_DIR)
        print("interrupted: what was embedded is cached, run again to finish", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # papermill's error carries the failing cell's message
        if type(exc).__name__ == "PapermillExecutionError":
            print(f"error: the notebook stopped at cell {exc.cell_index}: {exc.ename}: "
                  f"{exc.evalue}\nsee {args.out or 'the executed notebook in runs/'}",
                  file=sys.stderr)
            return EXIT_ERROR
        raise
