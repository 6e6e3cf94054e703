"""Batching above the backends, with in-process fake backends that count calls."""
import doctest
import math
import threading
from pathlib import Path

import numpy as np
import pytest
from fake_server import expected_vector

from embed_helpers import http, resilient
from embed_helpers import texts as texts_module
from embed_helpers.backends import remote
from embed_helpers.backends.base import Backend
from embed_helpers.texts import batch_embed, chunked
from embed_helpers.cache.jsonl import EmbeddingCache
from embed_helpers.cache.store import CacheStore, MemoryStore
from embed_helpers.config import load_settings
from embed_helpers.errors import (BackendError, BackendUnreachable, BadInput, BatchTooLarge,
                                  EmbeddingFailures, EmbeddingValidationError)
from embed_helpers.identity import Identity, cache_key
from embed_helpers.resilient import BatchSizer, Dimension, embed_resilient

DIM = 8


class FakeBackend(Backend):
    """Deterministic vectors; knobs for the failures a real server produces. The base class
    gives `window` (EMBED_MAX_INPUT_TOKENS or 512), `identity()`, `slots` and `route`."""

    name = "fake"
    model_setting = "OPENAI_EMBED_MODEL"  # any model setting: the model is set below

    def __init__(self, max_batch=None, poison=(), server_error=(), nan=(), dim=DIM, **settings):
        super().__init__(load_settings({"EMBED_BATCH_SIZE": 100, **settings}, environ={},
                                       env_file=Path("/nonexistent/.env")))
        self.model = "fake-model"
        self.max_batch = None
        self.limit, self.poison, self.server_error, self.nan = max_batch, set(poison), set(server_error), set(nan)
        self.dim = dim
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()
        self.error: Exception | None = None

    def embed_batch(self, texts):
        with self.lock:
            self.calls.append(list(texts))
        if self.error:
            raise self.error
        if self.limit and len(texts) > self.limit:
            raise BatchTooLarge("too large", backend="fake", status=413)
        if self.poison & set(texts):
            raise BadInput("bad", backend="fake", status=400, server_message="poison inside")
        if self.server_error & set(texts):
            raise BackendError("boom", backend="fake", status=500, server_message="crashed")
        rows = np.stack([expected_vector(t, self.dim) for t in texts])
        for i, t in enumerate(texts):
            if t in self.nan:
                rows[i, 0] = np.nan
        return rows

    def stats(self):
        return {"requests": len(self.calls)}


TEXTS = [f"text {i}" for i in range(100)]


def want(texts):
    return np.stack([expected_vector(t, DIM) for t in texts])


def test_doctests():
    for module in (texts_module, http, remote, resilient):
        assert doctest.testmod(module).failed == 0


def test_chunked_rejects_size_zero():
    with pytest.raises(ValueError, match="chunk size must be >= 1, got 0"):
        list(chunked([1], 0))


def test_sizer_only_shrinks():
    sizer = BatchSizer(100)
    sizer.shrink(50)
    assert sizer.size == 50
    sizer.shrink(80)  # larger than what works: ignored
    assert sizer.size == 50
    sizer.shrink(0)
    assert sizer.size == 1


@pytest.mark.parametrize("bad", [[0], [99], [3, 4], [10, 50, 90]])
def test_bisection_finds_bad_inputs_with_about_log2_requests_each(bad):
    backend = FakeBackend(poison={TEXTS[i] for i in bad})
    vectors, failures = embed_resilient(backend, TEXTS)
    assert [f.position for f in failures] == bad
    assert all(f.reason == "poison inside" and f.status == 400 for f in failures)
    good = [i for i in range(100) if i not in bad]
    np.testing.assert_array_equal(vectors[good], want([TEXTS[i] for i in good]))
    assert np.isnan(vectors[bad]).all()
    assert len(backend.calls) <= 1 + len(bad) * 2 * math.ceil(math.log2(100))


def test_a_server_error_left_after_the_retries_stops_at_once_not_bisected():
    """One retry layer: `http` retried the 5xx already; halving the batch would only send
    more requests to a failing server (90 for one batch of 64, before)."""
    backend = FakeBackend(server_error={TEXTS[7]})
    with pytest.raises(BackendError, match="crashed"):
        embed_resilient(backend, TEXTS)
    assert len(backend.calls) == 1


def test_a_server_that_refuses_every_input_is_not_bisected_to_the_bottom():
    backend = FakeBackend(poison=set(TEXTS))
    with pytest.raises(BackendError, match="reject everything"):
        embed_resilient(backend, TEXTS)
    assert len(backend.calls) < 2 * 100 - 1  # full bisection would cost 199 requests
    assert len(backend.calls) <= 2 * math.ceil(math.log2(100)) + 3


@pytest.mark.parametrize("error", [
    BackendUnreachable("down", backend="fake"),
    BackendError("rate limited after retries", backend="fake", status=429),
    BackendError("no such route", backend="fake", status=404),
])
def test_errors_that_bisection_cannot_fix_are_raised_at_once(error):
    backend = FakeBackend()
    backend.error = error
    with pytest.raises(type(error)) as info:
        embed_resilient(backend, TEXTS)
    assert info.value is error
    assert len(backend.calls) == 1


def test_too_large_splits_and_remembers_the_size_that_worked():
    backend = FakeBackend(max_batch=30)
    sizer = BatchSizer(100)
    vectors, failures = embed_resilient(backend, TEXTS, sizer=sizer)
    np.testing.assert_array_equal(vectors, want(TEXTS))
    assert not failures and sizer.size == 25
    assert [len(c) for c in backend.calls] == [100, 50, 25, 25, 25, 25]
    backend.calls.clear()
    embed_resilient(backend, TEXTS, sizer=sizer)
    assert [len(c) for c in backend.calls] == [25] * 4


def test_one_text_too_large_alone_fails_alone_and_is_not_remembered():
    backend = FakeBackend()
    big = TEXTS[40]

    def embed(texts, original=backend.embed_batch):
        if big in texts:
            backend.calls.append(list(texts))
            raise BatchTooLarge("too long", backend="fake", status=400,
                                server_message="input is too long")
        return original(texts)
    backend.embed_batch = embed
    sizer = BatchSizer(100)
    _, failures = embed_resilient(backend, TEXTS, sizer=sizer)
    assert [f.position for f in failures] == [40]
    assert failures[0].reason.startswith("too large for the server even alone")
    assert sizer.size == 100


def test_non_finite_vectors_fail_their_rows_only():
    backend = FakeBackend(nan={TEXTS[2]})
    vectors, failures = embed_resilient(backend, TEXTS[:5])
    assert [(f.position, f.reason) for f in failures] == [(2, "the vector contains NaN or infinite values")]
    assert np.isnan(vectors[2]).all() and np.isfinite(vectors[[0, 1, 3, 4]]).all()


def test_wrong_count_and_dimension_stop():
    backend = FakeBackend()
    backend.embed_batch = lambda texts: want(texts)[:-1]
    with pytest.raises(EmbeddingValidationError, match="4 vectors for 5 texts"):
        embed_resilient(backend, TEXTS[:5])
    with pytest.raises(EmbeddingValidationError, match="EMBEDDING_DIM=8"):
        embed_resilient(FakeBackend(), TEXTS[:5], dimension=Dimension(16))


def test_a_learned_dimension_binds_the_later_batches():
    dimension = Dimension()  # no EMBEDDING_DIM: the first batch tells
    embed_resilient(FakeBackend(), TEXTS[:5], dimension=dimension)
    assert dimension.value == DIM
    with pytest.raises(EmbeddingValidationError, match="16-dim and 8-dim vectors"):
        embed_resilient(FakeBackend(dim=16), TEXTS[5:10], dimension=dimension)


def test_rows_to_array_names_ragged_positions():
    with pytest.raises(EmbeddingValidationError) as info:
        remote.rows_to_array([[1.0, 2.0], [1.0], [3.0, 4.0]], 3, backend="x")
    assert info.value.positions == [1]


def test_batch_embed_dedupes_and_keeps_input_order():
    texts = ["a", "b", "a", "c", "b", "a"]
    backend = FakeBackend(EMBED_BATCH_SIZE=2, EMBED_MAX_CONCURRENCY=3)
    result = batch_embed(texts, backend)
    assert sorted(t for call in backend.calls for t in call) == ["a", "b", "c"]
    np.testing.assert_array_equal(result.vectors, want(texts))
    assert (result.requests, result.texts_embedded, result.cache_hits) == (2, 3, 0)


def test_batch_embed_reports_every_position_of_a_failed_text():
    backend = FakeBackend(poison={"bad"})
    result = batch_embed(["ok", "bad", "x", "bad"], backend, on_failure="return")
    assert [f.position for f in result.failures] == [1, 3]
    assert [(f.reason, f.status) for f in result.failures] == [("poison inside", 400)] * 2
    with pytest.raises(EmbeddingFailures, match="2 of 4 texts"):
        batch_embed(["ok", "bad", "x", "bad"], backend)
    with pytest.raises(ValueError, match="on_failure must be 'raise' or 'return'"):
        batch_embed(["ok"], backend, on_failure="ignore")


def test_empty_texts_fail_without_being_sent():
    backend = FakeBackend()
    result = batch_embed(["a", "", "  \n", "b"], backend, on_failure="return")
    assert [(f.position, f.reason) for f in result.failures] == \
        [(1, "empty text: nothing to embed"), (2, "empty text: nothing to embed")]
    assert backend.calls == [["a", "b"]]
    np.testing.assert_array_equal(result.vectors[[0, 3]], want(["a", "b"]))
    assert np.isnan(result.vectors[[1, 2]]).all()


def test_batch_embed_with_a_cache_embeds_each_text_once():
    cache, backend = MemoryStore(), FakeBackend(EMBED_BATCH_SIZE=10)
    first = batch_embed(TEXTS[:30], backend, cache=cache)
    second = batch_embed(TEXTS[:40], backend, cache=cache)
    assert len(cache.data) == 40 and first.cache_hits == 0 and second.cache_hits == 30
    assert sum(len(c) for c in backend.calls) == 40
    np.testing.assert_array_equal(second.vectors, want(TEXTS[:40]))
    # The keys are the backend's identity with the dimension learned from the first batch.
    assert {(m["route"], m["model"], m["dim"], m["normalized"]) for m in cache.meta.values()} \
        == {("fake", "fake-model", DIM, True)}
    key = cache_key("fake", "fake-model", DIM, True, TEXTS[0])
    np.testing.assert_array_equal(cache.data[key], want(TEXTS[:1])[0])


def test_batch_embed_with_the_real_cache(tmp_path):
    backend = FakeBackend(EMBED_BATCH_SIZE=16, EMBED_MAX_CONCURRENCY=2)
    with EmbeddingCache(tmp_path / "cache.jsonl") as cache:
        batch_embed(TEXTS[:50], backend, cache=cache)
    backend.calls.clear()
    with EmbeddingCache(tmp_path / "cache.jsonl") as cache:
        assert cache.dims("fake", "fake-model", True) == [DIM]
        result = batch_embed(TEXTS, backend, cache=cache)
        found = cache.get_many(Identity("fake", "fake-model", DIM, True), TEXTS)
    assert result.cache_hits == 50 and sorted(t for c in backend.calls for t in c) == sorted(TEXTS[50:])
    np.testing.assert_array_equal(result.vectors, want(TEXTS))
    assert sorted(found) == sorted(TEXTS)
    np.testing.assert_array_equal(np.stack([found[t] for t in TEXTS]), want(TEXTS))


def test_every_store_is_a_cache_store(tmp_path):
    """The protocol is declared once and all three stores implement it (the PostgreSQL one
    in tests/test_cache_pg.py)."""
    assert isinstance(MemoryStore(), CacheStore)
    assert isinstance(EmbeddingCache(tmp_path / "c.jsonl"), CacheStore)


def test_the_cache_only_brake_sends_nothing_and_names_each_miss():
    cache, backend = MemoryStore(), FakeBackend(EMBED_BATCH_SIZE=2)
    batch_embed(TEXTS[:1], backend, cache=cache)
    calls = len(backend.calls)
    braked = FakeBackend(EMBED_BATCH_SIZE=2, EMBED_CACHE_ONLY=True)
    result = batch_embed(TEXTS[:3], braked, cache=cache, on_failure="return")
    assert braked.calls == [] and len(backend.calls) == calls
    assert [(f.position, f.preview) for f in result.failures] == [(1, TEXTS[1]), (2, TEXTS[2])]
    assert all("EMBED_CACHE_ONLY" in f.reason for f in result.failures)
    np.testing.assert_array_equal(result.vectors[0], want(TEXTS[:1])[0])
