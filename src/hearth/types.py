"""Data that crosses layers: what a caller asks for and what generation gives back."""

from __future__ import annotations

import math
from collections.abc import Iterator
from collections.abc import Mapping as MappingABC
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, Mapping

from .errors import BadRequest

FinishReason = Literal["stop", "length", "cancelled", "error"]

GiB = 1024**3


class MappingView(MappingABC):
    """A typed result that also reads as a read-only mapping of its ``to_dict()``:
    ``obj["key"]``, ``keys()``, ``dict(obj)`` and ``json.dumps(dict(obj))`` work, for code
    written against functions that return plain dicts. The attributes stay the typed API;
    the mapping is a JSON-ready view of them (nested values are plain dicts and lists)."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()


class _Unset:
    """A parameter nobody set: a later layer (model defaults, front-end defaults) decides."""

    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()

# for these, None is a value: no limit, a random seed, no grammar
_NONE_MEANS_SOMETHING = frozenset({"max_tokens", "seed", "grammar", "json_schema", "logprobs"})

# bounds that keep a request's cost in check before it reaches llama.cpp
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 1024
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
INT32_MAX = 2**31 - 1
MAX_SAMPLERS = 32  # entries in a `samplers` order

# llama.cpp's sampler names (common/sampling.cpp), in its default order, with their
# one-letter codes and the aliases llama-server accepts (case-insensitive)
DEFAULT_SAMPLERS = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature")
SAMPLER_CHARS = {"e": "penalties", "d": "dry", "s": "top_n_sigma", "k": "top_k", "y": "typ_p", "p": "top_p",
                 "m": "min_p", "x": "xtc", "t": "temperature"}
SAMPLER_NAMES = {
    **{n: n for n in DEFAULT_SAMPLERS},
    **{n.replace("_", "-"): n for n in DEFAULT_SAMPLERS if "_" in n},
    **{n.replace("_", ""): n for n in DEFAULT_SAMPLERS if "_" in n},
    "nucleus": "top_p", "temp": "temperature", "typ": "typ_p",
}


@dataclass
class GenerationParams:
    """How to generate: every front end builds one of these, and it knows which fields
    were set. ``resolve`` fills the rest from the model's own defaults, then the front
    end's (``FRONTEND_DEFAULTS``). Validated on construction; unknown names are refused.

    ``max_tokens=None`` means "until the context is full"; for the other fields ``None``
    is the same as not setting them.
    """

    max_tokens: int | None = UNSET
    temperature: float = UNSET
    top_k: int = UNSET
    top_p: float = UNSET
    min_p: float = UNSET
    repeat_penalty: float = UNSET
    presence_penalty: float = UNSET
    frequency_penalty: float = UNSET
    repeat_last_n: int = UNSET  # -1: the whole context
    seed: int | None = UNSET  # unset or None: a random seed per request
    stop: list[str] = UNSET
    logit_bias: dict[int, float] = UNSET
    grammar: str | None = UNSET  # GBNF
    json_schema: dict | str | None = UNSET  # converted to GBNF by the engine
    ignore_eos: bool = UNSET  # keep going past end-of-generation tokens (benchmarks)
    # the grammar applies lazily: from where one of these regexes (llama.cpp's trigger
    # patterns: the whole output so far must match; group 1 starts the constrained part)
    # first matches. Set by hearth for tool calls, not taken from clients.
    grammar_triggers: list[str] = UNSET
    # log probabilities of the generated tokens, with this many most likely alternatives
    # each (0..MAX_TOP_LOGPROBS); None: not computed (the default, and the fast path)
    logprobs: int | None = UNSET
    # llama-server's other samplers, same names and meanings (ENGINE_DEFAULTS: all off)
    typical_p: float = UNSET  # locally typical sampling; 1.0: off
    mirostat: int = UNSET  # 0 off, 1 Mirostat, 2 Mirostat 2.0 (replaces the samplers after temperature)
    mirostat_tau: float = UNSET
    mirostat_eta: float = UNSET
    xtc_probability: float = UNSET  # 0.0: off
    xtc_threshold: float = UNSET  # > 0.5: off
    dry_multiplier: float = UNSET  # 0.0: off
    dry_base: float = UNSET
    dry_allowed_length: int = UNSET
    dry_penalty_last_n: int = UNSET  # -1: the whole context, 0: off
    dry_sequence_breakers: list[str] = UNSET
    dynatemp_range: float = UNSET  # 0.0: off; else temperature +- range by entropy
    dynatemp_exponent: float = UNSET
    top_n_sigma: float = UNSET  # <= 0: off
    min_keep: int = UNSET  # the least candidates a truncating sampler leaves
    # the samplers' order: names (or llama.cpp's one-letter codes, as a string); stored as
    # canonical names, DEFAULT_SAMPLERS by default
    samplers: list[str] = UNSET

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name not in _NONE_MEANS_SOMETHING and getattr(self, f.name) is None:
                setattr(self, f.name, UNSET)
        self._validate()

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> GenerationParams:
        """Like the constructor, with a clear error naming unknown settings."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise BadRequest(
                f"unknown generation setting(s): {', '.join(unknown)} "
                f"(known: {', '.join(sorted(names))})"
            )
        return cls(**kwargs)

    def set_fields(self) -> dict[str, Any]:
        """The fields this object sets, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not UNSET}

    def is_set(self, name: str) -> bool:
        return getattr(self, name) is not UNSET

    def updated(self, **kwargs: Any) -> GenerationParams:
        """A copy with these fields set (validated)."""
        return replace(self, **kwargs)

    def resolve(self, *layers: GenerationParams | None) -> GenerationParams:
        """Each field from the first of (self, *layers) that sets it, else the engine's
        neutral default. Stop strings add up: a model's stops always apply."""
        out: dict[str, Any] = {}
        stops: list[str] = []
        for layer in (self, *layers, ENGINE_DEFAULTS):
            if layer is None:
                continue
            for name, value in layer.set_fields().items():
                if name == "stop":
                    stops.extend(value)
                else:
                    out.setdefault(name, value)
        out["stop"] = list(dict.fromkeys(stops))
        return GenerationParams(**out)

    @property
    def resolved(self) -> bool:
        return all(getattr(self, f.name) is not UNSET for f in fields(self))

    @property
    def greedy(self) -> bool:
        """Whether the sampler takes the most likely token (after logit bias, penalties, DRY
        and grammar), as llama.cpp's chain does: temperature 0 (without a dynamic range) or
        top_k 1 where they come in ``samplers``; with Mirostat, temperature 0. Typical and
        XTC may drop the top token before that, so with them it is never a plain argmax."""
        def get(name: str) -> Any:
            v = getattr(self, name)
            return getattr(ENGINE_DEFAULTS, name) if v is UNSET else v

        if get("mirostat"):
            return get("temperature") == 0.0
        if get("typical_p") < 1.0 or (get("xtc_probability") > 0.0 and get("xtc_threshold") <= 0.5):
            return False
        for name in get("samplers"):
            if name == "top_k" and get("top_k") == 1:
                return True
            if name == "temperature" and get("temperature") == 0.0 and not get("dynatemp_range") > 0.0:
                return True
        return False

    def to_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.set_fields().items()}

    # -- validation ---------------------------------------------------------------------

    def _validate(self) -> None:
        def num(name: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> None:
            v = getattr(self, name)
            if v is UNSET:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise BadRequest(f"{name} must be a finite number, got {v!r}")
            if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
                lo_s = "(" if lo_open else "["
                raise BadRequest(f"{name} must be in {lo_s}{lo}, {hi if hi is not None else 'inf'}], got {v}")
            setattr(self, name, float(v))

        def integer(name: str, lo: int, hi: int = INT32_MAX) -> None:
            v = getattr(self, name)
            if v is UNSET or (v is None and name in ("max_tokens",)):
                return
            if isinstance(v, float) and v.is_integer():
                v = int(v)
                setattr(self, name, v)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise BadRequest(f"{name} must be an integer in {lo}..{hi}, got {v!r}")

        integer("max_tokens", 0)
        num("temperature", 0.0)
        integer("top_k", 0)
        num("top_p", 0.0, 1.0, lo_open=True)
        num("min_p", 0.0, 1.0)
        num("repeat_penalty", 0.0, lo_open=True)
        num("presence_penalty", -2.0, 2.0)
        num("frequency_penalty", -2.0, 2.0)
        integer("repeat_last_n", -1)
        if self.logprobs is not None:
            integer("logprobs", 0, MAX_TOP_LOGPROBS)
        if self.seed is not UNSET and self.seed is not None:
            if isinstance(self.seed, float) and self.seed.is_integer():
                self.seed = int(self.seed)
            if isinstance(self.seed, bool) or not isinstance(self.seed, int):
                raise BadRequest(f"seed must be an integer, got {self.seed!r}")
            self.seed &= 0xFFFFFFFF  # llama.cpp's seeds are 32-bit (OpenAI clients send 64)
        if self.stop is not UNSET:
            stop = [self.stop] if isinstance(self.stop, str) else self.stop
            if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
                raise BadRequest("stop must be a string or a list of strings")
            stop = [s for s in stop if s]
            if len(stop) > MAX_STOP_STRINGS:
                raise BadRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
            if any(len(s) > MAX_STOP_LENGTH for s in stop):
                raise BadRequest(f"a stop string may be at most {MAX_STOP_LENGTH} characters")
            self.stop = stop
        if self.logit_bias is not UNSET:
            if not isinstance(self.logit_bias, Mapping):
                raise BadRequest("logit_bias must be a map of token id to bias")
            bias: dict[int, float] = {}
            for k, v in self.logit_bias.items():
                try:
                    tok = int(k)
                except (TypeError, ValueError):
                    raise BadRequest(f"logit_bias keys must be token ids, got {k!r}") from None
                if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                    raise BadRequest(f"logit_bias[{k}] must be a number, got {v!r}")
                if tok < 0:
                    raise BadRequest(f"logit_bias token id {tok} is negative")
                bias[tok] = float(v)
            self.logit_bias = bias
        num("typical_p", 0.0, 1.0)
        integer("mirostat", 0, 2)
        num("mirostat_tau", 0.0)
        num("mirostat_eta", 0.0)
        num("xtc_probability", 0.0, 1.0)
        num("xtc_threshold", 0.0, 1.0)
        num("dry_multiplier", 0.0)
        num("dry_base", 1.0)
        integer("dry_allowed_length", 0)
        integer("dry_penalty_last_n", -1)
        num("dynatemp_range", 0.0)
        num("dynatemp_exponent", 0.0)
        num("top_n_sigma")
        integer("min_keep", 0)
        if self.dry_sequence_breakers is not UNSET:
            br = self.dry_sequence_breakers
            if not isinstance(br, (list, tuple)) or not br or not all(isinstance(b, str) and b for b in br):
                raise BadRequest("dry_sequence_breakers must be a non-empty list of non-empty strings")
            if len(br) > MAX_STOP_STRINGS:
                raise BadRequest(f"at most {MAX_STOP_STRINGS} dry_sequence_breakers, got {len(br)}")
            if any(len(b) > MAX_STOP_LENGTH for b in br):
                raise BadRequest(f"a dry_sequence_breakers entry may be at most {MAX_STOP_LENGTH} characters")
            self.dry_sequence_breakers = list(br)
        if self.samplers is not UNSET:
            self.samplers = sampler_order(self.samplers)
        if self.grammar and not isinstance(self.grammar, str):
            raise BadRequest("grammar must be a string (GBNF)")
        if self.json_schema is not UNSET and self.json_schema is not None and not isinstance(
            self.json_schema, (dict, str)
        ):
            raise BadRequest("json_schema must be a JSON object (or its text)")
        if self.grammar and self.json_schema is not UNSET and self.json_schema is not None:
            raise BadRequest("give either grammar or json_schema, not both")
        if self.ignore_eos is not UNSET and not isinstance(self.ignore_eos, bool):
            raise BadRequest(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if self.grammar_triggers is not UNSET:
            if not isinstance(self.grammar_triggers, list) or not all(
                isinstance(t, str) and 0 < len(t) <= MAX_STOP_LENGTH for t in self.grammar_triggers
            ) or len(self.grammar_triggers) > MAX_STOP_STRINGS:
                raise BadRequest("grammar_triggers must be a short list of regular expressions")


def sampler_order(value: Any) -> list[str]:
    """llama-server's ``samplers``: a list of names or a string of one-letter codes ->
    canonical names. Unknown entries are refused (llama-server skips them with a warning)."""
    if isinstance(value, str):
        if len(value) > MAX_SAMPLERS:
            raise BadRequest(f"samplers: at most {MAX_SAMPLERS} entries, got {len(value)}")
        bad = [c for c in value if c not in SAMPLER_CHARS]
        if bad:
            known = ", ".join(f"{c} ({n})" for c, n in SAMPLER_CHARS.items())
            raise BadRequest(f"samplers: unknown sampler code {bad[0]!r} (known: {known})")
        return [SAMPLER_CHARS[c] for c in value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(n, str) for n in value):
        raise BadRequest("samplers must be a list of sampler names or a string of sampler codes")
    if len(value) > MAX_SAMPLERS:
        raise BadRequest(f"samplers: at most {MAX_SAMPLERS} entries, got {len(value)}")
    out = []
    for n in value:
        canon = SAMPLER_NAMES.get(n.lower())
        if canon is None:
            raise BadRequest(f"samplers: unknown sampler {n[:64]!r} (known: {', '.join(DEFAULT_SAMPLERS)})")
        out.append(canon)
    return out


# The one table of defaults per front end: what a field is when neither the request nor
# the model's own defaults (an Ollama manifest, the GGUF's general.sampling.*) set it.
# ENGINE_DEFAULTS are llama.cpp's common defaults (what llama-server uses), under all.
ENGINE_DEFAULTS = GenerationParams(
    max_tokens=None, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0,
    presence_penalty=0.0, frequency_penalty=0.0, repeat_last_n=64, seed=None, stop=[],
    logit_bias={}, grammar=None, json_schema=None, ignore_eos=False, grammar_triggers=[], logprobs=None,
    typical_p=1.0, mirostat=0, mirostat_tau=5.0, mirostat_eta=0.1, xtc_probability=0.0, xtc_threshold=0.1,
    dry_multiplier=0.0, dry_base=1.75, dry_allowed_length=2, dry_penalty_last_n=64,
    dry_sequence_breakers=["\n", ":", "\"", "*"], dynatemp_range=0.0, dynatemp_exponent=1.0, top_n_sigma=-1.0,
    min_keep=0, samplers=list(DEFAULT_SAMPLERS),
)

FRONTEND_DEFAULTS: dict[str, GenerationParams] = {
    # the library and the CLI: short answers by default, Ollama's repeat penalty (small
    # models loop without one)
    "library": GenerationParams(max_tokens=256, repeat_penalty=1.1),
    # `hearth run` and `hearth chat`, in process or through the daemon
    "cli": GenerationParams(max_tokens=512, repeat_penalty=1.1),
    # /v1/*: OpenAI's semantics (no penalty nobody asked for, no length cap on chat),
    # llama-server's sampling defaults, so the same request gives llama-server's answer
    "openai": GenerationParams(),
    # /v1/messages: as /v1/chat/completions (llama-server's sampling; max_tokens is required there)
    "anthropic": GenerationParams(),
    # /v1/completions: OpenAI's legacy default of 16 tokens
    "openai-completions": GenerationParams(max_tokens=16),
    # /api/*: Ollama's documented defaults (docs/modelfile.md)
    "ollama": GenerationParams(top_p=0.9, min_p=0.0, repeat_penalty=1.1, repeat_last_n=64),
}


def frontend_defaults(name: str) -> GenerationParams:
    try:
        return FRONTEND_DEFAULTS[name]
    except KeyError:
        raise BadRequest(f"unknown front end {name!r} (known: {', '.join(FRONTEND_DEFAULTS)})") from None


def resolve_params(
    request: GenerationParams | None,
    model_defaults: GenerationParams | None,
    frontend: str = "library",
) -> GenerationParams:
    """The one place a request's parameters are decided:
    request > the model's own defaults > the front end's defaults > llama.cpp's."""
    req = request if request is not None else GenerationParams()
    return req.resolve(model_defaults, frontend_defaults(frontend))



@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass
class Timings:
    ttft: float = 0.0  # seconds from submission to the first generated token
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    queue_seconds: float = 0.0
    prompt_tokens_per_second: float = 0.0
    generation_tokens_per_second: float = 0.0
    total_seconds: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in asdict(self).items()}


class _Text(str):
    """A str that is also a dataclass: it prints, compares, hashes, concatenates and
    JSON-encodes as its ``text``, and carries the other fields as attributes."""

    def __new__(cls, text: str = "", *args: Any, **kwargs: Any) -> Any:
        return super().__new__(cls, text)

    def __repr__(self) -> str:
        return str.__repr__(self)


@dataclass(eq=False, repr=False)
class GenerationChunk(_Text):
    """One piece of a stream: new text (possibly empty) and the tokens behind it.
    It is a ``str`` of its text, so ``print(chunk, end="")`` prints the text."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    kind: str = "content"  # "content", or "reasoning" (a chat model's thinking)
    # with GenerationParams.logprobs: one entry per token in token_ids, each
    # {"id", "token", "bytes", "logprob", "top_logprobs": [{"id", "token", "bytes", "logprob"}]}
    logprobs: list[dict[str, Any]] | None = None


@dataclass(eq=False, repr=False)
class GenerationResult(_Text):
    """What a generation returns. It is a ``str`` of the generated text (``print``,
    ``+``, ``in``, ``len``, f-strings and ``json.dumps`` see the text) that also carries
    ``.text``, ``.finish_reason``, ``.usage``, ``.timings``, ``.token_ids`` and ``.model``."""

    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    token_ids: list[int] = field(default_factory=list)
    model: str = ""
    stop_sequence: str | None = None  # the stop string that ended it, if one did
    logprobs: list[dict[str, Any]] | None = None  # with GenerationParams.logprobs: one entry per token
    # chat: the model's thinking, split off the text; the tool calls it made (tools.ToolCall)
    reasoning: str = ""
    tool_calls: list[Any] = field(default_factory=list)
    slot: int = -1  # the engine slot that ran it (llama-server's id_slot); -1 unknown

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "text" and "text" in self.__dict__ and value != self.__dict__["text"]:
            raise AttributeError("a GenerationResult's text is its str value and cannot change; "
                                 "use dataclasses.replace(result, text=...)")
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": self.usage.to_dict(),
            "timings": self.timings.to_dict(),
            **({"reasoning": self.reasoning} if self.reasoning else {}),
            **({"tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in self.tool_calls]}
               if self.tool_calls else {}),
        }


# Kept for code written against 0.1: the same type.
GenerationConfig = GenerationParams
