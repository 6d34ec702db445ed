"""The llama.cpp engine: a LlamaModel, its chat template, and the one scheduler."""

from __future__ import annotations

import asyncio
import math
from typing import Any, Iterator, Mapping, Sequence

from ...chat import ChatTemplate, template_for
from ...errors import BadRequest, ContextOverflow
from ...gguf import ModelInfo
from ...planner import LoadPlan
from ...types import GenerationChunk, GenerationParams, GenerationResult
from ..base import EngineStats, async_notify
from .model import LlamaModel
from .sampling import Sampler
from .scheduler import Request, RequestHandle, Scheduler


class LlamaCppEngine:
    name = "llama.cpp"

    def __init__(self, info: ModelInfo, plan: LoadPlan, model_name: str = "", max_queue: int = 64) -> None:
        self.info = info
        self.plan = plan
        self.model_name = model_name or info.path.name
        self.model = LlamaModel(info, plan)
        try:
            self.scheduler = Scheduler(self.model, max_queue=max_queue)
        except BaseException:
            self.model.close()
            raise
        self.template: ChatTemplate = template_for(info.chat_template, info.architecture)
        self._bos_text = self.model.token_text(self.model.bos) if self.model.bos >= 0 else ""
        self._eos_text = self.model.token_text(self.model.eos) if self.model.eos >= 0 else ""

    # -- text <-> tokens ------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise BadRequest("text must be a string")
        tokens = self.model.tokenize(text, add_special=add_special, parse_special=parse_special)
        bos = self.model.bos
        if len(tokens) >= 2 and tokens[0] == bos and tokens[1] == bos:
            tokens = tokens[1:]  # a template that writes its own BOS
        return tokens

    def detokenize(self, tokens: list[int]) -> str:
        return self.model.detokenize(tokens)

    def token_piece(self, token: int, special: bool = True) -> bytes:
        if not 0 <= token < self.model.n_vocab:
            raise BadRequest(f"token id {token} is outside the vocabulary (0..{self.model.n_vocab - 1})")
        return self.model.special_piece(token) if special else self.model.token_bytes(token)

    @property
    def add_bos(self) -> bool:
        return self.model.add_bos

    @property
    def special_texts(self) -> dict[str, str]:
        """The BOS and EOS tokens' text ("" where the model has none)."""
        return {"bos": self._bos_text, "eos": self._eos_text}

    def fim_tokens(self) -> dict[str, int]:
        return self.model.fim_tokens()

    def slot_states(self) -> list[dict[str, Any]]:
        return self.scheduler.slot_states()

    @property
    def chat_template(self) -> ChatTemplate:
        return self.template

    def use_chat_template(self, template: ChatTemplate) -> None:
        self.template = template

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
                    extra: Mapping[str, Any] | None = None) -> tuple[str, list[str]]:
        text = self.template.render(messages, bos_token=self._bos_text, eos_token=self._eos_text,
                                    tools=tools, extra=extra)
        return text, list(self.template.stop)

    # -- generation -----------------------------------------------------------------

    def submit(
        self,
        prompt: str | list[int],
        params: GenerationParams,
        stream: bool = True,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> RequestHandle:
        """Queue a request (tokenizing it and compiling its grammar in this thread).
        With ``loop``, the handle wakes that loop on each event, for ``async for``."""
        if not params.resolved:  # a caller that skipped resolve_params gets llama.cpp's defaults
            params = params.resolve()
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if any((not isinstance(t, int)) or t < 0 or t >= self.model.n_vocab for t in tokens):
            raise BadRequest(f"prompt token ids must be in 0..{self.model.n_vocab - 1}")
        if params.ignore_eos:  # as llama-server: end-of-generation tokens are never sampled
            ban = dict.fromkeys(self.model.eog_tokens, -math.inf)
            params = params.updated(logit_bias={**params.logit_bias, **ban})
        req = Request(
            prompt_tokens=tokens,
            params=params,
            sampler=Sampler(self.model, params),
            max_tokens=params.max_tokens,
            stop=list(params.stop),
            model_name=self.model_name,
            ignore_eos=params.ignore_eos,
            stream=stream,
        )
        wake = None
        if loop is not None:
            wake, req.notify = async_notify(loop)
        try:
            return self.scheduler.submit(req, wake)
        except BaseException:
            req.sampler.close()
            raise

    def stream(self, prompt: str | list[int], params: GenerationParams) -> Iterator[GenerationChunk]:
        handle = self.submit(prompt, params)
        yield from handle
        return handle.request.result

    def generate(self, prompt: str | list[int], params: GenerationParams) -> GenerationResult:
        return self.submit(prompt, params, stream=False).result()

    # -- embeddings -----------------------------------------------------------------

    def embed(self, inputs: Sequence[str | list[int]], truncate: bool = False) -> tuple[list[list[float]], list[int]]:
        """Unit-length mean-pooled vectors and each input's token count.

        An input longer than the context is refused (``truncate``: cut to fit).
        """
        if not inputs:
            raise BadRequest("input must not be empty")
        limit = self.plan.n_ctx
        token_lists: list[list[int]] = []
        for i, x in enumerate(inputs):
            tokens = self.tokenize(x) if isinstance(x, str) else list(x)
            if not tokens:
                raise BadRequest(f"input {i} is empty")
            if any((not isinstance(t, int)) or t < 0 or t >= self.model.n_vocab for t in tokens):
                raise BadRequest(f"input {i}: token ids must be in 0..{self.model.n_vocab - 1}")
            if len(tokens) > limit:
                if not truncate:
                    raise ContextOverflow(
                        f"input {i} has {len(tokens)} tokens but the context holds {limit}; "
                        f"shorten it or raise n_ctx"
                    )
                tokens = tokens[:limit]
            token_lists.append(tokens)
        return self.model.embed(token_lists), [len(t) for t in token_lists]

    @property
    def n_embd(self) -> int:
        return self.model.n_embd

    @property
    def n_vocab(self) -> int:
        return self.model.n_vocab

    @property
    def n_ctx_per_slot(self) -> int:
        return self.scheduler.n_ctx_seq

    def stats(self) -> EngineStats:
        return EngineStats(len(self.scheduler.slots), self.scheduler.active, self.scheduler.queue_depth)

    def close(self) -> None:
        self.scheduler.close()
        self.model.close()
