"""The preload daemon: the same server, detached, on a Unix socket in the user runtime dir.

Files in the runtime dir (``$HEARTH_RUNTIME_DIR`` or the user runtime dir, mode 0700):
``hearth.sock`` (mode 0600), ``hearth.pid`` and ``hearth.log`` (the daemon's stderr).

- ``start`` spawns ``python -m hearth daemon serve-foreground`` in a new session and
  waits until ``/health`` says the startup models are loaded; stale files go first.
- ``stop`` sends SIGTERM: uvicorn stops accepting, lets in-flight requests finish
  (up to ``GRACE_SECONDS``), then the pool closes and the files are removed.
- ``reload`` (or SIGHUP) re-reads the config and loads the models into a fresh pool;
  requests already running finish on the old pool, which closes when they are done.

This module imports nothing heavy at the top: the server side (FastAPI, the pool)
loads inside ``serve_foreground``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .client import LOG_NAME, PID_NAME, SOCKET_NAME, DaemonClient, DaemonError, runtime_dir
from .errors import BadRequest, HearthError

GRACE_SECONDS = 60  # how long stop lets in-flight requests run
START_TIMEOUT = 600  # a big model on a slow disk takes a while
SERVE_COMMAND = "serve-foreground"


class DaemonFailed(HearthError):
    """The daemon could not start, stop or answer."""

    code = "daemon_error"


# -- the runtime dir and what is in it ---------------------------------------------------


def ensure_runtime_dir() -> Path:
    """The runtime dir, created 0700; refused when someone else owns it or may enter it."""
    d = runtime_dir()
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = d.stat()
        if st.st_uid != os.getuid():
            raise DaemonFailed(f"{d} belongs to another user; set HEARTH_RUNTIME_DIR")
        if st.st_mode & 0o077:
            os.chmod(d, 0o700)
    except OSError as e:
        raise DaemonFailed(f"cannot use runtime dir {d}: {e.strerror or e}") from None
    return d


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _is_daemon(pid: int) -> bool:
    """Alive (not a zombie) and running ``hearth daemon serve-foreground``: a recycled
    pid that now belongs to something else does not count."""
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return SERVE_COMMAND in p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


@dataclass
class State:
    """What the runtime dir says: a live daemon, or leftovers of a dead one."""

    dir: Path
    pid: int | None  # from the pid file
    alive: bool  # that pid is a running daemon
    answers: bool  # the socket accepts connections
    stale: list[str] = field(default_factory=list)  # leftovers of a daemon that is gone

    @property
    def socket(self) -> Path:
        return self.dir / SOCKET_NAME

    @property
    def pid_file(self) -> Path:
        return self.dir / PID_NAME

    @property
    def running(self) -> bool:
        return self.alive and self.answers


def inspect_state() -> State:
    d = runtime_dir()
    sock, pid_file = d / SOCKET_NAME, d / PID_NAME
    pid = _read_pid(pid_file)
    alive = pid is not None and _is_daemon(pid)
    client = DaemonClient.connect(sock, timeout=5) if sock.exists() else None
    answers = client is not None
    if client is not None:
        client.close()
    stale = []
    if pid_file.exists() and not alive:
        stale.append(f"pid file ({pid_file}: pid {pid} is not running)" if pid else f"pid file ({pid_file}: unreadable)")
    if sock.exists() and not answers and not alive:
        stale.append(f"socket ({sock}: nothing listening)")
    return State(d, pid, alive, answers, stale)


def clean_stale(state: State) -> list[str]:
    if state.alive:
        return []
    for p in (state.socket, state.pid_file):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    return state.stale


def _log_tail(d: Path) -> str:
    try:
        lines = [ln.strip() for ln in (d / LOG_NAME).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "the log is empty"


# -- the control side: start, stop, status, reload ---------------------------------------


def start(models: list[str], load_flags: list[str], verbose: int = 0, timeout: float = START_TIMEOUT) -> dict[str, Any]:
    """Spawn the daemon and wait until its startup models are loaded. Returns its status."""
    d = ensure_runtime_dir()
    state = inspect_state()
    if state.running:
        with DaemonClient.connect(state.socket) as c:  # type: ignore[union-attr]
            return {**c.get_json("/daemon/status"), "already_running": True}
    if state.alive:
        raise DaemonFailed(f"a daemon (pid {state.pid}) is running but does not answer on {state.socket}; "
                           "`hearth daemon stop` first")
    cleaned = clean_stale(state)

    from .store import resolve_model

    specs = []
    for m in models:  # an unknown model fails here, before anything starts
        resolved = resolve_model(m)
        specs.append(os.fspath(resolved.path) if resolved.source == "local" else m)

    argv = [sys.executable, "-m", "hearth", *(["-v"] * verbose), "daemon", SERVE_COMMAND]
    for m in specs:
        argv += ["--model", m]
    argv += load_flags
    with open(os.open(d / LOG_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as log:
        os.fchmod(log.fileno(), 0o600)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    sock = d / SOCKET_NAME
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise DaemonFailed(f"the daemon exited ({proc.returncode}) while starting: {_log_tail(d)}")
        client = DaemonClient.connect(sock, timeout=10) if sock.exists() else None
        if client is not None:
            with client:
                try:
                    code, health = client.health()
                    if code == 200:
                        return {**client.get_json("/daemon/status"), "cleaned": cleaned}
                except (OSError, ValueError, DaemonError):
                    health = {}
            if health.get("status") == "error":
                _terminate(proc)
                raise DaemonFailed(f"the daemon could not load its models: {health.get('error')}")
        if time.monotonic() > deadline:
            _terminate(proc)
            raise DaemonFailed(f"the daemon did not come up in {timeout:.0f}s: {_log_tail(d)}")
        time.sleep(0.05)


def _terminate(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _is_daemon(pid):
            return True
        time.sleep(0.05)
    return not _is_daemon(pid)


def stop(timeout: float = GRACE_SECONDS + 15) -> dict[str, Any]:
    """SIGTERM, wait for in-flight requests and the exit; SIGKILL past ``timeout``."""
    state = inspect_state()
    if not state.alive or state.pid is None:
        return {"running": False, "cleaned": clean_stale(state)}
    pid = state.pid
    os.kill(pid, signal.SIGTERM)
    killed = False
    if not _wait_gone(pid, timeout):
        os.kill(pid, signal.SIGKILL)
        killed = True
        _wait_gone(pid, 10)
    for p in (state.socket, state.pid_file):  # the daemon removes them itself; unless killed
        if p == state.pid_file and _read_pid(p) not in (pid, None):
            continue
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    return {"running": False, "stopped": pid, "killed": killed}


def status() -> dict[str, Any]:
    state = inspect_state()
    if not state.running:
        return {"running": False, "pid": state.pid if state.alive else None, "socket": str(state.socket),
                "stale": state.stale, "responding": state.answers}
    with DaemonClient.connect(state.socket, timeout=10) as c:  # type: ignore[union-attr]
        return {"running": True, **c.get_json("/daemon/status")}


def reload() -> dict[str, Any]:
    c = DaemonClient.connect()
    if c is None:
        raise DaemonFailed("the daemon is not running (`hearth daemon start`)")
    with c:
        try:
            return c.post_json("/daemon/reload", {})
        except DaemonError as e:
            raise DaemonFailed(f"reload failed: {e.message}") from None


# -- the server side ---------------------------------------------------------------------


class _Tracker:
    """ASGI wrapper: counts requests per pool, so a pool retired by reload closes only
    when the requests that started on it are done; installs the SIGHUP handler."""

    def __init__(self, app: Any, reloader: Any) -> None:
        self.app = app
        self.reloader = reloader
        self.inflight: dict[int, int] = {}
        self.retired: dict[int, Any] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            import asyncio

            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reloader(quiet=True)))
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        pool = self.app.state.pool
        scope["hearth.pool"] = pool
        key = id(pool)
        self.inflight[key] = self.inflight.get(key, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight[key] -= 1
            if not self.inflight[key]:
                del self.inflight[key]
                if key in self.retired:
                    await self._close(self.retired.pop(key))

    async def retire(self, pool: Any) -> None:
        if self.inflight.get(id(pool)):
            self.retired[id(pool)] = pool  # the last request on it closes it
        else:
            await self._close(pool)

    @staticmethod
    async def _close(pool: Any) -> None:
        import asyncio

        await asyncio.to_thread(pool.close)


def _install_routes(app: Any, info: dict[str, Any], tracker_box: list[Any]) -> None:
    """``/daemon/status``, ``/daemon/reload`` and ``/daemon/generate`` (the CLI's stream:
    ``GenerationResult.to_dict()`` at the end, the same JSON as in-process)."""
    import asyncio
    import logging
    from typing import AsyncIterator

    from fastapi import Request
    from fastapi.responses import JSONResponse

    from .server.pool import LeasedStream, ModelPool, merge_streams
    from .types import GenerationConfig

    log = logging.getLogger("hearth.daemon")
    lock = asyncio.Lock()

    def pool_of(request: Request) -> Any:
        return request.scope.get("hearth.pool") or request.app.state.pool

    # plain Starlette routes (the handler takes the Request): no pydantic models to build
    async def daemon_status(request: Request) -> JSONResponse:
        import psutil

        pool = app.state.pool
        models = []
        for e in pool.loaded():
            mem = e.model.plan.memory
            models.append({"name": e.model.name, "path": str(e.key), "n_ctx": e.model.plan.n_ctx,
                           "parallel": e.model.plan.parallel, "ram_bytes": mem.ram, "vram_bytes": mem.vram,
                           "size_bytes": mem.ram + mem.vram, "load_seconds": round(e.load_seconds, 3),
                           "loaded_at": e.loaded_at})
        return JSONResponse({
            "pid": os.getpid(), "socket": info["socket"], "started_at": info["started_at"],
            "uptime_seconds": round(time.time() - info["started_at"], 3),
            "rss_bytes": psutil.Process().memory_info().rss, "ready": bool(app.state.ready),
            "startup_error": app.state.startup_error, "reloads": info["reloads"],
            "startup_models": info["models"], "models": models,
        })

    async def do_reload(quiet: bool = False) -> dict[str, Any]:
        async with lock:
            t0 = time.perf_counter()
            from .config import load_config

            try:
                await asyncio.to_thread(load_config)  # the file may now be wrong: say so, keep serving
                new = ModelPool(info["load_options"])
                try:
                    await new.preload(info["models"])
                except BaseException:
                    await asyncio.to_thread(new.close)
                    raise
            except HearthError as e:
                if quiet:
                    log.error("reload failed, still serving the old models: %s", e.message)
                    return {}
                raise
            old, app.state.pool = app.state.pool, new
            info["reloads"] += 1
            await tracker_box[0].retire(old)
            names = [e.model.name for e in new.loaded()]
            log.warning("reloaded %s in %.2fs", ", ".join(names) or "(no models)", time.perf_counter() - t0)
            return {"reloaded": names, "seconds": round(time.perf_counter() - t0, 3), "reloads": info["reloads"]}

    info["reload"] = do_reload

    async def daemon_reload(request: Request) -> JSONResponse:
        return JSONResponse(await do_reload())

    async def daemon_generate(request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError as e:
            raise BadRequest(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        cfg = GenerationConfig.from_kwargs(None, **(body.get("config") or {}))  # validate before loading
        # the lease keeps the model loaded (keep-alive, memory) until the response ends
        lease = await pool_of(request).acquire(body.get("model"))
        try:
            model = lease.model
            messages = body.get("messages")
            if messages is None:
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    raise BadRequest("prompt (a string) or messages is required")
                if not body.get("raw"):
                    messages = ([{"role": "system", "content": body["system"]}] if body.get("system") else [])
                    messages.append({"role": "user", "content": prompt})
            if messages is not None:
                prompt, cfg = model.chat_prompt(messages, cfg)
            (handle,) = lease.submit([(prompt, cfg)])
        except BaseException:
            lease.release()
            raise

        async def stream() -> AsyncIterator[bytes]:
            events = merge_streams([handle])
            try:
                async for _, ch, result in events:
                    if ch is not None and ch.text:
                        yield (json.dumps({"text": ch.text}, ensure_ascii=False) + "\n").encode()
                    elif result is not None:
                        yield (json.dumps({"result": result.to_dict()}, ensure_ascii=False) + "\n").encode()
            except HearthError as e:
                yield (json.dumps({"error": e.message, "status": e.http_status}) + "\n").encode()
            finally:
                await events.aclose()

        return LeasedStream(lease, stream(), media_type="application/x-ndjson")

    app.add_route("/daemon/status", daemon_status, methods=["GET"])
    app.add_route("/daemon/reload", daemon_reload, methods=["POST"])
    app.add_route("/daemon/generate", daemon_generate, methods=["POST"])


def serve_foreground(models: list[str], load_options: Mapping[str, Any], verbose: int = 0) -> int:
    """Run the server on the socket until SIGTERM/SIGINT (``hearth daemon serve-foreground``)."""
    import socket as _socket

    import uvicorn

    from .server import create_app

    os.umask(0o077)
    d = ensure_runtime_dir()
    sock_path, pid_file = d / SOCKET_NAME, d / PID_NAME
    if DaemonClient.connect(sock_path) is not None:
        raise DaemonFailed(f"another daemon already answers on {sock_path}")
    try:
        sock_path.unlink()
    except FileNotFoundError:
        pass
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(sock_path))
    except OSError as e:
        raise DaemonFailed(f"cannot listen on {sock_path}: {e.strerror or e}") from None
    os.chmod(sock_path, 0o600)
    sock.listen(128)
    tmp = pid_file.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(pid_file)

    startup: list[Any] = list(models) or [None]  # no --model: the configured default model
    info: dict[str, Any] = {"socket": str(sock_path), "started_at": time.time(), "reloads": 0,
                            "models": startup, "load_options": dict(load_options)}
    app = create_app(startup, load_options=load_options)
    box: list[Any] = []
    _install_routes(app, info, box)
    tracker = _Tracker(app, info["reload"])
    box.append(tracker)
    first_pool = app.state.pool
    config = uvicorn.Config(tracker, log_level="info" if verbose else "warning", lifespan="on",
                            timeout_graceful_shutdown=GRACE_SECONDS, access_log=bool(verbose))
    server = uvicorn.Server(config)
    print(f"hearth: daemon pid {os.getpid()} on {sock_path}", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        for pool in {id(p): p for p in (app.state.pool, *tracker.retired.values())}.values():
            if pool is not first_pool:  # the app's lifespan closed the first one
                pool.close()
        sock.close()
        if _read_pid(pid_file) == os.getpid():
            for p in (sock_path, pid_file):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
    return 0
