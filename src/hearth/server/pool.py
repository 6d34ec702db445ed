"""The models a server holds: loaded on first use, once, off the event loop; unloaded
when idle past their keep-alive, or to make room for another (Ollama's sched.go).

Every request holds a ``Lease`` on its model from lookup until its response is sent;
a leased (or generating) model is never unloaded. Each model has a keep-alive: the
server default (``keep_alive`` setting, 5 minutes), forever for the models loaded at
startup, or what the last request that named one asked for (Ollama's ``keep_alive``:
``"5m"``, ``30``, ``0`` = unload after this request, negative = forever). A model's
``expires_at`` is its last release plus its keep-alive; a background task unloads
expired idle models. Before a load, if the planner's memory estimate for the new
model does not fit in available RAM, idle models are unloaded, least recently used
first, until it does (or none is left to unload).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..api import Model, load_model, plan_model
from ..engines.llamacpp.scheduler import RequestHandle
from ..errors import BadRequest, Cancelled, DoesNotFit, HearthError
from ..store import resolve_model
from ..types import GenerationChunk, GenerationConfig, GenerationResult

T = TypeVar("T")

log = logging.getLogger(__name__)

DEFAULT_KEEP_ALIVE = 300.0
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_keep_alive(value: str | int | float | None) -> float | None:
    """Seconds a model stays loaded when idle; ``None`` means forever.

    Numbers are seconds; strings are a number of seconds or a Go duration
    (``"30s"``, ``"5m"``, ``"1h30m"``); negative means forever, 0 unload at once.
    """
    if isinstance(value, bool) or value is None:
        raise BadRequest(f"keep_alive must be a duration or a number of seconds, got {value!r}")
    if isinstance(value, (int, float)):
        if math.isnan(value):
            raise BadRequest("keep_alive must not be NaN")
        return None if value < 0 else float(value)
    text = str(value).strip()
    try:
        seconds = float(text)
    except ValueError:
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        parts = _DURATION.findall(body)
        if not body or "".join(a + u for a, u in parts) != body:
            raise BadRequest(
                f"keep_alive {value!r} is not a duration (like 30s, 5m, 1h) or a number of seconds"
            ) from None
        seconds = sign * sum(float(a) * _UNITS[u] for a, u in parts)
    return None if seconds < 0 else seconds


def _available_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


@dataclass
class Loaded:
    model: Model
    key: Path
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    keep_alive: float | None = DEFAULT_KEEP_ALIVE  # seconds idle before unloading; None: never
    expires_at: float | None = None  # time.time() after which an idle model is unloaded
    leases: int = 0  # requests using it now

    @property
    def memory_bytes(self) -> int:
        mem = self.model.plan.memory
        return mem.ram + mem.vram

    def touch(self) -> None:
        self.last_used = time.time()
        self.expires_at = None if self.keep_alive is None else self.last_used + self.keep_alive

    def busy(self) -> bool:
        scheduler = self.model.engine.scheduler
        return self.leases > 0 or scheduler.active > 0 or scheduler.queue_depth > 0


class Lease:
    """A request's hold on a loaded model; ``release()`` (idempotent) when its response is done.

    Requests submitted through the lease are reported to the pool's ``on_result``
    (metrics) on release.
    """

    def __init__(self, pool: ModelPool, entry: Loaded, load_seconds: float) -> None:
        self.pool = pool
        self.entry = entry
        self.load_seconds = load_seconds
        self.handles: list[RequestHandle] = []
        self._released = False

    @property
    def model(self) -> Model:
        return self.entry.model

    def submit(self, jobs: list[tuple[str | list[int], GenerationConfig]]) -> list[RequestHandle]:
        handles = submit_all(self.entry.model, jobs)
        self.handles.extend(handles)
        return handles

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.pool._release(self)


class LeasedStream(StreamingResponse):
    """A streaming response that releases its lease when it ends, however it ends
    (even if the client leaves before the body starts)."""

    def __init__(self, lease: Lease, content: Any, **kw: Any) -> None:
        super().__init__(content, **kw)
        self.lease = lease

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.lease.release()


class ModelPool:
    """Requested model name or path -> loaded Model, one per file.

    Concurrent first requests for one model share one load: the load is a task per
    file, awaited through ``shield`` so a caller that goes away does not abort it.
    """

    def __init__(
        self,
        load_options: Mapping[str, Any] | None = None,
        keep_alive: str | int | float | None = None,
        available_ram: Callable[[], int] | None = None,
    ) -> None:
        self.load_options = dict(load_options or {})
        if keep_alive is None:
            from ..config import load_config

            keep_alive = getattr(load_config(), "keep_alive", None)
        self.keep_alive = DEFAULT_KEEP_ALIVE if keep_alive is None else parse_keep_alive(keep_alive)
        self.available_ram = available_ram or _available_ram
        self.on_result: Callable[[str, GenerationResult], None] | None = None  # metrics hooks
        self.on_embed: Callable[[str, int], None] | None = None  # (model, prompt tokens)
        self._loaded: dict[Path, Loaded] = {}
        self._loading: dict[Path, asyncio.Task[Loaded]] = {}
        self._waiters: dict[Path, int] = {}  # requests awaiting a load: it must not be unloaded under them
        self._aliases: dict[str, tuple[Path, str]] = {}  # requested -> (file, what to load)
        self._reaper: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._unloading: set[asyncio.Future[Any]] = set()
        self._closed = False

    async def acquire(self, name: str | None, keep_alive: str | int | float | None = None) -> Lease:
        """Lease the model (loading it if needed); ``keep_alive``, if given, becomes its keep-alive."""
        ka = parse_keep_alive(keep_alive) if keep_alive is not None else ...
        self._start_reaper()
        requested = name or ""
        alias = self._aliases.get(requested)
        if alias is None:
            # a server never starts a multi-gigabyte pull inside a request: that is `models pull`
            resolved = await asyncio.to_thread(resolve_model, name or None, pull=False)  # may assemble a file
            spec = os.fspath(resolved.path) if resolved.source == "local" else resolved.name
            alias = self._aliases[requested] = (resolved.path, spec)
        key, spec = alias
        entry = self._loaded.get(key)
        waited = 0.0
        if entry is None:
            task = self._loading.get(key)
            if task is None:
                task = self._loading[key] = asyncio.ensure_future(self._load(key, spec))
            t0 = time.perf_counter()
            self._waiters[key] = self._waiters.get(key, 0) + 1
            try:
                entry = await asyncio.shield(task)
            finally:
                self._waiters[key] -= 1
                if not self._waiters[key]:
                    del self._waiters[key]
            waited = time.perf_counter() - t0
        entry.leases += 1
        if ka is not ...:
            entry.keep_alive = ka
        entry.touch()
        return Lease(self, entry, waited)

    async def get(self, name: str | None) -> tuple[Loaded, float]:
        """The loaded model, and the seconds this call spent loading it (0 if it was loaded).
        Holds no lease: for a quick look, not for running requests."""
        lease = await self.acquire(name)
        lease.release()
        return lease.entry, lease.load_seconds

    def _release(self, lease: Lease) -> None:
        entry = lease.entry
        entry.leases -= 1
        if self.on_result is not None:
            for h in lease.handles:
                if h.request.result is not None:
                    try:
                        self.on_result(entry.model.name, h.request.result)
                    except Exception:  # pragma: no cover - metrics must not fail a request
                        log.exception("on_result hook failed")
        entry.touch()
        if entry.keep_alive == 0 and not entry.busy():
            self._unload(entry, "keep_alive 0")  # now, so the next look already sees it gone
        elif self._wake is not None:
            self._wake.set()

    async def _load(self, key: Path, spec: str) -> Loaded:
        try:
            await self._make_room(spec)
            t0 = time.perf_counter()
            model = await asyncio.to_thread(load_model, spec, **self.load_options)
            entry = Loaded(model, key, time.perf_counter() - t0, keep_alive=self.keep_alive)
            entry.touch()
            self._loaded[key] = entry
            log.info("loaded %s in %.2fs (%r)", spec, entry.load_seconds, model)
            return entry
        finally:
            self._loading.pop(key, None)

    async def _make_room(self, spec: str) -> None:
        """Unload idle models, least recently used first, until the new one's planned
        RAM fits in what is available (or nothing idle is left)."""
        while True:
            idle = [e for e in self._loaded.values() if not e.busy() and not self._waiters.get(e.key)]
            if not idle:
                return
            try:
                plan = await asyncio.to_thread(plan_model, spec, **self.load_options)
                need = plan.memory.ram
            except DoesNotFit:
                need = None  # perhaps it fits once others are gone
            except HearthError:
                return  # the load itself will report it
            available = await asyncio.to_thread(self.available_ram)
            if need is not None and need <= available:
                return
            victim = min(idle, key=lambda e: e.last_used)
            log.info("unloading %s to make room for %s (needs %s bytes, %s available)",
                     victim.model.name, spec, need, available)
            await self._unload(victim, "memory")

    def _unload(self, entry: Loaded, why: str) -> asyncio.Future[Any]:
        """Take the model out of the pool now; free it in a thread (awaitable)."""
        if self._loaded.get(entry.key) is entry:
            del self._loaded[entry.key]
        log.info("unloading %s (%s)", entry.model.name, why)
        fut = asyncio.ensure_future(asyncio.to_thread(entry.model.close))
        self._unloading.add(fut)
        fut.add_done_callback(self._unloading.discard)
        return fut

    def _start_reaper(self) -> None:
        if self._reaper is None and not self._closed:
            self._wake = asyncio.Event()
            self._reaper = asyncio.ensure_future(self._reap())

    async def _reap(self) -> None:
        """Unload expired idle models; sleep until the next expiry or a release."""
        assert self._wake is not None
        while not self._closed:
            self._wake.clear()
            now = time.time()
            wait = 60.0
            for e in list(self._loaded.values()):
                if e.expires_at is None:
                    continue
                if e.busy() or self._waiters.get(e.key):
                    wait = min(wait, 0.5)  # re-check: it may go idle without a release
                elif e.expires_at <= now:
                    self._unload(e, "keep-alive expired")
                else:
                    wait = min(wait, e.expires_at - now)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(wait, 0.01))
            except asyncio.TimeoutError:
                pass

    async def preload(self, names: list[str]) -> None:
        """Load the startup models; they stay loaded (keep-alive forever) unless a
        request says otherwise."""
        for name in names:
            (await self.acquire(name, keep_alive=-1)).release()

    async def forget(self, name: str) -> None:
        """A model was deleted: unload it (once its running requests finish) and drop
        the names that pointed at it."""
        key = name.strip().lower()
        for entry in list(self._loaded.values()):
            if entry.model.name.lower() != key:
                continue
            if entry.busy():
                entry.keep_alive = 0  # unloads when its last lease is released
            else:
                await self._unload(entry, "deleted")
            self._aliases = {k: v for k, v in self._aliases.items() if v[0] != entry.key}
        self._aliases.pop(name, None)

    def loaded(self) -> list[Loaded]:
        return list(self._loaded.values())

    @staticmethod
    def installed_names() -> list[str]:
        """Models that can run without a download: embedded, pulled, in the Ollama store."""
        from ..store.registry import installed

        return [m.name for m in installed(details=False)]  # the caller reads what it shows

    def close(self) -> None:
        self._closed = True
        reaper = self._reaper
        if reaper is not None and not reaper.done():
            try:
                reaper.get_loop().call_soon_threadsafe(reaper.cancel)
            except RuntimeError:  # the loop is closed already
                pass
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


async def with_lease(pool: ModelPool, model: str | None, handler: Callable[[Lease], Awaitable[Any]],
                     keep_alive: Any = None) -> Any:
    """Lease ``model`` for ``handler(lease)``'s whole response: a streamed response
    (LeasedStream) releases the lease when it ends, anything else right away."""
    lease = await pool.acquire(model, keep_alive)
    try:
        response = await handler(lease)
    except BaseException:
        lease.release()
        raise
    if not isinstance(response, LeasedStream):
        lease.release()
    return response
