"""Every tunable that is not a user setting, named once."""
from pathlib import Path

#: The project root: the folder holding `embed_helpers/`, `notebooks/` and `.env`.
#: Paths are resolved from here, never from the current directory, because papermill
#: runs the kernel in the caller's directory and nbval in the notebook's folder.
PROJECT_ROOT = Path(__file__).resolve().parent.parent



def project_path(path) -> Path:
    """`path` made absolute against the project root, never the current directory.

    >>> project_path("/tmp/x.csv")
    PosixPath('/tmp/x.csv')
    >>> project_path("data/sample") == PROJECT_ROOT / "data" / "sample"
    True
    """
    path = Path(str(path).strip()).expanduser()
    return path if path.is_absolute() else (PROJECT_ROOT / path).resolve()


DEFAULT_PGDATA = PROJECT_ROOT / ".pgdata"
DEFAULT_CACHE_PATH = PROJECT_ROOT / ".cache" / "embeddings.jsonl"
RUNS_DIR = PROJECT_ROOT / "runs"
SAMPLE_DIR = PROJECT_ROOT / "data" / "sample"
NOTEBOOK_PATH = PROJECT_ROOT / "notebooks" / "run.ipynb"

# Retries (the policy of openai-python): delay = min(BACKOFF * 2**attempt, MAX) * jitter.
MAX_RETRY_DELAY_S = 8.0
#: A server's Retry-After is honoured up to this many seconds; longer waits are capped.
MAX_RETRY_AFTER_S = 60.0
#: Jitter multiplies the computed backoff by a factor in [1 - JITTER, 1].
JITTER = 0.25

# HTTP
CONNECT_TIMEOUT_S = 5.0
#: How much of a text we show in error messages and failure files.
PREVIEW_CHARS = 60

# Database writes
#: Rows whose vectors all came from the cache are written in groups of this size.
WRITE_CHUNK_ROWS = 5000
#: How many ids we ask PostgreSQL about at once when looking for unchanged rows.
LOOKUP_CHUNK_IDS = 10000
#: Above this dimension pgvector's HNSW cannot index `vector`: use a halfvec expression.
HNSW_MAX_VECTOR_DIM = 2000
INDEX_MAINTENANCE_WORK_MEM = "512MB"

# Retry decisions (embed_helpers.retry): 5xx are retried too. 409 is a lock conflict
# on some gateways and 408 a server-side timeout: both are safe to repeat.
RETRYABLE_STATUSES = frozenset({408, 409, 429})

# Batching (embed_helpers.batching)
#: Bisecting a batch that fails with 5xx stops after 2*log2(batch) + this many failed
#: requests in a row with no success: the server is down, not one input poisonous.
BISECT_FAILURE_SLACK = 2
#: Vectors the legacy Ollama route got before a batch failed, kept so that bisection
#: does not re-send them (one request per text there); cleared above this many.
LEGACY_PENDING_MAX = 10000
