"""The cache doctor on the JSONL store: one test per verdict, the report, `cache_stats`.
(The same verdicts on the PostgreSQL store: tests/test_cache_pg.py.)"""
from __future__ import annotations

import unicodedata
from dataclasses import replace

import numpy as np
import pytest

from embed_helpers.cache import doctor as doctor
from embed_helpers.cache.jsonl import EmbeddingCache
from embed_helpers.cache.tools import cache_stats, format_stats, open_cache
from embed_helpers.identity import Identity

ROUTE, MODEL, DIM = "ollama:/api/embed", "nomic-embed-text", 8
WANTED = {"route": ROUTE, "model": MODEL, "dim": DIM, "normalized": True}


def put(path, texts, route=ROUTE, model=MODEL, dim=DIM, normalized=True):
    cache = EmbeddingCache(path)
    cache.put_many(Identity(route, model, dim, normalized), texts, np.ones((len(texts), dim)))
    cache.close()


@pytest.fixture
def path(tmp_path):
    return tmp_path / "cache" / "embeddings.jsonl"


@pytest.fixture
def nowhere(tmp_path):
    """Search roots holding no other cache, so the developer's caches are never found."""
    (tmp_path / "empty").mkdir()
    return [tmp_path / "empty"]


def store(path):
    """The store as the doctor opens it: read-only, so a missing file stays missing."""
    return EmbeddingCache(path, read_only=True)


def check(text, path, roots, **wanted):
    identity = Identity(**{**WANTED, **wanted})
    diagnosis = doctor.diagnose(text, identity=identity, store=store(path), search_roots=roots)
    assert len(diagnosis.verdicts) == 1 and diagnosis.wanted == identity
    return diagnosis, diagnosis.verdicts[0]


def test_hit(path, nowhere):
    put(path, ["Patient: female, 45"])
    diagnosis, verdict = check("Patient: female, 45", path, nowhere)
    assert verdict.kind == doctor.HIT
    assert (diagnosis.file_state, diagnosis.entries) == ("ok", 1)
    assert diagnosis.path == f"JSONL file {path}"  # describe(): absolute outside the project
    # dim unknown (not probed yet): route, model and normalisation decide.
    assert check("Patient: female, 45", path, nowhere, dim=None)[1].kind == doctor.HIT


@pytest.mark.parametrize("changed, shown", [
    ({"model": "all-minilm"}, "model 'nomic-embed-text' (you: 'all-minilm')"),
    ({"route": "ollama:/api/embeddings", "normalized": False},
     "route 'ollama:/api/embed' (you: 'ollama:/api/embeddings')"),
    ({"dim": 16}, "dim 8 (you: 16)"),
])
def test_same_text_under_other_settings(path, nowhere, changed, shown):
    put(path, ["a text"])
    _, verdict = check("a text", path, nowhere, **changed)
    assert verdict.kind == doctor.OTHER_SETTINGS
    assert shown in verdict.detail


@pytest.mark.parametrize("cached, asked, named", [
    ("hello world", "  hello world\n", "surrounding whitespace stripped"),
    ("hello world", "hello    world", "repeated whitespace collapsed"),
    ("hello world", "Hello World", "lowercased"),
    (unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café"),
     "in Unicode NFC form"),
    ("Hello World", " hello  WORLD ", "cannot show which"),
])
def test_variant(path, nowhere, cached, asked, named):
    put(path, [cached], model="all-minilm")
    _, verdict = check(asked, path, nowhere)
    assert verdict.kind == doctor.VARIANT
    assert named in verdict.detail and "(you: 'nomic-embed-text')" in verdict.detail


def test_not_cached(path, nowhere):
    put(path, ["something else"])
    assert check("never seen", path, nowhere)[1].kind == doctor.NOT_CACHED


def test_cache_file_missing(path, nowhere):
    diagnosis, verdict = check("x", path, nowhere)
    assert verdict.kind == doctor.CACHE_MISSING and diagnosis.file_state == "missing"
    assert not path.exists()


def test_cache_file_empty(path, nowhere):
    path.parent.mkdir()
    path.write_bytes(b"not json\n")
    diagnosis, verdict = check("x", path, nowhere)
    assert verdict.kind == doctor.CACHE_EMPTY
    assert (diagnosis.file_state, diagnosis.bad_lines) == ("empty", 1)


def test_text_cached_in_another_file(tmp_path, path):
    other = tmp_path / "project" / "notebooks" / ".cache" / "embeddings.jsonl"
    put(other, ["only there"])
    (tmp_path / "project" / "notes.jsonl").write_text('{"not": "a cache"}\n')
    put(path, ["something else"])
    diagnosis, verdict = check("only there", path, [tmp_path / "project"])
    assert verdict.kind == doctor.ELSEWHERE and str(other) in verdict.detail
    # Keyed by the path as printed (relative to the project root when inside it).
    assert {str(p): n for p, n in diagnosis.other_caches.items()} == {str(other): 1}
    # Missing file: the same answer, since the text is found elsewhere.
    path.unlink()
    assert check("only there", path, [tmp_path / "project"])[1].kind == doctor.ELSEWHERE


def test_sample_and_report(path, nowhere):
    put(path, [f"text {i}" for i in range(0, 100, 2)])
    put(path, [f"text {i}" for i in range(1, 100, 2)], model="all-minilm")
    texts = [f"text {i}" for i in range(100)] * 2
    diagnosis = doctor.diagnose(texts, identity=Identity(**WANTED), store=store(path),
                                search_roots=nowhere)
    assert len(diagnosis.verdicts) == doctor.DOCTOR_SAMPLE
    assert diagnosis.counts() == {doctor.HIT: 10, doctor.OTHER_SETTINGS: 10}
    report = diagnosis.report(limit=3)
    # The first two lines changed on purpose: the store as described, then the identity.
    assert report.splitlines()[:2] == [
        f"cache: JSONL file {path} (100 entries, 0 bad lines)",
        "looking for: route 'ollama:/api/embed', model 'nomic-embed-text', dim 8, "
        "normalized True"]
    assert "20 texts checked: 10 hit, 10 other_settings" in report
    assert "... and 17 more" in report
    assert doctor.ADVICE[doctor.OTHER_SETTINGS] in report and str(diagnosis) == \
        diagnosis.report()


def test_cache_stats(path):
    put(path, ["a", "b"])
    put(path, ["a"], model="all-minilm", dim=4)
    content = path.read_bytes()
    path.write_bytes(content + content.splitlines(keepends=True)[0] + b"torn")
    stats = cache_stats(path)
    assert (stats["lines"], stats["entries"], stats["duplicates"], stats["bad_lines"]) == \
        (5, 3, 1, 1)
    assert stats["by_settings"] == [
        {"route": ROUTE, "model": MODEL, "dim": DIM, "normalized": True, "entries": 2},
        {"route": ROUTE, "model": "all-minilm", "dim": 4, "normalized": True, "entries": 1}]
    assert stats["oldest"] <= stats["newest"] and stats["bytes"] == path.stat().st_size
    text = format_stats(stats)
    assert text.splitlines()[0] == f"cache: {path} (0.0 MB)"  # changed on purpose: "cache:"
    assert "entries: 3  duplicates: 1  bad lines: 1" in text and "'all-minilm'" in text
    missing = cache_stats(path.with_name("none.jsonl"))
    assert missing["exists"] is False and "(missing)" in format_stats(missing)


def test_doctor_report(path, nowhere, make_settings):
    put(path, ["a", "b"], route="ollama:/api/embed", model="nomic-embed-text", dim=DIM)
    # The store EMBED_CACHE_PATH names; the identity is no longer read from settings.
    cache = open_cache(make_settings(EMBED_CACHE_PATH=path))
    yours = Identity(ROUTE, "mxbai-embed-large", None, True)
    report = doctor.doctor_report(cache, yours, search_roots=nowhere)
    assert "0 of 2 entries were made with your settings" in report
    assert "model='nomic-embed-text'" in report
    assert f"your settings: {yours.describe()}" in report
    report = doctor.doctor_report(cache, yours, texts=["a"], search_roots=nowhere)
    assert "[other_settings] 'a': cached with model 'nomic-embed-text' " \
           "(you: 'mxbai-embed-large')" in report
    same = Identity(ROUTE, "nomic-embed-text", None, True)
    assert "2 of 2 entries" in doctor.doctor_report(cache, same, search_roots=nowhere)
    assert "0 of 2 entries" in doctor.doctor_report(cache, replace(same, dim=16),
                                                    search_roots=nowhere)
    missing = doctor.doctor_report(store(path.with_name("x.jsonl")), same, search_roots=nowhere)
    assert doctor.ADVICE[doctor.CACHE_MISSING] in missing
