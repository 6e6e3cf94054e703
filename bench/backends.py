"""Per-text requests versus batched ones, against the fake server's latency profiles.

    python bench/backends.py [--texts 1000] [--batch 64] [--concurrency 4] [--dim 768]

The server runs in its own process (tests/fake_server.py), so it does not share
the client's GIL. `per-text` is the original loop: one request per text, one at a
time; it runs on fewer texts where it would take minutes (texts/s is compared).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from embed_helpers.backends import get_backend  # noqa: E402
from embed_helpers.texts import batch_embed  # noqa: E402
from embed_helpers.config import load_settings  # noqa: E402

#: profile -> (backend, texts the per-text mode embeds)
PROFILES = {"ollama-gpu": ("ollama", 500), "hosted-api": ("llm_api", 120)}


def start_server(profile: str, dim: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_server.py"),
                             "--profile", profile, "--dim", str(dim)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith("READY "):
        proc.kill()
        raise SystemExit(f"fake server did not start: {line!r}")
    return proc, line.split()[1]


def server_requests(url: str) -> int:
    with urllib.request.urlopen(url + "/_stats") as response:
        return sum(c["requests"] for c in json.load(response).values())


def run_mode(url: str, backend_name: str, texts: list[str], batch: int, concurrency: int) -> dict:
    settings = load_settings({"EMBEDDING_BACKEND": backend_name, "OLLAMA_HOST": url,
                              "OPENAI_BASE_URL": url + "/v1", "EMBED_BATCH_SIZE": batch,
                              "EMBED_MAX_CONCURRENCY": concurrency, "EMBED_MAX_RETRIES": 8},
                             environ={}, env_file=ROOT / "nonexistent.env")
    urllib.request.urlopen(urllib.request.Request(url + "/_reset", data=b"", method="POST")).close()
    backend = get_backend(settings)
    try:
        start = time.perf_counter()
        result = batch_embed(texts, backend, settings)
        seconds = time.perf_counter() - start
        retries = backend.stats().get("retries", 0)
    finally:
        backend.close()
    assert result.vectors.shape[0] == len(texts) and not result.failures
    return {"requests": server_requests(url), "retries": retries, "texts": len(texts),
            "seconds": seconds, "texts_per_s": len(texts) / seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--profile", choices=sorted(PROFILES), action="append")
    args = parser.parse_args(argv)
    texts = [f"Patient {i}: 54-year-old, hypertension since {1990 + i % 30}, "
             f"metformin 500 mg, visit {i}." for i in range(args.texts)]
    rows = []
    for profile in args.profile or list(PROFILES):
        backend_name, per_text_n = PROFILES[profile]
        proc, url = start_server(profile, args.dim)
        try:
            modes = [("per-text", texts[:min(per_text_n, len(texts))], 1, 1),
                     (f"batched {args.batch}", texts, args.batch, 1),
                     (f"batched {args.batch} x{args.concurrency}", texts, args.batch, args.concurrency)]
            baseline = None
            for mode, subset, batch, concurrency in modes:
                row = run_mode(url, backend_name, subset, batch, concurrency)
                baseline = baseline or row["texts_per_s"]
                rows.append({"profile": profile, "mode": mode, **row,
                             "ratio": row["texts_per_s"] / baseline})
        finally:
            proc.terminate()
            proc.wait()
    print("| profile | mode | requests | retries | texts | seconds | texts/s | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['profile']} | {r['mode']} | {r['requests']} | {r['retries']} | {r['texts']} | "
              f"{r['seconds']:.2f} | {r['texts_per_s']:.0f} | {r['ratio']:.1f}x |")


if __name__ == "__main__":
    main()
