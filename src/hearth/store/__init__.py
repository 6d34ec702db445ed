"""Where models come from: names -> files on disk (embedded, pulled, Ollama's, catalog)."""

from .registry import (
    DEFAULT_MODEL,
    KNOWN_MODELS,
    Installed,
    ResolvedModel,
    installed,
    remove_model,
    resolve_model,
)

__all__ = ["KNOWN_MODELS", "DEFAULT_MODEL", "Installed", "ResolvedModel", "installed", "remove_model",
           "resolve_model"]
