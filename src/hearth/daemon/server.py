"""The daemon's own process: the HTTP server on a Unix socket, plus ``/daemon/*`` routes.

``/daemon/generate`` is the CLI's stream: one ``{"text": ...}`` line per piece, then
``{"result": GenerationResult.to_dict()}`` (the same JSON as in-process). It runs on
the Ollama route's generation code (``server.ollama.start``/``respond``) with the
library's defaults, so ``hearth run`` answers the same with and without a daemon.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, Mapping

from fastapi import Request
from fastapi.responses import JSONResponse

from ..client import PID_NAME, SOCKET_NAME, DaemonClient
from ..errors import BadRequest, HearthError
from ..types import GenerationParams
from .control import GRACE_SECONDS, DaemonFailed, _read_pid, ensure_runtime_dir

log = logging.getLogger("hearth.daemon")


class DaemonServer:
    """The server (``create_app``) on the runtime dir's socket until SIGTERM/SIGINT;
    SIGHUP or ``POST /daemon/reload`` reloads the startup models."""

    def __init__(self, models: list[str], load_options: Mapping[str, Any], verbose: int = 0,
                 aliases: list[str] | None = None) -> None:
        from ..server import create_app

        self.models: list[str | None] = list(models) or [None]  # no --model: the configured default
        self.aliases = list(aliases or [])
        self.load_options = dict(load_options)
        self.verbose = verbose
        self.started_at = time.time()
        self.reloads = 0
        self.dir = ensure_runtime_dir()
        self.socket_path = self.dir / SOCKET_NAME
        self.pid_file = self.dir / PID_NAME
        # a Unix socket: no Host to check, and no browser can reach it
        self.app = create_app(self.models, load_options=self.load_options, aliases=self.aliases, host=None)
        self.pool = self.app.state.pool
        self._reload_lock = asyncio.Lock()
        self._install_routes()

    # -- routes -----------------------------------------------------------------------

    def _install_routes(self) -> None:
        # plain Starlette routes (the handler takes the Request): no pydantic models to build
        self.app.add_route("/daemon/status", self._status, methods=["GET"])
        self.app.add_route("/daemon/reload", self._reload_route, methods=["POST"])
        self.app.add_route("/daemon/generate", self._generate, methods=["POST"])

    def status(self) -> dict[str, Any]:
        import psutil

        models = []
        for e in self.pool.loaded():
            mem = e.model.plan.memory
            models.append({"name": e.model.name, "path": str(e.model.info.path), "n_ctx": e.model.plan.n_ctx,
                           "parallel": e.model.plan.parallel, "n_threads": e.model.plan.n_threads,
                           "n_gpu_layers": e.model.plan.n_gpu_layers, "ram_bytes": mem.ram, "vram_bytes": mem.vram,
                           "size_bytes": mem.ram + mem.vram, "load_seconds": round(e.load_seconds, 3),
                           "loaded_at": e.loaded_at})
        return {
            "pid": os.getpid(), "socket": str(self.socket_path), "started_at": self.started_at,
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "rss_bytes": psutil.Process().memory_info().rss, "ready": bool(self.app.state.ready),
            "startup_error": self.app.state.startup_error, "reloads": self.reloads,
            "startup_models": self.models, "models": models,
        }

    async def _status(self, request: Request) -> JSONResponse:
        return JSONResponse(self.status())

    async def reload(self, quiet: bool = False) -> dict[str, Any]:
        """Re-read the config and load the startup models afresh; on failure the old
        ones keep serving (and ``quiet``, for SIGHUP, only logs it)."""
        from ..config import load_config

        async with self._reload_lock:
            t0 = time.perf_counter()
            try:
                await asyncio.to_thread(load_config)  # the file may now be wrong: say so, keep serving
                names = await self.pool.reload(self.models, self.aliases)
            except HearthError as e:
                if quiet:
                    log.error("reload failed, still serving the old models: %s", e.message)
                    return {}
                raise
            self.reloads += 1
            self.app.state.ready = True
            self.app.state.startup_error = None
            seconds = time.perf_counter() - t0
            log.warning("reloaded %s in %.2fs", ", ".join(names) or "(no models)", seconds)
            return {"reloaded": names, "seconds": round(seconds, 3), "reloads": self.reloads}

    async def _reload_route(self, request: Request) -> JSONResponse:
        return JSONResponse(await self.reload())

    async def _generate(self, request: Request) -> Any:
        from ..server import ollama
        from ..server.pool import with_lease

        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        config = body.get("config") or {}
        if not isinstance(config, dict):
            raise BadRequest("config must be a JSON object of generation settings")
        params = GenerationParams.from_kwargs(**config)  # validate before loading
        messages = body.get("messages")
        prompt = body.get("prompt")
        if messages is not None:
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            ):
                raise BadRequest("messages must be a list of {role, content} objects with string values")
        elif not isinstance(prompt, str):
            raise BadRequest("prompt (a string) or messages is required")
        system = body.get("system")
        if system is not None and not isinstance(system, str):
            raise BadRequest("system must be a string")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise BadRequest("model must be a string")

        async def handler(lease: Any) -> Any:
            handle, _ = await ollama.start(lease, params, frontend="cli", prompt=prompt, system=system,
                                           raw=bool(body.get("raw")), messages=messages)
            return await ollama.respond(
                request, lease, handle, True,
                lambda text, kind: {"text": text},
                lambda result, whole, parsed=None, calls_only=False: {"result": result.to_dict()},
                lambda e: {"error": e.message, "status": e.http_status},
            )

        # the lease keeps the model loaded (keep-alive, memory) until the response ends
        return await with_lease(self.pool, model, handler)

    # -- running ------------------------------------------------------------------------

    def _listen(self) -> socket.socket:
        if DaemonClient.connect(self.socket_path) is not None:
            raise DaemonFailed(f"another daemon already answers on {self.socket_path}")
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(self.socket_path))
        except OSError as e:
            raise DaemonFailed(f"cannot listen on {self.socket_path}: {e.strerror or e}") from None
        os.chmod(self.socket_path, 0o600)
        sock.listen(128)
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(self.pid_file)
        return sock

    def run(self) -> int:
        import uvicorn

        os.umask(0o077)
        sock = self._listen()
        app = self.app
        daemon = self

        async def with_sighup(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                loop = asyncio.get_running_loop()
                loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(daemon.reload(quiet=True)))
            await app(scope, receive, send)

        from ..server.http import config as server_config

        config = server_config(with_sighup, log_level="info" if self.verbose else "warning", lifespan="on",
                               timeout_graceful_shutdown=GRACE_SECONDS, access_log=bool(self.verbose))
        server = uvicorn.Server(config)
        print(f"hearth: daemon pid {os.getpid()} on {self.socket_path}", file=sys.stderr, flush=True)
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()
            if _read_pid(self.pid_file) == os.getpid():
                for p in (self.socket_path, self.pid_file):
                    try:
                        p.unlink()
                    except FileNotFoundError:
                        pass
        return 0
