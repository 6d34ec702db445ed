"""The FastAPI app: both APIs over one model pool; auth, size limit, one error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
from typing import Any, AsyncIterator, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import BadRequest, Busy, ContextOverflow, HearthError
from . import webui
from .pool import ModelPool
from .web import CORS_MAX_AGE, CORS_METHODS, WebPolicy, split_list

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
BODY_TIMEOUT_SECONDS = 30.0  # a body that trickles in slower than this is refused (slowloris)
OPEN_PATHS = ("/health", "/v1/health")  # reachable without the API key (as llama-server's)


# -- errors: the one place HearthError and friends become HTTP ----------------------------

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}
RETRY_AFTER_SECONDS = 1  # what a Busy (queue full) answer tells the client to wait


def is_ollama(path: str) -> bool:
    return path.startswith("/api/")


_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}


def is_anthropic(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


# llama-server's own routes (tools/server/server.cpp) answer in its error shape
_LLAMACPP_PATHS = frozenset({"/completion", "/completions", "/infill", "/tokenize", "/detokenize",
                             "/apply-template", "/props", "/slots", "/embedding", "/embeddings", "/health",
                             "/v1/health"})
_LLAMACPP_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 501: "not_supported_error", 503: "unavailable_error"}


def is_llamacpp(path: str) -> bool:
    return path in _LLAMACPP_PATHS or path.startswith("/slots/")


def error_body(path: str, status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """Ollama's ``{"error": msg}`` under /api/, Anthropic's under /v1/messages,
    llama-server's ``{"error": {"code": status, "message", "type"}}`` on its native
    routes, OpenAI's error object elsewhere."""
    if is_ollama(path):
        return {"error": message}
    if is_anthropic(path):
        kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    if is_llamacpp(path):
        kind = _LLAMACPP_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return {"error": {"code": status, "message": message, "type": kind}}
    return {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_response(path: str, status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(path, status, message, code, param), status_code=status)


def hearth_error_body(path: str, e: HearthError) -> dict[str, Any]:
    body = error_body(path, e.http_status, e.message, e.code)
    if isinstance(e, ContextOverflow) and e.n_ctx is not None and isinstance(body.get("error"), dict) \
            and not is_anthropic(path):
        # llama-server's exceed_context_size_error, with both numbers (OpenAI's code kept)
        body["error"].update(type="exceed_context_size_error", n_prompt_tokens=e.n_prompt_tokens, n_ctx=e.n_ctx)
    return body


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

    @app.exception_handler(UnicodeError)
    async def _unicode(request: Request, e: UnicodeError) -> JSONResponse:
        # JSON may carry lone surrogates ("\ud800"): no UTF-8 text holds them
        return error_response(request.url.path, 400, "the request holds text that is not valid Unicode "
                              "(a lone surrogate such as \\ud800)", "invalid_request")

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        # the details go to the log, never to the client (paths, file contents, internals)
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, 500, "internal server error (see the server's log)",
                              "internal_error")


# -- middleware (plain ASGI, so streaming responses and disconnects pass untouched) -----


_JSON_OK = ("application/json",)
_CURL_TYPES = ("", "application/x-www-form-urlencoded")  # curl -d, and clients that send none


def _is_json(ctype: str) -> bool:
    main = ctype.split(";", 1)[0].strip().lower()
    return main in _JSON_OK or main.endswith("+json")


class GuardMiddleware:
    """Before any handler runs: the Host and Origin rules (``web.WebPolicy``), CORS
    preflights, the bearer token, a JSON body type, and a bound on the body's size and
    on how long it may take to arrive."""

    def __init__(self, app: ASGIApp, api_key: str | None, policy: WebPolicy,
                 max_body: int = MAX_BODY_BYTES, body_timeout: float | None = None) -> None:
        self.app = app
        self.api_key = api_key
        self.policy = policy
        self.max_body = max_body
        self.body_timeout = BODY_TIMEOUT_SECONDS if body_timeout is None else body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        method = scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        async def refuse(status: int, message: str, code: str, extra: dict[str, str] | None = None) -> None:
            await JSONResponse(error_body(path, status, message, code), status_code=status,
                               headers=extra)(scope, receive, send)

        host = headers.get("host")
        if not self.policy.host_allowed(host):
            await refuse(403, f"Host {host!r} is not allowed: this server answers loopback names only "
                         "(HEARTH_ALLOWED_HOSTS adds names)", "host_not_allowed")
            return
        origin = headers.get("origin")
        if origin is not None and not self.policy.origin_allowed(origin, host):
            await refuse(403, f"origin {origin!r} is not allowed (HEARTH_ORIGINS adds origins)", "origin_not_allowed")
            return
        if method == "OPTIONS" and origin is not None and "access-control-request-method" in headers:
            await Response(status_code=204, headers={
                "Access-Control-Allow-Origin": origin, "Vary": "Origin",
                "Access-Control-Allow-Methods": CORS_METHODS,
                "Access-Control-Allow-Headers": headers.get("access-control-request-headers", "*"),
                "Access-Control-Max-Age": CORS_MAX_AGE,
            })(scope, receive, send)
            return
        if origin is not None:
            send = _with_cors(send, origin)
        if self.api_key and path not in OPEN_PATHS and not webui.is_page(method, path, headers.get("accept")):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer":  # Anthropic's clients send x-api-key
                token = headers.get("x-api-key", "")
            if not token or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                await refuse(401, "missing or wrong API key (send Authorization: Bearer KEY, or x-api-key: KEY)",
                             "invalid_api_key", {"WWW-Authenticate": "Bearer"})
                return
        has_body = method not in ("GET", "HEAD", "OPTIONS")
        ctype = headers.get("content-type", "")
        from_browser = origin is not None or headers.get("sec-fetch-site", "none") not in ("none", "same-origin")
        if has_body and not _is_json(ctype):
            main = ctype.split(";", 1)[0].strip().lower()
            if from_browser or main not in _CURL_TYPES:
                await refuse(415, f"the request body must be application/json, not {main or 'untyped'}",
                             "unsupported_media_type")
                return
        too_big = f"request body larger than {self.max_body} bytes"
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await refuse(413, too_big, "request_too_large")
            return
        # read the (bounded) body here and replay it; then pass receive on for disconnects
        chunks: list[bytes] = []
        size = 0
        more = has_body
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        while more:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                await refuse(408, f"the request body did not arrive within {self.body_timeout:.0f} s",
                             "request_timeout", {"Connection": "close"})
                return
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await refuse(413, too_big, "request_too_large")
                return
            chunks.append(chunk)
            more = msg.get("more_body", False)
        if has_body and not _is_json(ctype):
            # Ollama and llama.cpp read curl -d bodies as JSON whatever their declared type
            scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
                     + [(b"content-type", b"application/json")]}
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)


def _with_cors(send: Send, origin: str) -> Send:
    """Add the CORS headers for an allowed origin to the response."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []),
                                              (b"access-control-allow-origin", origin.encode("latin-1")),
                                              (b"vary", b"Origin")]}
        await send(message)

    return wrapped


# -- the app ---------------------------------------------------------------------------


def create_app(
    models: list[str | None] | None = None,
    api_key: str | None = None,
    load_options: Mapping[str, Any] | None = None,
    aliases: list[str | None] | None = None,
    *,
    host: str | None = "127.0.0.1",
    origins: list[str] | None = None,
    allowed_hosts: list[str] | None = None,
    models_dirs: list[str] | None = None,
    slots_endpoint: bool = True,
    n_predict: int | None = None,
    chat_template: str | None = None,
) -> FastAPI:
    """The server. ``models`` load at startup (``/health`` says 503 until they have);
    the first is what a request that names no model gets, and ``aliases`` (by
    position) are the names they are listed by. Any other model a request names loads
    on first use. ``load_options`` are the planner wishes (n_ctx, parallel, ...) every
    model is loaded with. ``host`` is the address it listens on (None: a Unix socket),
    for the Host check; ``origins``, ``allowed_hosts`` and ``models_dirs`` default to
    the settings (HEARTH_ORIGINS, HEARTH_ALLOWED_HOSTS, HEARTH_MODELS_DIR).

    llama-server's switches: ``slots_endpoint`` serves ``GET /slots`` (on by default, as
    in the llama-server we vendor; it shows counts, never prompt or output text); ``n_predict`` caps the tokens of a request that sets no limit of its own
    (llama-server's ``--n-predict``); ``chat_template`` (Jinja text, or a built-in name such as ``chatml``) replaces the
    models' own templates (``--chat-template``/``--chat-template-file``)."""
    from ..config import load_config
    from .. import __version__
    from . import anthropic, llamacpp, metrics, ollama, openai, responses

    startup = list(models or [])
    names = list(aliases or [])
    if len(names) > len(startup):
        raise BadRequest(f"{len(names)} aliases for {len(startup)} models: give one --alias per --model")
    cfg = load_config()
    if origins is None:
        origins = split_list(cfg.origins)
    if allowed_hosts is None:
        allowed_hosts = split_list(cfg.allowed_hosts)
    if models_dirs is None:
        models_dirs = [d for d in (cfg.models_dir or "").split(os.pathsep) if d]
    pool = ModelPool(load_options, models_dirs=models_dirs, chat_template=chat_template)

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
    app.state.slots_endpoint = slots_endpoint
    app.state.n_predict = n_predict
    app.state.chat_template = chat_template
    _install_error_handlers(app)
    app.add_middleware(GuardMiddleware, api_key=api_key or None,
                       policy=WebPolicy(host, origins=origins, hosts=allowed_hosts))
    metrics.install(app, pool)  # /metrics, and counts every response (outside the guard)

    @app.get("/health")
    @app.get("/v1/health")
    async def health() -> JSONResponse:
        """llama-server's shape: 200 {"status": "ok"}; 503 with its error object while
        loading ("Loading model", unavailable_error) or when the startup model failed."""
        if app.state.ready:
            return JSONResponse({"status": "ok"})
        if app.state.startup_error:
            return JSONResponse({"status": "error", "error": {
                "code": 503, "message": app.state.startup_error, "type": "unavailable_error"}}, status_code=503)
        return JSONResponse({"status": "loading", "error": {
            "code": 503, "message": "Loading model", "type": "unavailable_error"}}, status_code=503)

    @app.get("/", response_model=None)
    async def root(request: Request) -> Response:
        """The chat page for a browser (Accept: text/html); JSON for every other client."""
        if webui.wants_html(request.headers.get("accept")):
            return webui.page()
        return JSONResponse({"name": "hearth", "version": __version__}, headers={"Vary": "Accept"})

    app.include_router(openai.router)
    app.include_router(ollama.router)
    app.include_router(anthropic.router)
    app.include_router(responses.router)
    app.include_router(llamacpp.router)
    app.include_router(webui.router)  # the chat page's files, /ui/...
    return app
