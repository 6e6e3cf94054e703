"""Backends by name. A dict registry: adding one is one line here and one file."""
from __future__ import annotations

import importlib

from ..config import Settings
from ..errors import ConfigError
from .base import Backend

# name -> "module:Class", imported on demand so that choosing `ollama` never imports torch.
REGISTRY: dict[str, str] = {
    "local": "embed_helpers.backends.local:LocalBackend",
    "ollama": "embed_helpers.backends.ollama:OllamaBackend",
    "llm_api": "embed_helpers.backends.llm_api:OpenAIBackend",
}


def get_backend(settings: Settings) -> Backend:
    """The backend named by `settings.EMBEDDING_BACKEND`, ready to use."""
    name = settings.EMBEDDING_BACKEND
    if name not in REGISTRY:
        raise ConfigError("EMBEDDING_BACKEND", f"unknown backend {name!r}; valid: {', '.join(REGISTRY)}")
    module_name, class_name = REGISTRY[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(settings)


__all__ = ["Backend", "REGISTRY", "get_backend"]
