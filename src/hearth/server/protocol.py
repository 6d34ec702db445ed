"""Wire types of the HTTP APIs, apart from the handlers (pydantic validates on arrival).

Requests only: responses are built as plain JSON in the exact shapes the official
clients parse. Fields the APIs define but hearth does not use are accepted and ignored
(``extra="ignore"``) so that ordinary clients work; fields that would change the
answer and are not supported are refused with a 400 by the handlers.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

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


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


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
    ignore_eos: bool | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    tools: list[dict[str, Any]] | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    response_format: ResponseFormat | None = None  # not OpenAI's, but llama.cpp's
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


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


class _OllamaRequest(_Request):
    model: str = Field(min_length=1)
    stream: bool = True
    format: Union[Literal["", "json"], dict[str, Any], None] = None
    options: dict[str, Any] | None = None
    keep_alive: Union[str, int, float, None] = None  # "5m", seconds; 0 unload after, <0 forever


class OllamaGenerateRequest(_OllamaRequest):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None
    suffix: str | None = None


class OllamaChatRequest(_OllamaRequest):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class OllamaShowRequest(_Request):
    model: str | None = None
    name: str | None = None  # older clients


class OllamaEmbedRequest(_Request):
    model: str = Field(min_length=1)
    input: Union[str, list[str]]
    truncate: bool = True  # Ollama's default: cut inputs to the context
    options: dict[str, Any] | None = None
    keep_alive: Union[str, int, float, None] = None
    dimensions: int | None = Field(default=None, ge=1)


class OllamaEmbeddingsRequest(_Request):
    """The older single-prompt endpoint, /api/embeddings."""

    model: str = Field(min_length=1)
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
