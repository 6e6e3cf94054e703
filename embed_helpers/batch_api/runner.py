"""Submit, resume, poll and collect batch jobs: the cache filled through the Batch API.

Each step is recorded before the next is taken (`store.py`): the texts before the upload,
the file's id before the batch is made, the batch's id once made. A rerun, or another
machine sharing the cache, picks each job up where the record says: a job with a file but
no batch is looked for among the account's batches by the key in its metadata before one
is made; a pending batch is polled, never resubmitted. Finished output is checked
(`output.py`) and cached under the key a synchronous run would use, so the plan that
follows finds every text there.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from .client import TERMINAL, BatchClient
from .jobs import Job, Limits, cut_jobs, input_file
from .output import Output, read_errors, read_output
from .store import COLLECTED, PREPARING, SUBMITTED, UPLOADED, JobStore

log = logging.getLogger(__name__)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Outcome:
    """What the Batch API did for one run: jobs, lines, tokens, and what is still out."""

    submitted: int = 0
    resumed: int = 0
    collected: int = 0
    lines: int = 0
    texts_cached: int = 0
    tokens: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # custom_id -> why
    failed_texts: set[str] = field(default_factory=set)
    pending: list[dict] = field(default_factory=list)     # job key, batch id, status
    dim: int | None = None


class BatchRunner:
    """One run's jobs: those its texts need, those earlier runs left open."""

    def __init__(self, backend, cache, settings, *, limits: Limits, dim: int | None,
                 store: JobStore | None = None, sleep=time.sleep):
        self.backend, self.cache, self.settings, self.limits = backend, cache, settings, limits
        self.store = store or JobStore.beside(cache)
        self.client = BatchClient(backend.http)
        self.identity = backend.identity()
        self.sleep = sleep
        self.outcome = Outcome(dim=dim)

    def run(self, texts: list[str], tokens: dict[str, int], *, wait: bool) -> Outcome:
        """Texts no open job holds go in new jobs; every job is driven as far as it goes
        (with `wait`, until none is left); the outcome says what came back and what is out."""
        records = self.store.open_records(self.identity.route, self.identity.model)
        held = {t for r in records for texts_ in r.get("lines", {}).values() for t in texts_}
        self.outcome.resumed = len(records)
        for record in records:
            record["from_store"] = True
        new = [t for t in texts if t not in held]
        queue = self.cut(new, [tokens[t] for t in new])
        while True:
            records = [self.advance(r) for r in records]
            records = [r for r in records if r.get("state") != COLLECTED]
            enqueued = sum(r.get("tokens", 0) for r in records)
            while queue and enqueued + queue[0][1].tokens <= self.limits.enqueued_tokens:
                record = self.submit(*queue.pop(0))
                if record is not None:
                    records.append(record)
                    enqueued += record["tokens"]
            if not records and not queue:
                return self.outcome
            if not wait:
                self.outcome.pending = [{"key": r["key"], "batch_id": r.get("batch_id"),
                                         "status": r.get("status", r.get("state"))}
                                        for r in records]
                self.outcome.pending += [{"key": k, "batch_id": None, "status": "not submitted"}
                                         for k, _ in queue]
                return self.outcome
            self.sleep(self.settings.EMBED_BATCH_POLL_S)

    def cut(self, texts: list[str], tokens: list[int]) -> list[tuple[str, Job]]:
        keys: list[str] = []

        def key_of(n: int) -> str:
            while len(keys) <= n:
                keys.append(uuid.uuid4().hex[:16])
            return keys[n]
        jobs = cut_jobs(texts, tokens, self.limits, model=self.identity.model,
                        encoding=self.backend.encoding, key_of=key_of)
        return [(key_of(n), job) for n, job in enumerate(jobs)]

    def submit(self, key: str, job: Job) -> dict | None:
        """Record the job's texts, then upload, then create: each step recorded. Texts
        another process put in a job meanwhile are left to it (`claim`); None when no text
        is left."""
        job = without(job, self.held_by_others(key))
        if not job.lines:
            return None
        self.store.update(key, route=self.identity.route, model=self.identity.model,
                          state=PREPARING, lines=job.lines, tokens=job.tokens,
                          inputs=job.inputs, encoding=self.backend.encoding, created=utc_now())
        job = self.claim(key, job)
        if job is None:
            return None
        self.outcome.submitted += 1
        self.outcome.lines += len(job.lines)
        record = {"key": key, "lines": job.lines, "tokens": job.tokens,
                  "encoding": self.backend.encoding, "state": PREPARING}
        return self.advance(record)

    def held_by_others(self, key: str, before_only: bool = False) -> set[str]:
        """Texts of the open jobs other than `key` (only those recorded before it)."""
        held: set[str] = set()
        for record in self.store.open_records(self.identity.route, self.identity.model):
            if record["key"] == key:
                if before_only:
                    break
                continue
            held |= {t for texts in record.get("lines", {}).values() for t in texts}
        return held

    def claim(self, key: str, job: Job) -> Job | None:
        """Two processes that recorded jobs with the same texts at the same moment: the one
        recorded first keeps them (the log has one order), the other's job gives them up
        before anything is uploaded (it is closed when nothing is left)."""
        kept = without(job, self.held_by_others(key, before_only=True))
        if kept.inputs == job.inputs:
            return job
        if not kept.lines:
            self.store.update(key, state=COLLECTED, status="superseded", lines={}, tokens=0)
            return None
        self.store.update(key, lines=kept.lines, tokens=kept.tokens, inputs=kept.inputs)
        return kept

    def advance(self, record: dict) -> dict:
        """One step of a job's life, as far as it goes now: upload, create, poll, collect."""
        key, state = record["key"], record.get("state")
        if state == PREPARING:
            content = input_file(Job(record["lines"]), self.identity.model,
                                 record.get("encoding", self.backend.encoding))
            record["file_id"] = self.client.upload(content, f"embed-helpers-{key}.jsonl")
            record["state"] = UPLOADED
            self.store.update(key, state=UPLOADED, file_id=record["file_id"])
        if record.get("state") == UPLOADED:
            # A record from an earlier run may have made its batch before it died.
            batch = (self.client.find(key) if record.get("from_store") else None) \
                or self.client.create(record["file_id"], key)
            record.update(state=SUBMITTED, batch_id=batch["id"], status=batch["status"])
            self.store.update(key, state=SUBMITTED, batch_id=batch["id"],
                              status=batch["status"], submitted=utc_now())
            log.info("batch job %s: batch %s %s", key, batch["id"], batch["status"])
            return record
        batch = self.client.get(record["batch_id"])
        if batch["status"] != record.get("status"):
            record["status"] = batch["status"]
            self.store.update(key, status=batch["status"],
                              counts=batch.get("request_counts") or {})
        if batch["status"] in TERMINAL:
            self.collect(record, batch)
            record["state"] = COLLECTED
        return record

    def collect(self, record: dict, batch: dict) -> None:
        """Check the output, cache its vectors, note the lines that got none and why."""
        lines, where = record["lines"], f"batch {batch['id']} (job {record['key']})"
        if batch.get("output_file_id"):
            out = read_output(self.client.content(batch["output_file_id"]), lines,
                              self.outcome.dim, where=where)
        else:
            out = Output(dim=self.outcome.dim)
        if batch.get("error_file_id"):
            read_errors(self.client.content(batch["error_file_id"]), lines, out)
        why = f"the batch ended {batch['status']}" + batch_errors(batch)
        for custom_id in lines:
            if custom_id not in out.vectors and custom_id not in out.failed:
                out.failed[custom_id] = why
        self.cache_vectors(lines, out)
        self.store.update(record["key"], state=COLLECTED, status=batch["status"],
                          finished=utc_now(), completed=len(out.vectors),
                          failed=out.failed, tokens_billed=out.tokens)
        self.outcome.collected += 1

    def cache_vectors(self, lines: dict[str, list[str]], out: Output) -> None:
        texts = [t for cid in out.vectors for t in lines[cid]]
        if texts:
            identity = self.backend.identity(out.dim)
            self.cache.put_many(identity, texts, np.concatenate(list(out.vectors.values())))
        self.outcome.dim = out.dim or self.outcome.dim
        self.outcome.texts_cached += len(texts)
        self.outcome.tokens += out.tokens
        self.outcome.failed.update(out.failed)
        self.outcome.failed_texts |= {t for cid in out.failed for t in lines[cid]}


def without(job: Job, texts: set[str]) -> Job:
    """`job` without `texts` (its lines keep their custom_ids; emptied lines go)."""
    if not texts:
        return job
    lines = {cid: [t for t in line if t not in texts] for cid, line in job.lines.items()}
    kept = Job({cid: line for cid, line in lines.items() if line})
    share = kept.inputs / job.inputs if job.inputs else 0  # a smaller job: still in the cap
    kept.tokens, kept.bytes = round(job.tokens * share), round(job.bytes * share)
    return kept


def batch_errors(batch: dict) -> str:
    """A failed batch's own errors (validation), in a few words."""
    data = ((batch.get("errors") or {}).get("data") or [])[:3]
    said = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in data if isinstance(e, dict))
    return f" ({said})" if said else ""

