"""Other machines' devices through llama.cpp's RPC backend (ggml-rpc).

A *worker* (``hearth worker``) serves its devices with ``ggml_backend_rpc_start_server``;
a model split across hosts names them with ``ggml_backend_rpc_add_server`` and gets
their devices in llama.cpp's device list. Both come from the RPC backend compiled into
llama-cpp-python (``CMAKE_ARGS="-DGGML_RPC=ON"``); :func:`available` says whether it is.

llama.cpp's RPC client aborts the whole process when a worker cannot be reached or
dies (``GGML_ABORT`` in ``ggml-rpc.cpp``). So before llama.cpp ever connects, hearth
talks to each worker itself (:func:`probe`: the protocol's HELLO, DEVICE_COUNT and
GET_DEVICE_MEMORY commands over a socket with a timeout), and a model that uses
workers runs in a child process of its own (``engines/subprocess.py``).

The RPC protocol has no authentication: anyone who reaches a worker's port can run
computations on it and read what it holds. Workers listen on loopback unless told
otherwise; run them only on a trusted network or behind an SSH tunnel or WireGuard.
"""

from __future__ import annotations

import ctypes
import functools
import socket
import struct
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest, RpcUnavailable, WorkerError

# ggml-rpc.h of the llama.cpp our llama-cpp-python vendors
RPC_PROTO_MAJOR_VERSION = 7
RPC_PROTO_MINOR_VERSION = 0
RPC_PROTO_PATCH_VERSION = 0
RPC_CONN_CAPS_SIZE = 24  # transport.h
# enum rpc_cmd
_CMD_GET_DEVICE_MEMORY = 11
_CMD_HELLO = 14
_CMD_DEVICE_COUNT = 15

DEFAULT_PORT = 50052  # rpc-server's
PROBE_TIMEOUT = 5.0


REBUILD_HINT = ('reinstall llama-cpp-python with it: CMAKE_ARGS="-DGGML_RPC=ON" pip install --no-cache-dir '
                '--force-reinstall --no-deps "llama-cpp-python==$(pip show llama-cpp-python | sed -n s/^Version:.//p)"')


@dataclass(frozen=True)
class RemoteDevice:
    """One device a worker offers, as the planner sees it."""

    endpoint: str  # "host:port"
    index: int  # the device's number on that worker
    # llama.cpp's device name once added: RPC0, RPC1, ... with one counter over every
    # worker added in a process, in order (the endpoint is only the description)
    name: str
    free: int  # bytes
    total: int  # bytes
    description: str = ""

    @property
    def host(self) -> str:
        return self.endpoint.rsplit(":", 1)[0]


@dataclass(frozen=True)
class WorkerInfo:
    endpoint: str
    version: tuple[int, int, int]
    devices: list[RemoteDevice]


# -- endpoints ------------------------------------------------------------------------


def parse_hosts(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"h1:50052,h2"`` or a list -> ``["h1:50052", "h2:50052"]`` (default port added,
    ``[v6]:port`` kept). An empty value is no hosts."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for raw in items:
        item = str(raw).strip()
        if not item:
            continue
        if item.startswith("["):  # [::1]:50052 or [::1]
            host, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        elif item.count(":") == 1:
            host, port = item.split(":")
        elif ":" in item:  # a bare IPv6 address
            host, port = item, ""
        else:
            host, port = item, ""
        if not host:
            raise BadRequest(f"host {item!r} has no address (HOST[:PORT], e.g. 192.168.1.20:{DEFAULT_PORT})")
        if port and (not port.isdigit() or not 0 < int(port) < 65536):
            raise BadRequest(f"host {item!r}: the port must be a number in 1..65535")
        port_n = int(port) if port else DEFAULT_PORT
        out.append(f"[{host}]:{port_n}" if ":" in host else f"{host}:{port_n}")
    if len(set(out)) < len(out):
        raise BadRequest(f"a host is listed twice: {', '.join(out)}")
    if len(out) > 16:  # GGML_RPC_MAX_SERVERS
        raise BadRequest(f"at most 16 hosts, got {len(out)}")
    return out


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


# -- the protocol, spoken by hearth before llama.cpp connects --------------------------


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the worker closed the connection")
        buf += chunk
    return bytes(buf)


def _command(sock: socket.socket, cmd: int, payload: bytes, reply_size: int) -> bytes:
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    (size,) = struct.unpack("<Q", _recv(sock, 8))
    if size != reply_size:
        raise ConnectionError(f"unexpected reply size {size} to command {cmd}")
    return _recv(sock, size)


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT) -> WorkerInfo:
    """Ask a worker for its protocol version and devices (free/total memory), with a
    timeout, without llama.cpp: a clear ``WorkerError`` instead of llama.cpp's abort."""
    host, port = _split_endpoint(endpoint)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise WorkerError(f"worker {endpoint} cannot be reached: {e.strerror or e} "
                          f"(is `hearth worker` running there, and the port open?)") from None
    try:
        sock.settimeout(timeout)
        try:
            rsp = _command(sock, _CMD_HELLO, bytes(RPC_CONN_CAPS_SIZE), 4 + RPC_CONN_CAPS_SIZE)
        except socket.timeout:
            raise WorkerError(f"worker {endpoint} accepted the connection but did not answer within {timeout:.0f} s: "
                              "it is serving another client (llama.cpp's RPC server serves one at a time), or "
                              "it is not a llama.cpp RPC server") from None
        major, minor, patch = rsp[0], rsp[1], rsp[2]
        if major != RPC_PROTO_MAJOR_VERSION or minor > RPC_PROTO_MINOR_VERSION:
            raise WorkerError(
                f"worker {endpoint} speaks RPC protocol {major}.{minor}.{patch}, this hearth's llama.cpp speaks "
                f"{RPC_PROTO_MAJOR_VERSION}.{RPC_PROTO_MINOR_VERSION}.{RPC_PROTO_PATCH_VERSION}: install the same "
                "hearth and llama-cpp-python versions on both machines")
        (count,) = struct.unpack("<I", _command(sock, _CMD_DEVICE_COUNT, b"", 4))
        devices = []
        for i in range(min(count, 64)):
            free, total = struct.unpack("<QQ", _command(sock, _CMD_GET_DEVICE_MEMORY, struct.pack("<I", i), 16))
            devices.append(RemoteDevice(endpoint, i, "", free, total))
        return WorkerInfo(endpoint, (major, minor, patch), devices)
    except (ConnectionError, OSError, struct.error) as e:
        if isinstance(e, WorkerError):
            raise
        raise WorkerError(f"worker {endpoint} broke off the handshake ({e}): is it a llama.cpp RPC server "
                          f"of protocol {RPC_PROTO_MAJOR_VERSION}.x?") from None
    finally:
        sock.close()


# -- llama.cpp's RPC backend, through the backend registry -----------------------------


@functools.lru_cache(maxsize=1)
def _ggml() -> Any:
    """libggml of the installed llama-cpp-python: ``hardware._ggml_lib``'s device API,
    plus the backend registry calls the RPC backend needs."""
    from .hardware import _ggml_lib

    lib = _ggml_lib()
    if lib is None:
        raise OSError("libggml is not available")
    for name, res, args in (
        ("ggml_backend_reg_by_name", ctypes.c_void_p, [ctypes.c_char_p]),
        ("ggml_backend_reg_get_proc_address", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
        ("ggml_backend_register", None, [ctypes.c_void_p]),
        ("ggml_backend_reg_dev_count", ctypes.c_size_t, [ctypes.c_void_p]),
        ("ggml_backend_reg_dev_get", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
        ("ggml_backend_dev_by_name", ctypes.c_void_p, [ctypes.c_char_p]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def _rpc_reg() -> int | None:
    try:
        import llama_cpp as ll

        ll.llama_backend_init()
        return _ggml().ggml_backend_reg_by_name(b"RPC") or None
    except (ImportError, OSError, AttributeError):
        return None


def available() -> bool:
    """Whether the installed llama-cpp-python has llama.cpp's RPC backend."""
    return _rpc_reg() is not None


def require(what: str = "using other hosts") -> int:
    reg = _rpc_reg()
    if reg is None:
        raise RpcUnavailable(f"{what} needs llama.cpp's RPC backend, which this llama-cpp-python was built "
                             f"without; {REBUILD_HINT}")
    return reg


def _proc(name: bytes, restype: Any, argtypes: list[Any]) -> Any:
    addr = _ggml().ggml_backend_reg_get_proc_address(require(), name)
    if not addr:
        raise RpcUnavailable(f"the RPC backend has no {name.decode()}; {REBUILD_HINT}")
    return ctypes.CFUNCTYPE(restype, *argtypes)(addr)


@dataclass(frozen=True)
class LocalDevice:
    name: str
    description: str
    kind: str  # "cpu", "gpu", "igpu", "accel"
    free: int
    total: int


_DEV_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


def local_devices() -> list[LocalDevice]:
    """Every device llama.cpp has registered in this process (RPC ones included once added)."""
    lib = _ggml()
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(LocalDevice((lib.ggml_backend_dev_name(dev) or b"").decode(),
                               (lib.ggml_backend_dev_description(dev) or b"").decode(),
                               _DEV_TYPES.get(lib.ggml_backend_dev_type(dev), "other"), free.value, total.value))
    return out


def remote_devices(endpoints: list[str], optional: bool = False,
                   warn: Any = None) -> tuple[list[RemoteDevice], list[str]]:
    """Each worker's devices and free memory (asked over the protocol with a timeout: a
    host that does not answer is a ``WorkerError`` naming it), named as llama.cpp will
    name them when :func:`add_workers` adds the returned endpoints, in order, in a fresh
    process. ``optional``: leave out (and ``warn`` about) workers that cannot be used.
    Returns (devices, the endpoints kept)."""
    devices: list[RemoteDevice] = []
    kept: list[str] = []
    for ep in endpoints:
        try:
            info = probe(ep)
        except WorkerError as e:
            if not optional:
                raise
            if warn is not None:
                warn(f"{e.message}; going on without it (--hosts-optional)")
            continue
        kept.append(ep)
        for d in info.devices:
            devices.append(RemoteDevice(ep, d.index, f"RPC{len(devices)}", d.free, d.total))
    return devices, kept


_added: dict[str, list[str]] = {}


def add_workers(endpoints: list[str]) -> list[RemoteDevice]:
    """Probe each worker, then register its devices with llama.cpp (once per process).
    Call only in a process that may die with a worker (the model's own process)."""
    devices: list[RemoteDevice] = []
    for ep in endpoints:
        info = probe(ep)
        if ep not in _added:
            add = _proc(b"ggml_backend_rpc_add_server", ctypes.c_void_p, [ctypes.c_char_p])
            reg = add(ep.encode())
            if not reg:
                raise WorkerError(f"llama.cpp could not add worker {ep}")
            lib = _ggml()
            lib.ggml_backend_register(reg)
            _added[ep] = [(lib.ggml_backend_dev_name(lib.ggml_backend_reg_dev_get(reg, i)) or b"").decode()
                          for i in range(lib.ggml_backend_reg_dev_count(reg))]
        names = _added[ep]
        for d in info.devices:
            devices.append(RemoteDevice(ep, d.index, names[d.index] if d.index < len(names) else "", d.free, d.total))
    return devices


def device_handles(names: list[str]) -> ctypes.Array:
    """A NULL-terminated ``ggml_backend_dev_t`` array for ``llama_model_params.devices``."""
    lib = _ggml()
    arr = (ctypes.c_void_p * (len(names) + 1))()
    for i, n in enumerate(names):
        dev = lib.ggml_backend_dev_by_name(n.encode())
        if not dev:
            raise BadRequest(f"llama.cpp has no device named {n!r} (known: "
                             f"{', '.join(d.name for d in local_devices())})")
        arr[i] = dev
    arr[len(names)] = None
    return arr


def serve_worker(endpoint: str, cache_dir: str | None, n_threads: int, device_names: list[str]) -> None:
    """Serve these local devices to other hosts until the process ends (blocks)."""
    start = _proc(b"ggml_backend_rpc_start_server", None,
                  [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p])
    devs = device_handles(device_names)
    start(endpoint.encode(), cache_dir.encode() if cache_dir else None, n_threads, len(device_names),
          ctypes.cast(devs, ctypes.c_void_p))


__all__ = ["RemoteDevice", "WorkerInfo", "WorkerError", "RpcUnavailable", "parse_hosts", "probe", "available",
           "remote_devices",
           "require", "local_devices", "add_workers", "device_handles", "serve_worker", "DEFAULT_PORT"]
