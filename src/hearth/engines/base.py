"""The engine boundary: everything a front end (library, server, pool, metrics, CLI,
bench) may use of a loaded model. Nothing outside ``engines/`` imports below this file.

An engine takes *resolved* ``GenerationParams`` (``types.resolve_params``): deciding
defaults is the front ends' business, running them is the engine's.
"""

from __future__ import annotations

import asyncio
import queue
import contextvars
import os
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Mapping, Protocol, Sequence, runtime_checkable

from ..chat import ChatTemplate
from ..gguf import ModelInfo, detect_format
from ..planner import LoadPlan
from ..types import GenerationChunk, GenerationParams, GenerationResult


@runtime_checkable
class Handle(Protocol):
    """One submitted request. Iterate it (or ``async for`` it, when submitted with a
    loop) for chunks; ``result()``/``aresult()`` wait for the final GenerationResult
    and raise the request's error; ``cancel()`` frees its slot within one step."""

    @property
    def result_now(self) -> GenerationResult | None:
        """The final result once the request has ended, else None."""
        ...

    def __iter__(self) -> Iterator[GenerationChunk]: ...

    def __aiter__(self) -> AsyncIterator[GenerationChunk]: ...

    def result(self) -> GenerationResult: ...

    async def aresult(self) -> GenerationResult: ...

    def cancel(self) -> None: ...


END_OF_STREAM = object()  # the last item on a handle's event queue


def async_notify(loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Event, Any]:
    """An asyncio.Event (awaited on ``loop``) and a thread-safe callback that sets it
    from another thread (the engine's)."""
    event = asyncio.Event()
    return event, lambda: loop.call_soon_threadsafe(event.set)


class QueuedHandle:
    """The Handle behaviour shared by the engines: chunks arrive on ``_events`` (a
    thread-safe queue) until ``END_OF_STREAM``; ``_wake`` (from ``async_notify``) wakes
    ``async for``. Subclasses give ``_events``, ``_wake``, ``result_now``,
    ``_error_now()`` and ``cancel()``; leaving an iteration early cancels the request."""

    _events: Any
    _wake: asyncio.Event | None = None
    _finished: bool = False  # the consumer saw the end

    @property
    def result_now(self) -> GenerationResult | None:  # pragma: no cover - subclasses
        raise NotImplementedError

    def _error_now(self) -> BaseException | None:  # pragma: no cover - subclasses
        raise NotImplementedError

    def cancel(self) -> None:  # pragma: no cover - subclasses
        raise NotImplementedError

    def _done(self, item: object) -> bool:
        """True at the end of the stream; raises the request's error if it failed."""
        if item is not END_OF_STREAM:
            return False
        self._finished = True
        error = self._error_now()
        if error is not None:
            raise error
        return True

    def __iter__(self) -> Iterator[GenerationChunk]:
        try:
            while not self._finished:
                item = self._events.get()
                if self._done(item):
                    return
                yield item
        finally:
            if not self._finished:  # the caller stopped early (break, exception, close)
                self.cancel()

    def result(self) -> GenerationResult:
        for _ in self:
            pass
        assert self.result_now is not None
        return self.result_now

    async def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        wake = self._wake
        if wake is None:
            raise RuntimeError("submit(..., loop=...) is needed for async iteration")
        try:
            while not self._finished:
                try:
                    item = self._events.get_nowait()
                except queue.Empty:
                    wake.clear()
                    if self._events.empty():
                        await wake.wait()
                    continue
                if self._done(item):
                    return
                yield item
        finally:
            if not self._finished:  # break, aclose() or task cancellation
                self.cancel()

    async def aresult(self) -> GenerationResult:
        async for _ in self:
            pass
        assert self.result_now is not None
        return self.result_now


@dataclass(frozen=True)
class EngineStats:
    slots: int  # requests that can generate at once
    active: int  # slots generating now
    queued: int  # requests waiting for a slot


@runtime_checkable
class Engine(Protocol):
    """A loaded model that can generate. One instance serves many threads at once."""

    name: str

    @property
    def n_vocab(self) -> int: ...

    @property
    def n_embd(self) -> int: ...

    @property
    def n_ctx_per_slot(self) -> int: ...

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]: ...

    def detokenize(self, tokens: list[int]) -> str: ...

    def token_piece(self, token: int, special: bool = True) -> bytes:
        """One token's bytes; ``special``: control tokens written out (``<|im_end|>``)."""
        ...

    @property
    def add_bos(self) -> bool:
        """Whether tokenizing with specials puts a BOS first."""
        ...

    @property
    def special_texts(self) -> dict[str, str]:
        """{"bos": ..., "eos": ...}: those tokens' text."""
        ...

    def fim_tokens(self) -> dict[str, int]:
        """Fill-in-the-middle token ids by role: pre, suf, mid (all three, or FIM is not
        possible), rep, sep, pad."""
        ...

    def slot_states(self) -> list[dict[str, Any]]:
        """Each slot's state in llama-server's ``/slots`` shape."""
        ...

    @property
    def chat_template(self) -> ChatTemplate: ...

    def use_chat_template(self, template: ChatTemplate) -> None:
        """Render chats with this template from now on, instead of the model's own
        (``--chat-template``)."""
        ...

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
                    extra: Mapping[str, Any] | None = None) -> tuple[str, list[str]]:
        """Prompt text for these messages (``tools`` and ``extra`` template variables
        passed on) and the stop strings the template implies."""
        ...

    def submit(
        self,
        prompt: str | list[int],
        params: GenerationParams,
        stream: bool = True,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Handle:
        """Queue a request. Tokenizing and compiling its grammar happen here, in the
        caller's thread: the server calls it from a worker, never on its event loop.
        With ``loop``, the handle wakes that loop on each event (``async for``)."""
        ...

    def embed(self, inputs: Sequence[str | list[int]], truncate: bool = False) -> tuple[list[list[float]], list[int]]:
        """Unit-length mean-pooled vectors and each input's token count."""
        ...

    def stats(self) -> EngineStats: ...

    def close(self) -> None: ...


def select_engine(path: str | os.PathLike[str]) -> str:
    """The engine that runs this model file: today only 'llama.cpp' for GGUF."""
    fmt = detect_format(path)
    return {"gguf": "llama.cpp"}[fmt]


# Whether load_engine runs models in a child process when its caller does not say: set
# around a load by a front end that cannot pass ``isolate`` through (the server's pool).
isolation: contextvars.ContextVar[bool] = contextvars.ContextVar("hearth_isolation", default=False)


def load_engine(info: ModelInfo, plan: LoadPlan, model_name: str = "", max_queue: int = 64, *,
                isolate: bool | None = None, hosts: Sequence[str] = ()) -> Engine:
    """Load the model file with the engine that runs its format.

    ``isolate``: run it in a child process of its own (``engines/subprocess.py``), so
    that its death (llama.cpp aborts when an RPC worker is lost) costs this model only;
    None: as ``isolation`` says. ``hosts`` (RPC workers, ``host:port``; else the plan's
    own ``hosts``, if it has any) are added in that child before the load, and always
    mean a child process.
    """
    engine = select_engine(info.path)
    hosts = list(hosts or getattr(plan, "hosts", None) or ())
    if isolate is None:
        isolate = isolation.get()
    if engine == "llama.cpp":
        if isolate or hosts:
            from .subprocess import ProcessEngine

            return ProcessEngine(info, plan, model_name=model_name, max_queue=max_queue, hosts=hosts)
        from .llamacpp import LlamaCppEngine

        return LlamaCppEngine(info, plan, model_name=model_name, max_queue=max_queue)
    raise AssertionError(engine)  # pragma: no cover - select_engine raises first


__all__ = ["END_OF_STREAM", "Engine", "EngineStats", "Handle", "QueuedHandle", "async_notify", "detect_format", "isolation", "load_engine", "select_engine"]
