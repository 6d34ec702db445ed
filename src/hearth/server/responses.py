"""OpenAI's Responses API, stateless: POST /v1/responses.

Input as a string or as items (messages, ``function_call`` and ``function_call_output``),
``instructions``, function tools, ``text.format`` (json_schema / json_object),
``reasoning.effort``, streaming with the Responses event types, usage. hearth keeps no
responses, so ``previous_response_id``, ``conversation`` and item references are a 400
that says so; so are non-function tools (web search, file search, ...) and images.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import string
import time
from typing import Any, AsyncIterator, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..api import ChatSetup
from ..errors import BadRequest, HearthError
from ..tools import ParsedOutput, Tool, ToolChoice, parse_tool_choice, parse_tools
from ..types import GenerationParams, GenerationResult
from . import work
from .openai import server_limit
from .pool import Lease, LeasedStream, ModelPool, merge_streams, until_disconnected, with_lease

router = APIRouter(prefix="/v1")

_ALNUM = string.ascii_letters + string.digits


def _id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(24))


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: Union[str, list[dict[str, Any]]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    stream: bool = False
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    previous_response_id: str | None = None
    conversation: Union[str, dict[str, Any], None] = None
    store: bool | None = None
    background: bool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    top_logprobs: int | None = None


def _pool(request: Request) -> ModelPool:
    return request.app.state.pool


def _text_parts(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or a list of content parts")
    parts = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(p.get("text"), str):
            parts.append(p["text"])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise BadRequest(f"{where}[{j}]: {kind} is not supported (text-only models)")
        else:
            raise BadRequest(f"{where}[{j}]: a {kind!r} part is not supported")
    return "".join(parts)


def to_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if req.instructions:
        out.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        out.append({"role": "user", "content": req.input})
        return out
    if not req.input:
        raise BadRequest("input must not be empty")
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise BadRequest(f"{where}.role must be user, assistant, system or developer, got {role!r}")
            out.append({"role": "system" if role == "developer" else role,
                        "content": _text_parts(item.get("content", ""), f"{where}.content")})
        elif kind == "function_call":
            call_id, name, args = item.get("call_id"), item.get("name"), item.get("arguments", "{}")
            if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(args, str):
                raise BadRequest(f"{where}: a function_call needs call_id, name and arguments (a JSON string)")
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
            last = out[-1] if out else None
            if last is not None and last.get("role") == "assistant" and last.get("_calls"):
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call], "_calls": True})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise BadRequest(f"{where}.call_id must be a string")
            text = output if isinstance(output, str) else _text_parts(output, f"{where}.output")
            out.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif kind == "reasoning":
            continue  # earlier thinking: templates drop it from the history
        elif kind == "item_reference":
            raise BadRequest(f"{where}: item references need stored responses, which hearth does not keep")
        else:
            raise BadRequest(f"{where}: input items of type {kind!r} are not supported")
    for m in out:
        m.pop("_calls", None)
    return out


def to_tools(raw: list[dict[str, Any]] | None) -> list[Tool]:
    for i, t in enumerate(raw or []):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind != "function":
            raise BadRequest(f"tools[{i}]: {kind!r} tools are not supported (only \"function\")")
    return parse_tools(raw)


def _format(text: dict[str, Any] | None) -> dict[str, Any]:
    fmt = (text or {}).get("format")
    if fmt is None or fmt.get("type") == "text":
        return {}
    if fmt.get("type") == "json_object":
        return {"json_schema": {"type": "object"}}
    if fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
        return {"json_schema": fmt["schema"]}
    raise BadRequest("text.format must be text, json_object or json_schema with a schema")


def _params(req: ResponsesRequest) -> GenerationParams:
    kw: dict[str, Any] = {}
    if req.max_output_tokens is not None:
        kw["max_tokens"] = req.max_output_tokens
    for name in ("temperature", "top_p"):
        if getattr(req, name) is not None:
            kw[name] = getattr(req, name)
    kw.update(_format(req.text))
    return GenerationParams.from_kwargs(**kw)


# -- output ----------------------------------------------------------------------------------


def _items(parsed: ParsedOutput, ids: dict[str, str], status: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if parsed.reasoning:
        items.append({"type": "reasoning", "id": ids["reasoning"], "summary": [], "status": status,
                      "content": [{"type": "reasoning_text", "text": parsed.reasoning}]})
    if parsed.content or not parsed.tool_calls:
        items.append({"type": "message", "id": ids["message"], "status": status, "role": "assistant",
                      "content": [{"type": "output_text", "text": parsed.content, "annotations": [], "logprobs": []}]})
    for c in parsed.tool_calls:
        items.append({"type": "function_call", "id": "fc_" + c.id.removeprefix("call_"), "call_id": c.id,
                      "name": c.name, "arguments": c.arguments_json, "status": "completed"})
    return items


def _usage(result: GenerationResult, reasoning_tokens: int) -> dict[str, Any]:
    u = result.usage
    return {"input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": u.prompt_tokens + u.completion_tokens}


@router.post("/responses")
async def responses(req: ResponsesRequest, request: Request) -> Any:
    if req.previous_response_id is not None:
        raise BadRequest("previous_response_id: hearth does not store responses; send the whole conversation "
                         "as input items")
    if req.conversation is not None:
        raise BadRequest("conversation: hearth does not store conversations; send the whole conversation as input")
    if req.background:
        raise BadRequest("background responses are not supported")
    msgs = to_messages(req)
    tools = to_tools(req.tools)
    choice = parse_tool_choice(req.tool_choice, tools)
    params = server_limit(request, _params(req))
    effort = (req.reasoning or {}).get("effort")
    return await with_lease(_pool(request), req.model,
                            lambda lease: _respond(req, request, lease, msgs, tools, choice, params, effort))


async def _respond(req: ResponsesRequest, request: Request, lease: Lease, msgs: list[dict[str, Any]],
                   tools: list[Tool], choice: ToolChoice, params: GenerationParams, effort: str | None) -> Any:
    model = lease.model
    name = req.model or lease.name
    rid, created = _id("resp_"), time.time()
    ids = {"message": _id("msg_"), "reasoning": _id("rs_")}
    loop = asyncio.get_running_loop()
    parallel = req.parallel_tool_calls is not False

    def prepare() -> tuple[ChatSetup, Any]:
        setup = model.chat_setup(msgs, params, "openai", defaults=lease.defaults, tools=tools, tool_choice=choice,
                                 parallel_tool_calls=parallel, think=effort)
        (handle,) = lease.submit([(setup.prompt, setup.params)], loop)
        return setup, handle

    setup, handle = await work.cpu(prepare)
    tool_choice: Any = req.tool_choice if req.tool_choice is not None else "auto"

    def envelope(status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None,
                 incomplete: bool = False) -> dict[str, Any]:
        return {
            "id": rid, "object": "response", "created_at": created, "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": name,
            "output": output, "parallel_tool_calls": parallel, "previous_response_id": None,
            "reasoning": {"effort": effort, "summary": None}, "store": False,
            "temperature": req.temperature, "top_p": req.top_p,
            "text": req.text or {"format": {"type": "text"}}, "tool_choice": tool_choice,
            "tools": req.tools or [], "truncation": "disabled", "usage": usage, "user": req.user,
            "metadata": req.metadata or {},
        }

    async def finish(result: GenerationResult, parsed: ParsedOutput) -> tuple[dict[str, Any], bool]:
        reasoning_tokens = await work.cpu(model.count_tokens, parsed.reasoning) if parsed.reasoning else 0
        incomplete = result.finish_reason == "length" and not parsed.tool_calls
        return _usage(result, reasoning_tokens), incomplete

    if not req.stream:
        result = await until_disconnected(request, handle.aresult())
        parser = setup.parser()
        parser.feed(result.text)
        parsed, _ = parser.finish()
        usage, incomplete = await finish(result, parsed)
        status = "incomplete" if incomplete else "completed"
        return JSONResponse(envelope(status, _items(parsed, ids, status), usage, incomplete))

    async def events() -> AsyncIterator[bytes]:
        seq = 0

        def ev(kind: str, **data: Any) -> bytes:
            nonlocal seq
            seq += 1
            return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': seq - 1, **data}, ensure_ascii=False)}\n\n".encode()

        yield ev("response.created", response=envelope("in_progress", [], None))
        yield ev("response.in_progress", response=envelope("in_progress", [], None))
        parser = setup.parser()
        out_index = -1
        open_kind: str | None = None
        texts = {"reasoning": "", "content": ""}
        done_items: list[dict[str, Any]] = []

        def item_for(kind: str, text: str, status: str) -> dict[str, Any]:
            if kind == "reasoning":
                return {"type": "reasoning", "id": ids["reasoning"], "summary": [], "status": status,
                        "content": [{"type": "reasoning_text", "text": text}] if status == "completed" else []}
            return {"type": "message", "id": ids["message"], "status": status, "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
                    if status == "completed" else []}

        def part(kind: str, text: str) -> dict[str, Any]:
            if kind == "reasoning":
                return {"type": "reasoning_text", "text": text}
            return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

        def close() -> list[bytes]:
            nonlocal open_kind
            if open_kind is None:
                return []
            kind, text = open_kind, texts[open_kind]
            item_id = ids["reasoning" if kind == "reasoning" else "message"]
            done_kind = "response.reasoning_text.done" if kind == "reasoning" else "response.output_text.done"
            extra = {} if kind == "reasoning" else {"logprobs": []}
            item = item_for(kind, text, "completed")
            done_items.append(item)
            open_kind = None
            return [ev(done_kind, item_id=item_id, output_index=out_index, content_index=0, text=text, **extra),
                    ev("response.content_part.done", item_id=item_id, output_index=out_index, content_index=0,
                       part=part(kind, text)),
                    ev("response.output_item.done", output_index=out_index, item=item)]

        def open_(kind: str) -> list[bytes]:
            nonlocal open_kind, out_index
            if open_kind == kind:
                return []
            out = close()
            open_kind = kind
            out_index += 1
            item_id = ids["reasoning" if kind == "reasoning" else "message"]
            out.append(ev("response.output_item.added", output_index=out_index, item=item_for(kind, "", "in_progress")))
            out.append(ev("response.content_part.added", item_id=item_id, output_index=out_index, content_index=0,
                          part=part(kind, "")))
            return out

        def delta(kind: str, text: str) -> bytes:
            texts[kind] += text
            if kind == "reasoning":
                return ev("response.reasoning_text.delta", item_id=ids["reasoning"], output_index=out_index,
                          content_index=0, delta=text)
            return ev("response.output_text.delta", item_id=ids["message"], output_index=out_index,
                      content_index=0, delta=text, logprobs=[])

        stream = merge_streams([handle])
        try:
            async for _, ch, result in stream:
                if ch is not None and ch.text:
                    for kind, text in parser.feed(ch.text):
                        for b in open_(kind):
                            yield b
                        yield delta(kind, text)
                elif result is not None:
                    parsed, rest = parser.finish()
                    for kind, text in rest:
                        for b in open_(kind):
                            yield b
                        yield delta(kind, text)
                    if out_index < 0 and not parsed.tool_calls:  # an empty answer is an empty message
                        for b in open_("content"):
                            yield b
                    for b in close():
                        yield b
                    for c in parsed.tool_calls:
                        out_index += 1
                        item = {"type": "function_call", "id": "fc_" + c.id.removeprefix("call_"), "call_id": c.id,
                                "name": c.name, "arguments": "", "status": "in_progress"}
                        yield ev("response.output_item.added", output_index=out_index, item=item)
                        yield ev("response.function_call_arguments.delta", item_id=item["id"],
                                 output_index=out_index, delta=c.arguments_json)
                        yield ev("response.function_call_arguments.done", item_id=item["id"], output_index=out_index,
                                 arguments=c.arguments_json, name=c.name)
                        item = {**item, "arguments": c.arguments_json, "status": "completed"}
                        done_items.append(item)
                        yield ev("response.output_item.done", output_index=out_index, item=item)
                    usage, incomplete = await finish(result, parsed)
                    kind = "response.incomplete" if incomplete else "response.completed"
                    yield ev(kind, response=envelope("incomplete" if incomplete else "completed", done_items, usage,
                                                     incomplete))
                if await request.is_disconnected():
                    return
        except HearthError as e:
            yield ev("error", code=e.code, message=e.message, param=None)
        finally:
            await stream.aclose()

    return LeasedStream(lease, events(), media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
