"""The models a server holds: loaded on first use, once, off the event loop.

TODO(serving): keep-alive timers and eviction by memory fit (Ollama's sched.go);
today a model stays loaded until the server stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Mapping, TypeVar

from starlette.requests import Request

from ..api import Model, load_model
from ..engines.llamacpp.scheduler import RequestHandle
from ..errors import Cancelled
from ..store import resolve_model
from ..store.registry import KNOWN_MODELS
from ..types import GenerationChunk, GenerationConfig, GenerationResult

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    model: Model
    key: Path
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)


class ModelPool:
    """Requested model name or path -> loaded Model, one per file.

    Concurrent first requests for one model share one load: the load is a task per
    file, awaited through ``shield`` so a caller that goes away does not abort it.
    """

    def __init__(self, load_options: Mapping[str, Any] | None = None) -> None:
        self.load_options = dict(load_options or {})
        self._loaded: dict[Path, Loaded] = {}
        self._loading: dict[Path, asyncio.Task[Loaded]] = {}
        self._aliases: dict[str, tuple[Path, str]] = {}  # requested -> (file, what to load)

    async def get(self, name: str | None) -> tuple[Loaded, float]:
        """The loaded model, and the seconds this call spent loading it (0 if it was loaded)."""
        requested = name or ""
        alias = self._aliases.get(requested)
        if alias is None:
            resolved = await asyncio.to_thread(resolve_model, name or None)  # may assemble a file
            spec = resolved.name if resolved.source == "embedded" else os.fspath(resolved.path)
            alias = self._aliases[requested] = (resolved.path, spec)
        key, spec = alias
        entry = self._loaded.get(key)
        if entry is not None:
            entry.last_used = time.time()
            return entry, 0.0
        task = self._loading.get(key)
        if task is None:
            task = self._loading[key] = asyncio.ensure_future(self._load(key, spec))
        t0 = time.perf_counter()
        entry = await asyncio.shield(task)
        entry.last_used = time.time()
        return entry, time.perf_counter() - t0

    async def _load(self, key: Path, spec: str) -> Loaded:
        try:
            t0 = time.perf_counter()
            model = await asyncio.to_thread(load_model, spec, **self.load_options)
            entry = Loaded(model, key, time.perf_counter() - t0)
            self._loaded[key] = entry
            log.info("loaded %s in %.2fs (%r)", spec, entry.load_seconds, model)
            return entry
        finally:
            self._loading.pop(key, None)

    async def preload(self, names: list[str]) -> None:
        for name in names:
            await self.get(name)

    def loaded(self) -> list[Loaded]:
        return list(self._loaded.values())

    @staticmethod
    def installed_names() -> list[str]:
        """Known model names whose package is installed (checked without assembling files)."""
        import importlib.metadata as md

        out = []
        for canon, _find, pkg in {v[0]: v for v in KNOWN_MODELS.values()}.values():
            try:
                md.distribution(pkg)
            except md.PackageNotFoundError:
                continue
            out.append(canon)
        return out

    def close(self) -> None:
        for task in self._loading.values():
            task.cancel()
        for entry in self._loaded.values():
            try:
                entry.model.close()
            except Exception:  # pragma: no cover - best effort at shutdown
                log.exception("closing %s", entry.model.name)
        self._loaded.clear()


# -- running requests on a pooled model ------------------------------------------------
# Both APIs go through these: the engine's own handles, so a stream ends with the
# request's GenerationResult (usage, timings) and closing it cancels the request.


def submit_all(model: Model, jobs: list[tuple[str | list[int], GenerationConfig]]) -> list[RequestHandle]:
    """Queue every job now, so errors (context, busy) surface before a response starts."""
    handles: list[RequestHandle] = []
    try:
        for prompt, cfg in jobs:
            handles.append(model.submit(prompt, cfg, asynchronous=True))
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return handles


async def merge_streams(
    handles: list[RequestHandle],
) -> AsyncIterator[tuple[int, GenerationChunk | None, GenerationResult | None]]:
    """(index, chunk, None) as chunks arrive, then (index, None, result) as each ends.

    Leaving early (client gone) cancels every request still running.
    """
    if len(handles) == 1:  # the common case, without tasks
        h = handles[0]
        async for chunk in h:
            yield 0, chunk, None
        yield 0, None, h.request.result
        return
    q: asyncio.Queue[tuple[int, Any, Any]] = asyncio.Queue()

    async def pump(i: int, h: RequestHandle) -> None:
        try:
            async for chunk in h:
                q.put_nowait((i, chunk, None))
            q.put_nowait((i, None, h.request.result))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put_nowait((i, e, None))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            i, a, b = await q.get()
            if isinstance(a, BaseException):
                raise a
            if a is None:
                left -= 1
            yield i, a, b
    finally:
        for t in tasks:
            t.cancel()
        for h in handles:
            if h.request.result is None:
                h.cancel()


async def gather_results(handles: list[RequestHandle]) -> list[GenerationResult]:
    tasks = [asyncio.ensure_future(h.aresult()) for h in handles]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()  # no-op for finished ones; on failure or cancellation stops the rest


async def until_disconnected(request: Request, coro: Awaitable[T]) -> T:
    """Await ``coro``; if the client goes away first, cancel it (its slot is freed)."""
    work = asyncio.ensure_future(coro)

    async def watch() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
    if not work.done() or work.cancelled():
        raise Cancelled("the client disconnected")
    return work.result()
