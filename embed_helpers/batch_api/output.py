"""A finished batch's output and error files, checked before a single vector is cached.

Output lines come in no particular order: each names its request by `custom_id`. Every
line must name a request of this job, carry one vector per input and the run's dimension;
one that does not stops the whole file (nothing cached), with the line and what to do.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

import numpy as np

from ..errors import EmbeddingValidationError


@dataclass
class Output:
    """What one job's files gave: vectors per custom_id, tokens billed, lines that failed."""

    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: int = 0
    failed: dict[str, str] = field(default_factory=dict)   # custom_id -> why
    dim: int | None = None


def decode(embedding) -> list | np.ndarray:
    """A vector as the body holds it: floats, or base64 of little-endian float32."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return embedding if isinstance(embedding, list) else []


def read_output(text: str, lines: dict[str, list[str]], dim: int | None, *,
                where: str) -> Output:
    """Check and decode an output file against the job's `lines` (custom_id -> texts).

    Raises EmbeddingValidationError naming the line of `where` (the job and file) that
    names an unknown request, carries the wrong number of vectors or the wrong dimension.
    """
    out = Output(dim=dim)
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        line = parse(raw, number, where)
        custom_id = line.get("custom_id")
        if custom_id not in lines:
            raise EmbeddingValidationError(
                f"{where}, output line {number}: custom_id {custom_id!r} is no request of this "
                f"job; nothing was cached. Is the batch ours (see `batches list`)?")
        response = line.get("response") or {}
        if response.get("status_code") != 200 or line.get("error"):
            out.failed[custom_id] = reason_of(line)
            continue
        out.vectors[custom_id] = vectors_of(response.get("body") or {}, lines[custom_id],
                                            out, f"{where}, output line {number} "
                                                 f"({custom_id})")
    return out


def vectors_of(body: dict, texts: list[str], out: Output, where: str) -> np.ndarray:
    """The vectors of one answered request, placed by `index`, checked like a synchronous
    answer: one per input, the run's dimension."""
    items = body.get("data") if isinstance(body.get("data"), list) else []
    indices = sorted(item.get("index", -1) for item in items)
    if indices != list(range(len(texts))):
        raise EmbeddingValidationError(
            f"{where}: {len(items)} vectors for {len(texts)} inputs (indices {indices[:10]}); "
            f"nothing was cached.")
    rows: list = [None] * len(texts)
    for item in items:
        rows[item["index"]] = decode(item.get("embedding"))
    lengths = {len(row) for row in rows}
    if len(lengths) != 1 or 0 in lengths:
        raise EmbeddingValidationError(f"{where}: vectors of lengths {sorted(lengths)}; "
                                       f"nothing was cached.")
    length = lengths.pop()
    if out.dim is not None and length != out.dim:
        raise EmbeddingValidationError(
            f"{where}: vectors of dimension {length}, the run's is {out.dim}; nothing was "
            f"cached. Is OPENAI_EMBED_MODEL (or EMBEDDING_DIM) the model of the batch?")
    out.dim = length
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    tokens = usage.get("prompt_tokens", usage.get("total_tokens"))
    out.tokens += tokens if isinstance(tokens, int) and tokens >= 0 else 0
    return np.asarray(rows, dtype=np.float32)


def read_errors(text: str, lines: dict[str, list[str]], out: Output) -> None:
    """The error file: each line a request that failed (or expired), and why."""
    for number, raw in enumerate(text.splitlines(), 1):
        if raw.strip():
            line = parse(raw, number, "the error file")
            if line.get("custom_id") in lines:
                out.failed[line["custom_id"]] = reason_of(line)


def parse(raw: str, number: int, where: str) -> dict:
    try:
        line = json.loads(raw)
    except ValueError:
        raise EmbeddingValidationError(f"{where}, line {number}: not JSON ({raw[:80]!r}); "
                                       f"nothing was cached.") from None
    if not isinstance(line, dict):
        raise EmbeddingValidationError(f"{where}, line {number}: not a JSON object.")
    return line


def reason_of(line: dict) -> str:
    """Why a request failed, in the API's words: its error, else its response's."""
    error = line.get("error") or {}
    if isinstance(error, dict) and error.get("message"):
        return f"{error.get('code') or 'error'}: {error['message']}"
    response = line.get("response") or {}
    said = ((response.get("body") or {}).get("error") or {}).get("message", "")
    return f"HTTP {response.get('status_code')}: {said or 'no vector'}"
