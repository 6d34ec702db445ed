"""hearth: a zero-configuration runtime for local LLMs on llama.cpp.

    >>> import hearth
    >>> model = hearth.load_model()              # the embedded default model
    >>> hearth.generate_text(model, "The sky is", max_tokens=8).text

The public names load on first use (PEP 562), so ``import hearth`` stays cheap and
``hearth run`` can reach a running daemon before anything heavy is imported.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing costs milliseconds; `hearth run` on the daemon avoids it
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        ("BenchmarkResult", "Model", "benchmark_inference", "count_tokens", "estimate_memory_usage",
         "generate_chat", "generate_text", "get_model_info", "load_model", "plan_model",
         "quick_chat", "quick_complete"),
        ".api",
    ),
    **dict.fromkeys(
        ("BadRequest", "Busy", "Cancelled", "ConfigError", "ContextOverflow", "DoesNotFit",
         "EngineError", "HearthError", "InvalidModel", "ModelChanged", "ModelNotFound", "UnsupportedFormat"),
        ".errors",
    ),
    "ModelInfo": ".gguf",
    **dict.fromkeys(("LoadOptions", "LoadPlan", "MemoryEstimate"), ".planner"),
    **dict.fromkeys(("GenerationChunk", "GenerationConfig", "GenerationParams", "GenerationResult", "Timings", "Usage"),
        ".types"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hearth' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # next time, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .api import (
        BenchmarkResult, Model, benchmark_inference, count_tokens, estimate_memory_usage,
        generate_chat, generate_text, get_model_info, load_model, plan_model, quick_chat,
        quick_complete,
    )
    from .errors import (
        BadRequest, Busy, Cancelled, ConfigError, ContextOverflow, DoesNotFit, EngineError,
        HearthError, InvalidModel, ModelNotFound, UnsupportedFormat,
    )
    from .gguf import ModelInfo
    from .planner import LoadOptions, LoadPlan, MemoryEstimate
    from .types import GenerationChunk, GenerationConfig, GenerationParams, GenerationResult, Timings, Usage
