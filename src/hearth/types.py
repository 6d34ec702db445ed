"""Data that crosses layers: what a caller asks for and what generation gives back."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .errors import BadRequest

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass
class GenerationConfig:
    """How to generate. Validated on construction; unknown names are refused."""

    max_tokens: int | None = 256  # None = until the context is full
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1  # Ollama's default: small models loop without it
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_last_n: int = 64
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None
    json_schema: dict | str | None = None
    ignore_eos: bool = False  # keep going past end-of-generation tokens (benchmarks)

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, int)
            or self.max_tokens < 0
        ):
            raise BadRequest(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise BadRequest("stop must be a string or a list of strings")
        self.stop = [s for s in self.stop if s]
        # sampling fields validate themselves in SamplingParams
        self.sampling_params()

    @classmethod
    def from_kwargs(cls, base: GenerationConfig | None = None, **kwargs: Any) -> GenerationConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise BadRequest(
                f"unknown generation setting(s): {', '.join(unknown)} "
                f"(known: {', '.join(sorted(names))})"
            )
        values = asdict(base) if base is not None else {}
        values.update({k: v for k, v in kwargs.items() if v is not None or k in ("max_tokens", "seed")})
        return cls(**values)

    def sampling_params(self):  # -> SamplingParams (import kept lazy: no llama_cpp at import)
        from .engines.llamacpp.sampling import SamplingParams

        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repeat_last_n=self.repeat_last_n,
            seed=self.seed,
            logit_bias=self.logit_bias,
            grammar=self.grammar,
            json_schema=self.json_schema,
        )


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass
class Timings:
    ttft: float = 0.0  # seconds from submission to the first generated token
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    queue_seconds: float = 0.0
    prompt_tokens_per_second: float = 0.0
    generation_tokens_per_second: float = 0.0
    total_seconds: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in asdict(self).items()}


@dataclass
class GenerationChunk:
    """One piece of a stream: new text (possibly empty) and the tokens behind it."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None


@dataclass
class GenerationResult:
    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    token_ids: list[int] = field(default_factory=list)
    model: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": self.usage.to_dict(),
            "timings": self.timings.to_dict(),
        }
