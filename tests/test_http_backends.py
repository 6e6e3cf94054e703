"""The HTTP backends against a real loopback server that speaks both protocols.

Sleeps are injected and recorded, so retry tests run instantly and can assert
the delays; request counts come from the server's own counters. What is new in the
refactor (wire bodies, base64, Ollama versions, windows) is in test_http_wire.py, token
budgets and long texts in test_http_budgets.py, several servers in test_servers.py.
"""
import asyncio
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
from fake_server import EMBED, LEGACY, FakeEmbeddingServer
from http_helpers import DIM, ROUTE, Sleeps, closed_port_url, expected, make_backend, settings_for

from embed_helpers.backends import get_backend
from embed_helpers.backends.llm_api import OpenAIBackend
from embed_helpers.backends.ollama import OllamaBackend
from embed_helpers.texts import abatch_embed, batch_embed
from embed_helpers.errors import (AuthenticationError, BackendError, BackendUnreachable,
                                  EmbeddingFailures, EmbeddingValidationError, ModelNotFound)

#: A key of the real shape (masking keeps "sk-" and the last four), plainly not a real one.
KEY = "sk-test-" + "0" * 16 + "123456"
TEXTS = [f"patient {i}: note about visit {i % 37}" for i in range(1000)]


@pytest.fixture
def server():
    with FakeEmbeddingServer(DIM, seed=0) as fake:
        yield fake


@pytest.mark.parametrize("name", ["llm_api", "ollama"])
@pytest.mark.parametrize("concurrency", [1, 4])
def test_1000_texts_at_batch_100_cost_10_requests_in_order(server, name, concurrency):
    server.shuffle_index = True
    with make_backend(server, name, EMBED_MAX_CONCURRENCY=concurrency) as backend:
        result = batch_embed(TEXTS, backend, on_failure="raise")
    assert server.total_requests(ROUTE[name]) == server.total_requests() == 10
    assert server.batch_sizes == [100] * 10
    assert result.requests == 10 and result.texts_embedded == 1000 and not result.failures
    np.testing.assert_array_equal(result.vectors, expected(TEXTS))


def test_base64_encoding_gives_the_same_vectors(server):
    # base64 is now the default (EMBED_ENCODING); floats are still asked for when set.
    with make_backend(server) as backend:
        vectors = backend.embed_batch(TEXTS[:10])
    with make_backend(server, EMBED_ENCODING="float") as backend:
        floats = backend.embed_batch(TEXTS[:10])
    assert [b["encoding_format"] for b in server.bodies] == ["base64", "float"]
    assert vectors.dtype == floats.dtype == np.float32
    np.testing.assert_array_equal(vectors, expected(TEXTS[:10]))
    np.testing.assert_array_equal(floats, expected(TEXTS[:10]))


@pytest.mark.parametrize("name", ["llm_api", "ollama"])
def test_429s_and_5xx_all_vectors_and_no_retry_before_retry_after(server, name):
    # Faults are drawn from a hash of each request body; base64 (the new default) changed
    # llm_api's bodies, so the 5xx rate is raised to keep both kinds of fault in the run.
    server.rate_429, server.rate_5xx, server.retry_after_s = 0.2, 0.2, 2
    sleeps = Sleeps()
    with make_backend(server, name, sleeps, EMBED_MAX_CONCURRENCY=4,
                      EMBED_MAX_RETRIES=8) as backend:
        result = batch_embed(TEXTS, backend)
        stats = backend.stats()
    np.testing.assert_array_equal(result.vectors, expected(TEXTS))
    sent_429 = server.statuses.get(429, 0)
    sent_5xx = sum(n for status, n in server.statuses.items() if status >= 500)
    assert sent_429 > 0 and sent_5xx > 0
    # Every 429 said "Retry-After: 2"; backoff for 5xx is at most 1 ms * 2**8.
    assert sum(1 for s in sleeps if s >= 2.0) == sent_429
    assert all(s >= 2.0 or s <= 0.256 for s in sleeps)
    assert len(sleeps) == stats["retries"] == sent_429 + sent_5xx
    assert server.total_requests() == 10 + len(sleeps)


def test_retry_after_ms_is_honoured(server):
    server.rate_429, server.retry_after_s, server.retry_after_ms = 0.3, None, 1500
    sleeps = Sleeps()
    with make_backend(server, sleep=sleeps) as backend:
        backend.embed_batch(TEXTS[:5])
        backend.embed_batch(TEXTS[5:10])
    assert sleeps and all(s == 1.5 for s in sleeps)


@pytest.mark.parametrize("name", ["llm_api", "ollama"])
def test_three_poison_texts_reported_exactly_997_returned(server, name):
    bad_positions = [17, 420, 421]
    server.poison = {TEXTS[p] for p in bad_positions}
    with make_backend(server, name) as backend:
        result = batch_embed(TEXTS, backend, on_failure="return")
    assert [f.position for f in result.failures] == bad_positions
    assert all("forbidden content" in f.reason for f in result.failures)
    assert [f.status for f in result.failures] == [400] * 3
    assert result.failures[0].preview == TEXTS[17]
    good = [i for i in range(1000) if i not in bad_positions]
    np.testing.assert_array_equal(result.vectors[good], expected([TEXTS[i] for i in good]))
    assert np.isnan(result.vectors[bad_positions]).all()
    # about log2(batch) extra requests per bad input, not one per text
    assert server.total_requests() <= 10 + 3 * 2 * math.ceil(math.log2(100))
    with make_backend(server, name) as backend, pytest.raises(EmbeddingFailures) as info:
        batch_embed(TEXTS[:30], backend)
    assert [f.position for f in info.value.failures] == [17]


@pytest.mark.parametrize("how", ["batch_embed", "embed_batch"])
def test_legacy_only_ollama_falls_back_once(server, caplog, how):
    server.legacy_only = True  # /api/embed answers 404, /api/version says 0.2.8
    texts = TEXTS[:50]
    with caplog.at_level(logging.INFO), \
            make_backend(server, "ollama", EMBED_MAX_CONCURRENCY=4) as backend:
        assert backend.route == "ollama:/api/embed" and backend.normalized
        if how == "batch_embed":
            vectors = batch_embed(texts, backend, on_failure="raise").vectors
        else:  # no identity() first: the 404 of the first /api/embed request decides
            vectors = np.concatenate([backend.embed_batch(texts[:25]),
                                      backend.embed_batch(texts[25:])])
        assert backend.route == "ollama:/api/embeddings" and not backend.normalized
    np.testing.assert_array_equal(vectors, expected(texts, normalized=False))
    # Changed on purpose: batch_embed learns the route from /api/version (in identity(),
    # before any cache lookup), so it sends no /api/embed request at all; a bare
    # embed_batch still pays exactly one 404.
    assert server.counts[EMBED]["requests"] == (0 if how == "batch_embed" else 1)
    assert server.counts[LEGACY] == {"requests": 50, "texts": 50}
    fallback_lines = [r for r in caplog.records if "/api/embeddings" in r.getMessage()]
    assert len(fallback_lines) == 1 and "older than 0.3" in fallback_lines[0].getMessage()


def test_legacy_bisection_does_not_resend_good_texts(server):
    server.legacy_only, server.poison = True, {TEXTS[5]}
    with make_backend(server, "ollama", EMBED_BATCH_SIZE=20) as backend:
        result = batch_embed(TEXTS[:20], backend, on_failure="return")
    assert [f.position for f in result.failures] == [5]
    assert server.counts[LEGACY]["texts"] == 19
    assert server.counts[LEGACY]["requests"] <= 19 + math.ceil(math.log2(20)) + 1


def test_batch_too_large_is_split_and_the_size_remembered(server):
    server.max_batch = 30
    with make_backend(server) as backend:
        result = batch_embed(TEXTS, backend)
    np.testing.assert_array_equal(result.vectors, expected(TEXTS))
    assert server.statuses[413] == 2  # 100 refused, then 50; from then on 25 at a time
    assert server.batch_sizes == [25] * 40


@pytest.mark.parametrize("name", ["llm_api", "ollama"])
def test_auth_header_sent_and_key_never_shown(server, name, caplog):
    server.require_key = KEY
    with make_backend(server, name, OPENAI_API_KEY=KEY) as backend:
        if name == "llm_api":
            backend.embed_batch(["a"])
            assert server.auth_headers == [f"Bearer {KEY}"]
        else:  # Ollama has no keys: a 401 comes from a proxy, and the hint says so
            with pytest.raises(AuthenticationError, match="proxy in front of OLLAMA_HOST"):
                backend.embed_batch(["a"])
            assert server.auth_headers == [None]
            return
    wrong = KEY[:-1] + "X"
    with caplog.at_level(logging.DEBUG), pytest.raises(AuthenticationError) as info, \
            make_backend(server, name, OPENAI_API_KEY=wrong) as backend:
        batch_embed(["a", "b"], backend)
    # The fake server echoes the key it got, like a careless proxy: it must not show.
    shown = "\n".join([str(info.value), info.value.server_message, repr(backend),
                       repr(backend.settings), caplog.text])
    assert "Check OPENAI_API_KEY (now sk-…345X)" in str(info.value)
    assert wrong not in shown and KEY not in shown
    assert server.total_requests() == 2  # a 401 is not retried, nor bisected


def test_no_key_no_auth_header(server):
    with make_backend(server) as backend:
        backend.embed_batch(["a"])
    assert server.auth_headers == [None]


@pytest.mark.parametrize("name", ["llm_api", "ollama"])
def test_wrong_dimension_stops_with_what_to_set(server, name):
    server.wrong_dim = 48
    with make_backend(server, name, EMBEDDING_DIM=DIM) as backend, \
            pytest.raises(EmbeddingValidationError) as info:
        batch_embed(TEXTS[:10], backend)
    assert "48-dim" in str(info.value) and "EMBEDDING_DIM=48" in str(info.value)


def test_empty_vectors_stop(server):
    server.empty_vectors = True
    with make_backend(server) as backend, pytest.raises(EmbeddingValidationError, match="empty"):
        batch_embed(TEXTS[:10], backend)


def test_unreachable_server_says_what_to_check():
    nowhere = SimpleNamespace(url=closed_port_url())  # nothing listens there
    sleeps = Sleeps()
    with make_backend(nowhere, "ollama", sleeps, EMBED_MAX_RETRIES=2) as backend, \
            pytest.raises(BackendUnreachable) as info:
        batch_embed(["a"], backend)
    assert f"Cannot reach Ollama at {nowhere.url}" in str(info.value)
    assert "Is `ollama serve` running? Is OLLAMA_HOST right?" in str(info.value)
    assert len(sleeps) == 2


@pytest.mark.parametrize("name, hint", [("ollama", "ollama pull missing-model"),
                                        ("llm_api", "OPENAI_EMBED_MODEL")])
def test_model_not_found_says_how_to_fix(server, name, hint):
    server.known_models = {"nomic-embed-text"}
    model_setting = "OLLAMA_EMBED_MODEL" if name == "ollama" else "OPENAI_EMBED_MODEL"
    with make_backend(server, name, **{model_setting: "missing-model"}) as backend, \
            pytest.raises(ModelNotFound) as info:
        batch_embed(TEXTS[:10], backend)
    assert hint in str(info.value) and "missing-model" in str(info.value)
    assert server.total_requests() == 1 and backend.route in ("llm_api", "ollama:/api/embed")


def test_timeouts_are_retried_then_explained(server):
    server.slow_s, server.slow_first = 0.5, 1
    with make_backend(server, EMBEDDING_TIMEOUT=0.1) as backend:
        np.testing.assert_array_equal(backend.embed_batch(["a"]), expected(["a"]))
        assert backend.stats()["retries"] == 1
    server.slow_first = 3
    with make_backend(server, EMBEDDING_TIMEOUT=0.1, EMBED_MAX_RETRIES=1) as backend, \
            pytest.raises(BackendUnreachable, match="EMBEDDING_TIMEOUT"):
        backend.embed_batch(["b"])


def test_dropped_connections_are_retried(server):
    server.drop_rate = 0.4
    with make_backend(server, EMBED_MAX_RETRIES=8) as backend:
        result = batch_embed(TEXTS, backend)
        assert backend.stats()["retries"] == server.total_requests() - 10 > 0
    np.testing.assert_array_equal(result.vectors, expected(TEXTS))


def test_429_after_all_retries_is_raised_not_bisected(server):
    server.rate_429, server.retry_after_s = 1.0, 1
    with make_backend(server, EMBED_MAX_RETRIES=2) as backend, \
            pytest.raises(BackendError, match="EMBED_MAX_RETRIES") as info:
        batch_embed(TEXTS[:100], backend)
    assert info.value.status == 429 and server.total_requests() == 3


def test_wrong_base_url_is_a_route_error_not_bisected(server):
    settings = settings_for(server, OPENAI_BASE_URL=server.url)  # forgot /v1
    with OpenAIBackend(settings, sleep=Sleeps()) as backend, \
            pytest.raises(BackendError, match="OPENAI_BASE_URL") as info:
        batch_embed(TEXTS[:100], backend)
    assert info.value.status == 404 and server.statuses == {404: 1}


def test_registry_and_async_face(server):
    settings = settings_for(server, "ollama", EMBED_BATCH_SIZE=8)
    assert isinstance(get_backend(settings), OllamaBackend)
    result = asyncio.run(abatch_embed(TEXTS[:20], settings=settings))
    np.testing.assert_array_equal(result.vectors, expected(TEXTS[:20]))
    assert server.total_requests(EMBED) == 3
