"""The PostgreSQL cache store: the JSONL store's behaviour on a table every machine shares,
concurrent writers, moving entries between stores, the doctor and `summary` on it.

Each test gets a new empty database (`fresh_database`): the table name is fixed. Other
processes are real subprocesses running WRITER; nothing is mocked.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from dataclasses import replace

import numpy as np
import pytest
from psycopg2.extensions import parse_dsn

import embed_helpers
from embed_helpers.cache import doctor as doctor
from embed_helpers.cache.jsonl import EmbeddingCache
from embed_helpers.cache.postgres import TABLE, PostgresCache
from embed_helpers.cache.tools import (export_entries, format_stats, import_entries,
                                       open_cache, summary)
from embed_helpers.identity import Identity

DIM = 16
ID = Identity("ollama:/api/embed", "nomic-embed-text", DIM, True)
IMPORT_ROOT = str(Path(embed_helpers.__file__).parent.parent)

WRITER = """
import hashlib, sys
import numpy as np
from embed_helpers.cache.postgres import PostgresCache
from embed_helpers.config import load_settings
from embed_helpers.identity import Identity
dsn, prefix, (start, stop, batch) = sys.argv[1], sys.argv[2], map(int, sys.argv[3:6])
def vec(t):
    seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).standard_normal(16).astype("f4")
identity = Identity("r", "m", 16, True)
cache = PostgresCache(load_settings(environ={"DATABASE_URL": dsn}))
print("READY", flush=True)
sys.stdin.readline()  # every writer starts at once
for lo in range(start, stop, batch):
    texts = [f"{prefix}{i}" for i in range(lo, min(lo + batch, stop))]
    cache.put_many(identity, texts, np.stack([vec(t) for t in texts]))
print("WRITTEN", cache.written, flush=True)
"""


def vec(text: str, dim: int = DIM) -> np.ndarray:
    seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).standard_normal(dim).astype("f4")


def put(cache, texts, identity=ID):
    return cache.put_many(identity, texts, [vec(t, identity.dim) for t in texts])


@pytest.fixture
def settings(make_settings, fresh_database):
    return make_settings(DATABASE_URL=fresh_database)


@pytest.fixture
def pg(settings):
    with PostgresCache(settings) as cache:
        yield cache


def test_put_then_get_in_another_instance(pg, settings):
    assert pg.get_many(ID, ["a"]) == {} and len(pg) == 0
    assert put(pg, ["a", "b", " a"]) == 3 and put(pg, ["a", "c"]) == 1  # a is kept
    with PostgresCache(settings) as other:  # another connection: committed whole
        got = other.get_many(ID, ["a", "b", " a", "c", "missing", "A"])
        assert set(got) == {"a", "b", " a", "c"} and len(other) == 4
        np.testing.assert_array_equal(got["a"], vec("a"))
        assert got["a"].dtype == np.float32
        assert (other.stats.hits, other.stats.misses, other.stats.written) == (4, 2, 0)
    assert pg.stats.written == 4 and pg.describe().startswith(f"PostgreSQL table {TABLE} (")


def test_identity_changes_miss(pg):
    put(pg, ["x"])
    for changed in [Identity(ID.route, "all-minilm", DIM, True),
                    Identity("ollama:/api/embeddings", ID.model, DIM, True),
                    replace(ID, dim=2 * DIM), Identity(ID.route, ID.model, DIM, False)]:
        assert pg.get_many(changed, ["x"]) == {} and pg.contains(changed, ["x"]) == set()
    assert pg.get_many(ID, ["X", "x "]) == {} and set(pg.get_many(ID, ["x"])) == {"x"}


def test_contains_reads_no_vector_and_counts_no_lookup(pg):
    put(pg, ["a", "b"])
    assert pg.contains(ID, ["a", "b", "c"]) == {"a", "b"} and pg.contains(ID, []) == set()
    assert (pg.stats.hits, pg.stats.misses) == (0, 0)


def test_dims(pg):
    assert pg.dims(ID.route, ID.model, True) == []
    put(pg, ["a"], replace(ID, dim=8))
    put(pg, ["a", "b"])
    put(pg, ["a"], replace(ID, dim=1024))
    put(pg, ["z"], Identity(ID.route, ID.model, 4, False))
    assert pg.dims(ID.route, ID.model, True) == [8, DIM, 1024]
    assert pg.dims(ID.route, ID.model, False) == [4]
    assert pg.dims("other", ID.model, True) == [] and pg.dims(ID.route, "other", True) == []


def test_wrong_dimension_or_nan_vectors_are_not_stored(pg):
    bad = [np.full(DIM, np.nan, "f4"), vec("w", DIM + 1), np.array([1, np.inf] * (DIM // 2))]
    assert pg.put_many(ID, ["nan", "wrong dim", "inf"], bad) == 0
    rows = np.stack([vec("g1"), np.full(DIM, np.nan, "f4"), vec("g2")])
    assert pg.put_many(ID, ["g1", "n", "g2"], rows) == 2
    assert len(pg) == 2 and set(pg.get_many(ID, ["nan", "wrong dim", "inf", "n", "g1", "g2"])) \
        == {"g1", "g2"}


def test_put_refuses_a_length_mismatch(pg):
    # As the JSONL store does: a vector per text, else nothing is stored.
    with pytest.raises(ValueError, match="2 vectors but 1 texts"):
        pg.put_many(ID, ["a"], [vec("a"), vec("b")])
    with pytest.raises(ValueError, match="1 vectors but 2 texts"):
        pg.put_many(ID, ["a", "b"], [vec("a")])
    assert len(pg) == 0


def test_two_processes_inserting_overlapping_keys_at_once(pg, fresh_database):
    env = {**os.environ, "PYTHONPATH": IMPORT_ROOT}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, fresh_database, "t", *span],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for span in (["0", "2000", "50"], ["1000", "3000", "50"], ["500", "2500", "70"])]
    for proc in procs:
        assert proc.stdout.readline() == "READY\n", proc.stderr.read()
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    written = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "Error" not in err, err
        written.append(int(out.split()[-1]))
    assert sum(written) == 3000  # every key inserted by exactly one of them
    with pg.conn.cursor() as cur:
        cur.execute(f"SELECT count(*), count(DISTINCT key) FROM {TABLE}")
        assert cur.fetchone() == (3000, 3000)
    pg.conn.rollback()
    texts = [f"t{i}" for i in range(3000)]
    got = pg.get_many(Identity("r", "m", 16, True), texts)
    assert len(got) == 3000
    np.testing.assert_array_equal(got["t1999"], vec("t1999"))


def test_export_import_round_trip(pg, tmp_path):
    source = EmbeddingCache(tmp_path / "source.jsonl")
    other = Identity("llm_api", "text-embedding-3-small", 8, False)
    put(source, [f"s{i}" for i in range(30)])
    put(source, ["s1", "o"], other)
    assert import_entries(source.path, pg) == 32 and import_entries(source.path, pg) == 0
    assert len(pg) == 32 and pg.dims("llm_api", other.model, False) == [8]
    assert export_entries(pg, tmp_path / "back.jsonl") == 32
    assert export_entries(pg, tmp_path / "back.jsonl") == 0  # appends only what it lacks
    back = EmbeddingCache(tmp_path / "back.jsonl")
    for identity, texts in ((ID, [f"s{i}" for i in range(30)]), (other, ["s1", "o"])):
        want, got = source.get_many(identity, texts), back.get_many(identity, texts)
        assert set(got) == set(texts)
        for text in texts:
            np.testing.assert_array_equal(got[text], want[text])
    fields = ("key", "route", "model", "dim", "normalized", "text_sha256", "variant_sha256")

    def described(store):
        return sorted(tuple(e[f] for f in fields) for e in store.entries())
    assert described(back) == described(pg) == described(source)  # the doctor's hashes too
    with pytest.raises(FileNotFoundError):
        import_entries(tmp_path / "none.jsonl", pg)


def fill(store):
    put(store, ["hit"])
    put(store, ["cached under all-minilm", "hello world", "Hello World"],
        Identity(ID.route, "all-minilm", DIM, True))


ASKED = ["hit", "cached under all-minilm", "  hello world\n", " hello  WORLD ", "never seen"]


def test_doctor_verdicts_match_the_jsonl_store(pg, tmp_path):
    empty = doctor.diagnose(ASKED, identity=ID, store=pg)
    assert empty.file_state == "empty" and {v.kind for v in empty.verdicts} == \
        {doctor.CACHE_EMPTY}
    jsonl = EmbeddingCache(tmp_path / "c.jsonl")
    fill(jsonl)
    fill(pg)
    roots = [tmp_path / "nowhere"]
    on_pg = doctor.diagnose(ASKED, identity=ID, store=pg, search_roots=roots)
    on_file = doctor.diagnose(ASKED, identity=ID, store=jsonl, search_roots=roots)
    assert [v.kind for v in on_pg.verdicts] == [doctor.HIT, doctor.OTHER_SETTINGS,
                                                doctor.VARIANT, doctor.VARIANT,
                                                doctor.NOT_CACHED]
    assert on_pg.verdicts == on_file.verdicts  # same kinds, same details
    assert (on_pg.file_state, on_pg.entries, on_pg.bad_lines) == ("ok", 4, 0)
    assert on_pg.path == pg.describe() and on_pg.report().startswith(
        f"cache: {pg.describe()} (4 entries, 0 bad lines)\nlooking for: {ID.describe()}")
    # Unknown dim: route, model and normalisation decide, as in the JSONL store.
    unknown = Identity(ID.route, ID.model, None, True)
    assert doctor.diagnose("hit", identity=unknown, store=pg).verdicts[0].kind == doctor.HIT


def test_doctor_report_and_summary(pg):
    assert summary(pg)["entries"] == 0 and summary(pg)["oldest"] is None
    assert doctor.ADVICE[doctor.CACHE_EMPTY] in doctor.doctor_report(pg, ID)
    fill(pg)
    stats = summary(pg)
    assert (stats["path"], stats["exists"], stats["entries"]) == (pg.describe(), True, 4)
    assert stats["by_settings"] == [
        {"route": ID.route, "model": "all-minilm", "dim": DIM, "normalized": True, "entries": 3},
        {"route": ID.route, "model": ID.model, "dim": DIM, "normalized": True, "entries": 1}]
    assert stats["oldest"] <= stats["newest"]
    text = format_stats(stats)
    assert text.splitlines()[0] == f"cache: {pg.describe()}" and "entries: 4" in text
    report = doctor.doctor_report(pg, ID)
    assert "1 of 4 entries were made with your settings" in report
    assert f"your settings: {ID.describe()}" in report
    report = doctor.doctor_report(pg, ID, texts=["cached under all-minilm"])
    assert "[other_settings] 'cached under all-minilm': cached with model 'all-minilm' " \
           "(you: 'nomic-embed-text')" in report and "model='all-minilm'" in report


def test_open_cache_picks_the_store(make_settings, fresh_database, tmp_path):
    # EMBED_CACHE_URL wins over the run's DATABASE_URL (the session's database here).
    with open_cache(make_settings(EMBED_CACHE_BACKEND="postgres",
                                  EMBED_CACHE_URL=fresh_database)) as store:
        assert isinstance(store, PostgresCache)
        assert store.conn.info.dbname == parse_dsn(fresh_database)["dbname"]
    jsonl = open_cache(make_settings())
    assert isinstance(jsonl, EmbeddingCache) and jsonl.path == tmp_path / "cache.jsonl"


def test_the_doctor_looks_in_the_file_and_the_table(pg, settings):
    """A run sees two stores; a text in the one it does not use is `elsewhere`, named."""
    from embed_helpers.cache.tools import visible_stores
    jsonl = EmbeddingCache(settings.EMBED_CACHE_PATH)
    put(jsonl, ["in the file"])
    put(pg, ["in the table"])
    nowhere = [Path(settings.EMBED_CACHE_PATH).parent / "nowhere"]
    on_pg = doctor.diagnose(["in the file", "in the table", "nowhere"], identity=ID, store=pg,
                            search_roots=nowhere, also=visible_stores(settings, pg))
    assert [v.kind for v in on_pg.verdicts] == [doctor.ELSEWHERE, doctor.HIT, doctor.NOT_CACHED]
    assert on_pg.verdicts[0].detail.startswith(f"cached in {jsonl.describe()[len('JSONL file '):]}")
    on_file = doctor.diagnose(["in the file", "in the table"], identity=ID, store=jsonl,
                              search_roots=nowhere, also=visible_stores(settings, jsonl))
    assert [v.kind for v in on_file.verdicts] == [doctor.HIT, doctor.ELSEWHERE]
    assert on_file.verdicts[1].detail.startswith(f"cached in {pg.describe()} (model")
