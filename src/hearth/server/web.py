"""Which web pages and which Host names may reach the server (what Ollama users expect).

- **Host**: a server listening on a loopback address answers only requests whose
  ``Host`` is a loopback name or address (``localhost``, ``*.localhost``, ``127.0.0.1``,
  ``[::1]``) or a name the operator allows (``HEARTH_ALLOWED_HOSTS``). After DNS
  rebinding a page's own name points at 127.0.0.1, but its requests still carry that
  name: they are refused. A server bound to another address answers any Host (the
  operator chose to expose it; use ``--api-key``). A Unix socket has no Host to check.
- **Origin**: a request from a browser carries ``Origin``; it is served only if the
  origin is allowed: Ollama's defaults (``http(s)://localhost``, ``127.0.0.1``,
  ``0.0.0.0`` on any port, ``app://``, ``file://``, ``tauri://``, ``vscode-webview://``,
  ``vscode-file://``), the server's own origin, and ``HEARTH_ORIGINS`` (comma-separated,
  ``*`` wildcards, Ollama's ``OLLAMA_ORIGINS`` syntax). A CORS preflight from an
  allowed origin gets the CORS headers; from any other, 403.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from dataclasses import dataclass, field

_DEFAULT_ORIGIN_HOSTS = ("localhost", "127.0.0.1", "0.0.0.0", "[::1]")
DEFAULT_ORIGINS: tuple[str, ...] = tuple(
    f"{scheme}://{h}{port}" for h in _DEFAULT_ORIGIN_HOSTS for scheme in ("http", "https") for port in ("", ":*")
) + ("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")


def split_list(value: str | None) -> list[str]:
    return [x.strip() for x in (value or "").split(",") if x.strip()]


def _host_name(host_header: str) -> str:
    """``Host`` without its port, lower case, IPv6 brackets kept off."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    if h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h


def is_loopback(name: str) -> bool:
    name = name.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass
class WebPolicy:
    """The Host and Origin rules of one server."""

    listen_host: str | None  # None: a Unix socket
    origins: list[str] = field(default_factory=list)  # extra allowed origin patterns
    hosts: list[str] = field(default_factory=list)  # extra allowed Host names (patterns)

    def __post_init__(self) -> None:
        self._patterns = [*DEFAULT_ORIGINS, *self.origins]
        self._check_hosts = self.listen_host is not None and is_loopback(self.listen_host)

    def host_allowed(self, host_header: str | None) -> bool:
        if not self._check_hosts:
            return True
        if not host_header:
            return False  # HTTP/1.1 requires Host; a loopback-only server insists
        name = _host_name(host_header)
        return is_loopback(name) or any(fnmatch.fnmatchcase(name, p.lower()) for p in self.hosts)

    def origin_allowed(self, origin: str, host_header: str | None) -> bool:
        o = origin.strip().lower()
        if "*" in self._patterns:
            return True
        if host_header and o in (f"http://{host_header.lower()}", f"https://{host_header.lower()}"):
            return True  # same origin: the server's own page
        return any(fnmatch.fnmatchcase(o, p.lower()) for p in self._patterns)


CORS_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
CORS_MAX_AGE = "600"
