"""The embedding cache: vectors by content, so nothing is paid for twice.

`store.CacheStore` is what a store is; `jsonl.EmbeddingCache` keeps the entries in a file
(one machine), `postgres.PostgresCache` in a table every machine shares (with leases, so
two runs never pay for one batch, `leases`). `format` and `file_io` are the JSONL file's
lines and I/O, `facts` the small facts a team learns once (a server's window), `tools`
opens the configured store and moves entries, `doctor` says why texts miss.
"""
from .jsonl import EmbeddingCache
from .store import CacheStats, CacheStore, MemoryStore
from .tools import open_cache

__all__ = ["CacheStats", "CacheStore", "EmbeddingCache", "MemoryStore", "open_cache"]
