"""Backends by name. A dict registry: adding one is one line here and one file.

This is the only place outside the backends' own files that knows their names.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import Backend

if TYPE_CHECKING:
    from ..config import Settings

# name -> "module:Class", imported on demand so that choosing `ollama` never imports torch.
REGISTRY: dict[str, str] = {
    "local": "embed_helpers.backends.local:LocalBackend",
    "ollama": "embed_helpers.backends.ollama:OllamaBackend",
    "llm_api": "embed_helpers.backends.llm_api:OpenAIBackend",
}
#: The offline default: needs no server, no key and no network.
DEFAULT_BACKEND = "local"


def backend_class(name: str) -> type[Backend]:
    if name not in REGISTRY:
        raise ConfigError("EMBEDDING_BACKEND",
                          f"unknown backend {name!r}; valid: {', '.join(REGISTRY)}")
    module_name, class_name = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_backend(settings: "Settings", **options) -> Backend:
    """The backend named by `settings.EMBEDDING_BACKEND`, ready to use.

    `options` go to the backend (`server_offset` rotates the server list, for workers)."""
    return backend_class(settings.EMBEDDING_BACKEND)(settings, **options)


__all__ = ["Backend", "DEFAULT_BACKEND", "REGISTRY", "backend_class", "get_backend"]
