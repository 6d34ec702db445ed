"""Ollama-compatible API: /api/generate, /api/chat, /api/embed, /api/embeddings, /api/tags,
/api/show, /api/ps, /api/version, /api/pull, /api/delete."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..engines.base import Handle
from ..errors import BadRequest, Cancelled, HearthError, ModelNotFound
from ..gguf import ModelInfo, inspect_model
from ..chat import template_for
from ..tools import OutputParser, ParsedOutput, Tool, detect_format, parse_tool_choice, parse_tools
from ..types import GenerationParams, GenerationResult
from . import work
from .pool import Lease, LeasedStream, ModelPool, merge_streams, until_disconnected, with_lease
from .protocol import (
    OllamaChatRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaShowRequest,
    OllamaPullRequest,
    OllamaDeleteRequest,
    _OllamaRequest,
    ollama_params,
)

router = APIRouter(prefix="/api")
log = logging.getLogger(__name__)

def _pool(request: Request) -> ModelPool:
    return request.app.state.pool


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _final(name: str, r: GenerationResult, load_seconds: float) -> dict[str, Any]:
    t = r.timings
    return {
        "done": True,
        "done_reason": r.finish_reason,
        "total_duration": _ns(t.total_seconds + load_seconds),
        "load_duration": _ns(load_seconds),
        "prompt_eval_count": r.usage.prompt_tokens,
        "prompt_eval_duration": _ns(t.prompt_seconds),
        "eval_count": r.usage.completion_tokens,
        "eval_duration": _ns(t.generation_seconds),
    }


def _ndjson(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


async def _leased(request: Request, req: _OllamaRequest, handler: Any) -> Any:
    """Lease the model (with the request's keep_alive) for ``handler(lease)``'s whole response."""
    return await with_lease(_pool(request), req.model, handler, req.keep_alive)


async def start(
    lease: Lease, params: GenerationParams, *, frontend: str = "ollama",
    prompt: str | None = None, system: str | None = None, raw: bool = False,
    messages: list[dict[str, Any]] | None = None, tools: list[Tool] | None = None,
    tool_choice: Any = None, think: bool | str | None = None,
) -> tuple[Handle, OutputParser | None]:
    """Queue one generation: ``messages``, or a ``prompt`` (with ``system``) through the
    chat template unless ``raw``. Rendering, tokenizing and grammar compilation run in
    a worker. Returns the handle and, for chat, the parser that splits the output into
    thinking, content and tool calls. Shared by /api/generate, /api/chat and the
    daemon's /daemon/generate."""
    model = lease.model
    loop = asyncio.get_running_loop()

    def prepare() -> tuple[Handle, OutputParser | None]:
        defaults = lease.defaults
        parser = None
        if messages is None and raw:
            text, resolved = prompt or "", model.params(params, frontend, defaults=defaults)
        else:
            msgs = messages
            if msgs is None:
                msgs = ([{"role": "system", "content": system}] if system else [])
                msgs.append({"role": "user", "content": prompt or ""})
            setup = model.chat_setup(msgs, params, frontend, defaults=defaults, tools=tools,
                                     tool_choice=tool_choice, think=think)
            text, resolved, parser = setup.prompt, setup.params, setup.parser()
        (handle,) = lease.submit([(text, resolved)], loop)
        return handle, parser

    return await work.cpu(prepare)


async def respond(
    request: Request, lease: Lease, handle: Handle, stream: bool,
    chunk_line: Any, final_line: Any, error_line: Any, parser: OutputParser | None = None,
) -> Any:
    """One generation as newline-delimited JSON (or one object when not streaming):
    ``chunk_line(text, kind)`` per piece ("content" or "reasoning"), ``final_line(result,
    whole, parsed)`` at the end (``parsed``: the parser's ParsedOutput, or None without a
    parser; when streaming, a chunk with the tool calls comes first, from
    ``final_line(..., calls_only=True)``), ``error_line(e)`` for an error after the
    headers went out."""
    if not stream:
        result = await until_disconnected(request, handle.aresult())
        parsed = None
        if parser is not None:
            parser.feed(result.text)
            parsed, _ = parser.finish()
        return JSONResponse(final_line(result, whole=True, parsed=parsed))

    pending: list[dict[str, Any]] = []  # logprobs of tokens whose text is not out yet

    def line(obj: dict[str, Any]) -> bytes:
        if pending:
            obj["logprobs"] = ollama_logprobs(pending)
            pending.clear()
        return _ndjson(obj)

    async def body() -> AsyncIterator[bytes]:
        events = merge_streams([handle])
        try:
            async for _, ch, result in events:
                if ch is not None and ch.text:
                    if ch.logprobs:
                        pending.extend(ch.logprobs)
                    pieces = parser.feed(ch.text) if parser is not None else [("content", ch.text)]
                    for kind, text in pieces:
                        yield line(chunk_line(text, kind))
                elif result is not None:
                    parsed = None
                    if parser is not None:
                        parsed, rest = parser.finish()
                        for kind, text in rest:
                            yield line(chunk_line(text, kind))
                        if parsed.tool_calls:
                            yield line(final_line(result, whole=False, parsed=parsed, calls_only=True))
                    yield line(final_line(result, whole=False, parsed=parsed))
                if await request.is_disconnected():
                    return
        except HearthError as e:
            yield _ndjson(error_line(e))
        finally:
            await events.aclose()

    return LeasedStream(lease, body(), media_type="application/x-ndjson")


def ollama_logprobs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def one(e: dict[str, Any]) -> dict[str, Any]:
        return {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"]}

    return [{**one(e), "top_logprobs": [one(t) for t in e["top_logprobs"]]} for e in entries]


def _tool_calls(parsed: ParsedOutput) -> list[dict[str, Any]]:
    return [{"id": c.id, "function": {"index": i, "name": c.name, "arguments": c.arguments}}
            for i, c in enumerate(parsed.tool_calls)]


async def _run(request: Request, req: _OllamaRequest, lease: Lease, started: tuple[Handle, OutputParser | None],
               piece: Any) -> Any:
    """Ollama's lines: ``piece(text, kind, parsed)`` is the per-chunk body (response or message)."""
    name = req.model or lease.name
    load_s = lease.load_seconds
    handle, parser = started

    def final(result: GenerationResult, whole: bool, parsed: ParsedOutput | None = None,
              calls_only: bool = False) -> dict[str, Any]:
        if calls_only:  # the stream's chunk that carries the calls, before the final one
            return {"model": name, "created_at": _now(), **piece("", "content", parsed), "done": False}
        if whole:
            body = piece(parsed.content if parsed is not None else result.text, "content",
                         parsed if parsed is not None else None)
        else:
            body = piece("", "content", None)
        if whole and result.logprobs is not None:
            body["logprobs"] = ollama_logprobs(result.logprobs)
        return {"model": name, "created_at": _now(), **body, **_final(name, result, load_s)}

    return await respond(request, lease, handle, req.stream,
                         lambda text, kind: {"model": name, "created_at": _now(), **piece(text, kind, None),
                                             "done": False},
                         final, lambda e: {"error": e.message}, parser)


def _generate_piece(text: str, kind: str, parsed: ParsedOutput | None) -> dict[str, Any]:
    if parsed is not None and parsed.reasoning:
        return {"response": text, "thinking": parsed.reasoning}
    return {"thinking": text, "response": ""} if kind == "reasoning" else {"response": text}


def _chat_piece(text: str, kind: str, parsed: ParsedOutput | None) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": text}
    if kind == "reasoning":
        msg = {"role": "assistant", "content": "", "thinking": text}
    if parsed is not None:
        if parsed.reasoning:
            msg["thinking"] = parsed.reasoning
        if parsed.tool_calls:
            msg["tool_calls"] = _tool_calls(parsed)
    return {"message": msg}


def _ollama_tools(req: OllamaChatRequest) -> tuple[list[Tool], Any, GenerationParams]:
    """The tools, the tool choice (``options.tool_choice``: a hearth extension, since
    Ollama's API has none) and the sampling options."""
    options = dict(req.options or {})
    raw_choice = options.pop("tool_choice", None)
    tools = parse_tools(req.tools)
    choice = parse_tool_choice(raw_choice, tools, "options.tool_choice")
    return tools, choice, ollama_params(options, req.format, req.n_logprobs())


def _ollama_messages(req: OllamaChatRequest) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(req.messages):
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            msg["tool_calls"] = m.tool_calls
        if m.role == "tool" and m.tool_name:
            msg["name"] = m.tool_name
        out.append(msg)
    return out


@router.post("/generate")
async def generate(req: OllamaGenerateRequest, request: Request) -> Any:
    if req.images:
        raise BadRequest("images are not supported yet")
    params = req.to_params()

    async def handler(lease: Lease) -> Any:
        if not req.prompt and not req.system:  # Ollama: an empty prompt just loads (or unloads) the model
            return JSONResponse({"model": req.model or lease.name, "created_at": _now(), "response": "",
                                 "done": True, "done_reason": "unload" if lease.entry.keep_alive == 0 else "load"})
        started = await start(lease, params, prompt=req.prompt, system=req.system, raw=req.raw, think=req.think)
        return await _run(request, req, lease, started, _generate_piece)

    return await _leased(request, req, handler)


@router.post("/chat")
async def chat(req: OllamaChatRequest, request: Request) -> Any:
    if any(m.images for m in req.messages):
        raise BadRequest("images are not supported yet")
    tools, choice, params = _ollama_tools(req)

    async def handler(lease: Lease) -> Any:
        if not req.messages:  # Ollama: no messages just loads (or unloads) the model
            return JSONResponse({"model": req.model or lease.name, "created_at": _now(),
                                 "message": {"role": "assistant", "content": ""}, "done": True,
                                 "done_reason": "unload" if lease.entry.keep_alive == 0 else "load"})
        started = await start(lease, params, messages=_ollama_messages(req), tools=tools, tool_choice=choice,
                              think=req.think)
        return await _run(request, req, lease, started, _chat_piece)

    return await _leased(request, req, handler)


async def _embed(request: Request, lease: Lease, inputs: list[str], truncate: bool) -> Any:
    model = lease.model
    result = await work.cpu(model.embed, inputs, truncate=truncate)
    pool = _pool(request)
    if pool.on_embed is not None:
        pool.on_embed(model.name, result.prompt_tokens)
    return result


@router.post("/embed")
async def embed(req: OllamaEmbedRequest, request: Request) -> Any:
    inputs = [req.input] if isinstance(req.input, str) else list(req.input)
    if not inputs:
        raise BadRequest("input must not be empty")
    if len(inputs) > 2048:
        raise BadRequest(f"input has {len(inputs)} items; at most 2048")

    async def handler(lease: Lease) -> Any:
        t0 = time.perf_counter()
        if req.dimensions is not None and req.dimensions != lease.model.engine.n_embd:
            raise BadRequest(f"dimensions: this model's embeddings have {lease.model.engine.n_embd} "
                             f"dimensions, not {req.dimensions}")
        result = await _embed(request, lease, inputs, req.truncate)
        return JSONResponse({
            "model": req.model or lease.name, "embeddings": result.vectors,
            "total_duration": _ns(time.perf_counter() - t0 + lease.load_seconds),
            "load_duration": _ns(lease.load_seconds), "prompt_eval_count": result.prompt_tokens,
        })

    return await _leased(request, req, handler)


@router.post("/embeddings")
async def embeddings(req: OllamaEmbeddingsRequest, request: Request) -> Any:
    """The older endpoint: one prompt, one vector (an empty prompt: an empty vector)."""

    async def handler(lease: Lease) -> Any:
        if not req.prompt:
            return JSONResponse({"embedding": []})
        result = await _embed(request, lease, [req.prompt], True)
        return JSONResponse({"embedding": result.vectors[0]})

    return await _leased(request, req, handler)  # type: ignore[arg-type]


# -- what is here ----------------------------------------------------------------------


def _digest(info: ModelInfo) -> str:
    """A stable id without hashing gigabytes: path, size and mtime (the path alone once
    the file is gone: a loaded model whose file was deleted is still listed)."""
    try:
        st = info.path.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        stamp = "gone"
    return hashlib.sha256(f"{info.path}:{stamp}".encode()).hexdigest()


def _details(info: ModelInfo) -> dict[str, Any]:
    p = info.parameters
    return {
        "parent_model": "",
        "format": "gguf",
        "family": info.architecture,
        "families": [info.architecture],
        "parameter_size": f"{p / 1e9:.1f}B" if p >= 1e9 else f"{p / 1e6:.0f}M",
        "quantization_level": info.quantization,
    }


def _modified(info: ModelInfo) -> str:
    try:
        t = info.path.stat().st_mtime
    except OSError:  # deleted while loaded
        t = time.time()
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


async def _info(pool: ModelPool, name: str | None) -> ModelInfo:
    target = await pool.target(name)
    entry = next((e for e in pool.loaded() if e.key == target.key), None)
    if entry is not None:
        return entry.model.info
    return await work.disk(inspect_model, target.path)


def _tag(name: str, i: ModelInfo) -> dict[str, Any]:
    return {"name": name, "model": name, "modified_at": _modified(i), "size": i.file_size,
            "digest": _digest(i), "details": _details(i)}


@router.get("/tags")
async def tags(request: Request) -> JSONResponse:
    pool = _pool(request)
    loaded = {e.model.name: e.model.info for e in pool.loaded()}
    out = []
    for name in await pool.installed_names():
        info = loaded.get(name)
        if info is None:
            try:
                info = await _info(pool, name)
            except HearthError:
                continue
        out.append(await work.disk(_tag, name, info))
    return JSONResponse({"models": out})


def capabilities(info: ModelInfo) -> list[str]:
    """What Ollama's clients look for before they send tools or ``think``: "tools" when
    the model's own template shows tools (hearth serves tools to any model, through the
    generic JSON format, but only these were made for them), "thinking" when it knows
    ``<think>``."""
    caps = ["completion"]
    template = template_for(info.chat_template, info.architecture)
    if template.kind == "model" and template.renders_tools:
        caps.append("tools")
    if template.kind == "model" and detect_format(template.source).think:
        caps.append("thinking")
    return caps


@router.post("/show")
async def show(req: OllamaShowRequest, request: Request) -> JSONResponse:
    pool = _pool(request)
    info = await _info(pool, req.model or req.name)
    if pool.chat_template is not None:  # --chat-template: what every model renders with
        info = dataclasses.replace(info, chat_template=pool.chat_template.source)
    return JSONResponse({
        "modelfile": f"FROM {info.path}\n",
        "parameters": "",
        "template": info.chat_template or "",
        "details": _details(info),
        "model_info": {
            "general.architecture": info.architecture,
            "general.parameter_count": info.parameters,
            f"{info.architecture}.context_length": info.context_length,
            f"{info.architecture}.block_count": info.block_count,
            f"{info.architecture}.embedding_length": info.embedding_length,
            f"{info.architecture}.attention.head_count": info.head_count,
            f"{info.architecture}.attention.head_count_kv": info.head_count_kv,
        },
        "capabilities": await work.cpu(capabilities, info),
        "modified_at": await work.disk(_modified, info),
    })


def _expires(t: float | None) -> str:
    if t is None:  # never: far in the future, as Ollama shows a negative keep_alive
        return "2318-01-01T00:00:00Z"
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


@router.post("/pull")
async def pull(req: OllamaPullRequest, request: Request) -> Any:
    """Pull a catalog or hf.co model into hearth's store, with Ollama's progress lines:
    "pulling manifest", one "pulling <digest>" per file with total/completed, "verifying
    sha256 digest", "writing manifest", "success". A client that leaves stops the
    transfer (what was received is kept: the next pull resumes it)."""
    import threading

    from ..store import local
    from ..store.catalog import load_catalog
    from ..store.pull import parse_hf_ref
    from ..store.registry import KNOWN_MODELS

    name = req.model or req.name
    if not name:
        raise BadRequest("model is required")
    if name.strip().lower() in KNOWN_MODELS:  # embedded: already here
        return JSONResponse({"status": "success"}) if not req.stream else StreamingResponse(
            iter([_ndjson({"status": "success"})]), media_type="application/x-ndjson")
    # an unknown name or tag is a 404 now, not an error line inside a 200 stream
    if parse_hf_ref(name) is None and await work.disk(lambda: load_catalog().lookup(name)) is None:
        raise ModelNotFound(local.unknown_message(name))
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    last: dict[str, int] = {}
    stop = threading.Event()

    def progress(file: str, done: int, total: int) -> None:
        if stop.is_set():
            raise Cancelled("the client disconnected")
        pct = done * 100 // total if total else 0
        if last.get(file) == pct and done != total:
            return
        last[file] = pct
        loop.call_soon_threadsafe(queue.put_nowait, {
            "status": f"pulling {file}", "digest": file, "total": total, "completed": done})

    def job() -> Any:
        try:
            return local.pull(name, progress=progress)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    task = asyncio.ensure_future(work.pull(job))
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # an abandoned pull's error is not news
    if not req.stream:
        try:
            await until_disconnected(request, asyncio.shield(task))
        finally:
            stop.set()  # the client left: the transfer stops at its next chunk
        return JSONResponse({"status": "success"})

    async def watch() -> None:  # between progress lines nothing is sent: listen for the client leaving
        while (await request.receive())["type"] != "http.disconnect":
            pass
        stop.set()

    async def body() -> AsyncIterator[bytes]:
        watcher = asyncio.ensure_future(watch())
        try:
            yield _ndjson({"status": "pulling manifest"})
            while (item := await queue.get()) is not None:
                yield _ndjson(item)
            try:
                await task
            except HearthError as e:
                yield _ndjson({"error": e.message})
                return
            for status in ("verifying sha256 digest", "writing manifest", "success"):
                yield _ndjson({"status": status})
        finally:
            watcher.cancel()
            stop.set()  # the client left (or we are done): a transfer still running stops

    return StreamingResponse(body(), media_type="application/x-ndjson")


@router.delete("/delete")
async def delete(request: Request, req: OllamaDeleteRequest) -> JSONResponse:
    """Delete a model hearth pulled (Ollama's own models and embedded ones are refused: 403)."""
    from ..store import remove_model

    name = req.model or req.name
    if not name:
        raise BadRequest("model is required")
    canon, _deleted, _kept = await work.disk(remove_model, name)
    await _pool(request).forget(canon)
    if canon != name:
        await _pool(request).forget(name)
    return JSONResponse({})


@router.get("/ps")
async def ps(request: Request) -> JSONResponse:
    await _pool(request).check_files()  # a file changed in place is dropped, not shown as usable
    out = []
    for e in sorted(_pool(request).loaded(), key=lambda e: -e.last_used):
        info, plan = e.model.info, e.model.plan
        mem = plan.memory
        out.append({
            "name": e.model.name, "model": e.model.name, "size": mem.ram + mem.vram,
            "digest": await work.disk(_digest, info),
            "details": _details(info),
            "expires_at": _expires(e.expires_at),
            "size_vram": mem.vram, "context_length": plan.n_ctx,
        })
    return JSONResponse({"models": out})


@router.get("/version")
async def version() -> JSONResponse:
    from .. import __version__

    return JSONResponse({"version": __version__})
