"""Ollama: batched `/api/embed`, falling back once to legacy `/api/embeddings`.

Servers older than 0.3 have no `/api/embed` (Go's plain-text "404 page not found");
they get one text per request on `/api/embeddings`, EMBED_MAX_CONCURRENCY at a
time. That route returns unnormalized vectors, so it is part of `route` and hence
of every cache key. The context window comes from `/api/show` and is sent with every
request as `num_ctx`, so that what the model reads is known, not guessed.
"""
from __future__ import annotations

import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Sequence

import numpy as np

from .. import dimensions, windows
from ..config import Settings, mask_url
from ..constants import OLLAMA_DEFAULT_CONTEXT
from ..errors import BackendError, BadInput, ConfigError, ModelNotFound, SomeInputsFailed
from ..identity import Identity
from ..tokens import Window
from .remote import RemoteBackend, rows_to_array

log = logging.getLogger(__name__)

EMBED_PATH = "/api/embed"
LEGACY_PATH = "/api/embeddings"
VERSION_PATH = "/api/version"
SHOW_PATH = "/api/show"
FIRST_BATCHING_VERSION = (0, 3)  # /api/embed arrived in Ollama 0.3.0


def parse_version(text) -> tuple[int, int] | None:
    """(major, minor), or None when it says nothing: builds from source report 0.0.0.

    >>> parse_version("0.5.7"), parse_version("0.0.0"), parse_version("0.0.0-dev"), parse_version("x")
    ((0, 5), None, None, None)
    """
    match = re.match(r"^v?(\d+)\.(\d+)", str(text or "").strip())
    if not match:
        return None
    version = (int(match.group(1)), int(match.group(2)))
    return None if version == (0, 0) else version


class OllamaBackend(RemoteBackend):
    """POST {OLLAMA_HOST}/api/embed {"model", "input": [...], "options": {"num_ctx"}}."""

    name = "ollama"
    model_setting = "OLLAMA_EMBED_MODEL"
    url_setting = "OLLAMA_HOST"
    service = "Ollama"

    def __init__(self, settings: Settings, **options):
        model = settings.OLLAMA_EMBED_MODEL
        super().__init__(
            settings, **options,
            model_hint=f"Run `ollama pull {model}` on the Ollama host, or set "
                       f"OLLAMA_EMBED_MODEL to a model it has (`ollama list`).",
            unreachable_hint="Is `ollama serve` running? Is OLLAMA_HOST right?",
            auth_hint="Ollama itself has no keys: a proxy in front of OLLAMA_HOST refused us.")
        self._legacy = False
        self._resolved = False
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def route(self) -> str:
        return f"ollama:{LEGACY_PATH if self._legacy else EMBED_PATH}"

    @property
    def normalized(self) -> bool:  # type: ignore[override]
        return not self._legacy

    def identity(self, dim: int | None = None) -> Identity:
        """Learn the route first, from GET /api/version (free): a run whose first embedding
        request discovered an old server would have looked its texts up under the wrong
        route, and missed. A version that says nothing (0.0.0 from a source build, a proxy
        without the route) leaves it to the first /api/embed request."""
        if not self._resolved:
            body = self.http.get_json(VERSION_PATH)
            said = body.get("version") if isinstance(body, dict) else None
            version = parse_version(said)
            if version is not None and version < FIRST_BATCHING_VERSION:
                self._switch_to_legacy(BackendError(f"version {said}", backend=self.name,
                                                    server_message=f"/api/version says {said}"))
            self._resolved = True
        return super().identity(dim)

    @cached_property
    def context(self) -> tuple[int, str]:
        """(tokens the model reads, where that figure comes from): /api/show's context
        length, capped by EMBED_MAX_INPUT_TOKENS; sent as `num_ctx` with every request."""
        length = _context_length(self.http.get_json(SHOW_PATH, {"model": self.model}))
        limit, source = (length, f"Ollama /api/show context_length of {self.model}") if length \
            else (OLLAMA_DEFAULT_CONTEXT, "Ollama's default context (/api/show gave none)")
        asked = self.settings.EMBED_MAX_INPUT_TOKENS
        if asked and asked < limit:
            limit, source = asked, "EMBED_MAX_INPUT_TOKENS"
        return limit, source

    @cached_property
    def window(self) -> Window:
        limit, source = self.context
        origin = "setting" if source == "EMBED_MAX_INPUT_TOKENS" else \
            "server" if source.startswith("Ollama /api/show") else "assumed"
        counter = windows.counter_for(self.settings, self.model)
        return Window(max(limit - windows.specials(counter), 1), counter, source,
                      self.request_budget(None), origin)

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not self._legacy:
            payload = {"model": self.model, "input": texts,
                       "options": {"num_ctx": self.context[0]},
                       **dimensions.request_field(self.settings.EMBED_DIMENSIONS)}
            try:
                body = self.http.post_json(EMBED_PATH, payload, texts=len(texts))
                return rows_to_array(body.get("embeddings") or [], len(texts), backend=self.name)
            except ModelNotFound:
                raise
            except BackendError as exc:
                dimensions.raise_if_refused(exc, self.model, self.settings.EMBED_DIMENSIONS)
                if exc.status != 404:
                    raise
                self._switch_to_legacy(exc)
        return self._embed_legacy(texts)

    def _switch_to_legacy(self, exc: BackendError) -> None:
        if self.settings.EMBED_DIMENSIONS:  # before a single text goes to the legacy route
            raise ConfigError(dimensions.SETTING, f"is {self.settings.EMBED_DIMENSIONS}, but this "
                              f"Ollama is older than 0.3: its legacy {LEGACY_PATH} cannot shorten "
                              f"vectors ({exc.server_message or exc}). Upgrade Ollama, or unset it.")
        with self._lock:
            if not self._legacy:
                self._legacy = True
                log.warning("Ollama at %s has no %s (%s): this server is older than 0.3; using "
                            "%s, one text per request, %d in parallel. Upgrade Ollama to batch.",
                            mask_url(self.settings.OLLAMA_HOST), EMBED_PATH,
                            exc.server_message or "404", LEGACY_PATH,
                            self.settings.EMBED_MAX_CONCURRENCY)

    def _embed_one(self, text: str) -> np.ndarray:
        body = self.http.post_json(LEGACY_PATH, {"model": self.model, "prompt": text}, texts=1)
        return rows_to_array([body.get("embedding") or []], 1, backend=self.name)[0]

    def _embed_legacy(self, texts: list[str]) -> np.ndarray:
        """One request per text, `slots` at a time. Texts the server refused are named in
        `SomeInputsFailed` with the good vectors; any other failure stops the batch."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.slots, thread_name_prefix="ollama-legacy")
        futures = [self._pool.submit(self._embed_one, text) for text in texts]
        rows, refused = [], {}
        for position, future in enumerate(futures):
            try:
                rows.append(future.result())
            except BadInput as exc:
                refused[position] = exc
                rows.append(None)
        if not refused:
            return rows_to_array(rows, len(texts), backend=self.name)
        dim = next((len(r) for r in rows if r is not None), 0)
        vectors = np.full((len(texts), dim), np.nan, dtype=np.float32)
        for position, row in enumerate(rows):
            if row is not None:
                vectors[position] = row
        raise SomeInputsFailed(vectors, refused)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        super().close()


def _context_length(body) -> int | None:
    """`<architecture>.context_length` from /api/show's model_info.

    >>> _context_length({"model_info": {"general.architecture": "nomic-bert",
    ...                                 "nomic-bert.context_length": 2048}})
    2048
    >>> _context_length(None) is None
    True
    """
    info = body.get("model_info") if isinstance(body, dict) else None
    if not isinstance(info, dict):
        return None
    arch = info.get("general.architecture")
    value = info.get(f"{arch}.context_length") if arch else None
    if value is None:  # any *.context_length will do
        value = next((v for k, v in info.items() if k.endswith(".context_length")), None)
    return int(value) if isinstance(value, (int, float)) and value > 0 else None
