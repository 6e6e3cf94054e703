"""The backends by name: "module:Class", imported only when chosen.

Settings validate EMBEDDING_BACKEND against these names without importing any backend
(`config` imports this, never `backends`); `backends.get_backend` imports the one chosen,
so choosing `ollama` never imports torch.
"""
from __future__ import annotations

REGISTRY: dict[str, str] = {
    "local": "embed_helpers.backends.local:LocalBackend",
    "ollama": "embed_helpers.backends.ollama:OllamaBackend",
    "llm_api": "embed_helpers.backends.llm_api:OpenAIBackend",
}
#: The offline default: needs no server, no key and no network.
DEFAULT_BACKEND = "local"
