"""Embed one batch so that a real server cannot lose rows: split, bisect, validate.

Backends only know `embed_batch(texts)`. Everything that makes a run survive a real server
lives here, once: a batch too large (413, or too many tokens) is split in halves and the
size that worked remembered, a batch the server refuses for its content (a 400/422 that
is about the input) is bisected until the bad inputs are found (about log2(batch) extra
requests each); any other failure is the server's, already retried once by `http`, and
stops the run, and vectors are checked (count,
dimension, finite values) before anyone writes them.
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import dimensions
from .constants import BISECT_FAILURE_SLACK, PREVIEW_CHARS
from .errors import (BackendError, BadInput, BatchTooLarge, EmbeddingValidationError,
                     SomeInputsFailed)

log = logging.getLogger(__name__)


def preview(text: str) -> str:
    """The start of `text` on one line, for error messages.

    >>> preview("a\\nb"), len(preview("x" * 500)) <= 61
    ('a b', True)
    """
    flat = " ".join(str(text).split())
    return flat if len(flat) <= PREVIEW_CHARS else flat[:PREVIEW_CHARS] + "…"


@dataclass
class Failure:
    """One input that got no vector: where it is (its position in the caller's list, and
    the row id when it is a row), what it starts with, why, and the HTTP status if any.
    The one failure type: `embed_resilient`, every driver and the failures file use it."""

    position: int
    preview: str
    reason: str
    status: int | None = None
    id: str | None = None
    limit: int | None = None      # the window the server stated when it refused the text


    def record(self) -> dict:
        """One line of the failures file (`runs/failures-<time>.jsonl`)."""
        return {"id": self.id, "reason": self.reason, "text_preview": self.preview,
                "status": self.status}


class BatchSizer:
    """The batch size that works, shared by all threads of a run.

    It starts at the configured size and only ever shrinks: once a server has
    said "too large" for a size, sending that size again costs a wasted request.
    """

    def __init__(self, size: int):
        self._size = max(int(size), 1)
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        with self._lock:
            return self._size

    def shrink(self, size: int) -> None:
        """Remember that batches of `size` work after a larger one was refused."""
        with self._lock:
            if size < self._size:
                log.info("batch of %d too large for the server; sending %d from now on "
                         "(set EMBED_BATCH_SIZE=%d to skip the split)", self._size, size, size)
                self._size = max(size, 1)


class Dimension:
    """The vector dimension of a run, shared by its threads: expected (EMBEDDING_DIM, the
    table, the cache) or learned from the first batch that comes back; every later batch
    must match it."""

    def __init__(self, expected: int | None = None, source: str = "EMBEDDING_DIM"):
        self.value, self.expected, self.source = expected, expected is not None, source
        self._lock = threading.Lock()

    def adopt(self, value: int, source: str) -> None:
        """Take a dimension found after the start (the cache holds one for this model)."""
        with self._lock:
            if self.value is None:
                self.value, self.expected, self.source = value, True, source

    def check(self, got: int, route: str, model: str) -> None:
        with self._lock:
            if self.value is None:
                self.value = got
            elif got != self.value:
                raise dimension_error(route, model, got, self.value, expected=self.expected,
                                      source=self.source)


class _Resilient:
    """The state of one `embed_resilient` call."""

    def __init__(self, backend: Any, texts: list[str], sizer: BatchSizer | None,
                 dimension: Dimension):
        self.backend, self.texts, self.sizer, self.dimension = backend, texts, sizer, dimension
        self.parts: list[tuple[int, np.ndarray, np.ndarray]] = []  # offset, rows, good mask
        self.failures: list[Failure] = []
        self.failed_in_a_row = 0
        # Bisecting one bad input fails at most ~2*log2(n) requests before a success;
        # far more in a row means the server rejects everything: stop and say so.
        self.max_failed_in_a_row = 2 * math.ceil(math.log2(max(len(texts), 2))) + BISECT_FAILURE_SLACK

    def run(self) -> tuple[np.ndarray, list[Failure]]:
        size = self.sizer.size if self.sizer else len(self.texts)
        for offset in range(0, len(self.texts), size):
            self.solve(offset, self.texts[offset:offset + size])
        out = np.full((len(self.texts), self.dimension.value or 0), np.nan, dtype=np.float32)
        for offset, rows, good in self.parts:
            out[offset:offset + len(rows)][good] = rows[good]
        return out, sorted(self.failures, key=lambda f: f.position)

    def solve(self, offset: int, batch: list[str]) -> bool:
        """Embed `batch` (at `offset`), splitting or bisecting; True when all succeeded."""
        try:
            vectors = self.backend.embed_batch(batch)
        except BatchTooLarge as exc:
            if len(batch) == 1:
                return self.fail(offset, batch[0], exc, "too large for the server even alone")
            half = (len(batch) + 1) // 2
            log.debug("batch of %d too large; splitting", len(batch))
            ok = self.solve(offset, batch[:half])
            # The left half may have taught the sizer a smaller size: use it at once.
            step = min(half, self.sizer.size) if self.sizer else half
            for start in range(half, len(batch), step):
                ok &= self.solve(offset + start, batch[start:start + step])
            if ok and self.sizer:
                self.sizer.shrink(half)
            return ok
        except SomeInputsFailed as exc:  # the backend knows which texts were refused
            for position, error in exc.errors.items():
                self.fail(offset + position, batch[position], error)
            if len(exc.errors) < len(batch):
                self.failed_in_a_row = 0
                self.accept(offset, batch, np.asarray(exc.vectors, np.float32), set(exc.errors))
            return False
        except BadInput as exc:
            # Only an error about the input is worth halving the batch for: a 5xx, a 429 or
            # a timeout left after `http`'s retries says the server is failing, and halves
            # would only multiply the requests (one retry layer: `http`).
            self.failed_in_a_row += 1
            if self.failed_in_a_row > self.max_failed_in_a_row:
                raise BackendError(
                    f"{self.failed_in_a_row} requests in a row failed while isolating bad "
                    f"inputs: the server seems to reject everything.", backend=exc.backend,
                    status=exc.status, server_message=exc.server_message, hint=exc.hint) from None
            if len(batch) == 1:
                return self.fail(offset, batch[0], exc)
            half = (len(batch) + 1) // 2
            log.debug("batch of %d failed (%s); bisecting", len(batch), exc.status)
            return self.solve(offset, batch[:half]) & self.solve(offset + half, batch[half:])
        self.failed_in_a_row = 0
        return self.accept(offset, batch, np.asarray(vectors, dtype=np.float32))

    def fail(self, offset: int, text: str, exc: BackendError, why: str = "") -> bool:
        reason = exc.server_message or str(exc)
        self.failures.append(Failure(offset, preview(text), f"{why}: {reason}" if why else reason,
                                     exc.status, limit=getattr(exc, "limit", None)))
        return False

    def accept(self, offset: int, batch: list[str], vectors: np.ndarray,
               refused: set[int] = frozenset()) -> bool:
        route, model = self.backend.route, self.backend.model
        if vectors.ndim != 2 or vectors.shape[0] != len(batch):
            raise EmbeddingValidationError(
                f"{route} returned {vectors.shape[0] if vectors.ndim else 0} vectors for "
                f"{len(batch)} texts; nothing was written. Check the server's logs.")
        if vectors.shape[1] == 0:
            raise EmbeddingValidationError(
                f"{route} returned empty vectors for model {model!r}; is it an embedding model? "
                f"Check the model setting of the backend.")
        self.dimension.check(vectors.shape[1], route, model)
        good = np.isfinite(vectors).all(axis=1)
        for i in np.flatnonzero(~good):
            if int(i) in refused:
                continue
            self.failures.append(Failure(offset + int(i), preview(batch[i]),
                                         "the vector contains NaN or infinite values", None))
        self.parts.append((offset, vectors, good))
        return bool(good.all())


def dimension_error(route: str, model: str, got: int, want: int, *, expected: bool = True,
                    source: str = "EMBEDDING_DIM") -> EmbeddingValidationError:
    """The message for vectors of the wrong size, saying what to set."""
    if source == dimensions.SETTING:
        return dimensions.ignored_error(route, model, got, want)
    if not expected:
        return EmbeddingValidationError(
            f"{route} returned {got}-dim and {want}-dim vectors for model {model!r} in one run; "
            f"nothing was written. Are several servers behind OLLAMA_HOST / OPENAI_BASE_URL "
            f"(or a load balancer) serving different models?")
    return EmbeddingValidationError(
        f"{route} model {model!r} returns {got}-dim vectors, but {want} are expected "
        f"({source}). Nothing was written. Either set EMBEDDING_DIM={got} and write to a new "
        f"table, or choose the model that makes {want}-dim vectors.")


def embed_resilient(backend: Any, texts: list[str], *, sizer: BatchSizer | None = None,
                    dimension: Dimension | None = None) -> tuple[np.ndarray, list[Failure]]:
    """Embed one logical batch, surviving oversize batches and bad inputs.

    Returns:
        (n, dim) float32 vectors, NaN rows where an input failed, and the failures
        (positions relative to `texts`).
    Raises:
        BackendUnreachable, AuthenticationError, ModelNotFound: nothing can succeed.
        EmbeddingValidationError: wrong count, dimension or empty vectors.
    """
    texts = list(texts)
    dimension = dimension or Dimension()
    if not texts:
        return np.empty((0, dimension.value or 0), dtype=np.float32), []
    return _Resilient(backend, texts, sizer, dimension).run()
