"""hearth: a zero-configuration runtime for local LLMs on llama.cpp.

    >>> import hearth
    >>> model = hearth.load_model()              # the embedded default model
    >>> hearth.generate_text(model, "The sky is", max_tokens=8).text
"""

from .api import (
    BenchmarkResult,
    Model,
    benchmark_inference,
    count_tokens,
    estimate_memory_usage,
    generate_chat,
    generate_text,
    get_model_info,
    load_model,
    plan_model,
    quick_chat,
    quick_complete,
)
from .errors import (
    BadRequest,
    Busy,
    Cancelled,
    ConfigError,
    ContextOverflow,
    DoesNotFit,
    EngineError,
    HearthError,
    InvalidModel,
    ModelNotFound,
    UnsupportedFormat,
)
from .gguf import ModelInfo
from .planner import LoadOptions, LoadPlan, MemoryEstimate
from .types import GenerationChunk, GenerationConfig, GenerationResult, Timings, Usage

__version__ = "0.1.0"

__all__ = [
    "BadRequest", "BenchmarkResult", "Busy", "Cancelled", "ConfigError", "ContextOverflow",
    "DoesNotFit", "EngineError", "GenerationChunk", "GenerationConfig", "GenerationResult",
    "HearthError", "InvalidModel", "LoadOptions", "LoadPlan", "MemoryEstimate", "Model",
    "ModelInfo", "ModelNotFound", "Timings", "UnsupportedFormat", "Usage",
    "benchmark_inference", "count_tokens", "estimate_memory_usage", "generate_chat",
    "generate_text", "get_model_info", "load_model", "plan_model", "quick_chat",
    "quick_complete",
]
