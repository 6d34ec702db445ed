"""The FastAPI app: both APIs over one model pool; auth, size limit, one error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from typing import Any, AsyncIterator, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import BadRequest, Busy, HearthError
from .pool import ModelPool

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
OPEN_PATHS = ("/health",)  # reachable without the API key


# -- errors: the one place HearthError and friends become HTTP ----------------------------

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}
RETRY_AFTER_SECONDS = 1  # what a Busy (queue full) answer tells the client to wait


def is_ollama(path: str) -> bool:
    return path.startswith("/api/")


def error_body(path: str, status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """Ollama's ``{"error": msg}`` under /api/, OpenAI's error object elsewhere."""
    if is_ollama(path):
        return {"error": message}
    return {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_response(path: str, status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(path, status, message, code, param), status_code=status)


def hearth_error_body(path: str, e: HearthError) -> dict[str, Any]:
    return error_body(path, e.http_status, e.message, e.code)


def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    errors = e.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return f"the request body is not valid JSON: {ctx.get('error', 'parse error')}", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HearthError)
    async def _hearth(request: Request, e: HearthError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if isinstance(e, Busy) else None
        return JSONResponse(hearth_error_body(request.url.path, e), status_code=e.http_status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        msg, param = _validation_message(e)
        return error_response(request.url.path, 400, msg, "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        if e.status_code == 404 and msg == "Not Found":
            msg = f"no route {request.method} {request.url.path}"
        return error_response(request.url.path, e.status_code, msg, None)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        # the details go to the log, never to the client (paths, file contents, internals)
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, 500, "internal server error (see the server's log)",
                              "internal_error")


# -- middleware (plain ASGI, so streaming responses and disconnects pass untouched) -----


class GuardMiddleware:
    """Bearer-token check and a bound on the request body, before any handler runs."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and path not in OPEN_PATHS:
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                body = error_body(path, 401, "missing or wrong API key (send Authorization: Bearer KEY)", "invalid_api_key")
                await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        too_big = error_body(path, 413, f"request body larger than {self.max_body} bytes", "request_too_large")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await JSONResponse(too_big, status_code=413)(scope, receive, send)
            return
        # read the (bounded) body here and replay it; then pass receive on for disconnects
        chunks: list[bytes] = []
        size = 0
        more = scope["method"] not in ("GET", "HEAD")
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await JSONResponse(too_big, status_code=413)(scope, receive, send)
                return
            chunks.append(chunk)
            more = msg.get("more_body", False)
        if scope["method"] == "POST" and "json" not in headers.get("content-type", ""):
            # Ollama and llama.cpp read the body as JSON whatever its declared type (curl -d)
            scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
                     + [(b"content-type", b"application/json")]}
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)


# -- the app ---------------------------------------------------------------------------


def create_app(
    models: list[str | None] | None = None,
    api_key: str | None = None,
    load_options: Mapping[str, Any] | None = None,
    aliases: list[str | None] | None = None,
) -> FastAPI:
    """The server. ``models`` load at startup (``/health`` says 503 until they have);
    the first is what a request that names no model gets, and ``aliases`` (by
    position) are the names they are listed by. Any other model a request names loads
    on first use. ``load_options`` are the planner wishes (n_ctx, parallel, ...) every
    model is loaded with."""
    from .. import __version__
    from . import metrics, ollama, openai

    startup = list(models or [])
    names = list(aliases or [])
    if len(names) > len(startup):
        raise BadRequest(f"{len(names)} aliases for {len(startup)} models: give one --alias per --model")
    pool = ModelPool(load_options)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def preload() -> None:
            try:
                await pool.preload(startup, names)
                app.state.ready = True
            except HearthError as e:
                app.state.startup_error = e.message
                log.error("cannot load startup model: %s", e.message)

        task = asyncio.ensure_future(preload())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await pool.aclose()

    app = FastAPI(title="hearth", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.pool = pool
    app.state.ready = not startup
    app.state.startup_error = None
    _install_error_handlers(app)
    app.add_middleware(GuardMiddleware, api_key=api_key or None)
    metrics.install(app, pool)  # /metrics, and counts every response (outside the guard)

    @app.get("/health")
    async def health() -> JSONResponse:
        if app.state.ready:
            return JSONResponse({"status": "ok"})
        if app.state.startup_error:
            return JSONResponse({"status": "error", "error": app.state.startup_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/")
    async def root() -> JSONResponse:
        return JSONResponse({"name": "hearth", "version": __version__})

    app.include_router(openai.router)
    app.include_router(ollama.router)
    return app
