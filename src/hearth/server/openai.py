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

from ..api import ChatSetup
from ..errors import BadRequest, HearthError
from ..tools import ParsedOutput, Tool, ToolCall, ToolChoice, parse_tool_choice, parse_tools
from ..types import GenerationParams, GenerationResult, Usage
from . import work
from .pool import Lease, LeasedStream, ModelPool, gather_results, merge_streams, until_disconnected, with_lease
from .protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, EmbeddingRequest

router = APIRouter(prefix="/v1")

MAX_GENERATIONS = 32  # prompts x n in one request: more is a 400, not a queue full of one client
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit

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


def _per_choice(params: GenerationParams, n: int) -> list[GenerationParams]:
    """With a seed, choice i uses seed + i: reproducible, yet not n copies of one answer."""
    if n == 1 or params.seed is None:
        return [params] * n
    return [params.updated(seed=params.seed + i) for i in range(n)]


def _message_text(m: ChatMessage) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    parts = []
    for p in m.content:
        if p.type != "text":
            raise BadRequest(f"message content of type {p.type!r} is not supported (text only)")
        text = getattr(p, "text", None)
        if not isinstance(text, str):  # {"type": "text"} with no text, or a number
            raise BadRequest("a message content part of type \"text\" needs a string \"text\"")
        parts.append(text)
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


def server_limit(request: Request, params: GenerationParams) -> GenerationParams:
    """llama-server's ``--n-predict``: the limit of a request that sets none itself."""
    n = getattr(request.app.state, "n_predict", None)
    if n is None or params.is_set("max_tokens"):
        return params
    return params.updated(max_tokens=None if n < 0 else n)


def timings(r: GenerationResult) -> dict[str, Any]:
    """llama-server's ``timings`` object from a result."""
    t, u = r.timings, r.usage
    prompt_n = max(0, u.prompt_tokens - u.cached_tokens)
    prompt_ms = t.prompt_seconds * 1000.0
    gen_ms = t.generation_seconds * 1000.0
    n = u.completion_tokens
    return {
        "cache_n": u.cached_tokens,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": 1000.0 * prompt_n / prompt_ms if prompt_ms > 0 else 0.0,
        "predicted_n": n,
        "predicted_ms": gen_ms,
        "predicted_per_token_ms": gen_ms / n if n else 0.0,
        "predicted_per_second": 1000.0 * n / gen_ms if gen_ms > 0 else 0.0,
    }


# -- routes ----------------------------------------------------------------------------


def _created(pool: ModelPool, key: Any) -> int:
    entry = next((e for e in pool.loaded() if e.key == key), None)
    return int(entry.loaded_at) if entry is not None else 0


@router.get("/models")
async def list_models(request: Request) -> JSONResponse:
    pool = _pool(request)
    loaded = {e.model.name: e for e in pool.loaded()}

    def entry(name: str) -> dict[str, Any]:
        e = loaded.get(name)
        out: dict[str, Any] = {"id": name, "object": "model", "created": int(e.loaded_at) if e else 0,
                               "owned_by": "hearth"}
        if e is not None:  # llama-server's "meta", for a loaded model
            info = e.model.info
            out["meta"] = {"n_vocab": info.vocab_size, "n_ctx": e.model.engine.n_ctx_per_slot,
                           "n_ctx_train": info.context_length, "n_embd": info.embedding_length,
                           "n_params": info.parameters, "size": info.file_size, "ftype": info.quantization}
        return out

    return JSONResponse({"object": "list", "data": [entry(name) for name in await pool.installed_names()]})


@router.get("/models/{model:path}")
async def get_model(model: str, request: Request) -> JSONResponse:
    """A model the server knows, without loading it (404 otherwise)."""
    pool = _pool(request)
    target = await pool.target(model)
    return JSONResponse({"id": model, "object": "model", "created": _created(pool, target.key), "owned_by": "hearth"})


def _chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    out = []
    for m in req.messages:
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": _message_text(m)}
        if m.tool_calls:
            msg["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            msg["name"] = m.name
        if m.reasoning_content:
            msg["reasoning_content"] = m.reasoning_content
        out.append(msg)
    return out


def _think(req: ChatCompletionRequest) -> bool | str | None:
    kwargs = req.chat_template_kwargs or {}
    if "enable_thinking" in kwargs:
        return bool(kwargs["enable_thinking"])
    return req.reasoning_effort


def _tool_call_json(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": call.id, "type": "function",
                           "function": {"name": call.name, "arguments": call.arguments_json}}
    return {"index": index, **out} if index is not None else out


def _message(parsed: ParsedOutput) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": parsed.content, "refusal": None}
    if parsed.reasoning:
        msg["reasoning_content"] = parsed.reasoning
    if parsed.tool_calls:
        msg["content"] = parsed.content or None
        msg["tool_calls"] = [_tool_call_json(c) for c in parsed.tool_calls]
    return msg


def _chat_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}."""
    if entries is None:
        return None

    def one(e: dict[str, Any]) -> dict[str, Any]:
        return {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"]}

    return {"content": [{**one(e), "top_logprobs": [one(t) for t in e["top_logprobs"]]} for e in entries],
            "refusal": None}


def _completion_logprobs(entries: list[dict[str, Any]] | None, offset: int) -> dict[str, Any] | None:
    """The legacy completions shape: parallel lists, and text offsets from ``offset``."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def _finish(result: GenerationResult, parsed: ParsedOutput) -> str:
    return "tool_calls" if parsed.tool_calls else _FINISH[result.finish_reason]


@router.post("/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
    messages = _chat_messages(req)
    tools = parse_tools(req.tools)
    choice = parse_tool_choice(req.tool_choice, tools)
    params = server_limit(request, req.to_params())
    return await with_lease(_pool(request), req.model,
                            lambda lease: _chat(req, request, lease, messages, params, tools, choice))


async def _chat(req: ChatCompletionRequest, request: Request, lease: Lease, messages: list[dict[str, Any]],
                params: GenerationParams, tools: list[Tool], choice: ToolChoice) -> Any:
    model = lease.model
    name = req.model or lease.name
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    loop = asyncio.get_running_loop()

    def prepare() -> tuple[ChatSetup, list[Any]]:  # template, tokens, grammar: in a worker, not on the loop
        setup = model.chat_setup(messages, params, "openai", defaults=lease.defaults, tools=tools,
                                 tool_choice=choice, parallel_tool_calls=req.parallel_tool_calls is not False,
                                 think=_think(req))
        return setup, lease.submit([(setup.prompt, p) for p in _per_choice(setup.params, req.n)], loop)

    setup, handles = await work.cpu(prepare)

    if not req.stream:
        results = await until_disconnected(request, gather_results(handles))
        choices = []
        for i, r in enumerate(results):
            parser = setup.parser()
            parser.feed(r.text)
            parsed, _ = parser.finish()
            choices.append({"index": i, "message": _message(parsed), "logprobs": _chat_logprobs(r.logprobs),
                            "finish_reason": _finish(r, parsed)})
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": name,
            "system_fingerprint": None, "choices": choices, "usage": _usage(results),
            "timings": timings(results[0]),  # llama-server's extension
        })

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name, "system_fingerprint": None}

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return _sse({**base, "choices": choices, **({"usage": None} if include_usage else {}), **extra})

    want_logprobs = setup.params.logprobs is not None
    pending: list[list[dict[str, Any]]] = [[] for _ in range(req.n)]  # logprobs not yet sent, per choice

    def delta(i: int, d: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        lp = None
        if want_logprobs and ("content" in d or finish is not None):
            lp, pending[i] = _chat_logprobs(pending[i]), []
        return chunk([{"index": i, "delta": d, "logprobs": lp, "finish_reason": finish}], **extra)

    _KEY = {"content": "content", "reasoning": "reasoning_content"}

    async def events() -> AsyncIterator[bytes]:
        results: list[GenerationResult | None] = [None] * req.n
        parsers = [setup.parser() for _ in range(req.n)]
        for i in range(req.n):  # as OpenAI and llama-server: the role, and no content yet
            yield delta(i, {"role": "assistant", "content": None})
        stream = merge_streams(handles)
        try:
            async for i, ch, result in stream:
                if ch is not None and ch.text:
                    if ch.logprobs:
                        pending[i].extend(ch.logprobs)
                    for kind, text in parsers[i].feed(ch.text):
                        yield delta(i, {_KEY[kind]: text})
                elif result is not None:
                    results[i] = result
                    parsed, rest = parsers[i].finish()
                    for kind, text in rest:
                        yield delta(i, {_KEY[kind]: text})
                    for j, call in enumerate(parsed.tool_calls):
                        yield delta(i, {"tool_calls": [_tool_call_json(call, j)]})
                    yield delta(i, {}, _finish(result, parsed), timings=timings(result))
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
    if req.suffix:
        raise BadRequest("suffix (fill-in-the-middle) is not supported yet")
    prompts = _prompts(req.prompt)
    if len(prompts) * req.n > MAX_GENERATIONS:
        raise BadRequest(f"{len(prompts)} prompts x n={req.n} is {len(prompts) * req.n} generations; "
                         f"one request may ask for at most {MAX_GENERATIONS}")
    params = server_limit(request, req.to_params())
    return await with_lease(_pool(request), req.model, lambda lease: _complete(req, request, lease, prompts, params))


async def _complete(req: CompletionRequest, request: Request, lease: Lease,
                    prompts: list[str | list[int]], params: GenerationParams) -> Any:
    model = lease.model
    name = req.model or lease.name
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    loop = asyncio.get_running_loop()

    def prepare() -> tuple[list[Any], list[str]]:  # tokens, grammar, echo: in a worker
        choices = _per_choice(model.params(params, "openai-completions", defaults=lease.defaults), req.n)
        handles = lease.submit([(p, c) for p in prompts for c in choices], loop)  # index = prompt * n + choice
        echo = [(p if isinstance(p, str) else model.detokenize(p)) if req.echo else "" for p in prompts]
        return handles, echo

    handles, echo = await work.cpu(prepare)

    if not req.stream:
        results = await until_disconnected(request, gather_results(handles))
        return JSONResponse({
            "id": cid, "object": "text_completion", "created": created, "model": name,
            "system_fingerprint": None,
            "choices": [
                {"index": i, "text": echo[i // req.n] + r.text,
                 "logprobs": _completion_logprobs(r.logprobs, len(echo[i // req.n])),
                 "finish_reason": _FINISH[r.finish_reason]}
                for i, r in enumerate(results)
            ],
            "usage": {**_usage(results), "prompt_tokens": sum(r.usage.prompt_tokens for r in results[:: req.n])},
            "timings": timings(results[0]),  # llama-server's extension
        })

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": cid, "object": "text_completion", "created": created, "model": name, "system_fingerprint": None}

    offsets = [len(echo[i // req.n]) for i in range(len(handles))]  # text offsets of the next logprobs

    def chunk(i: int, text: str, finish: str | None, lps: list[dict[str, Any]] | None = None) -> bytes:
        lp = _completion_logprobs(lps, offsets[i]) if lps else None
        if lps:
            offsets[i] += sum(len(e["token"]) for e in lps)
        return _sse({**base, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}],
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
                    yield chunk(i, ch.text, None, ch.logprobs)
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
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise BadRequest(f"input has {len(inputs)} items; at most {MAX_EMBEDDING_INPUTS}")
    lease = await _pool(request).acquire(req.model)
    try:
        model = lease.model
        if req.dimensions is not None and req.dimensions != model.engine.n_embd:
            raise BadRequest(f"dimensions: this model's embeddings have {model.engine.n_embd} dimensions, "
                             f"not {req.dimensions}")
        result = await work.cpu(model.embed, inputs)
        pool = _pool(request)
        if pool.on_embed is not None:
            pool.on_embed(model.name, result.prompt_tokens)
    finally:
        lease.release()
    encode = _b64 if req.encoding_format == "base64" else (lambda v: v)
    return JSONResponse({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(result.vectors)],
        "model": req.model or lease.name,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    })
