"""EMBED_DIMENSIONS (shorter vectors from Matryoshka models) and EMBED_STORAGE=halfvec, end to
end: a real loopback server (fake_server's `dimensions` behaviours), a real PostgreSQL with
pgvector, the column type read from the catalog, request bodies and counts asserted."""
import hashlib

import numpy as np
import pandas as pd
import pytest
from fake_server import EMBED, OPENAI, FakeEmbeddingServer, shortened_vector

from embed_helpers import db, dimensions, retrieval
from embed_helpers.backends import get_backend
from embed_helpers.copy_format import rows_payload
from embed_helpers.errors import ConfigError, DataError, EmbeddingValidationError
from embed_helpers.identity import cache_key
from embed_helpers.steps import Target
from embed_helpers.per_row import parity_check
from embed_helpers.workflow import ingest, insert_rows, open_cache

FULL, SHORT = 64, 16
LONG = " ".join(f"Sentence {k} of a long abstract about renal function." for k in range(12))


@pytest.fixture
def server():
    with FakeEmbeddingServer(dim=FULL, seed=0) as fake:
        yield fake


@pytest.fixture
def run(server, make_settings, conn, table):
    """ingest(df) into `table` through the OpenAI-compatible route (or Ollama's)."""
    def go(df, backend="llm_api", **overrides):
        values = dict(EMBEDDING_BACKEND=backend, OPENAI_BASE_URL=server.openai_url,
                      OPENAI_EMBED_MODEL="text-embedding-3-small", OLLAMA_HOST=server.url,
                      EMBED_BATCH_SIZE=8, EMBED_MAX_INPUT_TOKENS=40)
        values.update(overrides)
        settings = make_settings(**values)
        with get_backend(settings) as embedder:
            return ingest(df, Target(table, "id", "text"), settings=settings, conn=conn,
                          backend=embedder, cache=open_cache(settings), progress=False)
    return go


def frame(n, long_rows=1):
    texts = [f"abstract number {i} on kidney care" for i in range(n - long_rows)]
    return pd.DataFrame({"id": [f"r{i}" for i in range(n)], "text": texts + [LONG] * long_rows})


def column_type(conn, table):
    with conn.cursor() as cur:
        cur.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE "
                    "attrelid = %s::regclass AND attname = 'embedding'", (f'"{table}"',))
        kind = cur.fetchone()[0]
    conn.rollback()
    return kind


def half(vector):
    """What halfvec keeps of a float32 vector: each value rounded to float16."""
    return np.asarray(vector, dtype=np.float16).astype(np.float32)


def test_halfvec_of_256_style_dimensions_end_to_end(run, server, conn, table):
    report = run(frame(12), EMBED_DIMENSIONS=SHORT, EMBED_STORAGE="halfvec")
    assert report.rows_written == 12 and report.dim == SHORT
    assert server.bodies and all(b["dimensions"] == SHORT for b in server.bodies)
    assert column_type(conn, table) == f"halfvec({SHORT})"
    assert column_type(conn, f"{table}_chunks") == f"halfvec({SHORT})"
    stored = db.fetch_vectors(conn, table, "id", [f"r{i}" for i in range(11)])
    for i in range(11):  # the short rows: the server's shortened vector, to float16 precision
        want = shortened_vector(f"abstract number {i} on kidney care", FULL, SHORT)
        assert np.array_equal(stored[f"r{i}"], half(want))
    server.reset()
    again = run(frame(12), EMBED_DIMENSIONS=SHORT, EMBED_STORAGE="halfvec")
    assert server.total_requests() == 0 and again.rows_written == 0

    changed = frame(12)
    changed.loc[0, "text"] = "an edited abstract"  # the upsert path: staging table of halfvec
    assert run(changed, EMBED_DIMENSIONS=SHORT, EMBED_STORAGE="halfvec").rows_written == 1
    assert server.total_requests() == 1
    got = db.fetch_vectors(conn, table, "id", ["r0"])["r0"]
    assert np.array_equal(got, half(shortened_vector("an edited abstract", FULL, SHORT)))


def test_halfvec_index_and_search(run, conn, table):
    run(frame(12), EMBED_DIMENSIONS=SHORT, EMBED_STORAGE="halfvec")
    assert retrieval.create_hnsw_index(conn, table, SHORT)
    with conn.cursor() as cur:
        cur.execute("SELECT indexdef FROM pg_indexes WHERE tablename IN (%s, %s)",
                    (table, f"{table}_chunks"))
        defs = [r[0] for r in cur.fetchall()]
    conn.rollback()
    assert len(defs) == 4 and sum("halfvec_cosine_ops" in d for d in defs) == 2  # + 2 keys
    for i in (3, 7):
        query = shortened_vector(f"abstract number {i} on kidney care", FULL, SHORT)
        hits = retrieval.search(conn, table, "id", "text", query, k=3)
        assert hits[0][0] == f"r{i}" and hits[0][1] > 0.999


def test_parity_check_allows_for_halfvecs_rounding_and_no_more(run, server, make_settings,
                                                                conn, table):
    """Step 9's comparison with what Step 9b stored: a halfvec table rounded every value to
    float16, which is not a difference between the two paths; a vector that is not the
    same (another text's) still is."""
    df = frame(6, long_rows=0)
    run(df, EMBED_STORAGE="halfvec")
    settings = make_settings(EMBEDDING_BACKEND="llm_api", OPENAI_BASE_URL=server.openai_url,
                             OPENAI_EMBED_MODEL="text-embedding-3-small", EMBED_STORAGE="halfvec")
    target = Target(table, "id", "text")
    with get_backend(settings) as embedder:
        assert parity_check(conn, embedder, df, target, settings)["same_vectors"]
        swapped = df.assign(text=list(df.text[1:]) + [df.text[0]])  # every id, another text
        assert not parity_check(conn, embedder, swapped, target, settings)["same_vectors"]


def test_ollama_sends_dimensions_on_api_embed(run, server, conn, table):
    run(frame(5, long_rows=0), backend="ollama", EMBED_DIMENSIONS=SHORT)
    sent = [b for b in server.bodies if "input" in b]
    assert sent and all(b["dimensions"] == SHORT for b in sent)
    assert server.total_requests(EMBED) == 1
    assert column_type(conn, table) == f"vector({SHORT})"


def test_legacy_ollama_refuses_dimensions_before_sending_a_text(run, server, conn, table):
    server.legacy_only = True  # /api/version says 0.2.8: only /api/embeddings
    with pytest.raises(ConfigError, match="EMBED_DIMENSIONS.*older than 0.3"):
        run(frame(5, long_rows=0), backend="ollama", EMBED_DIMENSIONS=SHORT)
    assert server.total_texts() == 0 and db.table_dimension(conn, table) is None


@pytest.mark.parametrize("refusal", ["openai-refuse", "vllm-refuse"])
def test_a_model_refusing_dimensions_stops_at_the_first_request(run, server, conn, table, refusal):
    server.dimensions = refusal
    with pytest.raises(ConfigError) as info:
        run(frame(20), OPENAI_EMBED_MODEL="text-embedding-ada-002", EMBED_DIMENSIONS=SHORT)
    message = str(info.value)
    assert "'text-embedding-ada-002' does not take EMBED_DIMENSIONS=16" in message
    assert "unset it" in message and "text-embedding-3-small" in message
    assert server.total_requests(OPENAI) == 1  # neither retried nor bisected
    assert db.table_dimension(conn, table) is None


def test_a_server_ignoring_dimensions_is_caught_before_anything_is_written(run, server, conn,
                                                                           table):
    server.dimensions = "ignore"  # TEI: answers full width
    with pytest.raises(EmbeddingValidationError, match="64-dim.*EMBED_DIMENSIONS=16.*ignored"):
        run(frame(20), EMBED_DIMENSIONS=SHORT)
    assert server.total_requests(OPENAI) == 1 and db.table_dimension(conn, table) is None


def test_storage_other_than_the_tables_is_refused_before_paying(run, server, conn, table):
    run(frame(4, long_rows=0))
    assert column_type(conn, table) == f"vector({FULL})"
    server.reset()
    more = pd.DataFrame({"id": ["n1"], "text": ["a new row"]})
    with pytest.raises(DataError, match=f"{table} stores its vectors as vector, but "
                                        "EMBED_STORAGE=halfvec"):
        run(more, EMBED_STORAGE="halfvec")
    assert server.total_requests() == 0


def test_insert_rows_follows_a_halfvec_table(run, conn, table):
    run(frame(3, long_rows=0), EMBED_STORAGE="halfvec")
    vector = np.linspace(-0.5, 0.5, FULL, dtype=np.float32)
    insert_rows(conn, Target(table, "id", "text"), ["x"], ["by hand"], vector[None, :])
    assert np.array_equal(db.fetch_vectors(conn, table, "id", ["x"])["x"], half(vector))


def test_halfvec_refuses_values_beyond_its_range():
    vectors = np.array([[0.5, 1.0], [70_000.0, 1.0]], dtype=np.float32)
    with pytest.raises(DataError, match="beyond halfvec's range.*ids b"):
        rows_payload(["a", "b"], ["x", "y"], vectors, "halfvec")


def test_cache_keys_without_the_setting_are_the_keys_of_before(make_settings):
    """Users who never set EMBED_DIMENSIONS keep every cached vector: the key is the sha256
    of route, model, dim, normalisation and text, joined as before."""
    settings = make_settings(EMBEDDING_BACKEND="llm_api", OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    with get_backend(settings) as backend:
        key = backend.identity(FULL).key("a text")
    old = hashlib.sha256("\x1f".join(("llm_api", "text-embedding-3-small", "64", "1", "a text"))
                         .encode()).hexdigest()
    assert key == old
    assert cache_key("llm_api", "text-embedding-3-small", 64, True, "a text", 64) != old
    with get_backend(make_settings(EMBEDDING_BACKEND="llm_api", EMBED_DIMENSIONS=FULL,
                                   OPENAI_BASE_URL="http://127.0.0.1:9/v1")) as backend:
        assert backend.identity(FULL).key("a text") != old


def test_local_model_truncates_and_renormalises(make_settings):
    texts = ["chronic kidney disease", "a fractured wrist"]
    with get_backend(make_settings(EMBEDDING_BACKEND="local", EMBED_DIMENSIONS=128)) as short:
        cut = short.embed_batch(texts)  # one model load: the full vectors from the same model
        whole = short._model.encode(texts, normalize_embeddings=True)
    assert cut.shape == (2, 128)
    want = whole[:, :128] / np.linalg.norm(whole[:, :128], axis=1, keepdims=True)
    assert np.allclose(cut, want, atol=1e-6)
    with pytest.raises(ConfigError, match="makes 384-dim vectors"):
        dimensions.check_width("all-MiniLM-L6-v2", 384, 512)  # what the loaded model is asked


def test_pgvector_limits_are_said_before_a_table_exists(make_settings):
    from embed_helpers.storage import column_sql, index_parts
    with pytest.raises(DataError, match="at most 16,000"):
        column_sql("halfvec", 16_001)
    with pytest.raises(DataError, match="HNSW indexes halfvec up to 4,000.*EMBED_INDEX=never"):
        index_parts("halfvec", 4_001)
    assert index_parts("halfvec", 4_000)[1] == "halfvec_cosine_ops"
    assert index_parts("vector", 3_072)[1] == "halfvec_cosine_ops"  # a cast: vector to 2,000
    with pytest.raises(ConfigError, match="EMBED_DIMENSIONS: is 256 but EMBEDDING_DIM is 1536"):
        dimensions.expected(make_settings(EMBED_DIMENSIONS=256, EMBEDDING_DIM=1536))
