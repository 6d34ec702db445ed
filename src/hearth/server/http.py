"""How hearth runs uvicorn: one place for the connection limits every server shares.

uvicorn (0.54) closes idle keep-alive connections but gives a client all the time it
wants to send its headers: 1,000 half-sent requests held 1,000 descriptors until the
process ran out. Here a connection must deliver a request's headers within
``HEADER_TIMEOUT`` seconds (the body has ``app.BODY_TIMEOUT_SECONDS``), and at most
``MAX_CONNECTIONS`` are served at once (uvicorn answers 503 past that).
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any, Sequence

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT = 10.0
MAX_CONNECTIONS = 512


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers."""

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(HEADER_TIMEOUT, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # nothing was answered yet: just hang up

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request's headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm()  # the next request on this connection gets the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def config(app: Any, **kw: Any) -> uvicorn.Config:
    """A uvicorn Config with hearth's connection limits."""
    kw.setdefault("http", GuardedH11Protocol)
    kw.setdefault("limit_concurrency", MAX_CONNECTIONS)
    kw.setdefault("timeout_keep_alive", 5)
    return uvicorn.Config(app, **kw)


def address(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host`` (a name, IPv4 or IPv6 address) and ``port``.

    Bound here rather than by uvicorn so that a server can listen on several addresses
    (``serve --host A --host B``) and a port in use is an ``OSError`` for the caller,
    not uvicorn's log line and exit. An IPv6 socket takes IPv6 only, so ``::`` and
    ``0.0.0.0`` can both be listened on."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        if os.name != "nt":  # on Windows it would let a second server take the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def serve(app: Any, sockets: Sequence[socket.socket], **kw: Any) -> None:
    """Run ``app`` on every socket (from ``bind``) until interrupted; closes them after."""
    host, port = sockets[0].getsockname()[:2]
    try:
        uvicorn.Server(config(app, host=host, port=port, **kw)).run(sockets=list(sockets))
    finally:
        for s in sockets:
            s.close()
