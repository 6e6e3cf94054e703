"""`python -m embed_helpers batches list | cancel [ID | --all]`: the jobs beside the cache."""
from __future__ import annotations

from .client import TERMINAL, BatchClient
from .mode import check_backend
from .store import COLLECTED, JobStore


def add_parser(sub) -> None:
    """Register `batches` and its actions on the CLI's subparsers."""
    p = sub.add_parser("batches", help="batch jobs (EMBED_HOSTED_MODE=batch): list, cancel")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("list", help="pending and recent jobs, their state and counts")
    a.set_defaults(func=cmd_batches)
    a = actions.add_parser("cancel", help="cancel a pending job's batch (or --all)")
    a.set_defaults(func=cmd_batches)
    a.add_argument("id", nargs="?", help="the batch id or job key (`batches list`)")
    a.add_argument("--all", action="store_true", help="every pending job")


def cmd_batches(args) -> int:
    from ..backends import get_backend
    from ..cache.tools import open_cache
    from ..config import load_settings
    from ..errors import ConfigError

    settings = load_settings()
    cache = open_cache(settings)
    store = JobStore.beside(cache)
    with get_backend(settings) as backend:
        check_backend(backend)
        client = BatchClient(backend.http)
        if args.action == "list":
            print(list_jobs(store, client))
            return 0
        chosen = [r for r in store.records() if r.get("state") != COLLECTED and r.get("batch_id")
                  and (args.all or args.id in (r.get("batch_id"), r["key"]))]
        if not chosen:
            raise ConfigError("batches cancel", f"no pending job {args.id or ''} in "
                                                f"{store.describe()}: see `batches list`")
        for record in chosen:
            batch = client.cancel(record["batch_id"])
            store.update(record["key"], status=batch["status"])
            print(f"{record['batch_id']} (job {record['key']}): {batch['status']}; a rerun "
                  f"collects what it finished, the rest as EMBED_BATCH_FAILED says")
    return 0


def list_jobs(store: JobStore, client: BatchClient) -> str:
    """One line per job, the open ones polled for their status now."""
    lines = [f"batch jobs in {store.describe()}:"]
    for record in store.records():
        status, counts = record.get("status", record.get("state")), record.get("counts", {})
        if record.get("state") != COLLECTED and record.get("batch_id") \
                and status not in TERMINAL:
            batch = client.get(record["batch_id"])
            status, counts = batch["status"], batch.get("request_counts") or {}
        done = f"{record.get('completed', counts.get('completed', 0))} completed, " \
               f"{len(record.get('failed', {})) or counts.get('failed', 0)} failed"
        lines.append(f"{record.get('batch_id') or '(no batch yet)'}  job {record['key']}  "
                     f"{record.get('state')}/{status}  {len(record.get('lines', {}))} lines, "
                     f"{record.get('inputs', 0)} inputs, {done}  created "
                     f"{record.get('created', '?')} finished {record.get('finished', '-')}")
    return "\n".join(lines if len(lines) > 1 else lines + ["  none"])
