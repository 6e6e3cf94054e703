"""Never cut silently: the window from the setting, the server's routes and refusals, or one
measuring request; counted in the model's tokens; the answering model checked."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from fake_server import OPENAI, REFUSALS, count_tokens, expected_vector, read_part
from http_helpers import make_backend

from embed_helpers import db, windows
from embed_helpers.backends import get_backend
from embed_helpers.texts import batch_embed
from embed_helpers.cache.jsonl import EmbeddingCache
from embed_helpers.config import load_settings
from embed_helpers.backends.local import bundled_model_path
from embed_helpers.constants import PROJECT_ROOT, SAMPLE_DIR, SPECIAL_TOKENS_MARGIN
from embed_helpers.csv_rows import read_csv_columns
from embed_helpers.steps import Target
from embed_helpers.errors import InputTooLong, ModelMismatch
from embed_helpers.pieces import Pieces
from embed_helpers.tokens import TokenizerCount, Window
from embed_helpers.window_probe import prefix_ends
from embed_helpers.workflow import ingest, open_cache, plan_ingest

MODEL = "acme-embed"
READS = 256  # the silently truncating server reads this many of its tokens


def sentence(i: int, n: int) -> str:
    return f"Sentence {n} of record {i} reports a finding about visit {n % 5} and its follow-up."


def frame(long_rows=5, short_rows=5) -> pd.DataFrame:
    rows = [(f"long{i}", " ".join(sentence(i, n) for n in range(20 + 4 * i)))
            for i in range(long_rows)]
    rows += [(f"short{i}", f"a short note number {i}") for i in range(short_rows)]
    return pd.DataFrame(rows, columns=["id", "text"])


@pytest.fixture
def truncating(fake_server):
    """infinity-like: reads 256 tokens of each input and says nothing, lists no length."""
    fake_server.truncate_at = READS
    fake_server.known_models = {MODEL}
    return fake_server


@pytest.fixture
def settings(fake_server, make_settings):
    def make(**extra):
        return make_settings(**{"EMBEDDING_BACKEND": "llm_api", "OPENAI_EMBED_MODEL": MODEL,
                                "OPENAI_BASE_URL": fake_server.openai_url, "EMBED_BATCH_SIZE": 8,
                                "EMBED_CHUNK_OVERLAP": 8, **extra})
    return make


def run(settings, conn, table, df):
    with get_backend(settings) as backend, open_cache(settings) as cache:
        return ingest(df, Target(table, "id", "text"), settings=settings, conn=conn,
                      backend=backend, cache=cache, progress=False)


def measuring_requests(server) -> int:
    """Requests whose inputs are prefixes of their last input: the measurement."""
    return sum(1 for b in server.bodies if len(b.get("input", [])) > 2
               and all(b["input"][-1].startswith(t) for t in b["input"]))


def test_a_silently_truncating_server_is_measured_and_every_long_text_chunked(
        truncating, settings, conn, table):
    df = frame()
    report = run(settings(), conn, table, df)
    assert report.rows_written == len(df) and report.rows_failed == 0
    assert report.long_texts["origin"] == "measured"
    assert report.long_texts["over"] == 5  # every long text (over 256 of the server's tokens)
    assert measuring_requests(truncating) == 1
    stored = db.fetch_vectors(conn, table, "id", list(df["id"]))
    texts = dict(zip(df["id"], df["text"]))
    with conn.cursor() as cur:
        cur.execute(f'SELECT id, char_start, char_end, embedding FROM "{table}_chunks"')
        chunks = [(i, texts[i][a:b], v) for i, a, b, v in cur.fetchall()]
    conn.rollback()
    assert {i for i, _, _ in chunks} == {f"long{i}" for i in range(5)}
    assert all(count_tokens(text) <= READS for _, text, _ in chunks)  # each read whole
    for _row_id, text, vector in chunks:
        assert np.allclose(np.asarray(vector.to_numpy(), dtype=np.float32), expected_vector(text, 32),
                           atol=1e-6)
    for row_id, text in texts.items():
        if count_tokens(text) <= READS:
            continue
        cut = expected_vector(read_part(text, READS), 32)
        assert not np.allclose(stored[row_id], cut, atol=1e-3), row_id  # never the cut text


def test_the_measurement_is_remembered_in_the_cache_store_so_a_rerun_pays_nothing(
        truncating, settings, conn, table, tmp_path):
    run(settings(), conn, table, frame())
    facts = json.loads((tmp_path / "cache.jsonl.facts.json").read_text())
    (key, fact), = facts.items()
    assert MODEL in key and fact["cut"] is True
    truncating.reset()
    report = run(settings(), conn, table, frame())
    assert truncating.total_requests() == 0 and report.long_texts.get("over", 0) == 0
    # Another table, same server and model: measured already, only the texts are paid.
    other = table + "_b"
    try:
        run(settings(), conn, other, frame().assign(id=lambda d: d["id"] + "x"))
        assert measuring_requests(truncating) == 0
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP TABLE IF EXISTS "{other}_chunks", "{other}"')
        conn.commit()


def test_the_plan_says_the_window_was_measured(truncating, settings, conn, table):
    s = settings()
    with get_backend(s) as backend, open_cache(s) as cache:
        plan = plan_ingest(frame(), Target(table, "id", "text"), settings=s, conn=conn,
                           backend=backend, cache=cache)
    rows = dict(plan.as_rows())
    assert rows["window, from"].startswith("measured: the server cuts inputs after")
    assert "estimated" in next(k for k in rows if k.startswith("texts over the"))
    over = [v for k, v in rows.items() if k.startswith("texts over the")]
    assert over == [5]
    assert truncating.total_requests(OPENAI) == 1  # the measurement, nothing else


def test_a_server_that_reads_everything_is_measured_once_and_cuts_nothing(fake_server, settings,
                                                                           conn, table):
    fake_server.known_models = {MODEL}
    report = run(settings(), conn, table, frame())
    assert report.long_texts["origin"] == "measured" and report.long_texts["over"] == 0
    assert measuring_requests(fake_server) == 1 and report.chunks_written == 0
    s = settings()
    with get_backend(s) as backend, open_cache(s) as cache:
        windows.settle(backend, cache, list(frame()["text"]))
        assert "without a cut" in backend.window.source
        assert backend.window.max_tokens == 8191 - SPECIAL_TOKENS_MARGIN  # beyond: assumed


def test_prefixes_grow_and_end_with_the_whole_text():
    units = [(i, i + 1, 1) for i in range(1000)]
    ends = prefix_ends(units)
    assert len(ends) <= 32 and ends[-1] == (1000, 1000) and ends[-2] == (999, 999)
    assert all(a[1] < b[1] for a, b in zip(ends, ends[1:]))


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_each_servers_refusal_states_the_window(fake_server, refusal):
    fake_server.max_input_tokens, fake_server.refusal = 100, refusal
    with make_backend(fake_server, EMBED_MAX_RETRIES=0) as backend:
        with pytest.raises(InputTooLong) as caught:
            backend.embed_batch(["word " * 200])
        window = windows.from_refusal(caught.value, backend.window)
    assert caught.value.limit == 100
    assert window.max_tokens == 100 - SPECIAL_TOKENS_MARGIN and window.origin == "server"


def test_a_refusing_server_is_learned_before_the_plan_and_its_texts_chunked(
        fake_server, settings, conn, table):
    fake_server.known_models, fake_server.max_input_tokens, fake_server.refusal = \
        {MODEL}, 200, "vllm"
    report = run(settings(EMBED_MAX_RETRIES=0), conn, table, frame())
    assert report.rows_failed == 0 and report.long_texts["origin"] == "server"
    assert report.long_texts["over"] == 5 and fake_server.statuses[400] == 1
    fake_server.reset()
    run(settings(EMBED_MAX_RETRIES=0), conn, table, frame())
    assert fake_server.total_requests(OPENAI) == 0  # the refusal is remembered too


@pytest.mark.parametrize("knob, value, source", [
    ("max_model_len", 512, "max_model_len"), ("info_max_input_length", 512, "TEI /info"),
    ("props_n_ctx", 512, "llama.cpp /props")])
def test_each_servers_route_states_the_window(fake_server, knob, value, source):
    fake_server.known_models = {MODEL}
    setattr(fake_server, knob, value)
    with make_backend(fake_server, OPENAI_EMBED_MODEL=MODEL) as backend:
        window = backend.window
    assert window.origin == "server" and source in window.source
    assert window.max_tokens == value - SPECIAL_TOKENS_MARGIN


def test_a_minilm_is_counted_with_its_own_tokenizer(fake_server, tmp_path):
    fake_server.known_models = {"sentence-transformers/all-MiniLM-L6-v2"}
    with make_backend(fake_server, OPENAI_EMBED_MODEL="sentence-transformers/all-MiniLM-L6-v2",
                      EMBED_MAX_INPUT_TOKENS=256) as backend:
        window = backend.window
    assert window.exact and window.max_tokens == 256 - 2  # [CLS] and [SEP], counted exactly
    with pytest.raises(Exception, match="EMBED_TOKENIZER"):
        make_backend(fake_server, EMBED_TOKENIZER=str(tmp_path / "none.json")).window


def test_another_answering_model_is_refused_before_anything_is_cached(fake_server):
    fake_server.answer_model = "sentence-transformers/all-MiniLM-L6-v2"  # infinity, any name
    with make_backend(fake_server, OPENAI_EMBED_MODEL="bge-m3") as backend:
        with pytest.raises(ModelMismatch, match="answered with 'sentence-transformers/all-MiniLM"):
            backend.embed_batch(["a text"])
    with make_backend(fake_server, OPENAI_EMBED_MODEL="all-MiniLM-L6-v2") as backend:
        assert backend.embed_batch(["a text"]).shape == (1, 32)  # its last path part: the same


@pytest.mark.parametrize("window", ["", "200"])  # measured (one request), or set (no measuring)
def test_the_cli_stops_with_exit_1_and_writes_nothing_for_another_model(fake_server, tmp_path,
                                                                       conn, table, window):
    fake_server.answer_model = "sentence-transformers/all-MiniLM-L6-v2"
    data = tmp_path / "rows.csv"
    frame().to_csv(data, index=False)
    env = {"EMBEDDING_BACKEND": "llm_api", "OPENAI_BASE_URL": fake_server.openai_url,
           "OPENAI_EMBED_MODEL": "bge-m3", "EMBED_CACHE_PATH": str(tmp_path / "cache.jsonl"),
           "PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin",
           "EMBED_MAX_INPUT_TOKENS": window, "DATABASE_URL": os.environ["DATABASE_URL"]}
    done = subprocess.run([sys.executable, "-m", "embed_helpers", "ingest", "--data", str(data),
                           "--id-col", "id", "--text-col", "text", "--table", table, "-q"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "OPENAI_EMBED_MODEL" in done.stderr and "Traceback" not in done.stderr
    assert "answered with" in done.stderr
    assert len(EmbeddingCache(tmp_path / "cache.jsonl", read_only=True)) == 0
    assert db.table_dimension(conn, table) is None


def test_space_separated_urls_are_several_servers(tmp_path):
    s = load_settings({"OPENAI_BASE_URL": "http://a:1/v1 http://b:2/v1"}, environ={},
                      env_file=tmp_path / "none.env")
    assert s.OPENAI_BASE_URL == "http://a:1/v1,http://b:2/v1"


def abstracts(n: int) -> pd.DataFrame:
    rows = read_csv_columns(SAMPLE_DIR / "pubmed" / "abstracts.csv", "pmid", "text")
    return pd.DataFrame({"id": rows["pmid"][:n], "text": rows["text"][:n]})


def test_a_minilm_cutting_at_256_word_pieces_is_measured_in_word_pieces(fake_server, settings,
                                                                        conn, table):
    """infinity serving all-MiniLM-L6-v2: 254 word pieces read, the rest dropped unsaid."""
    tokenizer = bundled_model_path() / "tokenizer.json"
    fake_server.truncate_at, fake_server.tokenizer_file = 256, str(tokenizer)
    minilm = "sentence-transformers/all-MiniLM-L6-v2"
    fake_server.known_models = {minilm}
    df = abstracts(120)
    s = settings(OPENAI_EMBED_MODEL=minilm, EMBED_CHUNK_OVERLAP=32)
    report = run(s, conn, table, df)
    long = report.long_texts
    assert long["origin"] == "measured" and long["exact"] and report.rows_failed == 0
    assert measuring_requests(fake_server) == 1
    # The chunks the real tokenizer needs at its true window (the local backend's 254).
    local = Pieces(list(df["id"]), list(df["text"]), Window(254, TokenizerCount(tokenizer), "x"),
                   "chunk", 32)
    assert local.long.over == long["over"] > 0
    assert local.long.chunks <= long["chunks"] <= 1.1 * local.long.chunks
    texts = dict(zip(df["id"], df["text"]))
    with conn.cursor() as cur:
        cur.execute(f'SELECT id, char_start, char_end, embedding FROM "{table}_chunks"')
        for row_id, start, end, vector in cur.fetchall():
            chunk = texts[row_id][start:end]
            assert read_part(chunk, 256, str(tokenizer)) == chunk  # read whole by the server
            assert np.allclose(vector.to_numpy(), expected_vector(chunk, 32), atol=1e-6)
    conn.rollback()


def test_the_shared_postgres_store_remembers_the_window_for_every_machine(
        truncating, settings, conn, table, fresh_database):
    s = settings(EMBED_CACHE_BACKEND="postgres", EMBED_CACHE_URL=fresh_database)
    run(s, conn, table, frame())
    assert measuring_requests(truncating) == 1
    truncating.reset()
    with get_backend(s) as backend, open_cache(s) as cache:  # another machine: a new backend
        windows.settle(backend, cache, list(frame()["text"]) + ["longer " * 400])
        assert backend.window.origin == "measured"
        assert cache.get_fact(windows.fact_key(backend, backend.window.counter))["cut"] is True
    assert truncating.total_requests() == 0


def test_an_assumed_window_with_long_texts_warns_how_to_fix_it(truncating, settings):
    s = settings(EMBED_CACHE_ONLY=1)  # no request allowed: nothing is measured
    with get_backend(s) as backend:
        warning = windows.settle(backend, None, ["word " * 800])
        assert backend.window.origin == "assumed"
    assert "EMBED_MAX_INPUT_TOKENS" in warning and "512" in warning
    assert truncating.total_requests() == 0
    with get_backend(s) as backend:
        assert windows.settle(backend, None, ["short text"]) is None


def test_a_server_refusing_the_measuring_batch_leaves_the_window_assumed_and_warns(
        truncating, settings, conn, table):
    truncating.max_batch = 8  # 413 on the measuring request of more inputs
    s = settings()
    with get_backend(s) as backend, open_cache(s) as cache:
        plan = plan_ingest(frame(), Target(table, "id", "text"), settings=s, conn=conn,
                           backend=backend, cache=cache)
    assert dict(plan.as_rows())["window, from"].startswith("assumed:")
    assert any("EMBED_MAX_INPUT_TOKENS" in note for note in plan.notes)
    assert truncating.statuses[413] == 1 and truncating.total_requests(OPENAI) == 1


def test_batch_embed_measures_too_and_never_returns_a_cut_texts_vector(truncating, settings):
    from embed_helpers import batch_embed
    texts = list(frame()["text"])
    result = batch_embed(texts, settings=settings())
    assert measuring_requests(truncating) == 1 and not result.failures
    for text, vector in zip(texts, result.vectors):
        if count_tokens(text) > READS:
            assert not np.allclose(vector, expected_vector(read_part(text, READS), 32), atol=1e-3)
        else:
            assert np.allclose(vector, expected_vector(text, 32), atol=1e-6)


def test_ollama_counts_its_minilm_with_the_bundled_tokenizer(fake_server):
    with make_backend(fake_server, "ollama", OLLAMA_EMBED_MODEL="all-minilm:l6-v2") as backend:
        window = backend.window
    assert window.exact and window.origin == "server" and window.max_tokens == 2048 - 2


def test_without_a_cache_the_backend_remembers_its_measured_window(truncating, settings):
    from embed_helpers import batch_embed
    with get_backend(settings()) as backend:
        for _ in range(3):
            batch_embed(list(frame()["text"]), backend=backend, settings=settings())
    assert measuring_requests(truncating) == 1


def test_without_the_servers_tokenizer_the_window_is_measured_in_its_own_tokens(
        truncating, settings):
    """The run's text says nothing exact when only the byte estimate counts it (PubMed's
    bytes per word piece vary from 3.5 to 6 between abstracts: a window read off one text
    overran others, measured against infinity 0.0.78): the measuring request holds words
    that are one token in every common tokenizer, and its cut is a count of them."""
    with get_backend(settings()) as backend:
        batch_embed([" ".join(f"Finding{n} stable." for n in range(400))], backend)
        [body] = [b for b in truncating.bodies if len(b.get("input", [])) > 2
                  and all(b["input"][-1].startswith(t) for t in b["input"])]
        assert all(t.startswith("the of and to in") for t in body["input"])
        assert backend.window.origin == "measured" and backend.window.max_tokens < READS
