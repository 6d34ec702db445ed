"""Decide how to load a model on this machine: ModelInfo + Hardware + wishes -> LoadPlan.

The user's settings always win; the planner fills in the rest and refuses, with
numbers, when the model cannot fit. The memory estimate mirrors how llama.cpp
allocates: weights (mmap'd on the CPU, copied to VRAM for offloaded layers), the KV
cache (padded to 256 cells, sliding-window layers sized by the window when not
kept full), the output (logits) buffer and the compute buffers.
"""

from __future__ import annotations

import bisect
import math
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, TypedDict

from .errors import BadRequest, DoesNotFit
from .gguf import ModelInfo
from .hardware import Hardware
from .types import MappingView

if TYPE_CHECKING:
    from .rpc import RemoteDevice

GiB = 1024**3
MiB = 1024**2

# bytes per element of the KV cache types llama.cpp accepts
KV_TYPES: dict[str, float] = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
    "iq4_nl": 18 / 32,
}
# ggml_type ids for the names above (the context params take these)
KV_GGML_TYPE = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q5_1": 7, "q5_0": 6,
                "q4_1": 3, "q4_0": 2, "iq4_nl": 20}

MIN_CTX = 512
DEFAULT_PARALLEL = 4  # concurrent requests per model, like llama-server's default
DEFAULT_BATCH = 2048
DEFAULT_UBATCH = 512
# Memory kept free for the OS and other programs; the larger of the two.
RAM_HEADROOM = (1 * GiB, 0.10)
VRAM_HEADROOM = (512 * MiB, 0.05)
# A worker does not say whether a device is a GPU or its RAM (llama.cpp's RPC devices all
# report "GPU"), and the worker process itself needs room: the larger, RAM rule.
REMOTE_HEADROOM = RAM_HEADROOM
# Fixed runtime overhead and per-vocabulary-token tables, measured on CPU builds.
_COMPUTE_FIXED = 17 * MiB
_VOCAB_BYTES = 200


@dataclass
class LoadOptions:
    """What the user asked for. None means "let the planner decide"."""

    n_ctx: int | None = None
    n_gpu_layers: int | None = None  # -1 = all
    n_threads: int | None = None
    n_threads_batch: int | None = None
    n_batch: int | None = None
    n_ubatch: int | None = None
    kv_type: str | None = None  # "f16", "q8_0", "q4_0", ...
    flash_attn: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    numa: bool | None = None
    parallel: int | None = None  # concurrent sequences (slots)
    swa_full: bool | None = None
    # llama.cpp device names to offload to, in order ("CUDA0", "RPC0", ...); [] = none
    devices: list[str] | None = None
    # one proportion per device (of ``devices``, else of the local GPUs then the remote
    # devices): the share of the offloaded layers each gets, as llama.cpp's --tensor-split
    tensor_split: list[float] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def positive(name: str, v: int | None, minimum: int = 1) -> None:
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < minimum):
                raise BadRequest(f"{name} must be an integer >= {minimum}, got {v!r}")

        positive("n_ctx", self.n_ctx, 16)
        positive("n_threads", self.n_threads)
        positive("n_threads_batch", self.n_threads_batch)
        positive("n_batch", self.n_batch)
        positive("n_ubatch", self.n_ubatch)
        positive("parallel", self.parallel)
        if self.n_gpu_layers is not None and (
            isinstance(self.n_gpu_layers, bool)
            or not isinstance(self.n_gpu_layers, int)
            or self.n_gpu_layers < -1
        ):
            raise BadRequest(f"n_gpu_layers must be -1 (all) or >= 0, got {self.n_gpu_layers!r}")
        if self.kv_type is not None and self.kv_type not in KV_TYPES:
            raise BadRequest(
                f"kv_type must be one of {', '.join(KV_TYPES)}, got {self.kv_type!r}"
            )
        if self.devices is not None:
            if isinstance(self.devices, str) or not all(isinstance(d, str) and d.strip() for d in self.devices):
                raise BadRequest(f"devices must be a list of llama.cpp device names (e.g. CUDA0, RPC0), "
                                 f"got {self.devices!r}")
            self.devices = [d.strip() for d in self.devices]
            if len(set(self.devices)) < len(self.devices):
                raise BadRequest(f"devices lists a device twice: {', '.join(self.devices)}")
        if self.tensor_split is not None:
            ts = self.tensor_split
            if (isinstance(ts, str) or not ts or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                    for v in ts)):
                raise BadRequest(f"tensor_split must be a list of numbers >= 0, one per device, got {ts!r}")
            if not any(v > 0 for v in ts):
                raise BadRequest(f"tensor_split gives every device 0: at least one must be > 0, got {list(ts)!r}")
            self.tensor_split = [float(v) for v in ts]
            if self.devices is not None and len(self.tensor_split) != len(self.devices):
                raise BadRequest(f"tensor_split has {len(self.tensor_split)} values but devices names "
                                 f"{len(self.devices)} devices: give one proportion per device")

    def merged(self, other: LoadOptions) -> LoadOptions:
        """These options with every setting ``other`` gives on top."""
        out = LoadOptions(**asdict(self))
        for f in fields(other):
            v = getattr(other, f.name)
            if v is not None:
                setattr(out, f.name, v)
        return out


@dataclass
class MemoryEstimate(MappingView):
    """Bytes a loaded model will use, split between RAM and VRAM.

    Also a read-only mapping of ``to_dict()``, which adds the totals other libraries
    use: ``model_size`` (the weights), ``kv_cache``, ``compute`` (compute and output
    buffers), ``total_ram`` (host RAM), ``total_vram``, ``total`` (both), ``file_size``
    and ``n_ctx``, in bytes, and each total in GiB as ``<name>_gb``."""

    weights_ram: int
    weights_vram: int
    kv_ram: int
    kv_vram: int
    compute_ram: int
    compute_vram: int
    output_ram: int
    n_ctx: int = 0  # per slot
    parallel: int = 1
    file_size: int = 0

    @property
    def ram(self) -> int:
        return self.weights_ram + self.kv_ram + self.compute_ram + self.output_ram

    @property
    def vram(self) -> int:
        return self.weights_vram + self.kv_vram + self.compute_vram

    @property
    def total(self) -> int:
        return self.ram + self.vram

    @property
    def model_size(self) -> int:
        return self.weights_ram + self.weights_vram

    @property
    def kv_cache(self) -> int:
        return self.kv_ram + self.kv_vram

    @property
    def compute(self) -> int:
        return self.compute_ram + self.compute_vram + self.output_ram

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = asdict(self)
        totals = {"model_size": self.model_size, "kv_cache": self.kv_cache, "compute": self.compute,
                  "total_ram": self.ram, "total_vram": self.vram, "total": self.total}
        d.update(ram=self.ram, vram=self.vram, **totals)
        d.update({f"{k}_gb": round(v / GiB, 3) for k, v in totals.items()})
        return d


class Placement(TypedDict):
    """What one device holds in a plan across devices (``LoadPlan.placement``)."""

    device: str  # llama.cpp's device name; "CPU" for this machine's CPU (host memory)
    host: str  # "local", or the worker's "host:port"
    layers: list[int]  # [first, last): llama.cpp's layer numbers, n_layer = the output head
    n_layers: int
    bytes: int  # weights + KV cache of those layers planned there
    compute: int  # compute (and, on the CPU, output) buffers planned there
    free: int  # the device's free memory now
    budget: int  # what the plan may use of it: free less the headroom


@dataclass
class LoadPlan(MappingView):
    """How a model will be loaded on this machine. Also a read-only mapping of
    ``to_dict()`` (``plan["n_ctx"]``; ``plan["memory"]`` is the estimate as a dict)."""

    n_ctx: int
    n_gpu_layers: int
    n_threads: int
    n_threads_batch: int
    n_batch: int
    n_ubatch: int
    kv_type: str
    flash_attn: bool | None  # None = llama.cpp decides (auto)
    use_mmap: bool
    use_mlock: bool
    numa: bool
    parallel: int
    swa_full: bool
    memory: MemoryEstimate
    notes: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # setting -> "user" | "planner"
    # A split across devices (other hosts' through RPC), for llama_model_params: the
    # device names in order, and one proportion each (tensor_split). Empty: llama.cpp's
    # default devices (this machine's GPUs), as without hosts.
    devices: list[str] = field(default_factory=list)
    tensor_split: list[float] = field(default_factory=list)
    # what each device (and the local CPU) holds; empty without a split across devices
    placement: list[Placement] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)  # workers ("host:port") the plan puts layers on

    @property
    def n_ctx_per_slot(self) -> int:
        """What one request may use: ``n_ctx`` is per slot."""
        return self.n_ctx

    @property
    def n_ctx_total(self) -> int:
        """The llama.cpp context: one KV stream of ``n_ctx`` cells per slot."""
        return self.n_ctx * self.parallel

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["memory"] = self.memory.to_dict()
        return d


def _pad(n: int, to: int = 256) -> int:
    return (n + to - 1) // to * to


def offloadable_layers(info: ModelInfo) -> int:
    """llama.cpp counts the output head as one more layer: n_layer + 1 means all."""
    return info.block_count + 1


def _kv_per_layer(info: ModelInfo, n_ctx: int, *, n_ubatch: int, kv_type: str, parallel: int,
                  swa_full: bool) -> list[int]:
    """KV cache bytes of each block. n_ctx is per sequence (slot); each slot has its own
    KV stream of n_ctx cells (llama.cpp pads each to 256)."""
    n_layer = info.block_count
    ctx = _pad(n_ctx) * parallel
    per_cell_layer = info.head_count_kv * (info.key_length + info.value_length) * KV_TYPES[kv_type]
    swa_cells = ctx
    if info.swa_layers and not swa_full:
        swa_cells = min(ctx, parallel * _pad(info.sliding_window + n_ubatch))
    kv_per_layer = []
    swa_left = info.swa_layers
    # which layers are SWA matters only for a split over devices, and only without
    # swa_full (the default keeps them full); assume they are spread evenly
    for il in range(n_layer):
        is_swa = info.swa_layers and (il * info.swa_layers) // max(n_layer, 1) != (
            (il + 1) * info.swa_layers
        ) // max(n_layer, 1)
        cells = swa_cells if (is_swa and swa_left > 0) else ctx
        if is_swa:
            swa_left -= 1
        kv_per_layer.append(int(cells * per_cell_layer))
    return kv_per_layer


def _compute_parts(info: ModelInfo, n_ctx: int, *, n_ubatch: int, parallel: int,
                   flash_attn: bool) -> tuple[int, int, int, int]:
    """(ubatch, activations, attention mask, KQ) bytes of one compute step."""
    ctx_seq = _pad(n_ctx)
    ub = min(n_ubatch, ctx_seq * parallel)
    n_embd = info.embedding_length
    n_ff = max(info.feed_forward_length, n_embd)
    act = ub * (n_embd * 4 + n_ff * 3) * 4
    mask = ub * ctx_seq
    kq = 0 if flash_attn else ub * ctx_seq * info.head_count * 4
    return ub, act, mask, kq


def estimate_memory(
    info: ModelInfo,
    n_ctx: int,
    *,
    n_gpu_layers: int = 0,
    n_ubatch: int = DEFAULT_UBATCH,
    kv_type: str = "f16",
    parallel: int = 1,
    swa_full: bool = True,
    flash_attn: bool = True,
) -> MemoryEstimate:
    """Bytes a loaded model will use, split between RAM and VRAM."""
    n_layer = info.block_count
    total_layers = offloadable_layers(info)
    ngl = total_layers if n_gpu_layers < 0 else min(n_gpu_layers, total_layers)
    gpu_blocks = min(ngl, n_layer)  # the last `gpu_blocks` blocks go to the GPU
    layer_bytes = info.layer_bytes or [0] * n_layer
    vram_weights = sum(layer_bytes[n_layer - gpu_blocks :]) if gpu_blocks else 0
    if ngl > n_layer:  # the output head too
        vram_weights += info.output_bytes or 0
    ram_weights = info.weights_bytes - vram_weights

    kv_per_layer = _kv_per_layer(info, n_ctx, n_ubatch=n_ubatch, kv_type=kv_type, parallel=parallel,
                                 swa_full=swa_full)
    kv_vram = sum(kv_per_layer[n_layer - gpu_blocks :]) if gpu_blocks else 0
    kv_ram = sum(kv_per_layer) - kv_vram

    # Compute buffers. llama.cpp reserves the worst case (logits for a whole ubatch);
    # a GPU allocates all of it, but on the CPU only the pages a step touches become
    # resident, and hearth asks for one row of logits per sequence. So RAM counts what
    # is touched: one ubatch of activations through the widest layer, the attention
    # mask, and llama.cpp's vocabulary tables (about 200 bytes a token) -- calibrated
    # against measured RSS on SmolLM2 135M and Gemma 3 270M (tests/test_memory.py).
    ub, act, mask, kq = _compute_parts(info, n_ctx, n_ubatch=n_ubatch, parallel=parallel, flash_attn=flash_attn)
    n_embd = info.embedding_length
    runtime = info.vocab_size * _VOCAB_BYTES + _COMPUTE_FIXED
    compute_touched = act + mask + kq
    compute_reserved = act + ub * info.vocab_size * 4 + mask * 2 + kq
    if ngl >= total_layers:
        compute_vram, compute_ram = compute_reserved, ub * n_embd * 4 + runtime
    elif ngl > 0:
        compute_vram, compute_ram = compute_reserved, compute_touched + runtime
    else:
        compute_vram, compute_ram = 0, compute_touched + runtime
    # output buffer: one row of logits per sequence that samples each step
    output_ram = parallel * info.vocab_size * 4 + parallel * n_embd * 4
    return MemoryEstimate(
        weights_ram=ram_weights,
        weights_vram=vram_weights,
        kv_ram=kv_ram,
        kv_vram=kv_vram,
        compute_ram=compute_ram,
        compute_vram=compute_vram,
        output_ram=output_ram,
        n_ctx=n_ctx,
        parallel=parallel,
        file_size=info.file_size,
    )


def memory_budget(total: int, free: int, headroom: tuple[int, float]) -> int:
    """What a model may use of a memory: what is free, less the larger of a fixed and
    a relative headroom (RAM_HEADROOM, VRAM_HEADROOM)."""
    return max(0, free - max(headroom[0], int(total * headroom[1])))


def _f32(x: float) -> float:
    """x rounded to a C float (llama.cpp computes the split in float32)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def split_layers(n_layer: int, n_gpu_layers: int, tensor_split: Sequence[float]) -> list[tuple[int, int]]:
    """Which layers llama.cpp puts on each listed device: ``[first, last)`` per device,
    layer ``n_layer`` being the output head; the layers no device gets (and the input
    embeddings) stay on the CPU. llama_model_base::load_tensors' rule, in its float32
    arithmetic, so a plan predicts where every layer lands: the last ``n_gpu_layers`` of
    the ``n_layer + 1`` go to the devices, the i-th of them to the first device whose
    cumulative share of ``tensor_split`` exceeds ``i / n_gpu_layers``."""
    total = n_layer + 1
    ngl = total if n_gpu_layers < 0 else n_gpu_layers
    start = max(total - ngl, 0)
    act = min(ngl, total) if tensor_split else 0
    cum: list[float] = []
    acc = 0.0
    for v in tensor_split:
        acc = _f32(acc + _f32(v))
        cum.append(acc)
    if act and acc <= 0:
        raise ValueError("an all-zero tensor_split means llama.cpp's own split by free memory")
    cum = [_f32(c / acc) for c in cum] if act else cum
    counts = [0] * len(tensor_split)
    for k in range(act):
        counts[bisect.bisect_right(cum, _f32(float(k) / act))] += 1
    ranges, first = [], start
    for c in counts:
        ranges.append((first, first + c))
        first += c
    return ranges


def _fill(items: list[int], caps: list[int]) -> list[int] | None:
    """Items in order into bins in order, each bin as full as it goes: the counts per bin,
    or None when they do not all fit (no contiguous split can fit then either)."""
    counts, k = [], 0
    for cap in caps:
        used = n = 0
        while k < len(items) and used + items[k] <= cap:
            used += items[k]
            k += 1
            n += 1
        counts.append(n)
    return counts if k == len(items) else None


def _place(costs: list[int], caps: list[int], ngl: int, tensor_split: Sequence[float] | None,
           balance: bool = True) -> list[int] | None:
    """Layers per device for the last ``ngl`` of ``costs`` (bytes per layer), each
    device holding at most its ``caps`` (or None). A user's ``tensor_split`` decides the
    layers (llama.cpp's rule) and is only checked; otherwise every device is filled to the
    same, smallest fraction of its capacity: a split in proportion to usable memory."""
    n_layer = len(costs) - 1
    if ngl <= 0:
        return [0] * len(caps)
    if tensor_split is not None:
        ranges = split_layers(n_layer, ngl, tensor_split)
        for (a, b), cap in zip(ranges, caps):
            if b > a and sum(costs[a:b]) > cap:
                return None
        return [b - a for a, b in ranges]
    items = costs[len(costs) - ngl:]
    best = _fill(items, caps)
    if best is None or not balance:
        return best
    lo, hi = 0, 1 << 16  # the fill fraction, in 1/65536
    while lo < hi:
        mid = (lo + hi) // 2
        counts = _fill(items, [cap * mid >> 16 for cap in caps])
        if counts is None:
            lo = mid + 1
        else:
            hi, best = mid, counts
    return best


@dataclass(frozen=True)
class _Device:
    name: str
    host: str  # "local" or "host:port"
    free: int
    total: int
    budget: int

    @property
    def label(self) -> str:
        return self.name if self.host == "local" else f"{self.name} ({self.host})"


def _fmt(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def _ctx_candidates(trained: int, floor: int) -> list[int]:
    out = []
    c = max(trained, floor)
    while c >= floor:
        out.append(c)
        if c == floor:
            break
        c = max(floor, _pad(c // 2))
    return out


class _DeviceSplit:
    """The devices a plan may split layers over, and per-device fitting (plan_load's
    helper for hosts, ``devices`` and ``tensor_split``)."""

    def __init__(self, info: ModelInfo, hardware: Hardware, opts: LoadOptions, remote: Sequence[RemoteDevice],
                 ram_budget: int, notes: list[str]) -> None:
        self.info, self.hardware, self.ram_budget, self.notes = info, hardware, ram_budget, notes
        self.total_layers = offloadable_layers(info)
        pool = [_Device(g.name, "local", g.free_memory, g.total_memory,
                        memory_budget(g.total_memory, g.free_memory, VRAM_HEADROOM)) for g in hardware.gpus]
        # llama.cpp names a worker's devices RPC0, RPC1, ... in the order they are added
        # (ggml_backend_rpc_add_server); a device not added yet gets the name it will have
        for k, d in enumerate(remote):
            pool.append(_Device(d.name or f"RPC{k}", d.endpoint, d.free, d.total,
                                memory_budget(d.total, d.free, REMOTE_HEADROOM)))
        names = [d.name for d in pool]
        if len(set(names)) < len(names):
            raise BadRequest(f"two devices have the same name: {', '.join(names)}")
        self.pool = pool
        self.endpoints = list(dict.fromkeys(d.host for d in pool if d.host != "local"))
        self.user_split = opts.tensor_split
        self.user_fixed = [k for k in ("devices", "tensor_split", "n_gpu_layers") if getattr(opts, k) is not None]
        known = ", ".join(d.label for d in pool) or "none: no GPU here and no hosts given"
        if opts.devices is not None:
            by_name = {d.name: d for d in pool}
            bad = [n for n in opts.devices if n not in by_name]
            if bad:
                raise BadRequest(f"devices: no device named {', '.join(bad)} (known: {known})")
            self.tiers = [[by_name[n] for n in opts.devices]]
        elif opts.tensor_split is not None:
            if len(opts.tensor_split) != len(pool):
                raise BadRequest(f"tensor_split has {len(opts.tensor_split)} values for {len(pool)} devices "
                                 f"({known}): give one per device, or name them with devices")
            self.tiers = [pool]
        else:
            usable = [d for d in pool if d.budget > 0]
            local = [d for d in usable if d.host == "local"]
            # this machine's GPUs alone when the whole model fits there: no network in the way
            self.tiers = [local, usable] if local and len(usable) > len(local) else [usable]
            for d in pool:
                if d.budget <= 0 and d.host != "local":
                    notes.append(f"{d.label} has {_fmt(d.free)} free, no memory to spare after headroom; "
                                 "it gets no layers")
        self.fixed_devices = opts.devices is not None or opts.tensor_split is not None
        self._costs: dict[tuple[Any, ...], tuple[list[int], list[int], int, int]] = {}
        self.last: tuple[list[_Device], list[int]] = ([], [])

    def configure(self, parallel: int, batch_sizes: Any, swa_full: bool, flash_attn: bool) -> None:
        self.parallel, self.batch_sizes, self.swa_full, self.flash_attn = parallel, batch_sizes, swa_full, flash_attn

    def costs(self, n_ctx: int, kv: str) -> tuple[list[int], list[int], int, int]:
        """(weights, KV bytes) per layer (the output head last), the compute buffer every
        device with layers reserves, and the logits the output head's device adds to it."""
        key = (n_ctx, kv, self.parallel, self.swa_full, self.flash_attn)
        if key not in self._costs:
            info = self.info
            _, n_ubatch = self.batch_sizes(n_ctx)
            kvs = _kv_per_layer(info, n_ctx, n_ubatch=n_ubatch, kv_type=kv, parallel=self.parallel,
                                swa_full=self.swa_full) + [0]
            ub, act, mask, kq = _compute_parts(info, n_ctx, n_ubatch=n_ubatch, parallel=self.parallel,
                                               flash_attn=self.flash_attn)
            # a model whose output shares the token embeddings gets a copy of them on the
            # output head's device (llama.cpp's TENSOR_DUPLICATED)
            weights = list(info.layer_bytes or [0] * info.block_count) + [info.output_bytes or info.non_layer_bytes]
            self._costs[key] = (weights, kvs, act + 2 * mask + kq, ub * info.vocab_size * 4)
        return self._costs[key]

    def _layer_costs(self, n_ctx: int, kv: str) -> tuple[list[int], int]:
        weights, kvs, base, logits = self.costs(n_ctx, kv)
        costs = [w + c for w, c in zip(weights, kvs)]
        costs[-1] += logits
        return costs, base

    def choose(self, n_ctx: int, kv: str, ngl: int, devs: list[_Device], balance: bool = True) -> bool:
        """Whether ``ngl`` layers fit on ``devs``; the split is kept in ``last``."""
        if ngl and not devs:
            return False
        costs, base = self._layer_costs(n_ctx, kv)
        counts = _place(costs, [d.budget - base for d in devs], ngl, self.user_split, balance)
        if counts is None:
            return False
        self.last = (devs, counts)
        return True

    def max_layers(self, n_ctx: int, kv: str, devs: list[_Device]) -> int:
        if not devs:
            return 0
        if self.user_split is not None:  # a fixed split moves layers as their number changes
            return next((n for n in range(self.total_layers, 0, -1) if self.choose(n_ctx, kv, n, devs)), 0)
        lo, hi = 0, self.total_layers  # more layers never fit where fewer do not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.choose(n_ctx, kv, mid, devs, balance=False):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def does_not_fit(self, n_ctx: int, kv: str, ram_at: Any, n_gpu_layers: int | None) -> str:
        """Why nothing fits, with how much more memory it would take across all hosts.
        ``ram_at(ngl)``: this machine's RAM use with ``ngl`` layers offloaded."""
        costs, base = self._layer_costs(n_ctx, kv)
        devs = self.tiers[-1]
        scope = devs if self.fixed_devices else self.pool  # every host given, one with no room too
        usable = [d for d in devs if d.budget > base]
        need = ram_at(0) + base * len(usable)  # all of it somewhere, and a compute buffer on each device
        free = self.ram_budget + sum(d.budget for d in scope)
        n_hosts = 1 + len({d.host for d in scope if d.host != "local"})
        name = self.info.path.name
        if n_hosts > 1:
            head = f"{name} does not fit across {n_hosts} hosts: at n_ctx={n_ctx} it needs {_fmt(need)}; " \
                   f"the {n_hosts} hosts have {_fmt(free)} free (after headroom)"
        else:
            head = f"{name} does not fit: at n_ctx={n_ctx} it needs {_fmt(need)}; this machine has " \
                   f"{_fmt(free)} free (after headroom)"
        more = f"{_fmt(need - free)} more" + (" across all hosts" if n_hosts > 1 else "")
        if need > free and not self.user_fixed:
            return f"{head}: {more}"
        ngl = self.total_layers if n_gpu_layers is None else n_gpu_layers
        why = ""
        if ram_at(ngl) > self.ram_budget:
            why = (f"this machine's RAM needs {_fmt(ram_at(ngl))} for what stays on the CPU (input embeddings, "
                   f"buffers{', layers' if ngl < self.total_layers else ''}), {_fmt(self.ram_budget)} available")
        elif self.user_split is not None:
            for d, (a, b) in zip(devs, split_layers(self.info.block_count, ngl, self.user_split)):
                if b > a and sum(costs[a:b]) + base > d.budget:
                    why = f"{d.label} would need {_fmt(sum(costs[a:b]) + base)} for layers {a}-{b - 1}, " \
                          f"{_fmt(d.budget)} usable"
                    break
        elif devs:
            why = f"the devices cannot take {ngl} layers (the largest needs {_fmt(max(costs))})"
        given = f"with {', '.join(self.user_fixed)} as given" if self.user_fixed else ""
        return f"{head}, {'; '.join(x for x in (given, why) if x) or 'but no split fits'}" + (
            f": {more}" if need > free else "")

    def result(self, n_ctx: int, kv: str, ngl: int, memory: MemoryEstimate) -> tuple[MemoryEstimate, dict[str, Any]]:
        """The plan's devices, tensor_split, placement and hosts; its memory estimate
        counts this machine only (a worker's memory is its own), GPUs as placed."""
        devs, counts = self.last
        if not ngl:
            devs, counts = (devs, [0] * len(devs)) if self.fixed_devices else ([], [])
        if self.user_split is not None:
            tensor_split = list(self.user_split)
        elif self.fixed_devices:
            tensor_split = [float(c) for c in counts] if ngl else []
        else:  # the planner's own: only the devices that get layers, the counts as proportions
            devs = [d for d, c in zip(devs, counts) if c]
            counts = [c for c in counts if c]
            tensor_split = [float(c) for c in counts]
        n_layer = self.info.block_count
        ranges = split_layers(n_layer, ngl, tensor_split) if ngl else [(0, 0)] * len(devs)
        weights, kvs, base, logits = self.costs(n_ctx, kv)
        placement: list[Placement] = [Placement(
            device="CPU", host="local", layers=[0, self.total_layers - ngl], n_layers=self.total_layers - ngl,
            bytes=memory.weights_ram + memory.kv_ram, compute=memory.compute_ram + memory.output_ram,
            free=self.hardware.available_ram, budget=self.ram_budget)]
        local = {"weights": 0, "kv": 0, "compute": 0}
        for d, (a, b) in zip(devs, ranges):
            w, c = sum(weights[a:b]), sum(kvs[a:b])
            comp = base + (logits if b == self.total_layers else 0) if b > a else 0
            placement.append(Placement(device=d.name, host=d.host, layers=[a, b], n_layers=b - a, bytes=w + c,
                                       compute=comp, free=d.free, budget=d.budget))
            if d.host == "local":
                local["weights"] += w
                local["kv"] += c
                local["compute"] += comp
        placed = {d.name for d in devs}
        placement += [Placement(device=d.name, host=d.host, layers=[0, 0], n_layers=0, bytes=0, compute=0,
                                free=d.free, budget=d.budget) for d in self.pool if d.name not in placed]
        used = [(d, a, b) for d, (a, b) in zip(devs, ranges) if b > a]
        if used:
            where = ", ".join(f"{d.label} {a}-{b - 1}" for d, a, b in used)
            self.notes.append(f"{ngl} of {self.total_layers} layers on {len(used)} device(s): {where}"
                              + ("; the rest on this CPU" if ngl < self.total_layers else ""))
        if self.endpoints and used and all(d.host == "local" for d, _, _ in used) and not self.fixed_devices:
            self.notes.append("the model fits on this machine's GPU(s); the hosts are not used")
        memory = replace(memory, weights_vram=local["weights"], kv_vram=local["kv"], compute_vram=local["compute"])
        hosts = list(dict.fromkeys(d.host for d in devs if d.host != "local"))
        return memory, {"devices": [d.name for d in devs], "tensor_split": tensor_split, "placement": placement,
                        "hosts": hosts}


def plan_load(
    info: ModelInfo,
    hardware: Hardware,
    options: LoadOptions | None = None,
    remote: Sequence[RemoteDevice] = (),
) -> LoadPlan:
    """Choose a LoadPlan, or raise DoesNotFit saying how much is needed and available.

    ``remote``: other hosts' devices (``hearth.rpc``). With them, or with a user's
    ``devices`` or ``tensor_split``, the plan splits the layers over named devices: this
    machine's GPUs first (alone when the whole model fits there), then the remote devices,
    in proportion to their free memory after headroom, and the rest on this CPU."""
    opts = options or LoadOptions()
    opts.validate()
    notes: list[str] = []
    sources: dict[str, str] = {}

    def src(name: str, user_value: Any) -> None:
        sources[name] = "user" if user_value is not None else "planner"

    n_threads = opts.n_threads or hardware.physical_cores
    n_threads_batch = opts.n_threads_batch or n_threads
    # More threads than CPUs makes llama.cpp several times slower (its threads spin at
    # each barrier; measured 5-7x slower generation at 8 threads on 2 CPUs), so a count
    # written for a bigger machine is capped at the CPUs this one has.
    cpus = max(1, hardware.logical_cores)
    if n_threads > cpus or n_threads_batch > cpus:
        notes.append(f"n_threads {max(n_threads, n_threads_batch)} is more than the {cpus} CPUs here; "
                     f"using {min(max(n_threads, n_threads_batch), cpus)} (extra threads only slow llama.cpp down)")
        n_threads, n_threads_batch = min(n_threads, cpus), min(n_threads_batch, cpus)
    src("n_threads", opts.n_threads)
    src("n_threads_batch", opts.n_threads_batch or opts.n_threads)
    # Each slot (concurrent request) has its own KV stream of n_ctx cells: a request's
    # text does not depend on what else runs (a unified cache changes the attention's
    # rounding with its neighbours). Memory decides slots and per-slot context together.
    parallel_options = [opts.parallel] if opts.parallel else sorted({DEFAULT_PARALLEL, 2, 1}, reverse=True)
    parallel = parallel_options[0]
    src("parallel", opts.parallel)
    use_mmap = True if opts.use_mmap is None else opts.use_mmap
    use_mlock = bool(opts.use_mlock)
    numa = bool(opts.numa)
    swa_full = True if opts.swa_full is None else opts.swa_full
    for name in ("use_mmap", "use_mlock", "numa", "swa_full", "flash_attn"):
        src(name, getattr(opts, name))

    total_layers = offloadable_layers(info)
    ram_budget = memory_budget(hardware.total_ram, hardware.available_ram, RAM_HEADROOM)
    gpus = list(hardware.gpus)
    vram_budget = sum(memory_budget(g.total_memory, g.free_memory, VRAM_HEADROOM) for g in gpus)

    split = _DeviceSplit(info, hardware, opts, remote, ram_budget, notes) if (
        remote or opts.devices is not None or opts.tensor_split is not None) else None

    trained = max(info.context_length, MIN_CTX)
    if opts.n_ctx is not None:
        ctx_options = [opts.n_ctx]
        if opts.n_ctx > info.context_length:
            notes.append(
                f"n_ctx {opts.n_ctx} is beyond the model's trained context "
                f"{info.context_length}; quality may drop"
            )
    else:
        ctx_options = _ctx_candidates(trained, min(trained, MIN_CTX))
    src("n_ctx", opts.n_ctx)

    # a quantized V cache needs flash attention: without it only f16 is an option
    if opts.kv_type:
        kv_options = [opts.kv_type]
    else:
        kv_options = ["f16"] if opts.flash_attn is False else ["f16", "q8_0"]
    src("kv_type", opts.kv_type)
    flash_attn = opts.flash_attn

    def batch_sizes(n_ctx: int) -> tuple[int, int]:
        n_batch = opts.n_batch or min(DEFAULT_BATCH, _pad(n_ctx))
        n_ubatch = opts.n_ubatch or min(DEFAULT_UBATCH, n_batch)
        return n_batch, min(n_ubatch, n_batch)

    def estimate(n_ctx: int, ngl: int, kv: str) -> MemoryEstimate:
        _, n_ubatch = batch_sizes(n_ctx)
        return estimate_memory(
            info, n_ctx, n_gpu_layers=ngl, n_ubatch=n_ubatch, kv_type=kv,
            parallel=parallel, swa_full=swa_full, flash_attn=flash_attn is not False,
        )

    def fits(m: MemoryEstimate) -> bool:
        return m.ram <= ram_budget and m.vram <= vram_budget

    def max_gpu_layers(n_ctx: int, kv: str) -> int:
        if not gpus:
            return 0
        lo, hi = 0, total_layers
        if estimate(n_ctx, 0, kv).vram > vram_budget:
            return 0
        while lo < hi:  # largest ngl whose VRAM part fits
            mid = (lo + hi + 1) // 2
            if estimate(n_ctx, mid, kv).vram <= vram_budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def search(ctx_options: list[int]) -> tuple[int, int, str] | None:
        chosen: tuple[int, int, str] | None = None
        if opts.n_gpu_layers is not None:
            ngl_fixed = total_layers if opts.n_gpu_layers < 0 else min(opts.n_gpu_layers, total_layers)
            if ngl_fixed and not gpus:
                notes.append(
                    "n_gpu_layers was set but llama.cpp has no GPU backend here; running on the CPU"
                )
                ngl_fixed = 0
            for kv in kv_options:
                for n_ctx in ctx_options:
                    if fits(estimate(n_ctx, ngl_fixed, kv)):
                        chosen = (n_ctx, ngl_fixed, kv)
                        break
                if chosen:
                    break
        else:
            # Prefer everything on the GPU at a useful context; then the largest context
            # that fits at all, with as many layers on the GPU as fit beside it.
            if gpus:
                useful = min(trained, 8192) if opts.n_ctx is None else opts.n_ctx
                for kv in kv_options:
                    for n_ctx in ctx_options:
                        if n_ctx < useful:
                            break
                        if fits(estimate(n_ctx, total_layers, kv)):
                            chosen = (n_ctx, total_layers, kv)
                            break
                    if chosen:
                        break
            if chosen is None:
                for kv in kv_options:
                    for n_ctx in ctx_options:
                        ngl = max_gpu_layers(n_ctx, kv)
                        if fits(estimate(n_ctx, ngl, kv)):
                            chosen = (n_ctx, ngl, kv)
                            break
                    if chosen:
                        break

        return chosen

    def ram_ok(n_ctx: int, ngl: int, kv: str) -> bool:
        return estimate(n_ctx, ngl, kv).ram <= ram_budget

    def search_split(ctx_options: list[int]) -> tuple[int, int, str] | None:
        """search() over named devices: local GPUs alone, else with the remote ones."""
        assert split is not None
        split.configure(parallel, batch_sizes, swa_full, flash_attn is not False)
        full = split.tiers[-1]
        if opts.n_gpu_layers is not None:
            ngl_fixed = total_layers if opts.n_gpu_layers < 0 else min(opts.n_gpu_layers, total_layers)
            if ngl_fixed and not full:
                notes.append("n_gpu_layers was set but there is no device to offload to (no GPU here, no "
                             "host with memory to spare); running on the CPU")
                ngl_fixed = 0
            for kv in kv_options:
                for n_ctx in ctx_options:
                    if split.choose(n_ctx, kv, ngl_fixed, full) and ram_ok(n_ctx, ngl_fixed, kv):
                        return n_ctx, ngl_fixed, kv
            return None
        useful = min(trained, 8192) if opts.n_ctx is None else opts.n_ctx
        for devs in split.tiers:
            for kv in kv_options if devs else ():
                for n_ctx in ctx_options:
                    if n_ctx < useful:
                        break
                    if split.choose(n_ctx, kv, total_layers, devs) and ram_ok(n_ctx, total_layers, kv):
                        return n_ctx, total_layers, kv
        for kv in kv_options:
            for n_ctx in ctx_options:
                ngl = split.max_layers(n_ctx, kv, full)
                if split.choose(n_ctx, kv, ngl, full) and ram_ok(n_ctx, ngl, kv):
                    return n_ctx, ngl, kv
        return None

    chosen = None
    for i, parallel in enumerate(parallel_options):
        last = i == len(parallel_options) - 1
        # more slots only while each still gets a useful context
        useful = min(trained, 4096)
        options = ctx_options if last or opts.n_ctx else [c for c in ctx_options if c >= useful]
        chosen = (search_split(options) if split else search(options)) if options else None
        if chosen:
            break
    src("n_gpu_layers", opts.n_gpu_layers)

    if chosen is None and split is not None:
        n_ctx, kv = ctx_options[-1], kv_options[-1]
        fixed = None if opts.n_gpu_layers is None else (
            total_layers if opts.n_gpu_layers < 0 else min(opts.n_gpu_layers, total_layers))
        raise DoesNotFit(split.does_not_fit(n_ctx, kv, lambda n: estimate(n_ctx, n, kv).ram, fixed))

    if chosen is None:
        n_ctx = ctx_options[-1]
        ngl = 0 if opts.n_gpu_layers is None else opts.n_gpu_layers
        need = estimate(n_ctx, ngl if gpus else 0, kv_options[-1])
        where = (
            f"{_fmt(ram_budget)} of RAM available"
            + (f" and {_fmt(vram_budget)} of VRAM" if gpus else "")
        )
        raise DoesNotFit(
            f"{info.path.name} does not fit: at n_ctx={n_ctx} it needs "
            f"{_fmt(need.ram)} of RAM"
            + (f" and {_fmt(need.vram)} of VRAM" if need.vram else "")
            + f", but this machine has {where} (after headroom)"
        )

    n_ctx, ngl, kv = chosen
    notes[:] = list(dict.fromkeys(notes))
    if opts.parallel is None and parallel < parallel_options[0]:
        notes.append(f"{parallel} concurrent request slot(s) instead of {parallel_options[0]} to fit in memory")
    if opts.n_ctx is None and n_ctx < info.context_length:
        notes.append(
            f"context capped at {n_ctx} of the model's {info.context_length} to fit in memory"
        )
    if kv != "f16" and opts.kv_type is None:
        notes.append(f"KV cache quantized to {kv} to fit in memory")
        flash_attn = True  # a quantized V cache needs flash attention
    if gpus and 0 < ngl < total_layers and split is None:
        notes.append(f"{ngl} of {total_layers} layers on the GPU; the rest on the CPU")
    n_batch, n_ubatch = batch_sizes(n_ctx)
    src("n_batch", opts.n_batch)
    src("n_ubatch", opts.n_ubatch)
    memory = estimate(n_ctx, ngl, kv)
    extra: dict[str, Any] = {}
    if split is not None:
        src("devices", opts.devices)
        src("tensor_split", opts.tensor_split)
        memory, extra = split.result(n_ctx, kv, ngl, memory)
    return LoadPlan(
        n_ctx=n_ctx,
        n_gpu_layers=ngl,
        n_threads=n_threads,
        n_threads_batch=n_threads_batch,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        kv_type=kv,
        flash_attn=flash_attn,
        use_mmap=use_mmap,
        use_mlock=use_mlock,
        numa=numa,
        parallel=parallel,
        swa_full=swa_full,
        memory=memory,
        notes=notes,
        sources=sources,
        **extra,
    )
