"""The hearth server as a subprocess, for the benchmarks that load it over HTTP
(``loop_latency.py``, ``soak.py``): a free port, the environment (``--pythonpath`` runs
another source tree), a check of which hearth it imports, and start/ready/stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(pythonpath: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if pythonpath:
        src = str(Path(pythonpath).resolve() / "src")
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def check_import(python: str, env: dict[str, str], pythonpath: str | None) -> str:
    """Where the server's Python imports hearth from; with --pythonpath it must be DIR/src."""
    p = subprocess.run([python, "-c", "import hearth; print(hearth.__file__)"], env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise BenchError(f"{python} cannot import hearth: {p.stderr.strip()[-500:]}")
    where = p.stdout.strip()
    if pythonpath:
        want = Path(pythonpath).resolve() / "src"
        if not Path(where).resolve().is_relative_to(want):
            raise BenchError(f"with PYTHONPATH={want} the server would import hearth from {where}")
    return where


def tree_commit(tree: Path) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether src/ differs from it) of the tree that runs."""
    def git(*a: str) -> str | None:
        p = subprocess.run(["git", "-C", str(tree), *a], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        return p.stdout.strip() if p.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", "src")
    return commit, (bool(status) if status is not None else None)


class Server:
    def __init__(self, cmd: list[str], env: dict[str, str], port: int, log_dir: Path) -> None:
        self.cmd, self.port = cmd, port
        self.log_path = log_dir / f"hearth-serve-{port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()
        self.shutdown: str | None = None

    def log_tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> float:
        url = f"http://127.0.0.1:{self.port}/health"
        with httpx.Client(timeout=5) as c:
            while True:
                if self.proc.poll() is not None:
                    raise BenchError(f"the server exited with {self.proc.returncode} before it was ready:\n"
                                     f"{self.log_tail()}")
                try:
                    if c.get(url).status_code == 200:
                        return time.monotonic() - self.started
                except httpx.HTTPError:
                    pass
                if time.monotonic() - self.started > timeout:
                    raise BenchError(f"the server was not ready after {timeout:.0f} s:\n{self.log_tail()}")
                time.sleep(0.2)

    def stop(self) -> None:
        """SIGINT, SIGTERM after 15 s, then SIGKILL to the whole group."""
        for sig, wait in ((signal.SIGINT, 15), (signal.SIGTERM, 10)):
            if self.proc.poll() is not None:
                break
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                self.shutdown = f"{sig.name} -> exit {self.proc.returncode}"
            except subprocess.TimeoutExpired:
                continue
        if self.proc.poll() is None:
            self.shutdown = "SIGKILL"
        try:  # the leader if it is still there, and anything left in its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            log(f"warning: the server (pid {self.proc.pid}) did not exit after SIGKILL")
        self._log.close()
