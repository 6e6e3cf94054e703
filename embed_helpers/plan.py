"""Before paying for a GPU hour: clean the input and count what a run would do.

`prepare_input` resolves what PostgreSQL must never see (empty texts, duplicate
ids); `make_plan` counts rows already stored unchanged, cached texts, and the
texts and requests left to pay for, with a time and cost estimate.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field

from .cache import cache_key
from .errors import DataError

log = logging.getLogger(__name__)


@dataclass
class PreparedInput:
    """Rows ready to ingest: unique ids, non-empty texts, in input order."""

    ids: list[str]
    texts: list[str]
    rows_read: int
    empty_ids: list[str] = field(default_factory=list)
    duplicate_ids: int = 0


def _missing(value) -> bool:
    """None, NaN (pandas' missing) or a text that is empty once stripped."""
    return value is None or value != value or (isinstance(value, str) and not value.strip())


def prepare_input(df, id_col: str, text_col: str) -> PreparedInput:
    """Drop empty texts (listing their ids) and resolve duplicate ids (last one wins).

    `df` is a pandas DataFrame or any mapping of column name to values.

    >>> p = prepare_input({"id": ["a", "b", "a", "c"], "t": ["x", " ", "y", None]}, "id", "t")
    >>> p.ids, p.texts, p.empty_ids, p.duplicate_ids
    (['a'], ['y'], ['b', 'c'], 1)
    """
    columns = [str(c) for c in (df.columns if hasattr(df, "columns") else df)]
    missing = [c for c in (id_col, text_col) if c not in columns]
    if missing:
        raise DataError(f"Column(s) {', '.join(map(repr, missing))} not in the input. "
                        f"Columns that exist: {', '.join(columns)}. "
                        "Set ID_COL / TEXT_COL (or --id-col / --text-col).")
    ids, texts = list(df[id_col]), list(df[text_col])
    no_id = [row for row, value in enumerate(ids) if value is None or value != value]
    if no_id:
        shown = ", ".join(map(str, no_id[:10])) + (" ..." if len(no_id) > 10 else "")
        raise DataError(f"{len(no_id)} row(s) have no id in {id_col!r} (rows {shown}). Every row "
                        "needs an id: fix the input or choose another ID_COL.")
    last: dict[str, str] = {}   # id -> text; re-inserting moves a repeated id to its last place
    empty_ids, kept = [], 0
    for row_id, text in zip(map(str, ids), texts):
        if _missing(text):
            empty_ids.append(row_id)
            continue
        kept += 1
        last.pop(row_id, None)
        last[row_id] = str(text)
    if empty_ids:
        log.warning("%d rows with empty text are not sent (ids: %s%s)", len(empty_ids),
                    ", ".join(empty_ids[:5]), " ..." if len(empty_ids) > 5 else "")
    duplicates = kept - len(last)
    if duplicates:
        log.warning("%d rows repeat an id already seen; the last one of each id wins", duplicates)
    return PreparedInput(ids=list(last), texts=list(last.values()), rows_read=len(ids),
                         empty_ids=empty_ids, duplicate_ids=duplicates)


def text_md5(text: str) -> str:
    """The hash PostgreSQL's md5(text) gives, to spot rows stored unchanged."""
    return hashlib.md5(text.encode("utf-8")).hexdigest()


@dataclass
class Plan:
    """What a run will do; `todo` are positions in `prepared` to write."""

    prepared: PreparedInput
    route: str
    model: str
    dim: int
    normalized: bool
    batch_size: int
    rows_unchanged: int
    todo: list[int]
    keys: dict[str, str]          # unique text to write -> cache key
    cached: set[str]              # texts whose vector is in the cache
    to_embed: list[str]           # unique texts to send, in first-seen order
    texts_per_s: float | None = None
    gpu_hourly_usd: float | None = None
    stored_ids: set[str] = field(default_factory=set)  # ids that had a vector at planning

    @property
    def requests(self) -> int:
        return math.ceil(len(self.to_embed) / self.batch_size)

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
            ("rows read", self.prepared.rows_read),
            ("rows with empty text (skipped)", len(self.prepared.empty_ids)),
            ("duplicate ids (last wins)", self.prepared.duplicate_ids),
            ("rows already stored unchanged", self.rows_unchanged),
            ("rows to write", len(self.todo)),
            ("unique texts to write", len(self.keys)),
            ("texts in the cache", len(self.cached)),
            ("texts to embed", len(self.to_embed)),
            (f"requests at batch size {self.batch_size}", self.requests),
            ("estimated embedding time (s)", "unknown" if est is None else round(est, 1)),
        ]
        if self.gpu_hourly_usd is not None:
            cost = self.est_cost_usd
            rows.append((f"estimated cost at ${self.gpu_hourly_usd}/h",
                         "unknown" if cost is None else f"${cost:.4f}"))
        return rows

    def __str__(self) -> str:
        width = max(len(k) for k, _ in self.as_rows())
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self.as_rows())


def make_plan(prepared: PreparedInput, stored_md5: dict[str, str], *, route: str, model: str,
              dim: int, normalized: bool, batch_size: int, cache=None,
              texts_per_s: float | None = None, gpu_hourly_usd: float | None = None) -> Plan:
    """Count unchanged rows, cached texts and texts to embed; touch nothing."""
    todo, keys = [], {}
    unchanged = 0
    for i, (row_id, text) in enumerate(zip(prepared.ids, prepared.texts)):
        if row_id in stored_md5 and stored_md5[row_id] == text_md5(text):
            unchanged += 1
            continue
        todo.append(i)
        if text not in keys:
            keys[text] = cache_key(route, model, dim, normalized, text)
    cached = {t for t, k in keys.items() if cache is not None and k in cache}
    to_embed = [t for t in keys if t not in cached]
    return Plan(prepared=prepared, route=route, model=model, dim=dim, normalized=normalized,
                batch_size=batch_size, rows_unchanged=unchanged, todo=todo, keys=keys,
                cached=cached, to_embed=to_embed, texts_per_s=texts_per_s,
                gpu_hourly_usd=gpu_hourly_usd, stored_ids=set(stored_md5))
