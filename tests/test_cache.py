"""The JSONL embedding cache: keys, crash safety, sharing between processes, bad lines,
compact, and what the store tells without vectors (contains, dims, entries).

Other processes are real subprocesses running WRITER; nothing is mocked.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from dataclasses import replace

import numpy as np
import pytest

import embed_helpers
from embed_helpers.cache.jsonl import CacheStats, EmbeddingCache
from embed_helpers.cache.tools import compact
from embed_helpers.constants import PROJECT_ROOT
from embed_helpers.identity import Identity, cache_key

DIM = 16
ROUTE, MODEL = "ollama:/api/embed", "nomic-embed-text"
ID = Identity(ROUTE, MODEL, DIM, True)
W = Identity("r", "m", DIM, True)  # what WRITER writes under
# The folder that holds the package under test, for subprocesses to import it.
IMPORT_ROOT = str(Path(embed_helpers.__file__).parent.parent)

WRITER = """
import hashlib, sys
import numpy as np
from embed_helpers.cache.jsonl import EmbeddingCache
from embed_helpers.identity import Identity
path, prefix, start, stop, batch, dim = sys.argv[1:3] + [int(a) for a in sys.argv[3:7]]
def vec(t):
    seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).standard_normal(dim).astype("f4")
identity = Identity("r", "m", dim, True)
cache = EmbeddingCache(path)
print("PATH", cache.path, flush=True)
for lo in range(start, stop, batch):
    texts = [f"{prefix}{i}" for i in range(lo, min(lo + batch, stop))]
    cache.put_many(identity, texts, np.stack([vec(t) for t in texts]))
    print("BATCH", lo, flush=True)
print("WRITTEN", cache.stats.written, flush=True)
"""


def vec(text: str, dim: int = DIM) -> np.ndarray:
    seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).standard_normal(dim).astype("f4")


def writer(path, prefix, start, stop, batch=10, dim=DIM, cwd=None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": IMPORT_ROOT}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), prefix, str(start),
                             str(stop), str(batch), str(dim)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> list[str]:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    return out.splitlines()


def put(cache, texts, identity=ID):
    """Cache `texts` under `identity`; their keys."""
    cache.put_many(identity, texts, [vec(t, identity.dim) for t in texts])
    return identity.keys(texts)


def test_put_then_get_in_another_instance(tmp_path):
    path = tmp_path / "c.jsonl"
    keys = put(EmbeddingCache(path), ["a", "b", " a"])
    cache = EmbeddingCache(path)
    got = cache.get_many(ID, ["a", "b", " a", "missing", "A"])
    assert set(got) == {"a", "b", " a"}
    np.testing.assert_array_equal(got["a"], vec("a"))
    assert got["a"].dtype == np.float32
    assert cache.stats == CacheStats(entries=3, hits=3, misses=2, written=0, skipped_lines=0)
    assert len(cache) == 3 and keys[1] in cache and "0" * 64 not in cache  # hex keys
    line = json.loads(path.read_text().splitlines()[0])
    assert list(line) == ["key", "model", "route", "dim", "normalized", "text_sha256",
                          "variant_sha256", "ts", "vector"]
    assert (line["key"], line["model"], line["route"], line["dim"], line["normalized"]) == \
        (keys[0], MODEL, ROUTE, DIM, True)


def test_model_route_dimension_or_normalisation_change_misses(tmp_path):
    cache = EmbeddingCache(tmp_path / "c.jsonl")
    put(cache, ["x"])
    assert cache.get_many(ID, ["x"])
    for changed in [Identity(ROUTE, "all-minilm", DIM, True),
                    Identity("ollama:/api/embeddings", MODEL, DIM, True),
                    Identity("llm_api", MODEL, DIM, True),
                    Identity(ROUTE, MODEL, 2 * DIM, True),
                    Identity(ROUTE, MODEL, DIM, False)]:
        assert cache.get_many(changed, ["x"]) == {} and cache.contains(changed, ["x"]) == set()
    assert cache.get_many(ID, ["X", "x "]) == {}  # the exact text is the key
    assert cache.get_many(ID, ["x"])  # switching back hits


def test_keys_cannot_be_shifted_between_fields():
    # ("m", "a<US>b") and ("m<US>a", "b") would join alike: the second is refused.
    with pytest.raises(ValueError, match="U\\+001F"):
        cache_key("r", "m\x1fa", 1, True, "b")
    assert cache_key("r", "m", 1, True, "a\x1fb") != cache_key("r", "m", 1, True, "a\x1fc")
    assert Identity("r", "m", 1, True).keys(["a"]) == [cache_key("r", "m", 1, True, "a")]
    with pytest.raises(ValueError, match="dimension is not known"):
        Identity("r", "m", None, True).key("a")


def test_put_skips_bad_vectors_and_refuses_a_length_mismatch(tmp_path, caplog):
    # Behaviour changed on purpose: keys are made from the identity, so a wrong key can no
    # longer be passed ("is not cache_key" is gone); bad vectors are still skipped.
    cache = EmbeddingCache(tmp_path / "c.jsonl")
    with pytest.raises(ValueError, match="2 vectors but 1 texts"):
        cache.put_many(ID, ["a"], [vec("a"), vec("b")])
    bad = [np.full(DIM, np.nan, "f4"), vec("w", DIM + 1), np.array([1, np.inf] * (DIM // 2)),
           vec("m").reshape(2, DIM // 2)]
    with caplog.at_level(logging.WARNING, logger="embed_helpers.cache.jsonl"):
        assert cache.put_many(ID, ["nan", "wrong dim", "inf", "2-D"], bad) == 0
    assert caplog.text.count("not caching a bad vector") == 4
    assert len(cache) == 0 and cache.path.read_bytes() == b""
    rows = np.stack([vec("g1"), np.full(DIM, np.nan, "f4"), vec("g2")])  # only good rows
    assert cache.put_many(ID, ["g1", "n", "g2"], rows) == 2
    assert set(cache.get_many(ID, ["g1", "n", "g2"])) == {"g1", "g2"}


def test_read_only_never_creates_or_writes(tmp_path):
    cache = EmbeddingCache(tmp_path / "sub" / "c.jsonl", read_only=True)
    assert cache.get_many(ID, ["a"]) == {} and cache.dims(ROUTE, MODEL, True) == []
    with pytest.raises(PermissionError):
        put(cache, ["a"])
    assert len(cache) == 0 and not cache.path.parent.exists()


def test_relative_path_is_resolved_from_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = EmbeddingCache(".cache/never-created-by-tests.jsonl", read_only=True)
    assert cache.path == PROJECT_ROOT / ".cache" / "never-created-by-tests.jsonl"
    assert cache.describe() == "JSONL file .cache/never-created-by-tests.jsonl"


def test_same_file_from_another_working_directory(tmp_path):
    path, elsewhere = tmp_path / "shared" / "c.jsonl", tmp_path / "elsewhere"
    path.parent.mkdir()
    elsewhere.mkdir()
    # Relative to the project root, not to the subprocess's working directory.
    relative = os.path.relpath(path, PROJECT_ROOT)
    out = finish(writer(relative, "t", 0, 30, cwd=elsewhere))
    assert out[0] == f"PATH {path}"
    assert not (elsewhere / relative).exists()
    assert len(EmbeddingCache(path).get_many(W, [f"t{i}" for i in range(30)])) == 30
    assert EmbeddingCache(path).describe() == f"JSONL file {path}"  # outside the project


def test_appends_of_another_process_are_picked_up(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = EmbeddingCache(path)
    texts = [f"p{i}" for i in range(25)]
    assert cache.get_many(W, texts) == {} and cache.contains(W, texts) == set()
    assert cache.dims("r", "m", True) == []
    finish(writer(path, "p", 0, 25))
    assert cache.contains(W, texts + ["q"]) == set(texts) and cache.dims("r", "m", True) == [DIM]
    assert (cache.stats.hits, cache.stats.misses) == (0, 25)  # contains counts no lookup
    got = cache.get_many(W, texts)
    assert len(got) == 25 and cache.stats.entries == 25
    np.testing.assert_array_equal(got["p3"], vec("p3"))
    finish(writer(path, "p", 0, 5, dim=8))  # another dimension, appended by another process
    assert cache.dims("r", "m", True) == [8, DIM]
    assert cache.dims("r", "m", False) == [] and cache.dims("r", "other", True) == []


def test_two_processes_appending_concurrently(tmp_path):
    path = tmp_path / "c.jsonl"
    a, b = writer(path, "t", 0, 2000, batch=50), writer(path, "t", 1000, 3000, batch=50)
    written = [int(finish(p)[-1].split()[1]) for p in (a, b)]
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) - 1 == 3000 == sum(written)  # no duplicate lines
    records = [json.loads(line) for line in lines[:-1]]
    assert {r["key"] for r in records} == set(W.keys(f"t{i}" for i in range(3000)))
    cache = EmbeddingCache(path)
    assert cache.stats.entries == 3000 and cache.stats.skipped_lines == 0


def test_sigkill_while_writing_leaves_a_file_that_loads(tmp_path):
    path, batch, dim = tmp_path / "c.jsonl", 2000, 1024  # ~11 MB per write
    proc = writer(path, "k", 0, 10**9, batch=batch, dim=dim)
    for line in proc.stdout:
        if line.startswith("BATCH"):
            break
    size = path.stat().st_size
    while path.stat().st_size == size and proc.poll() is None:
        pass  # kill as soon as the next batch starts to land: usually mid-write
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    torn = not path.read_bytes().endswith(b"\n")
    cache = EmbeddingCache(path)
    entries = cache.stats.entries
    assert entries >= batch and cache.stats.skipped_lines == int(torn)
    got = cache.get_many(replace(W, dim=dim), [f"k{i}" for i in range(entries)])
    assert len(got) == entries  # whole lines in order: the first `entries` texts
    np.testing.assert_array_equal(got["k7"], vec("k7", dim))
    # A rerun writes only what was lost, after ending a torn last line if there is one.
    total = 4 * batch
    out = finish(writer(path, "k", 0, total, batch=batch, dim=dim))
    assert out[-1] == f"WRITTEN {total - entries}"
    assert path.read_bytes().endswith(b"\n")
    again = EmbeddingCache(path)
    assert (again.stats.entries, again.stats.skipped_lines) == (total, int(torn))


def test_torn_tail_is_counted_once_and_ended_before_appending(tmp_path):
    path = tmp_path / "c.jsonl"
    put(EmbeddingCache(path), ["a", "b"])
    with open(path, "ab") as f:
        f.write(path.read_bytes()[:50])  # a writer killed mid-line
    cache = EmbeddingCache(path)
    assert cache.stats.skipped_lines == 1 and len(cache) == 2
    put(cache, ["c"])
    assert cache.get_many(ID, ["c"]) and cache.stats.skipped_lines == 1
    fresh = EmbeddingCache(path)
    assert (len(fresh), fresh.stats.skipped_lines) == (3, 1)
    assert len(path.read_bytes().splitlines()) == 4


def test_corrupt_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "c.jsonl"
    keys = put(EmbeddingCache(path), ["a", "b", "c", "d"])
    good = path.read_bytes().splitlines()
    wrong_dim = good[1].replace(b'"dim":16', b'"dim":17')
    spaced = json.dumps(json.loads(good[2]), indent=None, separators=(", ", ": ")).encode()
    bad_b64 = good[3][:-10] + b'!!!!!!!!"}'
    path.write_bytes(b"\n".join([good[0], b"garbage", b"", wrong_dim, b'{"key": 1}',
                                 spaced, bad_b64]) + b"\n")
    cache = EmbeddingCache(path)
    assert cache.stats.skipped_lines == 4  # garbage, empty, wrong dim, no vector
    assert cache.contains(ID, ["a", "b", "c", "d"]) == {"a", "c", "d"}  # d looks whole
    got = cache.get_many(ID, ["a", "b", "c", "d"])
    assert set(got) == {"a", "c"}  # the other layout loads through json
    assert cache.stats.skipped_lines == 5  # the bad base64 is found when read
    assert keys[3] not in cache and cache.contains(ID, ["d"]) == set()
    assert [e["key"] for e in cache.entries()] == [keys[0], keys[2]]


def test_threads_share_one_instance(tmp_path):
    cache = EmbeddingCache(tmp_path / "c.jsonl")
    errors = []

    def work(n):
        try:
            texts = [f"th{n}-{i}" for i in range(40)]
            for lo in range(0, 40, 8):
                put(cache, texts[lo:lo + 8])
                assert len(cache.get_many(ID, texts[lo:lo + 8])) == 8
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(EmbeddingCache(cache.path)) == 240 and cache.stats.written == 240


def test_compact_removes_duplicates_and_bad_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = EmbeddingCache(path)
    put(cache, ["a", "b", "c"])
    content = path.read_bytes()
    path.write_bytes(content + b"junk\n" + content + content[:30])
    result = compact(path)
    assert result["lines_before"] == 8 and result["entries"] == 3
    assert result["duplicates_removed"] == 3 and result["bad_lines_removed"] == 2
    assert path.read_bytes() == content and result["bytes_after"] == len(content)
    assert not list(tmp_path.glob(".*compact*"))
    # An instance opened before the rewrite follows it: hits, and appends to the new file.
    assert len(cache.get_many(ID, ["a", "b", "c"])) == 3
    put(cache, ["d"])
    assert len(EmbeddingCache(path).get_many(ID, ["a", "b", "c", "d"])) == 4
    assert cache.dims(ROUTE, MODEL, True) == [DIM]  # still known after the rewrite
    assert compact(tmp_path / "missing.jsonl")["entries"] == 0


def test_dims_of_lines_of_one_length_under_other_settings(tmp_path):
    # All lines have one length (a longer model name balances a shorter route, vector or
    # "true"): the settings must be read per line, not once per line length.
    ids = [Identity("r", "abcdef", 16, True), Identity("r", "ab", 17, True),
           Identity("r", "abcde1", 16, True), Identity("r", "abcde2", 16, True),
           Identity("r1", "abcde", 16, True), Identity("r2", "abcde", 16, True),
           Identity("r", "abcde", 16, False)]
    path = tmp_path / "c.jsonl"
    cache = EmbeddingCache(path)
    for round_ in range(3):  # interleaved, several lines of each
        for identity in ids:
            put(cache, [f"{identity.model}-{round_}-{i}" for i in range(4)], identity)
    assert len({len(line) for line in path.read_bytes().splitlines()}) == 1
    for store in (cache, EmbeddingCache(path)):  # as written, and as indexed from the file
        assert [store.dims(i.route, i.model, i.normalized) for i in ids] == \
            [[16], [17], [16], [16], [16], [16], [16]]
        assert store.dims("r", "abcde", True) == [] and store.dims("r", "abcde3", True) == []
        assert store.dims("r3", "abcde", True) == [] and store.dims("r", "ab", False) == []


def test_entries_and_put_entries_copy_a_cache(tmp_path):
    source = EmbeddingCache(tmp_path / "a.jsonl")
    other = Identity("r", "m", 8, False)
    put(source, ["a", "b", "c"])
    put(source, ["a", "z"], other)
    entries = list(source.entries())
    assert [e["key"] for e in entries] == ID.keys(["a", "b", "c"]) + other.keys(["a", "z"])
    assert [(e["route"], e["model"], e["dim"], e["normalized"]) for e in entries[2:4]] == \
        [(ROUTE, MODEL, DIM, True), ("r", "m", 8, False)]
    np.testing.assert_array_equal(entries[0]["vector"], vec("a"))
    copy = EmbeddingCache(tmp_path / "b.jsonl")
    assert copy.put_entries(entries) == 5 and copy.put_entries(entries[:2]) == 0
    assert copy.dims("r", "m", False) == [8] and copy.dims(ROUTE, MODEL, True) == [DIM]
    np.testing.assert_array_equal(copy.get_many(other, ["a", "z"])["z"], vec("z", 8))
    # Same lines: hashes (the doctor's) and timestamps travel with the entries.
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    assert list(EmbeddingCache(tmp_path / "none.jsonl", read_only=True).entries()) == []
    with pytest.raises(PermissionError):
        EmbeddingCache(tmp_path / "b.jsonl", read_only=True).put_entries(entries)
