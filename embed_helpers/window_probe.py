"""Measure the window of a server that cuts long inputs without saying so: one request.

The request holds prefixes of one long text at growing lengths, then the text itself. A
server that reads W tokens returns the same vector for every input of W tokens or more
(it reads the same W tokens of each), and a different one for every shorter prefix. So
the shortest prefix whose vector equals the whole text's gives the window, and the longest
prefix before it was read whole: its length is a window that is never overrun. When every
vector differs, the server read all of the text: it does not cut within that length.

Prefixes end at the counter's units, so the window is a number of the counter's tokens.
Without the server's tokenizer the prefixes are of a text of one-token words instead, so
the window is in the server's own tokens, and the estimate (which counts prose high) cuts
chunks that fit it, with a margin (MEASURED_ESTIMATE_MARGIN).
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np

from .constants import (MEASURE_COMMON_WINDOWS, MEASURE_MAX_PREFIXES, MEASURE_MAX_SPECIALS,
                        MEASURE_MAX_TOKENS, MEASURE_MIN_TOKENS, MEASURE_STEP, MEASURE_TOLERANCE,
                        MEASURED_ESTIMATE_MARGIN, ONE_TOKEN_WORDS)
from .errors import InputTooLong
from .tokens import Window

log = logging.getLogger(__name__)


def prefix_ends(units, exact: bool = False,
                limit: int = MEASURE_MAX_TOKENS) -> list[tuple[int, int]]:
    """(end character, tokens) of the prefixes to send: from MEASURE_MIN_TOKENS up by
    MEASURE_STEP (wider when that makes more than MEASURE_MAX_PREFIXES), then all units but
    the last; the text itself (its first `limit` tokens) comes last. Counted exactly, the
    common windows (MEASURE_COMMON_WINDOWS) are looked for to the token: the prefixes just
    short of each, for models that spend up to MEASURE_MAX_SPECIALS on their own tokens.

    >>> prefix_ends([(i, i + 1, 1) for i in range(100)])[-3:]
    [(93, 93), (99, 99), (100, 100)]
    >>> [n for _, n in prefix_ends([(i, i + 1, 1) for i in range(300)], exact=True)][-8:]
    [253, 254, 255, 256, 276, 298, 299, 300]
    """
    cumulative, ends = 0, []
    for _start, end, cost in units:
        if cumulative + cost > limit:
            break
        cumulative += cost
        ends.append((end, cumulative))
    if not ends:
        return []
    total = ends[-1][1]
    step = MEASURE_STEP
    if total > MEASURE_MIN_TOKENS:
        step = max(step, (total / MEASURE_MIN_TOKENS) ** (1 / MEASURE_MAX_PREFIXES))
    targets, target = [], float(MEASURE_MIN_TOKENS)
    while target < total and len(targets) < MEASURE_MAX_PREFIXES:
        targets.append(target)
        target *= step
    chosen, k = [], 0
    if exact:
        targets = sorted({*targets, *(w - s for w in MEASURE_COMMON_WINDOWS
                                      for s in range(MEASURE_MAX_SPECIALS + 1) if w - s < total)})
    for target in targets:
        while k + 1 < len(ends) and ends[k + 1][1] <= target:
            k += 1
        if ends[k][1] <= target and (not chosen or chosen[-1] != ends[k]):
            chosen.append(ends[k])
    for end in ends[-2:]:  # all but the last unit, then the whole
        if not chosen or chosen[-1][1] < end[1]:
            chosen.append(end)
    return chosen


def read_window(vectors: np.ndarray, tokens: list[int]) -> tuple[int, bool]:
    """(window, cut) from the vectors of the prefixes and, last, of the whole text.

    The shortest prefix equal (cosine gap under MEASURE_TOLERANCE) to the whole text, with
    every longer one equal too, marks the cut; the window is the prefix before it.

    >>> v = np.eye(4, dtype=np.float32)
    >>> read_window(np.stack([v[0], v[1], v[2], v[2]]), [10, 20, 30, 40])
    (20, True)
    >>> read_window(np.stack([v[0], v[1], v[2], v[3]]), [10, 20, 30, 40])
    (30, False)
    """
    full = vectors[-1] / (np.linalg.norm(vectors[-1]) or 1.0)
    norms = np.linalg.norm(vectors[:-1], axis=1)
    gaps = 1.0 - (vectors[:-1] @ full) / np.where(norms > 0, norms, 1.0)
    equal = gaps < MEASURE_TOLERANCE
    first = len(equal)
    while first > 0 and equal[first - 1]:
        first -= 1
    if first == len(equal):
        return tokens[-2] if len(tokens) > 1 else tokens[-1], False
    if first == 0:
        log.warning("the server gives the whole text the vector of its first %d tokens: it "
                    "reads fewer than that", tokens[0])
        return max(tokens[0] // 2, 1), True
    return tokens[first - 1], True


def one_token_words(n: int) -> tuple[str, list[tuple[int, int, int]]]:
    """A text of `n` words that are one token in every common tokenizer (WordPiece, BPE,
    SentencePiece), and its units: measured with it, a window is a number of the server's
    own tokens, whatever text the run holds.

    >>> one_token_words(3)
    ('the of and', [(0, 3, 1), (4, 6, 1), (7, 10, 1)])
    """
    words, units, at = [], [], 0
    for i in range(n):
        word = ONE_TOKEN_WORDS[i % len(ONE_TOKEN_WORDS)]
        units.append((at, at + len(word), 1))
        words.append(word)
        at += len(word) + 1
    return " ".join(words), units


def measure(backend, text: str, counter) -> dict:
    """One request: the prefixes of `text` and `text`; the fact to remember. Without the
    server's tokenizer, the run's text says nothing exact (its bytes per token vary from
    text to text: 3.5 to 6 in PubMed abstracts), so one-token words are measured instead."""
    units = counter.units(text)
    if not counter.exact:  # counted exactly: one token a word, the common windows to the token
        text, units = one_token_words(min(sum(c for _s, _e, c in units), MEASURE_MAX_TOKENS))
    ends = prefix_ends(units, exact=True)
    inputs = [text[:end] for end, _ in ends]
    vectors = np.asarray(backend.embed_batch(inputs), dtype=np.float32)
    window, cut = read_window(vectors, [n for _, n in ends])
    log.info("measured the window of %s: %s %d tokens (%d prefixes in one request)",
             backend.model, "cuts after" if cut else "reads at least", window, len(inputs))
    return {"tokens": window, "cut": cut, "within": ends[-1][1]}


def measured_or_refused(backend, text: str, counter, need: int) -> dict:
    """`measure`, or the window a refusal of the measuring request states (a server that
    refuses long inputs says its window); a refusal without a figure is raised."""
    from .windows import specials
    try:
        return measure(backend, text, counter)
    except InputTooLong as exc:
        if not exc.limit:
            raise
        return {"tokens": max(exc.limit - specials(counter), 1), "cut": True, "within": need,
                "refused": (exc.server_message or str(exc))[:120]}


def measured_window(backend, cache, texts: list[str], window: Window) -> Window:
    """`window` replaced by the measured one (or the one a refusal states): the cache store's
    fact when it covers the longest of `texts`, else one measurement, remembered there."""
    from .windows import fact_key
    counter = window.counter
    longest = max(texts, key=lambda t: len(t.encode("utf-8", "surrogatepass")))
    need = min(counter.count([longest])[0], MEASURE_MAX_TOKENS)
    key = fact_key(backend, counter)
    # Without a cache store, the backend itself remembers (batch_embed called in a loop).
    store = cache if cache is not None else backend.__dict__.setdefault("_window_facts", _Facts())
    fact = store.get_fact(key)
    usable = isinstance(fact, dict) and isinstance(fact.get("tokens"), int) \
        and (fact.get("cut") or fact.get("within", 0) >= need)
    if not usable:
        if need < MEASURE_MIN_TOKENS or backend.settings.EMBED_CACHE_ONLY:
            return window  # nothing long enough to measure with, or no request allowed
        fact = measured_or_refused(backend, longest, counter, need)
        store.put_fact(key, fact)
    if fact.get("refused"):
        return replace(window, max_tokens=fact["tokens"], origin="server",
                       source=f"the server's refusal: {fact['refused']}")
    if not fact["cut"]:  # every text of the run is read whole; beyond, the assumption stands
        return replace(window, max_tokens=max(window.max_tokens, fact["within"]), origin="measured",
                       source=f"the server read {fact['within']} tokens without a cut; "
                              f"beyond, {window.source}")
    # Estimated, the window is the server's real tokens: the estimate (2.5 bytes a token)
    # counts prose high, and the margin covers a tokenizer that cuts a common word in two.
    tokens = fact["tokens"] if counter.exact \
        else max(math.floor(fact["tokens"] * MEASURED_ESTIMATE_MARGIN), 1)
    margin = "" if counter.exact else f" (its own tokens), {MEASURED_ESTIMATE_MARGIN:.0%} of it kept"
    return replace(window, max_tokens=tokens, origin="measured",
                   source=f"the server cuts inputs after {fact['tokens']} tokens{margin}")


class _Facts(dict):
    """The facts API of a cache store, in memory."""

    def get_fact(self, key: str):
        return self.get(key)

    def put_fact(self, key: str, value) -> None:
        self[key] = value
