"""The local engine: Step 9b in this process, the embedding sequence writing into a table.

`sequence.EmbedSequence` keeps up to `backend.slots` requests in flight (EMBED_MAX_CONCURRENCY
per server) and settles each finished batch while the next is on its way: its vectors
go to the cache first, then the rows it completes to PostgreSQL through `TableSink` (one
transaction per batch). Cached rows are written in groups while the first requests are in
flight, the next group read from the cache during each COPY. Cache first, database
second: a run killed between the two finds the vectors in the cache next time and pays
nothing again.
"""
from __future__ import annotations

import logging

from tqdm import tqdm

from . import steps, db, provenance
from .constants import PREVIEW_CHARS
from .plan import Plan
from .rate_governor import budget_status
from .report import RunReport, start_report
from .resilient import Dimension, Failure
from .sequence import EmbedSequence

log = logging.getLogger(__name__)


class TableSink:
    """Where the local engine's rows go: the target table (created when the first vectors
    say the dimension, if the plan did not know it), counted in the report as they land."""

    def __init__(self, plan: Plan, conn, settings, report: RunReport, sequence: EmbedSequence,
                 bar: tqdm):
        self.plan, self.conn, self.settings, self.report = plan, conn, settings, report
        self.sequence, self.bar = sequence, bar
        self.table_ready = self.claimed = False
        self.failures: list[Failure] = []

    def deliver(self, done) -> None:
        pieces, target = self.plan.pieces, self.plan.target
        if not self.table_ready:
            db.create_table(self.conn, target.table, target.id_col, target.text_col,
                            done.vectors.shape[1], self.settings.EMBED_STORAGE)
            self.table_ready = True
        if not self.claimed:  # the record checked again: another run may have taken the table
            provenance.at_first_vectors(self.conn, target.table, self.plan.provenance,
                                        self.sequence.backend, done.vectors.shape[1])
            self.claimed = True
        assume_new = not any(pieces.ids[r] in self.plan.stored_ids for r in done.rows)
        steps.write(self.conn, target, pieces, done, upsert=self.settings.UPSERT,
                   assume_new=assume_new, annotations=self.plan.annotations)
        self.report.rows_written += len(done.rows)
        self.report.chunks_written += len(done.chunks)
        self.report.timeline.append([round(self.sequence.now(), 3), self.report.rows_written])
        self.progress(len(done.rows))

    def fail(self, rows: list[int], failure: Failure) -> None:
        pieces = self.plan.pieces
        self.failures += [Failure(r, pieces.row_texts[r][:PREVIEW_CHARS], failure.reason,
                                  failure.status, pieces.ids[r]) for r in rows]
        self.progress(len(rows))

    def progress(self, rows: int) -> None:
        self.bar.update(rows)
        if not self.bar.disable:
            self.bar.set_postfix_str(self.sequence.waiting or budget_status(self.sequence.backend),
                                     refresh=False)


def run_local(plan: Plan, *, conn, backend, cache, settings, progress: bool = True) -> RunReport:
    """Carry out a plan in this process: embed what is missing, write what changed. A run
    that dies still leaves its report (`RunReport.failed`), saved in EMBED_RUNS_DIR."""
    report = start_report(plan, settings, cache)
    sequence = EmbedSequence(backend, cache, settings,
                             dimension=Dimension(plan.identity.dim, plan.dim_source or "EMBEDDING_DIM"))
    bar = tqdm(total=len(plan.todo), unit="row", desc="Step 9b", disable=not progress)
    sink = TableSink(plan, conn, settings, report, sequence, bar)
    sequence.on_wait = lambda reason: bar.set_postfix_str(reason)  # shown while it waits
    sink.table_ready = bool(plan.identity.dim) and db.table_dimension(conn, plan.target.table) \
        == plan.identity.dim
    sink.failures += [Failure(-1, "", reason, None, row_id) for row_id, reason in plan.rows.invalid]
    before = backend.stats()

    def close(error=None) -> RunReport:
        bar.close()
        report.add_requests(backend, before)
        if error is not None:  # the bill so far: probes and earlier steps included
            report.close_bill(backend)
        report.dim = sequence.dimension.value or 0
        return report.close([f.record() for f in sink.failures], settings, wall=sequence.now(),
                            cache=cache, error=error)
    try:
        sequence.run(plan.pieces, sink, cached=plan.cached, tally=report.tally)
    except BaseException as exc:
        close(exc)
        raise
    return close()
