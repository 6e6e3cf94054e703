"""`Embedder`: code that embeds one text at a time gets batches, the cache and the retries
of every other driver. Against the fake `ollama-gpu` server (one slot, 12 ms a request)."""
from __future__ import annotations

import asyncio
import math
import threading

import numpy as np
import pytest
from fake_server import PROFILES, FakeEmbeddingServer, expected_vector

from embed_helpers.backends import get_backend
from embed_helpers.texts import batch_embed
from embed_helpers.cache.store import MemoryStore
from embed_helpers.embedder import Embedder
from embed_helpers.errors import EmbeddingFailures

DIM, BATCH = 32, 64
PAPERS = [[f"entity {n} of paper {p}" if n % 5 else f"shared entity {n}" for n in range(50)]
          for p in range(20)]


async def knowledge_graph(embedder: Embedder, papers: list[list[str]], concurrent: int = 4):
    """The pipeline of the GUIDE's example: papers under a semaphore, one call per entity."""
    sem = asyncio.Semaphore(concurrent)

    async def one_paper(entities):
        async with sem:
            return await asyncio.gather(*(embedder.aembed(e) for e in entities))
    return await asyncio.gather(*(one_paper(p) for p in papers))


@pytest.fixture
def server():
    with FakeEmbeddingServer(DIM, PROFILES["ollama-gpu"]) as s:
        yield s


@pytest.fixture
def settings_for(make_settings, server):
    return lambda **extra: make_settings(EMBEDDING_BACKEND="ollama", OLLAMA_HOST=server.url,
                                         EMBED_BATCH_SIZE=BATCH, **extra)


def test_per_entity_calls_go_in_batches_match_batch_embed_and_rerun_free(server, settings_for):
    settings, cache = settings_for(), MemoryStore()
    with Embedder(settings, cache=cache) as embedder:
        vectors = asyncio.run(knowledge_graph(embedder, PAPERS))
        stats = embedder.stats()
    calls = sum(len(p) for p in PAPERS)
    assert stats["calls"] == calls == 1000
    assert server.total_requests() <= math.ceil(calls / BATCH) + 20
    assert stats["requests"] == server.total_requests() and stats["mean_batch_size"] > 1
    with get_backend(settings) as backend:
        expected = batch_embed([e for p in PAPERS for e in p], backend).vectors
    got = np.stack([v for paper in vectors for v in paper])
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(got[0], expected_vector(PAPERS[0][0], DIM), atol=1e-6)
    server.reset()
    with Embedder(settings, cache=cache) as again:  # a second pass: all from the cache
        asyncio.run(knowledge_graph(again, PAPERS))
        assert again.stats()["cache_hits"] > 0
    assert server.total_requests() == 0


def test_one_poison_text_fails_only_its_own_caller(server, settings_for):
    texts = [f"name {i}" for i in range(1000)]
    server.poison = {texts[417]}

    async def each():
        with Embedder(settings_for(), cache=None) as embedder:
            return await asyncio.gather(*(embedder.aembed(t) for t in texts),
                                        return_exceptions=True)
    results = asyncio.run(each())
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [417]
    assert isinstance(results[417], EmbeddingFailures) and "name 417" in str(results[417])
    np.testing.assert_allclose(results[0], expected_vector(texts[0], DIM), atol=1e-6)


def test_the_cache_only_brake_sends_nothing_and_names_each_miss(server, settings_for):
    cache = MemoryStore()
    with Embedder(settings_for(), cache=cache) as warm:
        warm.embed("known entity")
    server.reset()
    with Embedder(settings_for(EMBED_CACHE_ONLY=1), cache=cache) as braked:
        np.testing.assert_array_equal(braked.embed("known entity"),
                                      expected_vector("known entity", DIM))
        for text in ("new entity a", "new entity b"):
            with pytest.raises(EmbeddingFailures, match=f"{text}.*EMBED_CACHE_ONLY"):
                braked.embed(text)
    assert server.total_requests() == 0


def test_threads_and_langchain_faces(server, settings_for):
    """`embed` is thread-safe; the LangChain `Embeddings` methods give lists of floats."""
    out: dict[int, np.ndarray] = {}
    with Embedder(settings_for(), cache=None) as embedder:
        threads = [threading.Thread(target=lambda i=i: out.update({i: embedder.embed(f"t{i}")}))
                   for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        docs = embedder.embed_documents(["a", "b"])
        query = embedder.embed_query("a")
        adocs = asyncio.run(embedder.aembed_documents(["a"]))
        aquery = asyncio.run(embedder.aembed_query("b"))
    assert sorted(out) == list(range(40)) and server.total_requests() < 40
    assert isinstance(docs, list) and isinstance(docs[0], list) and isinstance(docs[0][0], float)
    assert docs[0] == query == adocs[0] and docs[1] == aquery
    with Embedder(settings_for(), cache=None) as embedder, \
            pytest.raises(EmbeddingFailures, match="empty text"):
        embedder.embed("   ")


def test_the_embedder_learns_a_silent_servers_window_and_chunks_like_batch_embed(
        make_settings):
    """The window is settled before a batch is cut, as for every other driver: a server
    that cuts at 64 tokens without saying so is measured once, and a long text is chunked."""
    with FakeEmbeddingServer(DIM, truncate_at=64, known_models={"acme"}) as server:
        settings = make_settings(EMBEDDING_BACKEND="llm_api", OPENAI_BASE_URL=server.openai_url,
                                 OPENAI_EMBED_MODEL="acme", EMBED_CHUNK_OVERLAP=4)
        long = " ".join(f"Finding {n} of the note is stable." for n in range(40))
        with Embedder(settings, cache=MemoryStore()) as embedder:
            vector = embedder.embed(long)
            assert embedder.backend.window.origin == "measured"
        sent = [t for body in server.bodies for t in body["input"]]
        with get_backend(settings) as backend:
            expected = batch_embed([long], backend, cache=MemoryStore()).vectors[0]
    assert long not in sent[-3:] and len(sent) > 3  # the text went in chunks, not whole
    np.testing.assert_allclose(vector, expected, atol=1e-6)
