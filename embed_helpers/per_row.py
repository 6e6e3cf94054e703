"""Step 9, the original loop (one request per text, one commit per row), and the check
that it and Step 9b give the same vectors and the same search results.

Step 9 stays as the notebook's baseline and the benchmarks': it prepares rows exactly as
Step 9b does (`workflow.rows_of`, the same Pieces), so the two can be set side by side.
"""
from __future__ import annotations

import time

import numpy as np

from . import db, retrieval
from .backends import Backend
from .config import Settings
from .pieces import Pieces, mean_vector
from .report import RunReport
from .steps import Target
from .workflow import rows_of


def pieces_for(ids, texts, backend: Backend, settings: Settings) -> Pieces:
    return Pieces(list(ids), list(texts), backend.window, settings.EMBED_LONG_TEXTS,
                  settings.EMBED_CHUNK_OVERLAP)


def one_by_one(backend: Backend, pieces: Pieces, row: int) -> tuple[np.ndarray, list]:
    """Step 9's vector of one row: one request per chunk, chunks averaged like Step 9b."""
    text = pieces.row_texts[row]
    spans = pieces.spans[row]
    vectors = np.stack([backend.embed_batch([text[s:e]])[0] for s, e in spans])
    if len(spans) == 1:
        return vectors[0], []
    return mean_vector(vectors), [(pieces.ids[row], k, s, e, vectors[k])
                                  for k, (s, e) in enumerate(spans)]


def ingest_per_row(df, target: Target, *, settings: Settings, conn, backend: Backend,
                   progress: bool = True) -> RunReport:
    """Step 9, the original loop: one request per text (per chunk of a long text), one
    INSERT and one commit per row. Kept as the alternate and as the benchmarks' baseline;
    it prepares rows exactly as Step 9b does, so the two agree."""
    from tqdm import tqdm

    rows = rows_of(df, target)
    pieces = pieces_for(rows.ids, rows.texts, backend, settings)
    report = RunReport(table=target.table, backend=settings.EMBEDDING_BACKEND, model=backend.model,
                       route=backend.route, batch_size=1, rows_read=rows.rows_read,
                       rows_empty=len(rows.empty_ids), empty_ids=rows.empty_ids,
                       rows_duplicate=rows.duplicate_ids)
    start, spans, dead = time.perf_counter(), [], {r for r, _ in pieces.failed}
    for row in tqdm([r for r in range(len(rows.ids)) if r not in dead], desc="Step 9",
                    unit="row", disable=not progress):
        t0 = time.perf_counter() - start
        vector, chunks = one_by_one(backend, pieces, row)
        spans.append((t0, time.perf_counter() - start))
        if not report.dim:
            report.dim = len(vector)
            db.create_table(conn, target.table, target.id_col, target.text_col, report.dim,
                            settings.EMBED_STORAGE)
        db.insert_one(conn, target.table, target.id_col, target.text_col, rows.ids[row],
                      rows.texts[row], vector, chunks)
        report.rows_written += 1
        report.texts_embedded += len(pieces.spans[row])
        report.requests += len(pieces.spans[row])
    report.finish_timing(time.perf_counter() - start, spans, [])
    return report


def parity_check(conn, backend: Backend, df, target: Target, settings: Settings, *,
                 sample: int = 5, query: str | None = None) -> dict:
    """Step 9 and Step 9b give the same vectors: embed a sample one text (one chunk) per
    request, as Step 9 does, and compare with what Step 9b stored (within 1e-4; halfvec
    keeps 11 significant bits, so a unit vector's components may also round by 2^-11),
    and the top results."""
    rows = rows_of(df, target)
    pieces = pieces_for(rows.ids[:sample], rows.texts[:sample], backend, settings)
    stored = db.fetch_vectors(conn, target.table, target.id_col, pieces.ids)
    single = {pieces.ids[r]: one_by_one(backend, pieces, r)[0] for r in range(len(pieces.ids))}
    diff = max(float(np.max(np.abs(stored[i] - v))) for i, v in single.items() if i in stored)
    query = query or rows.texts[0][:200]
    q_single = backend.embed_batch([query])[0]
    q_batched = backend.embed_batch([query, *rows.texts[1:sample]])[0]
    top = [[h[0] for h in retrieval.search(conn, target.table, target.id_col, target.text_col, q, 3)]
           for q in (q_single, q_batched)]
    tolerance = 1e-4 + (2.0 ** -11 if settings.EMBED_STORAGE == "halfvec" else 0.0)
    return {"rows_compared": len(single), "same_vectors": diff < tolerance,
            "same_top3": top[0] == top[1]}
