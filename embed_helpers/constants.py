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
DEFAULT_RUNS_DIR = PROJECT_ROOT / "runs"
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
#: pgvector's limits: HNSW indexes halfvec up to 4,000 dimensions; a column stores 16,000.
HALFVEC_MAX_INDEX_DIM = 4000
VECTOR_MAX_DIM = 16000
INDEX_MAINTENANCE_WORK_MEM = "512MB"

# Retry decisions (embed_helpers.retry): 5xx are retried too, except those that say the
# route does not exist. 409 is a lock conflict on some gateways and 408 a server-side
# timeout: both are safe to repeat.
RETRYABLE_STATUSES = frozenset({408, 409, 429})
#: "Not Implemented", "HTTP Version Not Supported": the same request can never succeed.
NEVER_RETRIED_STATUSES = frozenset({501, 505})
#: A server that sent no answer within EMBEDDING_TIMEOUT is tried this many times more:
#: a hung server must not cost (EMBED_MAX_RETRIES + 1) x the timeout.
MAX_TIMEOUT_RETRIES = 1

# Bisection (embed_helpers.resilient)
#: Bisecting a batch the server refuses for its content stops after 2*log2(batch) + this
#: many refused requests in a row with no success: the server refuses everything.
BISECT_FAILURE_SLACK = 2

# Long texts (embed_helpers.tokens, embed_helpers.chunking)
#: The HTTP backends cannot tokenize offline: one token is counted per this many UTF-8 bytes.
#: A WordPiece token of the PubMed abstracts is 3.1 bytes at the least (median 4.5).
ESTIMATED_BYTES_PER_TOKEN = 2.5
#: A window's end moves back to a sentence end found in its last this share of tokens.
CHUNK_SNAP_SHARE = 0.3
#: Texts over the window shown by id in the plan and the report.
LONG_TEXT_EXAMPLES = 5

# Database (embed_helpers.db, embed_helpers.db_guard, embed_helpers.retrieval)
#: How much of the end of the embedded server's log is read to explain a lost connection.
DB_LOG_TAIL_BYTES = 64 << 10
#: psycopg2 feeds COPY in chunks of this size; its 8 KB default means thousands of
#: Python calls per batch, each taking the GIL from the embedding threads.
COPY_BUFFER_BYTES = 1 << 20
#: EMBED_INDEX=auto builds the HNSW index from this many rows on. Below it an exact scan is
#: fast (23 ms at 2,000 rows of 768 dims, 51 ms at 10,000) and the build is not (1 s, 7.7 s).
INDEX_AUTO_MIN_ROWS = 20_000
#: A search fetches this many times k candidates from each table before grouping by row.
SEARCH_OVERFETCH = 4

# Several servers (embed_helpers.servers)
#: A server failing this many requests in a row (5xx after retries) is set aside.
SERVER_MAX_FAILURES = 3
#: How long a server that stopped answering is left alone before it is tried again; the
#: pause doubles each time it fails again, up to SERVER_SET_ASIDE_MAX_S.
SERVER_SET_ASIDE_S = 10.0
SERVER_SET_ASIDE_MAX_S = 300.0

# Backends
#: Ollama's context when /api/show says nothing (older servers' default num_ctx).
OLLAMA_DEFAULT_CONTEXT = 2048
#: Tokens kept free in a window we only estimate, for the model's own [CLS]/[SEP] tokens.
SPECIAL_TOKENS_MARGIN = 2
#: OpenAI's documented limits for its embedding models: tokens per input, per request.
#: OpenAI's list prices in USD per million input tokens (synchronous API, 2026), the
#: default of EMBED_PRICE_PER_1M_TOKENS for these models.
OPENAI_PRICES_PER_1M_TOKENS = {"text-embedding-3-small": 0.02, "text-embedding-3-large": 0.13,
                               "text-embedding-ada-002": 0.10}
OPENAI_MAX_INPUT_TOKENS = {"text-embedding-3-small": 8191, "text-embedding-3-large": 8191,
                           "text-embedding-ada-002": 8191}
OPENAI_MAX_REQUEST_TOKENS = 300_000
#: Tokens per input assumed for an OpenAI-compatible model the server does not describe.
OPENAI_COMPATIBLE_DEFAULT_INPUT_TOKENS = 8191

# Windows (embed_helpers.windows, embed_helpers.window_probe)
#: A served model whose name holds this is counted with the bundled MiniLM tokenizer.
BUNDLED_TOKENIZER_MODEL = "all-minilm-l6-v2"
#: An assumed window warns when a text has more tokens than this (BERT models read 512).
ASSUMED_WINDOW_WARN_TOKENS = 512
#: The measurement's shortest prefix, in tokens: windows below it are not looked for.
MEASURE_MIN_TOKENS = 32
#: Each prefix is this many times the one before (wider when that makes too many): the
#: measured window is at most this share below the real one.
MEASURE_STEP = 1.08
#: Prefixes of growing length in the measuring request at most (with an exact count, four
#: near each common window below the text's length join them, and two more inputs end it).
MEASURE_MAX_PREFIXES = 30
#: Windows models commonly have (their special tokens included), looked for to the token
#: when the model's tokenizer is known, allowing for up to MEASURE_MAX_SPECIALS of them.
MEASURE_COMMON_WINDOWS = (128, 256, 512, 1024, 2048, 4096, 8192)
MEASURE_MAX_SPECIALS = 3
#: The measurement looks for a cut within this many tokens of the longest text.
MEASURE_MAX_TOKENS = 16384
#: Two vectors are the same input's when 1 - cosine is below this. Measured with the bundled
#: MiniLM on 10 abstracts in one batch: the same 254 tokens differ by 6e-8 at most, 253 and
#: 254 tokens by 2.8e-5 at least. A longer window makes neighbours closer still; calling two
#: of them the same only moves the measured window down, never past the real one.
MEASURE_TOLERANCE = 1e-6
#: An estimated count keeps this share of the measured window: a chunk of other text with
#: the same estimate may hold a few more of the server's own tokens.
MEASURED_ESTIMATE_MARGIN = 0.9
#: Words that are one token in WordPiece, BPE and SentencePiece vocabularies alike: the text
#: a window is measured with when the server's tokenizer is not known.
ONE_TOKEN_WORDS = ("the", "of", "and", "to", "in", "is", "was", "for", "on", "with", "as",
                   "by", "at", "from", "that", "this", "it", "be", "are", "or", "an", "not",
                   "but", "all", "one", "two", "new", "time", "year", "day", "way", "man",
                   "old", "see", "now", "can", "may", "use", "had", "has")

# The JSONL cache (embed_helpers.cache.jsonl, embed_helpers.cache.format)
#: Bytes read per step when scanning the file: memory stays bounded whatever its size.
SCAN_CHUNK_BYTES = 8 << 20
#: get_many reads nearby lines in one call of at most this many bytes, joining a line to
#: the span only when it starts within READ_GAP_BYTES of the one before.
READ_SPAN_BYTES = 8 << 20
READ_GAP_BYTES = 64 << 10
#: Texts the doctor checks at most, evenly spread over the ones it is given.
DOCTOR_SAMPLE = 20
#: Rows per statement when `cache import` / `cache export` move entries.
CACHE_TRANSFER_ROWS = 5000

# The Ray engine (embed_helpers.ray_engine.driver, embed_helpers.ray_engine.worker)
#: A block, the rows a worker takes at a time (one claim, one lookup and one transaction
#: each), holds this many batches of EMBED_BATCH_SIZE: enough to keep a worker's requests
#: in flight, few enough that a worker killed mid-block costs little to redo.
RAY_BATCHES_PER_BLOCK = 4
#: CPUs a worker of an HTTP backend asks Ray for: it mostly waits for its servers.
RAY_HTTP_WORKER_CPUS = 0.25
#: CPUs a file reader asks for (not the workers' share: see ray_engine/driver.py).
RAY_READER_CPUS = 0.1
#: The object store of a local Ray started for a run (blocks of text, not vectors, go there).
RAY_OBJECT_STORE_BYTES = 200_000_000

# The shared cache (embed_helpers.cache.postgres)
#: How long to wait before looking again for texts another run is embedding right now.
CACHE_LEASE_POLL_S = 0.25
#: The longest a run keeps renewing the lease of a text whose vector has not come
#: (2 x EMBEDDING_TIMEOUT up to this): then another run may try it.
CACHE_LEASE_MAX_S = 60.0
#: A lease lasts this long past its holder's last heartbeat: the most a run on another
#: host waits for the texts of a run that died (one on the same host takes them at once).
CACHE_LEASE_S = 10.0
#: How often a run renews the leases it holds.
CACHE_LEASE_HEARTBEAT_S = 2.0

# Input files (embed_helpers.csv_rows, embed_helpers.readers)
#: Rows per block when a file is read in blocks (the Ray engine's read tasks, the checks).
READ_BLOCK_ROWS = 10_000
#: How many file lines (bad rows, empty ids) or duplicate ids an input error lists.
INPUT_ERRORS_SHOWN = 10

# PostgreSQL sources (embed_helpers.sources, embed_helpers.streaming)
#: Rows read, planned and run at a time from a PostgreSQL source (EMBED_SOURCE_WINDOW):
#: a run's memory holds one window of rows, whatever the size of the table.
SOURCE_WINDOW_ROWS = 10_000

# Table names (embed_helpers.table_names)
#: PostgreSQL keeps the first 63 bytes of a name (NAMEDATALEN - 1) and drops the rest.
MAX_NAME_BYTES = 63
#: The longest name made from a table's: its chunks table's index.
LONGEST_DERIVED_SUFFIX = "_chunks_embedding_hnsw"

# The rate governor (embed_helpers.rate_governor)
#: The share of a stated budget the governor paces to: the rest absorbs a request that
#: straddles the server's window and the count of our own tokens being an estimate.
RATE_PACE_SHARE = 0.95
#: How far ahead of its steady pace a budget may run (a burst at the start, a pause made
#: up): a share of its window, at most RATE_BURST_MAX_S; small, since Azure counts a
#: minute's budget in 1-10 s and a server that states nothing may count in any window.
RATE_BURST_SHARE = 0.05
RATE_BURST_MAX_S = 0.1
#: The window of EMBED_MAX_TPM / EMBED_MAX_RPM, and of a budget whose server states none.
RATE_SETTING_WINDOW_S = 60.0
#: When a budget's remaining share is stated without a reset: how long that figure holds.
RATE_UNKNOWN_RESET_S = 1.0
#: A budget learned from headers is forgotten after this many of its windows without any
#: (another server now answers at that address, or the API stopped saying).
RATE_FORGET_WINDOWS = 3
#: The longest single wait on the budget before looking again.
RATE_MAX_WAIT_S = 60.0

# OpenAI's Batch API (`batch_api/jobs.py`): its documented limits, per input file and batch
#: Requests (lines) one input file may hold.
BATCH_MAX_REQUESTS_PER_FILE = 50_000
#: Bytes one input file may hold (200 MB), with a margin for what we cannot count exactly.
BATCH_MAX_FILE_BYTES = 190 * 1024 * 1024
#: Embedding inputs across all the requests of one /v1/embeddings batch.
BATCH_MAX_INPUTS = 50_000
#: What a batch costs against the synchronous list price (OpenAI: half).
BATCH_PRICE_FACTOR = 0.5
#: The one completion window OpenAI offers, and the same in hours for the plan.
BATCH_COMPLETION_WINDOW = "24h"
BATCH_COMPLETION_HOURS = 24
#: The metadata key that names our job on a batch: a rerun finds a batch it created.
BATCH_JOB_METADATA_KEY = "embed_helpers_job"
#: Batches asked for per page when a rerun looks for one it may have created.
BATCH_LIST_PAGE = 100
