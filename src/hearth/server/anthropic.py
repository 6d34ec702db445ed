"""Anthropic's Messages API: POST /v1/messages (streaming with Anthropic's event
sequence, tool_use / tool_result blocks, thinking blocks) and /v1/messages/count_tokens.

Requests become the same chat request as every other route (``Model.chat_setup``):
the model's template, the tool-call grammar, the output parser. Errors use Anthropic's
shape (``{"type": "error", "error": {"type": ..., "message": ...}}``, in ``app.py``).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import string
from typing import Any, AsyncIterator, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..api import ChatSetup
from ..errors import BadRequest, HearthError
from ..tools import ParsedOutput, Tool, ToolChoice, make_tool, parse_tool_choice
from ..types import GenerationParams, GenerationResult
from . import work
from .pool import Lease, LeasedStream, ModelPool, merge_streams, until_disconnected, with_lease

router = APIRouter(prefix="/v1")

_ALNUM = string.ascii_letters + string.digits


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


class MessagesRequest(_Req):
    model: str | None = None
    max_tokens: int = Field(ge=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: Union[str, list[dict[str, Any]], None] = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None  # {"effort": ..., "format": {"type": "json_schema", "schema": ...}}
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None


class CountTokensRequest(_Req):
    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: Union[str, list[dict[str, Any]], None] = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


def _pool(request: Request) -> ModelPool:
    return request.app.state.pool


# -- request -> chat ----------------------------------------------------------------------------


def _text_of(content: Any, where: str) -> str:
    """A string, or text blocks (a tool result may hold several)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or a list of content blocks")
    parts = []
    for j, b in enumerate(content):
        kind = b.get("type") if isinstance(b, dict) else None
        if kind != "text" or not isinstance(b.get("text"), str):
            raise BadRequest(f"{where}[{j}]: {kind!r} blocks are not supported here (text only)")
        parts.append(b["text"])
    return "".join(parts)


def _system(system: Any) -> str:
    return _text_of(system, "system")


def to_messages(req: MessagesRequest | CountTokensRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    system = _system(req.system)
    if system:
        out.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise BadRequest(f"{where}.role must be \"user\" or \"assistant\", got {role!r}")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise BadRequest(f"{where}.content must be a string or a list of content blocks")
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        thinking: list[str] = []
        for j, b in enumerate(content):
            bw = f"{where}.content[{j}]"
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "text":
                if not isinstance(b.get("text"), str):
                    raise BadRequest(f"{bw}.text must be a string")
                texts.append(b["text"])
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str):
                    raise BadRequest(f"{bw}: a tool_use block needs an id and a name")
                inp = b.get("input", {})
                if not isinstance(inp, dict):
                    raise BadRequest(f"{bw}.input must be an object")
                calls.append({"id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": inp}})
            elif kind == "tool_result" and role == "user":
                if not isinstance(b.get("tool_use_id"), str):
                    raise BadRequest(f"{bw}.tool_use_id must be a string")
                text = _text_of(b.get("content"), f"{bw}.content")
                if b.get("is_error"):
                    text = f"Error: {text}"
                out.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": text})
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                if isinstance(b.get("thinking"), str):
                    thinking.append(b["thinking"])
            elif kind in ("image", "document", "search_result", "container_upload"):
                raise BadRequest(f"{bw}: {kind} blocks are not supported (text-only models)")
            else:
                raise BadRequest(f"{bw}: a {kind!r} block is not supported in a {role} message")
        had_results = any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content)
        if role == "assistant" or texts or not had_results:
            msg: dict[str, Any] = {"role": role, "content": "".join(texts)}
            if calls:
                msg["tool_calls"] = calls
            if thinking:
                msg["reasoning_content"] = "".join(thinking)
            out.append(msg)
    return out


def to_tools(raw: list[dict[str, Any]] | None) -> list[Tool]:
    tools = []
    for i, t in enumerate(raw or []):
        where = f"tools[{i}]"
        if not isinstance(t, dict):
            raise BadRequest(f"{where} must be an object")
        kind = t.get("type")
        if kind not in (None, "custom"):
            raise BadRequest(f"{where}: server tools ({kind!r}) are not supported; give custom tools "
                             "with name, description and input_schema")
        tools.append(make_tool(t.get("name"), t.get("description"), t.get("input_schema"), where))
    names = [t.name for t in tools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise BadRequest(f"tools: two tools are named {dup!r}")
    return tools


def to_choice(raw: dict[str, Any] | None, tools: list[Tool]) -> tuple[ToolChoice, bool]:
    """(tool choice, parallel calls allowed)."""
    if raw is None:
        return ToolChoice("auto") if tools else ToolChoice("none"), True
    kind = raw.get("type")
    parallel = not raw.get("disable_parallel_tool_use", False)
    mapped = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
    if kind == "tool":
        return parse_tool_choice({"type": "function", "name": raw.get("name")}, tools), parallel
    if mapped is None:
        raise BadRequest(f"tool_choice.type must be auto, any, tool or none, got {kind!r}")
    return parse_tool_choice(mapped, tools), parallel


def _think(thinking: dict[str, Any] | None, output_config: dict[str, Any] | None = None) -> bool | str | None:
    effort = (output_config or {}).get("effort")
    if effort is not None and not isinstance(effort, str):
        raise BadRequest("output_config.effort must be a string")
    if thinking is None:
        return effort
    kind = thinking.get("type")
    if kind not in ("enabled", "disabled", "adaptive", "between_tools"):
        raise BadRequest(f"thinking.type must be enabled, adaptive or disabled, got {kind!r}")
    if kind == "disabled":
        return False
    return effort or True


def _params(req: MessagesRequest) -> GenerationParams:
    kw: dict[str, Any] = {"max_tokens": req.max_tokens}
    for name in ("temperature", "top_p", "top_k"):
        if getattr(req, name) is not None:
            kw[name] = getattr(req, name)
    if req.stop_sequences:
        kw["stop"] = req.stop_sequences
    fmt = (req.output_config or {}).get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise BadRequest("output_config.format must be {\"type\": \"json_schema\", \"schema\": {...}}")
        kw["json_schema"] = fmt["schema"]
    return GenerationParams.from_kwargs(**kw)


# -- chat -> response ----------------------------------------------------------------------------


def _tool_use_id(call_id: str) -> str:
    return call_id if call_id.startswith("toolu_") else "toolu_" + call_id.removeprefix("call_")


def _blocks(parsed: ParsedOutput) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if parsed.reasoning:
        blocks.append({"type": "thinking", "thinking": parsed.reasoning, "signature": ""})
    if parsed.content or not blocks and not parsed.tool_calls:  # an empty answer still has a text block
        blocks.append({"type": "text", "text": parsed.content})
    for c in parsed.tool_calls:
        blocks.append({"type": "tool_use", "id": _tool_use_id(c.id), "name": c.name, "input": c.arguments})
    return blocks


def _stop(result: GenerationResult, parsed: ParsedOutput, stops: list[str]) -> tuple[str, str | None]:
    if parsed.tool_calls:
        return "tool_use", None
    if result.finish_reason == "length":
        return "max_tokens", None
    if result.stop_sequence is not None and result.stop_sequence in stops:
        return "stop_sequence", result.stop_sequence
    return "end_turn", None


def _usage(result: GenerationResult) -> dict[str, Any]:
    u = result.usage
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "output_tokens": u.completion_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": u.cached_tokens}


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


@router.post("/messages")
async def messages(req: MessagesRequest, request: Request) -> Any:
    msgs = to_messages(req)
    tools = to_tools(req.tools)
    choice, parallel = to_choice(req.tool_choice, tools)
    params = _params(req)
    think = _think(req.thinking, req.output_config)
    return await with_lease(_pool(request), req.model,
                            lambda lease: _respond(req, request, lease, msgs, tools, choice, parallel, params, think))


async def _respond(req: MessagesRequest, request: Request, lease: Lease, msgs: list[dict[str, Any]],
                   tools: list[Tool], choice: ToolChoice, parallel: bool, params: GenerationParams,
                   think: bool | str | None) -> Any:
    model = lease.model
    name = req.model or lease.name
    mid = "msg_" + "".join(secrets.choice(_ALNUM) for _ in range(24))
    loop = asyncio.get_running_loop()
    stops = list(req.stop_sequences or [])

    def prepare() -> tuple[ChatSetup, Any, int]:
        setup = model.chat_setup(msgs, params, "anthropic", defaults=lease.defaults, tools=tools,
                                 tool_choice=choice, parallel_tool_calls=parallel, think=think)
        (handle,) = lease.submit([(setup.prompt, setup.params)], loop)
        n_prompt = model.count_tokens(setup.prompt) if req.stream else 0
        return setup, handle, n_prompt

    setup, handle, n_prompt = await work.cpu(prepare)

    if not req.stream:
        result = await until_disconnected(request, handle.aresult())
        parser = setup.parser()
        parser.feed(result.text)
        parsed, _ = parser.finish()
        stop_reason, stop_seq = _stop(result, parsed, stops)
        return JSONResponse({
            "id": mid, "type": "message", "role": "assistant", "model": name, "content": _blocks(parsed),
            "stop_reason": stop_reason, "stop_sequence": stop_seq, "usage": _usage(result),
        })

    async def events() -> AsyncIterator[bytes]:
        yield _event("message_start", {"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": name, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": n_prompt, "output_tokens": 0}}})
        yield _event("ping", {"type": "ping"})
        parser = setup.parser()
        index = -1
        open_kind: str | None = None

        def switch(kind: str | None) -> list[bytes]:
            nonlocal index, open_kind
            out = []
            if open_kind == kind:
                return out
            if open_kind is not None:
                if open_kind == "reasoning":
                    out.append(_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                              "delta": {"type": "signature_delta", "signature": ""}}))
                out.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
            open_kind = kind
            if kind is not None:
                index += 1
                block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "reasoning" else {
                    "type": "text", "text": ""}
                out.append(_event("content_block_start", {"type": "content_block_start", "index": index,
                                                          "content_block": block}))
            return out

        def delta(kind: str, text: str) -> bytes:
            d = {"type": "thinking_delta", "thinking": text} if kind == "reasoning" else {
                "type": "text_delta", "text": text}
            return _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})

        stream = merge_streams([handle])
        try:
            async for _, ch, result in stream:
                if ch is not None and ch.text:
                    for kind, text in parser.feed(ch.text):
                        for b in switch(kind):
                            yield b
                        yield delta(kind, text)
                elif result is not None:
                    parsed, rest = parser.finish()
                    for kind, text in rest:
                        for b in switch(kind):
                            yield b
                        yield delta(kind, text)
                    if index < 0 and not parsed.tool_calls:  # an empty answer still has a text block
                        for b in switch("content"):
                            yield b
                    for b in switch(None):
                        yield b
                    for c in parsed.tool_calls:
                        index += 1
                        yield _event("content_block_start", {"type": "content_block_start", "index": index,
                                                             "content_block": {"type": "tool_use",
                                                                               "id": _tool_use_id(c.id),
                                                                               "name": c.name, "input": {}}})
                        yield _event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                             "delta": {"type": "input_json_delta",
                                                                       "partial_json": c.arguments_json}})
                        yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
                    stop_reason, stop_seq = _stop(result, parsed, stops)
                    yield _event("message_delta", {"type": "message_delta",
                                                   "delta": {"stop_reason": stop_reason, "stop_sequence": stop_seq},
                                                   "usage": _usage(result)})
                    yield _event("message_stop", {"type": "message_stop"})
                if await request.is_disconnected():
                    return
        except HearthError as e:
            yield _event("error", {"type": "error", "error": {"type": "api_error", "message": e.message}})
        finally:
            await stream.aclose()

    return LeasedStream(lease, events(), media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/messages/count_tokens")
async def count_tokens(req: CountTokensRequest, request: Request) -> Any:
    msgs = to_messages(req)
    tools = to_tools(req.tools)
    choice, parallel = to_choice(req.tool_choice, tools)
    think = _think(req.thinking)

    async def handler(lease: Lease) -> Any:
        def count() -> int:
            setup = lease.model.chat_setup(msgs, None, "anthropic", defaults=lease.defaults, tools=tools,
                                           tool_choice=choice, parallel_tool_calls=parallel, think=think)
            return lease.model.count_tokens(setup.prompt)

        return JSONResponse({"input_tokens": await work.cpu(count)})

    return await with_lease(_pool(request), req.model, handler)
