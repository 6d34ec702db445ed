"""Finding workers on the local network: off unless asked for.

``hearth worker --announce`` sends a small UDP beacon every few seconds to the broadcast
address of each IPv4 network the worker listens on (what it serves: endpoint, devices and
their free memory, RPC protocol version); ``hearth workers`` listens for beacons for a
few seconds and lists the workers it heard. Nothing else uses them: a worker is only used
when named with ``--hosts`` (a beacon is not authenticated either; see the README's
security note on workers).
"""

from __future__ import annotations

import fcntl
import json
import socket
import struct
import time
from typing import Any, Iterator

PORT = 50053  # beacons: the worker's RPC port + 1 by convention, fixed here
INTERVAL = 2.0
MAGIC = "hearth-worker"
MAX_BEACON = 4096

_SIOCGIFADDR, _SIOCGIFBRDADDR = 0x8915, 0x8919


def _ioctl_addr(sock: socket.socket, request: int, ifname: str) -> str | None:
    try:
        raw = fcntl.ioctl(sock.fileno(), request, struct.pack("256s", ifname.encode()[:15]))
    except OSError:
        return None
    return socket.inet_ntoa(raw[20:24])


def broadcast_addresses(bound: str) -> list[str]:
    """The broadcast address of each interface whose address is ``bound`` (or of every
    non-loopback interface, for 0.0.0.0)."""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            addr = _ioctl_addr(s, _SIOCGIFADDR, name)
            if addr is None or addr.startswith("127."):
                continue
            if bound not in ("0.0.0.0", "", addr):
                continue
            brd = _ioctl_addr(s, _SIOCGIFBRDADDR, name)
            if brd and brd != "0.0.0.0":
                out.append(brd)
    return sorted(set(out))


def beacon(endpoint: str, devices: list[dict[str, Any]], version: str) -> bytes:
    data = json.dumps({"magic": MAGIC, "endpoint": endpoint, "version": version, "devices": devices,
                       "time": time.time()}, separators=(",", ":")).encode()
    return data[:MAX_BEACON]


def announce_forever(endpoint: str, bound: str, devices: Any, version: str, stop: Any,
                     port: int = PORT, interval: float = INTERVAL) -> None:
    """Send beacons until ``stop`` (a threading.Event) is set; ``devices()`` is called
    each time, so the free memory is current."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        while not stop.is_set():
            data = beacon(endpoint, devices(), version)
            for addr in broadcast_addresses(bound):
                try:
                    s.sendto(data, (addr, port))
                except OSError:
                    pass
            stop.wait(interval)


def listen(seconds: float = 3.0, port: int = PORT) -> Iterator[dict[str, Any]]:
    """Beacons heard within ``seconds``, one per worker (the latest)."""
    seen: dict[str, dict[str, Any]] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", port))
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                data, (addr, _) = s.recvfrom(MAX_BEACON + 1)
            except socket.timeout:
                break
            try:
                msg = json.loads(data)
            except ValueError:
                continue
            if not isinstance(msg, dict) or msg.get("magic") != MAGIC or not isinstance(msg.get("endpoint"), str):
                continue
            ep = msg["endpoint"]
            if ep.startswith("0.0.0.0:"):  # a worker on every address: the one it was heard from
                ep = f"{addr}:{ep.rsplit(':', 1)[1]}"
            msg["endpoint"], msg["from"] = ep, addr
            seen[ep] = msg
    yield from sorted(seen.values(), key=lambda m: m["endpoint"])
