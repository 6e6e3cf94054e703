"""One call per entity from async code: a per-text client, `Embedder` and `batch_embed`.

    python bench/embedder.py [--papers 20] [--entities 50] [--batch 64] [--dim 768] [--quick]

The pipeline of GUIDE.md's example: papers processed concurrently under a semaphore, each
entity embedded by its own `await`. "per-text" sends one request per call (what such code
does with any per-text client); `Embedder` gathers the concurrent calls into batches;
`batch_embed` gets the whole list at once (the ceiling). The fake server runs in its own
process with the ollama-gpu profile (one slot, 12 ms a request, 1.5 ms a text).
"""
from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import print_header, print_table, start_servers  # noqa: E402

from embed_helpers.backends import get_backend  # noqa: E402
from embed_helpers.texts import batch_embed  # noqa: E402
from embed_helpers.config import load_settings  # noqa: E402
from embed_helpers.embedder import Embedder  # noqa: E402


def papers(n: int, entities: int) -> list[list[str]]:
    return [[f"entity {k} of paper {p}: a protein or a drug name" for k in range(entities)]
            for p in range(n)]


async def pipeline(embed, docs: list[list[str]], concurrent: int = 4):
    sem = asyncio.Semaphore(concurrent)

    async def one(entities):
        async with sem:
            return await asyncio.gather(*(embed(e) for e in entities))
    return await asyncio.gather(*(one(d) for d in docs))


def run(mode: str, settings, docs: list[list[str]]) -> float:
    flat = [e for d in docs for e in d]
    with get_backend(settings) as backend:
        start = time.perf_counter()
        if mode == "batch_embed":
            batch_embed(flat, backend)
        elif mode == "Embedder":
            with Embedder(settings, backend=backend, cache=None) as embedder:
                asyncio.run(pipeline(embedder.aembed, docs))
        else:  # one request per call, from a thread each (as an async per-text client does)
            async def per_text(text):
                return await asyncio.to_thread(backend.embed_batch, [text])
            asyncio.run(pipeline(per_text, docs))
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--papers", type=int, default=20)
    parser.add_argument("--entities", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--quick", action="store_true", help="5 papers")
    args = parser.parse_args()
    docs = papers(5 if args.quick else args.papers, args.entities)
    calls = sum(len(d) for d in docs)
    print_header("Per-entity calls: per-text, Embedder, batch_embed",
                 [f"{len(docs)} papers x {args.entities} entities = {calls} calls, 4 papers at "
                  f"a time; ollama-gpu profile, batch {args.batch}, {args.dim} dims"])
    rows = []
    for mode in ("per-text", "Embedder", "batch_embed"):
        [server] = start_servers(1, "ollama-gpu", args.dim)
        try:
            settings = load_settings({"EMBEDDING_BACKEND": "ollama", "OLLAMA_HOST": server.url,
                                      "EMBED_BATCH_SIZE": args.batch},
                                     environ={}, env_file=ROOT / "nonexistent.env")
            seconds = run(mode, settings, docs)
            requests = server.counts()["requests"]
        finally:
            server.stop()
        rows.append([mode, requests, f"{seconds:.2f}", f"{calls / seconds:,.0f}"])
    ceiling = float(rows[2][3].replace(",", ""))
    for row in rows:
        row.append(f"{float(row[3].replace(',', '')) / ceiling:.0%}")
    print_table(["mode", "requests", "seconds", "texts/s", "of batch_embed"], rows)
    print(f"bound on Embedder's requests: ceil({calls} / {args.batch}) + 20 = "
          f"{math.ceil(calls / args.batch) + 20}")


if __name__ == "__main__":
    main()
