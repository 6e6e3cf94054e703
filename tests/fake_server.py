"""A fake embedding server on 127.0.0.1: real wire formats, counted, with faults.

Speaks OpenAI `/v1/embeddings` (float and base64) and `/v1/models`, Ollama `/api/embed`,
the legacy `/api/embeddings`, `/api/version` and `/api/show`, TEI's `/info` and llama.cpp's
`/props`; refuses long inputs in OpenAI's, vLLM's, TEI's or llama.cpp's words, or cuts
them silently (`truncate_at`), and can answer as another model (`answer_model`). Vectors derive from
sha256(text), so tests can state exactly what they expect. Tokens are counted as OpenAI's
rule of thumb has it (one per 4 UTF-8 bytes); a request over `max_tokens_per_request` is
refused with OpenAI's own message. A rate budget per window (`RateBudget`) answers 429 with
`retry-after` past it and sends OpenAI's `x-ratelimit-*` headers. `dimensions` in a request is
honoured as OpenAI's text-embedding-3 and Ollama's /api/embed do (cut, renormalised), ignored
as TEI does, or refused in OpenAI's or vLLM's words (`dimensions=`). Faults are drawn from a
hash of (seed, request body, how often that body was seen), so a seeded server fails the same
requests whatever order concurrent clients send them in.

Run standalone for benchmarks (the server then does not share the client's GIL):
    python tests/fake_server.py --profile ollama-gpu --dim 768 [--port 0]
prints "READY http://127.0.0.1:PORT"; GET /_stats gives the counters, POST /_reset clears them.
OpenAI's Batch API (files, batches, their output) is `fake_batch_api.py`'s, mounted here; GET
/_batch_stats gives its counters.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from fake_batch_api import FakeBatchAPI

OPENAI, EMBED, LEGACY = "/v1/embeddings", "/api/embed", "/api/embeddings"
ROUTES = (OPENAI, EMBED, LEGACY)
BATCH_ROUTES = ("/v1/files", "/v1/batches")
LEGACY_SCALE = 3.0  # the legacy route's vectors are not unit length: make that visible


@lru_cache(maxsize=200_000)
def _unit(text: str, dim: int) -> np.ndarray:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    vector = np.random.default_rng(int.from_bytes(digest[:8], "little")).standard_normal(dim)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def count_tokens(text: str) -> int:
    """Tokens as OpenAI's rule of thumb counts them: one per 4 UTF-8 bytes."""
    return -(-len(text.encode("utf-8")) // 4)


def expected_vector(text: str, dim: int, normalized: bool = True,
                    model: str | None = None) -> np.ndarray:
    """The float32 vector the fake server returns for `text` (legacy route: normalized=False;
    `model`: of a server with `vectors_by_model`, where each model gives its own vectors)."""
    vector = _unit(text if model is None else f"{model}\x1f{text}", dim)
    return vector if normalized else (vector * np.float32(LEGACY_SCALE)).astype(np.float32)


def read_part(text: str, tokens: int, tokenizer_file: str | None = None) -> str:
    """The part of `text` a model reading `tokens` tokens sees: as `count_tokens` counts
    them, or as a real tokenizer does, which spends two of them on [CLS] and [SEP] (what
    sentence-transformers, infinity and TEI do with a BERT model)."""
    if tokenizer_file is None:
        return text.encode("utf-8")[:4 * tokens].decode("utf-8", "ignore")
    offsets = _tokenizer(tokenizer_file).encode(text, add_special_tokens=False).offsets
    return text if len(offsets) <= tokens - 2 else text[:offsets[tokens - 3][1]]


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(path)
    tokenizer.no_truncation()
    return tokenizer


def shortened_vector(text: str, dim: int, width: int, model: str | None = None) -> np.ndarray:
    """The vector for `text` asked at `width` dimensions: the first `width` values of the
    full one, unit length again (OpenAI's text-embedding-3, Ollama's /api/embed)."""
    vector = expected_vector(text, dim, model=model)[:width]
    return (vector / np.linalg.norm(vector)).astype(np.float32)


#: How real servers refuse `dimensions` for a model that cannot shorten its vectors.
DIMENSION_REFUSALS = {
    "openai-refuse": lambda model: (400, {"error": {
        "message": "This model does not support specifying dimensions.",
        "type": "invalid_request_error", "param": None, "code": None}}),
    "vllm-refuse": lambda model: (400, {
        "object": "error", "message": f'Model "{model}" does not support matryoshka '
        "representation, changing output dimensions will lead to poor results.",
        "type": "BadRequestError", "param": None, "code": 400}),
}


def _openai_refusal(limit: int, asked: int) -> tuple[int, dict]:
    return 400, {"error": {"message": f"This model's maximum context length is {limit} tokens, "
                           f"however you requested {asked} tokens ({asked} in your prompt; 0 for "
                           f"the completion). Please reduce your prompt; or completion length.",
                           "type": "invalid_request_error", "param": None, "code": None}}


def _openai_input_refusal(limit: int, asked: int) -> tuple[int, dict]:
    return 400, {"error": {"message": f"Invalid 'input[0]': maximum input length is {limit} tokens.",
                           "type": "invalid_request_error", "param": "input", "code": None}}


def _vllm_refusal(limit: int, asked: int) -> tuple[int, dict]:
    return 400, {"object": "error", "message": f"This model's maximum context length is {limit} "
                 f"tokens. However, you requested {asked} tokens in the input for embedding "
                 f"generation. Please reduce the length of the input.",
                 "type": "BadRequestError", "param": None, "code": 400}


def _tei_refusal(limit: int, asked: int) -> tuple[int, dict]:
    # TEI with auto_truncate off, on its OpenAI-compatible route (OpenAICompatErrorResponse).
    return 413, {"message": f"Input validation error: `inputs` must have less than {limit} "
                            f"tokens. Given: {asked}", "code": 413, "type": "Validation"}


def _llamacpp_refusal(limit: int, asked: int) -> tuple[int, dict]:
    return 400, {"error": {"code": 400, "message": f"request ({asked} tokens) exceeds the available "
                           f"context size ({limit} tokens), try increasing it",
                           "type": "exceed_context_size_error", "n_prompt_tokens": asked,
                           "n_ctx": limit}}


def _llamacpp_batch_refusal(limit: int, asked: int) -> tuple[int, dict]:
    return 500, {"error": {"code": 500, "message": f"input ({asked} tokens) is too large to process. "
                           f"increase the physical batch size (current batch size: {limit})",
                           "type": "server_error"}}


def go_duration(seconds: float) -> str:
    """A duration as OpenAI's headers write it (Go's `time.Duration`, to the millisecond,
    rounded up): "0s", "20ms", "1s", "8.64s", "6m0s", "1h2m3.5s". The fake's own writer,
    not the client's parser run backwards."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-9))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "") + f"{secs}s"


class RateBudget:
    """A key's budget per window of `window_s` seconds (a minute at OpenAI), in requests
    and tokens, counted in fixed windows from the first request; OpenAI's `x-ratelimit-*`
    headers on every answer (`headers=False`: none, only `retry-after` on a 429). What each
    window accepted is kept (`accepted`), so tests assert on the server's own counts."""

    def __init__(self, tokens: int | None = None, requests: int | None = None,
                 window_s: float = 60.0, headers: bool = True):
        self.tokens, self.requests, self.window_s, self.headers = tokens, requests, window_s, headers
        self.start: float | None = None
        self.accepted: dict[int, list[int]] = {}   # window -> [requests, tokens]
        self.refused = 0

    def admit(self, tokens: int, now: float) -> tuple[bool, dict, str]:
        """(accepted, the headers to send, the refusal's words); called under the lock."""
        self.start = now if self.start is None else self.start
        window = int((now - self.start) // self.window_s)
        spent = self.accepted.setdefault(window, [0, 0])
        reset = self.start + (window + 1) * self.window_s - now
        over = [(kind, limit, used, asked) for kind, limit, used, asked in
                (("requests per min (RPM)", self.requests, spent[0], 1),
                 ("tokens per min (TPM)", self.tokens, spent[1], tokens))
                if limit is not None and used + asked > limit]
        if not over:
            spent[0] += 1
            spent[1] += tokens
        else:
            self.refused += 1
        headers = {}
        for lane, limit, used in (("requests", self.requests, spent[0]), ("tokens", self.tokens, spent[1])):
            if self.headers and limit is not None:
                headers.update({f"x-ratelimit-limit-{lane}": str(limit),
                                f"x-ratelimit-remaining-{lane}": str(max(limit - used, 0)),
                                f"x-ratelimit-reset-{lane}": go_duration(reset)})
        if not over:
            return True, headers, ""
        kind, limit, used, asked = over[0]
        headers["retry-after"] = str(math.ceil(reset))
        return False, headers, (f"Rate limit reached for text-embedding-3-small in organization "
                                f"org-fake on {kind}: Limit {limit}, Used {used}, Requested {asked}. "
                                f"Please try again in {go_duration(reset)}. Visit "
                                f"https://platform.openai.com/account/rate-limits to learn more.")


#: How real servers refuse an input over their window: (status, JSON body) for (limit, asked).
REFUSALS = {"openai": _openai_refusal, "openai-input": _openai_input_refusal,
            "vllm": _vllm_refusal, "tei": _tei_refusal, "llamacpp": _llamacpp_refusal,
            "llamacpp-batch": _llamacpp_batch_refusal}


@dataclass(frozen=True)
class LatencyModel:
    """Time a real server takes: per request, per text, `slots` requests at once."""

    per_request_ms: float
    per_text_ms: float
    slots: int = 1
    max_batch: int | None = None
    rate_429: float = 0.0
    rate_5xx: float = 0.0
    retry_after_s: float = 1.0


PROFILES = {
    "ollama-gpu": LatencyModel(12, 1.5, slots=1, max_batch=512),
    "hosted-api": LatencyModel(250, 0.05, slots=8, rate_429=0.02, retry_after_s=0.5),
    "flaky": LatencyModel(12, 1.5, slots=1, rate_429=0.2, rate_5xx=0.05, retry_after_s=0.05),
}


class FakeEmbeddingServer:
    """Context manager serving on http://127.0.0.1:<free port>. Fault knobs are attributes."""

    def __init__(self, dim: int = 384, latency: LatencyModel | None = None, *, seed: int | None = 0,
                 port: int = 0, **faults):
        self.dim, self.latency = dim, latency
        self.seed = random.randrange(2**32) if seed is None else seed
        self.rate_429 = self.rate_5xx = self.drop_rate = 0.0
        self.retry_after_s: float | None = 1.0
        self.retry_after_ms: float | None = None
        self.slow_s, self.slow_first = 0.0, 0
        self.poison: set[str] = set()
        self.max_batch: int | None = None
        self.legacy_only = self.shuffle_index = self.empty_vectors = False
        self.wrong_dim: int | None = None
        self.known_models: set[str] | None = None
        self.require_key: str | None = None
        self.version = "0.5.7"                 # what /api/version says (legacy_only: 0.2.8)
        self.context_length: int | None = 2048  # /api/show's model_info; None: no such route
        self.max_tokens_per_request: int | None = None
        self.max_input_tokens: int | None = None
        self.refusal = "openai"                # wording of the max_input_tokens refusal (REFUSALS)
        self.truncate_at: int | None = None    # silently read only the first N tokens of each input
        self.tokenizer_file: str | None = None  # ...counted by this tokenizer.json, [CLS]/[SEP] too
        self.answer_model: str | None = None   # infinity: serves one model under any name, says which
        self.max_model_len: int | None = None  # vLLM: in each /v1/models entry
        self.info_max_input_length: int | None = None  # TEI: GET /info
        self.props_n_ctx: int | None = None    # llama.cpp: GET /props
        self.refuse_base64 = False             # 400 on encoding_format=base64
        self.ignore_base64 = False             # answer floats whatever was asked
        self.fail_after: int | None = None     # 503 to every request after this many answered
        self.budget: RateBudget | None = None  # a rate budget per window, with OpenAI's headers
        self.dimensions = "matryoshka"         # `dimensions`: matryoshka, ignore, or DIMENSION_REFUSALS
        self.vectors_by_model = False          # each model its own vectors (else one set for all)
        if latency:
            self.max_batch, self.rate_429, self.rate_5xx = latency.max_batch, latency.rate_429, latency.rate_5xx
            self.retry_after_s = latency.retry_after_s
        for name, value in faults.items():
            if not hasattr(self, name):
                raise TypeError(f"unknown fault {name!r}")
            setattr(self, name, value)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._inflight = 0
        self._slots = threading.Semaphore(latency.slots if latency else 1_000_000)
        self.reset()
        self.batch_api = FakeBatchAPI(lambda text: self.vector(text, OPENAI), count_tokens)
        self._httpd = _Server(("127.0.0.1", port), _Handler)
        self._httpd.fake = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self.openai_url = self.url + "/v1"
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------
    def start(self) -> "FakeEmbeddingServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.01,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop as a killed server would: no new connections, and the open keep-alive ones
        are cut (a client finds its connection reset, not a server still answering)."""
        if self._thread is not None:  # shutdown() waits forever on a server never started
            self._httpd.shutdown()
            self._thread = None
        self._httpd.server_close()
        with self._lock:
            open_connections = list(self._httpd.connections)
        for connection in open_connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "FakeEmbeddingServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- counters -----------------------------------------------------------------
    def reset(self, wait_s: float = 5.0) -> None:
        """Zero the counters, after the requests still in flight have finished.

        A killed client leaves its request running here; counting it after the
        reset would charge the next run for it.
        """
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0, timeout=wait_s)
            self.counts = {route: {"requests": 0, "texts": 0} for route in ROUTES}
            self.auth_headers: list[str | None] = []
            self.batch_sizes: list[int] = []
            self.busy: list[tuple[float, float]] = []  # (start, end) of modelled work
            self.statuses: dict[int, int] = {}
            self.bodies: list[dict] = []               # every decoded request body, in order
            self.tokens_per_request: list[int] = []    # of the requests that were answered
            self._seen: dict[str, int] = {}

    def total_requests(self, route: str | None = None) -> int:
        return sum(c["requests"] for r, c in self.counts.items() if route in (None, r))

    def total_texts(self, route: str | None = None) -> int:
        return sum(c["texts"] for r, c in self.counts.items() if route in (None, r))

    def _count(self, route: str, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[route][key] += n

    # --- faults -------------------------------------------------------------------
    def _draws(self, body: bytes) -> random.Random:
        """Deterministic per (seed, body, attempt): concurrency does not change the faults."""
        digest = hashlib.sha256(body).hexdigest()
        with self._lock:
            attempt = self._seen.get(digest, 0)
            self._seen[digest] = attempt + 1
        return random.Random(f"{self.seed}|{digest}|{attempt}")

    def _take_slow(self) -> bool:
        with self._lock:
            if self.slow_first > 0:
                self.slow_first -= 1
                return True
            return False

    # --- one request --------------------------------------------------------------
    def handle(self, req: "_Handler", route: str, raw: bytes) -> None:
        with self._lock:
            self._inflight += 1
        try:
            self._handle(req, route, raw)
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def _handle(self, req: "_Handler", route: str, raw: bytes) -> None:
        self._count(route, "requests")
        if route == EMBED and self.legacy_only:  # Go's mux on Ollama < 0.3
            return req.reply(404, b"404 page not found", "text/plain")
        try:
            body = json.loads(raw)
        except ValueError:
            return self.error(req, route, 400, "invalid JSON body")
        auth = req.headers.get("Authorization")
        with self._lock:
            self.auth_headers.append(auth)
            self.bodies.append(body)
        if self.require_key and auth != f"Bearer {self.require_key}":
            # Echo the key like a careless proxy would: clients must scrub it.
            return self.error(req, route, 401, f"Incorrect API key provided: {auth}",
                              code="invalid_api_key")
        model = body.get("model", "")
        if self.known_models is not None and model not in self.known_models:
            if route == OPENAI:
                return self.error(req, route, 404, f"The model `{model}` does not exist or you do "
                                  "not have access to it.", code="model_not_found")
            return self.error(req, route, 404, f'model "{model}" not found, try pulling it first')
        texts = body.get("prompt") if route == LEGACY else body.get("input")
        texts = [texts] if isinstance(texts, str) else list(texts or [])
        draws = self._draws(raw)
        if draws.random() < self.drop_rate:
            req.close_connection = True
            return None  # no answer: the client sees the connection dropped
        if draws.random() < self.rate_429:
            headers = {}
            if self.retry_after_s is not None:
                headers["Retry-After"] = f"{self.retry_after_s:g}"
            if self.retry_after_ms is not None:
                headers["retry-after-ms"] = f"{self.retry_after_ms:g}"
            return self.error(req, route, 429, "Rate limit reached, retry later.",
                              code="rate_limit_exceeded", headers=headers)
        budget_headers = {}
        if self.budget is not None:
            with self._lock:
                ok, budget_headers, said = self.budget.admit(sum(map(count_tokens, texts)),
                                                             time.monotonic())
            if not ok:
                return self.error(req, route, 429, said, code="rate_limit_exceeded",
                                  headers=budget_headers, kind="tokens")
        if draws.random() < self.rate_5xx:
            return self.error(req, route, draws.choice((500, 502, 503)), "server overloaded")
        if self.fail_after is not None and len(self.batch_sizes) >= self.fail_after:
            # a server that went down midway
            return self.error(req, route, 503, "server went away")
        if self._take_slow():
            time.sleep(self.slow_s)  # past the client's timeout: it has given up by now
        if self.max_batch is not None and len(texts) > self.max_batch:
            return self.error(req, route, 413, f"batch size {len(texts)} exceeds the maximum "
                              f"of {self.max_batch} inputs")
        tokens = [count_tokens(t) for t in texts]
        if self.max_input_tokens is not None and max(tokens, default=0) > self.max_input_tokens:
            status, payload = REFUSALS[self.refusal](self.max_input_tokens, max(tokens))
            return req.reply(status, json.dumps(payload).encode())
        if self.max_tokens_per_request is not None and sum(tokens) > self.max_tokens_per_request:
            return self.error(req, route, 400, f"Requested {sum(tokens)} tokens, max "
                              f"{self.max_tokens_per_request} tokens per request",
                              code="max_tokens_per_request", kind="max_tokens_per_request")
        if route == OPENAI and body.get("encoding_format") == "base64" and self.refuse_base64:
            return self.error(req, route, 400, "encoding_format 'base64' is not supported; "
                              "use 'float'", code="invalid_value")
        if route != LEGACY and body.get("dimensions") is not None \
                and self.dimensions in DIMENSION_REFUSALS:
            status, refusal = DIMENSION_REFUSALS[self.dimensions](model)
            return req.reply(status, json.dumps(refusal).encode())
        bad = [i for i, t in enumerate(texts) if t in self.poison]
        if bad:
            names = ", ".join(f"input {i} ({texts[i][:30]!r})" for i in bad)
            return self.error(req, route, 400, f"cannot embed {names}: forbidden content")
        if self.latency:
            # A slot is busy for exactly the modelled time; encoding the reply happens inside
            # it, so this fake's Python JSON encoder does not count against the client.
            with self._slots:
                start = time.perf_counter()
                payload = json.dumps(self.answer(route, body, texts, draws)).encode()
                model_s = (self.latency.per_request_ms + self.latency.per_text_ms * len(texts)) / 1000
                time.sleep(max(0.0, model_s - (time.perf_counter() - start)))
                with self._lock:
                    self.busy.append((start, time.perf_counter()))
        else:
            payload = json.dumps(self.answer(route, body, texts, draws)).encode()
        with self._lock:
            self.batch_sizes.append(len(texts))
            self.tokens_per_request.append(sum(tokens))
        self._count(route, "texts", len(texts))
        req.reply(200, payload, headers=budget_headers)

    def vector(self, text: str, route: str, width: int | None = None,
               model: str | None = None) -> np.ndarray:
        if self.truncate_at is not None:  # what the model reads: its first N tokens
            text = read_part(text, self.truncate_at, self.tokenizer_file)
        if self.empty_vectors:
            return np.zeros(0, dtype=np.float32)
        dim = self.wrong_dim or self.dim
        model = model if self.vectors_by_model else None
        if width and 0 < width < dim and self.dimensions == "matryoshka":
            return shortened_vector(text, dim, width, model)
        return expected_vector(text, dim, normalized=route != LEGACY, model=model)

    def answer(self, route: str, body: dict, texts: list[str], draws: random.Random) -> dict:
        model = self.answer_model or body.get("model") or ""
        if route == LEGACY:
            return {"embedding": self.vector(texts[0], route, model=model).tolist()}
        width = body.get("dimensions")
        if route == EMBED:
            return {"model": body.get("model"),
                    "embeddings": [self.vector(t, route, width, model).tolist() for t in texts],
                    "total_duration": 1_000_000, "load_duration": 1000,
                    "prompt_eval_count": sum(len(t.split()) for t in texts)}
        b64 = body.get("encoding_format") == "base64" and not self.ignore_base64
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(self.vector(t, route, width, model).astype("<f4").tobytes()).decode()
                 if b64 else self.vector(t, route, width, model).tolist()} for i, t in enumerate(texts)]
        if self.shuffle_index:
            draws.shuffle(data)
        tokens = sum(count_tokens(t) for t in texts)  # what it bills: the tokens it counted
        return {"object": "list", "data": data, "model": self.answer_model or body.get("model"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def error(self, req: "_Handler", route: str, status: int, message: str, *, code: str | None = None,
              headers: dict | None = None, kind: str | None = None) -> None:
        if route == OPENAI:
            kind = kind or ("invalid_request_error" if status < 500 else "server_error")
            payload = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        else:
            payload = {"error": message}
        req.reply(status, json.dumps(payload).encode(), headers=headers)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    fake: FakeEmbeddingServer

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections: set[socket.socket] = set()  # open ones, cut by stop()

    def handle_error(self, request, client_address) -> None:
        pass  # a client that timed out and hung up (slow_s) is expected, not news


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real servers
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.fake._lock:
            self.server.connections.add(self.connection)
        # Headers and body go out in two writes: without this, Nagle's algorithm and
        # delayed ACKs add 40 ms to every response, which would swamp the latency model.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.fake._lock:
                self.server.connections.discard(self.connection)

    def log_message(self, *args) -> None:  # quiet: tests and benchmarks read stdout
        pass

    def reply(self, status: int, payload: bytes, content_type: str = "application/json",
              headers: dict | None = None) -> None:
        fake = self.server.fake
        with fake._lock:
            fake.statuses[status] = fake.statuses.get(status, 0) + 1
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        if self.path.startswith(BATCH_ROUTES):  # OpenAI's Batch API (fake_batch_api.py)
            return self.server.fake.batch_api.handle(self, "GET", b"")
        if self.path == "/_batch_stats":  # the Batch API's counters, for benchmarks
            return self.reply(200, json.dumps(self.server.fake.batch_api.stats()).encode())
        if self.path == "/_stats":
            return self.reply(200, json.dumps(self.server.fake.counts).encode())
        fake = self.server.fake
        if self.path == "/api/version":  # Ollama: /api/embed arrived in 0.3.0
            version = "0.2.8" if fake.legacy_only else fake.version
            return self.reply(200, json.dumps({"version": version}).encode())
        if self.path == "/v1/models":
            models = [fake.answer_model] if fake.answer_model else \
                sorted(fake.known_models or {"text-embedding-3-small"})
            extra = {"max_model_len": fake.max_model_len} if fake.max_model_len else {}
            return self.reply(200, json.dumps({"object": "list", "data": [
                {"id": m, "object": "model", "owned_by": "fake", **extra} for m in models]}).encode())
        if self.path == "/info" and fake.info_max_input_length:  # TEI's router Info
            return self.reply(200, json.dumps({
                "model_id": fake.answer_model or "sentence-transformers/all-MiniLM-L6-v2",
                "model_sha": None, "model_dtype": "float16",
                "model_type": {"embedding": {"pooling": "mean"}}, "max_concurrent_requests": 512,
                "max_input_length": fake.info_max_input_length, "max_batch_tokens": 16384,
                "max_batch_requests": None, "max_client_batch_size": 32, "auto_truncate": True,
                "tokenization_workers": 4, "version": "1.9.0"}).encode())
        if self.path == "/props" and fake.props_n_ctx:  # llama.cpp's server
            return self.reply(200, json.dumps({
                "default_generation_settings": {"n_ctx": fake.props_n_ctx, "id": 0},
                "total_slots": 1, "model_path": "models/all-MiniLM-L6-v2-f16.gguf",
                "chat_template": "", "build_info": "b5000"}).encode())
        if self.path == "/_busy":  # when the server was working: does it ever wait for us?
            return self.reply(200, json.dumps(self.server.fake.busy).encode())
        self.reply(404, b"404 page not found", "text/plain")

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/_reset":
            self.server.fake.reset()
            return self.reply(200, b"{}")
        fake = self.server.fake
        if self.path.startswith(BATCH_ROUTES):
            return fake.batch_api.handle(self, "POST", raw)
        if self.path == "/api/show" and fake.context_length is not None:
            model = (json.loads(raw or b"{}").get("model") or "")
            return self.reply(200, json.dumps({"details": {"family": "nomic-bert"}, "model_info": {
                "general.architecture": "nomic-bert",
                "nomic-bert.context_length": fake.context_length,
                "nomic-bert.embedding_length": fake.dim}, "model": model}).encode())
        if self.path not in ROUTES:
            return self.reply(404, b"404 page not found", "text/plain")
        self.server.fake.handle(self, self.path, raw)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    server = FakeEmbeddingServer(args.dim, PROFILES.get(args.profile), seed=args.seed, port=args.port)
    print(f"READY {server.url}", flush=True)
    try:
        server._httpd.serve_forever(0.05)
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()


if __name__ == "__main__":
    sys.exit(main())
