"""OpenAI-compatible `/embeddings`: OpenAI, vLLM, TEI, LiteLLM, Ollama's `/v1`."""
from __future__ import annotations

import base64
import random
import time
from typing import Callable, Sequence

import numpy as np

from ..config import Settings
from ..errors import EmbeddingValidationError
from ..http import HttpClient, rows_to_array
from .base import Backend


class OpenAIBackend(Backend):
    """POST {OPENAI_BASE_URL}/embeddings {"input": [...], "model", "encoding_format"}.

    Vectors are placed by `data[i].index`, never by position: the API does not
    promise the order. OpenAI's vectors have unit length; so do TEI's and vLLM's
    defaults, hence `normalized = True`.
    """

    name = "llm_api"
    normalized = True

    def __init__(self, settings: Settings, *, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None):
        super().__init__(settings)
        key = settings.OPENAI_API_KEY
        self.encoding = settings.EMBED_ENCODING
        self.http = HttpClient(
            settings.OPENAI_BASE_URL, settings, backend=self.name,
            service="the embedding API", url_setting="OPENAI_BASE_URL",
            headers={"Authorization": f"Bearer {key}"} if key else None, secret=key,
            sleep=sleep, rng=rng,
            model_hint=f"Set OPENAI_EMBED_MODEL to a model this server serves "
                       f"(now {self.model!r}; GET {settings.OPENAI_BASE_URL}/models lists them).",
            unreachable_hint="Is the server running? Is OPENAI_BASE_URL right (it ends in /v1)?")

    @property
    def route(self) -> str:
        return "llm_api"

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        payload = {"input": texts, "model": self.model, "encoding_format": self.encoding}
        body = self.http.post_json("/embeddings", payload, texts=len(texts))
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
        rows: list = [None] * len(texts)
        for item in items:
            rows[item["index"]] = self._decode(item.get("embedding"))
        return rows_to_array(rows, len(texts), backend=self.name)

    def _decode(self, embedding) -> np.ndarray | list:
        if isinstance(embedding, str):  # base64 of little-endian float32, whatever we asked
            return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
        return embedding or []

    def stats(self) -> dict:
        return {**self.http.stats(), "route": self.route, "encoding": self.encoding}

    def close(self) -> None:
        self.http.close()
