"""The notebook's steps as functions, shared with the CLI so both run the same code."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import db
from .backends import Backend
from .batching import embed_resilient
from .cache import EmbeddingCache
from .config import Settings
from .constants import RUNS_DIR, project_path
from .errors import ConfigError
from .pipeline import Target, run_plan
from .plan import Plan, make_plan, prepare_input
from .report import RunReport

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

PROBE_TEXT = "embedding dimension probe"


@dataclass
class RawInput:
    """Step 3's output: six Synthea tables, or one CSV's id and text columns."""

    tables: dict[str, pd.DataFrame]
    id_col: str
    text_col: str
    as_of: datetime | None = None  # Synthea: ages count to the full data set's latest date

    def row_counts(self) -> dict[str, int]:
        return {name: len(df) for name, df in self.tables.items()}


def load_raw(path, id_col: str | None = None, text_col: str | None = None,
             limit: int | None = None) -> RawInput:
    """Step 3: a Synthea folder (first `limit` patients) or a CSV file (first `limit` rows)."""
    from . import data  # pandas: only for Steps 3-5, never for a CSV ingest from the CLI

    folder = project_path(path)
    if folder.is_dir():
        tables = data.load_synthea(folder)
        as_of = data.reference_date(tables)
        if limit:
            tables = data._first_patients(tables, limit)
        return RawInput(tables, data.CONTEXT_ID, data.CONTEXT_TEXT, as_of)
    df, id_col, text_col = data.load_input(folder, id_col, text_col, limit)
    return RawInput({"rows": df}, id_col, text_col)


def clean_raw(raw: RawInput) -> RawInput:
    """Step 4: Synthea tables cleaned (dates, whitespace, unknown patients); CSV as is."""
    if raw.as_of is None:
        return raw
    from . import data
    return RawInput(data.clean_synthea(raw.tables), raw.id_col, raw.text_col, raw.as_of)


def build_rows(raw: RawInput) -> tuple[pd.DataFrame, str, str]:
    """Step 5: one (id, text) row per patient or per CSV row."""
    if raw.as_of is None:
        return raw.tables["rows"], raw.id_col, raw.text_col
    from . import data
    return data.build_contexts(raw.tables, as_of=raw.as_of), raw.id_col, raw.text_col


def open_cache(settings: Settings) -> EmbeddingCache:
    """The one cache file of this project (absolute path), announced with its size."""
    cache = EmbeddingCache(settings.EMBED_CACHE_PATH)
    log.info("embedding cache %s: %d entries", cache.path, len(cache))
    return cache


def discover_dimension(settings: Settings, backend: Backend, conn=None,
                       table: str | None = None) -> int:
    """Step 6: the dimension of the vectors, without paying for a request when it is known.

    EMBEDDING_DIM when set, else the existing table's dimension, else one probe request.
    Every batch is checked against it before anything is written, so a wrong
    EMBEDDING_DIM stops the run at its first batch with a message saying what to set.
    """
    if settings.EMBEDDING_DIM:
        return settings.EMBEDDING_DIM
    known = db.table_dimension(conn, table) if conn is not None and table else None
    if known:
        return known
    if settings.EMBED_CACHE_ONLY:
        raise ConfigError("EMBEDDING_DIM", "is needed with EMBED_CACHE_ONLY=1 when the table "
                                           "does not exist yet (no probe request is sent).")
    return int(backend.embed_batch([PROBE_TEXT]).shape[1])


def plan_ingest(df: pd.DataFrame, *, id_col: str, text_col: str, table: str,
                settings: Settings, conn, backend: Backend, cache: EmbeddingCache | None,
                dim: int, probe: bool = False) -> Plan:
    """Step 8: count what the run will do. `probe=True` times one real batch (and keeps
    its vectors in the cache, so the probe is not paid twice) to estimate time and cost."""
    prepared = prepare_input(df, id_col, text_col)
    resolve_route = getattr(backend, "resolve_route", None)
    if resolve_route is not None:  # the cache keys depend on it
        resolve_route()
    stored = db.stored_text_hashes(conn, table, id_col, text_col, prepared.ids) \
        if db.table_dimension(conn, table) else {}
    batch_size = min(settings.EMBED_BATCH_SIZE, backend.max_batch or settings.EMBED_BATCH_SIZE)

    def build() -> Plan:
        return make_plan(prepared, stored, route=backend.route, model=backend.model, dim=dim,
                         normalized=backend.normalized, batch_size=batch_size, cache=cache,
                         texts_per_s=settings.EMBED_EXPECTED_TEXTS_PER_S,
                         gpu_hourly_usd=settings.GPU_HOURLY_USD)
    plan = build()
    if probe and plan.to_embed and not settings.EMBED_CACHE_ONLY \
            and settings.EMBED_EXPECTED_TEXTS_PER_S is None and cache is not None:
        sample = plan.to_embed[:batch_size]
        t0 = time.perf_counter()
        vectors, failures = embed_resilient(backend, sample, expected_dim=dim)
        elapsed = time.perf_counter() - t0
        good = sorted(set(range(len(sample))) - {f.position for f in failures})
        cache.put_many([(plan.keys[sample[i]], vectors[i]) for i in good], route=backend.route,
                       model=backend.model, normalized=backend.normalized,
                       texts=[sample[i] for i in good])
        plan = build()
        plan.texts_per_s = len(sample) / elapsed if elapsed > 0 else None
    return plan


def ingest(df: pd.DataFrame, *, id_col: str, text_col: str, table: str, settings: Settings,
           conn, backend: Backend, cache: EmbeddingCache | None, dim: int | None = None,
           progress: bool = True, failures_dir: Path = RUNS_DIR) -> RunReport:
    """Step 9b: plan, then embed what is missing and write what changed."""
    dim = dim or discover_dimension(settings, backend, conn, table)
    db.create_table(conn, table, id_col, text_col, dim)
    plan = plan_ingest(df, id_col=id_col, text_col=text_col, table=table, settings=settings,
                       conn=conn, backend=backend, cache=cache, dim=dim)
    return run_plan(plan, Target(table, id_col, text_col), conn=conn, backend=backend,
                    cache=cache, settings=settings, progress=progress, failures_dir=failures_dir)


def ingest_per_row(df: pd.DataFrame, *, id_col: str, text_col: str, table: str,
                   settings: Settings, conn, backend: Backend, progress: bool = True) -> RunReport:
    """Step 9, the original loop: one request, one INSERT and one commit per row.

    Kept as the alternate and as the baseline the benchmarks compare against.
    """
    from tqdm import tqdm

    prepared = prepare_input(df, id_col, text_col)
    report = RunReport(table=table, backend=settings.EMBEDDING_BACKEND, model=backend.model,
                       route=backend.route, batch_size=1, rows_read=prepared.rows_read,
                       rows_empty=len(prepared.empty_ids), empty_ids=prepared.empty_ids,
                       rows_duplicate=prepared.duplicate_ids)
    start = time.perf_counter()
    spans = []
    for row_id, text in tqdm(list(zip(prepared.ids, prepared.texts)), desc="Step 9",
                             unit="row", disable=not progress):
        t0 = time.perf_counter() - start
        vector = backend.embed_batch([text])[0]
        spans.append((t0, time.perf_counter() - start))
        if not report.dim:
            report.dim = len(vector)
            db.create_table(conn, table, id_col, text_col, report.dim)
        db.insert_one(conn, table, id_col, text_col, row_id, text, vector)
        report.rows_written += 1
        report.texts_embedded += 1
        report.requests += 1
    report.finish_timing(time.perf_counter() - start, spans, [])
    return report


def parity_check(conn, backend: Backend, df: pd.DataFrame, *, table: str, id_col: str,
                 text_col: str, sample: int = 5, query: str | None = None) -> dict:
    """Step 9 and Step 9b give the same vectors: embed a sample one text per request
    (as Step 9 does) and compare with what Step 9b stored, and the top search results."""
    rows = df.dropna(subset=[text_col]).drop_duplicates(id_col, keep="last").head(sample)
    stored = db.fetch_vectors(conn, table, id_col, rows[id_col].astype(str))
    single = {str(i): backend.embed_batch([t])[0] for i, t in zip(rows[id_col], rows[text_col])}
    diff = max(float(np.max(np.abs(stored[i] - v))) for i, v in single.items() if i in stored)
    query = query or rows[text_col].iloc[0][:200]
    q_single = backend.embed_batch([query])[0]
    q_batched = backend.embed_batch([query, *rows[text_col].iloc[1:].tolist()])[0]
    top_single = [h[0] for h in db.search(conn, table, id_col, text_col, q_single, 3)]
    top_batched = [h[0] for h in db.search(conn, table, id_col, text_col, q_batched, 3)]
    return {"rows_compared": len(single), "max_abs_diff_below_1e-4": diff < 1e-4,
            "same_top3": top_single == top_batched}


def semantic_search(conn, backend: Backend, table: str, id_col: str, text_col: str,
                    query: str, k: int = 3) -> list[tuple[str, float, str]]:
    """Embed `query` with the same backend and return the k nearest rows."""
    vector = np.asarray(backend.embed_batch([query])[0], dtype=np.float32)
    return db.search(conn, table, id_col, text_col, vector, k)


__all__ = ["RawInput", "load_raw", "clean_raw", "build_rows", "open_cache", "discover_dimension",
           "plan_ingest", "ingest", "ingest_per_row", "parity_check", "semantic_search"]
