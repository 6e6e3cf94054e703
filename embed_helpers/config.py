"""Settings: one typed, frozen object, loaded once.

Precedence, highest first: explicit overrides (notebook parameters, CLI flags) >
the process environment > the project's `.env` (found from the project root,
whatever the working directory) > defaults. A bad value fails at load with a
message naming the variable. Secrets never appear in `repr`, logs or output.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from dotenv import dotenv_values

from .backends import DEFAULT_BACKEND, REGISTRY
from .constants import (DEFAULT_CACHE_PATH, DEFAULT_PGDATA, DEFAULT_RUNS_DIR, PROJECT_ROOT,
                        project_path)
from .errors import ConfigError
from .printing import Secret, dsn_problem, mask, mask_url, relative  # noqa: F401  (settings API)

log = logging.getLogger(__name__)

ENCODINGS = ("float", "base64")
LOCAL_MODEL_DEFAULT = "all-MiniLM-L6-v2"


# --- value parsers: each raises ValueError with what is allowed -------------------

def _int(minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ValueError(f"expected a whole number >= {minimum}, got {value!r}") from None
        if number < minimum:
            raise ValueError(f"expected a whole number >= {minimum}, got {number}")
        return number
    return parse


def _float(minimum: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        try:
            number = float(str(value).strip())
        except ValueError:
            raise ValueError(f"expected a number >= {minimum}, got {value!r}") from None
        if not number >= minimum or number == float("inf"):
            raise ValueError(f"expected a finite number >= {minimum}, got {value!r}")
        return number
    return parse


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {value!r}")
        return text
    return parse


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false (1/0, yes/no), got {value!r}")


def _url(value: Any) -> str:
    text = str(value).strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", text):
        raise ValueError(f"expected an http(s):// URL, got {mask_url(str(value))!r}")
    return text


def _urls(value: Any) -> str:
    """One URL or a comma-separated list of servers that serve the same model.

    >>> _urls(" http://a:1/ , http://b:2")
    'http://a:1,http://b:2'
    """
    parts = [p for p in str(value).split(",") if p.strip()]
    if not parts:
        raise ValueError("expected one or more http(s):// URLs separated by commas")
    return ",".join(_url(p.strip()) for p in parts)


def urls(value: str) -> list[str]:
    """The servers of a URL-list setting (OLLAMA_HOST, OPENAI_BASE_URL)."""
    return [u for u in value.split(",") if u]




def _text(value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def _path(value: Any) -> Path:
    return project_path(value)


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def wrapped(value: Any) -> Any:
        if value is None or str(value).strip() == "":
            return None
        return parse(value)
    return wrapped


@dataclass(frozen=True)
class Settings:
    """Every knob of a run. Build with `load_settings()`, not directly."""

    EMBEDDING_BACKEND: str = DEFAULT_BACKEND
    EMBED_ENGINE: str = "local"
    EMBED_BATCH_SIZE: int = 64
    EMBED_MAX_RETRIES: int = 5
    EMBED_BACKOFF_MS: int = 500
    EMBED_MAX_CONCURRENCY: int = 1
    EMBEDDING_TIMEOUT: float = 60.0
    EMBEDDING_DIM: int | None = None
    EMBED_ENCODING: str = "base64"
    EMBED_LONG_TEXTS: str = "chunk"
    EMBED_CHUNK_OVERLAP: int = 32
    EMBED_MAX_INPUT_TOKENS: int | None = None
    EMBED_MAX_TOKENS_PER_REQUEST: int | None = None
    OLLAMA_HOST: str = "http://localhost:11434"
    OLLAMA_EMBED_MODEL: str = "nomic-embed-text"
    OPENAI_BASE_URL: str = "https://api.openai.com/v1"
    OPENAI_API_KEY: Secret | None = None
    OPENAI_EMBED_MODEL: str = "text-embedding-3-small"
    LOCAL_EMBED_MODEL: str = LOCAL_MODEL_DEFAULT
    EMBED_CACHE_BACKEND: str = "jsonl"
    EMBED_CACHE_PATH: Path = DEFAULT_CACHE_PATH
    EMBED_CACHE_URL: Secret | None = None
    EMBED_CACHE_ONLY: bool = False
    DATABASE_URL: Secret | None = None
    EMBED_PGDATA: Path = DEFAULT_PGDATA
    UPSERT: bool = True
    EMBED_INDEX: str = "auto"
    EMBED_RUNS_DIR: Path = DEFAULT_RUNS_DIR
    EMBED_WORKERS: int | None = None
    RAY_ADDRESS: str | None = None
    EMBED_EXPECTED_TEXTS_PER_S: float | None = None
    GPU_HOURLY_USD: float | None = None

    def __repr__(self) -> str:
        parts = [f"{name}={display(self, name)!r}" for name in setting_names()]
        return "Settings(" + ", ".join(parts) + ")"

    def describe(self) -> list[tuple[str, str]]:
        """(name, printable value) pairs, secrets masked, paths from the project root."""
        return [(name, display(self, name)) for name in setting_names()]


_secret = _optional(lambda v: Secret(_text(v)))


def _connection(value: Any) -> Secret:
    """A PostgreSQL URL or key=value string that libpq reads as written (never echoed)."""
    dsn = Secret(_text(value))
    problem = dsn_problem(dsn)
    if problem:
        raise ValueError(f"{problem} (the value is not shown: it holds a password)")
    return dsn


_dsn = _optional(_connection)

#: name -> (parser, help). The order is the order of GUIDE.md's table and `.env.example`.
SPEC: dict[str, tuple[Callable[[Any], Any], str]] = {
    "EMBEDDING_BACKEND": (_choice(*REGISTRY), f"which backend embeds: {', '.join(REGISTRY)} (GUIDE.md, Backends)"),
    "EMBED_ENGINE": (_choice("local", "ray"), "local (threads in this process) or ray (a Ray cluster)"),
    "EMBED_BATCH_SIZE": (_int(1), "texts per embedding request"),
    "EMBED_MAX_RETRIES": (_int(0), "retries per request on 408/409/429/5xx, timeouts, connection errors"),
    "EMBED_BACKOFF_MS": (_int(0), "first retry delay in ms; doubles each attempt (capped, jittered)"),
    "EMBED_MAX_CONCURRENCY": (_int(1), "embedding requests in flight at once, per server"),
    "EMBEDDING_TIMEOUT": (_float(0.1), "seconds to wait for one response"),
    "EMBEDDING_DIM": (_optional(_int(1)), "expected dimension; unset = from the table, the cache or the first batch"),
    "EMBED_ENCODING": (_choice(*ENCODINGS), "OpenAI-compatible response encoding: base64 (smaller; float if the server refuses) or float"),
    "EMBED_LONG_TEXTS": (_choice("chunk", "truncate", "fail"), "texts over the model's window: chunk (with overlap), truncate (warned), or fail"),
    "EMBED_CHUNK_OVERLAP": (_int(0), "tokens shared by neighbouring chunks of a long text"),
    "EMBED_MAX_INPUT_TOKENS": (_optional(_int(1)), "tokens one input may hold; unset = the model's own window"),
    "EMBED_MAX_TOKENS_PER_REQUEST": (_optional(_int(0)), "tokens one request may carry; unset = the backend's limit (OpenAI's 300,000), 0 = none"),
    "OLLAMA_HOST": (_urls, "Ollama server URL, or several separated by commas"),
    "OLLAMA_EMBED_MODEL": (_text, "Ollama embedding model"),
    "OPENAI_BASE_URL": (_urls, "OpenAI-compatible base URL including /v1, or several separated by commas"),
    "OPENAI_API_KEY": (_secret, "API key (secret; sent as Bearer token)"),
    "OPENAI_EMBED_MODEL": (_text, "model name sent to the OpenAI-compatible server"),
    "LOCAL_EMBED_MODEL": (_text, "sentence-transformers model: the bundled name, or a path"),
    "EMBED_CACHE_BACKEND": (_choice("jsonl", "postgres"), "where the cache lives: jsonl (a file) or postgres (a table every machine shares)"),
    "EMBED_CACHE_PATH": (_path, "JSONL embedding cache; relative paths are from the project root"),
    "EMBED_CACHE_URL": (_dsn, "PostgreSQL of the postgres cache; unset = the run's database"),
    "EMBED_CACHE_ONLY": (_bool, "never call the backend; cache misses become failures"),
    "DATABASE_URL": (_dsn, "PostgreSQL URL; unset = embedded server in .pgdata/"),
    "EMBED_PGDATA": (_path, "data folder of the embedded server (when DATABASE_URL is unset)"),
    "UPSERT": (_bool, "update rows whose id exists (ON CONFLICT DO UPDATE); off = keep them"),
    "EMBED_INDEX": (_choice("auto", "always", "never"), "HNSW index after the load: auto (from 20,000 rows), always, never"),
    "EMBED_RUNS_DIR": (_path, "where failure lists and reports go; relative paths are from the project root"),
    "EMBED_WORKERS": (_optional(_int(1)), "Ray workers; unset = one per GPU (local) or per server"),
    "RAY_ADDRESS": (_optional(_text), "Ray cluster to join (ray://host:10001 or host:6379); unset = a local Ray"),
    "EMBED_EXPECTED_TEXTS_PER_S": (_optional(_float(0.001)), "throughput for the plan's estimate; unset = probe"),
    "GPU_HOURLY_USD": (_optional(_float(0)), "price per hour of the embedding machine, for cost figures"),
}

SECRET_NAMES = ("OPENAI_API_KEY", "DATABASE_URL", "EMBED_CACHE_URL")
URL_NAMES = ("DATABASE_URL", "EMBED_CACHE_URL")


def setting_names() -> list[str]:
    return [f.name for f in fields(Settings)]


def display(settings: Settings, name: str) -> str:
    """A printable value; secrets masked."""
    value = getattr(settings, name)
    if value is None:
        return ""
    if name in URL_NAMES:
        return mask_url(value)
    if name in SECRET_NAMES:
        return mask(value)
    if isinstance(value, Path):
        return relative(value)
    if name in ("OLLAMA_HOST", "OPENAI_BASE_URL"):
        return ",".join(mask_url(u) for u in urls(value))
    return str(value)


def load_settings(overrides: Mapping[str, Any] | None = None, *,
                  env_file: Path | str | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from overrides > environment > `.env` > defaults.

    Args:
        overrides: e.g. notebook parameters (`globals()` works: only setting names are
            read, and None means "not given").
        env_file: the `.env` to read; default `$EMBED_ENV_FILE`, else `<project root>/.env`.
        environ: the environment; default `os.environ`.
    Raises:
        ConfigError: naming the first variable with a bad value.
    """
    if env_file is None:  # EMBED_ENV_FILE picks another file; empty means none (make test)
        env_file = os.environ.get("EMBED_ENV_FILE", PROJECT_ROOT / ".env")
    env_path = Path(env_file) if str(env_file) else Path("/nonexistent/.env")
    sources: list[Mapping[str, Any]] = []
    if overrides:
        sources.append({k: v for k, v in overrides.items() if k in SPEC and v is not None})
    sources.append(os.environ if environ is None else environ)
    if env_path.is_file():
        sources.append({k: v for k, v in dotenv_values(env_path).items() if v is not None})

    values: dict[str, Any] = {}
    for name, (parse, _help) in SPEC.items():
        for source in sources:
            if name in source and source[name] is not None:
                raw = source[name]
                try:
                    values[name] = parse(raw)
                except ValueError as exc:
                    raise ConfigError(name, f"{exc}. Fix it in the notebook parameters, "
                                            f"the environment or {env_path}.") from None
                break
    settings = Settings(**values)
    log.debug("settings loaded: %r", settings)
    return settings


def replace_settings(settings: Settings, **changes: Any) -> Settings:
    """A copy with some settings changed, each value parsed like at load."""
    parsed = {}
    for name, value in changes.items():
        if name not in SPEC:
            raise ConfigError(name, f"unknown setting; known: {', '.join(SPEC)}")
        try:
            parsed[name] = SPEC[name][0](value)
        except ValueError as exc:
            raise ConfigError(name, str(exc)) from None
    from dataclasses import replace
    return replace(settings, **parsed)
