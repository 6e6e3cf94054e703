"""One core under every face: `batch_embed` and Step 9b run the same block steps, so on the
same input they send the same requests, store the same cache entries and give the same
vectors."""
from __future__ import annotations

import numpy as np
import pandas as pd
from fake_server import FakeEmbeddingServer

from embed_helpers import db
from embed_helpers.backends import get_backend
from embed_helpers.texts import batch_embed
from embed_helpers.cache.jsonl import EmbeddingCache
from embed_helpers.steps import Target
from embed_helpers.workflow import ingest

DIM = 24
LONG = " ".join(f"Sentence {n} of a long discharge summary about treatment {n % 4}."
                for n in range(40))
TEXTS = [f"note {i} about visit {i % 9}" for i in range(57)] + ["note 3 about visit 3", LONG, "  "]


def entries(path):
    return {e["key"]: e["vector"].tobytes() for e in EmbeddingCache(path, read_only=True).entries()}


def test_batch_embed_and_step_9b_send_store_and_return_the_same(make_settings, conn, table,
                                                                tmp_path):
    settings = dict(EMBEDDING_BACKEND="ollama", EMBED_BATCH_SIZE=8, EMBED_MAX_INPUT_TOKENS=80,
                    EMBED_MAX_CONCURRENCY=2)
    with FakeEmbeddingServer(DIM) as one, FakeEmbeddingServer(DIM) as two:
        faces = make_settings(OLLAMA_HOST=one.url, EMBED_CACHE_PATH=tmp_path / "a.jsonl",
                              **settings)
        with get_backend(faces) as backend, EmbeddingCache(tmp_path / "a.jsonl") as cache:
            result = batch_embed(TEXTS, backend, cache=cache, on_failure="return")
        step9b = make_settings(OLLAMA_HOST=two.url, EMBED_CACHE_PATH=tmp_path / "b.jsonl",
                               **settings)
        df = pd.DataFrame({"id": [str(i) for i in range(len(TEXTS))], "text": TEXTS})
        with get_backend(step9b) as backend, EmbeddingCache(tmp_path / "b.jsonl") as cache:
            report = ingest(df, Target(table, "id", "text"), settings=step9b, conn=conn,
                            backend=backend, cache=cache, progress=False)
        assert one.total_requests() == two.total_requests() == result.requests == report.requests
        assert sorted(t for b in one.bodies for t in b["input"]) == \
            sorted(t for b in two.bodies for t in b["input"])
    assert entries(tmp_path / "a.jsonl") == entries(tmp_path / "b.jsonl")
    assert result.texts_embedded == report.texts_embedded
    stored = db.fetch_vectors(conn, table, "id", df.id)
    assert len(stored) == len(TEXTS) - 1  # the blank text is skipped by both
    for i, text in enumerate(TEXTS[:-1]):
        np.testing.assert_array_equal(stored[str(i)], result.vectors[i])
    assert [f.position for f in result.failures] == [len(TEXTS) - 1]
    assert report.empty_ids == [str(len(TEXTS) - 1)]
