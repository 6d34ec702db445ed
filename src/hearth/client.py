"""A thin client for the preload daemon: stdlib only, so ``hearth run`` starts fast.

It speaks plain HTTP/1.1 over the daemon's Unix socket and never imports llama_cpp,
FastAPI, pydantic or numpy; ``hearth run`` tries it before importing anything heavy.

    >>> from hearth.client import DaemonClient
    >>> c = DaemonClient.connect()                  # None when no daemon answers
    >>> for event in c.generate({"prompt": "hi", "config": {"max_tokens": 8}}): ...
"""

from __future__ import annotations

import json
import os
import socket

TYPE_CHECKING = False  # typing costs milliseconds to import; annotations are strings here
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any, Iterator

SOCKET_NAME = "hearth.sock"
PID_NAME = "hearth.pid"
LOG_NAME = "hearth.log"
RUNTIME_ENV = "HEARTH_RUNTIME_DIR"
NO_DAEMON_ENV = "HEARTH_NO_DAEMON"


def _runtime_dir() -> str:
    d = os.environ.get(RUNTIME_ENV)
    if d:
        return os.path.expanduser(d)
    import warnings

    from platformdirs import user_runtime_dir

    with warnings.catch_warnings():  # "XDG_RUNTIME_DIR is not set": we make the dir 0700 anyway
        warnings.simplefilter("ignore")
        return user_runtime_dir("hearth", appauthor=False)


def runtime_dir() -> Path:
    """Where the daemon's socket, pid file and log live: ``$HEARTH_RUNTIME_DIR`` or the
    user runtime dir (``$XDG_RUNTIME_DIR/hearth`` on Linux)."""
    from pathlib import Path

    return Path(_runtime_dir())


def socket_path() -> str:
    return os.path.join(_runtime_dir(), SOCKET_NAME)


def daemon_disabled() -> bool:
    return os.environ.get(NO_DAEMON_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class DaemonError(Exception):
    """The daemon refused a request: ``message`` is its one-line reason."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class Response:
    """One HTTP/1.1 response read off the socket: status, headers, then the body as a
    whole (``read``) or line by line as it arrives (``lines``; NDJSON streams)."""

    def __init__(self, f: Any) -> None:
        self._f = f
        line = f.readline(65537)
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise ConnectionError(f"not an HTTP response from the daemon: {line[:80]!r}")
        self.status = int(parts[1])
        self.headers: dict[str, str] = {}
        while True:
            h = f.readline(65537)
            if h in (b"\r\n", b"\n"):
                break
            if not h:
                raise ConnectionError("the daemon closed the connection in the headers")
            k, _, v = h.decode("latin-1").partition(":")
            self.headers[k.strip().lower()] = v.strip()
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        self._left = int(self.headers.get("content-length", "-1"))
        self.done = False

    def _exact(self, n: int) -> bytes:
        data = self._f.read(n)
        if len(data) < n:
            raise ConnectionError("the daemon closed the connection mid-response")
        return data

    def chunks(self) -> Iterator[bytes]:
        if self.done:
            return
        if not self.chunked:
            data = self._exact(self._left) if self._left >= 0 else self._f.read()
            self.done = True
            if data:
                yield data
            return
        while True:
            size_line = self._f.readline(1026)
            if not size_line:
                raise ConnectionError("the daemon closed the connection mid-stream")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self._f.readline(65537) not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                self.done = True
                return
            data = self._exact(size)
            self._exact(2)  # CRLF
            yield data

    def read(self) -> bytes:
        return b"".join(self.chunks())

    def lines(self) -> Iterator[bytes]:
        buf = b""
        for chunk in self.chunks():
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    yield line
        if buf.strip():
            yield buf


def _open(path: str, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


class DaemonClient:
    """One keep-alive connection to the daemon; ``connect()`` returns None when nothing
    answers. Plain HTTP/1.1 on a socket (``http.client`` alone costs more to import than
    the whole request takes)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._f = sock.makefile("rb")
        self._last: Response | None = None

    @classmethod
    def connect(cls, path: str | os.PathLike[str] | None = None, timeout: float | None = None) -> DaemonClient | None:
        try:
            return cls(_open(os.fspath(path or socket_path()), timeout))
        except OSError:  # no socket, stale socket (refused), not ours (permission)
            return None

    def close(self) -> None:
        self._f.close()
        self.sock.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, body: Any = None) -> Response:
        if self._last is not None and not self._last.done:
            self._last.read()  # finish the previous response before reusing the connection
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(data)}\r\n"
        if body is not None:
            head += "Content-Type: application/json\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + data)
        self._last = Response(self._f)
        return self._last

    @staticmethod
    def _error(resp: Response) -> DaemonError:
        raw = resp.read()
        try:
            err = json.loads(raw).get("error")
            msg = err.get("message") if isinstance(err, dict) else err
        except (ValueError, AttributeError):
            msg = None
        return DaemonError(msg or f"daemon answered HTTP {resp.status}: {raw[:200]!r}", resp.status)

    def health(self) -> tuple[int, dict[str, Any]]:
        """``/health``: (200, ``{"status": "ok"}``) once the startup models are loaded;
        (503, ``{"status": "loading"}`` or ``{"status": "error", "error": ...}``) before."""
        resp = self._request("GET", "/health")
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, {"status": "error", "error": raw[:200].decode(errors="replace")}

    def get_json(self, path: str) -> Any:
        resp = self._request("GET", path)
        if resp.status >= 400:
            raise self._error(resp)
        return json.loads(resp.read())

    def post_json(self, path: str, body: Any) -> Any:
        resp = self._request("POST", path, body)
        if resp.status >= 400:
            raise self._error(resp)
        return json.loads(resp.read())

    def generate(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Stream ``/daemon/generate``: ``{"text": ...}`` events, then ``{"result": {...}}``
        (the same dict as ``GenerationResult.to_dict()``). An error raises DaemonError."""
        resp = self._request("POST", "/daemon/generate", request)
        if resp.status >= 400:
            raise self._error(resp)
        for line in resp.lines():
            event = json.loads(line)
            if "error" in event:
                raise DaemonError(event["error"], event.get("status", 500))
            if "result" in event:
                resp.read()  # the end of the chunked body, so the connection can be reused
            yield event
            if "result" in event:
                return
        raise ConnectionError("the daemon ended the stream without a result")
