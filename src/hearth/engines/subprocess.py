"""A llama.cpp engine in a child process of its own, so that losing it costs one model.

llama.cpp's RPC client aborts the whole process (``GGML_ABORT`` in ``ggml-rpc.cpp``)
when a worker cannot be reached or dies, so a model that uses other hosts runs here,
as llama-server's router and Ollama run one process per model. ``ProcessEngine`` is
the whole Engine protocol; the child (``python -m hearth.engines.subprocess FD``) runs
a ``LlamaCppEngine`` and serves it over an inherited socketpair with a small message
protocol: length-prefixed pickles between our own two processes, never a network.

Messages, parent -> child: ``("load", spec)`` first, then ``("call", cid, method,
args, kwargs)``, ``("submit", cid, rid, prompt, params, stream)``, ``("cancel", rid)``,
``("close", cid)``. Child -> parent: ``("ready", facts)`` or ``("error", exc)`` after
the load, then ``("reply", cid, ok, value)`` and ``("events", [(rid, chunk |
None, result, error), ...])``: every event ready when the child's forwarder wakes goes
in one message (a chunk, or ``None`` and the request's end).

When the child dies (killed, aborted), every running request and call fails with an
``EngineError`` naming how it died and the last relevant line of its stderr, ``alive``
turns False, and new requests are refused: the pool loads the model again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..chat import ChatTemplate
from ..errors import EngineError
from ..gguf import ModelInfo
from ..planner import LoadPlan
from ..types import GenerationParams, GenerationResult
from .base import END_OF_STREAM, EngineStats, QueuedHandle, async_notify

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!Q")
_DONE = END_OF_STREAM
_STDERR_TAIL = 200  # lines of the child's stderr kept for the error message
# llama.cpp's last words before it aborts: the line worth showing
_RELEVANT = re.compile(
    r"failed to connect|rpc server crashed|rpc handshake|rpc transport|ggml_abort|ggml_assert|"
    r"error|abort|fatal|exception|segmentation|out of memory|cannot|could not|failed", re.I)
_RECORD = re.compile(r"^\x1ehearth (\d+) (\S+) (.*)$")  # a log record of the child's (_setup_logging)
_SOURCE_PREFIX = re.compile(r"^\S+\.(?:c|cc|cpp|h|hpp|cu|m):\d+: ")
# the Engine methods the child answers; everything else is refused
_CALLS = frozenset({"tokenize", "detokenize", "token_piece", "slot_states", "use_chat_template", "render_chat",
                    "embed", "stats"})
_INLINE = frozenset({"stats", "slot_states"})  # quick: answered at once, never behind an embedding


# -- framing ------------------------------------------------------------------------


class _Channel:
    """Length-prefixed pickles over a connected socket; ``send`` may be called from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = sock.makefile("rb")
        self._lock = threading.Lock()

    def send(self, msg: Any) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            self.sock.sendall(_HEADER.pack(len(data)) + data)

    def recv(self) -> Any:
        """The next message; EOFError when the other side is gone."""
        head = self._reader.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise EOFError
        (n,) = _HEADER.unpack(head)
        data = self._reader.read(n)
        if len(data) < n:
            raise EOFError
        return pickle.loads(data)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.close()
        self.sock.close()


def _portable(e: BaseException) -> BaseException:
    """The exception as it can cross to the other process: itself when it pickles
    (every HearthError does), else an EngineError saying what it was."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - anything that does not survive the trip
        return EngineError(f"{type(e).__name__}: {e}")


# -- the parent's side ----------------------------------------------------------------


class ProcessHandle(QueuedHandle):
    """One request running in the child; behaves as the in-process RequestHandle."""

    def __init__(self, engine: ProcessEngine, rid: int, loop: asyncio.AbstractEventLoop | None) -> None:
        self._engine = engine
        self.rid = rid
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._ended = False  # the end arrived
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._cancelled = False
        self._notify: Callable[[], None] | None = None
        if loop is not None:
            self._wake, self._notify = async_notify(loop)

    # fed by the engine's reader thread
    def _put(self, item: Any) -> None:
        self._events.put(item)
        if self._notify is not None:
            try:
                self._notify()
            except RuntimeError:  # the caller's event loop is gone
                self.cancel()

    def _end(self, result: GenerationResult | None, error: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._result = result
        self._error = error
        self._put(_DONE)

    @property
    def result_now(self) -> GenerationResult | None:
        return self._result

    def _error_now(self) -> BaseException | None:
        return self._error

    def cancel(self) -> None:
        if self._ended or self._cancelled:
            return
        self._cancelled = True
        self._engine._cancel(self.rid)


@dataclass
class _Reply:
    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False
    value: Any = None


def _describe_exit(rc: int | None) -> str:
    if rc is None:
        return "its connection closed"
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return {"SIGABRT": "aborted, SIGABRT", "SIGKILL": "killed, SIGKILL", "SIGSEGV": "crashed, SIGSEGV",
                "SIGBUS": "crashed, SIGBUS"}.get(name, f"killed by {name}")
    return f"exit code {rc}"


def _last_words(lines: Sequence[str]) -> str:
    """The line of the child's stderr that says why it died (llama.cpp's abort message),
    without its source file prefix; else its last line."""
    lines = [ln.strip() for ln in lines if ln.strip()]
    if not lines:
        return "nothing on its stderr"
    pick = next((ln for ln in reversed(lines) if _RELEVANT.search(ln)), lines[-1])
    pick = _SOURCE_PREFIX.sub("", pick)
    return pick[:400]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # the child imports hearth from where this process did
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    # ggml's abort would attach gdb for a backtrace: slow, and it holds our socket open
    env.setdefault("GGML_NO_BACKTRACE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class ProcessEngine:
    """A ``LlamaCppEngine`` in a child process: the Engine protocol over a socketpair.

    ``hosts``: RPC workers (``host:port``) the child adds (``rpc.add_workers``) before
    it loads, so the plan's devices may name them. ``alive`` is False once the child
    has died (or the engine was closed); the pool then drops the model.
    """

    name = "llama.cpp"

    def __init__(self, info: ModelInfo, plan: LoadPlan, model_name: str = "", max_queue: int = 64,
                 hosts: Sequence[str] = ()) -> None:
        self.info = info
        self.plan = plan
        self.model_name = model_name or info.path.name
        self.hosts = list(hosts)
        self._lock = threading.Lock()
        self._calls: dict[int, _Reply] = {}
        self._handles: dict[int, ProcessHandle] = {}
        self._ids = itertools.count(1)
        self._dead: EngineError | None = None
        self._closed = False
        self._stderr: deque[str] = deque(maxlen=_STDERR_TAIL)
        self._slots = plan.parallel
        parent, child = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "hearth.engines.subprocess", str(child.fileno())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, env=_child_env(), close_fds=True,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.pid = self._proc.pid
        self._chan = _Channel(parent)
        self._err_thread = threading.Thread(target=self._read_stderr, name=f"hearth-child-{self.pid}-stderr",
                                            daemon=True)
        self._err_thread.start()
        try:
            self._chan.send(("load", {
                "info": info, "plan": plan, "model_name": self.model_name, "max_queue": max_queue,
                "hosts": self.hosts, "log_levels": _log_levels(),
            }))
            msg = self._chan.recv()
        except (EOFError, OSError):
            rc = self._reap()
            over = f" with workers {', '.join(self.hosts)}" if self.hosts else ""
            raise EngineError(f"could not load {self.model_name} ({info.path}){over}: its process died "
                              f"({_describe_exit(rc)}): {_last_words(self._stderr)}") from None
        except BaseException:  # interrupted: the child must not outlive the load
            self._kill()
            raise
        if msg[0] == "error":
            self._reap(wait=True)
            raise msg[1]
        facts = msg[1]
        self._n_vocab: int = facts["n_vocab"]
        self._n_embd: int = facts["n_embd"]
        self._n_ctx_per_slot: int = facts["n_ctx_per_slot"]
        self._add_bos: bool = facts["add_bos"]
        self._special_texts: dict[str, str] = facts["special_texts"]
        self._fim: dict[str, int] = facts["fim_tokens"]
        self._template: ChatTemplate = facts["chat_template"]
        self._slots = facts["slots"]
        self._reader = threading.Thread(target=self._read, name=f"hearth-child-{self.pid}", daemon=True)
        self._reader.start()

    def __repr__(self) -> str:
        state = "alive" if self.alive else "closed" if self._closed else "dead"
        return f"ProcessEngine({self.model_name!r}, pid={self.pid}, {state})"

    # -- the child's lifetime ---------------------------------------------------------

    @property
    def alive(self) -> bool:
        """False once the child died or the engine was closed."""
        return self._dead is None and not self._closed

    def _read_stderr(self) -> None:
        """Keep the tail of the child's stderr; pass its log records on to ``logging``."""
        assert self._proc.stdout is not None
        for raw in iter(self._proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            m = _RECORD.match(line)
            if m:
                self._stderr.append(m.group(3))
                logger = logging.getLogger(m.group(2))
                level = int(m.group(1))
                if level >= _level_of(logger):
                    logger.log(level, "[model process %d] %s", self.pid, m.group(3))
            else:
                self._stderr.append(line)
                if line.strip():
                    log.debug("[model process %d] %s", self.pid, line)
        self._proc.stdout.close()

    def _reap(self, wait: bool = True) -> int | None:
        """The child's exit status (None if it has not exited), with its stderr read to the end."""
        rc = None
        try:
            rc = self._proc.wait(timeout=5 if wait else 0)
        except subprocess.TimeoutExpired:
            pass
        if rc is not None:
            self._err_thread.join(timeout=2)
        else:  # its socket is gone but it lives on: it is of no use anymore
            self._kill()
        self._chan.close()
        return rc

    def _kill(self) -> None:
        try:
            self._proc.kill()
            self._proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self._err_thread.join(timeout=2)
        self._chan.close()

    def _read(self) -> None:
        """The child's replies and request events, dispatched until it is gone."""
        try:
            while True:
                msg = self._chan.recv()
                kind = msg[0]
                if kind == "events":
                    for rid, chunk, result, error in msg[1]:
                        h = self._handles.get(rid)
                        if h is None:
                            continue
                        if chunk is not None:
                            h._put(chunk)
                        else:
                            with self._lock:
                                self._handles.pop(rid, None)
                            h._end(result, error)
                elif kind == "reply":
                    _, cid, ok, value = msg
                    with self._lock:
                        reply = self._calls.pop(cid, None)
                    if reply is not None:
                        reply.ok, reply.value = ok, value
                        reply.done.set()
        except (EOFError, OSError, ValueError):  # gone (ValueError: closed under us)
            pass
        except BaseException as e:  # noqa: BLE001 - a garbled message: the child is of no use
            log.exception("reading from the model's process")
            self._stderr.append(f"hearth: bad message from the model's process: {e}")
            self._kill()
        if self._closed:
            error = EngineError("the model has been unloaded")
        else:
            rc = self._reap()
            error = EngineError(f"the model's process died ({_describe_exit(rc)}): {_last_words(self._stderr)}; "
                                f"its requests failed, the next request loads it again")
            log.error("%s: %s", self.model_name, error)
        self._die(error)

    def _die(self, error: EngineError) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = error
            calls, self._calls = self._calls, {}
            handles, self._handles = self._handles, {}
        for reply in calls.values():
            reply.ok, reply.value = False, error
            reply.done.set()
        for h in handles.values():
            h._end(None, error)

    def _refusal(self) -> EngineError:
        return self._dead if self._dead is not None else EngineError("the model has been unloaded")

    def _call(self, kind: str, *payload: Any, force: bool = False) -> Any:
        reply = _Reply()
        with self._lock:
            if self._dead is not None or (self._closed and not force):
                raise self._refusal()
            cid = next(self._ids)
            self._calls[cid] = reply
        try:
            self._chan.send((kind, cid, *payload))
        except OSError:
            pass  # the reader sees the child gone and fails this call
        except BaseException:  # nothing was sent (an argument that does not pickle)
            with self._lock:
                self._calls.pop(cid, None)
            raise
        reply.done.wait()
        if reply.ok:
            return reply.value
        raise reply.value

    def _cancel(self, rid: int) -> None:
        if self._dead is None:
            try:
                self._chan.send(("cancel", rid))
            except OSError:
                pass

    # -- the Engine protocol --------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def n_embd(self) -> int:
        return self._n_embd

    @property
    def n_ctx_per_slot(self) -> int:
        return self._n_ctx_per_slot

    @property
    def add_bos(self) -> bool:
        return self._add_bos

    @property
    def special_texts(self) -> dict[str, str]:
        return dict(self._special_texts)

    def fim_tokens(self) -> dict[str, int]:
        return dict(self._fim)

    @property
    def chat_template(self) -> ChatTemplate:
        return self._template

    def use_chat_template(self, template: ChatTemplate) -> None:
        self._call("call", "use_chat_template", (template,), {})
        self._template = template

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self._call("call", "tokenize", (text, add_special, parse_special), {})

    def detokenize(self, tokens: list[int]) -> str:
        return self._call("call", "detokenize", (tokens,), {})

    def token_piece(self, token: int, special: bool = True) -> bytes:
        return self._call("call", "token_piece", (token, special), {})

    def slot_states(self) -> list[dict[str, Any]]:
        if not self.alive:
            return []
        return self._call("call", "slot_states", (), {})

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
                    extra: Mapping[str, Any] | None = None) -> tuple[str, list[str]]:
        return self._call("call", "render_chat", (messages,), {"tools": tools, "extra": extra})

    def submit(
        self,
        prompt: str | list[int],
        params: GenerationParams,
        stream: bool = True,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> ProcessHandle:
        """Queue a request in the child (it tokenizes and compiles the grammar there);
        its errors (context, busy, bad settings) are raised here, as in process."""
        with self._lock:
            if self._dead is not None or self._closed:
                raise self._refusal()
            rid = next(self._ids)
            handle = self._handles[rid] = ProcessHandle(self, rid, loop)
        try:
            self._call("submit", rid, prompt, params, stream)
        except BaseException:
            with self._lock:
                self._handles.pop(rid, None)
            raise
        return handle

    def embed(self, inputs: Sequence[str | list[int]], truncate: bool = False) -> tuple[list[list[float]], list[int]]:
        return self._call("call", "embed", (list(inputs), truncate), {})

    def stats(self) -> EngineStats:
        """Counted here, without asking the child (the pool asks on its event loop): the
        requests not ended yet fill the slots first, the rest wait. A dead or closed
        engine runs nothing."""
        with self._lock:
            n = len(self._handles)
        return EngineStats(self._slots, min(n, self._slots), max(0, n - self._slots))

    def close(self) -> None:
        """Unload: running requests end as Cancelled, then the child exits."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # new requests are refused; the child's exit is expected
        if self._dead is None:
            try:
                self._call("close", force=True)
            except EngineError:
                pass
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log.warning("the model's process %d did not exit: killing it", self.pid)
            self._proc.kill()
        self._reader.join(timeout=10)
        self._kill()
        self._die(EngineError("the model has been unloaded"))


def _level_of(logger: logging.Logger) -> int:
    """The level this process shows a logger's records at; llama.cpp's own log is quiet
    unless asked for (``llamacpp/model.py``), also where that module was never imported."""
    if logger.name.startswith("hearth.llama_cpp") and logging.getLogger("hearth.llama_cpp").level == logging.NOTSET:
        return logging.CRITICAL
    return logger.getEffectiveLevel() if not logger.disabled else logging.CRITICAL + 1


def _log_levels() -> dict[str, int]:
    """The levels the parent logs hearth's and llama.cpp's messages at, for the child to
    send what the parent would show (and llama.cpp's errors at least, for the tail)."""
    return {"hearth": logging.getLogger("hearth").getEffectiveLevel(),
            "hearth.llama_cpp": _level_of(logging.getLogger("hearth.llama_cpp"))}


# -- the child's side -------------------------------------------------------------------


class _ChildServer:
    """Runs the engine's calls in a small pool and sends every request's events as the
    scheduler puts them (from its thread: no thread to wake per token)."""

    def __init__(self, engine: Any, chan: _Channel) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.engine = engine
        self.chan = chan
        self.done = END_OF_STREAM
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="hearth-child-call")
        self.lock = threading.Lock()
        self.drain_lock = threading.Lock()  # one sender of a request's events at a time, in order
        self.live: dict[int, Any] = {}  # rid -> RequestHandle
        self.early_cancel: set[int] = set()  # cancelled before their submit ran

    def serve(self) -> None:
        while True:
            try:
                msg = self.chan.recv()
            except (EOFError, OSError):
                os._exit(0)  # the parent is gone: nobody to serve
            kind = msg[0]
            if kind == "cancel":
                self._cancel(msg[1])
            elif kind == "call" and msg[2] in _INLINE:
                self._run_call(*msg[1:])
            elif kind == "call":
                self.pool.submit(self._run_call, *msg[1:])
            elif kind == "submit":
                self.pool.submit(self._run_submit, *msg[1:])
            elif kind == "close":
                self.pool.shutdown(wait=True)
                try:
                    self.engine.close()  # running requests end (Cancelled): sent as they end
                finally:
                    self._reply(msg[1], True, None)
                return

    def _reply(self, cid: int, ok: bool, value: Any) -> None:
        try:
            self.chan.send(("reply", cid, ok, value))
        except (OSError, pickle.PicklingError, TypeError, AttributeError) as e:
            if isinstance(e, OSError):
                os._exit(0)
            self.chan.send(("reply", cid, False, EngineError(f"cannot send the reply: {e}")))

    def _run_call(self, cid: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            if method not in _CALLS:
                raise EngineError(f"unknown engine call {method!r}")
            value = getattr(self.engine, method)(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            self._reply(cid, False, _portable(e))
            return
        self._reply(cid, True, value)

    def _run_submit(self, cid: int, rid: int, prompt: Any, params: GenerationParams, stream: bool) -> None:
        try:
            handle = self.engine.submit(prompt, params, stream)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            self._reply(cid, False, _portable(e))
            return
        with self.lock:
            self.live[rid] = handle
            if rid in self.early_cancel:
                self.early_cancel.discard(rid)
                handle.cancel()
        handle.request.notify = lambda: self._drain(rid)
        self._reply(cid, True, None)
        self._drain(rid)  # events put before notify was set

    def _cancel(self, rid: int) -> None:
        with self.lock:
            handle = self.live.get(rid)
            if handle is None:
                self.early_cancel.add(rid)
                return
        handle.cancel()

    def _drain(self, rid: int) -> None:
        """Send what the request has put since the last drain (a chunk, or its end):
        one message, however many events piled up."""
        with self.drain_lock:
            with self.lock:
                handle = self.live.get(rid)
            if handle is None:
                return
            events = handle.request.events
            batch: list[tuple[int, Any, Any, Any]] = []
            while True:
                try:
                    item = events.get_nowait()
                except queue.Empty:
                    break
                if item is self.done:
                    req = handle.request
                    with self.lock:
                        self.live.pop(rid, None)
                    batch.append((rid, None, req.result, None if req.error is None else _portable(req.error)))
                    break
                batch.append((rid, item, None, None))
            if batch:
                try:
                    self.chan.send(("events", batch))
                except OSError:
                    os._exit(0)  # the parent is gone


def _setup_logging(levels: Mapping[str, int]) -> None:
    """Log records go to stderr, marked so the parent passes them on to its ``logging``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("\x1ehearth %(levelno)d %(name)s %(message)s"))
    root = logging.getLogger("hearth")
    root.addHandler(handler)
    root.propagate = False
    root.setLevel(levels.get("hearth", logging.WARNING))
    # llama.cpp's errors at least: its last words explain a death
    logging.getLogger("hearth.llama_cpp").setLevel(min(levels.get("hearth.llama_cpp", logging.CRITICAL),
                                                       logging.ERROR))


def _child_main(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    chan = _Channel(sock)
    try:
        msg = chan.recv()
    except (EOFError, OSError):
        return 0
    assert msg[0] == "load", msg[0]
    spec = msg[1]
    _setup_logging(spec.get("log_levels") or {})
    try:
        if spec["hosts"]:
            from ..rpc import add_workers

            add_workers(list(spec["hosts"]))
        from .llamacpp import LlamaCppEngine

        engine = LlamaCppEngine(spec["info"], spec["plan"], model_name=spec["model_name"],
                                max_queue=spec["max_queue"])
    except BaseException as e:  # noqa: BLE001 - the parent raises it
        chan.send(("error", _portable(e) if isinstance(e, Exception) else EngineError(f"loading stopped: {e!r}")))
        return 1
    try:
        facts = {
            "n_vocab": engine.n_vocab, "n_embd": engine.n_embd, "n_ctx_per_slot": engine.n_ctx_per_slot,
            "add_bos": engine.add_bos, "special_texts": engine.special_texts, "fim_tokens": engine.fim_tokens(),
            "chat_template": engine.chat_template, "slots": engine.stats().slots,
        }
        chan.send(("ready", facts))
    except BaseException as e:  # noqa: BLE001
        engine.close()
        chan.send(("error", _portable(e) if isinstance(e, Exception) else EngineError(repr(e))))
        return 1
    _ChildServer(engine, chan).serve()
    chan.close()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(int(sys.argv[1])))


__all__ = ["ProcessEngine", "ProcessHandle"]
