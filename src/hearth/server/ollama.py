"""Ollama-compatible API: /api/generate, /api/chat, /api/embed, /api/embeddings, /api/tags,
/api/show, /api/ps, /api/version, /api/pull, /api/delete."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..engines.llamacpp.sampling import JSON_GRAMMAR
from ..errors import BadRequest, HearthError, ModelNotFound
from ..gguf import ModelInfo, inspect_model
from ..store import resolve_model
from ..types import GenerationConfig, GenerationResult
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
)

router = APIRouter(prefix="/api")
log = logging.getLogger(__name__)

# Ollama option -> GenerationConfig field
_OPTIONS = {
    "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
    "seed": "seed", "stop": "stop", "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
}
# accepted and not (yet) applied: loading is planned per model, not per request
_IGNORED = {"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep", "use_mmap",
            "use_mlock", "numa", "low_vram", "typical_p", "penalize_newline", "mirostat",
            "mirostat_tau", "mirostat_eta", "tfs_z", "vocab_only", "f16_kv", "logits_all"}


def _pool(request: Request) -> ModelPool:
    return request.app.state.pool


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _config(req: _OllamaRequest) -> GenerationConfig:
    kw: dict[str, Any] = {"max_tokens": None}  # Ollama's default: until the model stops
    for k, v in (req.options or {}).items():
        if k == "num_predict":
            if not isinstance(v, int) or isinstance(v, bool):
                raise BadRequest(f"options.num_predict must be an integer, got {v!r}")
            kw["max_tokens"] = v if v >= 0 else None  # -1 forever, -2 fill the context
        elif k in _OPTIONS:
            kw[_OPTIONS[k]] = v
        elif k not in _IGNORED:
            log.debug("ignoring unknown option %s", k)
    if req.format == "json":
        kw["grammar"] = JSON_GRAMMAR
    elif isinstance(req.format, dict):
        kw["json_schema"] = req.format
    try:
        return GenerationConfig.from_kwargs(None, **kw)
    except TypeError as e:
        raise BadRequest(f"invalid options: {e}") from None


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


async def _run(
    request: Request, stream: bool, name: str, lease: Lease,
    prompt: str, cfg: GenerationConfig, piece: Any,
) -> Any:
    """One generation; ``piece(text)`` is the per-chunk body (response or message)."""
    load_s = lease.load_seconds
    (handle,) = lease.submit([(prompt, cfg)])
    if not stream:
        result = await until_disconnected(request, handle.aresult())
        return JSONResponse({"model": name, "created_at": _now(), **piece(result.text), **_final(name, result, load_s)})

    async def body() -> AsyncIterator[bytes]:
        events = merge_streams([handle])
        try:
            async for _, ch, result in events:
                if ch is not None and ch.text:
                    yield _ndjson({"model": name, "created_at": _now(), **piece(ch.text), "done": False})
                elif result is not None:
                    yield _ndjson({"model": name, "created_at": _now(), **piece(""), **_final(name, result, load_s)})
                if await request.is_disconnected():
                    return
        except HearthError as e:
            yield _ndjson({"error": e.message})
        finally:
            await events.aclose()

    return LeasedStream(lease, body(), media_type="application/x-ndjson")


@router.post("/generate")
async def generate(req: OllamaGenerateRequest, request: Request) -> Any:
    if req.images:
        raise BadRequest("images are not supported yet")
    cfg = _config(req)

    async def handler(lease: Lease) -> Any:
        if not req.prompt and not req.system:  # Ollama: an empty prompt just loads (or unloads) the model
            return JSONResponse({"model": req.model, "created_at": _now(), "response": "", "done": True,
                                 "done_reason": "unload" if lease.entry.keep_alive == 0 else "load"})
        prompt, c = req.prompt, cfg
        if not req.raw:
            messages = ([{"role": "system", "content": req.system}] if req.system else [])
            messages.append({"role": "user", "content": req.prompt})
            prompt, c = lease.model.chat_prompt(messages, cfg)
        return await _run(request, req.stream, req.model, lease, prompt, c, lambda t: {"response": t})

    return await _leased(request, req, handler)


@router.post("/chat")
async def chat(req: OllamaChatRequest, request: Request) -> Any:
    if any(m.images for m in req.messages):
        raise BadRequest("images are not supported yet")
    if req.tools:
        raise BadRequest("tools are not supported yet")
    cfg = _config(req)

    async def handler(lease: Lease) -> Any:
        if not req.messages:  # Ollama: no messages just loads (or unloads) the model
            return JSONResponse({"model": req.model, "created_at": _now(),
                                 "message": {"role": "assistant", "content": ""}, "done": True,
                                 "done_reason": "unload" if lease.entry.keep_alive == 0 else "load"})
        prompt, c = lease.model.chat_prompt([{"role": m.role, "content": m.content} for m in req.messages], cfg)
        return await _run(request, req.stream, req.model, lease, prompt, c,
                          lambda t: {"message": {"role": "assistant", "content": t}})

    return await _leased(request, req, handler)


async def _embed(request: Request, lease: Lease, inputs: list[str], truncate: bool) -> Any:
    model = lease.model
    result = await asyncio.to_thread(model.embed, inputs, truncate=truncate)
    pool = _pool(request)
    if pool.on_embed is not None:
        pool.on_embed(model.name, result.prompt_tokens)
    return result


@router.post("/embed")
async def embed(req: OllamaEmbedRequest, request: Request) -> Any:
    inputs = [req.input] if isinstance(req.input, str) else list(req.input)
    if not inputs:
        raise BadRequest("input must not be empty")

    async def handler(lease: Lease) -> Any:
        t0 = time.perf_counter()
        if req.dimensions is not None and req.dimensions != lease.model.engine.n_embd:
            raise BadRequest(f"dimensions: this model's embeddings have {lease.model.engine.n_embd} "
                             f"dimensions, not {req.dimensions}")
        result = await _embed(request, lease, inputs, req.truncate)
        return JSONResponse({
            "model": req.model, "embeddings": result.vectors,
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
    """A stable id without hashing gigabytes: path, size and mtime."""
    st = info.path.stat()
    return hashlib.sha256(f"{info.path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()


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


async def _info(name: str) -> ModelInfo:
    return await asyncio.to_thread(lambda: inspect_model(resolve_model(name, pull=False).path))


@router.get("/tags")
async def tags(request: Request) -> JSONResponse:
    pool = _pool(request)
    infos: dict[str, ModelInfo] = {e.model.name: e.model.info for e in pool.loaded()}
    for name in pool.installed_names():
        if name not in infos:
            try:
                infos[name] = await _info(name)
            except HearthError:
                continue
    return JSONResponse({"models": [
        {"name": n, "model": n, "modified_at": _modified(i), "size": i.file_size, "digest": _digest(i), "details": _details(i)}
        for n, i in infos.items()
    ]})


@router.post("/show")
async def show(req: OllamaShowRequest) -> JSONResponse:
    name = req.model or req.name
    if not name:
        raise BadRequest("model is required")
    info = await _info(name)
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
        "capabilities": ["completion"],
        "modified_at": _modified(info),
    })


def _expires(t: float | None) -> str:
    if t is None:  # never: far in the future, as Ollama shows a negative keep_alive
        return "2318-01-01T00:00:00Z"
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


@router.post("/pull")
async def pull(req: OllamaPullRequest) -> Any:
    """Pull a catalog or hf.co model into hearth's store, with Ollama's progress lines:
    "pulling manifest", one "pulling <digest>" per file with total/completed, "verifying
    sha256 digest", "writing manifest", "success"."""
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
    if parse_hf_ref(name) is None and load_catalog().lookup(name) is None:
        raise ModelNotFound(local.unknown_message(name))
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    last: dict[str, int] = {}

    def progress(file: str, done: int, total: int) -> None:
        pct = done * 100 // total if total else 0
        if last.get(file) == pct and done != total:
            return
        last[file] = pct
        loop.call_soon_threadsafe(queue.put_nowait, {
            "status": f"pulling {file}", "digest": file, "total": total, "completed": done})

    def work() -> Any:
        try:
            return local.pull(name, progress=progress)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    if not req.stream:
        await asyncio.to_thread(work)
        return JSONResponse({"status": "success"})

    task = asyncio.ensure_future(asyncio.to_thread(work))

    async def body() -> AsyncIterator[bytes]:
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

    return StreamingResponse(body(), media_type="application/x-ndjson")


@router.delete("/delete")
async def delete(request: Request, req: OllamaDeleteRequest) -> JSONResponse:
    """Delete a model hearth pulled (Ollama's own models and embedded ones are refused: 403)."""
    from ..store import remove_model

    name = req.model or req.name
    if not name:
        raise BadRequest("model is required")
    canon, _deleted, _kept = await asyncio.to_thread(remove_model, name)
    await _pool(request).forget(canon)
    if canon != name:
        await _pool(request).forget(name)
    return JSONResponse({})


@router.get("/ps")
async def ps(request: Request) -> JSONResponse:
    out = []
    for e in sorted(_pool(request).loaded(), key=lambda e: -e.last_used):
        info, plan = e.model.info, e.model.plan
        mem = plan.memory
        out.append({
            "name": e.model.name, "model": e.model.name, "size": mem.ram + mem.vram, "digest": _digest(info),
            "details": _details(info),
            "expires_at": _expires(e.expires_at),
            "size_vram": mem.vram, "context_length": plan.n_ctx,
        })
    return JSONResponse({"models": out})


@router.get("/version")
async def version() -> JSONResponse:
    from .. import __version__

    return JSONResponse({"version": __version__})
