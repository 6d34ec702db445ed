#!/usr/bin/env python3
"""A model split across RPC workers: hearth vs llama.cpp's llama-bench, same split, same run.

The workers are this benchmark's own test hosts: network namespaces hearth-rbK with a
veth pair each (10.231.(20+K).2 inside, 10.231.(20+K).1 here), made at start and removed
at exit (nothing else is ever addressed). Each namespace runs two workers side by side:

* ``ggml-rpc-server`` of the reference llama.cpp build (port 50052, ``-c`` cache), used
  by both clients: the fair comparison;
* ``hearth worker`` (port 50053, ``--cache``), used by hearth too, so that a difference
  between the two workers shows on its own.

For each network setting (``--networks``) and each split (``--splits``), every round runs
hearth (``load_model(path, hosts=..., n_gpu_layers=N, tensor_split=...)``, in a child
process) and ``llama-bench --rpc ... -ngl N -ts ...`` with the same model file, threads
and split; the order rotates every round. Reported: prompt (pp) and generation (tg)
tokens/s, ratios hearth / llama-bench (goal >= 0.95), and the time to load the model
through workers with an empty and then a filled tensor cache (with the bytes sent).

hearth's pp here is n / (prompt_seconds + generation_seconds) of a one-token request: the
time until the first token's logits exist, as llama-bench's decode + llama_synchronize.
hearth's own prompt_seconds (printed as "hearth's own pp figure") stops when llama_decode
returns, and over RPC that is before the last worker has finished (the RPC backend
computes asynchronously): it overstates pp by up to 1.8x. tg is benchmark_inference's:
n tokens from a one-token prompt / the whole request.

Network shaping: ``tc qdisc replace ... tbf rate R`` on both ends of each veth. This
kernel may lack ``netem`` (checked and reported), so latency is added by a small
user-space TCP proxy (``_proxy`` below: a fixed delay per direction, RTT/2 each) that
both clients go through when a setting names an RTT. Where ``ip netns`` is not allowed
(not root, no ``ip``), the workers run on loopback ports, unshaped, and the report says so.

usage (from the repository root, as root for the namespaces):
    .venv/bin/python bench/compare_rpc.py                      # smollm2, 2 workers, 1gbit:0 and 100mbit:2, 3 rounds
    .venv/bin/python bench/compare_rpc.py --rounds 1 -p 32 -n 8 -r 1 --networks 1gbit:0 --splits all@1/1 --loads 0
    .venv/bin/python bench/compare_rpc.py --json out.json --cross   # also llama-bench through hearth worker

Standard library only in this process; the hearth side runs in the Python given by
--python (default: this one), which must import hearth.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_llama_bench import (  # noqa: E402  (shared helpers)
    BenchError,
    f1,
    f3,
    find_llama_bin,
    fmt_cmd,
    guarded,
    llama_bench_help,
    llama_flags_for_plan,
    log,
    parse_json_out,
    ratio,
)

REPO = Path(__file__).resolve().parent.parent
GOAL_RATIO = 0.95
NS_PREFIX = "hearth-rb"  # our namespaces: hearth-rb1, hearth-rb2, ... (the tests use hearth-mhK)
VETH_PREFIX = "hrb"  # hrbK here, hrbKp inside
SUBNET_BASE = 20  # 10.231.(20+K).0/24 (the tests use 10.231.K.0/24 with K = 1, 2)
PORT_RPC_SERVER = 50052
PORT_HEARTH_WORKER = 50053
PORT_SINK = 50060

# enum rpc_cmd of ggml-rpc (protocol 7.x): the three commands spoken here
_CMD_HELLO, _CMD_DEVICE_COUNT = 14, 15
_CONN_CAPS = 24


# -- small helpers --------------------------------------------------------------------


def sh(*cmd: str, check: bool = False, timeout: float = 30) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise BenchError(f"exit {p.returncode}: {fmt_cmd(list(cmd))}: {p.stderr.strip()}")
    return p


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def _rpc(sock: socket.socket, cmd: int, payload: bytes, reply: int) -> bytes:
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    (size,) = struct.unpack("<Q", _recv(sock, 8))
    if size != reply:
        raise ConnectionError(f"reply of {size} bytes to command {cmd}")
    return _recv(sock, size)


def rpc_rtt(endpoint: str, n: int = 30, timeout: float = 5.0) -> dict:
    """HELLO, then ``n`` DEVICE_COUNT round trips (a tiny request and reply): the RTT a
    client sees, network plus worker. Raises OSError/ConnectionError when not serving."""
    host, port = endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hello = _rpc(s, _CMD_HELLO, bytes(_CONN_CAPS), 4 + _CONN_CAPS)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            _rpc(s, _CMD_DEVICE_COUNT, b"", 4)
            times.append(time.perf_counter() - t0)
    return {"version": f"{hello[0]}.{hello[1]}.{hello[2]}", "median_ms": statistics.median(times) * 1e3,
            "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3, "n": n}


def wait_serving(endpoint: str, proc: subprocess.Popen, logfile: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            rpc_rtt(endpoint, n=1, timeout=2)
            return
        except (OSError, ConnectionError):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
                raise BenchError(f"worker {endpoint} did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.2)


class Procs:
    """Every long-lived process this benchmark starts (own session each), killed at exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], logfile: Path, env: dict[str, str] | None = None,
              stdout: int | None = None) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                             stdout=stdout if stdout is not None else open(logfile, "ab"),
                             stderr=open(logfile, "ab"), start_new_session=True, env=env)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in list(self.procs):
            try:
                self.stop(p)
            except Exception:  # noqa: BLE001  (cleanup goes on)
                pass


# -- the test's own hosts: namespaces, veths, shaping -----------------------------------


class Net:
    """``count`` namespaces hearth-rbK, or loopback when namespaces are not allowed."""

    def __init__(self, count: int, force_loopback: bool) -> None:
        self.count = count
        self.names = [f"{NS_PREFIX}{k}" for k in range(1, count + 1)]
        self.made: list[int] = []
        self.why_not = ""
        if force_loopback:
            self.why_not = "--loopback given"
        elif shutil.which("ip") is None or shutil.which("tc") is None:
            self.why_not = "no `ip`/`tc` here"
        elif os.geteuid() != 0:
            self.why_not = "not root"
        self.ok = not self.why_not
        if self.ok:
            for k in range(1, count + 1):
                self._remove(k)  # ours, left over from a killed run
                err = self._make(k)
                if err:
                    self.why_not = err
                    self.ok = False
                    self.close()
                    break

    def veth(self, k: int) -> str:
        return f"{VETH_PREFIX}{k}"

    def ns(self, k: int) -> str:
        return self.names[k - 1]

    def worker_addr(self, k: int) -> str:
        return f"10.231.{SUBNET_BASE + k}.2" if self.ok else "127.0.0.1"

    def _make(self, k: int) -> str:
        ns, v, net = self.ns(k), self.veth(k), f"10.231.{SUBNET_BASE + k}"
        steps = [("ip", "netns", "add", ns)]
        for i, s in enumerate(steps + [
            ("ip", "link", "add", v, "type", "veth", "peer", "name", f"{v}p"),
            ("ip", "link", "set", f"{v}p", "netns", ns),
            ("ip", "addr", "add", f"{net}.1/24", "dev", v),
            ("ip", "link", "set", v, "up"),
            ("ip", "netns", "exec", ns, "ip", "addr", "add", f"{net}.2/24", "dev", f"{v}p"),
            ("ip", "netns", "exec", ns, "ip", "link", "set", f"{v}p", "up"),
            ("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"),
        ]):
            p = sh(*s)
            if i == 0 and p.returncode == 0:
                self.made.append(k)
            if p.returncode != 0:
                return f"`{' '.join(s)}` failed: {p.stderr.strip()}"
        return ""

    def _remove(self, k: int) -> None:
        sh("ip", "link", "del", self.veth(k))  # removes its peer and both qdiscs
        sh("ip", "netns", "del", self.ns(k))

    def close(self) -> None:
        for k in list(self.made):
            self._remove(k)
        self.made = []

    def wrap(self, k: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(k), *argv] if self.ok else argv

    def tx_bytes(self) -> int:
        """Bytes sent from here into all our namespaces so far (0 without namespaces)."""
        if not self.ok:
            return 0
        return sum(int(Path(f"/sys/class/net/{self.veth(k)}/statistics/tx_bytes").read_text())
                   for k in range(1, self.count + 1))

    def netem_check(self) -> str:
        """Whether netem (latency in the kernel) exists: try it on our own veth, remove it."""
        if not self.ok:
            return "not checked (no namespaces)"
        p = sh("tc", "qdisc", "add", "dev", self.veth(1), "root", "netem", "delay", "1ms")
        sh("tc", "qdisc", "del", "dev", self.veth(1), "root")
        if p.returncode == 0:
            return "available (`tc qdisc add ... netem delay 1ms` worked; this script adds latency with its proxy anyway)"
        return f"missing: `tc qdisc add dev {self.veth(1)} root netem delay 1ms` -> {p.stderr.strip() or p.returncode}"

    def shape(self, rate: str | None) -> list[str]:
        """tbf at ``rate`` on both ends of every veth (None: remove). Returns the commands."""
        cmds = []
        for k in range(1, self.count + 1):
            for where in ([], ["ip", "netns", "exec", self.ns(k)]):
                dev = self.veth(k) if not where else f"{self.veth(k)}p"
                if rate is None:
                    sh(*where, "tc", "qdisc", "del", "dev", dev, "root")
                    continue
                bps = parse_rate(rate)
                burst = max(32 * 1024, bps // 8 // 1000)  # >= 1 ms worth, >= one 64 KiB GSO packet / 2
                cmd = [*where, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                       "burst", str(burst), "latency", "50ms"]
                sh(*cmd, check=True)
                cmds.append(" ".join(cmd))
        return cmds


def parse_rate(rate: str) -> int:
    r = rate.lower().strip()
    for suffix, mult in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3), ("bit", 1)):
        if r.endswith(suffix):
            return int(float(r[: -len(suffix)]) * mult)
    raise ValueError(f"rate {rate!r}: use e.g. 1gbit, 100mbit")


def parse_network(spec: str) -> dict:
    """``RATE[:RTT_MS]``: ``1gbit:0``, ``100mbit:2``, ``none:0`` (unshaped)."""
    rate, _, rtt = spec.partition(":")
    rate = rate.strip().lower()
    if rate not in ("none", "unshaped"):
        parse_rate(rate)
    return {"name": spec, "rate": None if rate in ("none", "unshaped") else rate, "rtt_ms": float(rtt or 0)}


def throughput_check(net: Net, procs: Procs, tmp: Path, python: str, seconds: float, rate: str | None) -> dict:
    """Bytes/s from here to a sink in namespace 1 (one TCP stream): what the shaping gives."""
    if not net.ok:
        return {}
    addr = net.worker_addr(1)
    sink = ("import socket,sys\n"
            f"s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('{addr}',{PORT_SINK}))\n"
            "s.listen(1);print('ready',flush=True);c,_=s.accept();n=0\n"
            "while True:\n b=c.recv(1<<20)\n if not b: break\n n+=len(b)\n"
            "c.sendall(str(n).encode());c.close()\n")
    logf = tmp / "sink.log"
    p = procs.start(net.wrap(1, [python, "-c", sink]), logf, stdout=subprocess.PIPE)
    try:
        if p.stdout.readline().strip() != b"ready":
            raise BenchError(f"throughput sink did not start: {logf.read_text()[-500:]}")
        size = int((parse_rate(rate) if rate else 10**9) / 8 * seconds)
        size = max(4 << 20, min(size, 400 << 20))
        buf = b"\0" * (1 << 20)
        with socket.create_connection((addr, PORT_SINK), timeout=60) as s:
            t0 = time.perf_counter()
            left = size
            while left > 0:
                n = min(left, len(buf))
                s.sendall(buf[:n])
                left -= n
            s.shutdown(socket.SHUT_WR)
            got = int(_recv_all(s))
            dt = time.perf_counter() - t0
        return {"bytes": got, "seconds": dt, "mbit_per_s": got * 8 / dt / 1e6}
    finally:
        procs.stop(p)


def _recv_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        b = s.recv(4096)
        if not b:
            return out
        out += b


# -- the delay proxy (a process of its own) -----------------------------------------------


def proxy_main(delay_ms: float, maps: list[str]) -> int:
    """Forward 127.0.0.1:LPORT to HOST:PORT for each ``LPORT=HOST:PORT``, holding every
    chunk ``delay_ms`` in each direction. Threads with sleep, not asyncio: epoll's
    timeout is in whole milliseconds, which would round a 1 ms delay up to 1-2 ms."""
    delay = delay_ms / 1e3

    def pump(src: socket.socket, dst: socket.socket) -> None:
        q: queue.Queue = queue.Queue()

        def writer() -> None:
            try:
                while True:
                    item = q.get()
                    if item is None:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    due, data = item
                    wait = due - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=writer, daemon=True).start()
        try:
            while True:
                data = src.recv(1 << 18)
                if not data:
                    break
                q.put((time.perf_counter() + delay, data))
        except OSError:
            pass
        q.put(None)

    def serve(lport: int, target: tuple[str, int]) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", lport))
        ls.listen(16)
        while True:
            c, _ = ls.accept()
            try:
                s = socket.create_connection(target, timeout=10)
                s.settimeout(None)
            except OSError:
                c.close()
                continue
            for x in (c, s):
                x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=pump, args=(c, s), daemon=True).start()
            threading.Thread(target=pump, args=(s, c), daemon=True).start()

    for m in maps:
        lport, target = m.split("=", 1)
        host, port = target.rsplit(":", 1)
        threading.Thread(target=serve, args=(int(lport), (host, int(port))), daemon=True).start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    return 0


# -- the hearth side (a process of its own, in --python) ----------------------------------


def hearth_main(a: argparse.Namespace) -> int:
    """One hearth measurement; prints one JSON object on stdout."""
    import hearth
    from hearth.api import benchmark_inference, plan_model

    hosts = [h for h in a.hosts.split(",") if h]
    kw: dict = {"n_ctx": a.n_ctx, "parallel": 1, "n_threads": a.threads}
    out: dict = {"hearth_version": getattr(hearth, "__version__", "?")}
    if hosts:
        kw.update(hosts=hosts, n_gpu_layers=a.ngl)
        if a.ts:  # else the planner splits by the workers' free memory (the plan says how)
            kw["tensor_split"] = [float(x) for x in a.ts.split(",")]
            from hearth import api

            if "tensor_split" not in api.LOAD_SETTINGS:
                # LoadOptions and the planner take a user's tensor_split, but load_model's list of
                # settings does not name it (yet): let it through in this process only, and say so
                api.LOAD_SETTINGS = (*api.LOAD_SETTINGS, "tensor_split")
                out["note"] = ("load_model refuses tensor_split (not in hearth.api.LOAD_SETTINGS); "
                               "the benchmark adds it there in its own process")
    if a.mode == "plan":
        out["plan"] = plan_model(a.model, **kw).to_dict()
    elif a.mode == "load":
        loads = []
        for _ in range(a.loads):
            t0 = time.perf_counter()
            m = hearth.load_model(a.model, **kw)
            loads.append(time.perf_counter() - t0)
            out["placement"] = m.plan.placement
            m.close()
        out["load_seconds"] = loads
    else:
        t0 = time.perf_counter()
        m = hearth.load_model(a.model, **kw)
        out["load_seconds"] = time.perf_counter() - t0
        try:
            # pp: as benchmark_inference (random tokens, one generated, greedy), but timed to the
            # end of the request too: hearth's prompt_seconds ends when llama_decode returns, and
            # with an asynchronous backend (RPC) that is before the workers have finished; the
            # first token's sampling waits for them. pp = n / (prompt_seconds + generation_seconds)
            # is what llama-bench measures (decode, then llama_synchronize).
            import random

            rng = random.Random(1234)
            greedy = dict(temperature=0.0, repeat_penalty=1.0, ignore_eos=True)
            n_vocab = m.engine.n_vocab
            m.generate_text([rng.randrange(n_vocab) for _ in range(32)], max_tokens=2, **greedy)  # warm-up
            pp, pp_reported, ttft = [], [], []
            for _ in range(a.repetitions if a.n_prompt else 0):
                r = m.generate_text([rng.randrange(n_vocab) for _ in range(a.n_prompt)], max_tokens=1, **greedy)
                t = r.timings
                pp.append(a.n_prompt / (t.prompt_seconds + t.generation_seconds))
                pp_reported.append(a.n_prompt / t.prompt_seconds)
                ttft.append(t.ttft)
            # tg: benchmark_inference's own (n tokens from a one-token prompt / the whole request)
            r = benchmark_inference(m, n_prompt=0, n_gen=a.n_gen, repetitions=a.repetitions) if a.n_gen else None
            out.update(pp=statistics.fmean(pp) if pp else 0.0, pp_samples=pp,
                       pp_hearth_reported=statistics.fmean(pp_reported) if pp_reported else 0.0,
                       pp_hearth_reported_samples=pp_reported, ttft_hearth_reported=ttft,
                       tg=r.tg_tokens_per_second if r else 0.0, tg_samples=r.tg_samples if r else [],
                       n_threads=m.plan.n_threads, plan={k: v for k, v in m.plan.to_dict().items() if k != "memory"})
        finally:
            m.close()
    print(json.dumps(out, default=str))
    return 0


def run_json(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[dict | list, str]:
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, env=env,
                           start_new_session=True)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"timed out after {timeout:.0f} s: {fmt_cmd(cmd)}") from e
    if p.returncode != 0:
        tail = "\n".join(p.stderr.strip().splitlines()[-20:])
        raise BenchError(f"exit {p.returncode}: {fmt_cmd(cmd)}\n{tail}")
    return parse_json_out(p.stdout, cmd[0]), p.stderr


# -- one measurement per client ---------------------------------------------------------


def hearth_cmd(args, mode: str, hosts: list[str], split: dict, **extra) -> list[str]:
    cmd = [args.python, str(Path(__file__).resolve()), "_hearth", mode, "--model", args.model_path,
           "--hosts", ",".join(hosts), "--ngl", str(split["ngl"]), "--ts", ",".join(map(str, split["ts"] or [])),
           "--threads", str(args.threads), "--n-ctx", str(args.n_ctx),
           "-p", str(args.n_prompt), "-n", str(args.n_gen), "-r", str(args.repetitions)]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    return cmd


def run_hearth(args, hosts: list[str], split: dict) -> dict:
    cmd = hearth_cmd(args, "bench", hosts, split)
    t0 = time.perf_counter()
    d, _ = run_json(cmd, args.timeout)
    d["wall_seconds"] = time.perf_counter() - t0
    d["command"] = fmt_cmd(cmd)
    d["layers"] = {p["device"]: p["n_layers"] for p in (d.get("plan") or {}).get("placement", [])}
    return d


def run_llama(args, hosts: list[str], split: dict, flags: list[str]) -> dict:
    cmd = [args.llama_bench, "-m", args.model_path, "-p", str(args.n_prompt), "-n", str(args.n_gen),
           "-t", str(args.threads), "-r", str(args.repetitions), "-o", "json", "--rpc", ",".join(hosts),
           *flags, "-ts", "/".join(f"{x:g}" for x in split["llama_ts"]), "-v", *args.llama_arg]
    t0 = time.perf_counter()
    rows, err = run_json(cmd, args.timeout)
    rows = rows if isinstance(rows, list) else [rows]
    out: dict = {"pp": 0.0, "tg": 0.0, "pp_samples": [], "tg_samples": []}
    for r in rows:
        key = "pp" if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0 else \
            "tg" if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0 else None
        if key:
            out[key] = float(r["avg_ts"])
            out[key + "_samples"] = r.get("samples_ts", [])
            out["build"] = {k: r.get(k) for k in ("build_commit", "build_number", "backends", "n_gpu_layers",
                                                  "tensor_split", "n_threads", "n_batch", "n_ubatch", "flash_attn")}
    if (args.n_prompt and not out["pp"]) or (args.n_gen and not out["tg"]):
        raise BenchError(f"llama-bench printed no pp/tg result:\n{json.dumps(rows)[:1500]}")
    # where llama.cpp put the layers (its own log, -v): offloaded N/M, model buffer per device
    out["log"] = [ln.strip() for ln in err.splitlines()
                  if "offloaded" in ln or "model buffer size" in ln][:12]
    out["wall_seconds"] = time.perf_counter() - t0
    out["command"] = fmt_cmd(cmd)
    return out


# -- the run ------------------------------------------------------------------------------


def parse_split(spec: str, n_workers: int, offloadable: int) -> dict:
    """``20`` / ``all``, optionally ``@1/1`` for the tensor split (else hearth's planner's)."""
    ngl_s, _, ts_s = spec.partition("@")
    ngl = offloadable if ngl_s in ("all", "-1") else int(ngl_s)
    ts = [float(x) for x in ts_s.split("/")] if ts_s else None
    if ts is not None and len(ts) != n_workers:
        raise BenchError(f"split {spec!r}: {len(ts)} tensor-split values for {n_workers} workers")
    name = f"ngl {ngl}" + (" (all)" if ngl == offloadable else "") + (f" ts {'/'.join(f'{x:g}' for x in ts)}" if ts else "")
    # llama_ts: what llama-bench gets, the tensor_split of hearth's plan (filled in from it)
    return {"name": name, "spec": spec, "ngl": ngl, "ts": ts, "llama_ts": ts}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_proxy"]:
        ap = argparse.ArgumentParser(prog="compare_rpc.py _proxy")
        ap.add_argument("--delay-ms", type=float, required=True)
        ap.add_argument("maps", nargs="+")
        a = ap.parse_args(argv[1:])
        return proxy_main(a.delay_ms, a.maps)
    if argv[:1] == ["_hearth"]:
        ap = argparse.ArgumentParser(prog="compare_rpc.py _hearth")
        ap.add_argument("mode", choices=["plan", "load", "bench"])
        ap.add_argument("--model", required=True)
        ap.add_argument("--hosts", default="")
        ap.add_argument("--ngl", type=int, default=0)
        ap.add_argument("--ts", default="")
        ap.add_argument("--threads", type=int, required=True)
        ap.add_argument("--n-ctx", type=int, required=True)
        ap.add_argument("-p", "--n-prompt", type=int, default=512)
        ap.add_argument("-n", "--n-gen", type=int, default=128)
        ap.add_argument("-r", "--repetitions", type=int, default=3)
        ap.add_argument("--loads", type=int, default=2)
        return hearth_main(ap.parse_args(argv[1:]))

    ap = argparse.ArgumentParser(description="hearth vs llama-bench over llama.cpp RPC workers, same split, same run.")
    ap.add_argument("--model", default="smollm2", help="model name or .gguf path (default smollm2, the embedded one)")
    ap.add_argument("--workers", type=int, default=2, help="worker namespaces (default 2)")
    ap.add_argument("--splits", default="20@1/1,all@1/1",
                    help="comma-separated: layers on the workers (N or all), @TS for the tensor split over the "
                         "workers (20@1/1: even); without @TS, hearth's planner splits and llama-bench gets its "
                         "tensor_split (default 20@1/1,all@1/1)")
    ap.add_argument("--networks", default="1gbit:0,100mbit:2",
                    help="comma-separated RATE:RTT_MS; RATE via tbf on both veth ends (none = unshaped), "
                         "RTT_MS > 0 through the delay proxy, RTT/2 each way (default 1gbit:0,100mbit:2)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per network and split (default 3)")
    ap.add_argument("--threads", "-t", type=int, default=None, help="threads, client and workers (default: cores)")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=3, help="repetitions inside each call (default 3)")
    ap.add_argument("--n-ctx", type=int, default=None, help="hearth's context (default p+n+16)")
    ap.add_argument("--no-hearth-worker", action="store_true", help="skip hearth through `hearth worker`")
    ap.add_argument("--cross", action="store_true", help="also llama-bench through `hearth worker`")
    ap.add_argument("--load-split", default="all@1/1", help="split for the load-time measurement (default all@1/1)")
    ap.add_argument("--loads", type=int, default=2, help="loads in a row per worker kind (default 2; 0 skips)")
    ap.add_argument("--throughput-seconds", type=float, default=1.5, help="link check size, in seconds at RATE")
    ap.add_argument("--loopback", action="store_true", help="workers on loopback ports (no namespaces, no shaping)")
    ap.add_argument("--python", default=None, help="Python that imports hearth (default: this one)")
    ap.add_argument("--llama-bin", help="folder of llama-bench and ggml-rpc-server")
    ap.add_argument("--llama-arg", action="append", default=[], metavar="ARG", help="extra llama-bench argument")
    ap.add_argument("--hearth", default=None, help="hearth CLI, for `hearth worker` (default: next to --python)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per program run (default 900)")
    ap.add_argument("--json", dest="json_out", metavar="OUT")
    ap.add_argument("--strict", action="store_true", help="exit 2 when a ratio misses the goal")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.repetitions < 1:
        ap.error("--rounds and -r must be >= 1")
    return guarded(run, args)


def run(args) -> int:
    args.python = args.python or sys.executable
    hearth_cli = args.hearth or str(Path(args.python).parent / "hearth")
    llama_dir, llama_src = find_llama_bin(args.llama_bin, args.timeout)
    args.llama_bench = str(llama_dir / "llama-bench")
    rpc_server = str(llama_dir / "ggml-rpc-server")
    for exe in (args.llama_bench, rpc_server, hearth_cli):
        if not os.access(exe, os.X_OK):
            raise BenchError(f"{exe} is not an executable")
    info, _ = run_json([hearth_cli, "info", args.model, "--json"], 120)
    args.model_path = info["model"]["path"]
    offloadable = int(info["model"]["block_count"]) + 1
    threads = args.threads or int(info["plan"]["n_threads"])
    args.threads = threads
    args.n_ctx = args.n_ctx or args.n_prompt + args.n_gen + 16
    splits = [parse_split(s.strip(), args.workers, offloadable) for s in args.splits.split(",") if s.strip()]
    networks = [parse_network(s) for s in args.networks.split(",") if s.strip()]
    lb_version = sh(args.llama_bench, "--version").stderr.strip() or sh(args.llama_bench, "--version").stdout.strip()
    help_text = llama_bench_help(args.llama_bench)

    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="hearth-rpc-bench-"))
    net: Net | None = None
    done = False

    def cleanup() -> None:
        nonlocal done
        if done:
            return
        done = True
        procs.stop_all()
        if net is not None:
            net.close()
        shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(cleanup)
    def on_term(*_: object) -> None:
        raise KeyboardInterrupt  # unwinds through the finally below: workers, proxy, namespaces go

    prev_term = signal.signal(signal.SIGTERM, on_term)
    try:
        net = Net(args.workers, args.loopback)
        report = measure(args, net, procs, tmp, splits, networks, threads, rpc_server, hearth_cli, help_text,
                         lb_version, llama_src, info)
    finally:
        signal.signal(signal.SIGTERM, prev_term)
        cleanup()
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nwrote {out}")
    return 2 if args.strict and not report["goal_met"] else 0


def measure(args, net: Net, procs: Procs, tmp: Path, splits, networks, threads, rpc_server, hearth_cli, help_text,
            lb_version, llama_src, info) -> dict:
    report: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"node": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
                 "loadavg_start": loadavg()},
        "model": {"name": args.model, "path": args.model_path, "file_size": info["model"]["file_size"],
                  "offloadable_layers": int(info["model"]["block_count"]) + 1},
        "llama_bench": {"path": args.llama_bench, "version": lb_version, "found_via": llama_src},
        "settings": {"rounds": args.rounds, "n_prompt": args.n_prompt, "n_gen": args.n_gen,
                     "repetitions": args.repetitions, "threads": threads, "n_ctx_hearth": args.n_ctx,
                     "workers": args.workers, "splits": splits, "networks": networks},
        "network": {"namespaces": net.ok, "why_not": net.why_not},
        "goal": {"ratio_min": GOAL_RATIO},
        "runs": [], "loads": [],
    }
    print(f"# model       : {args.model_path} ({info['model']['file_size'] / 2**20:.0f} MiB)")
    print(f"# llama-bench : {args.llama_bench} ({lb_version.splitlines()[0] if lb_version else '?'}; via {llama_src})")
    print(f"# settings    : {args.workers} workers, threads {threads} (client and each worker), -p {args.n_prompt}"
          f" -n {args.n_gen} -r {args.repetitions}, rounds {args.rounds}, hearth n_ctx {args.n_ctx}")
    print(f"# host        : {platform.node()}, {os.cpu_count()} CPUs, load {loadavg()}")
    if net.ok:
        report["network"]["netem"] = net.netem_check()
        print(f"# network     : namespaces {', '.join(net.names)} (10.231.{SUBNET_BASE + 1}.0/24 ...), veth pairs")
        print(f"# netem       : {report['network']['netem']}")
    else:
        print(f"# network     : NO namespaces ({net.why_not}): workers on loopback ports, no shaping")
    sys.stdout.flush()

    # -- workers: ggml-rpc-server and hearth worker in every namespace ----------------------
    kinds = ["rpc-server"] + ([] if args.no_hearth_worker else ["hearth-worker"])
    workers: dict[str, list[dict]] = {k: [] for k in kinds}
    for k in range(1, args.workers + 1):
        addr = net.worker_addr(k)
        for kind in kinds:
            port = (PORT_RPC_SERVER if kind == "rpc-server" else PORT_HEARTH_WORKER) if net.ok else free_port()
            cache = tmp / f"cache-{kind}-{k}"
            cache.mkdir()
            env = dict(os.environ)
            if kind == "rpc-server":  # its cache is $LLAMA_CACHE/rpc
                env["LLAMA_CACHE"] = str(cache)
                argv = [rpc_server, "-H", addr, "-p", str(port), "-t", str(threads), "-c"]
                cache_dir = cache / "rpc"
            else:
                argv = [hearth_cli, "worker", "--host", addr, "--port", str(port), "--threads", str(threads),
                        "--cache", str(cache)]
                cache_dir = cache
            logf = tmp / f"{kind}-{k}.log"
            p = procs.start(net.wrap(k, argv), logf, env=env)
            wait_serving(f"{addr}:{port}", p, logf)
            workers[kind].append({"endpoint": f"{addr}:{port}", "cache": cache_dir, "log": logf,
                                  "command": fmt_cmd(net.wrap(k, argv))})
    report["workers"] = {k: [{"endpoint": w["endpoint"], "command": w["command"]} for w in ws]
                         for k, ws in workers.items()}
    for kind, ws in workers.items():
        print(f"# {kind:<13}: {', '.join(w['endpoint'] for w in ws)}   e.g. {ws[0]['command']}")

    # -- the plan per split: llama-bench flags to match hearth's ---------------------------
    eps = [w["endpoint"] for w in workers["rpc-server"]]
    for sp in splits:
        d, _ = run_json(hearth_cmd(args, "plan", eps, sp), args.timeout)
        plan = d["plan"]
        if d.get("note"):
            print(f"#   note: {d['note']}")
            report.setdefault("notes", []).append(d["note"])
        flags, same, notes = llama_flags_for_plan(plan, help_text)
        sp["flags"], sp["plan"] = flags, {k: v for k, v in plan.items() if k != "memory"}
        sp["layers"] = {p.get("device") or p["host"]: p["n_layers"] for p in plan["placement"]}
        if not plan["tensor_split"] or len(plan["tensor_split"]) != args.workers:
            raise BenchError(f"split {sp['name']}: hearth's plan has tensor_split {plan['tensor_split']} "
                             f"for {args.workers} workers (devices {plan['devices']})")
        sp["llama_ts"] = plan["tensor_split"]
        print(f"# split {sp['name']}: hearth places {sp['layers']} on devices {plan['devices']},"
              f" tensor_split {plan['tensor_split']}; llama-bench gets {' '.join(flags)}"
              f" -ts {'/'.join(f'{x:g}' for x in sp['llama_ts'])}"
              f" (already default: {', '.join(same) or '-'})")
        for n in notes:
            print(f"#   note: {n}")
    sys.stdout.flush()

    configs = [("hearth", "rpc-server"), ("llama", "rpc-server")]
    if "hearth-worker" in workers:
        configs.append(("hearth", "hearth-worker"))
        if args.cross:
            configs.append(("llama", "hearth-worker"))

    proxy: subprocess.Popen | None = None
    for nw in networks:
        print(f"\n## network {nw['name']}: rate {nw['rate'] or 'unshaped'}, added RTT {nw['rtt_ms']:g} ms", flush=True)
        nrep: dict = {"network": nw}
        if net.ok:
            nrep["tc"] = net.shape(nw["rate"])
            for c in nrep["tc"][:2]:
                print(f"#   {c}")
        elif nw["rate"]:
            nrep["tc"] = []
            print("#   (not shaped: no namespaces)")
        # endpoints the clients use: direct, or through the delay proxy
        if proxy is not None:
            procs.stop(proxy)
            proxy = None
        use: dict[str, list[str]] = {k: [w["endpoint"] for w in ws] for k, ws in workers.items()}
        if nw["rtt_ms"] > 0:
            maps, via = [], {}
            for kind, ws in workers.items():
                via[kind] = []
                for w in ws:
                    lp = free_port()
                    maps.append(f"{lp}={w['endpoint']}")
                    via[kind].append(f"127.0.0.1:{lp}")
            pcmd = [sys.executable, str(Path(__file__).resolve()), "_proxy", "--delay-ms", str(nw["rtt_ms"] / 2), *maps]
            proxy = procs.start(pcmd, tmp / "proxy.log", stdout=subprocess.PIPE)
            if proxy.stdout.readline().strip() != b"ready":
                raise BenchError(f"delay proxy did not start: {(tmp / 'proxy.log').read_text()[-500:]}")
            use = via
            nrep["proxy"] = fmt_cmd(pcmd)
            print(f"#   delay proxy: {nw['rtt_ms'] / 2:g} ms each way: {' '.join(maps)}")
        # what the link gives: RTT of a tiny RPC request, bandwidth of one TCP stream
        rtts = {}
        for kind in workers:
            direct = rpc_rtt(workers[kind][0]["endpoint"])
            rtts[kind] = {"direct": direct}
            if use[kind][0] != workers[kind][0]["endpoint"]:
                rtts[kind]["via_proxy"] = rpc_rtt(use[kind][0])
        nrep["rtt"] = rtts
        tp = throughput_check(net, procs, tmp, args.python, args.throughput_seconds, nw["rate"]) if net.ok else {}
        nrep["throughput"] = tp
        for kind, r in rtts.items():
            print(f"#   rpc RTT to {kind} 1: direct {r['direct']['median_ms']:.3f} ms"
                  + (f", via proxy {r['via_proxy']['median_ms']:.3f} ms" if "via_proxy" in r else "")
                  + f" (protocol {r['direct']['version']})")
        if tp:
            print(f"#   one TCP stream here -> namespace 1: {tp['mbit_per_s']:.0f} Mbit/s"
                  f" ({tp['bytes'] / 2**20:.0f} MiB in {tp['seconds']:.2f} s)")
        sys.stdout.flush()

        # -- load time, empty then filled tensor cache (hearth as the client) -------------
        if args.loads > 0:
            lsplit = parse_split(args.load_split, args.workers, report["model"]["offloadable_layers"])
            for kind in workers:
                for w in workers[kind]:  # empty the cache (the worker only looks at the files)
                    for f in w["cache"].glob("*"):
                        if f.is_file():
                            f.unlink()
                la = loadavg()
                secs, sent, placed = [], [], None
                for _ in range(args.loads):  # one process each, so the bytes on the wire are per load
                    tx0 = net.tx_bytes()
                    d, _ = run_json(hearth_cmd(args, "load", use[kind], lsplit, loads=1), args.timeout)
                    sent.append(net.tx_bytes() - tx0 if net.ok else None)  # no veth to count on loopback
                    secs.append(d["load_seconds"][0])
                    placed = {p["device"]: p["n_layers"] for p in d.get("placement", [])}
                cached = sum(f.stat().st_size for w in workers[kind] for f in w["cache"].glob("*") if f.is_file())
                rec = {"network": nw["name"], "worker": kind, "split": lsplit["name"], "load_seconds": secs,
                       "bytes_to_workers": sent, "cache_bytes_after": cached, "loadavg": la, "layers": placed}
                report["loads"].append(rec)
                print(f"  load via {kind:<13} ({lsplit['name']}, {placed}): "
                      + ", ".join(f"#{i + 1} {x:.2f} s" + (f" ({b / 2**20:.1f} MiB sent)" if b is not None else "")
                                  for i, (x, b) in enumerate(zip(secs, sent)))
                      + f"  (cache now {cached / 2**20:.1f} MiB)", flush=True)

        # -- the rounds ---------------------------------------------------------------------
        for sp in splits:
            print(f"\n### {nw['name']}, {sp['name']}", flush=True)
            for i in range(args.rounds):
                order = configs[i % len(configs):] + configs[:i % len(configs)]
                for client, kind in order:
                    la = loadavg()
                    if client == "hearth":
                        r = run_hearth(args, use[kind], sp)
                        if r["layers"] != sp["layers"]:
                            r["split_differs"] = True
                            log(f"  warning: hearth placed {r['layers']} this time, llama-bench gets {sp['layers']}")
                    else:
                        r = run_llama(args, use[kind], sp, sp["flags"])
                    r.update(network=nw["name"], split=sp["name"], round=i + 1, client=client, worker=kind,
                             position=order.index((client, kind)) + 1, loadavg_before=la, loadavg_after=loadavg())
                    report["runs"].append(r)
                    own = f"; hearth's own pp figure {f1(r['pp_hearth_reported'])}" if client == "hearth" else ""
                    print(f"  round {i + 1} #{r['position']} {client:<6} via {kind:<13}: pp {f1(r['pp']):>7}"
                          f"  tg {f1(r['tg']):>6}  (wall {r['wall_seconds']:.1f} s, load {la[0]:.2f}{own})", flush=True)
        report["network_" + nw["name"]] = nrep
    if proxy is not None:
        procs.stop(proxy)
    report["host"]["loadavg_end"] = loadavg()
    summarize(report, splits, networks, configs, args)
    return report


def summarize(report: dict, splits, networks, configs, args) -> None:
    runs = report["runs"]

    def mean(nw: str, sp: str, client: str, kind: str, key: str) -> tuple[float, list[float]]:
        xs = [r[key] for r in runs if (r["network"], r["split"], r["client"], r["worker"]) == (nw, sp, client, kind)]
        return (statistics.fmean(xs) if xs else 0.0), xs

    def per_round(nw, sp, a, b, key) -> list[float | None]:
        out = []
        for i in range(1, args.rounds + 1):
            x = [r[key] for r in runs if (r["network"], r["split"], r["round"], r["client"], r["worker"]) == (nw, sp, i, *a)]
            y = [r[key] for r in runs if (r["network"], r["split"], r["round"], r["client"], r["worker"]) == (nw, sp, i, *b)]
            out.append(ratio(x[0], y[0]) if x and y else None)
        return out

    ref = ("llama", "rpc-server")
    pairs = [(("hearth", "rpc-server"), ref, "hearth/llama, both via ggml-rpc-server")]
    if ("hearth", "hearth-worker") in configs:
        pairs.append((("hearth", "hearth-worker"), ref, "hearth via hearth worker / llama via ggml-rpc-server"))
        pairs.append((("hearth", "hearth-worker"), ("hearth", "rpc-server"), "hearth: hearth worker / ggml-rpc-server"))
    if ("llama", "hearth-worker") in configs:
        pairs.append((("llama", "hearth-worker"), ref, "llama: hearth worker / ggml-rpc-server"))

    print("\n## summary: tokens/s, mean over rounds\n")
    print("| network | split | client via worker | pp | tg | per-round pp | per-round tg | pp as hearth reports |")
    print("|---|---|---|---:|---:|---|---|---:|")
    table = []
    for nw in networks:
        for sp in splits:
            for client, kind in configs:
                pp, pps = mean(nw["name"], sp["name"], client, kind, "pp")
                tg, tgs = mean(nw["name"], sp["name"], client, kind, "tg")
                own = mean(nw["name"], sp["name"], client, kind, "pp_hearth_reported")[0] if client == "hearth" else None
                table.append({"network": nw["name"], "split": sp["name"], "client": client, "worker": kind,
                              "pp": pp, "tg": tg, "pp_rounds": pps, "tg_rounds": tgs, "pp_hearth_reported": own})
                print(f"| {nw['name']} | {sp['name']} | {client} via {kind} | {f1(pp)} | {f1(tg)} |"
                      f" {', '.join(f1(x) for x in pps)} | {', '.join(f1(x) for x in tgs)} | {f1(own) if own else ''} |")
    print("\n## ratios (of the means; per-round ratios in brackets)\n")
    print("| network | split | ratio | pp | tg |")
    print("|---|---|---|---:|---:|")
    ratios, checks = [], []
    for nw in networks:
        for sp in splits:
            for a, b, label in pairs:
                row = {"network": nw["name"], "split": sp["name"], "ratio": label}
                cells = []
                for key in ("pp", "tg"):
                    v = ratio(mean(nw["name"], sp["name"], *a, key)[0], mean(nw["name"], sp["name"], *b, key)[0])
                    pr = per_round(nw["name"], sp["name"], a, b, key)
                    row[key] = v
                    row[key + "_rounds"] = pr
                    cells.append(f"{f3(v)} [{', '.join(f3(x) for x in pr)}]")
                    if b == ref and a[0] == "hearth" and (args.n_prompt if key == "pp" else args.n_gen):
                        checks.append({"check": f"{nw['name']} {sp['name']} {key}: {label} >= {GOAL_RATIO}",
                                       "value": v, "ok": v is not None and v >= GOAL_RATIO})
                ratios.append(row)
                print(f"| {nw['name']} | {sp['name']} | {label} | {cells[0]} | {cells[1]} |")
    if report["loads"]:
        print("\n## load time through the workers (hearth client; load_model to ready)\n")
        print("| network | worker | split | 1st (empty cache) | 2nd (cache filled) | cache |")
        print("|---|---|---|---:|---:|---:|")
        for ld in report["loads"]:
            s = ld["load_seconds"]
            print(f"| {ld['network']} | {ld['worker']} | {ld['split']} | {s[0]:.2f} s |"
                  f" {', '.join(f'{x:.2f} s' for x in s[1:]) or '-'} | {ld['cache_bytes_after'] / 2**20:.1f} MiB |")
    report["table"], report["ratios"], report["checks"] = table, ratios, checks
    report["goal_met"] = all(c["ok"] for c in checks)
    print("\n## goal check")
    for c in checks:
        print(f"  [{'ok' if c['ok'] else 'MISS'}] {c['check']}: {f3(c['value'])}")
    print(f"  => {'all goals met' if report['goal_met'] else 'goal NOT met'}"
          f" (load average at the end {report['host']['loadavg_end']}; a 2-CPU machine is noisy: read per-round ratios)")


if __name__ == "__main__":
    sys.exit(main())
