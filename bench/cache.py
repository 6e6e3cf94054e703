"""Cache benchmark: load time, peak memory and lookups per second, 100k and 1M entries.

Writes synthetic caches (768 dimensions, the layout `put_many` writes) into a temporary
folder, loads each in a fresh process (cold page cache, then warm) and deletes them.
"peak RSS" is the loading process's peak resident memory (Python, numpy and the package
included); "index MB" is what the load added and kept. Run: `python bench/cache.py [--sizes 100000,...]`.
"""
from __future__ import annotations

import argparse
import binascii
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 768
ROWS_PER_CHUNK = 20_000
LOOKUP_KEYS = 20_000
LOOKUP_BATCH = 64  # EMBED_BATCH_SIZE's default: one get_many per batch
HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def hexes(raw: np.ndarray) -> np.ndarray:
    """(n, 32) bytes -> (n, 64) lowercase hex digits, vectorised."""
    out = np.empty((raw.shape[0], 64), dtype=np.uint8)
    out[:, 0::2], out[:, 1::2] = HEX[raw >> 4], HEX[raw & 15]
    return out


def write_cache(path: Path, n: int, seed: int = 0) -> list[str]:
    """n synthetic entries; returns a sample of their keys for lookups."""
    from embed_helpers.cache.format import encode_line
    line = encode_line("0" * 64, np.zeros(DIM, "f4"), route="ollama:/api/embed",
                       model="nomic-embed-text", normalized=True, text="",
                       ts="2026-01-01T00:00:00Z")
    # Every line has the same length: patch the key, the two hashes and the vector in place.
    template = np.frombuffer(line, dtype=np.uint8)
    cols = [line.index(field) + len(field)
            for field in (b'"key":"', b'"text_sha256":"', b'"variant_sha256":"')]
    vcol = line.index(b'"vector":"') + 10
    rng = np.random.default_rng(seed)
    sample = []
    with open(path, "wb") as f:
        for lo in range(0, n, ROWS_PER_CHUNK):
            rows = min(ROWS_PER_CHUNK, n - lo)
            block = np.tile(template, (rows, 1))
            keys = rng.integers(0, 256, (rows, 32), dtype=np.uint8)
            for col, raw in zip(cols, (keys, rng.integers(0, 256, (rows, 32), dtype=np.uint8),
                                       rng.integers(0, 256, (rows, 32), dtype=np.uint8))):
                block[:, col:col + 64] = hexes(raw)
            vectors = rng.standard_normal((rows, DIM), dtype=np.float32)
            # 768 * 4 bytes is a multiple of 3: base64 of all rows = rows' base64 joined.
            b64 = binascii.b2a_base64(vectors.astype("<f4").tobytes(), newline=False)
            block[:, vcol:vcol + DIM * 16 // 3] = np.frombuffer(b64, np.uint8).reshape(rows, -1)
            f.write(block.tobytes())
            picks = rng.choice(rows, min(rows, max(1, LOOKUP_KEYS * rows // n)), replace=False)
            sample += [bytes(k).hex() for k in keys[picks]]
        f.flush()
        os.fsync(f.fileno())
    return sample


def memory_mb() -> tuple[float, float]:
    """(resident now, peak resident) of this process in MB.

    /proc's VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child
    would report its parent's peak.
    """
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text()
                      .splitlines() if ":" in line)
        return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError):  # not Linux: ru_maxrss (kB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak


def child(path: str, keys_file: str) -> None:
    """In a fresh process: load, then look up; print one JSON line."""
    from embed_helpers.cache.jsonl import EmbeddingCache
    before, _ = memory_mb()
    start = time.perf_counter()
    cache = EmbeddingCache(path, read_only=True)
    load_s = time.perf_counter() - start
    after, peak = memory_mb()
    keys = Path(keys_file).read_text().split()
    misses = [k[::-1] for k in keys]
    timings = {}
    for name, batch_keys in (("hits", keys), ("misses", misses)):
        start = time.perf_counter()
        for lo in range(0, len(batch_keys), LOOKUP_BATCH):
            cache.read_keys(batch_keys[lo:lo + LOOKUP_BATCH])
        timings[name] = len(batch_keys) / (time.perf_counter() - start)
    assert cache.stats.hits == len(keys), cache.stats
    print(json.dumps({"entries": len(cache), "load_s": load_s, "peak_mb": peak,
                      "index_mb": after - before, **timings}))


def measure(path: Path, keys_file: Path, cold: bool) -> dict:
    if cold:  # drop the file from the page cache: it was fsynced, so its pages are clean
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    import embed_helpers
    env = {**os.environ, "PYTHONPATH": str(Path(embed_helpers.__file__).parent.parent)}
    out = subprocess.run([sys.executable, __file__, "--child", str(path), str(keys_file)],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    header = ("entries", "file GB", "vectors GB", "page cache", "load s", "peak RSS MB",
              "index MB", "hits/s", "misses/s")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for n in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
            path, keys_file = Path(tmp) / "cache.jsonl", Path(tmp) / "keys.txt"
            keys_file.write_text("\n".join(write_cache(path, n)))
            for cold in (True, False):
                r = measure(path, keys_file, cold)
                assert r["entries"] == n, r
                print(f"{n:,} | {path.stat().st_size / 1e9:.2f} | {n * DIM * 4 / 1e9:.2f} | "
                      f"{'cold' if cold else 'warm'} | {r['load_s']:.2f} | {r['peak_mb']:.0f} | "
                      f"{r['index_mb']:.0f} | {r['hits']:,.0f} | "
                      f"{r['misses']:,.0f}", flush=True)


if __name__ == "__main__":
    sys.path.append(str(Path(__file__).resolve().parent.parent))  # run from anywhere
    main()
