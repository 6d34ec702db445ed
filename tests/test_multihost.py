"""A model split across machines on llama.cpp's RPC backend, end to end.

The other machines are the test's own: network namespaces with a veth pair each
(10.231.K.0/24, made here and removed after; nothing else is ever addressed), each
running ``hearth worker`` bound to its namespace's address. Where ``ip netns`` is not
allowed, the workers run on loopback ports instead (the tests say so in their output).
``tc netem`` (latency) is not in this kernel, so the shaped test limits bandwidth with
``tbf`` only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from hearth import rpc

pytestmark = pytest.mark.skipif(not rpc.available(), reason="llama-cpp-python was built without the RPC backend "
                                "(CMAKE_ARGS=-DGGML_RPC=ON pip install ...)")

PROMPT = "The capital of France is"
N_CTX = 512


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*cmd: str) -> bool:
    return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0


class Worker:
    """``hearth worker`` in namespace ``ns`` (or on loopback), until stopped."""

    def __init__(self, tmp: Path, host: str, port: int, ns: str | None, cache: Path | None = None) -> None:
        self.host, self.port, self.ns = host, port, ns
        self.endpoint = f"{host}:{port}"
        self.cache = cache
        self.log = tmp / f"worker-{host}-{port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Worker:
        argv = [sys.executable, "-m", "hearth", "worker", "--host", self.host, "--port", str(self.port), "--announce"]
        argv += ["--cache", str(self.cache)] if self.cache else ["--no-cache"]
        if self.ns:
            argv = ["ip", "netns", "exec", self.ns, *argv]
        self.proc = subprocess.Popen(argv, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                rpc.probe(self.endpoint, timeout=2)
                return self
            except rpc.WorkerError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker {self.endpoint} did not start: {self.log.read_text()[-2000:]}")
                time.sleep(0.2)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class NetNS:
    """Namespaces hearth-mh-K with 10.231.K.2 inside and 10.231.K.1 here."""

    def __init__(self, count: int) -> None:
        self.names = [f"hearth-mh{k}" for k in range(1, count + 1)]
        self.made: list[str] = []
        self.ok = shutil.which("ip") is not None and os.geteuid() == 0
        if self.ok:
            for k, ns in enumerate(self.names, 1):
                veth = f"hmh{k}"
                self.cleanup_one(k, ns)
                if not (_run("ip", "netns", "add", ns) and _run("ip", "link", "add", veth, "type", "veth", "peer",
                                                                "name", f"{veth}p")):
                    self.ok = False
                    break
                self.made.append(ns)
                steps = [("ip", "link", "set", f"{veth}p", "netns", ns),
                         ("ip", "addr", "add", f"10.231.{k}.1/24", "brd", "+", "dev", veth),
                         ("ip", "link", "set", veth, "up"),
                         ("ip", "netns", "exec", ns, "ip", "addr", "add", f"10.231.{k}.2/24", "brd", "+", "dev",
                          f"{veth}p"),
                         ("ip", "netns", "exec", ns, "ip", "link", "set", f"{veth}p", "up"),
                         ("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")]
                if not all(_run(*s) for s in steps):
                    self.ok = False
                    break
        if not self.ok:
            self.close()

    @staticmethod
    def cleanup_one(k: int, ns: str) -> None:
        _run("ip", "link", "del", f"hmh{k}")
        _run("ip", "netns", "del", ns)

    def address(self, k: int) -> str:
        return f"10.231.{k}.2"

    def close(self) -> None:
        for k, ns in enumerate(self.names, 1):
            if ns in self.made:
                self.cleanup_one(k, ns)
        self.made = []


@pytest.fixture(scope="module")
def net() -> Iterator[NetNS]:
    n = NetNS(2)
    if not n.ok:
        print("\nip netns is not allowed here: the workers run on loopback ports instead")
    yield n
    n.close()


@pytest.fixture(scope="module")
def workers(net: NetNS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Worker]]:
    tmp = tmp_path_factory.mktemp("workers")
    ws = []
    for k in (1, 2):
        if net.ok:
            ws.append(Worker(tmp, net.address(k), 50052, net.names[k - 1], cache=tmp / f"cache{k}"))
        else:
            ws.append(Worker(tmp, "127.0.0.1", _free_port(), None, cache=tmp / f"cache{k}"))
    for w in ws:
        w.start()
    yield ws
    for w in ws:
        w.kill()


def _greedy(model, n: int = 32) -> str:
    return model.generate_text(PROMPT, max_tokens=n, temperature=0).text


@pytest.fixture(scope="module")
def local_text(smollm2_path: Path) -> str:
    from hearth import load_model

    with load_model(str(smollm2_path), n_ctx=N_CTX, parallel=1) as m:
        return _greedy(m)


def test_split_across_two_workers_and_this_machine_gives_the_local_greedy_tokens(workers, smollm2_path, local_text):
    from hearth import load_model

    hosts = [w.endpoint for w in workers]
    # 20 of the 31 offloadable layers to the workers (split by their free memory), 11 here
    with load_model(str(smollm2_path), n_ctx=N_CTX, parallel=1, hosts=hosts, n_gpu_layers=20) as m:
        placed = {p["host"]: p["n_layers"] for p in m.plan.placement}
        assert placed["local"] == 11 and all(placed[h] > 0 for h in hosts), placed
        assert getattr(m.engine, "alive", False)  # in a process of its own
        assert _greedy(m) == local_text
    # the user's split wins (llama.cpp's --tensor-split): 3:1 of 20 layers
    with load_model(str(smollm2_path), n_ctx=N_CTX, parallel=1, hosts=hosts, n_gpu_layers=20,
                    tensor_split=[3, 1]) as m:
        assert [p["n_layers"] for p in m.plan.placement] == [11, 15, 5]
        assert _greedy(m) == local_text
    # the planner's own split (no n_gpu_layers): every layer goes to the workers
    with load_model(str(smollm2_path), n_ctx=N_CTX, parallel=1, hosts=hosts) as m:
        assert sum(p["n_layers"] for p in m.plan.placement if p["host"] != "local") == 31
        assert _greedy(m) == local_text


def test_hearth_run_with_hosts_answers_as_without(workers, smollm2_path, tmp_path):
    env = {**os.environ, "HEARTH_NO_DAEMON": "1"}
    args = [sys.executable, "-m", "hearth", "run", str(smollm2_path), "-p", PROMPT, "--temperature", "0",
            "--max-tokens", "16", "--n-ctx", str(N_CTX)]
    here = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    split = subprocess.run([*args, "--hosts", workers[0].endpoint], capture_output=True, text=True, env=env,
                           timeout=300, cwd=tmp_path)
    assert here.returncode == split.returncode == 0, split.stderr
    assert split.stdout == here.stdout and split.stdout.strip()


def test_a_worker_on_a_network_address_warns_that_the_protocol_has_no_authentication(workers, net):
    out = workers[0].output()
    if not net.ok:
        assert "WARNING" not in out  # on loopback: no warning
        pytest.skip("no network namespace here: the workers are on loopback")
    assert "WARNING" in out and "NO authentication" in out and "SSH tunnel" in out


def test_a_worker_that_answers_nothing_is_a_clear_error_naming_it(workers, smollm2_path, net):
    from hearth import load_model

    host = workers[0].host
    dead = f"{host}:{_free_port() if not net.ok else 50999}"  # our own test host, a port nobody serves
    with pytest.raises(rpc.WorkerError) as e:
        load_model(str(smollm2_path), n_ctx=N_CTX, hosts=[dead])
    assert dead in e.value.message and "cannot be reached" in e.value.message
    # a listener that never speaks (busy, or not a worker) is named too, after the timeout
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        ep = f"127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(rpc.WorkerError) as e:
            rpc.probe(ep, timeout=1)
        assert ep in e.value.message and "did not answer" in e.value.message
    # --hosts-optional: load without it
    with load_model(str(smollm2_path), n_ctx=N_CTX, parallel=1, hosts=[dead, workers[1].endpoint],
                    hosts_optional=True) as m:
        assert m.plan.hosts == [workers[1].endpoint]


def test_a_worker_of_another_protocol_version_is_refused_naming_both():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()

        def answer() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.recv(1 + 8 + rpc.RPC_CONN_CAPS_SIZE)
                rsp = bytes([6, 1, 0, 0]) + bytes(rpc.RPC_CONN_CAPS_SIZE)
                conn.sendall(struct.pack("<Q", len(rsp)) + rsp)

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        with pytest.raises(rpc.WorkerError) as e:
            rpc.probe(f"127.0.0.1:{srv.getsockname()[1]}")
        t.join(5)
    assert "6.1.0" in e.value.message and "7.0.0" in e.value.message


def test_a_worker_lost_mid_generation_costs_that_model_only(workers, smollm2_path, local_text, tmp_path, net):
    from hearth import load_model
    from hearth.errors import EngineError

    w = workers[1]
    here = load_model(str(smollm2_path), n_ctx=N_CTX, parallel=1)
    split = load_model(str(smollm2_path), n_ctx=N_CTX, parallel=1, hosts=[w.endpoint])
    try:
        stream = split.stream_text("Write a long story about a dragon.", max_tokens=400, temperature=0,
                                   ignore_eos=True)
        got = 0
        with pytest.raises(EngineError) as e:
            for chunk in stream:
                got += 1
                if got == 5:
                    w.kill()
        assert "process died" in e.value.message and "next request loads it again" in e.value.message
        assert not split.engine.alive
        assert _greedy(here) == local_text  # this process and its other model go on
    finally:
        split.close()
        here.close()
        w.start()  # back for the other tests
    with load_model(str(smollm2_path), n_ctx=N_CTX, parallel=1, hosts=[w.endpoint]) as again:
        assert _greedy(again) == local_text


def test_the_workers_cache_keeps_tensors_for_the_next_load(workers, smollm2_path):
    from hearth import load_model

    w = workers[0]
    with load_model(str(smollm2_path), n_ctx=N_CTX, parallel=1, hosts=[w.endpoint]):
        pass
    cached = [p for p in w.cache.rglob("*") if p.is_file()]
    assert cached and sum(p.stat().st_size for p in cached) > 10 * 2**20  # tensors over 10 MiB are kept


def test_a_shaped_network_gives_the_same_tokens(workers, net, smollm2_path, local_text):
    """100 Mbit/s on the veth (tbf); this kernel has no netem, so no added latency."""
    if not net.ok:
        pytest.skip("no network namespace here: nothing to shape")
    from hearth import load_model

    dev = "hmh1"
    assert _run("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "100mbit", "burst", "32kbit",
                "latency", "50ms")
    try:
        with load_model(str(smollm2_path), n_ctx=N_CTX, parallel=1, hosts=[workers[0].endpoint]) as m:
            assert _greedy(m) == local_text
    finally:
        _run("tc", "qdisc", "del", "dev", dev, "root")


def test_announced_workers_are_listed_by_hearth_workers(workers, net, tmp_path):
    if not net.ok:
        pytest.skip("no network namespace here: beacons go to a network's broadcast address, loopback has none")
    r = subprocess.run([sys.executable, "-m", "hearth", "workers", "--timeout", "5", "--json"], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    import json

    heard = {w["endpoint"]: w for w in json.loads(r.stdout)}
    for w in workers:
        assert w.endpoint in heard, (w.endpoint, list(heard))
        assert heard[w.endpoint]["version"] == "7.0.0" and heard[w.endpoint]["devices"][0]["free"] > 0
