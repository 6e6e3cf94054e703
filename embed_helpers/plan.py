"""Before paying for a GPU hour: count what a run would do, and what it would cost.

`make_plan` runs the first steps (`steps.py`) over the whole input: rows already stored
unchanged, long texts and their chunks, cached texts, and the texts and requests left to
pay for, with a time and cost estimate. The plan knows its target, so a notebook passes
the table and its columns once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

from . import metadata, steps, storage, sync
from .identity import Identity
from .pieces import Pieces
from .provenance import Provenance
from .resilient import BatchSizer
from .sequence import BatchCutter, batch_size
from .steps import Rows, Target
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
    price_per_1m: tuple[float, str] | None = None   # (USD per 1M tokens, its source)
    cache_name: str = ""
    probe_texts: int = 0          # texts the probe paid for (now cached)
    runs: int = 0                 # times `run_plan` carried it out
    notes: list[str] = field(default_factory=list)
    batch_rows: list = field(default_factory=list)   # EMBED_HOSTED_MODE=batch (`batch_api`)
    provenance: Provenance | None = None   # what makes the vectors, recorded on the table
    reembed: object = None        # a `reembed.Reembed` when the plan fills a shadow table
    meta_changed: list[int] = field(default_factory=list)  # rows stored unchanged but their
    #   source or metadata: updated, nothing embedded
    sync_scope: "sync.Scope | None" = None    # EMBED_SYNC: what the sync may delete
    sync_count: "sync.SyncCount | None" = None
    force_delete: bool = False

    @cached_property
    def annotations(self) -> dict[str, tuple]:
        """id -> (source, metadata) of the rows, for the writes (`steps.write`)."""
        return self.rows.annotations()

    def batches(self) -> list[list[str]]:
        """The requests the run will send (before any split the server asks for)."""
        cutter = BatchCutter(self.pieces, self.window, BatchSizer(self.batch_size))
        cutter.add(self.to_embed)
        return list(iter(cutter.next, []))

    @property
    def requests(self) -> int:
        return len(self.batches())

    @property
    def est_seconds(self) -> float | None:
        if not self.to_embed:
            return 0.0
        return len(self.to_embed) / self.texts_per_s if self.texts_per_s else None

    @property
    def tokens_to_embed(self) -> int:
        """Tokens of the texts to embed, as the window counts them (exact or estimated)."""
        return sum(self.pieces.token_counts(self.to_embed, self.window)) if self.to_embed else 0

    @property
    def est_token_cost_usd(self) -> float | None:
        return None if self.price_per_1m is None else self.tokens_to_embed / 1e6 * self.price_per_1m[0]

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
            *([("rows whose metadata changed (updated, nothing embedded)", len(self.meta_changed))]
              if self.target.annotated else []),
            *(sync.plan_lines(self.sync_count, self.sync_scope) if self.sync_count else []),
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
        if self.price_per_1m is not None:
            how = "" if self.window.exact else ", estimated"
            rows.append((f"estimated cost at ${self.price_per_1m[0]}/1M tokens "
                         f"({self.price_per_1m[1]})",
                         f"${self.est_token_cost_usd:.4f} ({self.tokens_to_embed:,} tokens{how})"))
        return rows + self.batch_rows

    def __str__(self) -> str:
        width = max(len(k) for k, _ in self.as_rows())
        lines = [f"{k:<{width}}  {v}" for k, v in self.as_rows()]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def make_plan(rows: Rows, target: Target, *, conn, backend, cache, settings,
              dim: int | None, dim_source: str = "") -> Plan:
    """Count unchanged rows, long texts, cached texts and texts to embed; touch nothing."""
    window = backend.window
    storage.check_table(conn, target.table, settings.EMBED_STORAGE)  # before anything is paid
    policy = settings.EMBED_LONG_TEXTS
    todo, unchanged, stored_ids = steps.drop_unchanged(conn, target, rows, window, policy)
    meta_changed = metadata_changes(conn, target, rows, todo) if target.annotated else []
    work = rows.take(todo)
    pieces = Pieces(work.ids, work.texts, window, policy, settings.EMBED_CHUNK_OVERLAP)
    identity = backend.identity(dim)
    cached = steps.in_cache(cache, identity, pieces.texts)
    plan = Plan(target=target, rows=rows, todo=todo, rows_unchanged=unchanged - len(meta_changed),
                meta_changed=meta_changed,
                stored_ids=stored_ids, pieces=pieces, identity=identity,
                dim_source=dim_source, window=window,
                batch_size=batch_size(settings, backend),
                cached=cached, to_embed=[t for t in pieces.texts if t not in cached],
                texts_per_s=settings.EMBED_EXPECTED_TEXTS_PER_S,
                gpu_hourly_usd=settings.GPU_HOURLY_USD, price_per_1m=backend.price_per_1m_tokens,
                cache_name=cache.describe() if cache is not None else "")
    if settings.EMBED_HOSTED_MODE == "batch":
        from .batch_api.mode import plan_rows
        plan.batch_rows = plan_rows(plan, backend, cache, settings)
    if dim is None:
        plan.notes.append("the dimension is learned from the first batch (no probe request)")
    return plan


def metadata_changes(conn, target: Target, rows: Rows, todo: list[int]) -> list[int]:
    """Positions of the rows stored with the same text whose source or metadata differ: a
    change to metadata alone rewrites the row without embedding anything."""
    writing = set(todo)
    same = [i for i in range(len(rows.ids)) if i not in writing]
    found = metadata.stored(conn, target.table, target.id_col, [rows.ids[i] for i in same])
    notes = rows.annotations()
    return [i for i in same if metadata.differs(found.get(rows.ids[i]),
                                                      *notes.get(rows.ids[i], (None, None)))]
