"""The embedding cache: keys, crash safety, sharing between processes, bad lines, compact.

Other processes are real subprocesses running WRITER; nothing is mocked.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import embed_helpers
from embed_helpers.cache import CacheStats, EmbeddingCache, cache_key, compact
from embed_helpers.constants import PROJECT_ROOT

DIM = 16
ROUTE, MODEL = "ollama:/api/embed", "nomic-embed-text"
# The folder that holds the package under test, for subprocesses to import it.
IMPORT_ROOT = str(Path(embed_helpers.__file__).parent.parent)

WRITER = """
import hashlib, sys
import numpy as np
from embed_helpers.cache import EmbeddingCache, cache_key
path, prefix, start, stop, batch, dim = sys.argv[1:3] + [int(a) for a in sys.argv[3:7]]
def vec(t):
    seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).standard_normal(dim).astype("f4")
cache = EmbeddingCache(path)
print("PATH", cache.path, flush=True)
for lo in range(start, stop, batch):
    texts = [f"{prefix}{i}" for i in range(lo, min(lo + batch, stop))]
    cache.put_many([(cache_key("r", "m", dim, True, t), vec(t)) for t in texts],
                   route="r", model="m", normalized=True, texts=texts)
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


def keys_for(texts, route="r", model="m", dim=DIM, normalized=True):
    return [cache_key(route, model, dim, normalized, t) for t in texts]


def put(cache, texts, route=ROUTE, model=MODEL, dim=DIM, normalized=True):
    entries = [(cache_key(route, model, dim, normalized, t), vec(t, dim)) for t in texts]
    cache.put_many(entries, route=route, model=model, normalized=normalized, texts=texts)
    return [k for k, _ in entries]


def test_put_then_get_in_another_instance(tmp_path):
    path = tmp_path / "c.jsonl"
    keys = put(EmbeddingCache(path), ["a", "b", " a"])
    cache = EmbeddingCache(path)
    got = cache.get_many(keys + ["0" * 64, "not a key"])
    assert set(got) == set(keys)
    np.testing.assert_array_equal(got[keys[0]], vec("a"))
    assert got[keys[0]].dtype == np.float32
    assert cache.stats == CacheStats(entries=3, hits=3, misses=2, written=0, skipped_lines=0)
    assert len(cache) == 3 and keys[1] in cache and "0" * 64 not in cache
    line = json.loads(path.read_text().splitlines()[0])
    assert list(line) == ["key", "model", "route", "dim", "normalized", "text_sha256",
                          "variant_sha256", "ts", "vector"]
    assert (line["model"], line["route"], line["dim"], line["normalized"]) == \
        (MODEL, ROUTE, DIM, True)


def test_model_route_dimension_or_normalisation_change_misses(tmp_path):
    cache = EmbeddingCache(tmp_path / "c.jsonl")
    put(cache, ["x"])
    assert cache.get_many([cache_key(ROUTE, MODEL, DIM, True, "x")])
    for changed in [cache_key(ROUTE, "all-minilm", DIM, True, "x"),
                    cache_key("ollama:/api/embeddings", MODEL, DIM, True, "x"),
                    cache_key("llm_api", MODEL, DIM, True, "x"),
                    cache_key(ROUTE, MODEL, 2 * DIM, True, "x"),
                    cache_key(ROUTE, MODEL, DIM, False, "x"),
                    cache_key(ROUTE, MODEL, DIM, True, "X"),
                    cache_key(ROUTE, MODEL, DIM, True, "x ")]:
        assert cache.get_many([changed]) == {}
    assert cache.get_many([cache_key(ROUTE, MODEL, DIM, True, "x")])  # switching back hits


def test_keys_cannot_be_shifted_between_fields():
    # ("m", "a<US>b") and ("m<US>a", "b") would join alike: the second is refused.
    with pytest.raises(ValueError, match="U\\+001F"):
        cache_key("r", "m\x1fa", 1, True, "b")
    assert cache_key("r", "m", 1, True, "a\x1fb") != cache_key("r", "m", 1, True, "a\x1fc")


def test_put_refuses_wrong_keys_and_skips_bad_vectors(tmp_path):
    cache = EmbeddingCache(tmp_path / "c.jsonl")
    with pytest.raises(ValueError, match="is not cache_key"):
        cache.put_many([(cache_key(ROUTE, "other", DIM, True, "a"), vec("a"))],
                       route=ROUTE, model=MODEL, normalized=True, texts=["a"])
    bad = np.full(DIM, np.nan, dtype="f4")
    cache.put_many([(cache_key(ROUTE, MODEL, DIM, True, "n"), bad)], route=ROUTE,
                   model=MODEL, normalized=True, texts=["n"])
    assert len(cache) == 0 and cache.path.read_bytes() == b""


def test_read_only_never_creates_or_writes(tmp_path):
    cache = EmbeddingCache(tmp_path / "sub" / "c.jsonl", read_only=True)
    assert len(cache) == 0 and not cache.path.parent.exists()
    with pytest.raises(PermissionError):
        put(cache, ["a"])


def test_relative_path_is_resolved_from_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = EmbeddingCache(".cache/never-created-by-tests.jsonl", read_only=True)
    assert cache.path == PROJECT_ROOT / ".cache" / "never-created-by-tests.jsonl"


def test_same_file_from_another_working_directory(tmp_path):
    path = tmp_path / "shared" / "c.jsonl"
    path.parent.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Relative to the project root, not to the subprocess's working directory.
    relative = os.path.relpath(path, PROJECT_ROOT)
    out = finish(writer(relative, "t", 0, 30, cwd=elsewhere))
    assert out[0] == f"PATH {path}"
    assert not (elsewhere / relative).exists()
    assert len(EmbeddingCache(path).get_many(keys_for(f"t{i}" for i in range(30)))) == 30


def test_appends_of_another_process_are_picked_up(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = EmbeddingCache(path)
    keys = keys_for(f"p{i}" for i in range(25))
    assert cache.get_many(keys) == {}
    finish(writer(path, "p", 0, 25))
    got = cache.get_many(keys)
    assert len(got) == 25 and cache.stats.entries == 25
    np.testing.assert_array_equal(got[keys[3]], vec("p3"))


def test_two_processes_appending_concurrently(tmp_path):
    path = tmp_path / "c.jsonl"
    a, b = writer(path, "t", 0, 2000, batch=50), writer(path, "t", 1000, 3000, batch=50)
    written = [int(finish(p)[-1].split()[1]) for p in (a, b)]
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) - 1 == 3000 == sum(written)  # no duplicate lines
    records = [json.loads(line) for line in lines[:-1]]
    assert {r["key"] for r in records} == set(keys_for(f"t{i}" for i in range(3000)))
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
    got = cache.get_many(keys_for([f"k{i}" for i in range(entries)], dim=dim))
    assert len(got) == entries  # whole lines in order: the first `entries` texts
    np.testing.assert_array_equal(got[keys_for(["k7"], dim=dim)[0]], vec("k7", dim))
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
    keys = put(cache, ["c"])
    assert cache.get_many(keys) and cache.stats.skipped_lines == 1
    fresh = EmbeddingCache(path)
    assert (len(fresh), fresh.stats.skipped_lines) == (3, 1)
    assert len(path.read_bytes().splitlines()) == 4


def test_corrupt_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "c.jsonl"
    keys = put(EmbeddingCache(path), ["a", "b", "c"])
    good = path.read_bytes().splitlines()
    wrong_dim = good[1].replace(b'"dim":16', b'"dim":17')
    spaced = json.dumps(json.loads(good[2]), indent=None, separators=(", ", ": ")).encode()
    bad_b64 = good[0][:-10] + b'!!!!!!!!"}'
    path.write_bytes(b"\n".join([good[0], b"garbage", b"", wrong_dim, b'{"key": 1}',
                                 spaced, bad_b64.replace(keys[0].encode(), b"f" * 64)]) + b"\n")
    cache = EmbeddingCache(path)
    assert cache.stats.skipped_lines == 4  # garbage, empty, wrong dim, no vector
    got = cache.get_many(keys + ["f" * 64])
    assert set(got) == {keys[0], keys[2]}  # the other layout loads through json
    assert cache.stats.skipped_lines == 5  # the bad base64 is found when read
    assert "f" * 64 not in cache


def test_threads_share_one_instance(tmp_path):
    cache = EmbeddingCache(tmp_path / "c.jsonl")
    errors = []

    def work(n):
        try:
            texts = [f"th{n}-{i}" for i in range(40)]
            for lo in range(0, 40, 8):
                keys = put(cache, texts[lo:lo + 8])
                assert len(cache.get_many(keys)) == 8
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
    keys = put(cache, ["a", "b", "c"])
    content = path.read_bytes()
    path.write_bytes(content + b"junk\n" + content + content[:30])
    result = compact(path)
    assert result["lines_before"] == 8 and result["entries"] == 3
    assert result["duplicates_removed"] == 3 and result["bad_lines_removed"] == 2
    assert path.read_bytes() == content and result["bytes_after"] == len(content)
    assert not list(tmp_path.glob(".*compact*"))
    # An instance opened before the rewrite follows it: hits, and appends to the new file.
    assert len(cache.get_many(keys)) == 3
    more = put(cache, ["d"])
    assert len(EmbeddingCache(path).get_many(keys + more)) == 4
    assert compact(tmp_path / "missing.jsonl")["entries"] == 0
