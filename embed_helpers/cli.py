"""`python -m embed_helpers ingest | plan | run | cache ...`: the notebook's code path, no Jupyter.

Exit status: 0 done; 1 an error stopped the run (message says what to do);
3 the run finished but some rows failed (listed in the failures file); 4 batch jobs are
pending (--no-wait): run again to collect them; 130 interrupted.
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
EXIT_ERROR, EXIT_ROWS_FAILED, EXIT_PENDING, EXIT_INTERRUPTED = 1, 3, 4, 130


#: CLI flags that override a setting for one run.
FLAG_SETTINGS = {"backend": "EMBEDDING_BACKEND", "batch_size": "EMBED_BATCH_SIZE",
                 "concurrency": "EMBED_MAX_CONCURRENCY", "engine": "EMBED_ENGINE",
                 "ray_address": "RAY_ADDRESS", "workers": "EMBED_WORKERS",
                 "encoding": "EMBED_INPUT_ENCODING", "hosted_mode": "EMBED_HOSTED_MODE",
                 "batch_wait": "EMBED_BATCH_WAIT", "reembed": "EMBED_REEMBED", "sync": "EMBED_SYNC",
                 "sync_scope": "EMBED_SYNC_SCOPE", "keep_cols": "EMBED_KEEP_COLS"}


def _settings(args):
    from .config import load_settings
    return load_settings({name: getattr(args, flag, None) for flag, name in FLAG_SETTINGS.items()})


def _data_path(args) -> Path:
    """A shell user means a path from where they stand; failing that, from the project root."""
    from .constants import project_path
    return Path(args.data).resolve() if Path(args.data).exists() else project_path(args.data)


def _load(args, settings):
    """Steps 3-5: CSV or Parquet files through `readers` (no pandas to import), else Synthea;
    a PostgreSQL source is opened (its query checked), to be read in windows."""
    from .streaming import source_from_args
    source = source_from_args(args, settings)  # None unless --data postgresql://...
    if source is not None:
        return source, source.id_col, source.text_col
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
    from .sources import PostgresSource  # its describe() masks the DSN's password
    shown = df.describe() if isinstance(df, PostgresSource) else \
        f"{args.data}: {len(df[id_col])} rows"
    print(f"input {shown}; table {target.table}; backend "
          f"{settings.EMBEDDING_BACKEND} ({backend.model}); cache {cache.describe()}")
    return settings, df, target, conn, backend, cache


def cmd_ingest(args) -> int:
    from .sources import PostgresSource
    from .streaming import ingest_source
    from .workflow import ingest

    settings, df, target, conn, backend, cache = _prepare(args)
    run = ingest_source if isinstance(df, PostgresSource) else ingest  # a source: by windows
    report = run(df, target, settings=settings, conn=conn, backend=backend, cache=cache,
                 progress=not args.quiet, scope=_scope(args), force_delete=args.force_delete)
    report.close_bill(backend)
    if report.batch.get("pending"):  # --no-wait: the jobs are out, nothing written yet
        print("\n".join(report.batch["lines_in_words"]))
        if args.report:
            report.save(args.report)
        return EXIT_PENDING
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
    from .sources import PostgresSource
    from .streaming import plan_source
    from .workflow import plan_ingest

    settings, df, target, conn, backend, cache = _prepare(args)
    plan = plan_source if isinstance(df, PostgresSource) else plan_ingest  # windows added up
    print(plan(df, target, settings=settings, conn=conn, backend=backend, cache=cache,
               probe=not args.no_probe, scope=_scope(args), force_delete=args.force_delete))
    return 0


def _scope(args) -> list[str]:
    """The files sync may delete rows of: those this run reads (`readers.source_labels`);
    none for a PostgreSQL source, which is its own scope (`PostgresSource.label`)."""
    from .readers import source_labels
    from .sources import is_postgres_source
    if is_postgres_source(args.data):
        return []
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


def _add_run_flags(p, name: str) -> None:
    p.add_argument("--data", default="data/sample/synthea",
                   help="Synthea folder, or a CSV or Parquet file, or a folder of them, or a "
                        "PostgreSQL source postgresql://... (with --query or --source-table)")
    p.add_argument("--query", help="PostgreSQL source: the SELECT giving the id and text")
    p.add_argument("--source-table", help="PostgreSQL source: a table to read whole")
    p.add_argument("--id-col", help="id column (PostgreSQL source: default its first column)")
    p.add_argument("--text-col", help="text column (PostgreSQL: default its next column)")
    p.add_argument("--table", help="target table (default patient_embeddings / embeddings)")
    p.add_argument("--limit", type=int, help="only the first N rows (N >= 1)")
    p.add_argument("--encoding", help="EMBED_INPUT_ENCODING: the CSV files' text encoding "
                                      "(default utf-8; e.g. cp1252)")
    p.add_argument("--backend", help="EMBEDDING_BACKEND for this run")
    p.add_argument("--batch-size", help="EMBED_BATCH_SIZE for this run")
    p.add_argument("--concurrency", help="EMBED_MAX_CONCURRENCY for this run")
    p.add_argument("--batch-api", dest="hosted_mode", action="store_const", const="batch",
                   help="EMBED_HOSTED_MODE=batch: OpenAI's Batch API, half the price, within 24 h")
    p.add_argument("--reembed", action="store_true", default=None,
                   help="EMBED_REEMBED: replace every vector of a table made by another model")
    p.add_argument("--keep-cols", help="EMBED_KEEP_COLS: columns stored beside the vector")
    p.add_argument("--sync", action="store_const", const="1",
                   help="EMBED_SYNC: delete the rows whose ids left the input (in scope)")
    p.add_argument("--sync-scope", choices=("files", "table"), help="EMBED_SYNC_SCOPE")
    p.add_argument("--force-delete", action="store_true",
                   help="let sync delete more than EMBED_SYNC_MAX_DELETE of the rows in scope")
    if name == "ingest":
        p.add_argument("--no-wait", dest="batch_wait", action="store_const", const="0",
                       help="with --batch-api: submit the jobs and stop; rerun to collect")
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
    from .batch_api.commands import add_parser as add_batches_parser
    from .cache.commands import add_parser as add_cache_parser
    add_batches_parser(sub)
    add_cache_parser(sub)
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
