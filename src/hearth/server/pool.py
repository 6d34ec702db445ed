"""The models a server holds: loaded on first use, once, off the event loop; unloaded
when idle past their keep-alive, or to make room for another (Ollama's sched.go).

Every request holds a ``Lease`` on its model from lookup until its response is sent;
a leased (or generating) model is never unloaded. Each model has a keep-alive: the
server default (``keep_alive`` setting, 5 minutes), forever for the models loaded at
startup, or what the last request that named one asked for (Ollama's ``keep_alive``:
``"5m"``, ``30``, ``0`` = unload after this request, negative = forever). A model's
``expires_at`` is its last release plus its keep-alive; a background task unloads
expired idle models. Loads happen one at a time. Before a load, if the planner's
memory estimate for the new model does not fit in available RAM (and free VRAM),
idle models are unloaded, least recently used first, until it does (or none is left
to unload).

Names: every id the server lists (``/v1/models``, ``/api/tags``, ``/api/ps``) names a
pool entry. A model served from a path answers to its alias (``serve --alias``), its
file name, its stem and its path; any name is resolved once to the real file, and the
pool holds one entry per file (device and inode), however it was named.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Sequence, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..api import Model, ModelDefaults, load_model, plan_model
from ..chat import ChatTemplate
from ..engines.base import Handle
from ..errors import BadRequest, Cancelled, DoesNotFit, EngineError, HearthError, ModelChanged, ModelNotFound
from ..store import ResolvedModel, resolve_model
from ..types import GenerationChunk, GenerationParams, GenerationResult
from . import work

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


def _free_vram() -> int:
    from ..hardware import detect_hardware

    hw = detect_hardware()
    return hw.free_vram


FileKey = tuple[int, int]  # (st_dev, st_ino) of the real file


def _looks_like_path(name: str) -> bool:
    """Absolute, relative (./ ../ ~) or a .gguf file name; Ollama and hf.co names are not."""
    n = name.strip()
    return n.startswith(("/", ".", "~", "\\")) or n.lower().endswith(".gguf") or "\x00" in n


def _later_split_part(name: str) -> bool:
    m = re.search(r"-(\d{5})-of-\d{5}\.gguf$", name, re.I)
    return bool(m) and int(m.group(1)) > 1


def file_key(path: Path) -> FileKey:
    st = os.stat(path)  # follows symlinks: the file itself
    return (st.st_dev, st.st_ino)


@dataclass(frozen=True)
class Target:
    """What a requested model name resolves to: the file and how to load it."""

    key: FileKey
    model: ResolvedModel  # its ``name`` is the name the server shows

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def path(self) -> Path:
        return self.model.path


@dataclass
class Loaded:
    model: Model
    key: FileKey
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    keep_alive: float | None = DEFAULT_KEEP_ALIVE  # seconds idle before unloading; None: never
    expires_at: float | None = None  # time.time() after which an idle model is unloaded
    leases: int = 0  # requests using it now
    stamp: tuple[int, int] | None = None  # (size, mtime_ns) of the file when it was loaded
    changed: str | None = None  # why the file no longer matches what was loaded

    def check_file(self) -> str | None:
        """Has the loaded file been changed in place (truncated, rewritten)? Its pages are
        mapped: reading a truncated part kills the process with SIGBUS. A file deleted
        or replaced by a new one is harmless to the mapping and not reported."""
        if self.changed is None and self.stamp is not None:
            try:
                st = os.stat(self.model.info.path)
            except OSError:
                return None  # deleted: the mapping keeps the old pages
            if (st.st_dev, st.st_ino) == self.key and (st.st_size, st.st_mtime_ns) != self.stamp:
                self.changed = (f"{self.model.info.path} changed on disk while loaded "
                                f"(size {self.stamp[0]} -> {st.st_size})")
        return self.changed

    @property
    def memory_bytes(self) -> int:
        mem = self.model.plan.memory
        return mem.ram + mem.vram

    def touch(self) -> None:
        self.last_used = time.time()
        self.expires_at = None if self.keep_alive is None else self.last_used + self.keep_alive

    def busy(self) -> bool:
        st = self.model.engine.stats()
        return self.leases > 0 or st.active > 0 or st.queued > 0


class Lease:
    """A request's hold on a loaded model; ``release()`` (idempotent) when its response is done.

    Requests submitted through the lease are reported to the pool's ``on_result``
    (metrics) on release.
    """

    def __init__(self, pool: ModelPool, entry: Loaded, load_seconds: float, target: Target) -> None:
        self.pool = pool
        self.entry = entry
        self.load_seconds = load_seconds
        self.target = target
        self.handles: list[Handle] = []
        self._released = False

    @property
    def model(self) -> Model:
        return self.entry.model

    @property
    def name(self) -> str:
        """The name the request reached the model by (its alias, an Ollama name, ...)."""
        return self.target.name

    @property
    def defaults(self) -> ModelDefaults:
        """That name's defaults: an Ollama model's parameters and system prompt apply to
        its requests even when another name loaded the same file."""
        return self.entry.model.defaults_for(self.target.model.defaults, self.target.model.system)

    def submit(self, jobs: list[tuple[str | list[int], GenerationParams]],
               loop: asyncio.AbstractEventLoop) -> list[Handle]:
        """Queue every job (resolved params), from a worker thread: tokenizing and
        grammar compilation happen here. Errors surface before a response starts."""
        handles = submit_all(self.entry.model, jobs, loop)
        self.handles.extend(handles)
        return handles

    async def asubmit(self, jobs: list[tuple[str | list[int], GenerationParams]]) -> list[Handle]:
        return await work.cpu(self.submit, jobs, asyncio.get_running_loop())

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
    """Requested model name -> loaded Model, one per file.

    Concurrent first requests for one model share one load: the load is a task per
    file, awaited through ``shield`` so a caller that goes away does not abort it.
    """

    def __init__(
        self,
        load_options: Mapping[str, Any] | None = None,
        keep_alive: str | int | float | None = None,
        available_ram: Callable[[], int] | None = None,
        free_vram: Callable[[], int] | None = None,
        models_dirs: Sequence[str | os.PathLike[str]] = (),
        chat_template: str | None = None,
        max_loaded_models: int | None = None,
    ) -> None:
        self.load_options = dict(load_options or {})
        # each model in a child process of its own (engines/subprocess.py): its death costs
        # that model, not the server
        self.isolate = bool(self.load_options.pop("isolate", False))
        # the only directories whose files a client may name by path or file name
        self.models_dirs = [Path(os.path.realpath(os.path.expanduser(d))) for d in models_dirs]
        if keep_alive is None or max_loaded_models is None:
            from ..config import load_config

            cfg = load_config()
            keep_alive = getattr(cfg, "keep_alive", None) if keep_alive is None else keep_alive
            max_loaded_models = cfg.max_loaded_models if max_loaded_models is None else max_loaded_models
        self.keep_alive = DEFAULT_KEEP_ALIVE if keep_alive is None else parse_keep_alive(keep_alive)
        # at most this many models loaded, idle ones unloaded (LRU) to make room; 0/None: memory decides
        self.max_loaded_models = max_loaded_models or None
        # --chat-template: every model renders with this instead of its own (checked now, at startup)
        self.chat_template: ChatTemplate | None = None
        if chat_template:
            from ..chat_templates import as_template, resolve_chat_template

            # a built-in name (llama.cpp's: chatml, llama3, ...) or Jinja text, checked now
            self.chat_template = as_template(resolve_chat_template(chat_template, "chat_template"))
        self.available_ram = available_ram or _available_ram
        self.free_vram = free_vram or _free_vram
        self.on_result: Callable[[str, GenerationResult], None] | None = None  # metrics hooks
        self.on_embed: Callable[[str, int], None] | None = None  # (model, prompt tokens)
        self._loaded: dict[FileKey, Loaded] = {}
        self._loading: dict[FileKey, asyncio.Task[Loaded]] = {}
        self._waiters: dict[FileKey, int] = {}  # requests awaiting a load: it must not be unloaded under them
        self._names: dict[str, Target] = {}  # a name a client may send (lower case) -> its target
        self._served: list[Target] = []  # the models given at startup, in order (the first is the default)
        self._load_lock: asyncio.Lock | None = None  # made on the loop: one load at a time
        self._reaper: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._unloading: set[asyncio.Future[Any]] = set()
        self._closed = False

    # -- names ------------------------------------------------------------------------

    def _remember(self, target: Target, *names: str) -> None:
        for n in (target.name, *names):
            if n:
                self._names[n.strip().lower()] = target

    async def serve(self, spec: str | None, alias: str | None = None) -> Target:
        """Add a startup model: the default for requests that name none (the first), and
        listed by its alias, else its name (a file's name for a path)."""
        target = await self.target(spec, trusted=True)
        if alias:
            target = Target(target.key, dataclasses.replace(target.model, name=alias))
        path = target.path
        self._remember(target, str(path), path.name, path.stem, *([spec] if spec else []))
        self._served.append(target)
        return target

    async def target(self, name: str | None, *, trusted: bool = False) -> Target:
        """Resolve a requested name (off the event loop); None or "" is the default model.
        ``trusted`` (the operator's startup models) may name any path."""
        if not name or not name.strip():
            if self._served:
                return self._served[0]
            name = None
        key = name.strip().lower() if name else ""
        hit = self._names.get(key) if key else None
        if hit is not None:
            return hit
        if trusted:
            resolved = await work.disk(resolve_model, name, pull=False)
        else:
            resolved = await work.disk(self.resolve_untrusted, name)
        try:
            fkey = await work.disk(file_key, resolved.path)
        except OSError as e:
            raise ModelNotFound(f"{resolved.name}: its file is gone ({e.strerror or e})") from None
        # one loaded model per file; the target keeps this name's own defaults and system
        target = Target(fkey, resolved)
        if key:
            self._names[key] = target
        return target

    def resolve_untrusted(self, name: str | None) -> ResolvedModel:
        """A name from a client: a model the store knows (embedded, pulled, Ollama's, the
        catalog's, never pulled here: that is ``models pull``), or a regular ``.gguf``
        file inside ``models_dirs``. Any other path is an unknown model, the same answer
        whether it exists or not; nothing of it is read."""
        if name is None or not _looks_like_path(name):
            return resolve_model(name, pull=False, paths=False)
        unknown = ModelNotFound(f"unknown model {name[:200]!r}: over HTTP only models the store knows and "
                                "files under --models-dir (HEARTH_MODELS_DIR) can be used")
        if not self.models_dirs or "\x00" in name or len(name) > 4096:
            raise unknown
        candidates = [Path(name)] if os.path.isabs(name) or os.sep in name else [d / name for d in self.models_dirs]
        for c in candidates:
            real = Path(os.path.realpath(c if c.is_absolute() else self.models_dirs[0] / c))
            if not any(real.is_relative_to(d) for d in self.models_dirs):
                continue
            try:
                st = os.stat(real)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):  # not a FIFO, a device or a directory
                return resolve_model(real)
        raise unknown

    def models_dir_names(self) -> list[str]:
        """The ``.gguf`` files directly inside ``models_dirs`` (listed by file name)."""
        out = []
        for d in self.models_dirs:
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError:
                continue
            for e in entries:
                if e.name.lower().endswith(".gguf") and e.is_file() and not _later_split_part(e.name):
                    out.append(e.name)
        return out

    def served_names(self) -> list[str]:
        return [t.name for t in self._served]

    def names_of(self, key: FileKey) -> list[str]:
        """Every name this pool has seen for one file."""
        return sorted({n for n, t in self._names.items() if t.key == key})

    # -- leases -----------------------------------------------------------------------

    async def acquire(self, name: str | None, keep_alive: str | int | float | None = None) -> Lease:
        """Lease the model (loading it if needed); ``keep_alive``, if given, becomes its keep-alive."""
        ka = parse_keep_alive(keep_alive) if keep_alive is not None else ...
        self._start_reaper()
        try:
            target = await self.target(name)
        except ModelNotFound:
            # single-model mode, as llama-server: a server started with one model answers
            # clients whose model name is hard-coded (gpt-3.5-turbo, llama3) with that model
            if len(self._served) != 1:
                raise
            log.debug("unknown model %r: served by the only startup model %s", name, self._served[0].name)
            target = self._served[0]
        key = target.key
        entry = self._loaded.get(key)
        if entry is not None and not _alive(entry):
            if ka is ...:  # the reload keeps its keep-alive (a startup model's: forever)
                ka = entry.keep_alive
            self._drop_dead(entry)
            entry = None
        if entry is not None and await work.disk(entry.check_file):
            self._drop_changed(entry)
            raise ModelChanged(f"{entry.changed}; hearth stopped using it. Send the request again to load "
                               "the file as it is now")
        waited = 0.0
        if entry is None:
            task = self._loading.get(key)
            if task is None:
                task = self._loading[key] = asyncio.ensure_future(self._load(target))
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
        return Lease(self, entry, waited, target)

    def _drop_changed(self, entry: Loaded) -> None:
        """Out of the pool: no new request may start on a file changed under it."""
        log.error("%s", entry.changed)
        if self._loaded.get(entry.key) is entry:
            del self._loaded[entry.key]
        self._retire(entry)

    def _drop_dead(self, entry: Loaded) -> None:
        """Out of the pool: its engine's process died; the next request loads it again."""
        log.warning("%s: its engine is gone; the next request loads it again", entry.model.name)
        if self._loaded.get(entry.key) is entry:
            del self._loaded[entry.key]
        self._retire(entry)

    async def check_files(self) -> None:
        """Drop every loaded model whose file changed in place (``/api/ps`` looks)."""
        for entry in list(self._loaded.values()):
            if await work.disk(entry.check_file):
                self._drop_changed(entry)

    def _release(self, lease: Lease) -> None:
        entry = lease.entry
        entry.leases -= 1
        if not _alive(entry) and self._loaded.get(entry.key) is entry:
            self._drop_dead(entry)
        if self.on_result is not None:
            for h in lease.handles:
                result = h.result_now
                if result is not None:
                    try:
                        self.on_result(entry.model.name, result)
                    except Exception:  # pragma: no cover - metrics must not fail a request
                        log.exception("on_result hook failed")
        entry.touch()
        if entry.keep_alive == 0 and not entry.busy():
            self._unload(entry, "keep_alive 0")  # now, so the next look already sees it gone
        elif self._wake is not None:
            self._wake.set()

    # -- loading and unloading ----------------------------------------------------------

    def _lock(self) -> asyncio.Lock:
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        return self._load_lock

    async def _load(self, target: Target) -> Loaded:
        try:
            async with self._lock():  # one load at a time: each sees the memory the last one took
                entry = await self._load_locked(target, self.keep_alive)
            self._loaded[target.key] = entry
            self._remember(target)
            return entry
        finally:
            self._loading.pop(target.key, None)

    async def _load_locked(self, target: Target, keep_alive: float | None) -> Loaded:
        if self._closed:
            raise EngineError("the server is shutting down")
        await self._make_room(target)
        t0 = time.perf_counter()
        model = await work.load(_load_model, target.model, self.isolate, self.load_options)
        if self.chat_template is not None:
            try:
                _use_template(model, self.chat_template)
            except BaseException:
                await work.load(model.close)
                raise
        if self._closed:  # shut down while it loaded: nobody will close it later
            await work.load(model.close)
            raise EngineError("the server is shutting down")
        entry = Loaded(model, target.key, time.perf_counter() - t0, keep_alive=keep_alive)
        try:
            st = await work.disk(os.stat, target.path)
            entry.stamp = (st.st_size, st.st_mtime_ns)
            if (st.st_dev, st.st_ino) != target.key or (model.info.split_count == 1 and
                                                         st.st_size != model.info.file_size):
                entry.changed = f"{target.path} changed on disk while it was loading"
        except OSError:
            pass
        if entry.changed:
            await work.load(model.close)
            raise ModelChanged(f"{entry.changed}; send the request again")
        entry.touch()
        log.info("loaded %s in %.2fs (%r)", target.name, entry.load_seconds, model)
        return entry

    async def _make_room(self, target: Target) -> None:
        """Unload idle models, least recently used first, until the new one's planned
        RAM and VRAM fit in what is available (or nothing idle is left), and, with
        ``max_loaded_models``, until one more is within that count (a model in use is
        never unloaded for it: then the new one loads beyond the count)."""
        while self.max_loaded_models and len(self._loaded) >= self.max_loaded_models:
            idle = [e for e in self._loaded.values() if not e.busy() and not self._waiters.get(e.key)]
            if not idle:
                log.info("%d models loaded (max_loaded_models %d), all in use: loading %s as well",
                         len(self._loaded), self.max_loaded_models, target.name)
                break
            await self._unload(min(idle, key=lambda e: e.last_used), "max_loaded_models")
        while True:
            idle = [e for e in self._loaded.values() if not e.busy() and not self._waiters.get(e.key)]
            if not idle:
                return
            try:
                plan = await work.disk(plan_model, target.model, **self.load_options)
                need: tuple[int, int] | None = (plan.memory.ram, plan.memory.vram)
            except DoesNotFit:
                need = None  # perhaps it fits once others are gone
            except HearthError:
                return  # the load itself will report it
            ram = await work.disk(self.available_ram)
            vram = await work.disk(self.free_vram) if need is None or need[1] > 0 else 0
            if need is not None and need[0] <= ram and need[1] <= vram:
                return
            victim = min(idle, key=lambda e: e.last_used)
            log.info("unloading %s to make room for %s (needs %s bytes of RAM and VRAM, %s and %s available)",
                     victim.model.name, target.name, need, ram, vram)
            await self._unload(victim, "memory")

    def _unload(self, entry: Loaded, why: str) -> asyncio.Future[Any]:
        """Take the model out of the pool now; free it in a thread (awaitable)."""
        if self._loaded.get(entry.key) is entry:
            del self._loaded[entry.key]
        log.info("unloading %s (%s)", entry.model.name, why)
        fut = asyncio.ensure_future(work.load(entry.model.close))
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

    async def preload(self, names: Sequence[str | None], aliases: Sequence[str | None] = ()) -> None:
        """Serve and load the startup models; they stay loaded (keep-alive forever)
        unless a request says otherwise."""
        aliases = list(aliases) + [None] * (len(names) - len(aliases))
        for name, alias in zip(names, aliases):
            target = await self.serve(name, alias)
            (await self.acquire(target.name, keep_alive=-1)).release()

    async def reload(self, names: Sequence[str | None], aliases: Sequence[str | None] = ()) -> list[str]:
        """Load the startup models afresh (the config may have changed) and swap them in.

        The new copies load first, so a failure leaves the old ones serving. A model
        replaced while requests run on it unloads when the last of them is done.
        """
        aliases = list(aliases) + [None] * (len(names) - len(aliases))
        async with self._lock():
            fresh: list[tuple[Target, Loaded]] = []
            try:
                for name, alias in zip(names, aliases):
                    resolved = await work.disk(resolve_model, name, pull=False)
                    target = Target(await work.disk(file_key, resolved.path),
                                    dataclasses.replace(resolved, name=alias) if alias else resolved)
                    fresh.append((target, await self._load_locked(target, None)))
            except BaseException:
                for _, entry in fresh:
                    await work.load(entry.model.close)
                raise
            for old in self._served:  # no longer startup models: ordinary keep-alive
                e = self._loaded.get(old.key)
                if e is not None:
                    e.keep_alive = self.keep_alive
                    e.touch()
            self._served = []
            self._names = {}
            for target, entry in fresh:
                old = self._loaded.pop(target.key, None)
                if old is not None:
                    self._retire(old)
                self._loaded[target.key] = entry
                path = target.path
                self._remember(target, str(path), path.name, path.stem)
                self._served.append(target)
        return [t.name for t, _ in fresh]

    def _retire(self, entry: Loaded) -> None:
        """Out of the pool; unloaded now if idle, else when its last lease ends."""
        if entry.busy():
            entry.keep_alive = 0  # its last lease's release unloads it
        else:
            fut = asyncio.ensure_future(work.load(entry.model.close))
            self._unloading.add(fut)
            fut.add_done_callback(self._unloading.discard)

    async def forget(self, name: str) -> None:
        """A model was deleted: unload it (once its running requests finish) and drop
        the names that pointed at it."""
        key = name.strip().lower()
        target = self._names.get(key)
        for entry in list(self._loaded.values()):
            if entry.model.name.lower() != key and (target is None or entry.key != target.key):
                continue
            if entry.busy():
                entry.keep_alive = 0  # unloads when its last lease is released
            else:
                await self._unload(entry, "deleted")
            self._names = {k: v for k, v in self._names.items() if v.key != entry.key}
        self._names.pop(key, None)

    def loaded(self) -> list[Loaded]:
        return list(self._loaded.values())

    async def installed_names(self) -> list[str]:
        """Every id a client may use without a download: the startup models, the loaded
        ones, then embedded, pulled and Ollama-store models (scanned off the loop)."""
        from ..store.registry import installed

        names = [*self.served_names(), *(e.model.name for e in self._loaded.values())]
        names += [m.name for m in await work.disk(installed, details=False)]
        names += await work.disk(self.models_dir_names)
        return list(dict.fromkeys(names))

    async def aclose(self) -> None:
        """Stop the reaper, wait for loads in progress and free every model."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        loading = list(self._loading.values())
        if loading:  # a load's thread cannot be interrupted: let it finish, then free it
            await asyncio.gather(*loading, return_exceptions=True)
        entries = list(self._loaded.values())
        self._loaded.clear()
        for entry in entries:
            try:
                await work.load(entry.model.close)
            except Exception:  # pragma: no cover - best effort at shutdown
                log.exception("closing %s", entry.model.name)
        if self._unloading:
            await asyncio.gather(*self._unloading, return_exceptions=True)


def _alive(entry: Loaded) -> bool:
    """False once a model's engine (its child process) has died."""
    return getattr(entry.model.engine, "alive", True)


def _load_model(model: ResolvedModel, isolate: bool, options: Mapping[str, Any]) -> Model:
    from ..engines.base import isolation

    token = isolation.set(isolate)
    try:
        return load_model(model, **options)
    finally:
        isolation.reset(token)


def _use_template(model: Model, template: ChatTemplate) -> None:
    """Render ``model``'s chats with ``template`` (``--chat-template``) instead of its own."""
    model.engine.use_chat_template(template)


# -- running requests on a pooled model ------------------------------------------------
# Both APIs go through these: the engine's own handles, so a stream ends with the
# request's GenerationResult (usage, timings) and closing it cancels the request.


def submit_all(model: Model, jobs: list[tuple[str | list[int], GenerationParams]],
               loop: asyncio.AbstractEventLoop) -> list[Handle]:
    """Queue every job now, so errors (context, busy) surface before a response starts."""
    handles: list[Handle] = []
    try:
        for prompt, params in jobs:
            handles.append(model.submit(prompt, params, loop=loop))
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return handles


async def merge_streams(
    handles: list[Handle],
) -> AsyncIterator[tuple[int, GenerationChunk | None, GenerationResult | None]]:
    """(index, chunk, None) as chunks arrive, then (index, None, result) as each ends.

    Leaving early (client gone) cancels every request still running.
    """
    if len(handles) == 1:  # the common case, without tasks
        h = handles[0]
        async for chunk in h:
            yield 0, chunk, None
        yield 0, None, h.result_now
        return
    q: asyncio.Queue[tuple[int, Any, Any]] = asyncio.Queue()

    async def pump(i: int, h: Handle) -> None:
        try:
            async for chunk in h:
                q.put_nowait((i, chunk, None))
            q.put_nowait((i, None, h.result_now))
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
            if h.result_now is None:
                h.cancel()


async def gather_results(handles: list[Handle]) -> list[GenerationResult]:
    tasks = [asyncio.ensure_future(h.aresult()) for h in handles]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()  # no-op for finished ones; on failure or cancellation stops the rest


async def until_disconnected(request: Request, coro: Awaitable[T]) -> T:
    """Await ``coro``; if the client goes away first, cancel it (its slot is freed)."""
    job = asyncio.ensure_future(coro)

    async def watch() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not job.done():
            job.cancel()
    if not job.done() or job.cancelled():
        raise Cancelled("the client disconnected")
    return job.result()


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
