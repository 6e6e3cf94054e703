"""Long texts: EMBED_LONG_TEXTS=truncate versus chunk, by recall of last-sentence queries.

    .venv/bin/python bench/long_texts.py            # 900 shared abstracts (2.5 min, 2 cores)
    .venv/bin/python bench/long_texts.py --quick    # 150 abstracts (under a minute)

The local backend (the bundled all-MiniLM-L6-v2, on CPU) reads 254 tokens of a text. For
every abstract longer than that, the query is its last sentence (with the one before when it
is a fragment of under six words) and the
answer is that abstract: a truncated row never saw that sentence. Both modes ingest the same
rows with `workflow.ingest` (each with a fresh cache file), and recall@10 is counted with
`retrieval.search` (a chunked row is ranked by its best chunk); for the chunk table also
with the row vectors alone (the normalised mean of the chunks). The model is loaded before
anything is timed (the queries are embedded first). A third run sends the same rows through
a loopback server that serves that model as infinity does (`model_server.py`: it reads 256
word pieces of each input and says nothing), with no EMBED_MAX_INPUT_TOKENS: the window is
measured (one request) and the rows chunked to it. Database and state: bench/common.py.
"""
from __future__ import annotations

import argparse
import re
import time

import numpy as np
import pandas as pd
from psycopg2 import sql

from common import (PUBMED_SAMPLE, PUBMED_SHARED, SHARED_DATA, Workspace, print_header,
                    print_table)
from model_server import MODEL_ID, ModelServer

from embed_helpers import retrieval
from embed_helpers.backends import get_backend
from embed_helpers.cache.tools import open_cache
from embed_helpers.constants import SAMPLE_DIR
from embed_helpers.steps import Target
from embed_helpers.data import load_input
from embed_helpers.workflow import ingest

K = 10
TARGET = 0.92   # recall@10 with chunks, at least


#: A sentence ends at . ! or ? followed by a capital (so "S. aureus" is not split).
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\[(])")
MIN_QUERY_WORDS = 6


def last_sentence(text: str) -> str:
    """The last sentence, with the one before it when it is a fragment of a few words."""
    sentences = [s for s in SENTENCE_END.split(text.strip()) if s.strip()]
    query, k = sentences[-1], len(sentences) - 1
    while len(query.split()) < MIN_QUERY_WORDS and k > 0:
        k -= 1
        query = f"{sentences[k]} {query}"
    return query


def token_stats(name: str, texts: list[str], window) -> list:
    counts = np.array(window.counter.count(texts))
    over = int((counts > window.max_tokens).sum())
    return [name, len(texts), over, f"{over / len(texts):.1%}", f"{np.median(counts):.0f}",
            f"{np.percentile(counts, 90):.0f}", int(counts.max())]


def row_vectors_only(conn, table: str, vector: np.ndarray) -> list[str]:
    """The nearest rows by their row vector alone (for chunked rows: the normalised mean of
    the chunks), ignoring the chunks table."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT pmid FROM {t} WHERE embedding IS NOT NULL "
                            "ORDER BY embedding <=> %s LIMIT {k}").format(
            t=sql.Identifier(table), k=sql.Literal(K)), (vector,))
        ids = [r[0] for r in cur.fetchall()]
    conn.rollback()
    return ids


def recall(found: list[list[str]], answers: list[str]) -> float:
    return sum(a in f for f, a in zip(found, answers)) / len(answers)


def run_mode(ws: Workspace, backend, frame: pd.DataFrame, mode: str,
             served: str = "") -> tuple[str, dict]:
    """One ingest; `served`: through that OpenAI-compatible URL (llm_api), not in process."""
    table = f"bench_long_{mode}{'_served' if served else ''}"
    ws.drop(table)
    over_http = dict(EMBEDDING_BACKEND="llm_api", OPENAI_BASE_URL=served,
                     OPENAI_EMBED_MODEL=MODEL_ID) if served else dict(EMBEDDING_BACKEND="local")
    settings = ws.settings(f"{table}.jsonl", EMBED_LONG_TEXTS=mode, EMBED_CHUNK_OVERLAP=32,
                           **over_http)
    client = get_backend(settings) if served else backend
    with open_cache(settings) as cache:
        start = time.perf_counter()
        report = ingest(frame, Target(table, "pmid", "text"), settings=settings, conn=ws.conn,
                        backend=client, cache=cache, progress=False)
        wall = time.perf_counter() - start
    if served:
        client.close()
    assert report.rows_written == len(frame) and not report.rows_failed, report
    return table, {"report": report, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="150 abstracts of the sample")
    args = parser.parse_args()
    if args.quick or not PUBMED_SHARED.is_file():
        csv, n = PUBMED_SAMPLE, 150
        note = "data: the first 150 abstracts of data/sample/pubmed/abstracts.csv" + (
            " (--quick)" if args.quick else " (../shared/data/pubmed_abstracts is absent)")
    else:
        csv, n = PUBMED_SHARED, 900
        note = "data: the first 900 abstracts of ../shared/data/pubmed_abstracts/abstracts.csv"
    synthea = SHARED_DATA / "synthea"
    synthea_note = "../shared/data/synthea" if (synthea / "patients.csv").is_file() else \
        "data/sample/synthea (../shared/data/synthea is absent)"
    synthea = synthea if (synthea / "patients.csv").is_file() else SAMPLE_DIR / "synthea"
    frame = pd.read_csv(csv, dtype=str).head(n)
    texts = frame["text"].tolist()
    with Workspace() as ws:
        print_header("Long texts: truncate versus chunk", [
            note, f"Synthea contexts: {synthea_note}", ws.describe(),
            "backend: local (bundled all-MiniLM-L6-v2, CPU), EMBED_BATCH_SIZE 64, "
            "EMBED_CHUNK_OVERLAP=32"])
        backend = get_backend(ws.settings(EMBEDDING_BACKEND="local"))
        window = backend.window
        counts = window.counter.count(texts)
        long = [i for i, c in enumerate(counts) if c > window.max_tokens]
        queries = [last_sentence(texts[i]) for i in long]
        answers = [frame["pmid"].iloc[i] for i in long]
        start = time.perf_counter()
        vectors = backend.embed_batch(queries)   # loads the model: not part of the runs' time
        load = time.perf_counter() - start
        contexts, _id, text_col = load_input(synthea)
        print(f"window: {window.describe()}; model load and {len(queries)} queries embedded in "
              f"{load:.1f} s (before the runs)\n")
        print_table(["texts", "count", f"over the {window.max_tokens}-token window",
                     "share over", "median tokens", "p90 tokens", "max tokens"],
                    [token_stats("PubMed abstracts (this run)", texts, window),
                     token_stats("Synthea patient contexts", contexts[text_col].tolist(), window)])
        runs, rows = {}, []
        try:
            with ModelServer(backend) as server:
                for mode, served in (("truncate", ""), ("chunk", ""), ("served", server.url)):
                    table, runs[mode] = run_mode(ws, backend, frame, mode.replace("served", "chunk"),
                                                 served)
                    runs[mode]["table"] = table
                    runs[mode]["search"] = [
                        [h[0] for h in retrieval.search(ws.conn, table, "pmid", "text", v, K)]
                        for v in vectors]
            rows_only = [row_vectors_only(ws.conn, runs["chunk"]["table"], v) for v in vectors]
            for mode, label in (("truncate", "truncate"),
                                ("chunk", "chunk (best chunk ranks a row)"),
                                ("served", "chunk, via a silently truncating server (window "
                                           "measured)")):
                r = runs[mode]["report"]
                rows.append([label, r.long_texts.get("over", 0), r.long_texts.get("chunks", 0)
                             if mode != "truncate" else "", r.texts_embedded, r.requests, f"{runs[mode]['wall']:.1f}",
                             f"{recall(runs[mode]['search'], answers):.3f}"])
            rows.append(["chunk table, row vectors only (mean of chunks)", "", "", "", "", "",
                         f"{recall(rows_only, answers):.3f}"])
        finally:
            for run in runs.values():
                ws.drop(run.get("table", ""))
        print(f"{len(queries)} queries: the last sentence of each abstract over the window; "
              f"recall@{K}: the share whose abstract is among the {K} results.\n")
        print_table(["mode", "texts over the window", "chunks made", "texts embedded",
                     "requests", "wall s", f"recall@{K}"], rows)
        chunk = recall(runs["chunk"]["search"], answers)
        served = recall(runs["served"]["search"], answers)
        print(f"target: recall@{K} with chunks >= {TARGET}: "
              f"{'met' if chunk >= TARGET else 'MISSED'} ({chunk:.3f}; truncate "
              f"{recall(runs['truncate']['search'], answers):.3f}; via the truncating server "
              f"{served:.3f}, window: {runs['served']['report'].long_texts.get('origin')})")


if __name__ == "__main__":
    main()
