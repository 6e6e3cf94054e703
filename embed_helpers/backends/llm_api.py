"""OpenAI-compatible `/embeddings`: OpenAI, vLLM, TEI, LiteLLM, Ollama's `/v1`."""
from __future__ import annotations

import base64
import logging
from functools import cached_property
from typing import Sequence

import numpy as np

from .. import dimensions, windows
from ..config import Settings
from ..constants import (OPENAI_COMPATIBLE_DEFAULT_INPUT_TOKENS, OPENAI_MAX_INPUT_TOKENS,
                         OPENAI_MAX_REQUEST_TOKENS, OPENAI_PRICES_PER_1M_TOKENS)
from ..errors import BackendError, ConfigError, EmbeddingValidationError
from ..tokens import Window
from .remote import RemoteBackend, rows_to_array

log = logging.getLogger(__name__)


class OpenAIBackend(RemoteBackend):
    """POST {OPENAI_BASE_URL}/embeddings {"input": [...], "model", "encoding_format"}.

    Vectors are placed by `data[i].index`, never by position: the API does not
    promise the order. OpenAI's vectors have unit length; so do TEI's and vLLM's
    defaults, hence `normalized = True`. Vectors are asked for as base64 (a quarter of
    the bytes, no float parsing); a server that refuses it is asked for floats from then
    on, and one that ignores it answers floats, which are read as such.
    """

    name = "llm_api"
    model_setting = "OPENAI_EMBED_MODEL"
    url_setting = "OPENAI_BASE_URL"
    service = "the embedding API"
    speaks_batch_api = True  # EMBED_HOSTED_MODE=batch: OpenAI's /files and /batches (batch_api/)

    def __init__(self, settings: Settings, **options):
        key = settings.OPENAI_API_KEY
        if "api.openai.com" in settings.OPENAI_BASE_URL and not key:
            raise ConfigError("OPENAI_API_KEY", "is required for api.openai.com; set it in .env "
                                                "(never in the notebook).")
        super().__init__(
            settings, **options,
            headers={"Authorization": f"Bearer {key}"} if key else None, secret=key,
            model_hint=f"Set OPENAI_EMBED_MODEL to a model this server serves "
                       f"(now {settings.OPENAI_EMBED_MODEL!r}; GET .../v1/models lists them).",
            unreachable_hint="Is the server running? Is OPENAI_BASE_URL right (it ends in /v1)?")
        self.encoding = settings.EMBED_ENCODING

    @cached_property
    def window(self) -> Window:
        """EMBED_MAX_INPUT_TOKENS, else OpenAI's documented limit for the model, else what the
        server states (`windows.server_says`: vLLM, TEI, llama.cpp), else 8,191 (assumed, and
        said so: `windows.settle` then measures it). Counted in the model's tokens where its
        tokenizer is known (`windows.counter_for`)."""
        counter = windows.counter_for(self.settings, self.model)
        asked = self.settings.EMBED_MAX_INPUT_TOKENS
        if asked:
            limit, source, origin = asked, "EMBED_MAX_INPUT_TOKENS", "setting"
        elif self.model in OPENAI_MAX_INPUT_TOKENS:
            limit, source, origin = OPENAI_MAX_INPUT_TOKENS[self.model], \
                f"OpenAI's limit for {self.model}", "server"
        else:
            said = windows.server_says(self.http, self.model)
            limit, source, origin = (said.limit, said.source, "server") if said.limit else \
                (OPENAI_COMPATIBLE_DEFAULT_INPUT_TOKENS,
                 "8,191, as nothing states it (set EMBED_MAX_INPUT_TOKENS to the model's limit)",
                 "assumed")
        return Window(max(limit - windows.specials(counter), 1), counter, source,
                      self.request_budget(OPENAI_MAX_REQUEST_TOKENS), origin)

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        payload = {"input": texts, "model": self.model, "encoding_format": self.encoding,
                   **dimensions.request_field(self.settings.EMBED_DIMENSIONS)}
        try:
            body = self.http.post_json("/embeddings", payload, texts=len(texts))
        except BackendError as exc:
            dimensions.raise_if_refused(exc, self.model, self.settings.EMBED_DIMENSIONS)
            if self.encoding != "base64" or exc.status not in (400, 422) \
                    or not any(w in (exc.server_message or "").lower()
                               for w in ("encoding_format", "base64", "encoding format")):
                raise
            log.info("%s refuses encoding_format=base64 (%s): asking for floats from now on",
                     self.service, exc.server_message)
            self.encoding = "float"
            return self.embed_batch(texts)
        if isinstance(body, dict):  # who answered: before any vector is cached or stored
            windows.check_answer(self.model, body.get("model"), self.service)
        items = body.get("data") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise EmbeddingValidationError(
                f"llm_api: the answer has no `data` list (keys: {sorted(body)[:5]}); is "
                f"OPENAI_BASE_URL an OpenAI-compatible /v1 endpoint?")
        indices = [item.get("index", -1) for item in items]
        if sorted(indices) != list(range(len(texts))):
            raise EmbeddingValidationError(
                f"llm_api returned {len(items)} vectors with indices {sorted(indices)[:10]}... "
                f"for {len(texts)} texts; nothing was written.")
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        tokens = usage.get("prompt_tokens", usage.get("total_tokens"))
        if isinstance(tokens, int) and tokens >= 0:  # what the server bills
            self.http.count_tokens(tokens)
        rows: list = [None] * len(texts)
        for item in items:
            rows[item["index"]] = self._decode(item.get("embedding"))
        return rows_to_array(rows, len(texts), backend=self.name)

    def _decode(self, embedding) -> np.ndarray | list:
        if isinstance(embedding, str):  # base64 of little-endian float32, whatever we asked
            return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
        return embedding or []

    @property
    def price_per_1m_tokens(self) -> tuple[float, str] | None:
        if self.settings.EMBED_PRICE_PER_1M_TOKENS is None and self.model in OPENAI_PRICES_PER_1M_TOKENS:
            return OPENAI_PRICES_PER_1M_TOKENS[self.model], f"OpenAI's list price for {self.model}"
        return super().price_per_1m_tokens

    def stats(self) -> dict:
        return {**super().stats(), "encoding": self.encoding}
