"""Wire types of the HTTP APIs, apart from the handlers (pydantic validates on arrival).

Requests only: responses are built as plain JSON in the exact shapes the official
clients parse. Fields the APIs define but hearth does not use are accepted and ignored
(``extra="ignore"``) so that ordinary clients work; fields that would change the
answer and are not supported are refused with a 400 by the handlers.

Each generation request builds its ``GenerationParams`` with ``to_params()``: only
the fields the client set, so the model's and the front end's defaults fill the rest
(``types.resolve_params``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import logging
import math

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from pydantic_core import PydanticCustomError

from ..errors import BadRequest
from ..types import MAX_STOP_LENGTH, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, GenerationParams, sampler_order

log = logging.getLogger(__name__)

# -- OpenAI ---------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class OtherPart(_Request):
    """Image, audio, file parts: parsed so the error can say what is unsupported."""

    type: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[Union[TextPart, OtherPart]], None] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this answers
    reasoning_content: str | None = None  # assistant: its thinking (llama-server's name)


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    # llama-server's shorter form: the schema right here, for json_object or json_schema
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")


def _response_format(fmt: ResponseFormat | None) -> dict[str, Any]:
    if fmt is None or fmt.type == "text":
        return {}
    if fmt.type == "json_object":  # any object, or the schema given with it (llama-server)
        return {"json_schema": fmt.schema_ or {"type": "object"}}
    schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
    if schema is None:
        schema = fmt.schema_
    if schema is None:
        raise BadRequest("response_format json_schema needs json_schema.schema (or schema)")
    return {"json_schema": schema or {"type": "object"}}


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for k, v in (raw or {}).items():
        try:
            tok = int(k)
        except ValueError:
            raise BadRequest(f"logit_bias keys must be token ids, got {k!r}") from None
        if not -100.0 <= v <= 100.0:
            raise BadRequest(f"logit_bias values must be in -100..100, got {v} for token {tok}")
        out[tok] = v
    return out


# the OpenAI (and llama-server) fields that map one to one onto GenerationParams
_OPENAI_SAME = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
                "frequency_penalty", "seed", "stop", "ignore_eos", "grammar", "json_schema",
                "typical_p", "mirostat", "mirostat_tau", "mirostat_eta", "xtc_probability", "xtc_threshold",
                "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers",
                "dynatemp_range", "dynatemp_exponent", "top_n_sigma", "min_keep", "samplers")

_Breaker = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_LENGTH)]


class _Sampling(_Request):
    """What /v1/completions and /v1/chat/completions share."""

    model: str | None = None  # None: the configured default model
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # llama.cpp server extensions, same names
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, ge=0.0)
    repeat_last_n: int | None = Field(default=None, ge=-1)
    ignore_eos: bool | None = None
    n_predict: int | None = Field(default=None, ge=-1)  # llama-server's max_tokens; -1: no limit
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    # llama-server's other samplers (same names, same meanings; GenerationParams checks the rest)
    typical_p: float | None = Field(default=None, ge=0.0, le=1.0)
    mirostat: int | None = Field(default=None, ge=0, le=2)  # 0 off, 1 Mirostat, 2 Mirostat 2.0
    mirostat_tau: float | None = Field(default=None, ge=0.0)
    mirostat_eta: float | None = Field(default=None, ge=0.0)
    xtc_probability: float | None = Field(default=None, ge=0.0, le=1.0)
    xtc_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    dry_multiplier: float | None = Field(default=None, ge=0.0)
    dry_base: float | None = Field(default=None, ge=1.0)
    dry_allowed_length: int | None = Field(default=None, ge=0)
    dry_penalty_last_n: int | None = Field(default=None, ge=-1)  # -1: the whole context
    dry_sequence_breakers: list[_Breaker] | None = Field(default=None, min_length=1, max_length=MAX_STOP_STRINGS)
    dynatemp_range: float | None = Field(default=None, ge=0.0)
    dynatemp_exponent: float | None = Field(default=None, ge=0.0)
    top_n_sigma: float | None = None
    min_keep: int | None = Field(default=None, ge=0)
    samplers: Union[str, list[str], None] = None  # names, or a string of one-letter codes
    n_probs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # llama-server's logprobs count

    @field_validator("samplers")
    @classmethod
    def _known_samplers(cls, v: Union[str, list[str], None]) -> list[str] | None:
        if v is None:
            return None
        try:
            return sampler_order(v)
        except BadRequest as e:
            raise PydanticCustomError("value_error", e.message.removeprefix("samplers: ")) from None

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def _logprobs(self) -> int | None:
        return self.n_probs or None  # llama-server's n_probs: 0 means none

    def to_params(self) -> GenerationParams:
        kw: dict[str, Any] = {k: getattr(self, k) for k in _OPENAI_SAME if getattr(self, k) is not None}
        if self.logit_bias:
            kw["logit_bias"] = _logit_bias(self.logit_bias)
        fmt = getattr(self, "response_format", None)
        if fmt is not None:
            kw.update(_response_format(fmt))
        n_top = self._logprobs()
        if n_top is not None:
            kw["logprobs"] = n_top
        max_tokens = self._max_tokens()
        if max_tokens is None and self.n_predict is not None:
            max_tokens = None if self.n_predict < 0 else self.n_predict
            kw["max_tokens"] = max_tokens
        elif max_tokens is not None:
            kw["max_tokens"] = max_tokens
        return GenerationParams.from_kwargs(**kw)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None  # "none" | "minimal" | "low" | "medium" | "high"
    chat_template_kwargs: dict[str, Any] | None = None  # llama-server: e.g. {"enable_thinking": false}

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true")
        if self.logprobs is None:  # llama-server's n_probs, when OpenAI's fields are not given
            return super()._logprobs()
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    response_format: ResponseFormat | None = None  # not OpenAI's, but llama.cpp's
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None

    def _logprobs(self) -> int | None:
        return self.logprobs if self.logprobs is not None else super()._logprobs()


class EmbeddingRequest(_Request):
    model: str | None = None
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


# -- Ollama ---------------------------------------------------------------------------


class OllamaMessage(_Request):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    thinking: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None  # tool: which tool answered


# Ollama option -> GenerationParams field
_OLLAMA_OPTIONS = {
    "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
    "seed": "seed", "stop": "stop", "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "typical_p": "typical_p", "mirostat": "mirostat", "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta",
}
# accepted and not (yet) applied: loading is planned per model, not per request
_OLLAMA_IGNORED = {"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep", "use_mmap",
                   "use_mlock", "numa", "low_vram", "penalize_newline", "tfs_z", "vocab_only", "f16_kv",
                   "logits_all"}


def ollama_params(options: dict[str, Any] | None, fmt: Any = None, logprobs: int | None = None) -> GenerationParams:
    """Ollama's ``options`` and ``format`` -> GenerationParams (only what was given)."""
    kw: dict[str, Any] = {} if logprobs is None else {"logprobs": logprobs}
    for k, v in (options or {}).items():
        if k == "num_predict":
            if isinstance(v, float) and math.isfinite(v) and v.is_integer():
                v = int(v)
            if not isinstance(v, int) or isinstance(v, bool):
                raise BadRequest(f"options.num_predict must be an integer, got {v!r}")
            kw["max_tokens"] = v if v >= 0 else None  # -1 forever, -2 fill the context
        elif k in _OLLAMA_OPTIONS:
            if v is not None:
                kw[_OLLAMA_OPTIONS[k]] = v
        elif k not in _OLLAMA_IGNORED:
            log.debug("ignoring unknown option %s", k)
    if fmt == "json":
        kw["json_schema"] = {"type": "object"}
    elif isinstance(fmt, dict):
        kw["json_schema"] = fmt
    try:
        return GenerationParams.from_kwargs(**kw)
    except BadRequest as e:
        raise BadRequest(f"options: {e}") from None


class _OllamaRequest(_Request):
    model: str = ""  # empty: the server's default model
    stream: bool = True
    format: Union[Literal["", "json"], dict[str, Any], None] = None
    options: dict[str, Any] | None = None
    keep_alive: Union[str, int, float, None] = None  # "5m", seconds; 0 unload after, <0 forever
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def n_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def to_params(self) -> GenerationParams:
        return ollama_params(self.options, self.format, self.n_logprobs())


class OllamaGenerateRequest(_OllamaRequest):
    think: Union[bool, Literal["low", "medium", "high"], None] = None
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None
    suffix: str | None = None


class OllamaChatRequest(_OllamaRequest):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[Any] | None = None
    think: Union[bool, Literal["low", "medium", "high"], None] = None


class OllamaShowRequest(_Request):
    model: str | None = None
    name: str | None = None  # older clients


class OllamaEmbedRequest(_Request):
    model: str = ""
    input: Union[str, list[str]]
    truncate: bool = True  # Ollama's default: cut inputs to the context
    options: dict[str, Any] | None = None
    keep_alive: Union[str, int, float, None] = None
    dimensions: int | None = Field(default=None, ge=1)


class OllamaEmbeddingsRequest(_Request):
    """The older single-prompt endpoint, /api/embeddings."""

    model: str = ""
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: Union[str, int, float, None] = None


class OllamaPullRequest(_Request):
    model: str | None = None
    name: str | None = None  # older clients
    insecure: bool = False
    stream: bool = True


class OllamaDeleteRequest(_Request):
    model: str | None = None
    name: str | None = None
