"""embed-helpers: text rows into PostgreSQL/pgvector as embeddings, fast, cheaply, losing nothing."""
from .backends import REGISTRY as BACKENDS, Backend, get_backend
from .batching import abatch_embed, batch_embed, chunked
from .cache import EmbeddingCache
from .cache_doctor import diagnose, doctor_report
from .config import Settings, load_settings
from .db import (connect, count_rows, create_hnsw_index, create_table, drop_table, search,
                 server_info)
from .errors import (BackendError, ConfigError, DataError, EmbedHelpersError,
                     EmbeddingFailures, EmbeddingValidationError)
from .pipeline import Target, run_plan
from .plan import Plan, prepare_input
from .data import resolve_path
from .report import RunReport, default_report_path, plot_timeline
from .workflow import (parity_check, build_rows, clean_raw, load_raw, discover_dimension, ingest, ingest_per_row, open_cache, plan_ingest,
                       semantic_search)

__all__ = [
    "BACKENDS", "Backend", "get_backend", "abatch_embed", "batch_embed", "chunked",
    "EmbeddingCache", "diagnose", "doctor_report", "Settings", "load_settings", "connect", "count_rows",
    "create_hnsw_index", "create_table", "search", "server_info", "BackendError",
    "ConfigError", "DataError", "EmbedHelpersError", "EmbeddingFailures",
    "EmbeddingValidationError", "Target", "run_plan", "Plan", "prepare_input", "RunReport", "resolve_path", "default_report_path", "plot_timeline", "drop_table", "parity_check",
    "load_raw", "clean_raw", "build_rows", "discover_dimension", "ingest", "ingest_per_row", "open_cache", "plan_ingest",
    "semantic_search",
]

