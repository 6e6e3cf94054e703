"""Settings: one typed, frozen object, loaded once.

Precedence, highest first: explicit overrides (notebook parameters, CLI flags) >
the process environment > the project's `.env` (found from the project root,
whatever the working directory) > defaults. A bad value fails at load with a
message naming the variable. Secrets never appear in `repr`, logs or output.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from dotenv import dotenv_values

from .registry import DEFAULT_BACKEND, REGISTRY
from .constants import DEFAULT_CACHE_PATH, DEFAULT_PGDATA, DEFAULT_RUNS_DIR, PROJECT_ROOT
from .constants import SOURCE_WINDOW_ROWS
from .errors import ConfigError
from .printing import Secret, mask, mask_url, relative  # noqa: F401  (settings API)
from .setting_values import (boolean, codec, dsn, number, one_of, optional, path_value, secret,  # noqa: F401
                             text, url_list, urls, whole_number)
from .setting_values import column_names, share

log = logging.getLogger(__name__)

ENCODINGS = ("float", "base64")
LOCAL_MODEL_DEFAULT = "all-MiniLM-L6-v2"


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
    EMBED_DIMENSIONS: int | None = None
    EMBED_STORAGE: str = "vector"
    EMBED_LONG_TEXTS: str = "chunk"
    EMBED_CHUNK_OVERLAP: int = 32
    EMBED_MAX_INPUT_TOKENS: int | None = None
    EMBED_MAX_TOKENS_PER_REQUEST: int | None = None
    EMBED_TOKENIZER: Path | None = None
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
    EMBED_COALESCE_MS: int = 5
    EMBED_MAX_TPM: int | None = None
    EMBED_MAX_RPM: int | None = None
    DATABASE_URL: Secret | None = None
    EMBED_PGDATA: Path = DEFAULT_PGDATA
    UPSERT: bool = True
    EMBED_INDEX: str = "auto"
    EMBED_REEMBED: bool = False
    EMBED_SYNC: bool = False
    EMBED_SYNC_MAX_DELETE: float = 0.5
    EMBED_SYNC_SCOPE: str = "files"
    EMBED_KEEP_COLS: tuple[str, ...] = ()
    EMBED_RUNS_DIR: Path = DEFAULT_RUNS_DIR
    EMBED_INPUT_ENCODING: str = "utf-8"
    EMBED_SOURCE_WINDOW: int = SOURCE_WINDOW_ROWS
    EMBED_WORKERS: int | None = None
    RAY_ADDRESS: str | None = None
    EMBED_EXPECTED_TEXTS_PER_S: float | None = None
    GPU_HOURLY_USD: float | None = None
    EMBED_PRICE_PER_1M_TOKENS: float | None = None
    EMBED_HOSTED_MODE: str = "sync"
    EMBED_BATCH_WAIT: bool = True
    EMBED_BATCH_POLL_S: float = 30.0
    EMBED_BATCH_FAILED: str = "sync"
    EMBED_BATCH_ENQUEUED_TOKENS: int = 3_000_000
    EMBED_BATCH_PRICE_PER_1M_TOKENS: float | None = None

    def __repr__(self) -> str:
        parts = [f"{name}={display(self, name)!r}" for name in setting_names()]
        return "Settings(" + ", ".join(parts) + ")"

    def describe(self) -> list[tuple[str, str]]:
        """(name, printable value) pairs, secrets masked, paths from the project root."""
        return [(name, display(self, name)) for name in setting_names()]


#: name -> (parser, help). The order is the order of GUIDE.md's table and `.env.example`.
SPEC: dict[str, tuple[Callable[[Any], Any], str]] = {
    "EMBEDDING_BACKEND": (one_of(*REGISTRY), f"which backend embeds: {', '.join(REGISTRY)} (GUIDE.md, Backends)"),
    "EMBED_ENGINE": (one_of("local", "ray"), "local (threads in this process) or ray (a Ray cluster)"),
    "EMBED_BATCH_SIZE": (whole_number(1), "texts per embedding request"),
    "EMBED_MAX_RETRIES": (whole_number(0), "retries per request on 408/409/429/5xx, timeouts, connection errors"),
    "EMBED_BACKOFF_MS": (whole_number(0), "first retry delay in ms; doubles each attempt (capped, jittered)"),
    "EMBED_MAX_CONCURRENCY": (whole_number(1), "embedding requests in flight at once, per server"),
    "EMBEDDING_TIMEOUT": (number(0.1), "seconds to wait for one response"),
    "EMBEDDING_DIM": (optional(whole_number(1)), "expected dimension; unset = from the table, the cache or the first batch"),
    "EMBED_ENCODING": (one_of(*ENCODINGS), "OpenAI-compatible response encoding: base64 (smaller; float if the server refuses) or float"),
    "EMBED_DIMENSIONS": (optional(whole_number(1)), "ask the model for vectors this short (`dimensions`: Matryoshka models such as text-embedding-3); unset = full width"),
    "EMBED_STORAGE": (one_of("vector", "halfvec"), "column type of the vectors: vector (4 bytes a value) or halfvec (2 bytes: half the storage)"),
    "EMBED_LONG_TEXTS": (one_of("chunk", "truncate", "fail"), "texts over the model's window: chunk (with overlap), truncate (warned), or fail"),
    "EMBED_CHUNK_OVERLAP": (whole_number(0), "tokens shared by neighbouring chunks of a long text"),
    "EMBED_MAX_INPUT_TOKENS": (optional(whole_number(1)), "tokens one input may hold; unset = the model's own window"),
    "EMBED_MAX_TOKENS_PER_REQUEST": (optional(whole_number(0)), "tokens one request may carry; unset = the backend's limit (OpenAI's 300,000), 0 = none"),
    "EMBED_TOKENIZER": (optional(path_value), "tokenizer.json of the served model, to count its tokens exactly; unset = the bundled MiniLM's for a MiniLM, else an estimate"),
    "OLLAMA_HOST": (url_list, "Ollama server URL, or several separated by commas or spaces"),
    "OLLAMA_EMBED_MODEL": (text, "Ollama embedding model"),
    "OPENAI_BASE_URL": (url_list, "OpenAI-compatible base URL including /v1, or several separated by commas or spaces"),
    "OPENAI_API_KEY": (secret, "API key (secret; sent as Bearer token)"),
    "OPENAI_EMBED_MODEL": (text, "model name sent to the OpenAI-compatible server"),
    "LOCAL_EMBED_MODEL": (text, "sentence-transformers model: the bundled name, or a path"),
    "EMBED_CACHE_BACKEND": (one_of("jsonl", "postgres"), "where the cache lives: jsonl (a file) or postgres (a table every machine shares)"),
    "EMBED_CACHE_PATH": (path_value, "JSONL embedding cache; relative paths are from the project root"),
    "EMBED_CACHE_URL": (dsn, "PostgreSQL of the postgres cache; unset = the run's database"),
    "EMBED_CACHE_ONLY": (boolean, "never call the backend; cache misses become failures"),
    "EMBED_COALESCE_MS": (whole_number(0), "Embedder: how long concurrent single calls wait to share a batch"),
    "EMBED_MAX_TPM": (optional(whole_number(1)), "tokens per minute the API key may spend: paced to, shared by the runs on the same cache; unset = what the server's x-ratelimit headers say"),
    "EMBED_MAX_RPM": (optional(whole_number(1)), "requests per minute the API key may send, likewise"),
    "DATABASE_URL": (dsn, "PostgreSQL URL; unset = embedded server in .pgdata/"),
    "EMBED_PGDATA": (path_value, "data folder of the embedded server (when DATABASE_URL is unset)"),
    "UPSERT": (boolean, "update rows whose id exists (ON CONFLICT DO UPDATE); off = keep them"),
    "EMBED_INDEX": (one_of("auto", "always", "never"), "HNSW index after the load: auto (from 20,000 rows), always, never"),
    "EMBED_REEMBED": (boolean, "replace every vector of a table made by another model (--reembed): built beside it, swapped in when complete"),
    "EMBED_SYNC": (boolean, "after the run, delete the rows (and chunks) whose ids left the input, within EMBED_SYNC_SCOPE"),
    "EMBED_SYNC_MAX_DELETE": (share, "sync refuses to delete more than this fraction of the rows in scope, unless --force-delete"),
    "EMBED_SYNC_SCOPE": (one_of("files", "table"), "what sync may delete: files (rows from the files this run read) or table (the input is the whole table)"),
    "EMBED_KEEP_COLS": (column_names, "input columns stored beside the vector (metadata jsonb), comma-separated; the notebook's KEEP_COLS"),
    "EMBED_RUNS_DIR": (path_value, "where failure lists and reports go; relative paths are from the project root"),
    "EMBED_INPUT_ENCODING": (codec, "text encoding of input CSV files (a UTF-8 BOM is always dropped); e.g. cp1252 for Excel's plain CSV"),
    "EMBED_SOURCE_WINDOW": (whole_number(1), "rows of a PostgreSQL source (--data postgresql://...) read, planned and run at a time"),
    "EMBED_WORKERS": (optional(whole_number(1)), "Ray workers; unset = one per GPU (local) or per server"),
    "RAY_ADDRESS": (optional(text), "Ray cluster to join (ray://host:10001 or host:6379); unset = a local Ray"),
    "EMBED_EXPECTED_TEXTS_PER_S": (optional(number(0.001)), "throughput for the plan's estimate; unset = probe"),
    "EMBED_PRICE_PER_1M_TOKENS": (optional(number(0)), "USD per million tokens of a hosted API; unset = OpenAI's list price for its models"),
    "GPU_HOURLY_USD": (optional(number(0)), "price per hour of the embedding machine, for cost figures"),
    "EMBED_HOSTED_MODE": (one_of("sync", "batch"), "llm_api: sync (/embeddings) or batch (OpenAI's Batch API: half the price, within 24 h)"),
    "EMBED_BATCH_WAIT": (boolean, "batch mode: poll until the jobs are done (off = submit, then stop: rerun later)"),
    "EMBED_BATCH_POLL_S": (number(0), "batch mode: seconds between two polls of the pending jobs"),
    "EMBED_BATCH_FAILED": (one_of("sync", "list"), "batch mode: lines that failed or expired are embedded synchronously (sync) or listed as failures (list)"),
    "EMBED_BATCH_ENQUEUED_TOKENS": (whole_number(1), "batch mode: the account's cap on enqueued tokens per model (OpenAI tier 1: 3,000,000)"),
    "EMBED_BATCH_PRICE_PER_1M_TOKENS": (optional(number(0)), "batch mode: USD per million tokens; unset = half the synchronous price"),
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
    if isinstance(value, tuple):  # EMBED_KEEP_COLS, as it is written
        return ",".join(value)
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
