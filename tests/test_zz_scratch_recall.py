import pandas as pd
from embed_helpers import retrieval
from embed_helpers.backends import get_backend
from embed_helpers.steps import Target
from embed_helpers.workflow import ingest, open_cache
from test_integration import SHARED_ABSTRACTS, last_sentence

def test_scratch(make_settings, conn, table):
    for n in (200, 300):
        abstracts = pd.read_csv(SHARED_ABSTRACTS, dtype=str).head(n)
        settings = make_settings(EMBED_BATCH_SIZE=64, EMBED_CACHE_PATH="/tmp/scratch-cache.jsonl")
        backend = get_backend(settings)
        t = f"{table}_{n}"
        target = Target(t, "pmid", "text")
        report = ingest(abstracts, target, settings=settings, conn=conn, backend=backend,
                        cache=open_cache(settings), progress=False)
        window = backend.window
        counts = window.counter.count(list(abstracts.text))
        long = [row for row, c in zip(abstracts.itertuples(), counts) if c > window.max_tokens]
        queries = backend.embed_batch([last_sentence(row.text) for row in long])
        found = sum(row.pmid in [hit[0] for hit in retrieval.search(conn, t, "pmid", "text", q, 10)]
                    for row, q in zip(long, queries))
        print("N", n, "over", report.long_texts["over"], "long", len(long), "found", found, found / len(long))
