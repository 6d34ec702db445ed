"""The preload daemon's control side: start, stop, status, reload (stdlib and psutil only).

The daemon is the same server, detached, on a Unix socket in the user runtime dir.

Files in the runtime dir (``$HEARTH_RUNTIME_DIR`` or the user runtime dir, mode 0700):
``hearth.sock`` (mode 0600), ``hearth.pid`` and ``hearth.log`` (the daemon's stderr).

- ``start`` spawns ``python -m hearth daemon serve-foreground`` in a new session and
  waits until ``/health`` says the startup models are loaded; stale files go first.
- ``stop`` sends SIGTERM: uvicorn stops accepting, lets in-flight requests finish
  (up to ``GRACE_SECONDS``), then the pool closes and the files are removed.
- ``reload`` (or SIGHUP) re-reads the config and loads the startup models afresh
  (``ModelPool.reload``); requests already running finish on the old copies, which
  unload when they are done.

This module imports nothing heavy: the server side (FastAPI, the pool) is
``daemon/server.py``, loaded only by the daemon's own process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..client import LOG_NAME, PID_NAME, SOCKET_NAME, DaemonClient, DaemonError, runtime_dir
from ..errors import HearthError

GRACE_SECONDS = 60  # how long stop lets in-flight requests run
START_TIMEOUT = 600  # a big model on a slow disk takes a while
SERVE_COMMAND = "serve-foreground"


class DaemonFailed(HearthError):
    """The daemon could not start, stop or answer."""

    code = "daemon_error"


# -- the runtime dir and what is in it ---------------------------------------------------


def ensure_runtime_dir() -> Path:
    """The runtime dir, created 0700; refused when someone else owns it or may enter it."""
    d = runtime_dir()
    _check_owner(d)
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = d.stat()
        if st.st_uid != os.getuid():
            raise DaemonFailed(f"the runtime dir {d} belongs to another user (uid {st.st_uid}); "
                               "set HEARTH_RUNTIME_DIR to a directory of your own")
        if st.st_mode & 0o077:
            os.chmod(d, 0o700)
    except OSError as e:
        raise DaemonFailed(f"cannot use runtime dir {d}: {e.strerror or e}") from None
    return d


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _is_daemon(pid: int) -> bool:
    """Alive (not a zombie) and running ``hearth daemon serve-foreground``: a recycled
    pid that now belongs to something else does not count."""
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return SERVE_COMMAND in p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


@dataclass
class State:
    """What the runtime dir says: a live daemon, or leftovers of a dead one."""

    dir: Path
    pid: int | None  # from the pid file
    alive: bool  # that pid is a running daemon
    answers: bool  # the socket accepts connections
    stale: list[str] = field(default_factory=list)  # leftovers of a daemon that is gone

    @property
    def socket(self) -> Path:
        return self.dir / SOCKET_NAME

    @property
    def pid_file(self) -> Path:
        return self.dir / PID_NAME

    @property
    def running(self) -> bool:
        return self.alive and self.answers


def _check_owner(d: Path) -> None:
    """One line, not a PermissionError traceback, when the runtime dir is someone else's."""
    try:
        st = d.stat()
    except FileNotFoundError:
        return
    except OSError as e:
        raise DaemonFailed(f"cannot use runtime dir {d}: {e.strerror or e}; set HEARTH_RUNTIME_DIR") from None
    if st.st_uid != os.getuid():
        raise DaemonFailed(f"the runtime dir {d} belongs to another user (uid {st.st_uid}); "
                           "set HEARTH_RUNTIME_DIR to a directory of your own")


def inspect_state() -> State:
    d = runtime_dir()
    _check_owner(d)
    sock, pid_file = d / SOCKET_NAME, d / PID_NAME
    pid = _read_pid(pid_file)
    alive = pid is not None and _is_daemon(pid)
    client = DaemonClient.connect(sock, timeout=5) if sock.exists() else None
    answers = client is not None
    if client is not None:
        client.close()
    stale = []
    if pid_file.exists() and not alive:
        stale.append(f"pid file ({pid_file}: pid {pid} is not running)" if pid else f"pid file ({pid_file}: unreadable)")
    if sock.exists() and not answers and not alive:
        stale.append(f"socket ({sock}: nothing listening)")
    return State(d, pid, alive, answers, stale)


def clean_stale(state: State) -> list[str]:
    if state.alive:
        return []
    for p in (state.socket, state.pid_file):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    return state.stale


def _log_tail(d: Path) -> str:
    try:
        lines = [ln.strip() for ln in (d / LOG_NAME).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "the log is empty"


# -- the control side: start, stop, status, reload ---------------------------------------


def start(models: list[str], load_flags: list[str], verbose: int = 0, timeout: float = START_TIMEOUT) -> dict[str, Any]:
    """Spawn the daemon and wait until its startup models are loaded. Returns its status."""
    d = ensure_runtime_dir()
    state = inspect_state()
    if state.running:
        with DaemonClient.connect(state.socket) as c:  # type: ignore[union-attr]
            return {**c.get_json("/daemon/status"), "already_running": True}
    if state.alive:
        raise DaemonFailed(f"a daemon (pid {state.pid}) is running but does not answer on {state.socket}; "
                           "`hearth daemon stop` first")
    cleaned = clean_stale(state)

    from ..store import resolve_model

    specs = []
    for m in models:  # an unknown model fails here, before anything starts
        resolved = resolve_model(m)
        specs.append(os.fspath(resolved.path) if resolved.source == "local" else m)

    argv = [sys.executable, "-m", "hearth", *(["-v"] * verbose), "daemon", SERVE_COMMAND]
    for m in specs:
        argv += ["--model", m]
    argv += load_flags
    with open(os.open(d / LOG_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as log:
        os.fchmod(log.fileno(), 0o600)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    sock = d / SOCKET_NAME
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise DaemonFailed(f"the daemon exited ({proc.returncode}) while starting: {_log_tail(d)}")
        client = DaemonClient.connect(sock, timeout=10) if sock.exists() else None
        if client is not None:
            with client:
                try:
                    code, health = client.health()
                    if code == 200:
                        return {**client.get_json("/daemon/status"), "cleaned": cleaned}
                except (OSError, ValueError, DaemonError):
                    health = {}
            if health.get("status") == "error":
                _terminate(proc)
                err = health.get("error")
                err = err.get("message") if isinstance(err, dict) else err
                raise DaemonFailed(f"the daemon could not load its models: {err}")
        if time.monotonic() > deadline:
            _terminate(proc)
            raise DaemonFailed(f"the daemon did not come up in {timeout:.0f}s: {_log_tail(d)}")
        time.sleep(0.05)


def _terminate(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _is_daemon(pid):
            return True
        time.sleep(0.05)
    return not _is_daemon(pid)


def stop(timeout: float = GRACE_SECONDS + 15) -> dict[str, Any]:
    """SIGTERM, wait for in-flight requests and the exit; SIGKILL past ``timeout``."""
    state = inspect_state()
    if not state.alive or state.pid is None:
        return {"running": False, "cleaned": clean_stale(state)}
    pid = state.pid
    os.kill(pid, signal.SIGTERM)
    killed = False
    if not _wait_gone(pid, timeout):
        os.kill(pid, signal.SIGKILL)
        killed = True
        _wait_gone(pid, 10)
    for p in (state.socket, state.pid_file):  # the daemon removes them itself; unless killed
        if p == state.pid_file and _read_pid(p) not in (pid, None):
            continue
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    return {"running": False, "stopped": pid, "killed": killed}


def status() -> dict[str, Any]:
    state = inspect_state()
    if not state.running:
        return {"running": False, "pid": state.pid if state.alive else None, "socket": str(state.socket),
                "stale": state.stale, "responding": state.answers}
    with DaemonClient.connect(state.socket, timeout=10) as c:  # type: ignore[union-attr]
        return {"running": True, **c.get_json("/daemon/status")}


def reload() -> dict[str, Any]:
    c = DaemonClient.connect()
    if c is None:
        raise DaemonFailed("the daemon is not running (`hearth daemon start`)")
    with c:
        try:
            return c.post_json("/daemon/reload", {})
        except DaemonError as e:
            raise DaemonFailed(f"reload failed: {e.message}") from None
