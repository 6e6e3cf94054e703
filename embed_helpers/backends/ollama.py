"""Ollama: batched `/api/embed`, falling back once to legacy `/api/embeddings`.

Servers older than 0.3 have no `/api/embed` (Go's plain-text "404 page not found");
they get one text per request on `/api/embeddings`, EMBED_MAX_CONCURRENCY at a
time. That route returns unnormalized vectors, so it is part of `route` and hence
of every cache key.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from ..config import Settings
from ..constants import CONNECT_TIMEOUT_S, LEGACY_PENDING_MAX
from ..errors import BackendError, ModelNotFound
from ..http import HttpClient, rows_to_array
from .base import Backend

log = logging.getLogger(__name__)

EMBED_PATH = "/api/embed"
LEGACY_PATH = "/api/embeddings"
VERSION_PATH = "/api/version"
FIRST_BATCHING_VERSION = (0, 3)  # /api/embed arrived in Ollama 0.3.0


class OllamaBackend(Backend):
    """POST {OLLAMA_HOST}/api/embed {"model", "input": [...]} -> {"embeddings": [[...]]}."""

    name = "ollama"

    def __init__(self, settings: Settings, *, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None):
        super().__init__(settings)
        self.http = HttpClient(
            settings.OLLAMA_HOST, settings, backend=self.name, service="Ollama",
            url_setting="OLLAMA_HOST", sleep=sleep, rng=rng,
            model_hint=f"Run `ollama pull {self.model}` on the Ollama host, or set "
                       f"OLLAMA_EMBED_MODEL to a model it has (`ollama list`).",
            unreachable_hint="Is `ollama serve` running? Is OLLAMA_HOST right?",
            auth_hint="Ollama itself has no keys: a proxy in front of OLLAMA_HOST refused us.")
        self._legacy = False
        self._lock = threading.Lock()
        # Legacy route only: vectors of a batch that failed as a whole, so that the
        # bisection above us does not pay one request per good text again.
        self._pending: dict[str, np.ndarray] = {}
        self._pool: ThreadPoolExecutor | None = None

    @property
    def route(self) -> str:
        return f"ollama:{LEGACY_PATH if self._legacy else EMBED_PATH}"

    @property
    def normalized(self) -> bool:  # type: ignore[override]
        return not self._legacy

    def resolve_route(self) -> str:
        """Learn the route before the cache is consulted, from GET /api/version (free).

        Without this, a run whose first embedding request discovers an old server would
        have looked its texts up under the wrong route, and missed.
        """
        if self._legacy:
            return self.route
        try:
            response = self.http.session.get(self.settings.OLLAMA_HOST + VERSION_PATH,
                                             timeout=(CONNECT_TIMEOUT_S, CONNECT_TIMEOUT_S))
            version = tuple(int(p) for p in response.json()["version"].split(".")[:2])
        except Exception:  # a proxy without the route, an odd version: the first request decides
            return self.route
        if version < FIRST_BATCHING_VERSION:
            self._switch_to_legacy(BackendError(f"version {'.'.join(map(str, version))}"))
        return self.route

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not self._legacy:
            try:
                body = self.http.post_json(EMBED_PATH, {"model": self.model, "input": texts},
                                           texts=len(texts))
                return rows_to_array(body.get("embeddings") or [], len(texts), backend=self.name)
            except ModelNotFound:
                raise
            except BackendError as exc:
                if exc.status != 404:
                    raise
                self._switch_to_legacy(exc)
        return self._embed_legacy(texts)

    def _switch_to_legacy(self, exc: BackendError) -> None:
        with self._lock:
            if not self._legacy:
                self._legacy = True
                log.warning("Ollama at %s has no %s (%s): this server is older than 0.3; using "
                            "%s, one text per request, %d in parallel. Upgrade Ollama to batch.",
                            self.settings.OLLAMA_HOST, EMBED_PATH, exc.server_message or "404",
                            LEGACY_PATH, self.settings.EMBED_MAX_CONCURRENCY)

    def _embed_one(self, text: str) -> np.ndarray:
        with self._lock:
            cached = self._pending.pop(text, None)
        if cached is not None:
            return cached
        body = self.http.post_json(LEGACY_PATH, {"model": self.model, "prompt": text}, texts=1)
        return rows_to_array([body.get("embedding") or []], 1, backend=self.name)[0]

    def _embed_legacy(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.settings.EMBED_MAX_CONCURRENCY,
                                                thread_name_prefix="ollama-legacy")
        futures = [self._pool.submit(self._embed_one, text) for text in texts]
        rows, error = [], None
        for text, future in zip(texts, futures):
            try:
                rows.append(future.result())
            except BackendError as exc:
                error = error or exc
                rows.append(None)
        if error is None:
            return rows_to_array(rows, len(texts), backend=self.name)
        with self._lock:
            if len(self._pending) > LEGACY_PENDING_MAX:
                self._pending.clear()
            self._pending.update({t: r for t, r in zip(texts, rows) if r is not None})
        raise error

    def stats(self) -> dict:
        return {**self.http.stats(), "route": self.route}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()
