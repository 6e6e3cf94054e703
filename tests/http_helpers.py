"""Helpers shared by the tests of the HTTP backends (test_http_*.py, test_servers.py).

Sleeps are injected and recorded, so retry tests run instantly and can assert the delays;
settings come from explicit values only (no .env, no environment).
"""
import socket
from pathlib import Path

import numpy as np
from fake_server import EMBED, OPENAI, expected_vector

from embed_helpers.backends.llm_api import OpenAIBackend
from embed_helpers.backends.ollama import OllamaBackend
from embed_helpers.config import load_settings

DIM = 32
ROUTE = {"llm_api": OPENAI, "ollama": EMBED}
CLASSES = {"llm_api": OpenAIBackend, "ollama": OllamaBackend}


class Sleeps(list):
    """An injected sleep that only records."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def settings_for(servers, backend="llm_api", **overrides):
    """Settings for one fake server or several (OLLAMA_HOST / OPENAI_BASE_URL as lists)."""
    servers = servers if isinstance(servers, (list, tuple)) else [servers]
    values = dict(EMBEDDING_BACKEND=backend,
                  OPENAI_BASE_URL=",".join(s.url + "/v1" for s in servers),
                  OLLAMA_HOST=",".join(s.url for s in servers), EMBED_BATCH_SIZE=100,
                  EMBED_BACKOFF_MS=1, EMBEDDING_TIMEOUT=5)
    values.update(overrides)
    return load_settings(values, environ={}, env_file=Path("/nonexistent/.env"))


def make_backend(servers, backend="llm_api", sleep=None, **overrides):
    return CLASSES[backend](settings_for(servers, backend, **overrides),
                           sleep=Sleeps() if sleep is None else sleep)


def expected(texts, normalized=True):
    return np.stack([expected_vector(t, DIM, normalized) for t in texts])


def closed_port_url() -> str:
    """The URL of a loopback port nothing listens on (refused at once, not hanging)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def sent_inputs(server) -> list[str]:
    """Every input text the server was sent, in order (both batched routes and legacy)."""
    texts = []
    for body in server.bodies:
        value = body.get("input", body.get("prompt"))
        texts += [value] if isinstance(value, str) else list(value or [])
    return texts
