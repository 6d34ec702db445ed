"""llama-server's own API, so its clients work unchanged: /completion (and the
unprefixed /completions, native too), /infill, /tokenize, /detokenize,
/apply-template, /props, /slots, /embedding(s), /health, and the unprefixed
OpenAI aliases llama-server serves (/chat/completions, /models, /responses).

The reference is llama.cpp's ``tools/server`` at the version our llama-cpp-python
vendors: request fields, response shapes (``completion_probabilities``,
``timings``, ``stop_type``...) and its error shape ``{"error": {"code", "message",
"type"}}`` (``app.error_body``). Routes that act on a model take an optional
``model`` (in the body, or ``?model=`` for GETs, as llama-server's router mode);
none means the server's default model.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from .. import __version__
from ..errors import BadRequest, HearthError
from ..types import GenerationParams, GenerationResult
from . import openai, responses, work
from .openai import server_limit, timings
from .pool import Lease, LeasedStream, ModelPool, merge_streams, until_disconnected, gather_results, with_lease
from .protocol import ChatCompletionRequest, _Request, _Sampling

router = APIRouter()

FRONTEND = "openai"  # llama-server's defaults are llama.cpp's: the same table as /v1/*
MAX_PROMPTS = openai.MAX_GENERATIONS
MAX_N_PROBS = 20  # hearth computes at most this many alternatives per token (OpenAI's bound)

_STOP_TYPE = {"length": "limit", "cancelled": "none", "error": "none"}


def _pool(request: Request) -> ModelPool:
    return request.app.state.pool


def not_supported(message: str) -> HearthError:
    """llama-server's 501 ``not_supported_error``."""
    e = HearthError(message)
    e.http_status = 501  # type: ignore[misc]
    e.code = "not_supported"  # type: ignore[misc]
    return e


# -- prompts ------------------------------------------------------------------------

Prompt = Union[str, int, list[Union[str, int]]]


def _is_token(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def split_prompts(raw: Any, field: str = "prompt") -> list[Any]:
    """llama-server's ``tokenize_input_prompts``: a string, a list of tokens, a list
    mixing strings and tokens (one prompt each), or a list of those (several)."""
    if isinstance(raw, str):
        return [raw]
    if not isinstance(raw, list) or not raw:
        raise BadRequest(f'"{field}" must be a string, a list of tokens, or a list of prompts, not empty')
    if any(_is_token(x) for x in raw):
        return [raw]  # one prompt: tokens, maybe mixed with strings
    if len(raw) > MAX_PROMPTS:
        raise BadRequest(f'"{field}" has {len(raw)} prompts; one request may hold at most {MAX_PROMPTS}')
    for p in raw:
        if not isinstance(p, (str, list)):
            raise BadRequest(f'"{field}" elements must be a string, a list of tokens, or a list mixing both')
    return list(raw)


def tokenize_mixed(engine: Any, prompt: Any, add_special: bool, parse_special: bool = True) -> list[int]:
    """llama-server's ``tokenize_mixed``: strings are tokenized (BOS only for a first
    string), numbers are token ids."""
    if isinstance(prompt, str):
        return engine.tokenize(prompt, add_special=add_special, parse_special=parse_special)
    out: list[int] = []
    n_vocab = engine.n_vocab
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            out.extend(engine.tokenize(p, add_special=add_special and i == 0, parse_special=parse_special))
        elif _is_token(p):
            if not 0 <= p < n_vocab:
                raise BadRequest(f"token id {p} is outside the vocabulary (0..{n_vocab - 1})")
            out.append(p)
        else:
            raise BadRequest("a prompt list may hold only strings and token ids")
    return out


# -- requests -----------------------------------------------------------------------


class CompletionRequest(_Sampling):
    """``POST /completion``: llama-server's native request."""

    prompt: Any = ""
    n_probs: int | None = None
    return_tokens: bool = False
    cache_prompt: bool = True  # hearth always reuses a slot's longest cached prefix
    id_slot: int = -1
    post_sampling_probs: bool = False
    response_fields: list[str] | None = None
    n_keep: int | None = None
    n_indent: int | None = None
    t_max_predict_ms: int | None = None
    timings_per_token: bool = False
    return_progress: bool = False
    samplers: Any = None  # passed on when GenerationParams knows it (see _params)

    def _logprobs(self) -> int | None:
        if self.n_probs is None or self.n_probs == 0:
            return None
        if not 0 < self.n_probs <= MAX_N_PROBS:
            raise BadRequest(f"n_probs must be in 0..{MAX_N_PROBS}, got {self.n_probs}")
        return self.n_probs


class InfillRequest(CompletionRequest):
    input_prefix: Any = None
    input_suffix: Any = None
    input_extra: Any = None


class TokenizeRequest(_Request):
    model: str | None = None
    content: Any = None
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int] = Field(default_factory=list, max_length=1_000_000)


class NativeEmbeddingRequest(_Request):
    model: str | None = None
    content: Any = None
    input: Any = None  # llama-server reads "input" too


def _check_native(req: CompletionRequest) -> None:
    if req.post_sampling_probs:
        raise BadRequest("post_sampling_probs is not supported: hearth reports the model's own "
                         "log-probabilities (n_probs), before sampling")
    if req.n_probs is not None and req.n_probs < 0:
        raise BadRequest(f"n_probs must be in 0..{MAX_N_PROBS}, got {req.n_probs}")


def _params(req: CompletionRequest, request: Request) -> GenerationParams:
    _check_native(req)
    return server_limit(request, req.to_params())


# -- responses ----------------------------------------------------------------------


def _probs(entries: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """``completion_probabilities``: hearth's logprob entries have llama-server's keys."""
    out = []
    for e in entries or []:
        out.append({"id": e["id"], "token": e["token"], "bytes": e["bytes"], "logprob": e["logprob"],
                    "top_logprobs": [{"id": t["id"], "token": t["token"], "bytes": t["bytes"],
                                      "logprob": t["logprob"]} for t in e["top_logprobs"]]})
    return out


def stop_type(r: GenerationResult) -> str:
    if r.finish_reason == "stop":
        return "word" if r.stop_sequence else "eos"
    return _STOP_TYPE[r.finish_reason]


def settings(params: GenerationParams, n_probs: int, stream: bool) -> dict[str, Any]:
    """``generation_settings``: the request's resolved sampling, in llama-server's names."""
    d = {k: v for k, v in params.to_dict().items()
         if k not in ("grammar", "json_schema", "grammar_triggers", "logprobs", "logit_bias", "max_tokens")}
    n_predict = -1 if params.max_tokens is None else params.max_tokens
    d.update({"seed": 0xFFFFFFFF if params.seed is None else params.seed, "n_predict": n_predict,
              "max_tokens": n_predict, "stream": stream, "n_probs": n_probs,
              "grammar": params.grammar or "", "logit_bias": [[k, v] for k, v in (params.logit_bias or {}).items()]})
    return d


def _select(fields: list[str] | None, obj: dict[str, Any]) -> dict[str, Any]:
    """``response_fields``: only these (``a/b`` brings a nested value up as ``b``)."""
    if not fields:
        return obj
    out: dict[str, Any] = {}
    for f in fields:
        cur: Any = obj
        for part in f.split("/"):
            if not isinstance(cur, dict) or part not in cur:
                break
            cur = cur[part]
        else:
            out[f.split("/")[-1]] = cur
    return out


def final_json(req: CompletionRequest, r: GenerationResult, index: int, model: str, prompt: str,
               params: GenerationParams, stream: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "index": index,
        "content": "" if stream else r.text,
        "tokens": list(r.token_ids) if req.return_tokens and not stream else [],
        "id_slot": r.slot,
        "stop": True,
        "model": model,
        "tokens_predicted": r.usage.completion_tokens,
        "tokens_evaluated": r.usage.prompt_tokens,
        "generation_settings": settings(params, req.n_probs or 0, stream),
        "prompt": prompt,
        "has_new_line": "\n" in r.text,
        "truncated": False,
        "stop_type": stop_type(r),
        "stopping_word": r.stop_sequence or "",
        # what the slot's cache holds now: the prompt and every generated token but the last
        "tokens_cached": r.usage.prompt_tokens + max(0, r.usage.completion_tokens - 1),
        "timings": timings(r),
    }
    if not stream and r.logprobs:
        out["completion_probabilities"] = _probs(r.logprobs)
    return _select(req.response_fields, out)


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _run_native(req: CompletionRequest, request: Request, lease: Lease, jobs: list[list[int]],
                      params: GenerationParams) -> Any:
    """Run token prompts (n completions each) and answer in llama-server's native shape:
    one object, a list for several, or an SSE stream without ``[DONE]``."""
    model = lease.model
    name = req.model or lease.name
    loop = asyncio.get_running_loop()
    n = req.n

    def prepare() -> tuple[GenerationParams, list[Any], list[str]]:
        resolved = model.params(params, FRONTEND, defaults=lease.defaults)
        handles = lease.submit([(toks, c) for toks in jobs for c in openai._per_choice(resolved, n)], loop)
        texts = [model.engine.detokenize(t) for t in jobs]
        return resolved, handles, texts

    resolved, handles, texts = await work.cpu(prepare)

    if not req.stream:
        results = await until_disconnected(request, gather_results(handles))
        out = [final_json(req, r, i, name, texts[i // n], resolved, False) for i, r in enumerate(results)]
        return JSONResponse(out[0] if len(out) == 1 else out)

    counts = [0] * len(handles)
    n_prompt = [len(jobs[i // n]) for i in range(len(handles))]

    async def events() -> AsyncIterator[bytes]:
        stream = merge_streams(handles)
        try:
            async for i, ch, result in stream:
                if ch is not None and ch.text:
                    counts[i] += len(ch.token_ids)
                    part: dict[str, Any] = {"index": i, "content": ch.text,
                                            "tokens": list(ch.token_ids) if req.return_tokens else [],
                                            "stop": False, "id_slot": -1, "tokens_predicted": counts[i],
                                            "tokens_evaluated": n_prompt[i]}
                    if ch.logprobs:
                        part["completion_probabilities"] = _probs(ch.logprobs)
                    yield _sse(part)
                elif result is not None:
                    yield _sse(final_json(req, result, i, name, texts[i // n], resolved, True))
        except HearthError as e:  # after the headers went out: say it in the stream
            yield _sse({"error": {"code": e.http_status, "message": e.message, "type": "server_error"}})
        finally:
            await stream.aclose()

    async def body() -> AsyncIterator[bytes]:
        events_ = events()
        try:
            async for data in events_:
                yield data
                if await request.is_disconnected():
                    return
        finally:
            await events_.aclose()

    return LeasedStream(lease, body(), media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# -- routes -------------------------------------------------------------------------


@router.post("/completion")
@router.post("/completions")
async def completion(req: CompletionRequest, request: Request) -> Any:
    prompts = split_prompts(req.prompt)
    if len(prompts) * req.n > MAX_PROMPTS:
        raise BadRequest(f"{len(prompts)} prompts x n={req.n} is {len(prompts) * req.n} generations; "
                         f"one request may ask for at most {MAX_PROMPTS}")
    params = _params(req, request)

    async def run(lease: Lease) -> Any:
        engine = lease.model.engine
        jobs = await work.cpu(lambda: [tokenize_mixed(engine, p, True) for p in prompts])
        return await _run_native(req, request, lease, jobs, params)

    return await with_lease(_pool(request), req.model, run)


def infill_tokens(engine: Any, req: InfillRequest, n_batch: int, n_ctx: int) -> list[int]:
    """llama-server's ``format_prompt_infill``: the repo-level FIM pattern
    ``[REP]myproject [SEP]file extra... [SEP]filename [PRE]prefix [SUF]suffix [MID]prompt``,
    the prefix and suffix cut to fit a batch (3:1), extra context to fill the rest."""
    fim = engine.fim_tokens()
    missing = [f"{what} token is missing." for key, what in (("pre", "prefix"), ("suf", "suffix"), ("mid", "middle"))
               if key not in fim]
    if missing:
        raise not_supported("Infill is not supported by this model: " + " ".join(missing))

    def tok(text: str) -> list[int]:
        return engine.tokenize(text, add_special=False, parse_special=False)

    prefix = tokenize_mixed(engine, req.input_prefix, False, False)
    suffix = tokenize_mixed(engine, req.input_suffix, False, False)
    prompt = tokenize_mixed(engine, req.prompt or "", False, True)
    extra: list[int] = []
    if "rep" in fim:
        extra += [fim["rep"], *tok("myproject\n")]
    for chunk in req.input_extra or []:
        if "sep" in fim:
            extra += [fim["sep"], *tok(chunk.get("filename", "tmp") + "\n")]
        else:
            extra += tok("\n\n--- snippet ---\n\n")
        extra += tok(chunk["text"])
    if "sep" in fim:
        extra += [fim["sep"], *tok("filename\n")]
    n_predict = req.n_predict if req.n_predict is not None else (req.max_tokens if req.max_tokens is not None else -1)
    n_prefix = min(len(prefix), 3 * (n_batch // 4))
    n_suffix = min(len(suffix), max(0, n_batch // 4 - (2 + len(prompt))))
    n_extra = min(max(0, n_ctx - n_batch - 2 * n_predict), len(extra))
    head = [fim["pre"], *prefix[len(prefix) - n_prefix:], *prompt]
    tail = [fim["suf"], *suffix[:n_suffix]]
    bos = engine.tokenize("", add_special=True)[:1] if engine.add_bos else []
    return [*(extra[len(extra) - n_extra:] if n_extra else []), *bos, *head, *tail, fim["mid"]]


@router.post("/infill")
async def infill(req: InfillRequest, request: Request) -> Any:
    if req.prompt is not None and not isinstance(req.prompt, str):
        raise BadRequest('"prompt" must be a string')
    if req.input_prefix is None:
        raise BadRequest('"input_prefix" is required')
    if req.input_suffix is None:
        raise BadRequest('"input_suffix" is required')
    for field_ in ("input_prefix", "input_suffix"):
        v = getattr(req, field_)
        if not isinstance(v, (str, list)):
            raise BadRequest(f'"{field_}" must be a string or a list of tokens')
    if req.input_extra is not None:
        if not isinstance(req.input_extra, list) or len(req.input_extra) > 256:
            raise BadRequest('"input_extra" must be an array of {"filename": string, "text": string} '
                             "(at most 256)")
        for chunk in req.input_extra:
            if not isinstance(chunk, dict) or not isinstance(chunk.get("text"), str):
                raise BadRequest('extra_context chunk must contain a "text" field with a string value')
            if "filename" in chunk and not isinstance(chunk["filename"], str):
                raise BadRequest('extra_context chunk\'s "filename" field must be a string')
    params = _params(req, request)

    async def run(lease: Lease) -> Any:
        model = lease.model
        tokens = await work.cpu(infill_tokens, model.engine, req, model.plan.n_batch, model.engine.n_ctx_per_slot)
        return await _run_native(req, request, lease, [tokens], params)

    return await with_lease(_pool(request), req.model, run)


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request) -> JSONResponse:
    if req.content is not None and not isinstance(req.content, (str, list)):
        raise BadRequest('"content" must be a string or a list of strings and token ids')

    def work_(lease: Lease) -> dict[str, Any]:
        engine = lease.model.engine
        if req.content is None:
            return {"tokens": []}
        tokens = tokenize_mixed(engine, req.content, req.add_special, req.parse_special)
        if not req.with_pieces:
            return {"tokens": tokens}
        out = []
        for t in tokens:
            piece = engine.token_piece(t)
            try:
                out.append({"id": t, "piece": piece.decode("utf-8")})
            except UnicodeDecodeError:  # a partial character: its bytes, as llama-server
                out.append({"id": t, "piece": list(piece)})
        return {"tokens": out}

    async def run(lease: Lease) -> JSONResponse:
        return JSONResponse(await work.cpu(work_, lease))

    return await with_lease(_pool(request), req.model, run)


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request) -> JSONResponse:
    def work_(lease: Lease) -> dict[str, Any]:
        engine = lease.model.engine
        data = b"".join(engine.token_piece(t) for t in req.tokens)
        return {"content": data.decode("utf-8", errors="replace")}

    async def run(lease: Lease) -> JSONResponse:
        return JSONResponse(await work.cpu(work_, lease))

    return await with_lease(_pool(request), req.model, run)


@router.post("/apply-template")
async def apply_template(req: ChatCompletionRequest, request: Request) -> JSONResponse:
    """The prompt a chat request becomes, without generating."""
    messages = openai._chat_messages(req)
    tools = openai.parse_tools(req.tools)
    choice = openai.parse_tool_choice(req.tool_choice, tools)
    params = req.to_params()

    async def run(lease: Lease) -> JSONResponse:
        def render() -> str:
            return lease.model.chat_setup(messages, params, "openai", defaults=lease.defaults, tools=tools,
                                          tool_choice=choice, parallel_tool_calls=req.parallel_tool_calls is not False,
                                          think=openai._think(req)).prompt

        return JSONResponse({"prompt": await work.cpu(render)})

    return await with_lease(_pool(request), req.model, run)


def _caps(template: Any) -> dict[str, bool]:
    """llama-server's ``chat_template_caps``, as far as hearth's template probes tell."""
    return {
        "supports_object_arguments": template.renders_tool_calls,
        "supports_parallel_tool_calls": template.renders_tool_calls,
        "supports_preserve_reasoning": template.mentions("reasoning_content"),
        "supports_reasoning_effort": template.mentions("reasoning_effort"),
        "supports_string_content": True,
        "supports_system_role": template.mentions("system"),
        "supports_tool_calls": template.renders_tool_calls,
        "supports_tools": template.renders_tools,
        "supports_typed_content": False,
    }


def _props(request: Request, lease: Lease) -> dict[str, Any]:
    model = lease.model
    engine = model.engine
    resolved = model.params(server_limit(request, GenerationParams()), FRONTEND, defaults=lease.defaults)
    template = engine.chat_template
    specials = engine.special_texts
    state = request.app.state
    return {
        "default_generation_settings": {"params": settings(resolved, 0, False), "n_ctx": engine.n_ctx_per_slot},
        "total_slots": engine.stats().slots,
        "model_alias": lease.name,
        "model_ftype": model.info.quantization,
        "model_path": str(model.info.path),
        "modalities": {"vision": False, "video": False, "audio": False},
        "endpoint_slots": bool(state.slots_endpoint),
        "endpoint_props": False,
        "endpoint_metrics": True,
        "ui": False,
        "chat_template": template.source,
        "chat_template_caps": _caps(template),
        "bos_token": specials["bos"],
        "eos_token": specials["eos"],
        "build_info": f"hearth {__version__}",
        "is_sleeping": False,
    }


@router.get("/props")
async def props(request: Request, model: str | None = None) -> JSONResponse:
    async def run(lease: Lease) -> JSONResponse:
        return JSONResponse(_props(request, lease))

    return await with_lease(_pool(request), model, run)


@router.post("/props")
async def set_props(request: Request) -> JSONResponse:
    raise not_supported("This server does not support changing global properties. Start it with `--props`")


@router.get("/slots")
async def slots(request: Request, model: str | None = None, fail_on_no_slot: str | None = None) -> JSONResponse:
    if not request.app.state.slots_endpoint:
        raise not_supported("This server does not support slots endpoint. Start it with `--slots`")

    async def run(lease: Lease) -> JSONResponse:
        states = lease.model.engine.slot_states()
        if fail_on_no_slot and all(s["is_processing"] for s in states):
            e = HearthError("no slot available")
            e.http_status = 503  # type: ignore[misc]
            raise e
        return JSONResponse(states)

    return await with_lease(_pool(request), model, run)


@router.post("/slots/{id_slot}")
async def slot_action(id_slot: str, request: Request) -> JSONResponse:
    raise not_supported("This server does not support slots action. Start it with `--slot-save-path`")


@router.post("/embedding")
@router.post("/embeddings")
async def embedding(req: NativeEmbeddingRequest, request: Request) -> JSONResponse:
    """llama-server's native shape: ``[{"index", "embedding": [[...]]}]`` (pooled: one vector)."""
    raw = req.input if req.content is None else req.content
    if raw is None:
        raise BadRequest('"input" or "content" must be provided')
    inputs = openai._embedding_inputs(raw)
    if len(inputs) > openai.MAX_EMBEDDING_INPUTS:
        raise BadRequest(f"input has {len(inputs)} items; at most {openai.MAX_EMBEDDING_INPUTS}")
    lease = await _pool(request).acquire(req.model)
    try:
        result = await work.cpu(lease.model.embed, inputs)
        pool = _pool(request)
        if pool.on_embed is not None:
            pool.on_embed(lease.model.name, result.prompt_tokens)
    finally:
        lease.release()
    return JSONResponse([{"index": i, "embedding": [v]} for i, v in enumerate(result.vectors)])


# -- the unprefixed OpenAI aliases llama-server serves --------------------------------

router.add_api_route("/chat/completions", openai.chat_completions, methods=["POST"])
router.add_api_route("/models", openai.list_models, methods=["GET"])
router.add_api_route("/responses", responses.responses, methods=["POST"])

__all__ = ["router", "split_prompts", "tokenize_mixed", "timings", "server_limit"]
