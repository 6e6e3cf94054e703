"""Texts into request lines and jobs that fit OpenAI's Batch API limits: pure functions.

One line of an input file is one `/v1/embeddings` request, which may carry many inputs (as
many as a synchronous request: EMBED_BATCH_SIZE, the request's token budget). One job is
one input file and one batch: at most 50,000 lines, 200 MB, 50,000 inputs across its lines,
and no more tokens than the account may have enqueued at once for the model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..constants import BATCH_MAX_FILE_BYTES, BATCH_MAX_INPUTS, BATCH_MAX_REQUESTS_PER_FILE

ENDPOINT = "/v1/embeddings"


@dataclass(frozen=True)
class Limits:
    """What one line and one job may hold (the documented limits, the account's cap)."""

    inputs_per_line: int
    tokens_per_line: int | None
    enqueued_tokens: int
    lines_per_job: int = BATCH_MAX_REQUESTS_PER_FILE
    bytes_per_job: int = BATCH_MAX_FILE_BYTES
    inputs_per_job: int = BATCH_MAX_INPUTS


@dataclass
class Job:
    """One input file's lines: custom_id -> the texts it carries, and what it weighs."""

    lines: dict[str, list[str]] = field(default_factory=dict)
    tokens: int = 0
    bytes: int = 0
    inputs: int = -1   # counted from `lines` when not given, then kept by `add`

    def __post_init__(self):
        if self.inputs < 0:
            self.inputs = sum(len(texts) for texts in self.lines.values())

    def add(self, custom_id: str, texts: list[str], tokens: int, size: int) -> None:
        self.lines[custom_id] = texts
        self.inputs += len(texts)
        self.tokens += tokens
        self.bytes += size


def request_line(custom_id: str, texts: list[str], model: str, encoding: str) -> dict:
    """One line of the input file, as the Batch API reads it.

    >>> request_line("j-0", ["a"], "m", "float")["body"]
    {'model': 'm', 'input': ['a'], 'encoding_format': 'float'}
    """
    return {"custom_id": custom_id, "method": "POST", "url": ENDPOINT,
            "body": {"model": model, "input": texts, "encoding_format": encoding}}


def encode_line(line: dict) -> bytes:
    return (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")


def cut_lines(texts: list[str], tokens: list[int], limits: Limits) -> list[tuple[list[str], int]]:
    """Texts into requests of at most `inputs_per_line` inputs and `tokens_per_line` tokens.

    >>> cut_lines(["a", "b", "c"], [1, 1, 1], Limits(2, None, 10))
    [(['a', 'b'], 2), (['c'], 1)]
    >>> cut_lines(["a", "b", "c"], [3, 3, 1], Limits(9, 4, 10))
    [(['a'], 3), (['b', 'c'], 4)]
    """
    lines, current, weight = [], [], 0
    for text, n in zip(texts, tokens):
        full = len(current) >= limits.inputs_per_line or \
            (limits.tokens_per_line and weight + n > limits.tokens_per_line)
        if current and full:
            lines.append((current, weight))
            current, weight = [], 0
        current.append(text)
        weight += n
    return lines + ([(current, weight)] if current else [])


def cut_jobs(texts: list[str], tokens: list[int], limits: Limits, *, model: str,
             encoding: str, key_of) -> list[Job]:
    """Texts into jobs within every limit; `key_of(n)` names job n (its custom_ids start
    with it, so an output line says which job it belongs to).

    >>> jobs = cut_jobs(list("abcde"), [1] * 5, Limits(2, None, 3), model="m",
    ...                 encoding="float", key_of=lambda n: f"j{n}")
    >>> [list(j.lines.values()) for j in jobs]  # 3 tokens enqueued at most per job
    [[['a', 'b']], [['c', 'd'], ['e']]]
    """
    jobs: list[Job] = []
    job: Job | None = None
    for line_texts, weight in cut_lines(texts, tokens, limits):
        if weight > limits.enqueued_tokens:
            raise ValueError(f"one request of {weight} tokens is over the enqueued-token cap "
                             f"of {limits.enqueued_tokens}: raise EMBED_BATCH_ENQUEUED_TOKENS "
                             f"or lower EMBED_BATCH_SIZE")
        if job is None or not fits(job, line_texts, weight, limits, key_of(len(jobs) - 1),
                                   model, encoding):
            job = Job()
            jobs.append(job)
        custom_id = f"{key_of(len(jobs) - 1)}-{len(job.lines)}"
        job.add(custom_id, line_texts, weight, line_size(custom_id, line_texts, model, encoding))
    return jobs


def line_size(custom_id: str, texts: list[str], model: str, encoding: str) -> int:
    """Bytes of one line in the input file, exactly."""
    return len(encode_line(request_line(custom_id, texts, model, encoding)))


def fits(job: Job, texts: list[str], tokens: int, limits: Limits, key: str, model: str,
         encoding: str) -> bool:
    """Whether one more line of `texts` (`tokens` of them) fits `job`, named `key`."""
    if len(job.lines) >= limits.lines_per_job or job.inputs + len(texts) > limits.inputs_per_job \
            or job.tokens + tokens > limits.enqueued_tokens:
        return False
    return job.bytes + line_size(f"{key}-{len(job.lines)}", texts, model, encoding) \
        <= limits.bytes_per_job


def input_file(job: Job, model: str, encoding: str) -> bytes:
    """The JSONL input file of `job`."""
    return b"".join(encode_line(request_line(cid, texts, model, encoding))
                    for cid, texts in job.lines.items())
