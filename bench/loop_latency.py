#!/usr/bin/env python3
"""Event-loop responsiveness of ``hearth serve`` under heavy load: latency of ``GET /health``.

``/health`` does no work, so its latency is how long a request waits for the server's
asyncio event loop. If generation, grammar building or prompt tokenizing runs on the
loop (instead of in a worker thread), ``/health`` stalls for that long. This script
starts ``python -m hearth serve --model MODEL --n-ctx C --parallel P`` as a subprocess,
waits for ``/health`` to answer 200, warms the server up with one short chat request,
and then runs this load against it, all at once:

* ``--streams`` (default 8) streaming chat completions (``/v1/chat/completions``,
  ``stream: true``, max_tokens 200, temperature 0.7), each restarted as soon as it ends;
* one ``/v1/chat/completions`` request with ``response_format`` ``json_schema``: an object
  schema of ``--schema-props`` (default 200) properties, each an object with typed fields
  and enums (no big maxLength/maxItems), max_tokens 32. A new one starts every
  ``--heavy-every`` seconds (default 6) or when the previous one ends, whichever is later.
  Each repetition renames one property, so no repetition can reuse a grammar built
  for an earlier one (``--same-schema`` turns that off);
* one ``/v1/completions`` request with a prompt of about 4,000 tokens (``--long-words``
  varied words; different words every repetition, so the prompt cache cannot help),
  max_tokens 8; same schedule as the schema request, offset by half a period.

After ``--ramp`` seconds (default 2, so that all streams are generating) a probe in a
separate process (a sync ``httpx.Client``, one keep-alive connection, its own
interpreter, so the load generator's event loop and GIL cannot delay it) sends
``GET /health`` every ``--interval-ms`` (default 20 ms, start to start; the next one
goes at once if a probe took longer) for ``--seconds`` (default 30). The heavy
requests start when the probe does. Then the load stops (requests still in flight are
cancelled and counted as such) and the server gets SIGINT (SIGTERM after 15 s,
SIGKILL after 10 more).

Every load response's status is checked, and a stream that carries an ``error``
event counts as failed; the first error bodies of each kind are printed.

usage (from the repository root):
    .venv/bin/python bench/loop_latency.py [--seconds 30] [--label NAME] [--json OUT.json]
    # an older commit, with the same venv (its deps must match):
    git worktree add /tmp/hearth-before HEAD
    .venv/bin/python bench/loop_latency.py --pythonpath /tmp/hearth-before --label before --json before.json

``--pythonpath DIR`` prepends DIR/src to the server's PYTHONPATH; the script checks that
the server's Python then really imports hearth from DIR/src. ``--python`` picks the
server's interpreter (default: this one). The JSON file holds the label, the git
commit of the tree that ran (and whether its src/ had uncommitted changes), p50/p99/max,
every probe latency, the load counts per kind and the machine's core count.

Needs httpx in this Python (hearth depends on it). On a 2-core machine the load keeps
both cores busy, so run it when nothing else is (no builds, no test runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


from hearth_proc import BenchError, Server, check_import, free_port, log, server_env, tree_commit


# -- the probe (runs in its own process: ``loop_latency.py --probe-child ...``) --------


def probe_child(url: str, seconds: float, interval: float, timeout: float) -> int:
    """Print "ready", wait for a line on stdin, probe for ``seconds``, print one JSON line."""
    with httpx.Client(timeout=timeout) as client:
        client.get(url)  # open the connection before the window
        print("ready", flush=True)
        sys.stdin.readline()
        lat: list[float] = []
        at: list[float] = []
        errors: list[str] = []
        t0 = time.monotonic()
        end = t0 + seconds
        nxt = t0
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if nxt > now:
                time.sleep(nxt - now)
            start = time.monotonic()
            try:
                r = client.get(url)
                dt = time.monotonic() - start
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as e:
                dt = time.monotonic() - start
                errors.append(f"{type(e).__name__}: {e}")
            lat.append(dt)
            at.append(start - t0)
            nxt = start + interval
    print(json.dumps({"t0": t0, "latencies": lat, "offsets": at, "errors": errors}), flush=True)
    return 0


# -- the load ------------------------------------------------------------------------

TOPICS = (
    "a lighthouse keeper", "a lost cat in a big city", "a baker who wakes before dawn", "a river that runs backwards",
    "two friends building a raft", "an old clock that stops at midnight", "a robot learning to paint",
    "a village library", "a storm at sea", "a garden on a rooftop", "a train crossing the mountains",
    "a child who collects stones",
)

WORDS = (
    "apple river stone window garden silver morning candle forest letter bridge shadow market lantern ocean "
    "pencil harbor meadow thunder velvet castle engine feather island jacket kettle ladder mirror needle orchard "
    "pepper quilt rocket saddle tunnel umbrella valley wagon yellow zipper anchor basket cactus dolphin eagle "
    "falcon glacier hammer igloo jungle kitten lemon magnet nectar oyster parrot quartz ribbon spider tomato "
    "violin walnut copper marble timber cotton granite bamboo saffron cedar maple walrus badger heron otter "
    "planet comet nebula galaxy crater summit canyon delta prairie tundra volcano lagoon reef canal cottage "
    "chimney doorway hallway attic cellar balcony porch fountain statue tower temple palace fortress village "
    "quickly slowly gently brightly quietly loudly carefully happily sadly bravely softly warmly kindly "
    "running jumping singing reading writing painting cooking baking sailing climbing dancing drawing "
    "ancient modern golden wooden frozen hidden broken gentle curious restless distant narrow crooked "
    "seven twelve thirty hundred thousand first second third last every several many few other"
).split()


def long_prompt(rep: int, n_words: int) -> str:
    rng = random.Random(1000 + rep)
    words = [rng.choice(WORDS) for _ in range(n_words)]
    # a sentence break now and then, so the tokenizer sees ordinary text
    for i in range(11, n_words, 12):
        words[i] += "."
    return f"Document {rep + 1}. " + " ".join(words) + "\n\nSummary:"


def big_schema(n_props: int, rep: int | None) -> dict:
    """An object schema with ``n_props`` object-valued properties; ``rep`` renames property 0."""
    kinds = ["alpha", "beta", "gamma", "delta", "epsilon"]
    levels = ["low", "medium", "high"]
    props: dict = {}
    for i in range(n_props):
        name = f"field_{i:03d}" if (i or rep is None) else f"field_000_r{rep}"
        props[name] = {
            "type": "object",
            "properties": {
                "id": {"type": "integer"},
                "label": {"type": "string"},
                "kind": {"type": "string", "enum": kinds},
                "level": {"type": "string", "enum": levels},
                "active": {"type": "boolean"},
                "score": {"type": "number"},
            },
            "required": ["id", "label", "kind", "active"],
            "additionalProperties": False,
        }
    return {"type": "object", "properties": props, "required": list(props)[: n_props // 2],
            "additionalProperties": False}


class Kind:
    """Counts for one kind of load request."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.completed = 0
        self.failed = 0
        self.cancelled = 0
        self.errors: list[str] = []
        self.seconds: list[float] = []
        self.spans: list[tuple[float, float]] = []  # (monotonic start, end) of every request, ended or not
        self.chunks = 0  # SSE chunks received, by all streams (also those cancelled at the end)
        self.extra: dict[str, list] = {}

    def fail(self, msg: str) -> None:
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(msg)

    def to_dict(self) -> dict:
        d = {"completed": self.completed, "failed": self.failed, "cancelled_at_end": self.cancelled,
             "mean_seconds": (sum(self.seconds) / len(self.seconds)) if self.seconds else None,
             "max_seconds": max(self.seconds) if self.seconds else None, "errors": self.errors}
        if self.chunks:
            d["chunks"] = self.chunks
        d.update(self.extra)
        return d


async def tracked(kind: Kind, coro_fn) -> None:
    """Run one request, timing it and sorting the outcome into ``kind``."""
    t0 = time.monotonic()
    span = [t0, None]
    kind.spans.append(span)  # type: ignore[arg-type]
    try:
        err = await coro_fn()
    except asyncio.CancelledError:
        kind.cancelled += 1
        span[1] = time.monotonic()
        raise
    except Exception as e:  # noqa: BLE001 - counted as a failure of this kind
        err = f"{type(e).__name__}: {e}"
    span[1] = time.monotonic()
    if err:
        kind.fail(err)
    else:
        kind.completed += 1
        kind.seconds.append(span[1] - t0)


async def post_json(client: httpx.AsyncClient, path: str, body: dict, kind: Kind) -> str | None:
    r = await client.post(path, json=body)
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:500]}"
    try:
        d = r.json()
    except ValueError:
        return f"not JSON: {r.text[:300]}"
    usage = d.get("usage") or {}
    kind.extra.setdefault("prompt_tokens", []).append(usage.get("prompt_tokens"))
    kind.extra.setdefault("finish_reasons", []).append(((d.get("choices") or [{}])[0]).get("finish_reason"))
    return None


async def stream_chat(client: httpx.AsyncClient, body: dict, kind: Kind) -> str | None:
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {(await r.aread())[:500].decode(errors='replace')}"
        chunks = 0
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(payload)
            except json.JSONDecodeError:
                return f"bad SSE data: {payload[:300]}"
            if "error" in chunk:
                return f"error event: {json.dumps(chunk['error'])[:500]}"
            chunks += 1
            kind.chunks += 1
        if not done:
            return f"stream ended without [DONE] after {chunks} chunks"
    return None


async def run_load(args, base: str, probe: subprocess.Popen) -> tuple[dict, dict[str, Kind]]:
    kinds = {k: Kind(k) for k in ("stream", "schema", "long_prompt")}
    window = asyncio.Event()
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=args.streams + 8, max_keepalive_connections=args.streams + 8)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)

    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:

        async def streamer(i: int) -> None:
            n = 0
            while not stop.is_set():
                topic = TOPICS[(i + n) % len(TOPICS)]
                body = {"model": args.model, "stream": True, "max_tokens": 200, "temperature": 0.7,
                        "messages": [{"role": "user", "content": f"Stream {i + 1}, request {n + 1}: "
                                                                 f"tell me a long story about {topic}."}]}
                await tracked(kinds["stream"], lambda: stream_chat(client, body, kinds["stream"]))
                n += 1

        async def heavy(kind: Kind, offset: float, make) -> None:
            await window.wait()
            nxt = time.monotonic() + offset
            rep = 0
            while True:
                delay = nxt - time.monotonic()
                if delay > 0:
                    try:
                        await asyncio.wait_for(stop.wait(), delay)
                    except asyncio.TimeoutError:
                        pass
                if stop.is_set():
                    return
                nxt = time.monotonic() + args.heavy_every
                path, body = make(rep)
                await tracked(kind, lambda: post_json(client, path, body, kind))
                rep += 1

        def schema_req(rep: int) -> tuple[str, dict]:
            schema = big_schema(args.schema_props, None if args.same_schema else rep)
            return "/v1/chat/completions", {
                "model": args.model, "max_tokens": 32, "temperature": 0.7,
                "messages": [{"role": "user", "content": "Fill in the record as JSON."}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": schema}}}

        def long_req(rep: int) -> tuple[str, dict]:
            return "/v1/completions", {"model": args.model, "max_tokens": 8, "temperature": 0.7,
                                       "prompt": long_prompt(rep, args.long_words)}

        tasks = [asyncio.create_task(streamer(i)) for i in range(args.streams)]
        tasks.append(asyncio.create_task(heavy(kinds["schema"], 0.0, schema_req)))
        tasks.append(asyncio.create_task(heavy(kinds["long_prompt"], args.heavy_every / 2, long_req)))
        try:
            await asyncio.sleep(args.ramp)
            for t in tasks:
                if t.done() and t.exception():
                    raise BenchError(f"load task failed: {t.exception()!r}")
            window.set()
            probe.stdin.write("go\n")
            probe.stdin.flush()
            out = await asyncio.to_thread(probe.stdout.read)
        finally:
            stop.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if probe.wait(30) != 0 or not lines:
        raise BenchError(f"the probe failed (exit {probe.returncode}): {out[-500:]}")
    return json.loads(lines[-1]), kinds


# -- report --------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def busy_processes() -> list[str]:
    p = subprocess.run(["pgrep", "-af", "cmake|cc1plus|pytest"], capture_output=True, text=True)
    return [ln[:120] for ln in p.stdout.splitlines() if str(os.getpid()) not in ln.split()[:1]]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe-child"]:
        url, seconds, interval, timeout = argv[1], float(argv[2]), float(argv[3]), float(argv[4])
        return probe_child(url, seconds, interval, timeout)
    ap = argparse.ArgumentParser(description="Latency of GET /health on hearth serve while streams, a big "
                                             "json_schema request and a long prompt load it.")
    ap.add_argument("--seconds", type=float, default=30.0, help="probe window in seconds (default 30)")
    ap.add_argument("--python", default=sys.executable, help="Python that runs the server (default: this one)")
    ap.add_argument("--pythonpath", metavar="DIR", help="run the server from DIR/src (prepended to PYTHONPATH)")
    ap.add_argument("--json", dest="json_out", metavar="OUT", help="write the results to this JSON file")
    ap.add_argument("--label", default=None, help="name of this run in the output (default: the commit)")
    ap.add_argument("--model", default="smollm2", help="model (default smollm2)")
    ap.add_argument("--n-ctx", type=int, default=8192, help="context per slot (default 8192)")
    ap.add_argument("--parallel", type=int, default=10, help="server slots (default 10)")
    ap.add_argument("--streams", type=int, default=8, help="concurrent streaming chat requests (default 8)")
    ap.add_argument("--interval-ms", type=float, default=20.0, help="probe period in ms (default 20)")
    ap.add_argument("--ramp", type=float, default=2.0, help="seconds of stream load before the window (default 2)")
    ap.add_argument("--heavy-every", type=float, default=6.0,
                    help="seconds between starts of the schema and of the long-prompt requests (default 6)")
    ap.add_argument("--schema-props", type=int, default=200, help="properties in the big schema (default 200)")
    ap.add_argument("--same-schema", action="store_true", help="send the identical schema every time")
    ap.add_argument("--long-words", type=int, default=3200, help="words in the long prompt (default 3200, ~4k tokens)")
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
    with tempfile.TemporaryDirectory(prefix="hearth-loop-bench-") as tmp:
        srv = Server(cmd, env, port, Path(tmp))
        probe = None
        try:
            ready = srv.wait_ready(args.start_timeout)
            log(f"# server ready after {ready:.1f} s: {' '.join(cmd)}")
            r = httpx.post(base + "/v1/chat/completions", timeout=120,
                           json={"model": args.model, "max_tokens": 8,
                                 "messages": [{"role": "user", "content": "Hello"}]})
            if r.status_code != 200:
                raise BenchError(f"warm-up request: HTTP {r.status_code}: {r.text[:500]}")
            probe = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--probe-child", base + "/health", str(args.seconds),
                 str(args.interval_ms / 1000), "30"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            if probe.stdout.readline().strip() != "ready":
                raise BenchError("the probe did not start")
            load_before = os.getloadavg()
            log(f"# load: {args.streams} streams + schema ({args.schema_props} props) + long prompt "
                f"({args.long_words} words), every {args.heavy_every:g} s; probe every {args.interval_ms:g} ms "
                f"for {args.seconds:g} s after {args.ramp:g} s ramp (load average {load_before[0]:.2f})")
            res, kinds = asyncio.run(run_load(args, base, probe))
            load_after = os.getloadavg()
            alive = srv.proc.poll() is None
            tail = srv.log_tail(40)
        finally:
            if probe is not None and probe.poll() is None:
                probe.kill()
                probe.wait()
            srv.stop()
        log(f"# server stopped: {srv.shutdown}")

    lat_ms = [x * 1000 for x in res["latencies"]]
    if not lat_ms:
        raise BenchError("no probes")
    t0 = res["t0"]
    p50, p99, mx = pct(lat_ms, 50), pct(lat_ms, 99), max(lat_ms)
    # the slowest probes, with the heavy requests that were in flight at the time
    slow = []
    for i in sorted(range(len(lat_ms)), key=lambda i: -lat_ms[i])[:5]:
        a = t0 + res["offsets"][i]
        b = a + res["latencies"][i]
        during = [k for k in ("schema", "long_prompt") for s, e in kinds[k].spans if s < b and (e is None or e > a)]
        slow.append({"offset_s": round(res["offsets"][i], 3), "ms": round(lat_ms[i], 2), "during": sorted(set(during))})
    load = {k: v.to_dict() for k, v in kinds.items()}
    for d in load.values():  # keep the per-request lists short in the summary
        for key in ("prompt_tokens", "finish_reasons"):
            if key in d:
                d[key] = sorted({str(x) for x in d[key]})

    print()
    print(f"### /health latency under load — {label}")
    print()
    print(f"{args.streams} streams + json_schema ({args.schema_props} props) + ~4k-token prompt; "
          f"probe every {args.interval_ms:g} ms for {args.seconds:g} s; {os.cpu_count()} CPUs; "
          f"commit {commit[:10] if commit else '?'}{'+dirty' if dirty else ''}")
    print()
    failed = f", {len(res['errors'])} failed" if res["errors"] else ""
    print(f"- /health: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {mx:.1f} ms, {len(lat_ms)} probes{failed}")
    for k, d in load.items():
        ms = f", mean {d['mean_seconds']:.2f} s, max {d['max_seconds']:.2f} s" if d["mean_seconds"] else ""
        extra = f", prompt_tokens {','.join(d['prompt_tokens'])}" if k == "long_prompt" and d.get("prompt_tokens") else ""
        if d.get("chunks"):
            extra += f", {d['chunks']} chunks streamed"
        print(f"- {k}: {d['completed']} completed, {d['failed']} failed, {d['cancelled_at_end']} cancelled at end{ms}{extra}")
        for e in d["errors"]:
            print(f"    error: {e}")
    print("- slowest probes (s into window, ms, heavy requests in flight): "
          + "; ".join(f"{s['offset_s']:.1f} s {s['ms']:.0f} ms {'+'.join(s['during']) or '-'}" for s in slow))
    print(f"- load average {load_before[0]:.2f} -> {load_after[0]:.2f}; server {'alive' if alive else 'DIED'} at end")
    if res["errors"]:
        print(f"- probe errors: {res['errors'][:3]}")
    if not alive:
        print("server log tail:\n" + tail)

    if args.json_out:
        Path(args.json_out).write_text(json.dumps({
            "label": label, "commit": commit, "src_dirty": dirty, "tree": str(tree), "hearth_file": hearth_file,
            "python": args.python, "command": cmd, "args": vars(args),
            "health_ms": {"p50": p50, "p99": p99, "max": mx, "count": len(lat_ms), "failed": len(res["errors"])},
            "probe_errors": res["errors"][:20], "slowest": slow, "load": load,
            "loadavg_before": load_before, "loadavg_after": load_after, "server_alive_at_end": alive,
            "server_shutdown": srv.shutdown,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "latencies_ms": [round(x, 3) for x in lat_ms], "offsets_s": [round(x, 4) for x in res["offsets"]],
        }, indent=2))
        log(f"# wrote {args.json_out}")
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
