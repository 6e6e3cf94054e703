"""Several servers that serve the same model, used as one: who gets the next request.

A request goes to the server with the fewest requests in flight (ties: the first listed).
A server that stops answering (connection refused, a timeout) or fails SERVER_MAX_FAILURES
times in a row is set aside for a while, doubling each time, and tried again after;
its requests go to the others meanwhile. Counters per server feed the run report.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .config import mask_url
from .constants import SERVER_MAX_FAILURES, SERVER_SET_ASIDE_MAX_S, SERVER_SET_ASIDE_S

log = logging.getLogger(__name__)


@dataclass
class Server:
    """One server and what it did in this run."""

    url: str
    in_flight: int = 0
    requests: int = 0
    texts: int = 0
    errors: int = 0
    latency_s: float = 0.0
    failures_in_a_row: int = 0
    set_asides: int = 0
    back_at: float = 0.0          # monotonic time it may be used again

    def stats(self) -> dict:
        ok = self.requests - self.errors
        return {"requests": self.requests, "texts": self.texts, "errors": self.errors,
                "set_aside": self.set_asides,
                "mean_latency_s": round(self.latency_s / ok, 4) if ok else None}


class ServerPool:
    """Picks a server per request and keeps each server's record.

    >>> pool = ServerPool(["http://a", "http://b"])
    >>> first, second = pool.acquire(), pool.acquire()
    >>> first.url, second.url
    ('http://a', 'http://b')
    >>> pool.release(first, ok=False, down=True)
    >>> pool.acquire().url      # a is set aside: b again, though it is busier
    'http://b'
    """

    def __init__(self, urls: list[str], *, clock: Callable[[], float] = time.monotonic):
        if not urls:
            raise ValueError("a server pool needs at least one URL")
        self.servers = [Server(u) for u in urls]
        self._clock = clock
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.servers)

    def acquire(self, count: bool = True) -> Server:
        """The server for the next request (in flight until `release`); `count=False` for
        requests that are not embeddings (a version, a model's facts)."""
        with self._lock:
            now = self._clock()
            ready = [s for s in self.servers if s.back_at <= now]
            # None is ready: probe the one that comes back first rather than fail at once.
            server = min(ready, key=lambda s: s.in_flight) if ready \
                else min(self.servers, key=lambda s: s.back_at)
            server.in_flight += 1
            server.requests += count
            return server

    def release(self, server: Server, *, ok: bool, down: bool = False, texts: int = 0,
                started: float | None = None) -> None:
        """Record how a request went. `down`: the server did not answer at all."""
        with self._lock:
            server.in_flight -= 1
            if ok:
                server.texts += texts
                server.failures_in_a_row = 0
                server.back_at = 0.0
                if started is not None:
                    server.latency_s += time.perf_counter() - started
                return
            server.errors += 1
            server.failures_in_a_row += 1
            if down or server.failures_in_a_row >= SERVER_MAX_FAILURES:
                self._set_aside(server)

    def _set_aside(self, server: Server) -> None:
        server.set_asides += 1
        pause = min(SERVER_SET_ASIDE_S * 2 ** (server.set_asides - 1), SERVER_SET_ASIDE_MAX_S)
        server.back_at = self._clock() + pause
        server.failures_in_a_row = 0
        others = sum(s.back_at <= self._clock() for s in self.servers)
        if len(self.servers) > 1:
            log.warning("server %s is not answering: set aside for %.0f s; %d other server(s) "
                        "take its requests", mask_url(server.url), pause, others)

    def any_ready(self) -> bool:
        now = self._clock()
        return any(s.back_at <= now for s in self.servers)

    def stats(self) -> dict[str, dict]:
        with self._lock:
            return {mask_url(s.url): s.stats() for s in self.servers}

