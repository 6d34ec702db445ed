"""OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..engines.llamacpp.sampling import JSON_GRAMMAR
from ..errors import BadRequest, HearthError
from ..types import GenerationConfig, GenerationResult, Usage
from .pool import Lease, LeasedStream, ModelPool, gather_results, merge_streams, until_disconnected, with_lease
from .protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    ResponseFormat,
    _Sampling,
)

router = APIRouter(prefix="/v1")

_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", "error": "stop"}


def _pool(request: Request) -> ModelPool:
    return request.app.state.pool


def _usage(results: list[GenerationResult]) -> dict[str, Any]:
    """The prompt is counted once (as OpenAI does for ``n``); completions add up."""
    first = results[0].usage
    return Usage(
        prompt_tokens=first.prompt_tokens,
        completion_tokens=sum(r.usage.completion_tokens for r in results),
        cached_tokens=first.cached_tokens,
    ).to_dict()


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


def _format(fmt: ResponseFormat | None) -> dict[str, Any]:
    if fmt is None or fmt.type == "text":
        return {}
    if fmt.type == "json_object":
        return {"grammar": JSON_GRAMMAR}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise BadRequest("response_format json_schema needs json_schema.schema")
    return {"json_schema": fmt.json_schema.schema_}


def _config(req: _Sampling, max_tokens: int | None, fmt: ResponseFormat | None) -> GenerationConfig:
    """OpenAI parameters -> GenerationConfig; what is not given keeps hearth's defaults."""
    kw: dict[str, Any] = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repeat_penalty": req.repeat_penalty,
        "ignore_eos": req.ignore_eos,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "stop": req.stop,
        "logit_bias": _logit_bias(req.logit_bias) or None,
        **_format(fmt),
    }
    cfg = GenerationConfig.from_kwargs(None, **{k: v for k, v in kw.items() if v is not None})
    if max_tokens is not None:
        cfg = GenerationConfig.from_kwargs(cfg, max_tokens=max_tokens)
    if req.seed is not None:
        cfg = GenerationConfig.from_kwargs(cfg, seed=req.seed)
    return cfg


def _per_choice(cfg: GenerationConfig, n: int) -> list[GenerationConfig]:
    """With a seed, choice i uses seed + i: reproducible, yet not n copies of one answer."""
    if n == 1 or cfg.seed is None:
        return [cfg] * n
    return [GenerationConfig.from_kwargs(cfg, seed=cfg.seed + i) for i in range(n)]


def _message_text(m: ChatMessage) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    parts = []
    for p in m.content:
        if p.type != "text":
            raise BadRequest(f"message content of type {p.type!r} is not supported (text only)")
        parts.append(p.text)  # type: ignore[union-attr]
    return "".join(parts)


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _stream(request: Request, events: AsyncIterator[bytes], lease: Lease) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for data in events:
                yield data
                if await request.is_disconnected():
                    return  # closing `events` cancels the generation
        except HearthError as e:  # after the headers went out: say it in the stream
            yield _sse({"error": {"message": e.message, "type": "server_error", "param": None, "code": e.code}})
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        yield b"data: [DONE]\n\n"

    return LeasedStream(lease, body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# -- routes ----------------------------------------------------------------------------


@router.get("/models")
async def list_models(request: Request) -> JSONResponse:
    pool = _pool(request)
    seen: dict[str, int] = {}
    for e in pool.loaded():
        seen.setdefault(e.model.name, int(e.loaded_at))
    for name in pool.installed_names():
        seen.setdefault(name, 0)
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "hearth"} for name, created in seen.items()
    ]})


@router.get("/models/{model:path}")
async def get_model(model: str, request: Request) -> JSONResponse:
    entry, _ = await _pool(request).get(model)
    return JSONResponse({"id": model, "object": "model", "created": int(entry.loaded_at), "owned_by": "hearth"})


@router.post("/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m)} for m in req.messages]
    if req.logprobs:
        raise BadRequest("logprobs are not supported yet")
    if req.tools:
        raise BadRequest("tools are not supported yet")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    cfg = _config(req, max_tokens, req.response_format)
    return await with_lease(_pool(request), req.model, lambda lease: _chat(req, request, lease, messages, cfg))


async def _chat(req: ChatCompletionRequest, request: Request, lease: Lease,
                messages: list[dict[str, Any]], cfg: GenerationConfig) -> Any:
    model = lease.model
    text, cfg = model.chat_prompt(messages, cfg)
    name = req.model or model.name
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    handles = lease.submit([(text, c) for c in _per_choice(cfg, req.n)])

    if not req.stream:
        results = await until_disconnected(request, gather_results(handles))
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": name,
            "system_fingerprint": None,
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": r.text, "refusal": None},
                 "logprobs": None, "finish_reason": _FINISH[r.finish_reason]}
                for i, r in enumerate(results)
            ],
            "usage": _usage(results),
        })

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name, "system_fingerprint": None}

    def chunk(choices: list[dict[str, Any]]) -> bytes:
        return _sse({**base, "choices": choices, **({"usage": None} if include_usage else {})})

    async def events() -> AsyncIterator[bytes]:
        results: list[GenerationResult | None] = [None] * req.n
        for i in range(req.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        stream = merge_streams(handles)
        try:
            async for i, ch, result in stream:
                if ch is not None and ch.text:
                    yield chunk([{"index": i, "delta": {"content": ch.text}, "logprobs": None, "finish_reason": None}])
                elif result is not None:
                    results[i] = result
                    yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": _FINISH[result.finish_reason]}])
        finally:
            await stream.aclose()
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage([r for r in results if r is not None])})

    return _stream(request, events(), lease)


def _prompts(p: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(p, str):
        return [p]
    if not p:
        raise BadRequest("prompt must not be empty")
    if all(isinstance(x, int) for x in p):
        return [list(p)]  # type: ignore[arg-type]
    return list(p)  # type: ignore[arg-type]


@router.post("/completions")
async def completions(req: CompletionRequest, request: Request) -> Any:
    if req.logprobs:
        raise BadRequest("logprobs are not supported yet")
    if req.suffix:
        raise BadRequest("suffix (fill-in-the-middle) is not supported yet")
    prompts = _prompts(req.prompt)
    cfg = _config(req, req.max_tokens if req.max_tokens is not None else 16, req.response_format)
    return await with_lease(_pool(request), req.model, lambda lease: _complete(req, request, lease, prompts, cfg))


async def _complete(req: CompletionRequest, request: Request, lease: Lease,
                    prompts: list[str | list[int]], cfg: GenerationConfig) -> Any:
    model = lease.model
    name = req.model or model.name
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    cfgs = _per_choice(cfg, req.n)
    handles = lease.submit([(p, c) for p in prompts for c in cfgs])  # index = prompt * n + choice
    echo = [(p if isinstance(p, str) else model.detokenize(p)) if req.echo else "" for p in prompts]

    if not req.stream:
        results = await until_disconnected(request, gather_results(handles))
        return JSONResponse({
            "id": cid, "object": "text_completion", "created": created, "model": name,
            "system_fingerprint": None,
            "choices": [
                {"index": i, "text": echo[i // req.n] + r.text, "logprobs": None, "finish_reason": _FINISH[r.finish_reason]}
                for i, r in enumerate(results)
            ],
            "usage": {**_usage(results), "prompt_tokens": sum(r.usage.prompt_tokens for r in results[:: req.n])},
        })

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": cid, "object": "text_completion", "created": created, "model": name, "system_fingerprint": None}

    def chunk(i: int, text: str, finish: str | None) -> bytes:
        return _sse({**base, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}],
                     **({"usage": None} if include_usage else {})})

    async def events() -> AsyncIterator[bytes]:
        results: list[GenerationResult] = []
        for i in range(len(handles)):
            if echo[i // req.n]:
                yield chunk(i, echo[i // req.n], None)
        stream = merge_streams(handles)
        try:
            async for i, ch, result in stream:
                if ch is not None and ch.text:
                    yield chunk(i, ch.text, None)
                elif result is not None:
                    results.append(result)
                    yield chunk(i, "", _FINISH[result.finish_reason])
        finally:
            await stream.aclose()
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(results)})

    return _stream(request, events(), lease)


def _embedding_inputs(raw: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(raw, str):
        return [raw]
    if not raw:
        raise BadRequest("input must not be empty")
    if all(isinstance(x, int) for x in raw):
        return [list(raw)]  # type: ignore[arg-type]
    return list(raw)  # type: ignore[arg-type]


def _b64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: little-endian float32."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


@router.post("/embeddings")
async def embeddings(req: EmbeddingRequest, request: Request) -> JSONResponse:
    inputs = _embedding_inputs(req.input)
    lease = await _pool(request).acquire(req.model)
    try:
        model = lease.model
        if req.dimensions is not None and req.dimensions != model.engine.n_embd:
            raise BadRequest(f"dimensions: this model's embeddings have {model.engine.n_embd} dimensions, "
                             f"not {req.dimensions}")
        result = await asyncio.to_thread(model.embed, inputs)
        pool = _pool(request)
        if pool.on_embed is not None:
            pool.on_embed(model.name, result.prompt_tokens)
    finally:
        lease.release()
    encode = _b64 if req.encoding_format == "base64" else (lambda v: v)
    return JSONResponse({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(result.vectors)],
        "model": req.model or model.name,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    })
