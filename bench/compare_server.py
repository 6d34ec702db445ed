#!/usr/bin/env python3
"""Serving throughput: ``hearth serve`` vs llama.cpp's ``llama-server`` vs llama-cpp-python's server.

The same HTTP load runs against each server in turn, interleaved in one run. The
order rotates every round, so that noise on a shared machine hits all of them alike.
Every round starts each server as a fresh process, waits for it to be ready, warms it
up with one request, runs the load, measures time to first token with a few small
streaming requests, and stops the server.

* ``hearth serve --model MODEL --parallel P --n-ctx C --threads T`` (C is per slot)
* ``llama-server -m PATH -np P -c P*C --no-kv-unified -t T -tb T`` plus the batch,
  ubatch, KV type, flash attention, load mode and GPU layer flags that match hearth's plan
* ``python -m llama_cpp.server --model PATH --n_ctx C --n_threads T ...`` (one request at a time)

The load: --clients concurrent clients (threads, one keep-alive connection each). Each
sends --requests-per-client requests one after another to /v1/completions: a distinct
prompt of about 120 tokens (no prefix is shared between requests), max_tokens N,
temperature 0, repeat_penalty 1, stream false. The end-of-generation tokens get a
logit bias of -100 (hearth's OpenAI routes have no ``ignore_eos``; llama-server also
gets ``"ignore_eos": true``), so every request should generate exactly N tokens; the
script counts what ``usage.completion_tokens`` says anyway. Aggregate tokens/s = all
completion tokens / wall time from the first request sent to the last answer received.

usage (from the repository root):
    /work/venv/bin/python bench/compare_server.py [--model smollm2] [--clients 8] \
        [--max-tokens 128] [--requests-per-client 2] [--rounds 2] [--threads N] [--json OUT]

llama-server is found like in compare_llama_bench.py: --llama-bin, else $LLAMA_REF_BIN,
else ../shared/tools/build-llama-reference.sh (built once, cached). llama-cpp-python's
server needs ``pip install 'llama-cpp-python[server]'`` in the Python given by --python.

Standard library only in this process.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_batched import batched_flags  # noqa: E402  (flags matching hearth's plan)
from compare_llama_bench import (  # noqa: E402  (shared helpers)
    BenchError,
    f1,
    f3,
    find_hearth,
    find_llama_bin,
    fmt_cmd,
    guarded,
    help_default,
    log,
    parse_json_out,
    ratio,
    run_capture,
)

GOAL_VS_LLAMA_SERVER = 0.95  # hearth / llama-server, aggregate tokens/s
GOAL_VS_LLAMA_PY = 4.0  # hearth / llama-cpp-python's server
SIDES = ("hearth", "llama-server", "llama-cpp-python")

TOPICS = (
    "the history of lighthouses and the people who kept them",
    "how bread is made, from wheat field to bakery",
    "the water cycle and why rivers never run dry",
    "the life of honeybees through one full year",
    "the building of a wooden sailing ship",
    "how a small town library serves its readers",
    "the migration of birds across continents",
    "the design of bridges and the forces they carry",
    "the night sky as seen by ancient sailors",
    "the workings of a mechanical clock",
    "growing vegetables in a small city garden",
    "the craft of making paper by hand",
)

FILLER = (
    "Describe every stage in order, explain the reasons behind each step, give concrete examples, "
    "mention the tools, the materials and the people involved, compare old and modern methods, "
    "and discuss common mistakes and how to avoid them. Use plain language for a curious reader "
    "who knows nothing about the subject yet, and do not stop early: keep writing until every part "
    "has been covered in detail, then add a long summary and a list of further questions to explore."
)


def make_prompt(client: int, index: int, tag: str = "Request") -> str:
    """About 120 tokens (SmolLM2 tokenizer); the leading tag makes every prompt differ from its first tokens on."""
    topic = TOPICS[(client + index) % len(TOPICS)]
    return f"{tag} {index + 1} from client {client + 1}. Write a long, detailed essay about {topic}. {FILLER}\n\n"


# -- processes ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process in its own process group, its output in a log file."""

    def __init__(self, side: str, cmd: list[str], port: int, health: str, log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.side, self.cmd, self.port, self.health = side, cmd, port, health
        self.log_path = log_dir / f"{side}-{port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)
        self.started = time.perf_counter()

    def log_tail(self, n: int = 25) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait_ready(self, timeout: float) -> float:
        """Poll the health route until it answers 200; return the seconds it took."""
        deadline = self.started + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.side} exited with {self.proc.returncode} before it was ready:\n"
                                 f"{show_cmd(self.cmd)}\n{self.log_tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", self.health)
                status = conn.getresponse().status
                conn.close()
                if status == 200:
                    return time.perf_counter() - self.started
            except OSError:
                pass
            if time.perf_counter() > deadline:
                raise BenchError(f"{self.side} not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM to the whole group, SIGKILL after 10 s."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:  # anything left in the group (children), and the leader if it ignored SIGTERM
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            log(f"warning: {self.side} (pid {self.proc.pid}) did not exit after SIGKILL")
        self._log.close()


# -- HTTP --------------------------------------------------------------------------


def post_json(conn: http.client.HTTPConnection, path: str, body: dict) -> dict:
    data = json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    raw = resp.read()
    if resp.status != 200:
        raise BenchError(f"HTTP {resp.status} from {path}: {raw[:500].decode(errors='replace')}")
    return json.loads(raw)


def completion_body(args, prompt: str, max_tokens: int, eog: list[int], stream: bool = False) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "repeat_penalty": 1.0, "stream": stream}
    if args.eos == "mask":
        body["logit_bias"] = {str(t): -100.0 for t in eog}
        body["ignore_eos"] = True  # llama-server's; the others ignore unknown fields
    return body


def run_load(port: int, args, eog: list[int]) -> dict:
    """--clients threads, each sending --requests-per-client requests in sequence."""
    n_clients, n_req = args.clients, args.requests_per_client
    results: list[list[dict]] = [[] for _ in range(n_clients)]
    errors: list[str] = []
    barrier = threading.Barrier(n_clients + 1)

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=args.request_timeout)
        try:
            conn.connect()
            barrier.wait()
            for r in range(n_req):
                t0 = time.perf_counter()
                d = post_json(conn, "/v1/completions", completion_body(args, make_prompt(i, r), args.max_tokens, eog))
                t1 = time.perf_counter()
                usage = d.get("usage") or {}
                choice = (d.get("choices") or [{}])[0]
                results[i].append({"t_start": t0, "t_end": t1, "completion_tokens": int(usage.get("completion_tokens") or 0),
                                   "prompt_tokens": usage.get("prompt_tokens"), "finish_reason": choice.get("finish_reason")})
        except threading.BrokenBarrierError:
            pass
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"client {i + 1}: {type(e).__name__}: {e}")
            barrier.abort()
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n_clients)]
    for t in threads:
        t.start()
    try:
        barrier.wait(timeout=60)
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise BenchError("load failed: " + "; ".join(errors[:4]))
    reqs = [r for rs in results for r in rs]
    wall = max(r["t_end"] for r in reqs) - t0
    tokens = sum(r["completion_tokens"] for r in reqs)
    return {
        "tokens_per_second": tokens / wall if wall > 0 else 0.0,
        "wall_seconds": wall,
        "completion_tokens": tokens,
        "requests": len(reqs),
        "short_requests": sum(1 for r in reqs if r["completion_tokens"] < args.max_tokens),
        "mean_latency_seconds": statistics.fmean(r["t_end"] - r["t_start"] for r in reqs),
        "prompt_tokens": [r["prompt_tokens"] for r in reqs],
        "finish_reasons": sorted({str(r["finish_reason"]) for r in reqs}),
    }


def ttft_probe(port: int, args, eog: list[int], client: int) -> float:
    """One streaming request on an idle server: seconds to the first chunk with text."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=args.request_timeout)
    try:
        body = completion_body(args, make_prompt(client, 0, tag="Probe"), args.ttft_tokens, eog, stream=True)
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise BenchError(f"HTTP {resp.status} from streaming /v1/completions: {resp.read()[:500]!r}")
        first = None
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            if first is None:
                try:
                    chunk = json.loads(payload)
                except json.JSONDecodeError:
                    continue
                if any((c.get("text") or "") for c in chunk.get("choices") or []):
                    first = time.perf_counter() - t0
        if first is None:
            raise BenchError("streaming request produced no text")
        return first
    finally:
        conn.close()


# -- one server, one round ---------------------------------------------------------


def server_cmd(side: str, ctx: dict, port: int) -> tuple[list[str], str]:
    """The command line and the readiness route."""
    args, T = ctx["args"], ctx["threads"]
    if side == "hearth":
        return [ctx["hearth"], "serve", "--host", "127.0.0.1", "--port", str(port), "--model", args.model,
                "--parallel", str(args.parallel), "--n-ctx", str(args.ctx_per_slot), "--threads", str(T),
                *args.hearth_arg], "/health"
    if side == "llama-server":
        return [ctx["llama_server"], "-m", ctx["path"], "--host", "127.0.0.1", "--port", str(port),
                "-np", str(args.parallel), "-c", str(args.parallel * args.ctx_per_slot), "-t", str(T), "-tb", str(T),
                *ctx["llama_server_flags"], *args.llama_server_arg], "/health"
    return [args.python, "-c", ctx["llamapy_boot"], "--model", ctx["path"], "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", str(args.ctx_per_slot), "--n_threads", str(T), "--n_threads_batch", str(T),
            *ctx["llamapy_flags"], *args.llamapy_arg], "/v1/models"


# Runs llama_cpp.server's __main__; with --flash-attn-auto first, flash_attn=False means "auto"
# (the server only knows on/off; hearth lets llama.cpp choose). Same trick as compare_batched.py.
LLAMAPY_BOOT = r"""
import runpy, sys
if sys.argv[1:2] == ["--flash-attn-auto"]:
    del sys.argv[1]
    import llama_cpp.llama as m
    m.llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED = m.llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
sys.argv[0] = "llama_cpp.server"
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


def show_cmd(cmd: list[str]) -> str:
    """The command as text, with the llama_cpp.server boot snippet abbreviated."""
    return fmt_cmd(["<boot: python -m llama_cpp.server>" if c == LLAMAPY_BOOT else c for c in cmd])


def run_side(side: str, ctx: dict, log_dir: Path) -> dict:
    args, eog = ctx["args"], ctx["eog"]
    port = free_port()
    cmd, health = server_cmd(side, ctx, port)
    if side == "llama-cpp-python" and ctx["llamapy_fa_auto"]:
        cmd.insert(3, "--flash-attn-auto")
    srv = Server(side, cmd, port, health, log_dir)
    ctx["servers"].append(srv)
    try:
        ready_s = srv.wait_ready(args.start_timeout)
        warm = http.client.HTTPConnection("127.0.0.1", port, timeout=args.request_timeout)
        try:
            post_json(warm, "/v1/completions", completion_body(args, make_prompt(0, 0, tag="Warm-up"), 8, eog))
        finally:
            warm.close()
        load_before = os.getloadavg()[0]
        out = run_load(port, args, eog)
        ttft = [ttft_probe(port, args, eog, i) for i in range(args.ttft_probes)]
        if srv.proc.poll() is not None:
            raise BenchError(f"{side} exited during the run:\n{srv.log_tail()}")
        out.update(ready_seconds=ready_s, ttft_seconds=ttft, mean_ttft_seconds=statistics.fmean(ttft) if ttft else None,
                   loadavg_before=load_before, loadavg_after=os.getloadavg()[0], command=show_cmd(cmd))
        return out
    finally:
        srv.stop()
        ctx["servers"].remove(srv)


# -- setup -------------------------------------------------------------------------


def find_eog(python: str, path: str, timeout: float) -> list[int]:
    """End-of-generation token ids, as llama.cpp's vocabulary marks them."""
    code = (
        "import json, sys, llama_cpp\n"
        "from llama_cpp import Llama\n"
        "l = Llama(sys.argv[1], vocab_only=True, verbose=False)\n"
        "v = llama_cpp.llama_model_get_vocab(l.model)\n"
        "n = llama_cpp.llama_vocab_n_tokens(v)\n"
        "print(json.dumps([t for t in range(n) if llama_cpp.llama_vocab_is_eog(v, t)]))\n"
    )
    return [int(t) for t in parse_json_out(run_capture([python, "-c", code, path], timeout), "eog lookup")]


def llama_server_flags(server: str, plan: dict) -> tuple[list[str], list[str]]:
    help_text = subprocess.run([server, "--help"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, timeout=60).stdout
    flags, notes = batched_flags(plan, help_text)
    notes = [n.replace("llama-batched-bench", "llama-server") for n in notes]
    # one KV stream per slot, as hearth; -c is then split evenly over the -np slots
    if help_default(help_text, "--no-kv-unified")[0]:
        flags.append("--no-kv-unified")
    else:
        notes.append("llama-server has no --no-kv-unified; KV layout left at its default")
    for flag in ("--no-webui", "--no-ui"):
        if help_default(help_text, flag)[0]:
            flags.append(flag)
            break
    return flags, notes


def llamapy_flags(plan: dict, help_text: str) -> tuple[list[str], bool, list[str]]:
    """(flags, whether flash attention must be forced to auto, notes) for llama_cpp.server."""
    flags: list[str] = []
    notes: list[str] = []
    for flag, value in (("--n_batch", plan["n_batch"]), ("--n_ubatch", plan["n_ubatch"]),
                        ("--n_gpu_layers", plan["n_gpu_layers"]), ("--use_mmap", bool(plan.get("use_mmap", True))),
                        ("--use_mlock", bool(plan.get("use_mlock", False)))):
        if flag in help_text:
            flags += [flag, str(value)]
        else:
            notes.append(f"llama_cpp.server has no {flag}; wanted {value}")
    kv = str(plan["kv_type"])
    if kv != "f16":
        notes.append(f"hearth's KV type is {kv}; llama_cpp.server left at f16")
    flags += ["--verbose", "False"]
    fa = plan.get("flash_attn")
    if fa is None:
        flags += ["--flash_attn", "False"]  # read as "auto" by LLAMAPY_BOOT
        return flags, True, notes
    flags += ["--flash_attn", str(bool(fa))]
    return flags, False, notes


# -- report ------------------------------------------------------------------------


def summarize(rounds: list[dict], sides: list[str]) -> dict:
    out: dict = {}
    for s in sides:
        vals = [r[s]["tokens_per_second"] for r in rounds]
        ttft = [r[s]["mean_ttft_seconds"] for r in rounds if r[s].get("mean_ttft_seconds") is not None]
        out[s] = {
            "tokens_per_second_mean": statistics.fmean(vals),
            "tokens_per_second_rounds": vals,
            "mean_ttft_seconds": statistics.fmean(ttft) if ttft else None,
            "mean_latency_seconds": statistics.fmean(r[s]["mean_latency_seconds"] for r in rounds),
            "short_requests": sum(r[s]["short_requests"] for r in rounds),
            "requests": sum(r[s]["requests"] for r in rounds),
        }
    h = out["hearth"]["tokens_per_second_mean"]
    for s in sides:
        out[s]["hearth_ratio"] = ratio(h, out[s]["tokens_per_second_mean"])
        out[s]["hearth_ratio_rounds"] = [ratio(r["hearth"]["tokens_per_second"], r[s]["tokens_per_second"]) for r in rounds]
    return out


def print_report(summary: dict, sides: list[str], args, threads: int, info: dict) -> list[tuple[str, bool]]:
    print()
    print(f"### hearth serve vs llama-server vs llama-cpp-python server — {args.model}")
    print()
    print(f"{args.clients} concurrent clients × {args.requests_per_client} requests, max_tokens {args.max_tokens}, "
          f"~120-token distinct prompts, temperature 0, EOS {'masked' if args.eos == 'mask' else 'allowed'}; "
          f"{threads} threads, {args.parallel} slots × {args.ctx_per_slot} tokens; {args.rounds} round(s), "
          f"order rotated; {platform.machine()}, {os.cpu_count()} CPUs")
    print()
    print("| server | aggregate tok/s (mean) | hearth / server | per-round tok/s | mean request latency (s) "
          "| mean TTFT, idle (ms) | short requests |")
    print("|---|---:|---:|---|---:|---:|---:|")
    names = {"hearth": "hearth serve", "llama-server": f"llama-server -np {args.parallel}",
             "llama-cpp-python": "llama-cpp-python server"}
    for s in sides:
        d = summary[s]
        ttft = d["mean_ttft_seconds"]
        print(f"| {names[s]} | {f1(d['tokens_per_second_mean'])} | {f3(d['hearth_ratio']) if s != 'hearth' else '1'} | "
              f"{', '.join(f1(v) for v in d['tokens_per_second_rounds'])} | {f3(d['mean_latency_seconds'])} | "
              f"{'n/a' if ttft is None else f'{ttft * 1000:.0f}'} | {d['short_requests']}/{d['requests']} |")
    print()
    for s in sides:
        if s != "hearth":
            print(f"per-round hearth / {s}: {', '.join(f3(x) for x in summary[s]['hearth_ratio_rounds'])}")
    checks: list[tuple[str, bool]] = []
    if "llama-server" in sides:
        r = summary["llama-server"]["hearth_ratio"]
        checks.append((f"hearth / llama-server = {f3(r)} >= {GOAL_VS_LLAMA_SERVER}", r is not None and r >= GOAL_VS_LLAMA_SERVER))
    if "llama-cpp-python" in sides:
        r = summary["llama-cpp-python"]["hearth_ratio"]
        checks.append((f"hearth / llama-cpp-python = {f3(r)} >= {GOAL_VS_LLAMA_PY}", r is not None and r >= GOAL_VS_LLAMA_PY))
    print()
    for text, ok in checks:
        print(f"- goal {'MET' if ok else 'MISSED'}: {text}")
    short = sum(summary[s]["short_requests"] for s in sides)
    if short:
        print(f"- note: {short} request(s) stopped before max_tokens; tok/s counts the tokens actually generated")
    return checks


# -- main --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="hearth serve vs llama-server vs llama-cpp-python's server, "
                                             "the same concurrent HTTP load, interleaved.")
    ap.add_argument("--model", default="smollm2", help="model name or .gguf path (default: smollm2)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request (default 128)")
    ap.add_argument("--requests-per-client", type=int, default=2, help="sequential requests per client (default 2)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    ap.add_argument("--threads", "-t", type=int, default=None,
                    help="threads for all servers (default: what hearth's planner picks)")
    ap.add_argument("--parallel", type=int, default=None,
                    help="slots for hearth and llama-server (default: --clients)")
    ap.add_argument("--ctx-per-slot", type=int, default=1024, help="context tokens per slot, all servers (default 1024)")
    ap.add_argument("--eos", choices=("mask", "natural"), default="mask",
                    help="mask: logit bias -100 on end-of-generation tokens so every request runs to max_tokens "
                         "(default); natural: let the model stop, count usage.completion_tokens")
    ap.add_argument("--ttft-probes", type=int, default=None,
                    help="streaming requests (sequential, idle server, max_tokens --ttft-tokens) for time to "
                         "first token (default: --clients; 0 = skip)")
    ap.add_argument("--ttft-tokens", type=int, default=4, help="max_tokens of a ttft probe (default 4)")
    ap.add_argument("--skip-llama-cpp-python", action="store_true", help="leave out llama-cpp-python's server")
    ap.add_argument("--skip-llama-server", action="store_true", help="leave out llama-server")
    ap.add_argument("--json", dest="json_out", metavar="OUT", help="write every number and command to this JSON file")
    ap.add_argument("--llama-bin", help="folder holding llama-server (default: $LLAMA_REF_BIN, else build-llama-reference.sh)")
    ap.add_argument("--hearth", help="hearth CLI (default: the one next to this Python)")
    ap.add_argument("--python", default=sys.executable,
                    help="Python with llama-cpp-python[server] (default: this one)")
    ap.add_argument("--hearth-arg", action="append", default=[], metavar="ARG", help="extra argument for hearth serve")
    ap.add_argument("--llama-server-arg", action="append", default=[], metavar="ARG", help="extra argument for llama-server")
    ap.add_argument("--llamapy-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for python -m llama_cpp.server")
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds a server may take to get ready (default 300)")
    ap.add_argument("--request-timeout", type=float, default=1800.0, help="HTTP timeout per request (default 1800)")
    ap.add_argument("--strict", action="store_true", help="exit 2 when a goal is not met")
    args = ap.parse_args(argv)
    if args.parallel is None:
        args.parallel = args.clients
    if args.ttft_probes is None:
        args.ttft_probes = args.clients
    if min(args.clients, args.max_tokens, args.requests_per_client, args.rounds, args.parallel, args.ctx_per_slot) < 1:
        ap.error("--clients, --max-tokens, --requests-per-client, --rounds, --parallel, --ctx-per-slot must be >= 1")

    # turn SIGTERM/SIGHUP into an exception so the finally blocks stop the servers
    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    ctx: dict = {"servers": []}
    try:
        return guarded(run, args, ctx)
    finally:
        for srv in list(ctx["servers"]):
            srv.stop()


def run(args, ctx: dict) -> int:
    hearth = find_hearth(args.hearth)
    sides = [s for s in SIDES if not (s == "llama-server" and args.skip_llama_server)
             and not (s == "llama-cpp-python" and args.skip_llama_cpp_python)]
    # the plan hearth serve will load with (same wishes as its command line)
    info_cmd = [hearth, "info", args.model, "--json", "--parallel", str(args.parallel), "--n-ctx", str(args.ctx_per_slot)]
    if args.threads:
        info_cmd += ["--threads", str(args.threads)]
    info = parse_json_out(run_capture(info_cmd, 300), "hearth info")
    plan = info["plan"]
    path = info["model"]["path"]
    threads = args.threads or int(plan["n_threads"])
    ctx.update(args=args, hearth=hearth, path=path, threads=threads, plan=plan)
    log(f"# model {args.model}: {path}")
    log(f"# threads {threads}; hearth plan: batch {plan['n_batch']}, ubatch {plan['n_ubatch']}, kv {plan['kv_type']}, "
        f"flash_attn {plan.get('flash_attn')}, parallel {plan['parallel']}, n_ctx/slot {plan['n_ctx']}")
    notes: list[str] = []
    if "llama-server" in sides:
        bin_dir, how = find_llama_bin(args.llama_bin, 7200)
        server = bin_dir / "llama-server"
        if not server.exists():
            raise BenchError(f"no llama-server in {bin_dir} (found via {how})")
        ctx["llama_server"] = str(server)
        ctx["llama_server_flags"], n = llama_server_flags(str(server), plan)
        notes += n
        log(f"# llama-server: {server} (via {how}); flags to match hearth: {' '.join(ctx['llama_server_flags'])}")
    if "llama-cpp-python" in sides:
        probe = subprocess.run([args.python, "-c", "import llama_cpp, llama_cpp.server.app; print(llama_cpp.__version__)"],
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        if probe.returncode != 0:
            raise BenchError(f"{args.python} cannot import llama_cpp.server (pip install 'llama-cpp-python[server]', "
                             f"or pass --skip-llama-cpp-python):\n{probe.stderr.strip()[-800:]}")
        ctx["llamapy_version"] = probe.stdout.strip()
        help_text = run_capture([args.python, "-m", "llama_cpp.server", "--help"], 120)
        ctx["llamapy_flags"], ctx["llamapy_fa_auto"], n = llamapy_flags(plan, help_text)
        ctx["llamapy_boot"] = LLAMAPY_BOOT
        notes += n
        log(f"# llama-cpp-python {ctx['llamapy_version']} server flags: {' '.join(ctx['llamapy_flags'])}"
            f"{' (flash_attn False read as auto)' if ctx['llamapy_fa_auto'] else ''}")
    ctx["eog"] = find_eog(args.python, path, 300) if args.eos == "mask" else []
    if args.eos == "mask":
        log(f"# end-of-generation tokens masked with logit_bias -100: {ctx['eog']}")
    for n in notes:
        log(f"# note: {n}")

    rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="hearth-serve-bench-") as tmp:
        for rnd in range(args.rounds):
            k = rnd % len(sides)
            order = sides[k:] + sides[:k]
            log(f"# round {rnd + 1}/{args.rounds}: {' -> '.join(order)} (load average {os.getloadavg()[0]:.2f})")
            res: dict = {"order": order}
            for side in order:
                d = run_side(side, ctx, Path(tmp))
                res[side] = d
                ttft = d["mean_ttft_seconds"]
                log(f"#   {side:17s} {d['tokens_per_second']:8.1f} tok/s  ({d['completion_tokens']} tokens in "
                    f"{d['wall_seconds']:.2f} s, {d['short_requests']} short; ready after {d['ready_seconds']:.1f} s; "
                    f"ttft {'n/a' if ttft is None else f'{ttft * 1000:.0f} ms'}; "
                    f"load {d['loadavg_before']:.2f} -> {d['loadavg_after']:.2f})")
            rounds.append(res)

    summary = summarize(rounds, sides)
    checks = print_report(summary, sides, args, threads, info)
    print()
    print("commands (ports vary):")
    for s in sides:
        print(f"    {rounds[-1][s]['command']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({
            "model": args.model, "path": path, "threads": threads, "plan": plan, "args": vars(args),
            "eog_tokens": ctx["eog"], "llama_cpp_python": ctx.get("llamapy_version"), "notes": notes,
            "llamapy_boot": LLAMAPY_BOOT,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "rounds": rounds, "summary": summary,
            "goals": [{"check": t, "met": ok} for t, ok in checks],
        }, indent=2))
        log(f"# wrote {args.json_out}")
    if args.strict and not all(ok for _, ok in checks):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
