"""EMBED_HOSTED_MODE=batch: fill the cache through the Batch API, then run the plan.

The plan's texts that are neither cached nor held by an open job go to the Batch API at half
the price; once every job is back, the plan runs as it always does and finds its texts in
the cache (no synchronous request). Lines that failed or expired are embedded
synchronously by that run (EMBED_BATCH_FAILED=sync, counted as its requests) or listed as
failures (list: the run is then cache-only). `workflow.run_plan` calls `run_plan_batch`.
"""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from .. import steps
from ..config import replace_settings
from ..constants import BATCH_COMPLETION_HOURS, BATCH_PRICE_FACTOR
from ..errors import ConfigError
from ..printing import plural
from ..report import start_report
from ..sequence import CACHE_ONLY_REASON
from .jobs import Limits, cut_jobs
from .runner import BatchRunner, Outcome
from .store import JobStore

log = logging.getLogger(__name__)

LISTED_REASON = ("the Batch API gave no vector for it (its line failed, expired or was "
                 "cancelled: the report's batch.failed says why); EMBED_BATCH_FAILED=list: run "
                 "again to send it in a new job, or set EMBED_BATCH_FAILED=sync")


def limits_for(plan, settings) -> Limits:
    """A line holds what one synchronous request would (EMBED_BATCH_SIZE, the token
    budget); a job what the Batch API and the account's enqueued-token cap allow."""
    return Limits(plan.batch_size, plan.window.request_tokens,
                  settings.EMBED_BATCH_ENQUEUED_TOKENS)


def batch_price(plan, settings) -> float | None:
    """USD per million tokens through the Batch API: the setting, else half the list price."""
    if settings.EMBED_BATCH_PRICE_PER_1M_TOKENS is not None:
        return settings.EMBED_BATCH_PRICE_PER_1M_TOKENS
    return plan.price_per_1m[0] * BATCH_PRICE_FACTOR if plan.price_per_1m else None


def check_backend(backend) -> None:
    if not getattr(backend, "speaks_batch_api", False):
        raise ConfigError("EMBED_HOSTED_MODE", f"batch is OpenAI's Batch API, which only the "
                                               f"OpenAI-compatible backend speaks; "
                                               f"EMBEDDING_BACKEND is {backend.name}")


def plan_rows(plan, backend, cache, settings) -> list[tuple[str, object]]:
    """The plan's lines for batch mode: jobs and lines to submit, both prices, when due."""
    check_backend(backend)
    route, model = backend.identity().route, backend.model
    held = {t for r in JobStore.beside(cache).open_records(route, model)
            for texts in r.get("lines", {}).values() for t in texts}
    new = [t for t in plan.to_embed if t not in held]
    tokens = plan.pieces.token_counts(new, plan.window) if new else []
    jobs = cut_jobs(new, tokens, limits_for(plan, settings), model=model,
                    encoding=backend.encoding, key_of=lambda n: f"job{n}")
    price, sync = batch_price(plan, settings), plan.price_per_1m
    due = datetime.now(timezone.utc) + timedelta(hours=BATCH_COMPLETION_HOURS)
    rows = [("hosted mode", "batch: OpenAI's Batch API (EMBED_HOSTED_MODE=batch)"),
            ("texts held by pending batch jobs (not sent again)", len(held)),
            ("batch jobs to submit (request lines)",
             f"{len(jobs)} ({sum(len(j.lines) for j in jobs)} lines, "
             f"{sum(j.inputs for j in jobs)} inputs)"),
            ("results due", f"within {BATCH_COMPLETION_HOURS} h of submission "
                            f"(by {due:%Y-%m-%d %H:%M} UTC if submitted now)")]
    if price is not None:
        n = sum(tokens)
        rows.append((f"estimated cost at ${price:g}/1M tokens (batch)",
                     f"${n / 1e6 * price:.4f}; synchronously "
                     f"${n / 1e6 * sync[0]:.4f}" if sync else f"${n / 1e6 * price:.4f}"))
    return rows


def fill_cache(plan, *, backend, cache, settings, limits: Limits | None = None,
               sleep=None) -> tuple[Outcome, int]:
    """The plan's uncached texts through the Batch API; (what came back, requests sent)."""
    check_backend(backend)
    before = backend.stats().get("requests", 0)
    kwargs = {"sleep": sleep} if sleep is not None else {}
    runner = BatchRunner(backend, cache, settings, limits=limits or limits_for(plan, settings),
                         dim=plan.identity.dim, **kwargs)
    texts = plan.to_embed
    tokens = dict(zip(texts, plan.pieces.token_counts(texts, plan.window))) if texts else {}
    outcome = runner.run(texts, tokens, wait=settings.EMBED_BATCH_WAIT)
    return outcome, backend.stats().get("requests", 0) - before


def run_plan_batch(plan, *, conn, backend, cache, settings, progress: bool = True,
                   limits: Limits | None = None, sleep=None):
    """Batch mode's Step 9b: the Batch API fills the cache, then the plan runs on it."""
    from ..workflow import run_plan
    started, before = time.perf_counter(), backend.stats().get("requests", 0)
    try:
        outcome, requests = fill_cache(plan, backend=backend, cache=cache, settings=settings,
                                       limits=limits, sleep=sleep)
    except BaseException as exc:  # a crash has a bill too: saved in EMBED_RUNS_DIR
        report = start_report(plan, settings, cache)
        report.requests = backend.stats().get("requests", 0) - before
        report.close_bill(backend).close([], settings, wall=time.perf_counter() - started,
                                         cache=cache, error=exc)
        raise
    if outcome.pending:  # --no-wait: nothing is written until the jobs are back
        report = start_report(plan, settings, cache)
        report.requests, report.tokens = requests, 0
        report.batch = summary(outcome, requests, batch_price(plan, settings))
        return report
    if outcome.dim and not plan.identity.dim:
        plan.identity, plan.dim_source = backend.identity(outcome.dim), "the Batch API's output"
    found = steps.in_cache(cache, plan.identity, plan.to_embed)
    plan.cached |= found
    plan.to_embed = [t for t in plan.to_embed if t not in found]
    listed = settings.EMBED_BATCH_FAILED == "list" and bool(plan.to_embed)
    run_settings = replace_settings(settings, EMBED_HOSTED_MODE="sync",
                                    **({"EMBED_CACHE_ONLY": "1"} if listed else {}))
    report = run_plan(plan, conn=conn, backend=backend, cache=cache, settings=run_settings,
                      progress=progress)
    price, sync = batch_price(plan, settings), report.price_per_1m_tokens
    sync_tokens = report.tokens
    report.requests += requests
    report.tokens += outcome.tokens
    if price is not None and report.tokens:  # the two prices, as one per token billed
        cost = outcome.tokens * price + sync_tokens * (sync if sync is not None else price)
        report.price_per_1m_tokens = cost / report.tokens
    report.batch = summary(outcome, requests, price, sync_tokens=sync_tokens)
    if listed and report.failures_path:
        say_why(report.failures_path)
    return report


def say_why(path: str) -> None:
    """The failures file of a list-mode run: rows the cache-only run could not find are
    rows the Batch API gave no vector, and the file says so (and what to do)."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    for line in lines:
        if line.get("reason") == CACHE_ONLY_REASON:
            line["reason"] = LISTED_REASON
    Path(path).write_text("".join(json.dumps(line) + "\n" for line in lines))


def summary(outcome: Outcome, requests: int, price, *, sync_tokens: int = 0) -> dict:
    """The report's `batch` figures (saved with it) and its lines, in words."""
    failed = sorted(outcome.failed.items())
    words = [f"Batch API: {plural(outcome.submitted, 'job')} submitted, "
             f"{outcome.resumed} resumed, {outcome.collected} collected; "
             f"{outcome.texts_cached} texts cached from it; {outcome.tokens:,} tokens billed"
             f"{f' at ${price:g}/1M' if price is not None else ''}; {plural(requests, 'request')} "
             f"(uploads, creates, polls, downloads)"]
    if failed:
        words.append(f"Batch API: {len(failed)} lines failed or expired "
                     f"({len(outcome.failed_texts)} texts), e.g. {failed[0][0]}: {failed[0][1]}")
    if outcome.pending:
        words.append(f"Batch API: {plural(len(outcome.pending), 'job')} pending "
                     f"({', '.join(str(p['batch_id'] or p['key']) for p in outcome.pending[:5])}):"
                     f" nothing written yet; run again to collect (no job is sent twice)")
    return {"jobs_submitted": outcome.submitted, "jobs_resumed": outcome.resumed,
            "jobs_collected": outcome.collected, "lines": outcome.lines,
            "texts_cached": outcome.texts_cached, "tokens": outcome.tokens,
            "sync_tokens": sync_tokens, "price_per_1m_tokens": price, "requests": requests,
            "failed": dict(failed), "pending": outcome.pending, "lines_in_words": words}
