"""The library API: load a model, generate, chat, count, inspect, estimate, benchmark."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, AsyncIterator, Iterator, Mapping, Sequence

from .config import LOAD_SETTINGS, load_config
from .engines.base import Engine, Handle, load_engine
from .errors import BadRequest
from .gguf import ModelInfo, inspect_model
from .hardware import Hardware, detect_hardware, process_rss
from .planner import LoadOptions, LoadPlan, MemoryEstimate, estimate_memory, plan_load
from .store import ResolvedModel, resolve_model
from .tools import (
    ChatFormat,
    OutputParser,
    ParsedOutput,
    Tool,
    ToolChoice,
    build_grammar,
    check_tool_messages,
    detect_format,
    generic_system_prompt,
    parse_tool_choice,
    parse_tools,
)
from .types import (
    UNSET,
    GenerationChunk,
    GenerationParams,
    GenerationResult,
    GiB,
    MappingView,
    resolve_params,
)

ModelRef = "Model | str | os.PathLike[str] | None"

log = logging.getLogger(__name__)


@dataclass
class ChatSetup:
    """One chat request, ready to submit: ``prompt`` and ``params``; ``parser()`` reads
    the output back into reasoning, content and tool calls."""

    prompt: str
    params: GenerationParams
    format: ChatFormat
    tools: list[Tool]
    choice: ToolChoice
    in_thinking: bool = False

    def parser(self) -> OutputParser:
        return OutputParser(self.format, self.tools, parse_calls=bool(self.tools), in_thinking=self.in_thinking)


def _with_parse(result: GenerationResult | None, parsed: ParsedOutput) -> GenerationResult | None:
    if result is None:
        return None
    if not parsed.reasoning and not parsed.tool_calls and parsed.content == result.text:
        return result
    return replace(result, text=parsed.content, reasoning=parsed.reasoning, tool_calls=list(parsed.tool_calls))


def _read(result: GenerationResult, parser: OutputParser) -> GenerationResult:
    """A chat result with the model's thinking and tool calls split off its text."""
    if parser.passthrough:
        return result
    parser.feed(result.text)
    parsed, _ = parser.finish()
    return _with_parse(result, parsed)  # type: ignore[return-value]


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """``text`` appended to the first system message, or a new one before the rest."""
    if messages and messages[0].get("role") in ("system", "developer"):
        first = dict(messages[0])
        content = first.get("content") or ""
        first["content"] = (content + "\n\n" if isinstance(content, str) and content else "") + text
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _calls_as_text(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For templates that do not show tool calls: earlier calls become the JSON the
    generic format writes, and tool results a user turn that says what they answer."""
    out = []
    names: dict[str, str] = {}
    for m in messages:
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and calls:
            listed = []
            for c in calls:
                fn = c.get("function") or {}
                args = fn.get("arguments")
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except ValueError:
                        pass
                names[str(c.get("id"))] = str(fn.get("name"))
                listed.append({"name": fn.get("name"), "arguments": args, "id": c.get("id")})
            body = {"tool_calls": listed} if len(listed) > 1 else {"tool_call": listed[0]}
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = json.dumps(body, ensure_ascii=False)
        elif m.get("role") == "tool":
            cid = m.get("tool_call_id")
            content = m.get("content")
            resp = {"tool": names.get(str(cid), m.get("name")), "tool_call_id": cid,
                    "content": content}
            m = {"role": "user", "content": json.dumps({"tool_response": resp}, ensure_ascii=False)}
        out.append(m)
    return out


@dataclass
class Embeddings:
    """What ``Model.embed`` returns: one vector per input, and what it cost."""

    vectors: list[list[float]]
    token_counts: list[int]
    seconds: float = 0.0

    @property
    def prompt_tokens(self) -> int:
        return sum(self.token_counts)


@dataclass(frozen=True)
class ModelDefaults:
    """What a model name brings besides its weights: sampling defaults (an Ollama
    manifest's parameters over the GGUF's recommended sampling) and a system prompt.
    Two names may share one file and one loaded model, each with its own defaults."""

    params: GenerationParams
    system: str | None = None


class Model:
    """A loaded model. Thread-safe: any number of threads may generate at once.

    Every generation call takes a ``GenerationParams`` and/or its fields as keywords
    (``temperature=0``); what they leave unset comes from the model's own defaults (an
    Ollama manifest's parameters, the GGUF's recommended sampling), then from the
    front end's defaults (``frontend``: "library" unless a server route says otherwise).
    """

    def __init__(self, name: str, info: ModelInfo, plan: LoadPlan, hardware: Hardware, max_queue: int = 64,
                 *, defaults: Mapping[str, Any] | None = None, system: str | None = None,
                 hosts: Sequence[str] = ()) -> None:
        self.name = name
        self.info = info
        self.plan = plan
        self.hardware = hardware
        self.hosts = list(hosts)  # RPC workers this model's layers run on (in its own process)
        self.own = self.defaults_for(defaults, system)
        self.engine: Engine = load_engine(info, plan, model_name=name, max_queue=max_queue, hosts=self.hosts)

    # -- parameters ---------------------------------------------------------------------

    def defaults_for(self, params: Mapping[str, Any] | None = None, system: str | None = None) -> ModelDefaults:
        """The defaults of a name for this model's file: its own ``params`` (an Ollama
        manifest's) over the GGUF's recommended sampling."""
        return ModelDefaults(GenerationParams.from_kwargs(**{**self.info.sampling, **(params or {})}), system)

    @property
    def defaults(self) -> GenerationParams:
        return self.own.params

    @property
    def system(self) -> str | None:
        return self.own.system

    def params(self, params: GenerationParams | None = None, frontend: str = "library", *,
               defaults: ModelDefaults | None = None, **kw: Any) -> GenerationParams:
        """The resolved parameters of one request: ``params`` and ``kw`` (which win) >
        the model's defaults (``defaults``, else this model's own) > the front end's."""
        if kw:
            request = (params or GenerationParams()).updated(**GenerationParams.from_kwargs(**kw).set_fields())
        else:
            request = params
        return resolve_params(request, (defaults or self.own).params, frontend)

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], params: GenerationParams | None = None,
                    frontend: str = "library", *, defaults: ModelDefaults | None = None,
                    **kw: Any) -> tuple[str, GenerationParams]:
        """The prompt text for ``messages`` and the resolved parameters, with the chat
        template's stop strings and the model's system prompt applied."""
        own = defaults or self.own
        if own.system and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": own.system}, *messages]
        text, stops = self.engine.render_chat(messages)
        resolved = self.params(params, frontend, defaults=own, **kw)
        if stops:
            resolved.stop = list(dict.fromkeys([*resolved.stop, *stops]))
        return text, resolved

    def chat_setup(self, messages: Sequence[Mapping[str, Any]], params: GenerationParams | None = None,
                   frontend: str = "library", *, defaults: ModelDefaults | None = None,
                   tools: Sequence[Tool] | Sequence[Mapping[str, Any]] | None = None,
                   tool_choice: ToolChoice | Any = None, parallel_tool_calls: bool = True,
                   think: bool | str | None = None, **kw: Any) -> ChatSetup:
        """Everything one chat request needs: the prompt (tools shown through the
        model's own template), the resolved parameters (with the tool-call grammar),
        and how to read the output back (``setup.parser()``: reasoning, content, calls).

        ``think``: None leaves the template's default; True/False (or a level such as
        "high") is passed to templates that take ``enable_thinking``/``reasoning_effort``.
        """
        own = defaults or self.own
        tool_list = [t if isinstance(t, Tool) else None for t in tools or []]
        if any(t is None for t in tool_list):
            tool_list = parse_tools(list(tools or []))
        choice = tool_choice if isinstance(tool_choice, ToolChoice) else parse_tool_choice(tool_choice, tool_list)
        active = bool(tool_list) and choice.mode != "none"
        template = self.engine.chat_template
        fmt = detect_format(template.source) if template.kind == "model" else ChatFormat("generic")
        if active and fmt.name != "generic" and not template.renders_tools:
            fmt = ChatFormat("generic", fmt.think)
        msgs = [dict(m) for m in messages]
        if own.system and not any(m.get("role") == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": own.system})
        check_tool_messages(msgs)
        if not template.renders_tool_calls:
            msgs = _calls_as_text(msgs)
        if active and fmt.name == "generic":
            msgs = _with_system(msgs, generic_system_prompt(tool_list, choice, parallel_tool_calls))
        extra: dict[str, Any] = {}
        if think is not None:
            if template.mentions("enable_thinking"):
                extra["enable_thinking"] = bool(think) and think not in ("none", "minimal")
            if isinstance(think, str) and template.mentions("reasoning_effort"):
                extra["reasoning_effort"] = think
        text, stops = self.engine.render_chat(
            msgs, tools=[t.to_openai() for t in tool_list] if active else None, extra=extra)
        in_thinking = bool(fmt.think) and text.rstrip().endswith(fmt.think[0])  # type: ignore[index]
        resolved = self.params(params, frontend, defaults=own, **kw)
        if stops:
            resolved.stop = list(dict.fromkeys([*resolved.stop, *stops]))
        if active:
            if resolved.grammar:
                raise BadRequest("a grammar cannot be combined with tools; use one or the other")
            tg = build_grammar(fmt, tool_list, choice, parallel_tool_calls, in_thinking=in_thinking,
                               response_schema=resolved.json_schema)
            if tg is not None:
                resolved = resolved.updated(grammar=tg.grammar, json_schema=None, grammar_triggers=tg.triggers)
        return ChatSetup(text, resolved, fmt, tool_list if active else [], choice, in_thinking)

    # -- generation ---------------------------------------------------------------

    def submit(self, prompt: str | list[int], params: GenerationParams | None = None, *,
               stream: bool = True, loop: asyncio.AbstractEventLoop | None = None,
               frontend: str = "library", **kw: Any) -> Handle:
        """Queue a request and return its handle (iterate it, ``async for`` it when
        submitted with ``loop``, ``result()``/``aresult()``, ``cancel()``). Tokenizing
        and grammar compilation happen in the calling thread."""
        resolved = params if params is not None and params.resolved and not kw else self.params(params, frontend, **kw)
        return self.engine.submit(prompt, resolved, stream, loop=loop)

    def stream_text(self, prompt: str | list[int], params: GenerationParams | None = None, **kw: Any) -> Iterator[GenerationChunk]:
        return self._stream(self.submit(prompt, params, **kw))

    def generate_text(self, prompt: str | list[int], params: GenerationParams | None = None, **kw: Any) -> GenerationResult:
        return self.submit(prompt, params, stream=False, **kw).result()

    # Chat calls take, besides the sampling settings, ``tools`` (OpenAI's shape),
    # ``tool_choice``, ``parallel_tool_calls`` and ``think`` (see ``chat_setup``). The
    # result's text is the answer; a thinking model's thinking is in ``.reasoning`` (and
    # streamed as chunks of kind "reasoning"), tool calls in ``.tool_calls``.

    def _setup(self, messages: Sequence[Mapping[str, Any]], params: GenerationParams | None,
               kw: dict[str, Any]) -> ChatSetup:
        return self.chat_setup(messages, params, **kw)

    def stream_chat(self, messages: Sequence[Mapping[str, Any]], params: GenerationParams | None = None, **kw: Any) -> Iterator[GenerationChunk]:
        setup = self._setup(messages, params, kw)
        return self._stream_read(self.submit(setup.prompt, setup.params), setup.parser())

    def generate_chat(self, messages: Sequence[Mapping[str, Any]], params: GenerationParams | None = None, **kw: Any) -> GenerationResult:
        setup = self._setup(messages, params, kw)
        return _read(self.submit(setup.prompt, setup.params, stream=False).result(), setup.parser())

    @staticmethod
    def _stream(handle: Handle) -> Iterator[GenerationChunk]:
        yield from handle
        return handle.result_now  # the generator's return value: the GenerationResult

    @staticmethod
    def _stream_read(handle: Handle, parser: OutputParser) -> Iterator[GenerationChunk]:
        if parser.passthrough:
            yield from handle
            return handle.result_now
        ids: list[int] = []
        for chunk in handle:
            ids.extend(chunk.token_ids)
            for kind, text in parser.feed(chunk.text):
                yield GenerationChunk(text, ids, kind=kind)
                ids = []
        parsed, rest = parser.finish()
        for kind, text in rest:
            yield GenerationChunk(text, ids, kind=kind)
            ids = []
        return _with_parse(handle.result_now, parsed)

    # -- asyncio ------------------------------------------------------------------
    # Submitting (tokenizing, compiling a grammar) runs in a worker thread, so the event
    # loop never waits on it. Cancelling the awaiting task, or leaving an ``async for``
    # early, cancels the request and frees its slot within one scheduler step.

    async def _asubmit(self, prompt: str | list[int], params: GenerationParams, stream: bool) -> Handle:
        loop = asyncio.get_running_loop()
        return await asyncio.to_thread(self.engine.submit, prompt, params, stream, loop=loop)

    async def _achat(self, messages: Sequence[Mapping[str, Any]], params: GenerationParams | None, kw: Any) -> ChatSetup:
        return await asyncio.to_thread(lambda: self._setup(messages, params, kw))

    async def agenerate_text(self, prompt: str | list[int], params: GenerationParams | None = None, **kw: Any) -> GenerationResult:
        handle = await self._asubmit(prompt, self.params(params, **kw), stream=False)
        return await handle.aresult()

    async def agenerate_chat(self, messages: Sequence[Mapping[str, Any]], params: GenerationParams | None = None, **kw: Any) -> GenerationResult:
        setup = await self._achat(messages, params, kw)
        result = await (await self._asubmit(setup.prompt, setup.params, stream=False)).aresult()
        return _read(result, setup.parser())

    async def astream_text(self, prompt: str | list[int], params: GenerationParams | None = None, **kw: Any) -> AsyncIterator[GenerationChunk]:
        handle = await self._asubmit(prompt, self.params(params, **kw), stream=True)
        async for chunk in handle:
            yield chunk

    async def astream_chat(self, messages: Sequence[Mapping[str, Any]], params: GenerationParams | None = None, **kw: Any) -> AsyncIterator[GenerationChunk]:
        setup = await self._achat(messages, params, kw)
        handle = await self._asubmit(setup.prompt, setup.params, stream=True)
        parser = setup.parser()
        async for chunk in handle:
            if parser.passthrough:
                yield chunk
                continue
            for kind, text in parser.feed(chunk.text):
                yield GenerationChunk(text, chunk.token_ids, kind=kind)
        for kind, text in parser.finish()[1]:
            yield GenerationChunk(text, [], kind=kind)

    # -- embeddings -----------------------------------------------------------------

    def embed(self, texts: str | Sequence[str | list[int]], *, truncate: bool = False) -> Embeddings:
        """Unit-length (L2-normalised) mean-pooled embeddings, one per text (or token list).

        A text longer than the model's context is a ContextOverflow unless ``truncate``.
        Runs on a second context of the same weights, made on first use.
        """
        items = [texts] if isinstance(texts, str) else list(texts)
        t0 = time.perf_counter()
        vectors, counts = self.engine.embed(items, truncate=truncate)
        return Embeddings(vectors, counts, time.perf_counter() - t0)

    def count_tokens(self, text: str) -> int:
        return len(self.engine.tokenize(text))

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.engine.tokenize(text, add_special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.engine.detokenize(tokens)

    # -- lifetime -----------------------------------------------------------------

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Model({self.name!r}, n_ctx={self.plan.n_ctx}, n_gpu_layers={self.plan.n_gpu_layers})"


def _load_options(overrides: Mapping[str, Any]) -> LoadOptions:
    unknown = sorted(set(overrides) - set(LOAD_SETTINGS))
    if unknown:
        raise BadRequest(
            f"unknown load setting(s): {', '.join(unknown)} (known: {', '.join(LOAD_SETTINGS)})"
        )
    return LoadOptions(**{k: v for k, v in overrides.items() if v is not None})


# llama-cpp-python's Llama() arguments that code passes to load_model: those that change
# nothing here (hearth logs quietly; embeddings and per-request logits need no flag), and
# those that become a model default for every request.
_LLAMA_NO_OPS = frozenset({"verbose", "embedding", "logits_all", "no_perf", "offload_kqv", "vocab_only"})
_LLAMA_AS_DEFAULTS = {"seed": "seed", "last_n_tokens_size": "repeat_last_n"}
_GGML_KV_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0", 30: "bf16"}


def _llama_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    """Take llama-cpp-python's ``Llama(...)`` arguments out of ``kw``: returns the
    generation defaults they set; ``type_k``/``type_v`` become ``kv_type``."""
    defaults: dict[str, Any] = {}
    for name in _LLAMA_NO_OPS & set(kw):
        del kw[name]
    for name, field_name in _LLAMA_AS_DEFAULTS.items():
        if name in kw:
            value = kw.pop(name)
            if not (name == "seed" and value == -1):  # llama-cpp-python: -1 = random
                defaults[field_name] = value
    kinds = {kw.pop(k) for k in ("type_k", "type_v") if k in kw}
    if kinds:
        names = {_GGML_KV_TYPES.get(k, k) if isinstance(k, int) else k for k in kinds}
        if len(names) > 1:
            raise BadRequest(f"type_k and type_v must be the same here, got {sorted(map(str, names))}")
        kw.setdefault("kv_type", names.pop())
    return defaults


def _model_arg(model: Any, kw: dict[str, Any]) -> Any:
    """``model_path=`` is accepted as the name of the model argument (llama-cpp-python's)."""
    if "model_path" in kw:
        path = kw.pop("model_path")
        if model is not None:
            raise BadRequest("give the model once: positionally or as model_path=, not both")
        return path
    return model


def load_model(
    model: str | os.PathLike[str] | ResolvedModel | None = None,
    n_ctx: int | None = None,
    n_threads: int | None = None,
    n_gpu_layers: int | None = None,
    **overrides: Any,
) -> Model:
    """Load a model by path or known name, planned for this machine.

    Settings come from flags (these arguments) > environment > config file > planner.
    ``n_gpu_layers``: 0 = CPU only, -1 = all layers, None = as many as fit. ``n_threads``
    None = one per physical core. ``model_path=`` and llama-cpp-python's ``Llama()``
    arguments that make sense here (``seed``, ``type_k``/``type_v``, ``verbose``...) are
    accepted too.
    """
    model = _model_arg(model, overrides)
    own_defaults = _llama_kwargs(overrides)
    hosts, optional = overrides.pop("hosts", None), bool(overrides.pop("hosts_optional", False))
    cfg = load_config()
    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model if model is not None else cfg.model)
    info = inspect_model(resolved.path)
    hw = detect_hardware()
    # the model's own load defaults (an Ollama manifest's num_ctx) < config < arguments
    wishes = _load_options(resolved.load).merged(cfg.load_options()).merged(
        _load_options({"n_ctx": n_ctx, "n_threads": n_threads, "n_gpu_layers": n_gpu_layers, **overrides})
    )
    remote, workers = _workers(hosts if hosts is not None else cfg.hosts, optional)
    plan = plan_load(info, hw, wishes, remote=remote)
    if cfg.max_queue < 0:
        raise BadRequest(f"max_queue must be >= 0, got {cfg.max_queue}")
    return Model(resolved.name, info, plan, hw, max_queue=cfg.max_queue,
                 defaults={**(resolved.defaults or {}), **own_defaults}, system=resolved.system,
                 hosts=workers if plan.hosts else ())


def _workers(hosts: str | Sequence[str] | None, optional: bool = False) -> tuple[list[Any], list[str]]:
    """Other machines' devices for the planner (``hearth.rpc``), and the workers to add,
    in order (llama.cpp names their devices by the order they were added)."""
    from . import rpc

    endpoints = rpc.parse_hosts(hosts)
    if not endpoints:
        return [], []
    rpc.require("--hosts")
    log.info("asking %d worker(s) for their devices: %s", len(endpoints), ", ".join(endpoints))
    return rpc.remote_devices(endpoints, optional, warn=log.warning)


# A small cache so quick_* and name-based calls do not reload on every call.
_cache: dict[str, Model] = {}
_cache_lock = threading.Lock()


def _model(model: Model | str | os.PathLike[str] | None) -> Model:
    if isinstance(model, Model):
        return model
    key = os.fspath(model) if model is not None else ""
    with _cache_lock:
        m = _cache.get(key)
        if m is None:
            m = _cache[key] = load_model(model)
        return m


def generate_text(
    model: Model | str | os.PathLike[str] | None,
    prompt: str,
    max_tokens: int | None = UNSET,
    temperature: float = UNSET,
    stream: bool = False,
    **params: Any,
) -> GenerationResult | Iterator[GenerationChunk]:
    """Complete ``prompt``. With ``stream=True``, an iterator of GenerationChunk.
    Unset parameters come from the model's defaults, then the library's."""
    m = _model(model)
    p = GenerationParams.from_kwargs(max_tokens=max_tokens, temperature=temperature, **params)
    return m.stream_text(prompt, p) if stream else m.generate_text(prompt, p)


def generate_chat(
    model: Model | str | os.PathLike[str] | None,
    messages: Sequence[Mapping[str, Any]],
    max_tokens: int | None = UNSET,
    temperature: float = UNSET,
    stream: bool = False,
    **params: Any,
) -> GenerationResult | Iterator[GenerationChunk]:
    """Answer a conversation with the model's chat template."""
    m = _model(model)
    p = GenerationParams.from_kwargs(max_tokens=max_tokens, temperature=temperature, **params)
    return m.stream_chat(messages, p) if stream else m.generate_chat(messages, p)


def count_tokens(model: Model | str | os.PathLike[str] | None, text: str) -> int:
    return _model(model).count_tokens(text)


def quick_complete(prompt: str, **kw: Any) -> str:
    """Complete with the default model; returns the text."""
    return generate_text(None, prompt, **kw).text  # type: ignore[union-attr]


def quick_chat(messages: Sequence[Mapping[str, Any]] | str, **kw: Any) -> str:
    """Chat with the default model; a string is one user message. Returns the text."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return generate_chat(None, messages, **kw).text  # type: ignore[union-attr]


def get_model_info(model: Model | str | os.PathLike[str] | ResolvedModel | None = None, **kw: Any) -> ModelInfo:
    """Inspect a GGUF file (or known model) without loading its weights. A loaded
    ``Model`` gives its own. The result is a dataclass and a read-only mapping."""
    model = _model_arg(model, kw)
    if kw:
        raise BadRequest(f"get_model_info takes only the model, got {', '.join(sorted(kw))}")
    if isinstance(model, Model):
        return model.info
    return inspect_model(resolve_model(model).path)


def plan_model(model: Model | ModelInfo | str | os.PathLike[str] | ResolvedModel | None = None,
               **wishes: Any) -> LoadPlan:
    """The LoadPlan hearth would use for this model on this machine (a loaded ``Model``
    without wishes: the plan it was loaded with). A ``ModelInfo`` plans without a file:
    one built from the catalog's facts answers for a model not downloaded yet."""
    model = _model_arg(model, wishes)
    hosts, optional = wishes.pop("hosts", None), bool(wishes.pop("hosts_optional", False))
    cfg = load_config()
    if isinstance(model, ModelInfo):
        info, load = model, {}
    elif isinstance(model, Model):
        if not wishes:
            return model.plan
        info, load = model.info, {}
    else:
        resolved = resolve_model(model if model is not None else cfg.model)
        info, load = inspect_model(resolved.path), resolved.load
    opts = _load_options(load).merged(cfg.load_options()).merged(_load_options(wishes))
    remote, _ = _workers(hosts if hosts is not None else cfg.hosts, optional)
    return plan_load(info, detect_hardware(), opts, remote=remote)


def estimate_memory_usage(
    model: Model | str | os.PathLike[str] | None = None,
    n_ctx: int | None = None,
    **wishes: Any,
) -> MemoryEstimate:
    """Bytes of RAM and VRAM the model will use at ``n_ctx`` (default: the planned
    context). Also a mapping: ``model_size``, ``kv_cache``, ``compute``, ``total_ram``,
    ``total``, in bytes, and ``<name>_gb``."""
    model = _model_arg(model, wishes)
    plan = plan_model(model, **wishes)
    info = get_model_info(model)
    return estimate_memory(
        info,
        n_ctx or plan.n_ctx,
        n_gpu_layers=plan.n_gpu_layers,
        n_ubatch=plan.n_ubatch,
        kv_type=plan.kv_type,
        parallel=plan.parallel,
        swa_full=plan.swa_full,
        flash_attn=plan.flash_attn is not False,
    )


@dataclass
class BenchmarkResult(MappingView):
    """What ``benchmark_inference`` measured. Also a read-only mapping of ``to_dict()``,
    which adds the names other libraries use: ``tokens_per_second``,
    ``prompt_tokens_per_second``, ``time_to_first_token`` (seconds), ``memory_usage``
    (peak RSS, bytes), ``total_tokens`` (tokens generated) and ``per_prompt``."""

    model: str
    n_prompt: int
    n_gen: int
    repetitions: int
    n_threads: int
    n_gpu_layers: int
    pp_tokens_per_second: float
    tg_tokens_per_second: float
    pp_samples: list[float] = field(default_factory=list)
    tg_samples: list[float] = field(default_factory=list)
    ttft_seconds: float = 0.0
    load_seconds: float = 0.0
    peak_rss_bytes: int = 0
    prompts: list[dict[str, Any]] = field(default_factory=list)
    concurrency: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "synthetic"  # "synthetic" (n_prompt/n_gen, llama-bench style) or "prompts"
    concurrent: bool = False  # prompts ran side by side in the model's slots
    total_tokens: int = 0  # tokens generated, all runs together
    total_prompt_tokens: int = 0
    wall_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tg_tokens_per_second

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.pp_tokens_per_second

    @property
    def time_to_first_token(self) -> float:
        return self.ttft_seconds

    @property
    def memory_usage(self) -> int:
        return self.peak_rss_bytes

    @property
    def per_prompt(self) -> list[dict[str, Any]]:
        return self.prompts

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            tokens_per_second=self.tokens_per_second,
            prompt_tokens_per_second=self.prompt_tokens_per_second,
            time_to_first_token=self.time_to_first_token,
            memory_usage=self.memory_usage,
            memory_usage_gb=round(self.memory_usage / GiB, 3),
            per_prompt=d["prompts"],
        )
        return d


# greedy, no penalties: like llama-bench, measure the model, not the sampler
_GREEDY: dict[str, Any] = dict(temperature=0.0, repeat_penalty=1.0, ignore_eos=True)


def benchmark_concurrency(
    model: Model,
    levels: Sequence[int],
    *,
    n_prompt: int = 512,
    n_gen: int = 128,
    seed: int = 1234,
) -> list[dict[str, Any]]:
    """Aggregate throughput with ``c`` requests at once, llama-batched-bench style.

    For each level: a prompt phase (``c`` distinct random prompts submitted together,
    one token each: aggregate prompt tokens/s and mean ttft), then a generation phase
    (the same prompts again with ``n_gen`` tokens: each slot reuses its cached prompt,
    so this is ``c`` sequences generating side by side: aggregate generation tokens/s).
    """
    if max(levels) > model.plan.parallel:
        raise BadRequest(f"concurrency {max(levels)} exceeds the model's {model.plan.parallel} slots")
    need = n_prompt + n_gen + 1
    if need > model.plan.n_ctx_per_slot:
        raise BadRequest(f"{n_prompt} + {n_gen} tokens need n_ctx >= {need} per slot")
    rng = random.Random(seed)
    n_vocab = model.engine.n_vocab
    engine = model.engine
    out = []
    for c in levels:
        prompts = [[rng.randrange(n_vocab) for _ in range(n_prompt)] for _ in range(c)]
        t0 = time.perf_counter()
        first = model.params(max_tokens=1, **_GREEDY)
        handles = [engine.submit(p, first, stream=False) for p in prompts]
        pp = [h.result() for h in handles]
        t_pp = time.perf_counter() - t0
        t0 = time.perf_counter()
        gen = model.params(max_tokens=n_gen, **_GREEDY)
        handles = [engine.submit(p, gen, stream=False) for p in prompts]
        tg = [h.result() for h in handles]
        t_tg = time.perf_counter() - t0
        out.append({
            "concurrency": c,
            "pp_tokens_per_second": c * n_prompt / t_pp,
            "mean_ttft_seconds": statistics.fmean(r.timings.ttft for r in pp),
            "tg_tokens_per_second": sum(r.usage.completion_tokens for r in tg) / t_tg,
            "tg_seconds": t_tg,
            "cached_tokens": sum(r.usage.cached_tokens for r in tg),
        })
    return out


def benchmark_inference(
    model: Model | str | os.PathLike[str] | None = None,
    prompts: Sequence[str] | str | None = None,
    *,
    max_tokens: int | None = UNSET,
    concurrent: bool = True,
    n_prompt: int = 512,
    n_gen: int = 128,
    repetitions: int = 3,
    warmup: bool = True,
    seed: int = 1234,
    concurrency: Sequence[int] = (),
    **sampling: Any,
) -> BenchmarkResult:
    """Measure speed and memory.

    With ``prompts``: each prompt is generated for (``max_tokens``, default ``n_gen``;
    ``sampling`` as for ``generate_text``, seeded with ``seed``), all at once in the
    model's slots unless ``concurrent=False``. Reports one ``per_prompt`` entry each, and
    aggregates: generated tokens per second of wall time, prompt tokens per second of
    prefill, mean time to first token, peak RSS.

    Without (llama-bench style): pp is a prompt of ``n_prompt`` random tokens, timed to
    its first token; tg is ``n_gen`` tokens generated from a one-token prompt, end of
    stream ignored; greedy, ``repetitions`` times. ``concurrency`` adds aggregate
    throughput at those numbers of requests at once.
    """
    sampling_kw = dict(sampling)
    model = _model_arg(model, sampling_kw)
    t0 = time.perf_counter()
    m = _model(model)
    load_s = time.perf_counter() - t0
    if isinstance(prompts, str):
        prompts = [prompts]
    if prompts is not None:
        return _benchmark_prompts(m, list(prompts), load_s, max_tokens=n_gen if max_tokens is UNSET else max_tokens,
                                  concurrent=concurrent, warmup=warmup, seed=seed, sampling=sampling_kw)
    if sampling_kw or max_tokens is not UNSET:
        given = sorted([*sampling_kw, *(["max_tokens"] if max_tokens is not UNSET else [])])
        raise BadRequest(f"{', '.join(given)}: sampling settings apply only to benchmarks over prompts; "
                         "the synthetic benchmark is greedy, n_prompt/n_gen tokens")
    peak = process_rss()
    rng = random.Random(seed)
    n_vocab = m.engine.n_vocab
    greedy = _GREEDY
    if n_prompt >= m.plan.n_ctx_per_slot:
        raise BadRequest(f"n_prompt {n_prompt} does not fit the context ({m.plan.n_ctx_per_slot})")

    def pp_once() -> tuple[float, float]:
        toks = [rng.randrange(n_vocab) for _ in range(n_prompt)]
        r = m.generate_text(toks, max_tokens=1, **greedy)
        return n_prompt / r.timings.prompt_seconds, r.timings.ttft

    def tg_once() -> tuple[float, int]:
        # a fresh one-token prompt each time, so no cached prefix shortens the run
        r = m.generate_text([rng.randrange(n_vocab)], max_tokens=n_gen, **greedy)
        n = r.usage.completion_tokens
        return n / (r.timings.prompt_seconds + r.timings.generation_seconds), n

    t_start = time.perf_counter()
    if warmup:
        m.generate_text([rng.randrange(n_vocab) for _ in range(min(n_prompt, 32) or 1)], max_tokens=2, **greedy)
    pp, ttft, tg = [], [], []
    generated = 0
    for _ in range(repetitions):
        if n_prompt > 0:
            a, b = pp_once()
            pp.append(a)
            ttft.append(b)
        if n_gen > 0:
            speed, n = tg_once()
            tg.append(speed)
            generated += n
        peak = max(peak, process_rss())
    levels = benchmark_concurrency(m, concurrency, n_prompt=n_prompt, n_gen=n_gen, seed=seed) if concurrency else []
    peak = max(peak, process_rss())
    return BenchmarkResult(
        concurrency=levels,
        model=m.name,
        n_prompt=n_prompt,
        n_gen=n_gen,
        repetitions=repetitions,
        n_threads=m.plan.n_threads,
        n_gpu_layers=m.plan.n_gpu_layers,
        pp_tokens_per_second=statistics.fmean(pp) if pp else 0.0,
        tg_tokens_per_second=statistics.fmean(tg) if tg else 0.0,
        pp_samples=pp,
        tg_samples=tg,
        ttft_seconds=statistics.fmean(ttft) if ttft else 0.0,
        load_seconds=load_s,
        peak_rss_bytes=peak,
        total_tokens=generated,
        total_prompt_tokens=n_prompt * len(pp),
        wall_seconds=time.perf_counter() - t_start,
    )


def _union_seconds(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of [start, end) intervals: time when any was running."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _benchmark_prompts(m: Model, prompts: list[str], load_s: float, *, max_tokens: int | None, concurrent: bool,
                       warmup: bool, seed: int, sampling: dict[str, Any]) -> BenchmarkResult:
    if not prompts:
        raise BadRequest("benchmark_inference: prompts is empty")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise BadRequest(f"benchmark_inference: prompts must be strings (item {bad[0]} is "
                         f"{type(prompts[bad[0]]).__name__})")
    params = m.params(max_tokens=max_tokens, seed=seed, **sampling)  # validated before anything runs
    peak = process_rss()
    if warmup:  # random tokens, so no prompt finds itself already in the cache
        rng = random.Random(seed)
        m.generate_text([rng.randrange(m.engine.n_vocab) for _ in range(8)], max_tokens=2, **_GREEDY)
    workers = m.plan.parallel if concurrent else 1
    lock = threading.Lock()

    def one(prompt: str) -> tuple[float, GenerationResult]:
        nonlocal peak
        t_submit = time.perf_counter()
        r = m.generate_text(prompt, params)
        rss = process_rss()
        with lock:
            peak = max(peak, rss)
        return t_submit, r

    t_start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hearth-bench") as pool:
        runs = list(pool.map(one, prompts))
    wall = time.perf_counter() - t_start
    per_prompt = []
    prefill: list[tuple[float, float]] = []
    for prompt, (t_submit, r) in zip(prompts, runs):
        u, t = r.usage, r.timings
        prefill.append((t_submit + t.queue_seconds, t_submit + t.ttft))
        per_prompt.append({
            "prompt": prompt,
            "output": r.text,
            "finish_reason": r.finish_reason,
            "prompt_tokens": u.prompt_tokens,
            "cached_tokens": u.cached_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.completion_tokens,
            "time_to_first_token": t.ttft,
            "tokens_per_second": t.generation_tokens_per_second,
            "prompt_tokens_per_second": t.prompt_tokens_per_second,
            "queue_seconds": t.queue_seconds,
            "total_seconds": t.total_seconds,
        })
    generated = sum(r.usage.completion_tokens for _, r in runs)
    decoded = sum(r.usage.prompt_tokens - r.usage.cached_tokens for _, r in runs)
    prefill_s = _union_seconds(prefill)
    return BenchmarkResult(
        model=m.name,
        n_prompt=round(statistics.fmean(r.usage.prompt_tokens for _, r in runs)),
        n_gen=max_tokens or 0,
        repetitions=1,
        n_threads=m.plan.n_threads,
        n_gpu_layers=m.plan.n_gpu_layers,
        pp_tokens_per_second=decoded / prefill_s if prefill_s > 0 else 0.0,
        tg_tokens_per_second=generated / wall if wall > 0 else 0.0,
        ttft_seconds=statistics.fmean(r.timings.ttft for _, r in runs),
        load_seconds=load_s,
        peak_rss_bytes=max(peak, process_rss()),
        prompts=per_prompt,
        mode="prompts",
        concurrent=workers > 1,
        total_tokens=generated,
        total_prompt_tokens=sum(r.usage.prompt_tokens for _, r in runs),
        wall_seconds=wall,
    )
