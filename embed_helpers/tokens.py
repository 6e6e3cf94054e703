"""How much of a text a model reads, and how we count it.

Every embedding model reads a window of tokens and drops the rest without a word. A backend
states its `Window`: the most tokens one input may hold, the most one request may carry,
and a counter. The `local` backend counts with the model's own tokenizer (exact); the HTTP
backends cannot tokenize offline, so they count conservatively from the UTF-8 length and
say that the figure is an estimate.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .constants import ESTIMATED_BYTES_PER_TOKEN

#: A unit of text for splitting: (start, end) characters and what it costs in tokens.
Unit = tuple[int, int, int]
_WORDS = re.compile(r"\S+")


class EstimatedTokens:
    """ceil(UTF-8 bytes / ESTIMATED_BYTES_PER_TOKEN): an upper estimate for real tokenizers.

    Measured on the PubMed abstracts with a WordPiece tokenizer, a token is 3.1 to 7 bytes
    (median 4.5); BPE tokenizers such as OpenAI's take more bytes per token. Counting 2.5
    bytes per token overestimates, so windows are never overrun, at the price of chunks a
    little shorter than the model could take.

    >>> EstimatedTokens().count(["abcde", "", "é"])
    [2, 0, 1]
    """

    exact = False
    name = f"estimate: 1 token per {ESTIMATED_BYTES_PER_TOKEN:g} UTF-8 bytes"

    def count(self, texts: Sequence[str]) -> list[int]:
        return [math.ceil(len(t.encode("utf-8", "surrogatepass")) / ESTIMATED_BYTES_PER_TOKEN)
                for t in texts]

    def units(self, text: str) -> list[Unit]:
        """Words (with what follows them) priced by their bytes, for `chunking.split`.

        >>> EstimatedTokens().units("ab cdefgh")
        [(0, 2, 2), (3, 9, 3)]
        """
        rate = ESTIMATED_BYTES_PER_TOKEN
        return [(m.start(), m.end(), math.ceil(len(m.group().encode("utf-8", "surrogatepass")) / rate
                                               + 1 / rate))  # + the space after it
                for m in _WORDS.finditer(text)]


class TokenizerCount:
    """Exact counts from a Hugging Face `tokenizer.json` (no torch needed)."""

    exact = True

    def __init__(self, tokenizer_file: Path | str, name: str = ""):
        from tokenizers import Tokenizer  # note: a small Rust library, imported in ~30 ms
        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.name = f"the model's tokenizer{f' ({name})' if name else ''}"

    def specials(self) -> int:
        """Tokens the model adds to every input ([CLS] and [SEP] for BERT models)."""
        return len(self._tokenizer.encode("", add_special_tokens=True).ids)

    def count(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [len(e.ids) for e in encodings]

    def units(self, text: str) -> list[Unit]:
        offsets = self._tokenizer.encode(text, add_special_tokens=False).offsets
        return [(start, end, 1) for start, end in offsets if end > start]


@dataclass(frozen=True)
class Window:
    """What one input and one request may hold.

    Attributes:
        max_tokens: tokens of text one input may hold (special tokens already deducted).
        counter: `EstimatedTokens` or `TokenizerCount`.
        source: where `max_tokens` comes from, for the plan and the report.
        request_tokens: the most tokens one request may carry, or None for no limit.
        origin: what kind of source: "setting", "server", "model" (the local model's own
            files), "measured" or "assumed" (`windows.ORIGINS`).
    """

    max_tokens: int
    counter: EstimatedTokens | TokenizerCount
    source: str
    request_tokens: int | None = None
    origin: str = "assumed"

    @property
    def exact(self) -> bool:
        return self.counter.exact

    def describe(self) -> str:
        how = "exact" if self.exact else "estimated"
        budget = f"; at most {self.request_tokens:,} tokens per request" \
            if self.request_tokens else ""
        return f"{self.max_tokens:,} tokens per text ({self.origin}: {self.source}; counts {how}: " \
               f"{self.counter.name}){budget}"
