"""SamplingParams -> a llama.cpp native sampler chain, one per request.

The chain runs in C on the context's logits (``llama_sampler_sample``): no per-token
copy of the logits into Python. Order follows llama.cpp's common defaults:
logit bias -> penalties -> grammar -> top_k -> top_p -> min_p -> temperature -> dist
(greedy when temperature is 0).

Plain greedy (no bias, penalties or grammar) skips the chain: ``llama_sampler_sample``
fills a candidate array of the whole vocabulary on every call (262k entries for
Gemma 3, ~0.25 ms a token), while an argmax over a zero-copy NumPy view of the same
logits row takes ~15 us and picks the same token (the first maximum, as llama.cpp's
greedy sampler does).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import llama_cpp as ll
import numpy as np

from ...errors import BadRequest

if TYPE_CHECKING:
    from .model import LlamaModel


@dataclass
class SamplingParams:
    """Per-request sampling settings; validated on construction."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_last_n: int = 64
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None  # GBNF
    json_schema: dict | str | None = None  # converted to GBNF

    def __post_init__(self) -> None:
        def num(name: str, v: object) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise BadRequest(f"{name} must be a number, got {v!r}")
            return float(v)

        if num("temperature", self.temperature) < 0:
            raise BadRequest(f"temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise BadRequest(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0.0 < num("top_p", self.top_p) <= 1.0:
            raise BadRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= num("min_p", self.min_p) <= 1.0:
            raise BadRequest(f"min_p must be in [0, 1], got {self.min_p}")
        if num("repeat_penalty", self.repeat_penalty) <= 0:
            raise BadRequest(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if not -2.0 <= num("presence_penalty", self.presence_penalty) <= 2.0:
            raise BadRequest(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= num("frequency_penalty", self.frequency_penalty) <= 2.0:
            raise BadRequest(
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"
            )
        if not isinstance(self.repeat_last_n, int) or self.repeat_last_n < -1:
            raise BadRequest(f"repeat_last_n must be an integer >= -1, got {self.repeat_last_n!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise BadRequest(f"seed must be an integer, got {self.seed!r}")
        bias: dict[int, float] = {}
        for k, v in dict(self.logit_bias or {}).items():
            try:
                tok = int(k)
            except (TypeError, ValueError):
                raise BadRequest(f"logit_bias keys must be token ids, got {k!r}") from None
            bias[tok] = num(f"logit_bias[{k}]", v)
        self.logit_bias = bias
        if self.grammar is not None and self.json_schema is not None:
            raise BadRequest("give either grammar or json_schema, not both")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def json_schema_to_grammar(schema: dict | str) -> str:
    import json

    from llama_cpp.llama_grammar import json_schema_to_gbnf

    text = schema if isinstance(schema, str) else json.dumps(schema)
    try:
        return json_schema_to_gbnf(text)
    except Exception as e:  # the converter raises assorted errors
        raise BadRequest(f"invalid JSON schema: {e}") from None


# Any JSON value; used for response_format json_object / format: "json".
JSON_GRAMMAR = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws     ::= | " " | "\n" [ \t]{0,20}
"""


_stderr_lock = threading.Lock()


@contextlib.contextmanager
def _quiet_stderr():
    """Silence fd 2 for a moment, unless llama.cpp's log was asked for."""
    if logging.getLogger("hearth.llama_cpp").isEnabledFor(logging.ERROR):
        yield
        return
    with _stderr_lock:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):
            yield
            return
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class Sampler:
    """An owned llama.cpp sampler chain. Free it with ``close()``."""

    def __init__(self, model: LlamaModel, params: SamplingParams) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else random.getrandbits(32)
        self._chain = None
        self._argmax_vocab = 0
        if params.greedy and not params.logit_bias and params.grammar is None and (
            params.json_schema is None
        ) and params.repeat_penalty == 1.0 and not params.presence_penalty and not (
            params.frequency_penalty
        ):
            self._argmax_vocab = model.n_vocab
            return
        chain_params = ll.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        chain = ll.llama_sampler_chain_init(chain_params)
        self._chain = chain
        try:
            self._build(model, params)
        except BaseException:
            self.close()
            raise

    def _add(self, smpl: object) -> None:
        ll.llama_sampler_chain_add(self._chain, smpl)

    def _build(self, model: LlamaModel, p: SamplingParams) -> None:
        n_vocab = model.n_vocab
        if p.logit_bias:
            bad = [t for t in p.logit_bias if not 0 <= t < n_vocab]
            if bad:
                raise BadRequest(f"logit_bias token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})")
            arr = (ll.llama_logit_bias * len(p.logit_bias))()
            for i, (tok, b) in enumerate(p.logit_bias.items()):
                arr[i].token = tok
                arr[i].bias = b
            self._add(ll.llama_sampler_init_logit_bias(n_vocab, len(p.logit_bias), arr))
        if p.repeat_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            last_n = model.n_ctx_seq if p.repeat_last_n == -1 else p.repeat_last_n
            self._add(
                ll.llama_sampler_init_penalties(
                    n_vocab, last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
                )
            )
        grammar = p.grammar
        if p.json_schema is not None:
            grammar = json_schema_to_grammar(p.json_schema)
        if grammar is not None:
            with _quiet_stderr():  # llama.cpp's grammar parser prints errors to fd 2
                g = ll.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
            if not g:
                raise BadRequest("invalid grammar: llama.cpp could not parse it (see -v for details)")
            self._add(g)
        if p.greedy:
            self._add(ll.llama_sampler_init_greedy())
            return
        if p.top_k > 0:
            self._add(ll.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1.0:
            self._add(ll.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0.0:
            self._add(ll.llama_sampler_init_min_p(p.min_p, 1))
        self._add(ll.llama_sampler_init_temp(p.temperature))
        self._add(ll.llama_sampler_init_dist(self.seed & 0xFFFFFFFF))

    def sample(self, ctx: object, idx: int) -> int:
        """Sample (and accept) a token from output ``idx`` of the last decode."""
        if self._argmax_vocab:
            row = ll.llama_get_logits_ith(ctx, idx)
            return int(np.ctypeslib.as_array(row, shape=(self._argmax_vocab,)).argmax())
        return ll.llama_sampler_sample(self._chain, ctx, idx)

    def accept(self, token: int) -> None:
        if self._chain is not None:
            ll.llama_sampler_accept(self._chain, token)

    def close(self) -> None:
        if self._chain is not None:
            ll.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self) -> None:  # pragma: no cover - safety net
        try:
            self.close()
        except Exception:
            pass


__all__ = ["SamplingParams", "Sampler", "JSON_GRAMMAR", "json_schema_to_grammar"]
