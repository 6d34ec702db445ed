"""A local HTTP server that answers the Hugging Face Hub routes huggingface_hub uses.

Tests point ``HF_ENDPOINT`` at it and serve real GGUF files. It speaks the parts of
the hub protocol a download needs:

- ``GET /api/models/{repo}[/revision/{rev}]?blobs=true``: the repo listing with
  sizes and LFS sha256 (``HfApi.model_info(files_metadata=True)``);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: ``X-Repo-Commit``, ``X-Linked-Etag``
  (the sha256, as the hub sends for LFS files), ``X-Linked-Size``, ranged GETs (206);
- the hub's error codes (``X-Error-Code: RepoNotFound`` / ``EntryNotFound``, 401).

And it misbehaves on request: cut a transfer after N bytes (``cut``), then stay
down (``down``), serve wrong bytes under the right hash (``corrupt``), or claim a
huge size (``fake_size``). Every request is logged in ``requests``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubEntry:
    path: Path
    sha256: str
    size: int
    corrupt: bool = False
    fake_size: int | None = None


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names


@dataclass
class FakeHub:
    repos: dict[str, dict[str, HubEntry]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    cut: dict[str, int] = field(default_factory=dict)  # filename -> bytes to send before cutting (once)
    down: bool = False  # answer 503 to everything
    down_after_cut: bool = False  # go down right after a cut
    private: set[str] = field(default_factory=set)  # repos that answer 401
    rate: int = 0  # bytes per second per transfer (0: as fast as possible)
    sent: dict[str, int] = field(default_factory=dict)  # filename -> body bytes written so far
    url: str = ""

    def add(self, repo: str, name: str, path: Path, *, corrupt: bool = False, fake_size: int | None = None) -> HubEntry:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        e = HubEntry(Path(path), h.hexdigest(), Path(path).stat().st_size, corrupt, fake_size)
        self.repos.setdefault(repo, {})[name] = e
        return e

    def gets(self, name: str | None = None) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path
                and (name is None or r.path.endswith("/" + name))]


def _handler(hub: FakeHub):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # quiet
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, data: object, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

        def do_HEAD(self) -> None:
            self._route()

        def do_GET(self) -> None:
            self._route()

        def _route(self) -> None:
            hub.requests.append(Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            self.close_connection = True
            if hub.down:
                return self._json(503, {"error": "down"})
            path = unquote(urlparse(self.path).path)
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
            if m:
                return self._info(m.group(1))
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m:
                return self._file(m.group(1), m.group(3))
            self._json(404, {"error": "no such route"})

        def _repo(self, repo: str) -> dict[str, HubEntry] | None:
            if repo in hub.private:
                self._json(401, {"error": "Invalid credentials"}, {"X-Error-Code": "RepoNotFound",
                                                                   "X-Error-Message": "Invalid credentials"})
                return None
            files = hub.repos.get(repo)
            if files is None:
                self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound",
                                                                   "X-Error-Message": "Repository not found"})
            return files

        def _info(self, repo: str) -> None:
            files = self._repo(repo)
            if files is None:
                return
            siblings = [
                {"rfilename": n, "size": e.fake_size or e.size, "blobId": e.sha256[:40],
                 "lfs": {"size": e.fake_size or e.size, "sha256": e.sha256, "pointerSize": 134}}
                for n, e in sorted(files.items())
            ]
            self._json(200, {"_id": "x", "id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                             "tags": ["gguf"], "siblings": siblings})

        def _file(self, repo: str, name: str) -> None:
            files = self._repo(repo)
            if files is None:
                return
            e = files.get(name)
            if e is None:
                return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound",
                                                                     "X-Repo-Commit": COMMIT})
            size = e.fake_size or e.size
            common = {"X-Repo-Commit": COMMIT, "X-Linked-Etag": f'"{e.sha256}"', "ETag": f'"{e.sha256}"',
                      "X-Linked-Size": str(size), "Accept-Ranges": "bytes",
                      "Content-Type": "application/octet-stream"}
            if self.command == "HEAD":
                self.send_response(200)
                for k, v in common.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(size))
                self.send_header("Connection", "close")
                self.end_headers()
                return
            data = e.path.read_bytes()
            if e.corrupt:
                data = bytearray(data)
                data[len(data) // 2] ^= 0xFF
                data = bytes(data)
            start = 0
            rng = self.headers.get("Range")
            if rng:
                m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
                start = int(m.group(1)) if m else 0
            body = data[start:]
            status = 206 if rng else 200
            self.send_response(status)
            for k, v in common.items():
                self.send_header(k, v)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            limit = hub.cut.pop(name, None)
            if limit is not None:
                self.wfile.write(body[:limit])
                self.wfile.flush()
                if hub.down_after_cut:
                    hub.down = True
                return  # the connection closes with the body incomplete
            if not hub.rate:
                self.wfile.write(body)
                hub.sent[name] = hub.sent.get(name, 0) + len(body)
                return
            step = max(1, hub.rate // 20)  # a slow link: 20 writes a second
            for i in range(0, len(body), step):
                try:
                    self.wfile.write(body[i:i + step])
                    self.wfile.flush()
                except OSError:
                    return  # the client left
                hub.sent[name] = hub.sent.get(name, 0) + len(body[i:i + step])
                time.sleep(0.05)

    return H


class HubServer:
    """Start/stop a FakeHub on a free localhost port."""

    def __init__(self, hub: FakeHub | None = None) -> None:
        self.hub = hub or FakeHub()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.hub))
        self.httpd.daemon_threads = True
        self.hub.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self.hub

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
