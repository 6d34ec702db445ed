"""What the machine has: cores, RAM, and the GPUs llama.cpp itself can use.

GPUs are asked of llama.cpp's ggml backend registry (the same devices it will
offload to), never guessed from the OS: a CUDA card is useless to a CPU-only build.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

log = logging.getLogger(__name__)

# enum ggml_backend_dev_type
_DEV_CPU, _DEV_GPU, _DEV_ACCEL, _DEV_IGPU = 0, 1, 2, 3


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    description: str
    backend: str  # "CUDA", "Metal", "Vulkan", ...
    total_memory: int
    free_memory: int
    integrated: bool = False


@dataclass(frozen=True)
class Hardware:
    physical_cores: int
    logical_cores: int
    total_ram: int
    available_ram: int
    gpus: tuple[GPU, ...] = field(default_factory=tuple)

    @property
    def total_vram(self) -> int:
        return sum(g.total_memory for g in self.gpus)

    @property
    def free_vram(self) -> int:
        return sum(g.free_memory for g in self.gpus)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gpus"] = [asdict(g) for g in self.gpus]
        return d


def physical_cores() -> int:
    n = psutil.cpu_count(logical=False)
    if not n:
        n = os.cpu_count() or 1
    try:  # respect a cgroup/affinity limit (containers, taskset)
        n = min(n, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        pass
    return max(1, n)


def logical_cores() -> int:
    """The CPUs this process may run on (affinity and cpusets respected)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def detect_hardware(include_gpus: bool = True) -> Hardware:
    """Read the machine now (available RAM and free VRAM change over time)."""
    vm = psutil.virtual_memory()
    gpus = tuple(llama_gpus()) if include_gpus else ()
    return Hardware(
        physical_cores=physical_cores(),
        logical_cores=logical_cores(),
        total_ram=vm.total,
        available_ram=vm.available,
        gpus=gpus,
    )


@functools.lru_cache(maxsize=1)
def _ggml_lib() -> ctypes.CDLL | None:
    try:
        from llama_cpp import llama_cpp as _ll  # noqa: F401  (loads libllama and libggml)
        from llama_cpp._ggml import libggml
    except Exception as e:  # pragma: no cover - broken install
        log.debug("cannot load ggml: %s", e)
        return None
    lib = libggml
    try:
        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_dev_count.argtypes = []
        lib.ggml_backend_dev_get.restype = ctypes.c_void_p
        lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        lib.ggml_backend_dev_name.restype = ctypes.c_char_p
        lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_dev_description.restype = ctypes.c_char_p
        lib.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_dev_type.restype = ctypes.c_int
        lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_dev_memory.restype = None
        lib.ggml_backend_dev_memory.argtypes = [
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.POINTER(ctypes.c_size_t),
        ]
        lib.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
        lib.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_reg_name.restype = ctypes.c_char_p
        lib.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
    except AttributeError as e:  # pragma: no cover - very old ggml
        log.debug("ggml has no device API: %s", e)
        return None
    return lib


def llama_gpus() -> list[GPU]:
    """The GPU devices registered in llama.cpp's ggml backends, with free memory now."""
    lib = _ggml_lib()
    if lib is None:
        return []
    try:
        from llama_cpp import llama_cpp as ll

        ll.llama_backend_init()  # loads dynamic backends, idempotent
    except Exception:  # pragma: no cover
        pass
    gpus: list[GPU] = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        kind = lib.ggml_backend_dev_type(dev)
        if kind not in (_DEV_GPU, _DEV_IGPU):
            continue
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        reg = lib.ggml_backend_dev_backend_reg(dev)
        backend = (lib.ggml_backend_reg_name(reg) or b"?").decode(errors="replace")
        gpus.append(
            GPU(
                index=len(gpus),
                name=(lib.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
                description=(lib.ggml_backend_dev_description(dev) or b"").decode(
                    errors="replace"
                ),
                backend=backend,
                total_memory=int(total.value),
                free_memory=int(free.value),
                integrated=kind == _DEV_IGPU,
            )
        )
    return gpus


def process_rss() -> int:
    """Resident memory of this process now, in bytes."""
    return psutil.Process().memory_info().rss
