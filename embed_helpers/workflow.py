"""The notebook's steps as functions, shared with the CLI so both run the same code."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np

from . import steps, db, metadata, provenance, reembed, retrieval, sync, windows
from .backends import Backend
from .cache.tools import open_cache
from .config import Settings, column_names
from .constants import project_path
from .errors import ConfigError, DataError
from .pieces import Pieces
from .plan import Plan, make_plan
from .report import RunReport
from .resilient import Dimension
from .sequence import EmbedSequence
from .storage import column_storage
from .steps import Target

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
             limit: int | None = None, keep=()) -> RawInput:
    """Step 3: a Synthea folder (first `limit` patients) or a CSV file (first `limit` rows),
    with the `keep` columns (KEEP_COLS) and each row's file (for sync)."""
    from . import data  # pandas: only for Steps 3-5, never for a CSV ingest from the CLI

    folder = project_path(path)
    if data.is_synthea(folder):  # else a CSV or Parquet file or a folder of them
        tables = data.load_synthea(folder)
        as_of = data.reference_date(tables)
        if limit:
            tables = data.first_patients(tables, limit)
        return RawInput(tables, data.CONTEXT_ID, data.CONTEXT_TEXT, as_of)
    df, id_col, text_col = data.load_input(folder, id_col, text_col, limit,
                                           keep=column_names(keep), with_source=True)
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


def discover_dimension(settings: Settings, backend: Backend, conn=None, table: str | None = None,
                       cache=None) -> int:
    """Step 6: the dimension of the vectors, without paying for a request when it is known.

    EMBEDDING_DIM when set, else the existing table's, else the one the cache holds for
    this model, else one probe request. Every batch is checked against it before anything
    is written, so a wrong EMBEDDING_DIM stops the run at its first batch with a message
    saying what to set. (The CLI skips the probe: it learns from its first batch.)
    """
    dim, _source = steps.known_dimension(settings, backend.identity(), conn=conn, table=table,
                                        cache=cache)
    if dim:
        return dim
    if settings.EMBED_CACHE_ONLY:
        raise ConfigError("EMBEDDING_DIM", "is needed with EMBED_CACHE_ONLY=1 when the table "
                                           "does not exist yet (no probe request is sent).")
    return int(backend.embed_batch([PROBE_TEXT]).shape[1])


def rows_of(df, target: Target) -> steps.Rows:
    """The id and text columns of `df` (a DataFrame or a dict of columns), prepared."""
    columns = [str(c) for c in (df.columns if hasattr(df, "columns") else df)]
    missing = [c for c in (target.id_col, target.text_col) if c not in columns]
    if missing:
        raise DataError(f"Column(s) {', '.join(map(repr, missing))} not in the input. "
                        f"Columns that exist: {', '.join(columns)}. "
                        "Set ID_COL / TEXT_COL (or --id-col / --text-col).")
    return steps.prepare(list(df[target.id_col]), list(df[target.text_col]), id_col=target.id_col,
                         **metadata.input_columns(df, target, columns))


def plan_ingest(df, target: Target, *, settings: Settings, conn, backend: Backend, cache,
                dim: int | None = None, probe: bool = False, scope=None,
                force_delete: bool = False) -> Plan:
    """Step 8: count what the run will do; creates nothing. `probe=True` times one real
    batch through the embedding sequence (its vectors go to the cache, so the probe is not
    paid twice) to estimate time and cost. With EMBED_SYNC, `scope` names the input's files
    (default: those `data.load_input` read) and a sync over the brake is refused here."""
    target = sync.target_for(target, settings)
    rows = rows_of(df, target)
    if not settings.EMBED_REEMBED:  # before any request: a table of another model stops here
        provenance.check(conn, target.table,
                         provenance.Provenance.of(backend.identity(), None, settings))
    warning = windows.settle(backend, cache, rows.texts)  # the window, before any Pieces
    target, rows, job, notes = reembed.guard(conn, target, rows, backend, settings)
    source = "Step 6" if dim and job is None else ""
    if not source:
        dim, source = steps.known_dimension(settings, backend.identity(), conn=conn,
                                           table=target.table, cache=cache)
    plan = make_plan(rows, target, conn=conn, backend=backend, cache=cache, settings=settings,
                     dim=dim, dim_source=source)
    sync.prepare_plan(plan, conn, settings, df, scope, force=force_delete)  # before any payment
    if probe and plan.to_embed and not settings.EMBED_CACHE_ONLY \
            and settings.EMBED_EXPECTED_TEXTS_PER_S is None and cache is not None:
        plan = _probed(plan, conn=conn, backend=backend, cache=cache, settings=settings,
                       dim_source=source)
    plan.provenance = provenance.Provenance.of(plan.identity, plan.window, settings)
    plan.reembed, plan.notes = job, notes + plan.notes + ([warning] if warning else [])
    return plan


def _probed(plan: Plan, *, conn, backend: Backend, cache, settings: Settings,
            dim_source: str) -> Plan:
    """The plan again after one real batch, timed: its texts per second (and the dimension
    the batch said, when none was known)."""
    sample = plan.batches()[0]
    sequence = EmbedSequence(backend, cache, settings, dimension=Dimension(
        plan.identity.dim, dim_source or "the probe batch"))
    t0 = time.perf_counter()
    tally = sequence.run(Pieces(sample, sample, backend.window), _Discard(), slots=1)
    elapsed = time.perf_counter() - t0
    probed = make_plan(plan.rows, plan.target, conn=conn, backend=backend, cache=cache,
                       settings=settings, dim=sequence.dimension.value,
                       dim_source=dim_source or "the probe batch")
    probed.texts_per_s = len(sample) / elapsed if elapsed > 0 and tally.embedded else None
    probed.probe_texts = tally.embedded
    # the sync the plan counted: the probe wrote nothing, so it still holds
    probed.sync_scope, probed.sync_count = plan.sync_scope, plan.sync_count
    probed.force_delete = plan.force_delete
    return probed


class _Discard:
    """The probe's sink: its vectors are in the cache, the run will find them there."""

    def deliver(self, done) -> None:
        """Nothing to keep."""

    def fail(self, rows, failure) -> None:
        log.info("the probe batch could not embed %d text(s): %s", len(rows), failure.reason)


def run_plan(plan: Plan, *, conn, backend: Backend, cache, settings: Settings,
             progress: bool = True) -> RunReport:
    """Step 9b: carry out a plan on the engine EMBED_ENGINE names (the one place the
    engine is chosen). Without a known dimension, the table is created when the first
    batch says it (no probe request). A plan can be run again (after a failure, or to
    finish what another process left): each run starts from what is stored and cached."""
    if settings.EMBED_HOSTED_MODE == "batch":  # the Batch API fills the cache, then this
        from .batch_api.mode import run_plan_batch
        return run_plan_batch(plan, conn=conn, backend=backend, cache=cache, settings=settings,
                              progress=progress)
    if plan.runs:  # rows stored since the plan was made are not new any more
        plan.stored_ids |= set(db.stored_state(conn, plan.target.table, plan.target.id_col,
                                               plan.target.text_col, plan.target.chunks_table,
                                               plan.rows.ids))
    plan.runs += 1
    provenance.at_run(conn, plan, backend)  # another process may have written the table since
    if settings.EMBED_ENGINE == "ray":
        from .ray_engine.driver import run_plan_ray
        report = run_plan_ray(plan, settings=settings, backend=backend, cache=cache,
                              progress=progress)
    else:
        from .local_engine import run_local
        report = run_local(plan, conn=conn, backend=backend, cache=cache, settings=settings,
                           progress=progress)
    report = sync.after_run(plan, conn=conn, settings=settings, report=report)
    return reembed.finish(conn, plan, report)  # a reembed's shadow swapped in when complete


def ingest(df, target: Target, *, settings: Settings, conn, backend: Backend, cache,
           dim: int | None = None, progress: bool = True, scope=None,
           force_delete: bool = False) -> RunReport:
    """Steps 8 and 9b: plan, then embed what is missing and write what changed (and with
    EMBED_SYNC delete what left the input)."""
    plan = plan_ingest(df, target, settings=settings, conn=conn, backend=backend, cache=cache,
                       dim=dim, scope=scope, force_delete=force_delete)
    return run_plan(plan, conn=conn, backend=backend, cache=cache, settings=settings,
                    progress=progress)


def insert_rows(conn, target: Target, ids, texts, vectors: np.ndarray,
                method: str = "execute_values", storage: str | None = None) -> int:
    """The design card's insert, for rows embedded by hand (`batch_embed`): one
    transaction, keyed by id (a row already there is updated). Rows whose vector failed
    (NaN) are left out; `storage` (EMBED_STORAGE) is a new table's type, None: the
    table's own, or vector. Returns the rows written."""
    ids, texts, vectors = [str(i) for i in ids], [str(t) for t in texts], np.asarray(vectors)
    good = [i for i in range(len(ids)) if np.isfinite(vectors[i]).all()]
    if not good:
        return 0
    db.create_table(conn, target.table, target.id_col, target.text_col, vectors.shape[1],
                    storage or column_storage(conn, target.table) or "vector")
    return db.write_rows(conn, target.table, target.id_col, target.text_col,
                         [ids[i] for i in good], [texts[i] for i in good], vectors[good],
                         method=method, chunks_table=target.chunks_table)


def build_index(conn, target: Target, settings: Settings, dim: int) -> str:
    """After the load: the HNSW index as EMBED_INDEX says; returns the decision, in words."""
    build, why = retrieval.index_decision(conn, target.table, settings.EMBED_INDEX)
    if build and not retrieval.create_hnsw_index(conn, target.table, dim):
        why += " (it exists already)"
    return why


def semantic_search(conn, backend: Backend, target: Target, query: str, k: int = 3,
                    where: dict | None = None) -> list[tuple[str, float, str]]:
    """Embed `query` with the same backend and return the k nearest rows (a row split into
    chunks is ranked by its best chunk, whose text is shown); `where` filters on kept
    columns, e.g. {"year": 2020, "journal": ["BMJ", "Lancet"]} (`retrieval.search`)."""
    vector = np.asarray(backend.embed_batch([query])[0], dtype=np.float32)
    return retrieval.search(conn, target.table, target.id_col, target.text_col, vector, k,
                            where=where)


__all__ = ["RawInput", "load_raw", "clean_raw", "build_rows", "open_cache", "discover_dimension",
           "plan_ingest", "run_plan", "ingest", "insert_rows", "build_index",
           "semantic_search"]
