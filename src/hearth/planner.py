"""Decide how to load a model on this machine: ModelInfo + Hardware + wishes -> LoadPlan.

The user's settings always win; the planner fills in the rest and refuses, with
numbers, when the model cannot fit. The memory estimate mirrors how llama.cpp
allocates: weights (mmap'd on the CPU, copied to VRAM for offloaded layers), the KV
cache (padded to 256 cells, sliding-window layers sized by the window when not
kept full), the output (logits) buffer and the compute buffers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import BadRequest, DoesNotFit
from .gguf import ModelInfo
from .hardware import Hardware
from .types import MappingView

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

    # KV cache
    # n_ctx is per sequence (slot); each slot has its own KV stream of n_ctx cells
    # (llama.cpp pads each to 256)
    ctx_seq = _pad(n_ctx)
    ctx = ctx_seq * parallel
    per_cell_layer = info.head_count_kv * (info.key_length + info.value_length) * KV_TYPES[kv_type]
    swa_cells = ctx
    if info.swa_layers and not swa_full:
        swa_cells = min(ctx, parallel * _pad(info.sliding_window + n_ubatch))
    kv_per_layer = []
    swa_left = info.swa_layers
    # which layers are SWA does not matter for the total unless split over devices;
    # assume they are spread evenly
    for il in range(n_layer):
        is_swa = info.swa_layers and (il * info.swa_layers) // max(n_layer, 1) != (
            (il + 1) * info.swa_layers
        ) // max(n_layer, 1)
        cells = swa_cells if (is_swa and swa_left > 0) else ctx
        if is_swa:
            swa_left -= 1
        kv_per_layer.append(int(cells * per_cell_layer))
    kv_vram = sum(kv_per_layer[n_layer - gpu_blocks :]) if gpu_blocks else 0
    kv_ram = sum(kv_per_layer) - kv_vram

    # Compute buffers. llama.cpp reserves the worst case (logits for a whole ubatch);
    # a GPU allocates all of it, but on the CPU only the pages a step touches become
    # resident, and hearth asks for one row of logits per sequence. So RAM counts what
    # is touched: one ubatch of activations through the widest layer, the attention
    # mask, and llama.cpp's vocabulary tables (about 200 bytes a token) -- calibrated
    # against measured RSS on SmolLM2 135M and Gemma 3 270M (tests/test_memory.py).
    ub = min(n_ubatch, ctx)
    n_embd = info.embedding_length
    n_ff = max(info.feed_forward_length, n_embd)
    act = ub * (n_embd * 4 + n_ff * 3) * 4
    mask = ub * ctx_seq
    kq = 0 if flash_attn else ub * ctx_seq * info.head_count * 4
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


def plan_load(
    info: ModelInfo,
    hardware: Hardware,
    options: LoadOptions | None = None,
) -> LoadPlan:
    """Choose a LoadPlan, or raise DoesNotFit saying how much is needed and available."""
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

    chosen = None
    for i, parallel in enumerate(parallel_options):
        last = i == len(parallel_options) - 1
        # more slots only while each still gets a useful context
        useful = min(trained, 4096)
        options = ctx_options if last or opts.n_ctx else [c for c in ctx_options if c >= useful]
        chosen = search(options) if options else None
        if chosen:
            break
    src("n_gpu_layers", opts.n_gpu_layers)

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
    if gpus and 0 < ngl < total_layers:
        notes.append(f"{ngl} of {total_layers} layers on the GPU; the rest on the CPU")
    n_batch, n_ubatch = batch_sizes(n_ctx)
    src("n_batch", opts.n_batch)
    src("n_ubatch", opts.n_ubatch)
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
        memory=estimate(n_ctx, ngl, kv),
        notes=notes,
        sources=sources,
    )
