"""What the HTTP backends put on the wire and learn from their server: exact request bodies,
base64 negotiation, Ollama's version and context window, each backend's `window`."""
import logging

import numpy as np
import pytest
from fake_server import EMBED, LEGACY, FakeEmbeddingServer
from http_helpers import DIM, expected, make_backend

from embed_helpers.texts import batch_embed
from embed_helpers.constants import (OLLAMA_DEFAULT_CONTEXT, OPENAI_MAX_INPUT_TOKENS,
                                     OPENAI_MAX_REQUEST_TOKENS, SPECIAL_TOKENS_MARGIN)

TEXTS = [f"visit {i}: blood pressure {100 + i % 40}" for i in range(2000)]


@pytest.fixture
def server():
    with FakeEmbeddingServer(DIM, seed=0) as fake:
        yield fake


# --- request bodies ---------------------------------------------------------------------
def test_llm_api_body_asks_for_base64_by_default(server):
    with make_backend(server, EMBED_BATCH_SIZE=2) as backend:
        result = batch_embed(["a", "b", "c"], backend)
    assert server.bodies == [
        {"input": ["a", "b"], "model": "text-embedding-3-small", "encoding_format": "base64"},
        {"input": ["c"], "model": "text-embedding-3-small", "encoding_format": "base64"}]
    np.testing.assert_array_equal(result.vectors, expected(["a", "b", "c"]))


@pytest.mark.parametrize("context", [2048, 8192])
def test_ollama_body_sends_num_ctx_from_api_show(server, context):
    server.context_length = context
    with make_backend(server, "ollama", EMBED_BATCH_SIZE=2) as backend:
        result = batch_embed(["a", "b", "c"], backend)
    options = {"num_ctx": context}
    assert server.bodies == [{"model": "nomic-embed-text", "input": ["a", "b"], "options": options},
                             {"model": "nomic-embed-text", "input": ["c"], "options": options}]
    np.testing.assert_array_equal(result.vectors, expected(["a", "b", "c"]))


def test_ollama_legacy_body_is_one_prompt(server):
    server.legacy_only = True
    with make_backend(server, "ollama") as backend:
        batch_embed(["a", "b"], backend)
    assert sorted(server.bodies, key=str) == [{"model": "nomic-embed-text", "prompt": "a"},
                                              {"model": "nomic-embed-text", "prompt": "b"}]


# --- base64 negotiation -----------------------------------------------------------------
def test_a_server_refusing_base64_gets_one_refused_request_then_floats(server, caplog):
    server.refuse_base64 = True
    with caplog.at_level(logging.INFO), make_backend(server, EMBED_BATCH_SIZE=10) as backend:
        first = batch_embed(TEXTS[:30], backend)
        second = batch_embed(TEXTS[30:50], backend)  # the same backend remembers
        assert backend.stats()["encoding"] == "float"
    assert [b["encoding_format"] for b in server.bodies] == ["base64"] + ["float"] * 5
    assert server.statuses == {400: 1, 200: 5}
    np.testing.assert_array_equal(first.vectors, expected(TEXTS[:30]))
    np.testing.assert_array_equal(second.vectors, expected(TEXTS[30:50]))
    assert not first.failures and not second.failures
    assert any("refuses encoding_format=base64" in r.getMessage() for r in caplog.records)


def test_a_server_ignoring_base64_answers_floats_that_are_read_right(server):
    server.ignore_base64 = True
    with make_backend(server, EMBED_BATCH_SIZE=10) as backend:
        result = batch_embed(TEXTS[:30], backend)
        assert backend.stats()["encoding"] == "base64"  # nothing was refused
    assert [b["encoding_format"] for b in server.bodies] == ["base64"] * 3
    assert server.statuses == {200: 3}
    assert result.vectors.dtype == np.float32
    np.testing.assert_array_equal(result.vectors, expected(TEXTS[:30]))


def test_float_encoding_is_sent_when_set(server):
    with make_backend(server, EMBED_ENCODING="float") as backend:
        np.testing.assert_array_equal(backend.embed_batch(["a"]), expected(["a"]))
    assert server.bodies == [{"input": ["a"], "model": "text-embedding-3-small",
                              "encoding_format": "float"}]


# --- Ollama versions --------------------------------------------------------------------
@pytest.mark.parametrize("version", ["0.0.0", "0.0.0-dev", "garbage", ""])
def test_an_ollama_version_that_says_nothing_still_batches(server, version):
    # Issue acceptance: a source build reports 0.0.0; 2,000 texts at batch 512 are 4 requests.
    server.version = version
    with make_backend(server, "ollama", EMBED_BATCH_SIZE=512) as backend:
        result = batch_embed(TEXTS, backend)
        assert backend.route == "ollama:/api/embed" and backend.normalized
    assert server.counts[EMBED] == {"requests": 4, "texts": 2000}
    assert server.total_requests(LEGACY) == 0
    assert server.batch_sizes == [512, 512, 512, 464]
    np.testing.assert_array_equal(result.vectors, expected(TEXTS))


def test_an_old_ollama_version_goes_legacy_before_any_embed_request(server, caplog):
    server.version = "0.2.8"  # /api/embed would even work: the version alone decides
    with caplog.at_level(logging.INFO), \
            make_backend(server, "ollama", EMBED_BATCH_SIZE=512) as backend:
        assert backend.identity().route == "ollama:/api/embeddings"
        result = batch_embed(TEXTS[:20], backend)
        assert not backend.normalized
    assert server.total_requests(EMBED) == 0
    assert server.counts[LEGACY] == {"requests": 20, "texts": 20}
    np.testing.assert_array_equal(result.vectors, expected(TEXTS[:20], normalized=False))
    lines = [r.getMessage() for r in caplog.records if "older than 0.3" in r.getMessage()]
    assert len(lines) == 1
    assert "0.2" in lines[0] and "404" not in lines[0]  # the reason is the version, not a 404


# --- windows ----------------------------------------------------------------------------
@pytest.mark.parametrize("context, settings, want, source", [
    (8192, {}, 8192 - SPECIAL_TOKENS_MARGIN, "/api/show"),
    (2048, {}, 2048 - SPECIAL_TOKENS_MARGIN, "/api/show"),
    (None, {}, OLLAMA_DEFAULT_CONTEXT - SPECIAL_TOKENS_MARGIN, "default"),
    (8192, {"EMBED_MAX_INPUT_TOKENS": 300}, 300 - SPECIAL_TOKENS_MARGIN, "EMBED_MAX_INPUT_TOKENS"),
    # EMBED_MAX_INPUT_TOKENS lowers the window, never raises it
    (2048, {"EMBED_MAX_INPUT_TOKENS": 9000}, 2048 - SPECIAL_TOKENS_MARGIN, "/api/show"),
])
def test_ollama_window(server, context, settings, want, source):
    server.context_length = context
    with make_backend(server, "ollama", **settings) as backend:
        window = backend.window
        backend.embed_batch(["a"])
    assert window.max_tokens == want and source in window.source
    assert not window.exact and window.request_tokens is None
    assert server.bodies[0]["options"] == {"num_ctx": want + SPECIAL_TOKENS_MARGIN}


def test_ollama_request_budget_is_the_setting(server):
    with make_backend(server, "ollama", EMBED_MAX_TOKENS_PER_REQUEST=5000) as backend:
        assert backend.window.request_tokens == 5000


@pytest.mark.parametrize("settings, want, budget", [
    ({}, OPENAI_MAX_INPUT_TOKENS["text-embedding-3-small"], OPENAI_MAX_REQUEST_TOKENS),
    ({"EMBED_MAX_TOKENS_PER_REQUEST": 0}, 8191, None),
    ({"EMBED_MAX_TOKENS_PER_REQUEST": 1000}, 8191, 1000),
    ({"EMBED_MAX_INPUT_TOKENS": 500}, 500, OPENAI_MAX_REQUEST_TOKENS),
])
def test_llm_api_window(server, settings, want, budget):
    with make_backend(server, **settings) as backend:
        window = backend.window
    assert window.max_tokens == want - SPECIAL_TOKENS_MARGIN
    assert window.request_tokens == budget
    assert OPENAI_MAX_INPUT_TOKENS["text-embedding-3-small"] == 8191
    assert OPENAI_MAX_REQUEST_TOKENS == 300_000


def test_llm_api_window_of_an_unknown_model_is_assumed_and_said(server):
    server.known_models = {"my-model"}  # it serves my-model, and states no length anywhere
    with make_backend(server, OPENAI_EMBED_MODEL="my-model") as backend:
        window = backend.window
    assert window.max_tokens == 8191 - SPECIAL_TOKENS_MARGIN and window.origin == "assumed"
    assert "nothing states it" in window.source and "EMBED_MAX_INPUT_TOKENS" in window.source
