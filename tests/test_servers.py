"""Several servers serving one model (OLLAMA_HOST / OPENAI_BASE_URL as comma-separated
lists): the pool's choice and set-asides with an injected clock, then real loopback
servers: spread, a server stopped or failing mid-run, all down, shared cache keys."""
import doctest

import numpy as np
import pytest
from fake_server import FakeEmbeddingServer, LatencyModel
from http_helpers import DIM, ROUTE, Sleeps, closed_port_url, expected, make_backend, settings_for

from embed_helpers import servers
from embed_helpers.backends import get_backend
from embed_helpers.texts import batch_embed
from embed_helpers.cache.jsonl import EmbeddingCache
from embed_helpers.constants import SERVER_MAX_FAILURES, SERVER_SET_ASIDE_MAX_S, SERVER_SET_ASIDE_S
from embed_helpers.errors import BackendUnreachable
from embed_helpers.servers import ServerPool

TEXTS = [f"record {i}: follow-up in {i % 12} weeks" for i in range(400)]
NAMES = ["llm_api", "ollama"]


def url_of(server, name):
    """The server's key in `backend.stats()["servers"]`: the URL as configured."""
    return server.url + ("/v1" if name == "llm_api" else "")


@pytest.fixture
def pair():
    """Two servers that each take a few ms per request, so that requests overlap."""
    with FakeEmbeddingServer(DIM, LatencyModel(5, 0.0)) as a, \
            FakeEmbeddingServer(DIM, LatencyModel(5, 0.0)) as b:
        yield a, b


# --- the pool alone, on an injected clock ------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_doctests():
    assert doctest.testmod(servers).failed == 0


def test_a_pool_needs_a_server():
    with pytest.raises(ValueError, match="at least one URL"):
        ServerPool([])


def test_the_next_request_goes_to_the_least_busy_server_ties_to_the_first():
    pool = ServerPool(["http://a", "http://b", "http://c"], clock=Clock())
    first, second, third = pool.acquire(), pool.acquire(), pool.acquire()
    assert [s.url for s in (first, second, third)] == ["http://a", "http://b", "http://c"]
    pool.release(second, ok=True)
    assert pool.acquire().url == "http://b"   # the only one with nothing in flight
    pool.release(first, ok=True)
    pool.release(third, ok=True)
    assert pool.acquire().url == "http://a"   # a and c idle: the first listed


def test_a_server_that_does_not_answer_is_set_aside_and_comes_back_doubling():
    clock = Clock()
    pool = ServerPool(["http://a", "http://b"], clock=clock)
    a = pool.acquire()
    pool.release(a, ok=False, down=True)
    start = clock.now
    for _ in range(3):  # a would win every tie: it is skipped while set aside
        server = pool.acquire()
        assert server.url == "http://b"
        pool.release(server, ok=True)
    clock.now = start + SERVER_SET_ASIDE_S - 0.001
    assert pool.acquire().url == "http://b"
    clock.now = start + SERVER_SET_ASIDE_S
    assert (again := pool.acquire()).url == "http://a"  # back after SERVER_SET_ASIDE_S
    pool.release(again, ok=False, down=True)           # fails again: twice as long
    start = clock.now
    clock.now = start + 2 * SERVER_SET_ASIDE_S - 0.001
    assert not any(s.url == "http://a" for s in (pool.acquire(), pool.acquire()))
    clock.now = start + 2 * SERVER_SET_ASIDE_S
    assert pool.servers[0].back_at <= clock.now and pool.stats()["http://a"]["set_aside"] == 2


def test_the_pause_is_capped():
    clock = Clock()
    pool = ServerPool(["http://a"], clock=clock)
    for _ in range(12):
        pool.release(pool.acquire(), ok=False, down=True)
        clock.now = pool.servers[0].back_at
    pool.release(pool.acquire(), ok=False, down=True)
    assert pool.servers[0].back_at - clock.now == SERVER_SET_ASIDE_MAX_S


def test_failures_in_a_row_set_a_server_aside_and_a_success_resets_them():
    clock = Clock()
    pool = ServerPool(["http://a", "http://b"], clock=clock)
    a = pool.servers[0]
    for _ in range(SERVER_MAX_FAILURES - 1):
        pool.acquire()
        pool.release(a, ok=False)    # 5xx: counts against a, not yet set aside
    assert pool.any_ready() and a.back_at <= clock.now
    pool.acquire()
    pool.release(a, ok=True)         # one success: the count starts again
    for _ in range(SERVER_MAX_FAILURES - 1):
        pool.acquire()
        pool.release(a, ok=False)
    assert a.back_at <= clock.now
    pool.acquire()
    pool.release(a, ok=False)        # the SERVER_MAX_FAILURES-th in a row
    assert a.back_at == clock.now + SERVER_SET_ASIDE_S
    assert pool.acquire().url == "http://b"


def test_with_every_server_set_aside_the_first_to_come_back_is_tried():
    clock = Clock()
    pool = ServerPool(["http://a", "http://b"], clock=clock)
    a, b = pool.acquire(), pool.acquire()
    pool.release(b, ok=False, down=True)
    clock.now += 1
    pool.release(a, ok=False, down=True)
    assert not pool.any_ready()
    assert pool.acquire().url == "http://b"


def test_pool_counters():
    pool = ServerPool(["http://a", "http://b"], clock=Clock())
    server = pool.acquire()
    pool.release(server, ok=True, texts=7, started=0.0)
    pool.release(pool.acquire(), ok=False)
    stats = pool.stats()
    assert stats["http://a"]["requests"] == 2 and stats["http://a"]["texts"] == 7
    assert stats["http://a"]["errors"] == 1 and stats["http://b"]["requests"] == 0
    assert stats["http://b"]["mean_latency_s"] is None


# --- real servers ------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_requests_spread_over_the_servers_and_are_counted_per_server(pair, name):
    a, b = pair
    with make_backend(pair, name, EMBED_BATCH_SIZE=20) as backend:
        assert backend.slots == 2  # EMBED_MAX_CONCURRENCY (1) per server
        result = batch_embed(TEXTS, backend)
        stats = backend.stats()
    np.testing.assert_array_equal(result.vectors, expected(TEXTS))
    assert a.total_requests(ROUTE[name]) + b.total_requests(ROUTE[name]) == 20
    assert a.total_requests() >= 5 and b.total_requests() >= 5  # least in flight: both busy
    per_server = stats["servers"]
    assert set(per_server) == {url_of(a, name), url_of(b, name)}
    for fake in pair:
        counted = per_server[url_of(fake, name)]
        assert counted["texts"] == fake.total_texts()
        assert counted["requests"] == fake.total_requests()  # embedding requests only
        assert counted["errors"] == counted["set_aside"] == 0
    assert sum(s["requests"] for s in per_server.values()) == stats["requests"] == 20


@pytest.mark.parametrize("name", NAMES)
def test_server_offset_rotates_the_list(pair, name):
    a, b = pair
    with get_backend(settings_for(pair, name), server_offset=1) as backend:
        backend.embed_batch(["x"])
    assert (a.total_requests(), b.total_requests()) == (0, 1)


@pytest.mark.parametrize("name", NAMES)
def test_a_server_stopped_mid_run_is_set_aside_and_the_other_takes_its_batches(pair, name):
    a, b = pair
    sleeps = Sleeps()
    with make_backend(pair, name, sleeps, EMBED_BATCH_SIZE=20) as backend:
        calls, embed_batch = [], backend.embed_batch

        def embed(texts):
            calls.append(len(texts))
            if len(calls) == 4:
                b.stop()
                # stop() ends the listener, not the keep-alive connections it already
                # has: make those hang up too, as a dead server's would.
                b.drop_rate = 1.0
            return embed_batch(texts)
        backend.embed_batch = embed
        result = batch_embed(TEXTS, backend)
        stats = backend.stats()["servers"]
    assert not result.failures and sleeps == []  # another server was ready: no wait
    np.testing.assert_array_equal(result.vectors, expected(TEXTS))
    assert stats[url_of(b, name)]["set_aside"] == 1
    # None lost; paid twice at most for the batch b was answering when it died (its reply
    # never arrived, so that batch went to a as well).
    assert len(TEXTS) <= a.total_texts() + b.total_texts() <= len(TEXTS) + 20
    assert a.total_texts() > len(TEXTS) / 2


@pytest.mark.parametrize("name", NAMES)
def test_a_server_answering_5xx_repeatedly_is_set_aside(pair, name):
    a, b = pair
    b.rate_5xx = 1.0
    sleeps = Sleeps()
    with make_backend(pair, name, sleeps, EMBED_BATCH_SIZE=20) as backend:
        result = batch_embed(TEXTS, backend)
        stats = backend.stats()
    assert not result.failures
    np.testing.assert_array_equal(result.vectors, expected(TEXTS))
    answered_5xx = sum(n for status, n in b.statuses.items() if status >= 500)
    assert b.total_texts() == 0 and a.total_texts() == len(TEXTS)
    # set aside after SERVER_MAX_FAILURES in a row (one more may have been in flight)
    assert SERVER_MAX_FAILURES <= answered_5xx <= SERVER_MAX_FAILURES + 1
    assert stats["servers"][url_of(b, name)]["set_aside"] == 1
    assert len(sleeps) == stats["retries"] == answered_5xx


@pytest.mark.parametrize("name", NAMES)
def test_all_servers_down_is_unreachable_naming_the_servers(name):
    nowhere = [type("Down", (), {"url": closed_port_url()})() for _ in range(2)]
    sleeps = Sleeps()
    with make_backend(nowhere, name, sleeps, EMBED_MAX_RETRIES=3) as backend, \
            pytest.raises(BackendUnreachable) as info:
        batch_embed(TEXTS[:10], backend)
    assert backend.stats()["requests"] == 4  # EMBED_MAX_RETRIES + 1 attempts, then it says so
    message = str(info.value)
    setting = "OPENAI_BASE_URL" if name == "llm_api" else "OLLAMA_HOST"
    assert f"none of the 2 servers of {setting} answered" in message
    assert all(server.url in message for server in nowhere), message  # which ones to check


@pytest.mark.parametrize("name", NAMES)
def test_cache_keys_are_the_same_whichever_server_answered(pair, name, tmp_path):
    a, b = pair
    with make_backend(pair, name, EMBED_BATCH_SIZE=20) as both, \
            EmbeddingCache(tmp_path / "cache.jsonl") as cache:
        first = batch_embed(TEXTS, both, cache=cache)
        identity = both.identity(DIM)
    assert a.total_texts() > 0 and b.total_texts() > 0  # both answered some
    a.reset()
    b.reset()
    with make_backend(b, name) as only_b, EmbeddingCache(tmp_path / "cache.jsonl") as cache:
        assert only_b.identity(DIM) == identity
        second = batch_embed(TEXTS, only_b, cache=cache)
    assert second.cache_hits == len(TEXTS) and second.requests == 0 and b.total_requests() == 0
    np.testing.assert_array_equal(second.vectors, first.vectors)


def test_ollama_learns_its_context_from_a_live_server_when_the_first_is_down():
    with FakeEmbeddingServer(DIM, context_length=8192) as live:
        down = type("Down", (), {"url": closed_port_url()})()
        with make_backend([down, live], "ollama") as backend:
            result = batch_embed(["a", "b"], backend)
            window = backend.window
    np.testing.assert_array_equal(result.vectors, expected(["a", "b"]))
    assert window.max_tokens == 8190 and "/api/show" in window.source
    assert live.bodies[0]["options"] == {"num_ctx": 8192}
