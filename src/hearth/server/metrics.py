"""/metrics in the Prometheus text format, and the request log.

Counters and histograms are fed as requests end (the pool's ``on_result`` and
``on_embed`` hooks, and an ASGI middleware for every response's status); the
per-model gauges (queue depth, busy slots, slots) are read from the schedulers at
scrape time. One registry per app, so several servers in one process do not mix.

The same middleware writes one line per request to the ``hearth.requests`` logger at
INFO (status, time, client, method, path, model, tokens; never a prompt or an
answer), as Ollama logs each request; ``hearth serve`` turns it on
(:func:`enable_request_log`). The hooks add a request's model and tokens to the
record the middleware keeps in a context variable, which the request's tasks share.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..types import GenerationResult
from .pool import ModelPool

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

request_log = logging.getLogger("hearth.requests")


@dataclass
class _Seen:
    """What the hooks learn about the request in progress."""

    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    counted: bool = False


_current: contextvars.ContextVar[_Seen | None] = contextvars.ContextVar("hearth_request", default=None)


def _seen(model: str, prompt_tokens: int, completion_tokens: int = 0) -> None:
    seen = _current.get()
    if seen is not None:
        seen.model = model
        seen.prompt_tokens += prompt_tokens
        seen.completion_tokens += completion_tokens
        seen.counted = True


def enable_request_log(stream: Any = None) -> logging.Handler:
    """One line per request on ``stream`` (default stderr), timestamped, at INFO."""
    import sys

    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    request_log.addHandler(handler)
    request_log.setLevel(logging.INFO)
    request_log.propagate = False  # its own format, not the root handler's
    return handler


def _log_request(scope: Scope, status: int, seconds: float, seen: _Seen) -> None:
    client = scope.get("client")
    where = client[0] if client else "unix"
    path = scope.get("path", "")
    if len(path) > 120:
        path = path[:117] + "..."
    tokens = (f"{seen.prompt_tokens}+{seen.completion_tokens} tokens" if seen.counted else "-")
    request_log.info("%d | %8.3fs | %s | %s %s | %s | %s", status, seconds, where, scope.get("method", "?"),
                     path, seen.model or "-", tokens)


class _PoolCollector:
    """Gauges read from the loaded models when scraped."""

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        queued = GaugeMetricFamily("hearth_queue_depth", "Requests waiting for a slot", labels=["model"])
        active = GaugeMetricFamily("hearth_active_slots", "Slots generating now", labels=["model"])
        slots = GaugeMetricFamily("hearth_slots", "Slots (parallel sequences) of the model", labels=["model"])
        memory = GaugeMetricFamily("hearth_model_memory_bytes", "Planned memory of the model (RAM + VRAM)",
                                   labels=["model"])
        loaded = GaugeMetricFamily("hearth_models_loaded", "Models loaded now")
        entries = self.pool.loaded()
        for e in entries:
            m = e.model
            st = m.engine.stats()
            queued.add_metric([m.name], st.queued)
            active.add_metric([m.name], st.active)
            slots.add_metric([m.name], st.slots)
            memory.add_metric([m.name], e.memory_bytes)
        loaded.add_metric([], len(entries))
        yield from (queued, active, slots, memory, loaded)


class Metrics:
    def __init__(self, pool: ModelPool) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("hearth_requests", "HTTP requests by API, route and status",
                                ["api", "route", "status"], registry=r)
        self.request_seconds = Histogram("hearth_request_duration_seconds", "HTTP request duration",
                                         ["api", "route"], registry=r)
        self.prompt_tokens = Counter("hearth_prompt_tokens", "Prompt tokens processed (generation)",
                                     ["model"], registry=r)
        self.generated_tokens = Counter("hearth_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.generations = Counter("hearth_generations", "Generations finished by reason",
                                   ["model", "finish_reason"], registry=r)
        self.embedding_tokens = Counter("hearth_embedding_tokens", "Tokens embedded", ["model"], registry=r)
        self.ttft = Histogram("hearth_time_to_first_token_seconds", "Time from submission to the first token",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.tps = Histogram("hearth_generation_tokens_per_second", "Generation speed of each request",
                             ["model"], buckets=TPS_BUCKETS, registry=r)
        r.register(_PoolCollector(pool))  # type: ignore[arg-type]
        pool.on_result = self.observe_generation
        pool.on_embed = self.observe_embedding

    def observe_generation(self, model: str, result: GenerationResult) -> None:
        _seen(model, result.usage.prompt_tokens, result.usage.completion_tokens)
        self.prompt_tokens.labels(model).inc(result.usage.prompt_tokens)
        self.generated_tokens.labels(model).inc(result.usage.completion_tokens)
        self.generations.labels(model, result.finish_reason).inc()
        t = result.timings
        if result.usage.completion_tokens > 0 and t.ttft > 0:
            self.ttft.labels(model).observe(t.ttft)
        if t.generation_tokens_per_second > 0:
            self.tps.labels(model).observe(t.generation_tokens_per_second)

    def observe_embedding(self, model: str, tokens: int) -> None:
        _seen(model, tokens)
        self.embedding_tokens.labels(model).inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _api(path: str) -> str:
    if path.startswith("/v1/"):
        return "openai"
    if path.startswith("/api/"):
        return "ollama"
    return "hearth"


class MetricsMiddleware:
    """Counts every response (401s and 413s too) by API, route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, fastapi_app: FastAPI) -> None:
        self.app = app
        self.metrics = metrics
        self.fastapi_app = fastapi_app
        self._compiled: list[tuple[re.Pattern[str], str]] | None = None

    def _templates(self) -> list[tuple[re.Pattern[str], str]]:
        """Every route's path template (included routers flattened), built on first use."""
        if self._compiled is None:
            out: list[tuple[re.Pattern[str], str]] = []

            def walk(routes: Any) -> None:
                for r in routes:
                    path = getattr(r, "path", None)
                    if isinstance(path, str) and path:
                        out.append((compile_path(path)[0], path))
                    inner = getattr(r, "original_router", None)  # newer FastAPI keeps included routers whole
                    if inner is not None:
                        walk(inner.routes)

            walk(self.fastapi_app.router.routes)
            self._compiled = out
        return self._compiled

    def _route(self, path: str) -> str:
        for regex, template in self._templates():
            if regex.match(path):
                return template
        return "other"  # unknown paths share one label, so scanners cannot blow up the series

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self._route(scope.get("path", ""))
        api = _api(scope.get("path", ""))
        status = 500
        t0 = time.perf_counter()
        seen = _Seen()
        token = _current.set(seen)

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            _current.reset(token)
            seconds = time.perf_counter() - t0
            self.metrics.requests.labels(api, route, str(status)).inc()
            self.metrics.request_seconds.labels(api, route).observe(seconds)
            if request_log.isEnabledFor(logging.INFO):
                _log_request(scope, status, seconds, seen)


def install(app: FastAPI, pool: ModelPool) -> Metrics:
    """Add /metrics and the request counter to ``app`` (behind the same API key)."""
    metrics = Metrics(pool)
    app.state.metrics = metrics

    @app.get("/metrics", include_in_schema=False)
    async def scrape() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(MetricsMiddleware, metrics=metrics, fastapi_app=app)
    return metrics
