"""The cache doctor: one test per verdict, the report, and `cache_stats`."""
from __future__ import annotations

import unicodedata

import numpy as np
import pytest

from embed_helpers import cache_doctor as doctor
from embed_helpers.cache import EmbeddingCache, cache_key

ROUTE, MODEL, DIM = "ollama:/api/embed", "nomic-embed-text", 8
WANTED = {"route": ROUTE, "model": MODEL, "dim": DIM, "normalized": True}


def put(path, texts, route=ROUTE, model=MODEL, dim=DIM, normalized=True):
    cache = EmbeddingCache(path)
    cache.put_many([(cache_key(route, model, dim, normalized, t), np.ones(dim, "f4"))
                    for t in texts], route=route, model=model, normalized=normalized,
                   texts=texts)
    cache.close()


@pytest.fixture
def path(tmp_path):
    return tmp_path / "cache" / "embeddings.jsonl"


@pytest.fixture
def nowhere(tmp_path):
    """Search roots holding no other cache, so the developer's caches are never found."""
    (tmp_path / "empty").mkdir()
    return [tmp_path / "empty"]


def check(text, path, roots, **wanted):
    diagnosis = doctor.diagnose(text, path=path, search_roots=roots, **{**WANTED, **wanted})
    assert len(diagnosis.verdicts) == 1
    return diagnosis, diagnosis.verdicts[0]


def test_hit(path, nowhere):
    put(path, ["Patient: female, 45"])
    diagnosis, verdict = check("Patient: female, 45", path, nowhere)
    assert verdict.kind == doctor.HIT
    assert (diagnosis.file_state, diagnosis.entries) == ("ok", 1)
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
    assert diagnosis.other_caches == {other: 1}
    # Missing file: the same answer, since the text is found elsewhere.
    path.unlink()
    assert check("only there", path, [tmp_path / "project"])[1].kind == doctor.ELSEWHERE


def test_sample_and_report(path, nowhere):
    put(path, [f"text {i}" for i in range(0, 100, 2)])
    put(path, [f"text {i}" for i in range(1, 100, 2)], model="all-minilm")
    texts = [f"text {i}" for i in range(100)] * 2
    diagnosis = doctor.diagnose(texts, path=path, search_roots=nowhere, **WANTED)
    assert len(diagnosis.verdicts) == doctor.DOCTOR_SAMPLE
    assert diagnosis.counts() == {doctor.HIT: 10, doctor.OTHER_SETTINGS: 10}
    report = diagnosis.report(limit=3)
    assert f"cache file: {path} (100 entries, 0 bad lines)" in report
    assert "20 texts checked: 10 hit, 10 other_settings" in report
    assert "... and 17 more" in report
    assert doctor.ADVICE[doctor.OTHER_SETTINGS] in report and str(diagnosis) == \
        diagnosis.report()


def test_cache_stats(path):
    put(path, ["a", "b"])
    put(path, ["a"], model="all-minilm", dim=4)
    content = path.read_bytes()
    path.write_bytes(content + content.splitlines(keepends=True)[0] + b"torn")
    stats = doctor.cache_stats(path)
    assert (stats["lines"], stats["entries"], stats["duplicates"], stats["bad_lines"]) == \
        (5, 3, 1, 1)
    assert stats["by_settings"] == [
        {"route": ROUTE, "model": MODEL, "dim": DIM, "normalized": True, "entries": 2},
        {"route": ROUTE, "model": "all-minilm", "dim": 4, "normalized": True, "entries": 1}]
    assert stats["oldest"] <= stats["newest"] and stats["bytes"] == path.stat().st_size
    text = doctor.format_stats(stats)
    assert "entries: 3  duplicates: 1  bad lines: 1" in text and "'all-minilm'" in text
    missing = doctor.cache_stats(path.with_name("none.jsonl"))
    assert missing["exists"] is False and "(missing)" in doctor.format_stats(missing)


def test_doctor_report_from_settings(path, nowhere, make_settings):
    put(path, ["a", "b"], route="ollama:/api/embed", model="nomic-embed-text", dim=DIM)
    settings = make_settings(EMBEDDING_BACKEND="ollama", OLLAMA_EMBED_MODEL="mxbai-embed-large")
    report = doctor.doctor_report(settings, path=path, search_roots=nowhere)
    assert "0 of 2 entries were made with your settings" in report
    assert "model='nomic-embed-text'" in report
    report = doctor.doctor_report(settings, texts=["a"], path=path, search_roots=nowhere)
    assert "[other_settings] 'a': cached with model 'nomic-embed-text' " \
           "(you: 'mxbai-embed-large')" in report
    same = make_settings(EMBEDDING_BACKEND="ollama", OLLAMA_EMBED_MODEL="nomic-embed-text")
    assert "2 of 2 entries" in doctor.doctor_report(same, path=path, search_roots=nowhere)
    missing = doctor.doctor_report(same, path=path.with_name("x.jsonl"), search_roots=nowhere)
    assert doctor.ADVICE[doctor.CACHE_MISSING] in missing
