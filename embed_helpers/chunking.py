"""Split a long text into windows that overlap, at sentence or word boundaries.

A window holds at most `max_tokens` tokens. Its end moves back to the last sentence end in
its last part (else to the last word boundary), and the next window starts `overlap` tokens
before that end, at the start of a word. Windows are character spans of the original text,
so the chunks table can show which part of a row matched a search.
"""
from __future__ import annotations

from .constants import CHUNK_SNAP_SHARE
from .tokens import Unit

_SENTENCE_END = ".!?;:"


def split(text: str, units: list[Unit], max_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """Character spans of the windows of `text`, given its units (see `tokens`).

    >>> words = [(i * 2, i * 2 + 1, 1) for i in range(10)]   # "a b c d e f g h i j"
    >>> split("a b c d e f g h i j", words, max_tokens=4, overlap=1)
    [(0, 7), (6, 13), (12, 19)]
    >>> split("One. Two three. Four five six.", [(0, 4, 1), (5, 8, 1), (9, 15, 1),
    ...       (16, 20, 1), (21, 25, 1), (26, 30, 1)], max_tokens=4, overlap=0)
    [(0, 15), (16, 30)]
    """
    units = _fit(units, max_tokens)
    if not units:
        return [(0, len(text))]
    overlap = max(0, min(overlap, max_tokens // 2))
    cost = [0]
    for _s, _e, c in units:
        cost.append(cost[-1] + c)
    spans, i, n = [], 0, len(units)
    while True:
        j = i
        while j < n and cost[j + 1] - cost[i] <= max_tokens:
            j += 1
        if j < n:
            j = _snap(text, units, cost, i, j)
        spans.append((units[i][0], units[j - 1][1]))
        if j >= n:
            return spans
        start = j
        while start > i + 1 and cost[j] - cost[start - 1] <= overlap:
            start -= 1
        while start < j and not _word_start(text, units, start):
            start += 1
        i = start if start > i else j


def truncate(units: list[Unit], max_tokens: int, length: int) -> tuple[int, int]:
    """The span a model that cuts at `max_tokens` reads: no snapping, no overlap."""
    total = 0
    for k, (_s, end, c) in enumerate(units):
        if total + c > max_tokens:
            return (0, units[k - 1][1]) if k else (0, 0)
        total += c
    return 0, length


def _snap(text: str, units: list[Unit], cost: list[int], i: int, j: int) -> int:
    """A better end than unit j for the window starting at unit i: a sentence end in the
    last CHUNK_SNAP_SHARE of the window, else the last word boundary, else j itself."""
    floor = cost[i] + (cost[j] - cost[i]) * (1 - CHUNK_SNAP_SHARE)
    word = None
    for k in range(j, i + 1, -1):
        if cost[k] < floor:
            break
        if _word_start(text, units, k):
            if text[units[k - 1][1] - 1] in _SENTENCE_END:
                return k
            word = word or k
    return word or j


def _word_start(text: str, units: list[Unit], k: int) -> bool:
    """Whether unit k begins a word (whitespace lies between it and unit k - 1)."""
    return k == 0 or units[k - 1][1] < units[k][0] and text[units[k - 1][1]:units[k][0]].isspace()


def _fit(units: list[Unit], max_tokens: int) -> list[Unit]:
    """Units that cost more than a whole window (a 10,000-character 'word') cut in pieces."""
    if all(c <= max_tokens for _s, _e, c in units):
        return units
    out = []
    for start, end, c in units:
        if c <= max_tokens:
            out.append((start, end, c))
            continue
        pieces = -(-c // max_tokens)
        step = -(-(end - start) // pieces)
        for s in range(start, end, step):
            out.append((s, min(s + step, end), -(-c // pieces)))
    return out
