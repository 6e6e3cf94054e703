"""One Ray worker: the embedding sequence over one block of a plan's rows, set up once per actor.

As in Ray Data's callable classes, `__init__` does the expensive set-up once (the backend
and its model, a database connection, the cache, the sequence) and `__call__(block) ->
summary` is one pass over a block: `EmbedSequence.run` into a sink that keeps the block's
rows, then one transaction. The rows come from a plan (unique ids, already checked against
the table), so a block needs no claims. The summary (counts, failures) is all that goes back
to the driver.
"""
from __future__ import annotations

import json
import time

from .. import steps, db, provenance, windows
from ..pieces import Done, Pieces
from ..rate_governor import budget_since
from ..resilient import Dimension, Failure
from ..sequence import EmbedSequence, Tally


class BlockSink:
    """A block's rows, kept until the block's one transaction."""

    def __init__(self, pieces: Pieces):
        self.pieces, self.parts, self.failures = pieces, [], []

    def deliver(self, done: Done) -> None:
        self.parts.append(done)

    def fail(self, rows: list[int], failure: Failure) -> None:
        self.failures += [Failure(r, self.pieces.row_texts[r][:60], failure.reason,
                                  failure.status, self.pieces.ids[r]).record() for r in rows]


class BlockWorker:
    """A Ray Data actor: `map_batches(BlockWorker, fn_constructor_kwargs=...)`."""

    def __init__(self, settings, target: steps.Target, dim: int | None, dim_source: str,
                 concurrency: int, numbers, record=None):
        import ray

        from ..backends import get_backend
        from ..cache.tools import open_cache
        self.settings, self.target, self.record = settings, target, record  # provenance
        index = ray.get(numbers.next.remote())
        self.name = f"worker-{index}"
        # Worker i starts at server i of OLLAMA_HOST / OPENAI_BASE_URL.
        self.backend = get_backend(settings, server_offset=index)
        self.conn = db.connect(settings)
        self.sequence = EmbedSequence(self.backend, open_cache(settings), settings,
                                      dimension=Dimension(dim, dim_source or "EMBEDDING_DIM"))
        self.concurrency = concurrency
        self.table_ready = False

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        before = self.backend.stats()
        texts = [str(t) for t in batch["text"]]
        pieces = windows.pieces_for(self.backend, self.sequence.cache, self.settings,
                                    [str(i) for i in batch["id"]], texts)
        sink, tally = BlockSink(pieces), Tally()
        self.sequence.run(pieces, sink, slots=self.concurrency, tally=tally)
        done = Done.merge(sink.parts)
        if done.rows and not self.table_ready:
            db.create_table(self.conn, self.target.table, self.target.id_col,
                            self.target.text_col, done.vectors.shape[1], self.settings.EMBED_STORAGE)
            provenance.at_first_vectors(self.conn, self.target.table, self.record, self.backend,
                                        done.vectors.shape[1])
            self.table_ready = True
        new = {str(i) for i, is_new in zip(batch["id"], batch["new"]) if is_new}
        notes = {str(i): tuple(json.loads(n)) for i, n in zip(batch["id"], batch["notes"])} \
            if "notes" in batch else None
        written = steps.write(self.conn, self.target, pieces, done, upsert=self.settings.UPSERT,
                             assume_new=all(pieces.ids[r] in new for r in done.rows),
                             annotations=notes)
        return self._summary(tally, written, len(done.chunks), sink.failures, before,
                             time.perf_counter() - t0)

    def _summary(self, tally: Tally, written: int, chunks: int, failures: list[dict],
                 before: dict, seconds: float) -> dict:
        stats = self.backend.stats()
        servers = {url: {k: c[k] - before.get("servers", {}).get(url, {}).get(k, 0)
                         for k in ("requests", "texts", "errors", "set_aside")}
                   for url, c in stats.get("servers", {}).items()}
        delta = {k: stats.get(k, 0) - before.get(k, 0)
                 for k in ("requests", "retries", "texts", "tokens")}
        return {"written": [written], "chunks": [chunks], "texts": [tally.texts],
                "embedded": [tally.embedded], "hits": [tally.hits], "failed": [tally.failed],
                "waits": [tally.waits], "requests": [delta["requests"]],
                "retries": [delta["retries"]], "texts_sent": [delta["texts"]],
                "tokens": [delta["tokens"]], "failures": [json.dumps(failures)],
                "worker": [self.name], "seconds": [seconds],
                "dim": [self.sequence.dimension.value or 0], "servers": [json.dumps(servers)],
                "rate_budget": [json.dumps(budget_since(stats, before, {}))]}
