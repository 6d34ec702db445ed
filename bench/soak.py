#!/usr/bin/env python3
"""Soak test of ``hearth serve``: a long mixed load, checked for 5xx answers and for leaks.

This script starts ``python -m hearth serve --model MODEL --n-ctx 1024 --parallel 4`` as a
subprocess in its own process group, waits for ``/health`` to answer 200, warms it up with
one chat request and one embedding, and then runs ``--rounds`` (default 3) rounds of
``--requests`` (default 200) requests each, ``--concurrency`` (default 16) at a time
(asyncio + one ``httpx.AsyncClient`` per round). Each round's mix is shuffled with a seeded
RNG (``--seed``, default 1):

* ~35% ``POST /v1/chat/completions``, half of them streamed, max_tokens 16-48, temperature 0.7;
* ~20% Ollama ``POST /api/chat`` or ``/api/generate``, half streamed (NDJSON),
  ``options.num_predict`` 16-48;
* ~15% structured output: ``response_format`` ``json_schema`` on /v1/chat/completions or
  ``format: {schema}`` on /api/generate; small object schemas with a few typed properties,
  every third one with a string property of ``maxLength: 65536`` (as agents send);
* ~10% ``POST /v1/embeddings`` (one or two inputs);
* ~10% ``GET /v1/models``, ``GET /api/tags``, ``GET /api/ps``;
* ~10% bad requests that must get a 4xx: unknown model (404), temperature -1 (400),
  ``max_tokens: "x"`` (400), a malformed JSON body (400), ``options.num_predict: "x"`` (400).

``--cancel-fraction`` (default 0.2) of the generation requests are cancelled mid-way: a
streamed one is closed after its first chunk, a non-streamed one after a random 0.05-0.5 s
(the request task is cancelled, so httpx drops the connection). A non-streamed request
that answers before its cancel time counts as "cancel missed", not as a cancellation.

Every answer is checked: its status class (2xx/4xx/5xx), a bad request that got no 4xx or
a good one that got a 4xx ("unexpected", the first bodies of each kind are printed), a
stream that carries an error event or ends without its final [DONE] / ``done: true``
line, and connection errors (anything httpx raises that is not our own cancellation,
timeouts included).

During each round a probe thread (sync ``httpx.Client``, one keep-alive connection) sends
``GET /health`` every 50 ms; the round reports its p50/p99. It shares this process's GIL
with the load generator, so its latency is an upper bound on the server's. After each
round the load client is closed and the script polls ``GET /metrics`` until
``hearth_active_slots`` and ``hearth_queue_depth`` are both 0 (at most 30 s), waits 1 s
more, then reads the server process's RSS, open fd count and thread count with psutil.
Round 1 warms caches (grammars, prompt cache, thread pools), so growth is reported from
the end of round 1 to the end of the last round.

Exit status 0 when there were no 5xx answers and no connection errors apart from the
cancellations this script caused; 1 otherwise (or when the server failed to start/died).
The server's log (stdout+stderr) stays in a temporary folder whose path is printed.

usage (from the repository root):
    .venv/bin/python bench/soak.py [--rounds 3] [--requests 200] [--concurrency 16] [--json OUT.json]
    # another source tree, with the same venv:
    git worktree add /tmp/hearth-before HEAD
    .venv/bin/python bench/soak.py --pythonpath /tmp/hearth-before --label before --json before.json

``--pythonpath DIR`` prepends DIR/src to the server's PYTHONPATH (checked: the server must
then import hearth from DIR/src). ``--python`` picks the server's interpreter. The JSON file
holds the label, the commit, the arguments, every round's counts and process figures,
the growth and the first unexpected answers. Needs httpx and psutil in this Python.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
KEEP_SAMPLES = 5  # bodies kept per kind of unexpected answer


from hearth_proc import BenchError, Server, check_import, free_port, log, server_env, tree_commit


# -- the request mix ---------------------------------------------------------------------

TOPICS = (
    "a lighthouse keeper", "a lost cat in a big city", "a baker who wakes before dawn", "a river that runs backwards",
    "two friends building a raft", "an old clock that stops at midnight", "a robot learning to paint",
    "a village library", "a storm at sea", "a garden on a rooftop", "a train crossing the mountains",
    "a child who collects stones",
)

# small object schemas; every third gets a long-string property (agents send maxLength 65536)
SCHEMAS = (
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                      "active": {"type": "boolean"}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"},
                                      "area_km2": {"type": "number"}}, "required": ["city"]},
    {"type": "object", "properties": {"title": {"type": "string"},
                                      "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                                      "rating": {"type": "integer", "minimum": 1, "maximum": 5}},
     "required": ["title", "rating"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"type": "string", "enum": ["bug", "feature", "question"]},
                                      "priority": {"type": "integer"}, "done": {"type": "boolean"}},
     "required": ["kind", "priority", "done"]},
)
LONG_STRING = {"type": "string", "maxLength": 65536}

GEN_KINDS = ("chat_v1", "ollama", "schema")


@dataclass
class Spec:
    kind: str  # chat_v1 ollama schema embed meta bad
    method: str
    path: str
    body: Any = None  # dict (sent as JSON) or bytes (sent raw)
    stream: bool = False
    expect_4xx: int | None = None  # bad requests: the status hearth should answer
    cancel: bool = False
    cancel_after: float = 0.0  # non-streamed cancels: seconds

    @property
    def route(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def label(self) -> str:
        return f"{self.kind}{' stream' if self.stream else ''}: {self.route}"


def _schema(rng: random.Random, i: int) -> dict:
    s = json.loads(json.dumps(SCHEMAS[i % len(SCHEMAS)]))
    if i % 3 == 0:
        s["properties"]["notes"] = LONG_STRING
    return s


def build_mix(args, rnd: int) -> list[Spec]:
    rng = random.Random(args.seed * 1000 + rnd)
    n = args.requests
    shares = {"ollama": 0.20, "schema": 0.15, "embed": 0.10, "meta": 0.10, "bad": 0.10}
    counts = {k: round(n * v) for k, v in shares.items()}
    counts["chat_v1"] = n - sum(counts.values())
    model = args.model
    specs: list[Spec] = []

    def prompt() -> str:
        return f"Tell me a short story about {rng.choice(TOPICS)} (#{rng.randrange(10**6)})."

    def mt() -> int:
        return rng.randint(16, 48)

    for _ in range(counts["chat_v1"]):
        stream = rng.random() < 0.5
        specs.append(Spec("chat_v1", "POST", "/v1/chat/completions", stream=stream, body={
            "model": model, "stream": stream, "max_tokens": mt(), "temperature": 0.7,
            "messages": [{"role": "user", "content": prompt()}]}))
    for _ in range(counts["ollama"]):
        stream = rng.random() < 0.5
        opts = {"num_predict": mt(), "temperature": 0.7}
        if rng.random() < 0.5:
            specs.append(Spec("ollama", "POST", "/api/chat", stream=stream, body={
                "model": model, "stream": stream, "options": opts,
                "messages": [{"role": "user", "content": prompt()}]}))
        else:
            specs.append(Spec("ollama", "POST", "/api/generate", stream=stream, body={
                "model": model, "stream": stream, "options": opts, "prompt": prompt()}))
    for i in range(counts["schema"]):
        schema = _schema(rng, i)
        stream = rng.random() < 0.5
        ask = f"Describe {rng.choice(TOPICS)} as a JSON record."
        if i % 2 == 0:
            specs.append(Spec("schema", "POST", "/v1/chat/completions", stream=stream, body={
                "model": model, "stream": stream, "max_tokens": mt(), "temperature": 0.7,
                "messages": [{"role": "user", "content": ask}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}))
        else:
            specs.append(Spec("schema", "POST", "/api/generate", stream=stream, body={
                "model": model, "stream": stream, "options": {"num_predict": mt(), "temperature": 0.7},
                "prompt": ask, "format": schema}))
    for _ in range(counts["embed"]):
        inp: Any = prompt() if rng.random() < 0.5 else [prompt(), prompt()]
        specs.append(Spec("embed", "POST", "/v1/embeddings", body={"model": model, "input": inp}))
    for i in range(counts["meta"]):
        specs.append(Spec("meta", "GET", ("/v1/models", "/api/tags", "/api/ps")[i % 3]))
    msgs = [{"role": "user", "content": "Hello"}]
    bad = (
        lambda: Spec("bad", "POST", "/v1/chat/completions", expect_4xx=404,
                     body={"model": "no-such-model-xyz", "max_tokens": 8, "messages": msgs}),
        lambda: Spec("bad", "POST", "/v1/chat/completions", expect_4xx=400,
                     body={"model": model, "temperature": -1, "max_tokens": 8, "messages": msgs}),
        lambda: Spec("bad", "POST", "/v1/chat/completions", expect_4xx=400,
                     body={"model": model, "max_tokens": "x", "messages": msgs}),
        lambda: Spec("bad", "POST", "/v1/chat/completions", expect_4xx=400,
                     body=b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", "cont'),
        lambda: Spec("bad", "POST", "/api/generate", expect_4xx=400,
                     body={"model": model, "prompt": "Hello", "stream": False, "options": {"num_predict": "x"}}),
        lambda: Spec("bad", "POST", "/api/chat", expect_4xx=404,
                     body={"model": "no-such-model-xyz", "stream": False, "messages": msgs}),
    )
    for i in range(counts["bad"]):
        specs.append(bad[i % len(bad)]())

    gen = [s for s in specs if s.kind in GEN_KINDS]
    for s in rng.sample(gen, round(len(gen) * args.cancel_fraction)):
        s.cancel = True
        s.cancel_after = rng.uniform(0.05, 0.5)
    rng.shuffle(specs)
    return specs


# -- one round ---------------------------------------------------------------------------


@dataclass
class RoundStats:
    requests: int = 0
    by_class: dict[str, int] = field(default_factory=lambda: {"2xx": 0, "4xx": 0, "5xx": 0, "other": 0})
    conn_errors: int = 0
    cancelled: int = 0
    cancel_missed: int = 0  # non-streamed cancels that answered before their cancel time
    stream_errors: int = 0  # 200 streams with an error event or no proper end
    unexpected: int = 0  # bad request not 4xx, or good request 4xx
    wrong_4xx: int = 0  # bad request got a 4xx, but not the one expected (informational)
    schema_json_ok: int = 0
    schema_json_bad: int = 0  # finished schema outputs that do not parse (truncated at max_tokens counts here)
    by_route: dict[str, dict[str, int]] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def count(self, spec: Spec, status: int | str) -> None:
        cls = f"{status // 100}xx" if isinstance(status, int) and 200 <= status < 600 and status // 100 in (2, 4, 5) \
            else ("other" if isinstance(status, int) else str(status))
        if cls in self.by_class:
            self.by_class[cls] += 1
        r = self.by_route.setdefault(spec.route, {})
        r[str(status)] = r.get(str(status), 0) + 1


class Samples:
    """First few bodies of each kind of surprise, over the whole run."""

    def __init__(self) -> None:
        self.kinds: dict[str, list[dict]] = {}
        self.counts: dict[str, int] = {}

    def add(self, kind: str, rnd: int, spec: Spec, status: Any, body: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        lst = self.kinds.setdefault(kind, [])
        if len(lst) < KEEP_SAMPLES:
            sent = spec.body if isinstance(spec.body, dict) else (spec.body.decode(errors="replace") if spec.body else None)
            if isinstance(sent, dict):
                sent = json.dumps(sent)[:300]
            lst.append({"round": rnd, "request": spec.label, "status": status, "body": body[:600], "sent": sent})


def _check_stream_line(spec: Spec, line: str) -> tuple[bool, str | None, bool]:
    """(is a data chunk, error text or None, is the end marker) for one SSE/NDJSON line."""
    if spec.path.startswith("/v1/"):
        if not line.startswith("data:"):
            return False, None, False
        payload = line[5:].strip()
        if payload == "[DONE]":
            return False, None, True
        try:
            obj = json.loads(payload)
        except json.JSONDecodeError:
            return True, f"bad SSE data: {payload[:300]}", False
        if isinstance(obj, dict) and "error" in obj:
            return True, f"error event: {json.dumps(obj['error'])[:500]}", False
        return True, None, False
    if not line.strip():
        return False, None, False
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return True, f"bad NDJSON line: {line[:300]}", False
    if isinstance(obj, dict) and "error" in obj:
        return True, f"error line: {json.dumps(obj)[:500]}", False
    return True, None, bool(isinstance(obj, dict) and obj.get("done"))


def _schema_text(spec: Spec, d: Any) -> str | None:
    try:
        if spec.path.startswith("/v1/"):
            if d["choices"][0]["finish_reason"] != "stop":
                return None
            return d["choices"][0]["message"]["content"]
        if d.get("done_reason") != "stop":
            return None
        return d["response"]
    except (KeyError, IndexError, TypeError):
        return None


async def do_request(client: httpx.AsyncClient, spec: Spec, st: RoundStats, samples: Samples, rnd: int) -> None:
    kw: dict[str, Any] = {}
    if isinstance(spec.body, bytes):
        kw = {"content": spec.body, "headers": {"content-type": "application/json"}}
    elif spec.body is not None:
        kw = {"json": spec.body}
    t0 = time.monotonic()

    def judge_status(status: int, body: str) -> None:
        st.count(spec, status)
        if status >= 500:
            samples.add("5xx", rnd, spec, status, body)
        elif spec.expect_4xx is not None:
            if not 400 <= status < 500:
                st.unexpected += 1
                samples.add("bad request not answered 4xx", rnd, spec, status, body)
            elif status != spec.expect_4xx:
                st.wrong_4xx += 1
                samples.add(f"bad request got another 4xx (expected {spec.expect_4xx})", rnd, spec, status, body)
        elif 400 <= status < 500:
            st.unexpected += 1
            samples.add("good request answered 4xx", rnd, spec, status, body)

    try:
        if spec.stream:
            async with client.stream(spec.method, spec.path, **kw) as r:
                if r.status_code != 200:
                    judge_status(r.status_code, (await r.aread()).decode(errors="replace"))
                    return
                chunks, err, ended = 0, None, False
                async for line in r.aiter_lines():
                    is_chunk, e, end = _check_stream_line(spec, line)
                    err = err or e
                    ended = ended or end
                    if is_chunk:
                        chunks += 1
                        if spec.cancel and chunks == 1 and err is None:
                            break  # closing the stream drops the connection
                if spec.cancel and chunks >= 1 and err is None and not ended:
                    st.count(spec, "cancelled")
                    st.cancelled += 1
                    return
                judge_status(200, "")
                if err or not ended:
                    st.stream_errors += 1
                    samples.add("stream error / unfinished stream", rnd, spec, 200,
                                err or f"stream ended without its end marker after {chunks} chunks")
        else:
            coro = client.request(spec.method, spec.path, **kw)
            if spec.cancel:
                try:
                    r = await asyncio.wait_for(coro, spec.cancel_after)
                except asyncio.TimeoutError:
                    st.count(spec, "cancelled")
                    st.cancelled += 1
                    return
                st.cancel_missed += 1
            else:
                r = await coro
            judge_status(r.status_code, r.text)
            if spec.kind == "schema" and r.status_code == 200:
                text = _schema_text(spec, r.json())
                if text is not None:
                    try:
                        json.loads(text)
                        st.schema_json_ok += 1
                    except ValueError:
                        st.schema_json_bad += 1
                        samples.add("schema output (finish stop) not valid JSON", rnd, spec, 200, text)
    except httpx.HTTPError as e:
        st.count(spec, "conn_error")
        st.conn_errors += 1
        samples.add("connection error", rnd, spec, type(e).__name__, f"{type(e).__name__}: {e}")
    finally:
        st.latencies.append(time.monotonic() - t0)


class HealthProbe(threading.Thread):
    """GET /health every ``interval`` s (start to start) until stopped."""

    def __init__(self, url: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.url, self.interval = url, interval
        self.lat: list[float] = []
        self.errors: list[str] = []
        self.statuses: dict[str, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as c:
            while not self._halt.is_set():
                start = time.monotonic()
                try:
                    r = c.get(self.url)
                    self.lat.append(time.monotonic() - start)
                    self.statuses[str(r.status_code)] = self.statuses.get(str(r.status_code), 0) + 1
                    if r.status_code != 200:
                        self.errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as e:
                    self.errors.append(f"{type(e).__name__}: {e}")
                self._halt.wait(max(0.0, start + self.interval - time.monotonic()))

    def stop(self) -> None:
        self._halt.set()
        self.join(60)


async def run_round(args, base: str, specs: list[Spec], samples: Samples, rnd: int) -> RoundStats:
    st = RoundStats(requests=len(specs))
    queue: asyncio.Queue[Spec] = asyncio.Queue()
    for s in specs:
        queue.put_nowait(s)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            while True:
                try:
                    spec = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await do_request(client, spec, st, samples, rnd)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return st


# -- idle, process figures -----------------------------------------------------------------

_GAUGE = re.compile(r"^(hearth_active_slots|hearth_queue_depth)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)\s*$")


def gauges(base: str) -> dict[str, float] | None:
    try:
        r = httpx.get(base + "/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    out = {"hearth_active_slots": 0.0, "hearth_queue_depth": 0.0}
    seen = set()
    for line in r.text.splitlines():
        m = _GAUGE.match(line)
        if m:
            out[m.group(1)] += float(m.group(3))
            seen.add(m.group(1))
    return out if len(seen) == 2 else None  # no model loaded, or the gauges are missing: not known idle


def wait_idle(base: str, limit: float = 30.0) -> tuple[float, dict[str, float] | None]:
    """Poll /metrics until no active slots and no queue; (seconds waited, last gauges)."""
    t0 = time.monotonic()
    g = None
    while time.monotonic() - t0 < limit:
        g = gauges(base)
        if g is not None and g["hearth_active_slots"] == 0 and g["hearth_queue_depth"] == 0:
            break
        time.sleep(0.25)
    return time.monotonic() - t0, g


def proc_figures(pid: int) -> dict[str, Any]:
    p = psutil.Process(pid)
    with p.oneshot():
        d = {"rss_mb": p.memory_info().rss / 2**20, "fds": p.num_fds(), "threads": p.num_threads(),
             "connections": len(p.net_connections(kind="inet")) if hasattr(p, "net_connections")
             else len(p.connections(kind="inet"))}
    kids = p.children(recursive=True)
    if kids:
        d["children"] = len(kids)
        d["children_rss_mb"] = sum(k.memory_info().rss for k in kids) / 2**20
    return d


# -- report --------------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)] if s else float("nan")


def busy_processes() -> list[str]:
    p = subprocess.run(["pgrep", "-af", "cmake|cc1plus|pytest|compare_server|loop_latency"],
                       capture_output=True, text=True)
    return [ln[:120] for ln in p.stdout.splitlines() if str(os.getpid()) not in ln.split()[:1]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Soak test of hearth serve: mixed load in rounds, 5xx and leak check.")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--requests", type=int, default=200, help="requests per round (default 200)")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    ap.add_argument("--cancel-fraction", type=float, default=0.2,
                    help="share of generation requests cancelled mid-way (default 0.2)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the request mix (default 1)")
    ap.add_argument("--json", dest="json_out", metavar="OUT", help="write the results to this JSON file")
    ap.add_argument("--pythonpath", metavar="DIR", help="run the server from DIR/src (prepended to PYTHONPATH)")
    ap.add_argument("--label", default=None, help="name of this run in the output (default: the commit)")
    ap.add_argument("--python", default=sys.executable, help="Python that runs the server (default: this one)")
    ap.add_argument("--model", default="smollm2", help="model (default smollm2)")
    ap.add_argument("--n-ctx", type=int, default=1024, help="context per slot (default 1024)")
    ap.add_argument("--parallel", type=int, default=4, help="server slots (default 4)")
    ap.add_argument("--probe-ms", type=float, default=50.0, help="/health probe period in ms (default 50)")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG", help="extra argument for hearth serve")
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds the server may take to start")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="HTTP timeout of a load request")
    args = ap.parse_args(argv)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        return run(args)
    except BenchError as e:
        log(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130


def run(args) -> int:
    tree = Path(args.pythonpath).resolve() if args.pythonpath else REPO
    commit, dirty = tree_commit(tree)
    label = args.label or (commit[:10] if commit else "unknown")
    env = server_env(args.pythonpath)
    hearth_file = check_import(args.python, env, args.pythonpath)
    log(f"# {label}: tree {tree} at {commit}{' (+ uncommitted changes in src/)' if dirty else ''}; hearth from {hearth_file}")
    busy = busy_processes()
    if busy:
        log("# warning: other work is running, results will be noisy:\n#   " + "\n#   ".join(busy))

    port = free_port()
    cmd = [args.python, "-m", "hearth", "serve", "--host", "127.0.0.1", "--port", str(port), "--model", args.model,
           "--n-ctx", str(args.n_ctx), "--parallel", str(args.parallel), *args.server_arg]
    base = f"http://127.0.0.1:{port}"
    log_dir = Path(tempfile.mkdtemp(prefix="hearth-soak-"))
    srv = Server(cmd, env, port, log_dir)
    log(f"# server log: {srv.log_path}")
    samples = Samples()
    rounds: list[dict[str, Any]] = []
    alive = True
    t_start = time.monotonic()
    try:
        ready = srv.wait_ready(args.start_timeout)
        log(f"# server ready after {ready:.1f} s: {' '.join(cmd)}")
        for path, body in (("/v1/chat/completions", {"model": args.model, "max_tokens": 8,
                                                     "messages": [{"role": "user", "content": "Hello"}]}),
                           ("/v1/embeddings", {"model": args.model, "input": "Hello"})):
            r = httpx.post(base + path, json=body, timeout=120)
            if r.status_code != 200:
                raise BenchError(f"warm-up {path}: HTTP {r.status_code}: {r.text[:500]}")
        wait_idle(base)
        start_fig = proc_figures(srv.proc.pid)
        log(f"# after warm-up: RSS {start_fig['rss_mb']:.1f} MB, {start_fig['fds']} fds, {start_fig['threads']} threads")
        for rnd in range(1, args.rounds + 1):
            specs = build_mix(args, rnd)
            probe = HealthProbe(base + "/health", args.probe_ms / 1000)
            probe.start()
            t0 = time.monotonic()
            try:
                st = asyncio.run(run_round(args, base, specs, samples, rnd))
            finally:
                probe.stop()
            secs = time.monotonic() - t0
            for e in probe.errors:
                m = re.match(r"HTTP (\d+)", e)
                samples.add("/health probe error", rnd, Spec("probe", "GET", "/health"),
                            int(m.group(1)) if m else "conn", e)
            probe_5xx = sum(v for k, v in probe.statuses.items() if k.startswith("5"))
            probe_conn = len(probe.errors) - sum(v for k, v in probe.statuses.items() if k != "200")
            idle_s, g = wait_idle(base)
            time.sleep(1.0)
            alive = srv.proc.poll() is None
            fig = proc_figures(srv.proc.pid) if alive else {}
            lat_ms = [x * 1000 for x in probe.lat]
            rd = {
                "round": rnd, "seconds": secs, "requests": st.requests, **st.by_class,
                "conn_errors": st.conn_errors, "cancelled": st.cancelled, "cancel_missed": st.cancel_missed,
                "stream_errors": st.stream_errors, "unexpected": st.unexpected, "wrong_4xx": st.wrong_4xx,
                "schema_json_ok": st.schema_json_ok, "schema_json_bad": st.schema_json_bad,
                "health_p50_ms": pct(lat_ms, 50), "health_p99_ms": pct(lat_ms, 99),
                "health_max_ms": max(lat_ms) if lat_ms else float("nan"), "health_probes": len(lat_ms),
                "health_5xx": probe_5xx, "health_conn_errors": probe_conn,
                "idle_wait_s": idle_s, "gauges_after": g, **fig,
                "request_p50_s": pct(st.latencies, 50), "request_max_s": max(st.latencies) if st.latencies else None,
                "by_route": st.by_route,
            }
            rounds.append(rd)
            log(f"# round {rnd}: {secs:.1f} s, 2xx {st.by_class['2xx']}, 4xx {st.by_class['4xx']}, "
                f"5xx {st.by_class['5xx']}, conn errors {st.conn_errors}, cancelled {st.cancelled}; "
                + (f"RSS {fig['rss_mb']:.1f} MB, {fig['fds']} fds, {fig['threads']} threads; " if fig else "SERVER DIED; ")
                + f"/health p50 {rd['health_p50_ms']:.1f} ms p99 {rd['health_p99_ms']:.1f} ms; idle after {idle_s:.1f} s")
            if not alive:
                break
        tail = srv.log_tail(40)
    finally:
        srv.stop()
    log(f"# server stopped: {srv.shutdown}")
    total_s = time.monotonic() - t_start

    # -- summary ---------------------------------------------------------------------
    total_5xx = sum(r["5xx"] + r["health_5xx"] for r in rounds)
    total_conn = sum(r["conn_errors"] + r["health_conn_errors"] for r in rounds)
    growth = None
    if len(rounds) >= 2 and "rss_mb" in rounds[0] and "rss_mb" in rounds[-1]:
        a, b = rounds[0], rounds[-1]
        growth = {"rss_mb": b["rss_mb"] - a["rss_mb"], "fds": b["fds"] - a["fds"], "threads": b["threads"] - a["threads"],
                  "from_round": a["round"], "to_round": b["round"]}

    print()
    print(f"### hearth serve soak — {label}")
    print()
    print(f"{args.rounds} rounds x {args.requests} requests, {args.concurrency} concurrent, cancel fraction "
          f"{args.cancel_fraction:g}, seed {args.seed}; `{' '.join(cmd[1:])}`; {os.cpu_count()} CPUs; "
          f"commit {commit[:10] if commit else '?'}{'+dirty' if dirty else ''}; {total_s:.0f} s in all")
    print()
    print("| round | s | 2xx | 4xx | 5xx | conn err | cancelled | stream err | unexpected | RSS MB | fds | threads "
          "| /health p50 ms | p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| start | | | | | | | | | {start_fig['rss_mb']:.1f} | {start_fig['fds']} | {start_fig['threads']} | | |")
    for r in rounds:
        fig = (f"{r['rss_mb']:.1f} | {r['fds']} | {r['threads']}" if "rss_mb" in r else "died | - | -")
        print(f"| {r['round']} | {r['seconds']:.0f} | {r['2xx']} | {r['4xx']} | {r['5xx']} | {r['conn_errors']} | "
              f"{r['cancelled']} | {r['stream_errors']} | {r['unexpected']} | {fig} | "
              f"{r['health_p50_ms']:.1f} | {r['health_p99_ms']:.1f} |")
    print()
    if growth:
        print(f"- growth from the end of round {growth['from_round']} to the end of round {growth['to_round']}: "
              f"RSS {growth['rss_mb']:+.1f} MB, fds {growth['fds']:+d}, threads {growth['threads']:+d}")
    print(f"- 5xx total: {total_5xx} (probe included); connection errors (not our cancels): {total_conn}")
    print(f"- cancels that came too late (answer before the cancel time): {sum(r['cancel_missed'] for r in rounds)}; "
          f"bad requests with another 4xx than expected: {sum(r['wrong_4xx'] for r in rounds)}")
    print(f"- schema outputs finished with 'stop': {sum(r['schema_json_ok'] for r in rounds)} valid JSON, "
          f"{sum(r['schema_json_bad'] for r in rounds)} not")
    idle = ", ".join(f"{r['idle_wait_s']:.1f} s" for r in rounds)
    print(f"- idle wait after rounds: {idle}; "
          f"server {'alive' if alive else 'DIED'} at end, shutdown {srv.shutdown}")
    for kind, lst in samples.kinds.items():
        print(f"- {kind}: {samples.counts[kind]} in all; first ones:")
        for s in lst[:3]:
            print(f"    round {s['round']} {s['request']} -> {s['status']}: {s['body'][:300]!r}")
            if s.get("sent"):
                print(f"      sent: {s['sent'][:200]}")
    print(f"- server log: {srv.log_path}")
    if total_5xx or total_conn or not alive:
        print("server log tail:\n" + tail)

    if args.json_out:
        Path(args.json_out).write_text(json.dumps({
            "label": label, "commit": commit, "src_dirty": dirty, "tree": str(tree), "hearth_file": hearth_file,
            "python": args.python, "command": cmd, "args": vars(args), "server_log": str(srv.log_path),
            "start": start_fig, "rounds": rounds, "growth": growth, "total_5xx": total_5xx,
            "total_conn_errors": total_conn, "server_alive_at_end": alive, "server_shutdown": srv.shutdown,
            "samples": samples.kinds, "sample_counts": samples.counts, "seconds": total_s,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        }, indent=2))
        log(f"# wrote {args.json_out}")
    return 0 if (total_5xx == 0 and total_conn == 0 and alive) else 1


if __name__ == "__main__":
    sys.exit(main())
