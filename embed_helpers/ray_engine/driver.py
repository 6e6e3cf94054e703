"""The Ray engine: Step 9b of a plan on a Ray cluster, with the same guarantees as the local one.

The plan (made in this process, as for the local engine) says which rows to write; they go
to Ray Data in blocks, and a pool of `BlockWorker` actors (one per GPU for the `local`
backend, one per server for the HTTP backends, or EMBED_WORKERS) runs the embedding
sequence on each block against the shared PostgreSQL cache, then writes the block in one
transaction. A plan with nothing to write starts no Ray at all. Ray runs a block at least
once (a retried task, a restarted actor); every write is keyed by id and every vector is
cached before it is written, so every row lands exactly once and nothing is paid twice.
The driver only reads one small summary per block.
"""
from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import replace

import numpy as np

from ..cache.tools import for_engine
from ..config import Settings
from ..constants import RAY_BATCHES_PER_BLOCK, RAY_HTTP_WORKER_CPUS, RAY_OBJECT_STORE_BYTES
from ..errors import ConfigError, EmbedHelpersError
from ..plan import Plan
from ..rate_governor import budget_since
from ..report import RunReport, start_report
from ..resilient import Failure
from .cluster import join, quiet_our_errors, without_rays_note
from .worker import BlockWorker

log = logging.getLogger(__name__)


def run_plan_ray(plan: Plan, *, settings: Settings, backend, cache,
                 progress: bool = True) -> RunReport:
    """Carry out `plan` on Ray (RAY_ADDRESS's cluster, or a local Ray); returns the report."""
    started = time.perf_counter()
    report = start_report(plan, settings, cache)
    report.engine, report.cache_path = "ray", "PostgreSQL table embedding_cache"
    failures = [Failure(-1, "", reason, None, row_id).record() for row_id, reason in plan.rows.invalid]
    if not plan.todo:  # nothing to write: no cluster to start
        report.close(failures, settings, wall=time.perf_counter() - started)
        return report
    ray = _ray()
    settings = for_engine(replace(settings, EMBED_ENGINE="ray"))  # the workers' settings
    ours = not ray.is_initialized()
    report.ray_startup_s = round(_start(ray, settings), 2)
    servers = len(backend.stats().get("servers", {})) or 1
    try:
        _run(ray, plan, settings, servers, report, failures, progress)
    except BaseException as exc:
        report.close(failures, settings, wall=time.perf_counter() - started, error=exc)
        raise
    finally:
        if ours:  # a Ray started for this run ends with it (a notebook kernel is then
            ray.shutdown()  # stopped cleanly, not with Ray's SIGTERM stack trace)
    return report.close(failures, settings, wall=time.perf_counter() - started)


def hold_ray(settings: Settings):
    """Start (or join) Ray once for several plans, a streamed source's windows, so that each
    `run_plan_ray` finds it running; returns what ends it (nothing when it already ran)."""
    ray = _ray()
    if ray.is_initialized():
        return lambda: None
    _start(ray, for_engine(replace(settings, EMBED_ENGINE="ray")))
    return ray.shutdown


def _run(ray, plan: Plan, settings: Settings, servers: int, report: RunReport,
         failures: list[dict], progress: bool) -> None:
    """The workers over the plan's rows in blocks, their summaries into the report."""
    workers, resources = _workers(ray, settings, servers)
    block = RAY_BATCHES_PER_BLOCK * settings.EMBED_BATCH_SIZE
    numbers = ray.remote(num_cpus=0)(_Numbers).remote()  # worker i starts at server i
    dataset = _dataset(ray, plan, block).map_batches(
        BlockWorker, fn_constructor_kwargs=dict(
            settings=settings, target=plan.target, dim=plan.identity.dim,
            dim_source=plan.dim_source,
            concurrency=max(1, settings.EMBED_MAX_CONCURRENCY * servers // workers),
            numbers=numbers, record=plan.provenance),
        batch_size=block, batch_format="numpy",
        # One block per worker at a time: a worker that started first must not queue them all.
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
        **resources)
    _collect(dataset, report, failures, progress, len(plan.todo))


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


def _dataset(ray, plan: Plan, block: int):
    """The plan's rows to write as (id, text, new) in blocks of `block` rows, each its own
    input (else the one DataFrame would go to one worker as one bundle)."""
    import pandas as pd
    rows = plan.rows.take(plan.todo)
    frame = pd.DataFrame({"id": rows.ids, "text": rows.texts,
                          "new": np.array([i not in plan.stored_ids for i in rows.ids])})
    if plan.target.annotated:  # each row's (source, metadata) travels with it, as JSON
        frame["notes"] = [json.dumps(plan.annotations.get(i, (None, None))) for i in rows.ids]
    return ray.data.from_pandas(frame).repartition(target_num_rows_per_block=block)


def _collect(dataset, report: RunReport, failures: list[dict], progress: bool,
             rows: int) -> None:
    """Read the blocks' summaries as they come into the report (the same figures the
    local engine's sequence counts); the failure records into `failures`."""
    from tqdm import tqdm
    bar = tqdm(total=rows, unit="row", desc="Step 9b (ray)", disable=not progress)
    try:
        for summary in dataset.iter_rows():
            _add_block(report, summary)
            block_failures = json.loads(summary["failures"])
            failures += block_failures
            bar.update(int(summary["written"]) + len(block_failures))
    except Exception as exc:  # Ray wraps our errors: show ours, not Ray's traceback
        ours = _our_error(exc)
        if ours is not None:
            raise without_rays_note(ours) from None
        raise
    finally:
        bar.close()
    for worker in report.workers.values():
        worker["rows_per_s"] = worker["rows"] / worker["seconds"] if worker["seconds"] else 0.0
        worker["seconds"] = round(worker["seconds"], 3)


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


def _add_block(report: RunReport, s: dict) -> None:
    """One block's summary into the report: the sequence's tally, the writes, the bill."""
    tally = report.tally
    for name in ("texts", "embedded", "hits", "failed", "waits"):
        setattr(tally, name, getattr(tally, name) + int(s[name]))
    report.rows_written += int(s["written"])
    report.chunks_written += int(s["chunks"])
    for name in ("requests", "retries", "texts_sent", "tokens"):
        setattr(report, name, getattr(report, name) + int(s[name]))
    report.rate_budget = budget_since(json.loads(s["rate_budget"]), {}, report.rate_budget)
    report.dim = report.dim or int(s["dim"])
    worker = report.workers.setdefault(str(s["worker"]), {"blocks": 0, "rows": 0, "seconds": 0.0})
    worker["blocks"] += 1
    worker["rows"] += int(s["written"])
    worker["seconds"] += float(s["seconds"])
    for url, counts in json.loads(s["servers"]).items():
        server = report.servers.setdefault(url, {"requests": 0, "texts": 0, "errors": 0,
                                                 "set_aside": 0, "mean_latency_s": None})
        for key in ("requests", "texts", "errors", "set_aside"):
            server[key] += counts[key]
