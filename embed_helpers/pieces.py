"""Rows into the texts we send: whole when they fit the window, else chunks or a cut.

`Pieces` holds the rows of one block (or one plan) that need vectors, the texts to send for
them (each distinct text once), and which rows wait for which text. It never changes once
made, so a plan can be run again. `Assembly` is one run's state over them: a row is done
when every one of its pieces has a vector; a row of several chunks gets the normalised mean
of their vectors (see GUIDE.md, "Long texts", for why), and its chunks are kept for the
`<table>_chunks` table.
"""
from __future__ import annotations

import logging
import math
import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .chunking import split, truncate
from .constants import LONG_TEXT_EXAMPLES
from .errors import ConfigError
from .tokens import Window

log = logging.getLogger(__name__)

POLICIES = ("chunk", "truncate", "fail")


@dataclass
class LongTexts:
    """What the window does to the input, before anything is paid for."""

    window: int = 0
    exact: bool = True
    source: str = ""
    policy: str = "chunk"
    over: int = 0                 # rows over the window
    longest: int = 0              # tokens of the longest text
    longest_id: str = ""
    chars: int = 0                # characters of all rows
    chars_beyond: int = 0         # characters a truncating model would not read
    chunks: int = 0               # pieces made from the long rows
    examples: list[str] = field(default_factory=list)
    origin: str = ""              # setting, server, model, measured or assumed (`windows`)

    @property
    def share_beyond(self) -> float:
        return self.chars_beyond / self.chars if self.chars else 0.0

    def as_rows(self) -> list[tuple[str, object]]:
        """(what, figure) pairs for the plan and the report."""
        how = "" if self.exact else " (estimated)"
        rows = [("window, from", f"{self.origin}: {self.source}")] if self.origin else []
        rows.append((f"texts over the {self.window}-token window{how}", self.over))
        if self.over:
            what = {"chunk": f"split into {self.chunks} chunks", "truncate": "cut (warned)",
                    "fail": "listed as failures"}[self.policy]
            rows += [(f"longest text, tokens{how}", f"{self.longest} (id {self.longest_id})"),
                     ("characters beyond the window", f"{self.share_beyond:.1%}"),
                     (f"long texts (EMBED_LONG_TEXTS={self.policy})", what),
                     ("long text ids, e.g.", ", ".join(self.examples))]
        return rows


class Pieces:
    """The texts to send for some rows, and the rows each text completes.

    Args:
        ids, texts: the rows (prepared: unique ids, non-empty texts).
        window: the backend's `Window`.
        policy: "chunk", "truncate" or "fail" (EMBED_LONG_TEXTS).
        overlap: tokens shared by neighbouring chunks (EMBED_CHUNK_OVERLAP).
    """

    def __init__(self, ids: list[str], texts: list[str], window: Window, policy: str = "chunk",
                 overlap: int = 0):
        if policy not in POLICIES:
            raise ConfigError("EMBED_LONG_TEXTS", f"expected one of {', '.join(POLICIES)}, "
                                                  f"got {policy!r}")
        self.ids, self.row_texts = ids, texts
        self.long = LongTexts(window.max_tokens, window.exact, window.source, policy,
                              origin=window.origin)
        self.spans: list[list[tuple[int, int]]] = []
        self.failed: list[tuple[int, str]] = []      # (row, reason) known before sending
        self.tokens: dict[str, int] = {}             # text to send -> its token count
        self._where: dict[str, list[tuple[int, int]]] = {}
        self._split(window, overlap)
        self.texts = list(self._where)               # distinct texts to send, first seen first

    def _split(self, window: Window, overlap: int) -> None:
        limit, counter, long = window.max_tokens, window.counter, self.long
        # A token is at least one UTF-8 byte: shorter texts fit without being counted.
        maybe = [i for i, t in enumerate(self.row_texts) if len(t.encode("utf-8", "surrogatepass")) > limit]
        counts = dict(zip(maybe, counter.count([self.row_texts[i] for i in maybe])))
        for row, text in enumerate(self.row_texts):
            long.chars += len(text)
            n = counts.get(row, 0)
            if n <= limit:
                self._add(row, [(0, len(text))], [n] if row in counts else None)
                continue
            units = counter.units(text)
            cut = truncate(units, limit, len(text))
            long.over += 1
            long.chars_beyond += len(text) - cut[1]
            if n > long.longest:
                long.longest, long.longest_id = n, self.ids[row]
            if len(long.examples) < LONG_TEXT_EXAMPLES:
                long.examples.append(self.ids[row])
            if long.policy == "fail":
                self.spans.append([])
                self.failed.append((row, f"the text has {n} tokens{'' if window.exact else ' (estimated)'}, "
                                         f"over the model's window of {limit} (EMBED_LONG_TEXTS=fail): "
                                         f"shorten it, or set EMBED_LONG_TEXTS=chunk"))
            elif long.policy == "truncate":
                self._add(row, [cut], None)
            else:
                spans = split(text, units, limit, overlap)
                long.chunks += len(spans)
                self._add(row, spans, None)
        if long.over and long.policy == "truncate":
            log.warning("%d texts are longer than the %d-token window and are cut "
                        "(EMBED_LONG_TEXTS=truncate): %.1f%% of the characters are not read; "
                        "e.g. ids %s", long.over, limit, 100 * long.share_beyond,
                        ", ".join(long.examples))

    def _add(self, row: int, spans: list[tuple[int, int]], counts: list[int] | None) -> None:
        self.spans.append(spans)
        text = self.row_texts[row]
        for k, (start, end) in enumerate(spans):
            piece = text if (start, end) == (0, len(text)) else text[start:end]
            self._where.setdefault(piece, []).append((row, k))
            if counts:
                self.tokens[piece] = counts[k]

    def token_counts(self, texts: list[str], window: Window) -> list[int]:
        """Token counts of texts to send (counted once, on first need)."""
        todo = [t for t in texts if t not in self.tokens]
        if todo:
            self.tokens.update(zip(todo, window.counter.count(todo)))
        return [self.tokens[t] for t in texts]

    def rows_of(self, text: str) -> list[int]:
        return sorted({row for row, _k in self._where.get(text, [])})

    def where(self, text: str) -> list[tuple[int, int]]:
        """(row, piece number) of every row piece that is `text`."""
        return self._where.get(text, [])

    def assembly(self) -> "Assembly":
        """A new run's state over these pieces: nothing delivered yet."""
        return Assembly(self)


class Assembly:
    """One run's state over `Pieces`: the vectors of rows of several chunks gathered until
    all arrived, and the rows given up. A new run of the same plan starts a new one, so
    running a plan twice (or after a failed run) completes every row again."""

    def __init__(self, pieces: Pieces):
        self.pieces = pieces
        self._missing = [len(s) for s in pieces.spans]
        self._parts: dict[int, list] = {}
        self._settled: set[int] = {row for row, _ in pieces.failed}
        self._lock = threading.Lock()  # batches may be settled from several threads

    def deliver(self, texts: list[str], vectors: np.ndarray) -> "Done":
        """Vectors for some texts; returns the rows this completes (each row once)."""
        with self._lock:
            return self._deliver(texts, vectors)

    def _deliver(self, texts: list[str], vectors: np.ndarray) -> "Done":
        rows, picks, means, chunks, spans = [], [], [], [], self.pieces.spans
        for i, text in enumerate(texts):
            for row, k in self.pieces.where(text):
                if row in self._settled:
                    continue
                if len(spans[row]) == 1:  # most rows: their vector is picked below, at once
                    self._settled.add(row)  # a text delivered twice completes its row once
                    picks.append((len(rows), i))
                    rows.append(row)
                    continue
                parts = self._parts.setdefault(row, [None] * len(spans[row]))
                if parts[k] is None:
                    parts[k] = vectors[i]
                    self._missing[row] -= 1
                if self._missing[row] == 0:
                    stacked = np.stack(self._parts.pop(row))
                    self._settled.add(row)
                    means.append((len(rows), mean_vector(stacked)))
                    rows.append(row)
                    chunks += [(row, k, *spans[row][k], stacked[k]) for k in range(len(stacked))]
        out = np.empty((len(rows), vectors.shape[1] if len(vectors) else 0), dtype=np.float32)
        if picks:
            at, source = zip(*picks)
            out[list(at)] = vectors[list(source)]
        for at, vector in means:
            out[at] = vector
        return Done(rows, out, chunks)

    def deliver_found(self, found: dict[str, np.ndarray]) -> "Done":
        """`deliver` for the {text: vector} a cache lookup returns."""
        vectors = np.stack(list(found.values())).astype(np.float32, copy=False) if found \
            else np.empty((0, 0), dtype=np.float32)
        return self.deliver(list(found), vectors)

    def fail(self, text: str) -> list[int]:
        """Rows that can no longer be completed because `text` got no vector."""
        with self._lock:
            newly = [row for row in self.pieces.rows_of(text) if row not in self._settled]
            self._settled.update(newly)
            for row in newly:
                self._parts.pop(row, None)
            return newly


class BatchCutter:
    """Texts waiting to be sent, cut into batches when asked: at most the sizer's size (which
    shrinks when a server says "too large") and the window's tokens per request."""

    def __init__(self, pieces: Pieces, window: Window, sizer):  # a resilient.BatchSizer
        self.pieces, self.window, self.sizer = pieces, window, sizer
        self.queue: deque[str] = deque()

    def add(self, texts) -> None:
        self.queue.extend(texts)

    def __bool__(self) -> bool:
        return bool(self.queue)

    def next(self) -> list[str]:
        budget = self.window.request_tokens
        batch, used, size = [], 0, self.sizer.size
        while self.queue and len(batch) < size:
            cost = self.pieces.token_counts([self.queue[0]], self.window)[0] if budget else 0
            if batch and budget and used + cost > budget:
                break
            batch.append(self.queue.popleft())
            used += cost
        return batch


@dataclass
class Done:
    """Rows completed by one delivery: positions, one vector each, and their chunks
    (row position, chunk number, start, end, vector) for rows of several chunks."""

    rows: list[int]
    vectors: np.ndarray
    chunks: list[tuple[int, int, int, int, np.ndarray]]

    @staticmethod
    def merge(parts: list["Done"]) -> "Done":
        parts = [p for p in parts if p.rows]
        if not parts:
            return Done([], np.empty((0, 0), dtype=np.float32), [])
        return Done([r for p in parts for r in p.rows], np.concatenate([p.vectors for p in parts]),
                    [c for p in parts for c in p.chunks])


def mean_vector(vectors: np.ndarray) -> np.ndarray:
    """The normalised mean of chunk vectors: one vector for the whole text.

    >>> [round(float(x), 4) for x in mean_vector(np.array([[1, 0], [0, 1]], dtype=np.float32))]
    [0.7071, 0.7071]
    """
    mean = vectors.astype(np.float64).mean(axis=0)
    norm = math.sqrt(float(mean @ mean))
    return (mean / norm if norm > 0 else mean).astype(np.float32)
