"""Backends by name, from the registry (`registry.py`): adding one is one line there and
one file here."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..registry import DEFAULT_BACKEND, REGISTRY
from .base import Backend

if TYPE_CHECKING:
    from ..config import Settings

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
