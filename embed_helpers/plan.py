"""Before paying for a GPU hour: count what a run would do, and what it would cost.

`make_plan` runs the first steps of `core` over the whole input: rows already stored
unchanged, long texts and their chunks, cached texts, and the texts and requests left to
pay for, with a time and cost estimate. The plan knows its target, so a notebook passes
the table and its columns once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from . import core
from .core import Rows, Target
from .identity import Identity
from .pieces import Pieces
from .tokens import Window

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What a run will do; `todo` are positions in `rows` to write."""

    target: Target
    rows: Rows
    todo: list[int]
    rows_unchanged: int
    stored_ids: set[str]
    pieces: Pieces                # the rows to write, as the texts to send
    identity: Identity            # dim None: learned from the first batch
    dim_source: str
    window: Window
    batch_size: int
    cached: set[str]              # texts whose vector is in the cache
    to_embed: list[str]           # texts to send, in first-seen order
    texts_per_s: float | None = None
    gpu_hourly_usd: float | None = None
    cache_name: str = ""
    notes: list[str] = field(default_factory=list)

    def batches(self) -> list[list[str]]:
        """The requests the run will send (before any split the server asks for)."""
        budget = self.window.request_tokens
        tokens = self.pieces.token_counts(self.to_embed, self.window) if budget else None
        return list(core.batches(self.to_embed, self.batch_size, tokens, budget))

    @property
    def requests(self) -> int:
        return len(self.batches())

    @property
    def est_seconds(self) -> float | None:
        if not self.to_embed:
            return 0.0
        return len(self.to_embed) / self.texts_per_s if self.texts_per_s else None

    @property
    def est_cost_usd(self) -> float | None:
        if self.est_seconds is None or self.gpu_hourly_usd is None:
            return None
        return self.est_seconds / 3600 * self.gpu_hourly_usd

    def as_rows(self) -> list[tuple[str, object]]:
        """(what, figure) pairs for Step 8 and `python -m embed_helpers plan`."""
        est = self.est_seconds
        rows = [
            ("rows read", self.rows.rows_read),
            ("rows with empty text (skipped)", len(self.rows.empty_ids)),
            ("duplicate ids (last wins)", self.rows.duplicate_ids),
            *([("ids repeated", ", ".join(self.rows.repeated))] if self.rows.repeated else []),
            ("rows already stored unchanged", self.rows_unchanged),
            ("rows to write", len(self.todo)),
            *self.pieces.long.as_rows(),
            ("texts to send (chunks counted, duplicates once)", len(self.pieces.texts)),
            ("cache", self.cache_name or "none"),
            ("texts in the cache", len(self.cached)),
            ("texts to embed", len(self.to_embed)),
            (f"requests at batch size {self.batch_size}", self.requests),
            ("estimated embedding time", "unknown" if est is None else f"{est:.1f} s"),
        ]
        if self.gpu_hourly_usd is not None:
            cost = self.est_cost_usd
            rows.append((f"estimated cost at ${self.gpu_hourly_usd}/h",
                         "unknown" if cost is None else f"${cost:.4f}"))
        return rows

    def __str__(self) -> str:
        width = max(len(k) for k, _ in self.as_rows())
        lines = [f"{k:<{width}}  {v}" for k, v in self.as_rows()]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def make_plan(rows: Rows, target: Target, *, conn, backend, cache, settings,
              dim: int | None, dim_source: str = "") -> Plan:
    """Count unchanged rows, long texts, cached texts and texts to embed; touch nothing."""
    window = backend.window
    policy = settings.EMBED_LONG_TEXTS
    todo, unchanged, stored_ids = core.drop_unchanged(conn, target, rows, window, policy)
    work = rows.take(todo)
    pieces = Pieces(work.ids, work.texts, window, policy, settings.EMBED_CHUNK_OVERLAP)
    identity = backend.identity(dim)
    cached = core.in_cache(cache, identity, pieces.texts)
    plan = Plan(target=target, rows=rows, todo=todo, rows_unchanged=unchanged,
                stored_ids=stored_ids, pieces=pieces, identity=identity,
                dim_source=dim_source, window=window,
                batch_size=min(settings.EMBED_BATCH_SIZE, backend.max_batch or settings.EMBED_BATCH_SIZE),
                cached=cached, to_embed=[t for t in pieces.texts if t not in cached],
                texts_per_s=settings.EMBED_EXPECTED_TEXTS_PER_S,
                gpu_hourly_usd=settings.GPU_HOURLY_USD,
                cache_name=cache.describe() if cache is not None else "")
    if dim is None:
        plan.notes.append("the dimension is learned from the first batch (no probe request)")
    return plan
