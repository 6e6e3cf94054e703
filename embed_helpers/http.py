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
from typing import Any, Callable

import requests
from requests.adapters import HTTPAdapter

from .config import Settings, mask, mask_url
from .constants import CONNECT_TIMEOUT_S, MAX_TIMEOUT_RETRIES
from .errors import (AuthenticationError, BackendError, BackendUnreachable, BadInput,
                     BatchTooLarge, InputTooLong, ModelNotFound,
                     WrongRoute)
from .rate_governor import for_client
from .refusals import (INPUT_TOO_LONG, MODEL_MISSING, TOO_LARGE, error_code, server_message,
                       stated_window)
from .retry import retry_delay, should_retry
from .servers import ServerPool

log = logging.getLogger(__name__)

class HttpClient:
    """One keep-alive `requests.Session` for a backend's servers, pooled for its concurrency.

    Args:
        base_urls: one or more servers serving the same model ("http://localhost:11434");
            each request goes to the least busy one (`servers.ServerPool`).
        backend: the backend name used in messages and errors.
        service: what the user calls the server ("Ollama", "the embedding API").
        url_setting: the setting holding the URLs, named in hints.
        headers: sent with every request (auth); never logged.
        secret: scrubbed from every message (the API key).
        model_hint, unreachable_hint, auth_hint: the fix for each kind of failure.
        sleep, rng: injectable so retry tests run instantly and deterministically.
    """

    def __init__(self, base_urls: str | list[str], settings: Settings, *, backend: str,
                 service: str, url_setting: str, headers: dict | None = None,
                 secret: str | None = None, model_hint: str = "", unreachable_hint: str = "",
                 auth_hint: str = "", sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None):
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        self.pool = ServerPool([u.rstrip("/") for u in urls])
        self.settings = settings
        self.backend, self.service, self.url_setting = backend, service, url_setting
        self.secret = secret
        self.model_hint = model_hint
        self.auth_hint = auth_hint or (f"Check OPENAI_API_KEY (now {mask(secret) if secret else 'not set'}) "
                                       f"and its access to the model.")
        self.unreachable_hint = unreachable_hint or f"Is {url_setting} right?"
        self.sleep, self.rng = sleep, rng or random.Random()
        self.session = requests.Session()
        per_server = max(settings.EMBED_MAX_CONCURRENCY, 1)
        adapter = HTTPAdapter(pool_connections=len(self.pool), pool_maxsize=per_server + 1,
                              max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update(headers or {})
        self._lock = threading.Lock()
        self._counts = {"requests": 0, "retries": 0, "texts": 0, "tokens": 0, "retry_wait_s": 0.0}
        self.governor = for_client(settings, urls, secret, sleep=sleep)  # the rate budget

    # --- counters -----------------------------------------------------------------
    def _count(self, name: str, amount: float = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def count_tokens(self, tokens: int) -> None:
        """Tokens a server said it billed for a request (OpenAI's `usage`)."""
        self._count("tokens", tokens)
        self.governor.billed(tokens)

    def stats(self) -> dict:
        with self._lock:
            counts = dict(self._counts)
        return {**counts, **self.governor.counters(), "servers": self.pool.stats()}

    def close(self) -> None:
        self.session.close()
        self.governor.close()

    # --- the request --------------------------------------------------------------
    def get_json(self, path: str, payload: dict | None = None, *, root: bool = False) -> Any:
        """A small JSON document (a version, a model's facts) from the first live server:
        GET, or POST with `payload`. None when none answers it; never retried, callers fall
        back to a default. `root`: the path is under the server's root, not its `/v1`
        (TEI's `/info`, llama.cpp's `/props`)."""
        timeout = (CONNECT_TIMEOUT_S, CONNECT_TIMEOUT_S)
        for _ in range(len(self.pool)):
            server = self.pool.acquire(count=False)
            url = (re.sub(r"/v1$", "", server.url) if root else server.url) + path
            try:
                response = self.session.post(url, json=payload, timeout=timeout) \
                    if payload is not None else self.session.get(url, timeout=timeout)
            except requests.RequestException:
                self.pool.release(server, ok=False, down=True)
                continue
            self.pool.release(server, ok=True)
            try:
                return response.json() if response.ok else None
            except ValueError:
                return None
        return None

    def post_json(self, path: str, payload: dict | None, *, texts: int = 0, send=None,
                  raw: bool = False) -> Any:
        """POST JSON, retrying per `retry.py`; return the decoded JSON body. `send(session,
        url, timeout)`: another request (a GET, an upload) through the same retries; `raw`:
        the body as text (a JSONL file).

        `texts` is how many inputs the payload carries, counted once it succeeds. A server
        that does not answer is set aside and the request goes to another at once.
        Raises one of the `errors.BackendError` classes when retries do not help.
        """
        max_retries = self.settings.EMBED_MAX_RETRIES
        timeout = (CONNECT_TIMEOUT_S, self.settings.EMBEDDING_TIMEOUT)
        timeouts = 0
        for attempt in range(max_retries + 1):
            ticket = self.governor.acquire(payload)  # waits while the rate budget is spent
            server = self.pool.acquire()
            url = server.url + path
            self._count("requests")
            started = time.perf_counter()
            try:
                response = send(self.session, url, timeout) if send else \
                    self.session.post(url, json=payload, timeout=timeout)
            except requests.RequestException as exc:
                retry = should_retry(exc)
                self.pool.release(server, ok=False, down=retry)
                if isinstance(exc, requests.ReadTimeout):  # a hung server: once more, not
                    timeouts += 1                           # max_retries x the timeout
                    retry = retry and timeouts <= MAX_TIMEOUT_RETRIES
                if attempt < max_retries and retry:
                    self._again(attempt, None, f"{type(exc).__name__} from {mask_url(server.url)}")
                    continue
                raise self._transport_error(exc, server.url, attempt + 1) from None
            self.governor.observe(ticket, response.status_code, response.headers)
            if response.ok:
                try:
                    body = response.text if raw else response.json()
                except ValueError:
                    self.pool.release(server, ok=False)
                    raise BackendError(f"{self.service} at {url} answered HTTP "
                                       f"{response.status_code} with a body that is not JSON.",
                                       backend=self.backend, status=response.status_code,
                                       hint=f"Is {self.url_setting} the embedding server?") from None
                self.pool.release(server, ok=True, texts=texts, started=started)
                self._count("texts", texts)
                return body
            # A 5xx counts against the server; a 4xx or 429 says nothing about its health.
            self.pool.release(server, ok=response.status_code < 500)
            if attempt < max_retries and should_retry(response.status_code):
                self._again(attempt, response.headers, f"HTTP {response.status_code} on {path}")
                continue
            raise self._status_error(response, url, attempt + 1)
        raise AssertionError("unreachable")  # the loop always returns or raises

    def _again(self, attempt: int, headers, what: str) -> None:
        """Before a retry: none when another server is ready for a request that found no
        server; else the delay `retry.py` says."""
        if headers is None and len(self.pool) > 1 and self.pool.any_ready():
            log.debug("%s: %s; trying another server", self.backend, what)
            self._count("retries")
            return
        self._wait(attempt, headers, what)

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
                self.scrub(f"{self.service} at {mask_url(url)} sent no answer within "
                           f"EMBEDDING_TIMEOUT={self.settings.EMBEDDING_TIMEOUT:g}s ({tries})."),
                backend=self.backend,
                hint="The server may be hung or overloaded: check it (and its logs). If it is "
                     "only slow for this batch size, lower EMBED_BATCH_SIZE or "
                     "EMBED_MAX_CONCURRENCY, or raise EMBEDDING_TIMEOUT.")
        others = (f"; none of the {len(self.pool)} servers of {self.url_setting} answered: "
                  f"{', '.join(mask_url(s.url) for s in self.pool.servers)}") \
            if len(self.pool) > 1 else ""
        return BackendUnreachable(
            self.scrub(f"Cannot reach {self.service} at {mask_url(url)} ({type(exc).__name__} "
                       f"{tries}{others})."), backend=self.backend, hint=self.unreachable_hint)

    def _status_error(self, response: requests.Response, url: str, attempts: int) -> BackendError:
        status = response.status_code
        said = self.scrub(server_message(response))
        where = f"{self.service} at {mask_url(url)} answered HTTP {status}"
        kw = dict(backend=self.backend, status=status, server_message=said)
        if status in (401, 403):
            return AuthenticationError(f"{where}: not authorised.", hint=self.auth_hint, **kw)
        code = error_code(response)
        if status in (400, 404) and (code == "model_not_found" or MODEL_MISSING.search(said)):
            return ModelNotFound(f"{where}: the model is not there.", hint=self.model_hint, **kw)
        limit = stated_window(response, said)
        if status in (400, 413, 422, 500) and (limit or INPUT_TOO_LONG.search(said)):
            return InputTooLong(f"{where}: an input is longer than the model reads"
                                f"{f' ({limit} tokens)' if limit else ''}.", limit=limit,
                                hint="Set EMBED_MAX_INPUT_TOKENS to the model's window.", **kw)
        if status == 413 or (status in (400, 422) and (TOO_LARGE.search(said)
                                                       or code == "max_tokens_per_request")):
            return BatchTooLarge(f"{where}: the batch is too large.",
                                 hint="Lower EMBED_BATCH_SIZE.", **kw)
        if status in (400, 422):
            return BadInput(f"{where}: it rejected the input.", **kw)
        if status in (404, 405, 501):
            return WrongRoute(f"{where} to a POST: this URL is not an embedding route, and "
                              f"asking again will not change that.",
                              hint=f"Is {self.url_setting} right? It must be the server's base URL "
                                   f"(such as http://localhost:11434 for Ollama, or "
                                   f"http://localhost:8000/v1 for an OpenAI-compatible server).",
                              **kw)
        if status == 429:
            return BackendError(f"{where} after {attempts} attempts: rate limited.",
                                hint="Set EMBED_MAX_TPM / EMBED_MAX_RPM to the key's limits where the "
                                     "server states none, or raise EMBED_MAX_RETRIES.", **kw)
        if should_retry(status):
            return BackendError(f"{where} after {attempts} attempts: the server is failing.",
                                hint="Check the server and its logs, then run again: what was "
                                     "embedded so far is cached and will not be paid again.", **kw)
        return BackendError(f"{where}.", **kw)
