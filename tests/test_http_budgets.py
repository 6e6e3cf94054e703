"""Token limits against the real loopback server: tokens per request (the budget, and a
server's 400 "Requested N tokens, max M tokens per request"), and texts over the window
(EMBED_LONG_TEXTS=chunk | truncate | fail) in batch_embed."""
import numpy as np
import pytest
from fake_server import FakeEmbeddingServer, count_tokens, expected_vector
from http_helpers import DIM, expected, make_backend, sent_inputs

from embed_helpers.texts import batch_embed
from embed_helpers.pieces import mean_vector

# 60 texts of about 52 tokens each (the server's count): about 3,100 tokens in all.
TEXTS = [f"note {i}: " + "word " * 40 for i in range(60)]
LIMIT = 1000  # tokens per request the server takes
LONG = " ".join(f"Sentence {i} is here." for i in range(60))  # ~1,250 bytes
SHORT = "short note"
WINDOW = 50  # EMBED_MAX_INPUT_TOKENS in the long-text tests


@pytest.fixture
def server():
    with FakeEmbeddingServer(DIM, seed=0) as fake:
        yield fake


# --- tokens per request -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["llm_api", "ollama"])
def test_the_budget_keeps_every_request_under_the_servers_limit(server, name):
    server.max_tokens_per_request = LIMIT
    assert sum(count_tokens(t) for t in TEXTS) > 3 * LIMIT
    with make_backend(server, name, EMBED_MAX_TOKENS_PER_REQUEST=LIMIT) as backend:
        result = batch_embed(TEXTS, backend)
    assert 400 not in server.statuses  # nothing was refused: nothing was sent over the budget
    assert len(server.tokens_per_request) > 3 and max(server.tokens_per_request) <= LIMIT
    assert sum(server.batch_sizes) == len(TEXTS)
    np.testing.assert_array_equal(result.vectors, expected(TEXTS))


@pytest.mark.parametrize("name", ["llm_api", "ollama"])
def test_a_servers_token_limit_400_is_split_like_a_413(server, name):
    # EMBED_MAX_TOKENS_PER_REQUEST unset: llm_api's own budget (300,000) is far above the
    # server's, Ollama has none; the server's 400 "Requested N tokens, max M tokens per
    # request" halves the batch, and the size that worked is kept.
    server.max_tokens_per_request = LIMIT
    with make_backend(server, name) as backend:
        result = batch_embed(TEXTS, backend)
    assert server.statuses[400] == 2  # 60 texts refused, then 30; from then on 15 at a time
    assert server.batch_sizes == [15] * 4 and max(server.tokens_per_request) <= LIMIT
    assert not result.failures
    np.testing.assert_array_equal(result.vectors, expected(TEXTS))


@pytest.mark.parametrize("setting, requests", [(None, 2), (0, 1)])
def test_llm_api_splits_at_300000_tokens_unless_told_otherwise(server, setting, requests):
    texts = [f"{i} " + "abcd " * 1600 for i in range(100)]  # ~8,000 bytes: 3,200 estimated tokens
    options = {} if setting is None else {"EMBED_MAX_TOKENS_PER_REQUEST": setting}
    with make_backend(server, **options) as backend:
        assert backend.window.request_tokens == (300_000 if setting is None else None)
        result = batch_embed(texts, backend)
    assert len(server.batch_sizes) == requests and sum(server.batch_sizes) == 100
    np.testing.assert_array_equal(result.vectors, expected(texts))


# --- texts over the window --------------------------------------------------------------
def long_text_backend(server, name, policy):
    server.max_input_tokens = WINDOW  # the whole long text would be refused
    return make_backend(server, name, EMBED_MAX_INPUT_TOKENS=WINDOW, EMBED_LONG_TEXTS=policy)


@pytest.mark.parametrize("name", ["llm_api", "ollama"])
def test_a_long_text_is_sent_in_chunks_and_gets_their_normalised_mean(server, name):
    assert count_tokens(LONG) > WINDOW
    with long_text_backend(server, name, "chunk") as backend:
        result = batch_embed([SHORT, LONG, SHORT], backend)
    assert not result.failures and 400 not in server.statuses
    sent = sent_inputs(server)
    chunks = [t for t in sent if t != SHORT]
    assert sent.count(SHORT) == 1 and LONG not in sent and len(chunks) > 1
    assert all(c in LONG and count_tokens(c) <= WINDOW for c in chunks)
    chunks.sort(key=LONG.index)
    assert LONG.startswith(chunks[0]) and LONG.endswith(chunks[-1])  # the whole text is read
    want = mean_vector(np.stack([expected_vector(c, DIM) for c in chunks]))
    np.testing.assert_allclose(result.vectors[1], want, atol=1e-6)
    assert abs(np.linalg.norm(result.vectors[1]) - 1) < 1e-5
    np.testing.assert_array_equal(result.vectors[[0, 2]], expected([SHORT, SHORT]))


@pytest.mark.parametrize("name", ["llm_api", "ollama"])
def test_fail_lists_a_long_text_as_a_failure_and_sends_nothing_for_it(server, name):
    with long_text_backend(server, name, "fail") as backend:
        result = batch_embed([SHORT, LONG], backend, on_failure="return")
    assert [f.position for f in result.failures] == [1]
    assert "EMBED_LONG_TEXTS=fail" in result.failures[0].reason
    assert sent_inputs(server) == [SHORT]
    assert np.isnan(result.vectors[1]).all()
    np.testing.assert_array_equal(result.vectors[0], expected([SHORT])[0])


@pytest.mark.parametrize("name", ["llm_api", "ollama"])
def test_truncate_sends_one_cut_text(server, name):
    with long_text_backend(server, name, "truncate") as backend:
        result = batch_embed([SHORT, LONG], backend)
    cut = [t for t in sent_inputs(server) if t != SHORT]
    assert len(cut) == 1 and LONG.startswith(cut[0]) and 0 < len(cut[0]) < len(LONG)
    assert count_tokens(cut[0]) <= WINDOW and not result.failures
    np.testing.assert_array_equal(result.vectors, expected([SHORT, cut[0]]))
