"""embed-helpers: text rows into PostgreSQL/pgvector as embeddings, fast, cheaply, losing nothing.

The public names below are re-exported lazily (PEP 562): `python -m embed_helpers` and a
warm rerun start in well under a second because pandas, matplotlib and torch are imported
only by the steps that use them.
"""
import importlib

_EXPORTS = {
    "backends": ["Backend", "get_backend"],
    "texts": ["abatch_embed", "batch_embed", "chunked"],
    "cache": ["EmbeddingCache"],
    "cache.store": ["CacheStore", "MemoryStore"],
    "cache.doctor": ["diagnose", "doctor_report"],
    "cache.tools": ["open_cache", "visible_stores"],
    "embedder": ["Embedder"],
    "config": ["Settings", "load_settings", "relative"],
    "constants": ["project_path"],
    "steps": ["Target"],
    "db": ["connect", "count_rows", "create_table", "drop_table", "server_info"],
    "errors": ["BackendError", "ConfigError", "DataError", "DatabaseError", "EmbedHelpersError",
               "EmbeddingFailures", "EmbeddingValidationError"],
    "plan": ["Plan"],
    "figures": ["comparison_table", "plot_run"],
    "report": ["RunReport"],
    "run_files": ["default_report_path"],
    "retrieval": ["create_hnsw_index", "search"],
    "sources": ["PostgresSource", "open_source"],
    "streaming": ["ingest_source", "plan_source"],
    "per_row": ["ingest_per_row", "parity_check"],
    "workflow": ["RawInput", "build_index", "build_rows", "clean_raw", "discover_dimension",
                 "ingest", "load_raw", "plan_ingest",
                 "insert_rows", "run_plan", "semantic_search"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'embed_helpers' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
