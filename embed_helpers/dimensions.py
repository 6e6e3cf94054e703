"""EMBED_DIMENSIONS: asking a Matryoshka model for shorter vectors, and what servers answer.

The OpenAI API takes `dimensions` for text-embedding-3 and later and answers older models
400 "This model does not support specifying dimensions."; vLLM takes it for models marked
Matryoshka and answers others 400 'Model "X" does not support matryoshka representation,
changing output dimensions will lead to poor results.' (or 'only supports [..] matryoshka
dimensions'); infinity answers 400 "matryoshka_dim=N is not in a valid range". Ollama's
batch route cuts and renormalises any model's vector; its legacy route has no such field
(`backends/ollama.py` refuses it there). TEI's OpenAI-compatible route (through 1.8) and
Ollama before it learned the field ignore it and answer full width: the dimension check (`resilient.Dimension`) catches that,
with `ignored_error`'s words. A refusal is a setting the model cannot honour, so it is a
`ConfigError` at the first batch: never retried, never bisected, nothing written.
"""
from __future__ import annotations

import re

from .errors import BackendError, ConfigError, EmbeddingValidationError

SETTING = "EMBED_DIMENSIONS"
_REFUSAL = re.compile(r"dimension|matryoshka", re.IGNORECASE)
_FIX = ("unset it, or choose a Matryoshka model such as text-embedding-3-small (OpenAI), "
        "nomic-embed-text (Ollama) or a vLLM model marked is_matryoshka. Nothing was written.")


def request_field(dimensions: int | None) -> dict:
    """The JSON field to add to an embedding request (nothing when unset).

    >>> request_field(256), request_field(None)
    ({'dimensions': 256}, {})
    """
    return {"dimensions": int(dimensions)} if dimensions else {}


def raise_if_refused(exc: BackendError, model: str, dimensions: int | None) -> None:
    """Raise the clear error when `exc` is the server refusing `dimensions` for `model`."""
    if dimensions and exc.status in (400, 422) and _REFUSAL.search(exc.server_message or ""):
        raise ConfigError(SETTING, f"model {model!r} does not take EMBED_DIMENSIONS="
                                   f"{dimensions} (the server said: {exc.server_message}): {_FIX}")


def check_width(model: str, width: int | None, dimensions: int | None) -> None:
    """The local model cuts its own vectors: refuse a width it does not have."""
    if dimensions and width and dimensions > width:
        raise ConfigError(SETTING, f"is {dimensions}, but {model!r} makes {width}-dim vectors: "
                                   f"set EMBED_DIMENSIONS to {width} or less, or unset it.")


def ignored_error(route: str, model: str, got: int, want: int) -> EmbeddingValidationError:
    """A server that answered full width although `dimensions` was sent."""
    return EmbeddingValidationError(
        f"{route} model {model!r} returned {got}-dim vectors although EMBED_DIMENSIONS={want} "
        f"was sent as `dimensions`: the server ignored it (TEI and older Ollama do). Nothing "
        f"was written. Serve the model where `dimensions` is honoured (OpenAI, vLLM for a "
        f"Matryoshka model, a recent Ollama, infinity), or unset EMBED_DIMENSIONS.")


def expected(settings) -> tuple[int | None, str]:
    """The dimension EMBED_DIMENSIONS promises, and that name; refused when EMBEDDING_DIM
    says another (the two would never agree, and the run would stop at its first batch)."""
    asked, expected_dim = settings.EMBED_DIMENSIONS, settings.EMBEDDING_DIM
    if asked and expected_dim and asked != expected_dim:
        raise ConfigError(SETTING, f"is {asked} but EMBEDDING_DIM is {expected_dim}: vectors "
                                   f"asked at {asked} dimensions have {asked}. Unset EMBEDDING_DIM.")
    return (asked, SETTING) if asked else (None, "")
