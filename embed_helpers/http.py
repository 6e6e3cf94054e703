"""The one boundary where HTTP meets our errors.

Every request of the HTTP backends passes `HttpClient.post_json`: it retries what
`retry.py` says is worth retrying, and turns every other transport or HTTP
failure into an `errors.py` class whose message says what to do. Secrets are
scrubbed from every message it builds.
"""
from __future__ import annotations

import logging
import random
import re
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np
import requests
from requests.adapters import HTTPAdapter

from .config import Settings, mask
from .constants import CONNECT_TIMEOUT_S
from .errors import (AuthenticationError, BackendError, BackendUnreachable, BadInput,
                     BatchTooLarge, EmbeddingValidationError, ModelNotFound)
from .retry import retry_delay, should_retry

log = logging.getLogger(__name__)

# A 400/422 with one of these means "send fewer or shorter inputs", not "bad content".
_TOO_LARGE = re.compile(
    r"too many inputs|batch size|too large|too long|maximum context length|"
    r"must have less than|exceeds? (the )?(max|limit)|max(imum)? (number of )?inputs",
    re.IGNORECASE)
_MODEL_MISSING = re.compile(r"model.*(not found|does not exist|not exist)", re.IGNORECASE)


def server_message(response: requests.Response) -> str:
    """The server's own error text from any of the JSON shapes in use, else the body.

    OpenAI {"error": {"message"}}, Ollama and TEI {"error": "..."}, vLLM {"message"}.
    """
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if body.get("message"):
            return str(body["message"])
    return str(body)[:300]


def rows_to_array(rows: Sequence[Sequence[float]], expected: int, *, backend: str) -> np.ndarray:
    """Decoded JSON vectors as a float32 (n, dim) array; wrong count or ragged rows raise.

    >>> rows_to_array([[1, 2], [3, 4]], 2, backend="x").shape
    (2, 2)
    """
    if len(rows) != expected:
        raise EmbeddingValidationError(
            f"{backend} returned {len(rows)} vectors for {expected} texts; the server or a "
            f"proxy dropped some. Check the server's logs; nothing was written.")
    lengths = [len(row) for row in rows]
    if lengths and len(set(lengths)) > 1:
        common = max(set(lengths), key=lengths.count)
        odd = [i for i, length in enumerate(lengths) if length != common]
        raise EmbeddingValidationError(
            f"{backend} returned vectors of different lengths {sorted(set(lengths))} in one "
            f"batch (positions {odd[:10]}); nothing was written.", positions=odd)
    return np.asarray(rows, dtype=np.float32).reshape(expected, lengths[0] if lengths else 0)


class HttpClient:
    """One keep-alive `requests.Session` for one backend, pooled for its concurrency.

    Args:
        base_url: e.g. "http://localhost:11434"; paths are appended.
        backend: the backend name used in messages and errors.
        service: what the user calls the server ("Ollama", "the embedding API").
        url_setting: the setting holding base_url, named in hints.
        headers: sent with every request (auth); never logged.
        secret: scrubbed from every message (the API key).
        model_hint, unreachable_hint, auth_hint: the fix for each kind of failure.
        sleep, rng: injectable so retry tests run instantly and deterministically.
    """

    def __init__(self, base_url: str, settings: Settings, *, backend: str, service: str,
                 url_setting: str, headers: dict | None = None, secret: str | None = None,
                 model_hint: str = "", unreachable_hint: str = "", auth_hint: str = "",
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None):
        self.base_url = base_url.rstrip("/")
        self.settings = settings
        self.backend, self.service, self.url_setting = backend, service, url_setting
        self.secret = secret
        self.model_hint = model_hint
        self.auth_hint = auth_hint or (f"Check OPENAI_API_KEY (now {mask(secret) if secret else 'not set'}) "
                                       f"and its access to the model.")
        self.unreachable_hint = unreachable_hint or f"Is {url_setting} right?"
        self.sleep, self.rng = sleep, rng or random.Random()
        self.session = requests.Session()
        pool = max(settings.EMBED_MAX_CONCURRENCY, 1)
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update(headers or {})
        self._lock = threading.Lock()
        self._counts = {"requests": 0, "retries": 0, "texts": 0, "retry_wait_s": 0.0}

    # --- counters -----------------------------------------------------------------
    def _count(self, name: str, amount: float = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def stats(self) -> dict:
        with self._lock:
            return dict(self._counts)

    def close(self) -> None:
        self.session.close()

    # --- the request --------------------------------------------------------------
    def post_json(self, path: str, payload: dict, *, texts: int = 0) -> Any:
        """POST JSON, retrying per `retry.py`; return the decoded JSON body.

        `texts` is how many inputs the payload carries, counted once it succeeds.
        Raises one of the `errors.BackendError` classes when retries do not help.
        """
        url = self.base_url + path
        max_retries = self.settings.EMBED_MAX_RETRIES
        timeout = (CONNECT_TIMEOUT_S, self.settings.EMBEDDING_TIMEOUT)
        for attempt in range(max_retries + 1):
            self._count("requests")
            try:
                response = self.session.post(url, json=payload, timeout=timeout)
            except requests.RequestException as exc:
                if attempt < max_retries and should_retry(exc):
                    self._wait(attempt, None, f"{type(exc).__name__} on {path}")
                    continue
                raise self._transport_error(exc, url, attempt + 1) from None
            if response.ok:
                try:
                    body = response.json()
                except ValueError:
                    raise BackendError(f"{self.service} at {url} answered HTTP "
                                       f"{response.status_code} with a body that is not JSON.",
                                       backend=self.backend, status=response.status_code,
                                       hint=f"Is {self.url_setting} the embedding server?") from None
                self._count("texts", texts)
                return body
            if attempt < max_retries and should_retry(response.status_code):
                self._wait(attempt, response.headers, f"HTTP {response.status_code} on {path}")
                continue
            raise self._status_error(response, url, attempt + 1)
        raise AssertionError("unreachable")  # the loop always returns or raises

    def _wait(self, attempt: int, headers, what: str) -> None:
        delay = retry_delay(attempt, headers, self.settings.EMBED_BACKOFF_MS, self.rng)
        log.debug("%s: %s; retry %d/%d in %.3fs", self.backend, what, attempt + 1,
                  self.settings.EMBED_MAX_RETRIES, delay)
        self._count("retries")
        self._count("retry_wait_s", delay)
        self.sleep(delay)

    # --- translation --------------------------------------------------------------
    def scrub(self, text: str) -> str:
        """`text` with the secret replaced by its masked form."""
        if self.secret and self.secret in text:
            text = text.replace(self.secret, mask(self.secret))
        return text

    def _transport_error(self, exc: Exception, url: str, attempts: int) -> BackendError:
        tries = f"after {attempts} attempt{'s' if attempts > 1 else ''}"
        if isinstance(exc, requests.ReadTimeout):
            return BackendUnreachable(
                self.scrub(f"{self.service} at {url} sent no answer within EMBEDDING_TIMEOUT="
                           f"{self.settings.EMBEDDING_TIMEOUT:g}s ({tries})."),
                backend=self.backend,
                hint="Raise EMBEDDING_TIMEOUT, or lower EMBED_BATCH_SIZE / EMBED_MAX_CONCURRENCY.")
        return BackendUnreachable(
            self.scrub(f"Cannot reach {self.service} at {self.base_url} ({type(exc).__name__} "
                       f"{tries})."), backend=self.backend, hint=self.unreachable_hint)

    def _status_error(self, response: requests.Response, url: str, attempts: int) -> BackendError:
        status = response.status_code
        said = self.scrub(server_message(response))
        where = f"{self.service} at {url} answered HTTP {status}"
        kw = dict(backend=self.backend, status=status, server_message=said)
        if status in (401, 403):
            return AuthenticationError(f"{where}: not authorised.", hint=self.auth_hint, **kw)
        code = _error_code(response)
        if status in (400, 404) and (code == "model_not_found" or _MODEL_MISSING.search(said)):
            return ModelNotFound(f"{where}: the model is not there.", hint=self.model_hint, **kw)
        if status == 413 or (status in (400, 422) and _TOO_LARGE.search(said)):
            return BatchTooLarge(f"{where}: the batch is too large.",
                                 hint="Lower EMBED_BATCH_SIZE.", **kw)
        if status in (400, 422):
            return BadInput(f"{where}: it rejected the input.", **kw)
        if status == 404:
            return BackendError(f"{where}: no such route.",
                                hint=f"Is {self.url_setting} right?", **kw)
        if should_retry(status):
            return BackendError(f"{where} after {attempts} attempts.",
                                hint="Raise EMBED_MAX_RETRIES or lower EMBED_MAX_CONCURRENCY.", **kw)
        return BackendError(f"{where}.", **kw)


def _error_code(response: requests.Response) -> str:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return ""
    return str(error.get("code") or "") if isinstance(error, dict) else ""
