"""The Ray engine: Step 9b on a Ray cluster, with the same guarantees as the local engine.

Ray Data reads the input in blocks; a pool of `BlockWorker` actors (one per GPU for the
`local` backend, one per server for the HTTP backends, or EMBED_WORKERS) runs the steps of
`core` on each block: prepare, claim the rows (duplicate ids over blocks: the last in input
order wins, `claims`), skip rows stored unchanged, look up the shared PostgreSQL cache,
embed, store in the cache, and write in one transaction. Ray runs a block at least once (a
retried task, a restarted actor); every write is keyed by id, so every row lands exactly
once. The driver only reads one small summary per block: its memory does not grow with rows.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import core, db
from .cache_tools import for_engine, open_cache
from .claims import claimed, create_claims_table, release_claims
from .config import Settings
from .constants import (RAY_BATCHES_PER_BLOCK, RAY_HTTP_WORKER_CPUS, RAY_OBJECT_STORE_BYTES,
                        RAY_READER_CPUS)
from .errors import ConfigError, EmbedHelpersError
from .ray_cluster import join, quiet_our_errors, without_rays_note
from .report import RunReport, write_failures
from .worker import BlockWorker

log = logging.getLogger(__name__)


def ingest_ray(source, target: core.Target, *, settings: Settings, progress: bool = True,
               limit: int | None = None) -> RunReport:
    """Ingest `source` (a CSV or Parquet file or folder, a DataFrame, or a dict of the id and
    text columns) into `target` on Ray; returns the run report."""
    ray = _ray()
    settings = for_engine(replace(settings, EMBED_ENGINE="ray"))  # the workers' settings
    started, ours = time.perf_counter(), not ray.is_initialized()
    startup = _start(ray, settings)
    try:
        report = _run(ray, source, target, settings, progress, limit)
    finally:
        if ours:  # a Ray started for this run ends with it (a notebook kernel is then
            ray.shutdown()  # stopped cleanly, not with Ray's SIGTERM stack trace)
    report.finish_timing(time.perf_counter() - started, [], [])
    report.ray_startup_s = round(startup, 2)
    return report


def _run(ray, source, target: core.Target, settings: Settings, progress: bool,
         limit: int | None) -> RunReport:
    """Set up the claims and the table, run the workers over the blocks, collect."""
    conn = db.connect(settings)
    create_claims_table(conn)
    from .backends import get_backend
    with get_backend(settings) as backend, open_cache(settings) as cache:
        dim, source_of_dim = core.known_dimension(settings, backend.identity(), conn=conn,
                                                  table=target.table, cache=cache)
        servers = len(backend.stats().get("servers", {})) or 1
    if dim:
        db.create_table(conn, target.table, target.id_col, target.text_col, dim)
    run = uuid.uuid4().hex
    workers, resources = _workers(ray, settings, servers)
    block = RAY_BATCHES_PER_BLOCK * settings.EMBED_BATCH_SIZE
    numbers = ray.remote(num_cpus=0)(_Numbers).remote()  # worker i starts at server i
    dataset = _dataset(ray, source, target, limit, block).map_batches(
        BlockWorker, fn_constructor_kwargs=dict(settings=settings, target=target, run=run,
                                                dim=dim, dim_source=source_of_dim,
                                                concurrency=max(1, settings.EMBED_MAX_CONCURRENCY
                                                                * servers // workers),
                                                numbers=numbers),
        batch_size=block, batch_format="numpy",
        # One block per worker at a time: a worker that started first must not queue them all.
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
        **resources)
    report = RunReport(table=target.table, engine="ray", backend=settings.EMBEDDING_BACKEND,
                       dim=dim or 0, batch_size=settings.EMBED_BATCH_SIZE,
                       concurrency=settings.EMBED_MAX_CONCURRENCY,
                       cache_path="PostgreSQL table embedding_cache",
                       gpu_hourly_usd=settings.GPU_HOURLY_USD)
    failures = _collect(dataset, report, progress)
    invalid = sum(1 for f in failures if f.get("invalid"))
    report.rows_duplicate = report.rows_read - report.rows_empty - invalid - claimed(conn, run)
    release_claims(conn, run)
    report.failures_path = write_failures(failures, settings.EMBED_RUNS_DIR)
    report.rows_failed = len(failures)
    conn.close()
    return report


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("EMBED_ENGINE", "ray needs Ray Data: run `.venv/bin/pip install -r "
                                          "requirements-ray.txt` (make test installs it)") from None
    return ray


def _start(ray, settings: Settings) -> float:
    """Join RAY_ADDRESS's cluster (shipping this package to it), or start a local Ray;
    a Ray already started in this process (a notebook, the tests) is used as it is."""
    t0 = time.perf_counter()
    import ray.data  # noqa: F401  (importing it sets its loggers: quiet them after)
    for name in ("ray", "ray.data"):  # their INFO lines would bury the run's own output
        logging.getLogger(name).setLevel(logging.ERROR)
    if not ray.is_initialized():
        if settings.RAY_ADDRESS:
            join(ray, settings.RAY_ADDRESS)  # with the cluster's token, when it has one
        else:
            ray.init(include_dashboard=False, object_store_memory=RAY_OBJECT_STORE_BYTES,
                     log_to_driver=False, configure_logging=False)
    quiet_our_errors(_our_error)  # ours reach the user once, without Ray's traceback
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.raise_original_map_exception = True  # our errors say what to do; keep them
    # A run smaller than one block per worker is no problem worth a warning.
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
    return time.perf_counter() - t0


def _workers(ray, settings: Settings, servers: int) -> tuple[int, dict]:
    """How many actors, and what each asks of the cluster: a GPU for the local backend
    when the cluster has them; a fraction of a CPU for HTTP backends (they wait)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if settings.EMBEDDING_BACKEND == "local":
        workers = settings.EMBED_WORKERS or max(gpus, len([n for n in ray.nodes() if n["Alive"]]))
        return workers, ({"num_gpus": 1} if gpus else {"num_cpus": 1})
    return settings.EMBED_WORKERS or servers, {"num_cpus": RAY_HTTP_WORKER_CPUS}


class _Numbers:
    """0, 1, 2...: an index for each worker (a Ray actor), so that workers spread over the
    servers deterministically."""

    def __init__(self):
        self.count = -1

    def next(self) -> int:
        self.count += 1
        return self.count


def _dataset(ray, source, target: core.Target, limit: int | None, block: int):
    """Rows as (id, text, seq) in blocks of `block` rows, one per worker task: seq is the
    position in the input (files in name order), so duplicate ids resolve to the last one
    whichever block holds it."""
    if isinstance(source, (str, Path)):
        files = _files(Path(source))
        ds = ray.data.from_items([{"path": str(p), "file": i} for i, p in enumerate(files)])
        # Its own CPU share, unlike the workers', so that Ray does not fuse reading into the
        # workers: a single file would then be read, and embedded, by one worker alone.
        ds = ds.map_batches(_read_files, batch_size=1, num_cpus=RAY_READER_CPUS,
                            fn_kwargs={"id_col": target.id_col, "text_col": target.text_col,
                                       "block": block})
    else:
        import pandas as pd
        ids, texts = list(source[target.id_col]), list(source[target.text_col])
        ds = ray.data.from_pandas(pd.DataFrame({"id": [None if i is None else str(i) for i in ids],
                                                "text": texts, "seq": np.arange(len(ids))}))
    if limit:
        ds = ds.limit(limit)
    # Blocks of `block` rows, each its own input: else what one read task (or the one
    # DataFrame) yields would go to one worker as one bundle.
    return ds.repartition(target_num_rows_per_block=block)


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".csv", ".parquet"))
    if not path.is_dir() or not files:
        from .errors import DataError
        raise DataError(f"{path}: expected a CSV or Parquet file, or a folder of them")
    return files


def _read_files(batch: dict, id_col: str, text_col: str, block: int):
    """Stream one file in blocks of `block` rows (a generator: never whole in memory)."""
    for path, number in zip(batch["path"], batch["file"]):
        base = int(number) << 40
        if str(path).lower().endswith(".parquet"):
            import pyarrow.parquet as pq
            first = 0
            for chunk in pq.ParquetFile(path).iter_batches(block, columns=[id_col, text_col]):
                ids = [None if v is None else str(v) for v in chunk.column(id_col).to_pylist()]
                yield {"id": ids, "text": chunk.column(text_col).to_pylist(),
                       "seq": base + first + np.arange(len(ids))}
                first += len(ids)
        else:
            from .csv_rows import iter_csv_columns
            for ids, texts, first in iter_csv_columns(path, id_col, text_col, block):
                yield {"id": ids, "text": texts, "seq": base + first + np.arange(len(ids))}


def _collect(dataset, report: RunReport, progress: bool) -> list[dict]:
    """Read the blocks' summaries as they come, into the report; the failure records."""
    from tqdm import tqdm
    failures, empty, seen, dims = [], [], [], set()
    bar = tqdm(unit="row", desc="Step 9b (ray)", disable=not progress)
    try:
        for summary in dataset.iter_rows():
            seen.append(summary)
            bar.update(int(summary["rows_read"]))
            failures += json.loads(summary["failures"])
            empty += json.loads(summary["empty_ids"])
            dims.add(int(summary["dim"]))
    except Exception as exc:  # Ray wraps our errors: show ours, not Ray's traceback
        ours = _our_error(exc)
        if ours is not None:
            raise without_rays_note(ours) from None
        raise
    finally:
        bar.close()
    _tally(report, seen, empty)
    report.dim = report.dim or max(dims - {0}, default=0)
    return failures


def _our_error(exc: BaseException | None, depth: int = 0) -> EmbedHelpersError | None:
    """The error of ours that a worker raised, under Ray's wrappers (RayTaskError,
    UserCodeException)."""
    if exc is None or depth > 6:
        return None
    for inner in (getattr(exc, "cause", None), exc.__cause__, exc.__context__):
        found = _our_error(inner, depth + 1) if inner is not exc else None
        if found is not None:
            return found
    return exc if isinstance(exc, EmbedHelpersError) else None


def _tally(report: RunReport, summaries: list[dict], empty: list[str]) -> None:
    total = lambda key: sum(int(s[key]) for s in summaries)  # noqa: E731
    report.rows_read, report.rows_empty, report.empty_ids = total("rows_read"), len(empty), empty
    report.rows_duplicate, report.rows_unchanged = total("duplicates"), total("unchanged")
    report.rows_written, report.chunks_written = total("written"), total("chunks")
    report.texts_unique, report.texts_embedded = total("texts"), total("embedded")
    report.cache_hits, report.cache_misses = total("hits"), total("texts") - total("hits")
    report.requests, report.retries = total("requests"), total("retries")
    for s in summaries:
        worker = report.workers.setdefault(str(s["worker"]), {"blocks": 0, "rows": 0, "seconds": 0.0})
        worker["blocks"] += 1
        worker["rows"] += int(s["written"])
        worker["seconds"] += float(s["seconds"])
        for url, counts in json.loads(s["servers"]).items():
            server = report.servers.setdefault(url, {"requests": 0, "texts": 0, "errors": 0,
                                                     "set_aside": 0, "mean_latency_s": None})
            for key in ("requests", "texts", "errors", "set_aside"):
                server[key] += counts[key]
    for worker in report.workers.values():
        worker["rows_per_s"] = worker["rows"] / worker["seconds"] if worker["seconds"] else 0.0
        worker["seconds"] = round(worker["seconds"], 3)
    long = [json.loads(s["long"]) for s in summaries]
    report.long_texts = {k: sum(x[k] for x in long) for k in ("over", "chunks", "chars", "chars_beyond")}
    if long:
        report.long_texts.update(window=long[0]["window"], exact=long[0]["exact"],
                                 policy=long[0]["policy"])
        report.long_texts["share_beyond"] = report.long_texts["chars_beyond"] / max(
            report.long_texts["chars"], 1)

