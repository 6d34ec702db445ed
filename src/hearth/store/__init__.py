"""Where models come from: names -> files on disk."""

from .registry import KNOWN_MODELS, DEFAULT_MODEL, ResolvedModel, resolve_model

__all__ = ["KNOWN_MODELS", "DEFAULT_MODEL", "ResolvedModel", "resolve_model"]
