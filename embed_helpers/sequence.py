"""The embedding sequence: the one loop from texts to vectors that every driver runs.

    look up the cache -> cache-only brake -> cut batches as the sizer says -> lease
      -> embed (resilient) -> remember in the cache -> settle -> the driver's sink
      -> texts another run was embedding: wait for its vectors, then again

The local engine, the Ray worker, `batch_embed` / `abatch_embed`, the `Embedder` and the
plan's probe all call `EmbedSequence.run`; each supplies only its concurrency (`slots`)
and its sink (return vectors, write rows, claim and write). A fix here reaches them all.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from .constants import CACHE_LEASE_POLL_S, WRITE_CHUNK_ROWS
from .identity import Identity
from .pieces import Assembly, BatchCutter, Done, Pieces
from .resilient import BatchSizer, Dimension, Failure, embed_resilient, preview
from .windows import specials

log = logging.getLogger(__name__)

CACHE_ONLY_REASON = "not in the cache (EMBED_CACHE_ONLY=1): run without it to embed"


def batch_size(settings, backend) -> int:
    """EMBED_BATCH_SIZE, clamped to the most texts the backend takes in one request."""
    return min(settings.EMBED_BATCH_SIZE, backend.max_batch or settings.EMBED_BATCH_SIZE)


class Sink(Protocol):
    """Where a driver wants the results of a run, called from the run's own thread."""

    def deliver(self, done: Done) -> None: ...  # rows completed, a vector each, their chunks

    def fail(self, rows: list[int], failure: Failure) -> None: ...  # rows with no vector, why


@dataclass
class Tally:
    """What one run of the sequence did: the figures of the report that it owns."""

    texts: int = 0              # distinct texts the rows need (chunks counted)
    hits: int = 0               # found in the cache, before or during the run
    embedded: int = 0           # embedded by this run's requests
    failed: int = 0             # texts that got no vector
    waits: int = 0              # times it waited for another run's vectors
    request_spans: list[tuple[float, float]] = field(default_factory=list)
    sink_spans: list[tuple[float, float]] = field(default_factory=list)

    def add(self, other: "Tally") -> None:
        for name in ("texts", "hits", "embedded", "failed", "waits"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.request_spans += other.request_spans
        self.sink_spans += other.sink_spans


def take_or_lease(cache, identity: Identity, texts: list[str]):
    """Before paying: (vectors cached meanwhile, texts ours to embed, texts another run holds)."""
    found = cache.get_many(identity, texts)
    rest = [t for t in texts if t not in found]
    leased = cache.lease(identity, rest) if rest else set()
    return found, [t for t in rest if t in leased], [t for t in rest if t not in leased]


class EmbedSequence:
    """One run's way to vectors: a backend, a cache (or None), the settings, and what the
    run has learned (the batch size that works, the dimension). Shared by the threads and
    the blocks of a run; `run` may be called many times (a worker's blocks)."""

    def __init__(self, backend, cache, settings, *, dimension: Dimension | None = None,
                 sizer: BatchSizer | None = None, clock=time.perf_counter):
        self.backend, self.cache, self.settings = backend, cache, settings
        self.dimension = dimension or Dimension()
        self.sizer = sizer or BatchSizer(batch_size(settings, backend))
        self.clock, self.start = clock, clock()
        self.waiting, self.on_wait = "", None  # why it waits now; a callback shown that reason

    def identity(self) -> Identity:  # what makes the vectors now: the cache key's parts
        return self.backend.identity(self.dimension.value)

    def now(self) -> float:  # seconds since the sequence was made
        return self.clock() - self.start

    def run(self, pieces: Pieces, sink: Sink, *, slots: int | None = None,
            cached: set[str] | None = None, tally: Tally | None = None) -> Tally:
        """Vectors for every text of `pieces`, each row handed to `sink` once, done or failed.

        Args:
            slots: requests in flight at once (default: the backend's).
            cached: the texts a plan found in the cache: only these are looked up before
                the requests start (others are looked up again just before paying).
            tally: add to this one (a report that must survive a crash), else a new one.
        Raises: what `embed_resilient` raises when nothing can succeed (server gone, key
            refused, wrong dimension); what was settled before stays settled.
        """
        tally = tally if tally is not None else Tally()
        tally.texts += len(pieces.texts)
        if self.dimension.value is None and self.cache is not None:
            # Without the dimension no key can be made: a rerun would pay its first batch
            # again. The cache may know it (a run of this plan that died, another process).
            identity = self.backend.identity()
            dims = self.cache.dims(identity.route, identity.model, identity.normalized)
            if len(dims) == 1:
                self.dimension.adopt(dims[0], "the dimension the cache holds for this model")
        state = _Pass(self, pieces, pieces.assembly(), sink, tally)
        state.fail_known()
        can_look = self.cache is not None and self.dimension.value
        look_up = [t for t in pieces.texts if can_look and (cached is None or t in cached)]
        state.cutter.add(t for t in pieces.texts if not can_look or (cached is not None
                                                                     and t not in cached))
        with ThreadPoolExecutor(slots or self.backend.slots, thread_name_prefix="embed") as pool:
            state.loop(pool, slots or self.backend.slots, look_up)
        return tally


class _Pass:
    """The state of one `EmbedSequence.run`: what is queued, in flight, and waiting on leases."""

    def __init__(self, seq: "EmbedSequence", pieces: Pieces, assembly: Assembly, sink: Sink,
                 tally: Tally):
        self.seq, self.pieces, self.assembly, self.sink, self.tally = \
            seq, pieces, assembly, sink, tally
        self.cutter = BatchCutter(pieces, seq.backend.window, seq.sizer)
        self.later: list[str] = []   # texts another run holds a lease on
        self.refused: list[tuple[str, Failure]] = []   # too long for the window a server stated
        self.brake = bool(seq.settings.EMBED_CACHE_ONLY)

    def fail_known(self) -> None:  # long texts under EMBED_LONG_TEXTS=fail: before any request
        for row, reason in self.pieces.failed:
            self.sink.fail([row], Failure(-1, preview(self.pieces.row_texts[row]), reason))

    def loop(self, pool: ThreadPoolExecutor, slots: int, look_up: list[str]) -> None:
        """Requests first (the server starts at once), cache reads while they are in flight
        (one chunk read ahead), each batch settled once the next one is on its way."""
        inflight: dict[Future, list[str]] = {}
        chunks = deque(look_up[i:i + WRITE_CHUNK_ROWS]
                       for i in range(0, len(look_up), WRITE_CHUNK_ROWS))
        with ThreadPoolExecutor(1, thread_name_prefix="cache-read") as reader:
            reads = deque([reader.submit(self.read, chunks.popleft())] if chunks else [])
            try:
                while True:
                    while self.cutter and len(inflight) < slots and not self.brake:
                        batch = self.cutter.next()
                        inflight[pool.submit(self.embed, batch)] = batch
                    finished = [f for f in inflight if f.done()]
                    if finished:
                        for future in finished:
                            del inflight[future]
                            self.settle(*future.result())
                    elif reads:
                        done = reads.popleft().result()
                        if chunks:
                            reads.append(reader.submit(self.read, chunks.popleft()))
                        self.took(*done)
                    elif inflight:
                        wait(inflight, return_when=FIRST_COMPLETED)
                    elif self.cutter:   # the cache-only brake holds these
                        self.refuse(list(self.cutter.queue))
                        self.cutter.queue.clear()
                    elif self.later:
                        self.wait_for_others()
                    elif self.refused:
                        self.split_again()
                    else:
                        return
            finally:
                for future in [*inflight, *reads]:
                    future.cancel()

    def read(self, texts: list[str]):
        """On the reader thread: the cached vectors of `texts`, stacked, and the rest."""
        found = self.seq.cache.get_many(self.seq.identity(), texts) \
            if self.seq.cache is not None and self.seq.dimension.value else {}
        hit = [t for t in texts if t in found]
        vectors = np.stack([found[t] for t in hit]) if hit else None
        return hit, vectors, [t for t in texts if t not in found]

    def took(self, hit: list[str], vectors, missing: list[str]) -> None:
        """Cached vectors to the sink; the texts the cache lacks queued to send (or refused)."""
        if hit:
            self.tally.hits += len(hit)
            self.to_sink(self.assembly.deliver(hit, vectors))
        if self.brake:
            self.refuse(missing)
        else:
            self.cutter.add(missing)

    def refuse(self, texts: list[str]) -> None:  # EMBED_CACHE_ONLY: a miss fails its rows
        for text in texts:
            self.fail_text(text, Failure(-1, preview(text), CACHE_ONLY_REASON))

    def embed(self, texts: list[str]):
        """On a pool thread: `take_or_lease`, then one resilient request for our texts."""
        seq, t0 = self.seq, self.seq.now()
        identity = seq.identity()
        found, mine, held = take_or_lease(seq.cache, identity, texts) \
            if seq.cache is not None and identity.dim else ({}, texts, [])
        vectors, failures = embed_resilient(seq.backend, mine, sizer=seq.sizer,
                                            dimension=seq.dimension) if mine else (None, [])
        if mine:
            self.tally.request_spans.append((t0, seq.now()))
        return found, mine, vectors, failures, held

    def settle(self, found: dict, texts: list[str], vectors, failures: list[Failure],
               held: list[str]) -> None:
        """A batch back: cache its vectors first (a crash then finds them), settle the rows."""
        self.deliver_found(found)
        self.later += held
        if not texts:
            return
        bad = {f.position for f in failures}
        good = [i for i in range(len(texts)) if i not in bad]
        if good and self.seq.cache is not None:
            self.seq.cache.put_many(self.seq.identity(), [texts[i] for i in good], vectors[good])
        for f in failures:
            if self.can_split_again(f):
                self.refused.append((texts[f.position], f))
            else:
                self.fail_text(texts[f.position], f)
        self.tally.embedded += len(good)
        self.to_sink(self.assembly.deliver([texts[i] for i in good], vectors[good]))

    def deliver_found(self, found: dict[str, np.ndarray]) -> None:
        if found:
            self.tally.hits += len(found)
            self.to_sink(self.assembly.deliver_found(found))

    def fail_text(self, text: str, failure: Failure) -> None:
        self.tally.failed += 1
        rows = self.assembly.fail(text)
        if rows:
            self.sink.fail(rows, failure)

    def to_sink(self, done: Done) -> None:
        if self.seq.waiting:  # rows land again: the wait is over
            self.seq.waiting = ""
            if self.seq.on_wait:
                self.seq.on_wait("")
        if done.rows:
            t0 = self.seq.now()
            self.sink.deliver(done)
            self.tally.sink_spans.append((t0, self.seq.now()))

    def can_split_again(self, failure: Failure) -> bool:
        """Refused as longer than a window the server states (chunk policy): split again."""
        window = self.seq.backend.window
        return bool(failure.limit) and self.seq.settings.EMBED_LONG_TEXTS == "chunk" \
            and failure.limit - specials(window.counter) < window.max_tokens

    def split_again(self) -> None:
        """Rows of refused texts, cut to the stated window (kept by the backend), run again."""
        limit = min(f.limit for _t, f in self.refused)
        window = replace(self.seq.backend.window, origin="server",
                         max_tokens=max(limit - specials(self.seq.backend.window.counter), 1),
                         source=f"the server's refusal: {self.refused[0][1].reason[:120]}")
        log.warning("%d texts were refused as longer than the server's window of %d tokens: "
                    "splitting them to fit (set EMBED_MAX_INPUT_TOKENS=%d to cut them so from "
                    "the start)", len(self.refused), window.max_tokens, window.max_tokens)
        rows = sorted({r for text, _f in self.refused for r in self.assembly.fail(text)})
        self.refused = []
        self.seq.backend.window = window
        pieces = Pieces([self.pieces.ids[r] for r in rows], [self.pieces.row_texts[r] for r in rows],
                        window, "chunk", self.seq.settings.EMBED_CHUNK_OVERLAP)
        self.seq.run(pieces, _Renumbered(self.sink, rows), slots=1, tally=self.tally)

    def wait_for_others(self) -> None:
        """Another run is embedding these (a dead run's leases expire): look again soon."""
        texts, self.later = self.later, []
        reason = self.seq.cache.lease_wait_reason() or \
            f"waiting for {len(texts)} texts another run is embedding"
        if reason != self.seq.waiting:  # said once, not at every poll
            log.warning("%s (their leases are held in the shared cache)", reason)
        self.seq.waiting = reason
        self.tally.waits += 1
        if self.seq.on_wait:
            self.seq.on_wait(self.seq.waiting)
        time.sleep(CACHE_LEASE_POLL_S)
        self.cutter.add(texts)


class _Renumbered:
    """A sink for rows run again as a block of their own: their positions put back."""

    def __init__(self, sink: Sink, rows: list[int]):
        self.sink, self.rows = sink, rows

    def deliver(self, done: Done) -> None:
        self.sink.deliver(Done([self.rows[r] for r in done.rows], done.vectors,
                               [(self.rows[r], *rest) for r, *rest in done.chunks]))

    def fail(self, rows: list[int], failure: Failure) -> None:
        self.sink.fail([self.rows[r] for r in rows], failure)
