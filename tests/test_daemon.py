"""The preload daemon, as real processes on the real SmolLM2 model.

Every daemon gets its own runtime dir, config file and home under a temporary folder
(n_ctx 512: the machine is small and shared), and every daemon a test starts is
stopped (killed if need be) when its fixture ends, so no process outlives the tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from hearth.client import DaemonClient

TIMEOUT = 180
HEAVY = re.compile(r"\|\s+(llama_cpp|numpy|fastapi|pydantic|starlette)(\.|\s*$)", re.M)


class Sandbox:
    """One daemon's world: runtime dir, config, home; ``cli(...)`` runs ``python -m hearth``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rt = root / "rt"
        self.config = root / "config.toml"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
        env.update(HEARTH_RUNTIME_DIR=str(self.rt), HEARTH_CONFIG=str(self.config),
                   HEARTH_HOME=str(self.root / "home"), HEARTH_N_CTX="512", PYTHONIOENCODING="utf-8")
        env.update(extra)
        return env

    def cli(self, *args: str, env: dict[str, str] | None = None, pyflags: tuple[str, ...] = (),
            stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *pyflags, "-m", "hearth", *args], input=stdin, capture_output=True,
                              text=True, encoding="utf-8", env=self.env(**(env or {})), cwd=self.root,
                              timeout=TIMEOUT)

    def pid(self) -> int | None:
        try:
            return int((self.rt / "hearth.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def client(self) -> DaemonClient:
        c = DaemonClient.connect(self.rt / "hearth.sock", timeout=TIMEOUT)
        assert c is not None, "the daemon does not answer"
        return c

    def status(self) -> dict[str, Any]:
        r = self.cli("daemon", "status", "--json")
        return json.loads(r.stdout)

    def teardown(self) -> None:
        pid = self.pid()
        self.cli("daemon", "stop", "--timeout", "20")
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def make_sandbox() -> Iterator[Callable[[], Sandbox]]:
    made: list[Sandbox] = []

    def make() -> Sandbox:
        # short paths: a Unix socket path must fit in 108 bytes
        s = Sandbox(Path(tempfile.mkdtemp(prefix="hd-", dir="/tmp")))
        made.append(s)
        return s

    yield make
    for s in made:
        s.teardown()
        shutil.rmtree(s.root, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(smollm2_path: Path) -> Iterator[Sandbox]:
    """One warm daemon shared by the tests that only talk to it."""
    s = Sandbox(Path(tempfile.mkdtemp(prefix="hd-", dir="/tmp")))
    try:
        r = s.cli("daemon", "start", "--model", "smollm2")
        assert r.returncode == 0, r.stderr
        yield s
    finally:
        s.teardown()
        shutil.rmtree(s.root, ignore_errors=True)


def _stream_in_thread(s: Sandbox, max_tokens: int) -> tuple[threading.Thread, dict[str, Any], threading.Event]:
    """A long generation on the daemon, in a thread; ``started`` is set at its first text."""
    out: dict[str, Any] = {}
    started = threading.Event()

    def work() -> None:
        try:
            with s.client() as c:
                texts = []
                for ev in c.generate({"prompt": "Count from one to one hundred.", "config": {
                        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}):
                    if "text" in ev:
                        texts.append(ev["text"])
                        started.set()
                    else:
                        out["result"] = ev["result"]
                out["text"] = "".join(texts)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            out["error"] = e
        finally:
            started.set()

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t, out, started


# -- start, status, files -------------------------------------------------------------------


def test_start_reports_the_loaded_model_and_status_json_has_pid_uptime_memory(daemon: Sandbox) -> None:
    st = daemon.status()
    assert st["running"] is True
    assert st["pid"] == daemon.pid() and _alive(st["pid"])
    assert st["socket"] == str(daemon.rt / "hearth.sock")
    assert st["uptime_seconds"] >= 0 and st["rss_bytes"] > 0
    (m,) = st["models"]
    assert m["name"].startswith("smollm2") and m["n_ctx"] == 512 and m["ram_bytes"] > 0
    text = daemon.cli("daemon", "status")
    assert text.returncode == 0 and f"pid {st['pid']}" in text.stdout and "smollm2" in text.stdout


def test_socket_is_0600_inside_a_0700_runtime_dir(daemon: Sandbox) -> None:
    assert stat.S_IMODE(daemon.rt.stat().st_mode) == 0o700
    sock = daemon.rt / "hearth.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE((daemon.rt / "hearth.log").stat().st_mode) == 0o600


def test_start_when_running_keeps_the_running_daemon(daemon: Sandbox) -> None:
    pid = daemon.pid()
    r = daemon.cli("daemon", "start")
    assert r.returncode == 0 and "already running" in r.stderr
    assert daemon.pid() == pid


# -- run and chat on the daemon --------------------------------------------------------------


def test_run_streams_from_the_daemon_without_importing_anything_heavy(daemon: Sandbox) -> None:
    r = daemon.cli("run", "-p", "Name three colors.", "--max-tokens", "8", "--temperature", "0",
                   pyflags=("-X", "importtime"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip()
    heavy = sorted({m.group(1) for m in HEAVY.finditer(r.stderr)})
    assert heavy == [], f"hearth run on the daemon imported {heavy}"


def test_run_json_on_the_daemon_has_the_in_process_shape(daemon: Sandbox) -> None:
    r = daemon.cli("run", "-p", "Name three colors.", "--max-tokens", "8", "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert set(d) == {"model", "text", "finish_reason", "usage", "timings"}
    assert d["finish_reason"] in ("stop", "length") and d["usage"]["completion_tokens"] <= 8
    assert {"ttft", "prompt_seconds", "generation_tokens_per_second", "total_seconds"} <= set(d["timings"])


def test_run_raw_and_system_go_through_the_daemon(daemon: Sandbox) -> None:
    raw = daemon.cli("run", "--raw", "-p", "The sky is", "--max-tokens", "4", "--temperature", "0", "--json")
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout)["usage"]["prompt_tokens"] <= 5  # no chat template around it
    sysmsg = daemon.cli("run", "--system", "Answer in one word.", "-p", "Sky color?", "-n", "4", "--json")
    assert sysmsg.returncode == 0, sysmsg.stderr


def test_daemon_errors_print_one_line_and_exit_2(daemon: Sandbox) -> None:
    for args in (("run", "-p", "hi", "--temperature", "-1"), ("run", "nosuchmodel", "-p", "hi")):
        r = daemon.cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("hearth: error: ") and r.stderr.count("\n") == 1, r.stderr
        assert r.stdout == ""


def test_chat_on_the_daemon_keeps_the_history(daemon: Sandbox) -> None:
    r = daemon.cli("chat", "--max-tokens", "8", "--temperature", "0", stdin="Hello\nWhat did I just say?\n")
    assert r.returncode == 0, r.stderr
    assert len([ln for ln in r.stdout.splitlines() if ln.strip()]) >= 2


def test_reload_keeps_serving_and_lets_running_requests_finish(daemon: Sandbox) -> None:
    before = daemon.status()["reloads"]
    t, out, started = _stream_in_thread(daemon, 48)
    assert started.wait(TIMEOUT) and "error" not in out, out.get("error")
    r = daemon.cli("daemon", "reload")
    assert r.returncode == 0, r.stderr
    assert "reloaded smollm2" in r.stdout
    t.join(TIMEOUT)
    assert "error" not in out, out.get("error")
    assert out["result"]["finish_reason"] == "length" and out["result"]["usage"]["completion_tokens"] == 48
    st = daemon.status()
    assert st["reloads"] == before + 1 and [m["name"][:7] for m in st["models"]] == ["smollm2"]

    def generations() -> float:
        with daemon.client() as c:
            text = c._request("GET", "/metrics").read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("hearth_generations_total{"))

    counted = generations()
    again = daemon.cli("run", "-p", "hi", "--max-tokens", "2", "--json")
    assert again.returncode == 0, again.stderr
    assert generations() == counted + 1  # the metrics follow the reloaded models


def test_sighup_reloads_too(daemon: Sandbox) -> None:
    before = daemon.status()["reloads"]
    os.kill(daemon.pid(), signal.SIGHUP)
    deadline = time.monotonic() + TIMEOUT
    while daemon.status()["reloads"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert daemon.status()["reloads"] == before + 1


def test_no_daemon_flag_and_env_run_in_process(daemon: Sandbox) -> None:
    for extra, env in ((("--no-daemon",), None), ((), {"HEARTH_NO_DAEMON": "1"})):
        r = daemon.cli("run", "-p", "hi", "--max-tokens", "2", "--json", *extra, env=env, pyflags=("-X", "importtime"))
        assert r.returncode == 0, r.stderr[-2000:]
        assert "llama_cpp" in {m.group(1) for m in HEAVY.finditer(r.stderr)}


# -- lifecycles of their own ------------------------------------------------------------------


def test_stop_lets_in_flight_requests_finish_and_removes_the_files(make_sandbox: Callable[[], Sandbox],
                                                                     smollm2_path: Path) -> None:
    s = make_sandbox()
    assert s.cli("daemon", "start").returncode == 0
    pid = s.pid()
    t, out, started = _stream_in_thread(s, 48)
    assert started.wait(TIMEOUT) and "error" not in out, out.get("error")
    r = s.cli("daemon", "stop")
    assert r.returncode == 0 and f"stopped (pid {pid})" in r.stdout, r.stderr
    t.join(TIMEOUT)
    assert "error" not in out, out.get("error")
    assert out["result"]["usage"]["completion_tokens"] == 48
    assert not _alive(pid)
    assert not (s.rt / "hearth.sock").exists() and not (s.rt / "hearth.pid").exists()
    st = s.cli("daemon", "status")
    assert st.returncode == 1 and "not running" in st.stdout


def test_stale_socket_and_pid_after_kill_9_are_reported_then_cleaned(make_sandbox: Callable[[], Sandbox],
                                                                      smollm2_path: Path) -> None:
    s = make_sandbox()
    assert s.cli("daemon", "start").returncode == 0
    pid = s.pid()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (s.rt / "hearth.sock").exists() and (s.rt / "hearth.pid").exists()
    st = s.cli("daemon", "status", "--json")
    assert st.returncode == 1
    d = json.loads(st.stdout)
    assert d["running"] is False and any("pid file" in x for x in d["stale"]) and any("socket" in x for x in d["stale"])
    # run falls back to in-process past the stale socket
    run = s.cli("run", "-p", "hi", "--max-tokens", "2", "--json")
    assert run.returncode == 0, run.stderr
    r = s.cli("daemon", "start")
    assert r.returncode == 0, r.stderr
    assert "removed stale pid file" in r.stderr and "removed stale socket" in r.stderr
    assert s.pid() not in (None, pid) and s.status()["running"] is True


def test_run_falls_back_to_in_process_when_no_daemon(make_sandbox: Callable[[], Sandbox], smollm2_path: Path) -> None:
    s = make_sandbox()
    r = s.cli("run", "-p", "Name three colors.", "--max-tokens", "4", "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)) == {"model", "text", "finish_reason", "usage", "timings"}
    assert s.cli("daemon", "status").returncode == 1


def test_start_with_an_unknown_model_is_one_line_and_exit_2(make_sandbox: Callable[[], Sandbox]) -> None:
    s = make_sandbox()
    r = s.cli("daemon", "start", "--model", "nosuchmodel")
    assert r.returncode == 2
    assert r.stderr.startswith("hearth: error: ") and r.stderr.count("\n") == 1 and "nosuchmodel" in r.stderr
    assert s.pid() is None and s.cli("daemon", "status").returncode == 1


def test_start_with_a_broken_model_file_says_why_and_leaves_no_process(make_sandbox: Callable[[], Sandbox]) -> None:
    s = make_sandbox()
    bad = s.root / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    r = s.cli("daemon", "start", "--model", str(bad))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("hearth: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert s.cli("daemon", "status").returncode == 1


def test_import_hearth_is_light_and_exports_still_work() -> None:
    code = ("import sys, hearth; heavy = [m for m in ('llama_cpp', 'numpy', 'fastapi', 'pydantic', 'psutil') "
            "if m in sys.modules]; assert not heavy, heavy; "
            "from hearth import load_model, GenerationConfig, HearthError, ModelInfo; "
            "assert callable(load_model) and 'load_model' in dir(hearth)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr


def test_run_does_not_hang_on_a_stopped_daemon(make_sandbox: Callable[[], Sandbox]) -> None:
    s = make_sandbox()
    assert s.cli("daemon", "start", "--model", "smollm2").returncode == 0
    pid = s.pid()
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = s.cli("run", "-p", "hi", "--max-tokens", "2", "--temperature", "0")
        assert r.returncode == 0, r.stderr
        assert "does not answer" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert time.monotonic() - t0 < 60  # the probe gave up after seconds, then ran in process
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_runtime_dir_of_another_user_is_one_line(make_sandbox: Callable[[], Sandbox]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory owned by another user")
    s = make_sandbox()
    s.rt.mkdir(mode=0o700)
    os.chown(s.rt, 65534, 65534)
    for args in (("daemon", "status"), ("daemon", "start"), ("daemon", "stop")):
        r = s.cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert "belongs to another user" in r.stderr and "HEARTH_RUNTIME_DIR" in r.stderr
