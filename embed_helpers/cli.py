"""`python -m embed_helpers ingest | plan | run | cache ...`: the notebook's code path, no Jupyter.

Exit status: 0 done; 1 an error stopped the run (message says what to do);
3 the run finished but some rows failed (listed in the failures file).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .errors import EmbedHelpersError

log = logging.getLogger("embed_helpers")
EXIT_ERROR, EXIT_ROWS_FAILED = 1, 3


#: CLI flags that override a setting for one run.
FLAG_SETTINGS = {"backend": "EMBEDDING_BACKEND", "batch_size": "EMBED_BATCH_SIZE",
                 "concurrency": "EMBED_MAX_CONCURRENCY"}


def _settings(args):
    from .config import load_settings
    return load_settings({name: getattr(args, flag, None) for flag, name in FLAG_SETTINGS.items()})


def _load(args):
    """Steps 3-5: a plain CSV through the csv module (no pandas to import), else Synthea.

    A shell user means a path from where they stand; failing that, from the project root.
    """
    from .constants import project_path
    path = Path(args.data).resolve() if Path(args.data).exists() else project_path(args.data)
    if path.is_file() and args.id_col and args.text_col:
        from .csv_rows import read_csv_columns
        return read_csv_columns(path, args.id_col, args.text_col, args.limit), args.id_col, \
            args.text_col
    from .data import load_input
    return load_input(path, args.id_col, args.text_col, args.limit)


def _prepare(args):
    """Steps 1-6 shared by `ingest` and `plan`: settings, data, backend, cache, dimension."""
    from . import db
    from .backends import get_backend
    from .workflow import discover_dimension, open_cache

    settings = _settings(args)
    df, id_col, text_col = _load(args)
    table = args.table or ("patient_embeddings" if id_col == "patient_id" else "embeddings")
    conn = db.connect(settings)
    backend = get_backend(settings)
    cache = open_cache(settings)
    print(f"input {args.data}: {len(df[id_col])} rows; table {table}; backend "
          f"{settings.EMBEDDING_BACKEND} ({backend.model}); cache {cache.path} ({len(cache)} entries)")
    dim = discover_dimension(settings, backend, conn, table)
    return settings, df, id_col, text_col, table, conn, backend, cache, dim


def cmd_ingest(args) -> int:
    from . import db
    from .workflow import ingest

    settings, df, id_col, text_col, table, conn, backend, cache, dim = _prepare(args)
    report = ingest(df, id_col=id_col, text_col=text_col, table=table, settings=settings,
                    conn=conn, backend=backend, cache=cache, dim=dim, progress=not args.quiet)
    if not args.no_index and db.create_hnsw_index(conn, table, dim):
        print(f"built the HNSW index on {table}")
    print("\n".join(report.summary_lines()))
    print(f"total {time.perf_counter() - args.started:.2f} s (start-up included)")
    if args.report:
        report.save(args.report)
    if report.rows_failed:
        print(f"{report.rows_failed} rows failed: see {report.failures_path}", file=sys.stderr)
        return EXIT_ROWS_FAILED
    return 0


def cmd_plan(args) -> int:
    """Step 8 only: counts and estimates; creates nothing (the probe batch is cached)."""
    from .workflow import plan_ingest

    settings, df, id_col, text_col, table, conn, backend, cache, dim = _prepare(args)
    plan = plan_ingest(df, id_col=id_col, text_col=text_col, table=table, settings=settings,
                       conn=conn, backend=backend, cache=cache, dim=dim, probe=not args.no_probe)
    print(plan)
    return 0


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
    from . import cache_doctor
    from .cache import compact
    from .config import load_settings

    settings = load_settings()
    path = args.path or settings.EMBED_CACHE_PATH
    if args.action == "stats":
        print(cache_doctor.format_stats(cache_doctor.cache_stats(path)))
    elif args.action == "compact":
        for key, value in compact(path).items():
            print(f"{key}: {value}")
    else:
        print(cache_doctor.doctor_report(settings, texts=args.text or None, path=path))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m embed_helpers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (("ingest", cmd_ingest, "run Steps 3-9b: embed and store"),
                             ("plan", cmd_plan, "Step 8: what a run would do and cost")):
        p = sub.add_parser(name, help=text)
        p.set_defaults(func=func)
        p.add_argument("--data", default="data/sample/synthea",
                       help="Synthea folder or CSV file (relative: from here, else the project root)")
        p.add_argument("--id-col", help="id column of a CSV")
        p.add_argument("--text-col", help="text column of a CSV")
        p.add_argument("--table", help="target table (default patient_embeddings / embeddings)")
        p.add_argument("--limit", type=int, help="only the first N rows")
        p.add_argument("--backend", help="EMBEDDING_BACKEND for this run")
        p.add_argument("--batch-size", help="EMBED_BATCH_SIZE for this run")
        p.add_argument("--concurrency", help="EMBED_MAX_CONCURRENCY for this run")
        if name == "ingest":
            p.add_argument("--report", help="also save the run report as JSON here")
            p.add_argument("--no-index", action="store_true", help="skip the HNSW index")
            p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        else:
            p.add_argument("--no-probe", action="store_true",
                           help="no timing request (estimate only with EMBED_EXPECTED_TEXTS_PER_S)")
    p = sub.add_parser("run", help="execute notebooks/run.ipynb with papermill")
    p.set_defaults(func=cmd_run)
    p.add_argument("--param", "-p", action="append", default=[], metavar="NAME=VALUE",
                   help="notebook parameter, repeatable (e.g. --param EMBED_BATCH_SIZE=128)")
    p.add_argument("--out", help="executed notebook path (default runs/run-<UTC time>.ipynb)")
    p = sub.add_parser("cache", help="inspect or repair the embedding cache")
    p.set_defaults(func=cmd_cache)
    p.add_argument("action", choices=("stats", "doctor", "compact"))
    p.add_argument("--path", help="cache file (default EMBED_CACHE_PATH)")
    p.add_argument("--text", action="append", help="doctor: explain why this text misses")
    return parser


def main(argv=None, started: float | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.started = started or time.perf_counter()
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except EmbedHelpersError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # papermill's error carries the failing cell's message
        if type(exc).__name__ == "PapermillExecutionError":
            print(f"error: the notebook stopped at cell {exc.cell_index}: {exc.ename}: "
                  f"{exc.evalue}\nsee {args.out or 'the executed notebook in runs/'}",
                  file=sys.stderr)
            return EXIT_ERROR
        raise
