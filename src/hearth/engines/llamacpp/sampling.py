"""Resolved GenerationParams -> a llama.cpp native sampler chain, one per request.

The chain runs in C on the context's logits (``llama_sampler_sample``): no per-token
copy of the logits into Python. It is built as llama.cpp's ``common_sampler_init`` builds
llama-server's: logit bias, then ``params.samplers`` in order (by default penalties -> DRY
-> top-n-sigma -> top_k -> typical -> top_p -> min_p -> XTC -> temperature), then dist;
with Mirostat, logit bias -> temperature -> mirostat (v1 or v2) instead. Samplers that are
off are left out (each is a no-op in llama.cpp too). The grammar goes after the leading
penalties/DRY (they commute with it), before anything that truncates. When the request is
greedy (``GenerationParams.greedy``) the chain ends at the greedy sampler instead.

Plain greedy (no bias, penalties, DRY or grammar) skips the chain: ``llama_sampler_sample``
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


def _active(p: GenerationParams, name: str) -> bool:
    """Whether sampler ``name`` of llama.cpp's chain changes anything with these values."""
    if name == "penalties":
        return p.repeat_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)
    if name == "dry":
        return p.dry_multiplier > 0.0 and p.dry_penalty_last_n != 0
    if name == "top_n_sigma":
        return p.top_n_sigma > 0.0
    if name == "top_k":
        return p.top_k > 0
    if name == "typ_p":
        return p.typical_p < 1.0
    if name == "top_p":
        return p.top_p < 1.0
    if name == "min_p":
        return p.min_p > 0.0
    if name == "xtc":
        return p.xtc_probability > 0.0 and p.xtc_threshold <= 0.5
    return name == "temperature"


def _steps(p: GenerationParams) -> list[str]:
    """The samplers the chain runs between the logit bias and the final pick."""
    if p.mirostat:
        return [] if p.greedy else ["temperature"]
    steps: list[str] = []
    for name in p.samplers:
        if p.greedy:  # up to the sampler that leaves one token; only the logit changers matter
            if (name == "top_k" and p.top_k == 1) or (
                name == "temperature" and p.temperature == 0.0 and not p.dynatemp_range > 0.0
            ):
                break
            if name not in ("penalties", "dry"):
                continue
        if _active(p, name):
            steps.append(name)
    return steps


class Sampler:
    """An owned llama.cpp sampler chain. Free it with ``close()``."""

    def __init__(self, model: LlamaModel, params: GenerationParams) -> None:
        if not params.resolved:
            raise BadRequest("generation parameters must be resolved before sampling (types.resolve_params)")
        self.params = params
        self.seed = params.seed if params.seed is not None else random.getrandbits(32)
        self._chain = None
        # the chain's penalties and DRY samplers, with how many tokens each remembers: they
        # also see the prompt, as llama-server feeds it to its whole chain
        self._history: list[tuple[object, int]] = []
        self._argmax_vocab = 0
        self._steps = _steps(params)
        if params.greedy and not params.logit_bias and not params.grammar and (
            params.json_schema is None
        ) and not self._steps:
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
        grammar = p.grammar
        if p.json_schema is not None:
            grammar = schema_to_grammar(p.json_schema)  # bounded and checked
        elif grammar:
            check_grammar(grammar)
        steps = self._steps
        # the grammar after the leading penalties and DRY (they change logits token by token,
        # so the order between them does not matter), before any sampler that truncates
        at = next((i for i, name in enumerate(steps) if name not in ("penalties", "dry")), len(steps))
        for name in steps[:at]:
            self._add_step(model, p, name)
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
        seed = self.seed & 0xFFFFFFFF
        if p.mirostat == 1:
            self._add(ll.llama_sampler_init_temp(p.temperature))
            self._add(ll.llama_sampler_init_mirostat(n_vocab, seed, p.mirostat_tau, p.mirostat_eta, 100))
            return
        if p.mirostat == 2:
            self._add(ll.llama_sampler_init_temp(p.temperature))
            self._add(ll.llama_sampler_init_mirostat_v2(seed, p.mirostat_tau, p.mirostat_eta))
            return
        for name in steps[at:]:
            self._add_step(model, p, name)
        self._add(ll.llama_sampler_init_dist(seed))

    def _add_step(self, model: LlamaModel, p: GenerationParams, name: str) -> None:
        """One of llama.cpp's common samplers, with llama-server's arguments."""
        min_keep = p.min_keep
        if name == "penalties":
            last_n = model.n_ctx_seq if p.repeat_last_n == -1 else p.repeat_last_n
            smpl = ll.llama_sampler_init_penalties(
                model.n_vocab, last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
            )
            self._history.append((smpl, last_n))
        elif name == "dry":
            last_n = model.n_ctx_seq if p.dry_penalty_last_n == -1 else p.dry_penalty_last_n
            breakers = [b.encode() for b in p.dry_sequence_breakers]
            arr = (ctypes.c_char_p * len(breakers))(*breakers)
            with _quiet_stderr():  # llama.cpp warns about breakers it truncates
                smpl = ll.llama_sampler_init_dry(model.vocab, p.dry_multiplier, p.dry_base, p.dry_allowed_length,
                                                 last_n, arr, len(breakers))
            self._history.append((smpl, last_n))
        elif name == "top_n_sigma":
            smpl = ll.llama_sampler_init_top_n_sigma(p.top_n_sigma)
        elif name == "top_k":
            smpl = ll.llama_sampler_init_top_k(p.top_k)
        elif name == "typ_p":
            smpl = ll.llama_sampler_init_typical(p.typical_p, min_keep)
        elif name == "top_p":  # min_keep 0 and 1 keep the same tokens here
            smpl = ll.llama_sampler_init_top_p(p.top_p, max(min_keep, 1))
        elif name == "min_p":
            smpl = ll.llama_sampler_init_min_p(p.min_p, max(min_keep, 1))
        elif name == "xtc":
            smpl = ll.llama_sampler_init_xtc(p.xtc_probability, p.xtc_threshold, min_keep, self.seed & 0xFFFFFFFF)
        elif name == "temperature":
            if p.dynatemp_range > 0.0:
                smpl = ll.llama_sampler_init_temp_ext(p.temperature, p.dynatemp_range, p.dynatemp_exponent)
            else:
                smpl = ll.llama_sampler_init_temp(p.temperature)
        else:  # pragma: no cover - GenerationParams refuses other names
            raise BadRequest(f"unknown sampler {name!r}")
        self._add(smpl)

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
        """Let the penalties and DRY see the prompt, as llama.cpp's server does (the grammar
        does not: it constrains only what is generated). Each remembers its last n tokens."""
        for smpl, last_n in self._history:
            if last_n != 0:
                for t in tokens[-last_n:] if last_n > 0 else tokens:
                    ll.llama_sampler_accept(smpl, t)

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
