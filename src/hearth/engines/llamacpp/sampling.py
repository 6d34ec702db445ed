"""Resolved GenerationParams -> a llama.cpp native sampler chain, one per request.

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
import ctypes
import logging
import os
import random
import sys
import threading
from typing import TYPE_CHECKING

import llama_cpp as ll
import numpy as np

from ...errors import BadRequest
from ...grammar import check_grammar, schema_to_grammar
from ...types import GenerationParams

if TYPE_CHECKING:
    from .model import LlamaModel


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

    def __init__(self, model: LlamaModel, params: GenerationParams) -> None:
        if not params.resolved:
            raise BadRequest("generation parameters must be resolved before sampling (types.resolve_params)")
        self.params = params
        self.seed = params.seed if params.seed is not None else random.getrandbits(32)
        self._chain = None
        self._penalties = None  # the chain's penalties sampler: it also sees the prompt
        self._argmax_vocab = 0
        if params.greedy and not params.logit_bias and not params.grammar and (
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

    def _build(self, model: LlamaModel, p: GenerationParams) -> None:
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
            self._penalties = ll.llama_sampler_init_penalties(
                n_vocab, last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
            )
            self._penalties_last_n = last_n
            self._add(self._penalties)
        grammar = p.grammar
        if p.json_schema is not None:
            grammar = schema_to_grammar(p.json_schema)  # bounded and checked
        elif grammar:
            check_grammar(grammar)
        if grammar:
            with _quiet_stderr():  # llama.cpp's grammar parser prints errors to fd 2
                if p.grammar_triggers:  # lazy: free text until a trigger matches
                    pats = [t.encode() for t in p.grammar_triggers]
                    arr = (ctypes.c_char_p * len(pats))(*pats)
                    g = ll.llama_sampler_init_grammar_lazy_patterns(
                        model.vocab, grammar.encode(), b"root", arr, len(pats), None, 0)
                else:
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

    def accept_prompt(self, tokens: list[int]) -> None:
        """Let the penalties see the prompt, as llama.cpp's server does (the grammar
        does not: it constrains only what is generated)."""
        if self._penalties is not None and self._penalties_last_n != 0:
            for t in tokens[-self._penalties_last_n :] if self._penalties_last_n > 0 else tokens:
                ll.llama_sampler_accept(self._penalties, t)

    def close(self) -> None:
        if self._chain is not None:
            ll.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self) -> None:  # pragma: no cover - safety net
        try:
            self.close()
        except Exception:
            pass


__all__ = ["Sampler"]
