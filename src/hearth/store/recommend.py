"""``hearth models recommend``: the best catalog model and quantization for this machine.

For every catalog model with a wanted tag and every one of its quantizations, a
synthetic :class:`~hearth.gguf.ModelInfo` is built from the catalog's architecture
facts and handed to the real planner (:func:`hearth.planner.plan_load`, one slot at
``min(min_ctx, context_length)``), so "fits" means exactly what loading it would mean,
headroom included. Then generation speed is estimated from memory bandwidth, and the
best-quality candidate that fits and is interactive wins.

Speed model
    Generating one token reads every weight once (plus the used part of the KV
    cache), so it is memory-bound::

        seconds/token = bytes_gpu / (EFF_GPU * bw_gpu) + bytes_cpu / (EFF_CPU * bw_cpu)

    where the bytes are what each device reads per token: the repeating layers it
    holds, the output head (on the GPU when the planner offloads it, else the CPU)
    and half a full KV cache (the average over a conversation filling the context;
    sliding-window layers read at most their window). The token embedding is only a
    row lookup and is not counted. ``EFF_CPU = 0.6`` and ``EFF_GPU = 0.7`` are the
    fractions of the memory bandwidth llama.cpp typically reaches in generation.
    GPU bandwidth comes from a table of known cards (``GPU_BANDWIDTH``; Apple
    silicon uses its unified memory bandwidth), else 300 GB/s for an unknown
    discrete GPU and 60 GB/s for an integrated one. CPU bandwidth is ``bandwidth=``
    when given, else this machine's measurement cached in the user cache dir
    (:func:`cpu_bandwidth`; measured on first use, again with ``refresh``: the median
    of five short multi-threaded numpy copies, about 0.4 s), else assumed (20 GB/s).
    A single short run swung by tens of percent on a busy machine, and the answer
    with it; the cached median keeps one machine's answer the same from run to run.

Scoring (quality)
    ``score = log2(parameters / 1e9) - QUANT_PENALTY[quant]``: quality is counted in
    doublings of model size, and a quantization costs a fraction of a doubling.
    Q8_0, F16, BF16 and F32 all cost 0: full precision is treated as no better than
    Q8_0, and ties go to the smaller file, so F16 is only picked where it is the
    only precision on offer. Q6_K costs 0.05, Q5_K_M 0.12, Q4_K_M 0.25, Q4_0 0.3:
    among ordinary quants a larger model wins unless the sizes are within about
    20%, where the higher precision wins. Very low-bit quants are penalised hard:
    Q3_K_M costs 1.35 doublings (a 7-8B Q3_K_M scores like a 3B at Q8_0), Q2_K
    2.0 (a 7B Q2_K scores like a 1.75B), so a 7B Q2_K never beats a 3B Q4_K_M and
    a 7B Q3_K_M only wins where no 3B fits at 6 bits or more. Ties are broken by
    speed, then by the smaller download.

Choice
    The highest score among candidates that fit and reach ``min_tokens_per_s``. The
    runners-up are the other models' best such quantization (one per model, best
    first, at most ``MAX_RUNNERS_UP``). When something fits but nothing is fast
    enough, the fastest model that fits is offered (marked not interactive) with
    a warning; when nothing fits, ``choice`` is None and the explanation names the
    smallest model, what it needs and what there is. ``margin`` (and the
    explanation's "Margin:" line) says by how much the choice beat the first
    runner-up: the two scores, or the speeds when the scores tie. A small margin
    is a close call, where another machine's bandwidth could pick the other.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DoesNotFit
from ..gguf import ModelInfo
from ..hardware import GPU, Hardware, detect_hardware
from ..planner import (
    KV_TYPES,
    RAM_HEADROOM,
    VRAM_HEADROOM,
    LoadOptions,
    estimate_memory,
    memory_budget,
    offloadable_layers,
    plan_load,
)
from .catalog import Catalog, CatalogModel, CatalogQuant, load_catalog
from .local import catalog_ref

log = logging.getLogger(__name__)

GiB = 1024**3
MiB = 1024**2
GB = 1e9

EFF_CPU = 0.6  # fraction of the CPU memory bandwidth generation reaches
EFF_GPU = 0.7  # fraction of the GPU memory bandwidth generation reaches
ASSUMED_CPU_BANDWIDTH = 20.0  # GB/s, when it is neither given nor measurable
UNKNOWN_DISCRETE_GPU_BANDWIDTH = 300.0  # GB/s
INTEGRATED_GPU_BANDWIDTH = 60.0  # GB/s
MAX_RUNNERS_UP = 5
# size-based estimate for entries without architecture facts: weights plus a quarter
# for the KV cache and buffers plus a fixed runtime allowance (deliberately generous)
FALLBACK_FACTOR = 1.25
FALLBACK_FIXED = 300 * MiB

# (regex over "name description" in lower case, GB/s, label); first match wins, so
# the more specific names come first
GPU_BANDWIDTH: list[tuple[str, float, str]] = [
    (r"gh200", 4000, "GH200"),
    (r"h200", 4800, "H200"),
    (r"h100.*nvl", 3900, "H100 NVL"),
    (r"h100.*pcie", 2000, "H100 PCIe"),
    (r"h100", 3350, "H100 SXM"),
    (r"h800.*pcie", 2000, "H800 PCIe"),
    (r"h800", 3350, "H800 SXM"),
    (r"a100.*(80g|80 g).*pcie|a100.*pcie.*80g", 1935, "A100 80GB PCIe"),
    (r"a100.*(80g|80 g)", 2039, "A100 80GB SXM"),
    (r"a100", 1555, "A100 40GB"),
    (r"a800", 2039, "A800"),
    (r"l40s", 864, "L40S"),
    (r"\bl40\b", 864, "L40"),
    (r"\bl4\b", 300, "L4"),
    (r"\ba40\b", 696, "A40"),
    (r"\ba30\b", 933, "A30"),
    (r"\ba10g?\b", 600, "A10"),
    (r"\bt4\b", 320, "T4"),
    (r"v100s", 1134, "V100S"),
    (r"v100", 900, "V100"),
    (r"rtx 6000 ada", 960, "RTX 6000 Ada"),
    (r"rtx a6000|\ba6000\b", 768, "RTX A6000"),
    (r"5090", 1792, "RTX 5090"),
    (r"5080", 960, "RTX 5080"),
    (r"4090", 1008, "RTX 4090"),
    (r"4080", 717, "RTX 4080"),
    (r"4070 ti super", 672, "RTX 4070 Ti Super"),
    (r"4070", 504, "RTX 4070"),
    (r"4060 ti", 288, "RTX 4060 Ti"),
    (r"4060", 272, "RTX 4060"),
    (r"3090 ti", 1008, "RTX 3090 Ti"),
    (r"3090", 936, "RTX 3090"),
    (r"3080 ti|3080.*12\s?gb", 912, "RTX 3080 Ti/12GB"),
    (r"3080", 760, "RTX 3080"),
    (r"3070", 448, "RTX 3070"),
    (r"3060 ti", 448, "RTX 3060 Ti"),
    (r"3060", 360, "RTX 3060"),
    (r"2080 ti", 616, "RTX 2080 Ti"),
    (r"mi300", 5300, "MI300X"),
    (r"mi250", 3277, "MI250"),
    (r"7900 xtx", 960, "RX 7900 XTX"),
    (r"m1 ultra", 800, "Apple M1 Ultra"),
    (r"m1 max", 400, "Apple M1 Max"),
    (r"m1 pro", 200, "Apple M1 Pro"),
    (r"\bm1\b", 68, "Apple M1"),
    (r"m2 ultra", 800, "Apple M2 Ultra"),
    (r"m2 max", 400, "Apple M2 Max"),
    (r"m2 pro", 200, "Apple M2 Pro"),
    (r"\bm2\b", 100, "Apple M2"),
    (r"m3 ultra", 819, "Apple M3 Ultra"),
    (r"m3 max", 400, "Apple M3 Max"),
    (r"m3 pro", 150, "Apple M3 Pro"),
    (r"\bm3\b", 100, "Apple M3"),
    (r"m4 max", 546, "Apple M4 Max"),
    (r"m4 pro", 273, "Apple M4 Pro"),
    (r"\bm4\b", 120, "Apple M4"),
]

# Quality cost of a quantization, in doublings of model size (see the module doc).
QUANT_PENALTY: dict[str, float] = {
    "F32": 0.0, "F16": 0.0, "BF16": 0.0, "Q8_0": 0.0,
    "Q6_K": 0.05, "MXFP4": 0.05,
    "Q5_K_M": 0.12, "Q5_1": 0.12, "Q5_K_S": 0.15, "Q5_0": 0.15,
    "Q4_K_M": 0.25, "Q4_1": 0.25, "IQ4_NL": 0.25, "IQ4_XS": 0.27,
    "Q4_K_S": 0.3, "Q4_0": 0.3,
    "Q3_K_L": 1.2, "Q3_K_M": 1.35, "IQ3_M": 1.35, "IQ3_S": 1.45,
    "Q3_K_S": 1.5, "IQ3_XS": 1.5, "IQ3_XXS": 1.6,
    "Q2_K_L": 1.9, "Q2_K": 2.0, "Q2_K_S": 2.1, "IQ2_M": 2.0, "IQ2_S": 2.2,
    "IQ2_XS": 2.3, "IQ2_XXS": 2.5, "IQ1_M": 3.0, "IQ1_S": 3.2,
}
# by bits, for tags not listed above
_PENALTY_BY_BITS = {1: 3.0, 2: 2.0, 3: 1.35, 4: 0.3, 5: 0.15, 6: 0.05}
# nominal bits per weight, to size a quantization whose catalog entry gives no size
NOMINAL_BPW: dict[str, float] = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56,
    "Q5_K_M": 5.69, "Q5_K_S": 5.54, "Q5_1": 6.0, "Q5_0": 5.5,
    "Q4_K_M": 4.85, "Q4_K_S": 4.58, "Q4_1": 5.0, "Q4_0": 4.55, "IQ4_NL": 4.5, "IQ4_XS": 4.25,
    "Q3_K_L": 4.27, "Q3_K_M": 3.91, "Q3_K_S": 3.5, "IQ3_M": 3.66, "Q2_K": 3.35,
}
_ARCH_REQUIRED = ("layers", "embedding", "heads")
_BYTES_PER_PARAM_DEFAULT = 1.0  # Q8-ish, when a quant has neither size nor a known tag


# --------------------------------------------------------------------------- data


@dataclass
class Candidate:
    """One model at one quantization, judged for this machine."""

    name: str  # catalog name: "qwen2.5:7b"
    ref: str  # what to pull/run: "qwen2.5:7b" or "qwen2.5:7b-q8_0"
    quant: str
    parameters: int
    size: int  # download (file) bytes
    memory_ram: int  # bytes of RAM the loaded model needs (the planner's estimate)
    memory_vram: int  # bytes of VRAM
    n_gpu_layers: int
    total_layers: int  # offloadable layers (blocks + output head); 0 when unknown
    n_ctx: int
    est_tokens_per_s: float
    bytes_per_token: int  # what generating one token reads (weights, head, average KV)
    fits: bool
    interactive: bool
    score: float  # quality score (higher is better; see the module doc)
    estimate: str  # "planner" (architecture facts) or "size" (size-based fallback)
    reason: str

    @property
    def memory(self) -> int:
        return self.memory_ram + self.memory_vram

    @property
    def offload(self) -> str:
        """"gpu" (every layer), "partial" or "cpu"."""
        if self.n_gpu_layers <= 0:
            return "cpu"
        if self.total_layers and self.n_gpu_layers < self.total_layers:
            return "partial"
        return "gpu"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["est_tokens_per_s"] = round(self.est_tokens_per_s, 1)
        d["score"] = round(self.score, 3)
        d["memory"] = self.memory
        d["offload"] = self.offload
        return d


@dataclass
class Recommendation:
    choice: Candidate | None
    runners_up: list[Candidate]
    rejected: list[Candidate]  # every candidate that is too big or too slow
    hardware: dict[str, Any]
    explanation: str
    min_tokens_per_s: float = 8.0
    min_ctx: int = 4096
    # every model x quantization judged, in catalog order (not in to_dict: choice,
    # runners_up and rejected_candidates there say it all)
    candidates: list[Candidate] = field(default_factory=list, repr=False)
    # how the choice beat the runner-up (see _margin); None when nothing was chosen on merit
    margin: dict[str, Any] | None = None

    @property
    def considered(self) -> int:
        return len(self.candidates)

    @property
    def rejected_counts(self) -> dict[str, int]:
        return {
            "too_big": sum(1 for c in self.rejected if not c.fits),
            "too_slow": sum(1 for c in self.rejected if c.fits and not c.interactive),
        }

    def to_text(self) -> str:
        """The explanation, the runners-up as a small table, and how to get the choice."""
        out = [self.explanation]
        if self.runners_up:
            rows = [
                (c.ref, c.quant, fmt_bytes(c.size), f"~{_fmt_tps(c.est_tokens_per_s)} tok/s",
                 f"score {c.score:.2f}", c.offload)
                for c in self.runners_up
            ]
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            out.append("")
            out.append("Also good here:")
            out += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        if self.choice is not None:
            out.append("")
            out.append(f"Get it with: hearth models pull {self.choice.ref}")
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "choice": self.choice.to_dict() if self.choice else None,
            "runners_up": [c.to_dict() for c in self.runners_up],
            "rejected": self.rejected_counts,
            "rejected_candidates": [c.to_dict() for c in self.rejected],
            "considered": self.considered,
            "min_tokens_per_s": self.min_tokens_per_s,
            "min_ctx": self.min_ctx,
            "hardware": self.hardware,
            "margin": self.margin,
            "explanation": self.explanation,
        }


# --------------------------------------------------------------------------- bandwidth


def gpu_bandwidth(gpu: GPU) -> tuple[float, str]:
    """(GB/s, where the number comes from) for one GPU."""
    text = f"{gpu.name} {gpu.description}".lower()
    for pattern, gbs, label in GPU_BANDWIDTH:
        if re.search(pattern, text):
            if label.startswith("A100 40GB") and gpu.total_memory > 60 * GiB:
                return 2039.0, "A100 80GB, from the table"
            return float(gbs), f"{label}, from the table"
    if gpu.integrated:
        return INTEGRATED_GPU_BANDWIDTH, "assumed for an integrated GPU"
    return UNKNOWN_DISCRETE_GPU_BANDWIDTH, "assumed for an unknown discrete GPU"


def _copy_rates(n_threads: int, nbytes: int, runs: int, run_s: float) -> list[float]:
    """GB/s of ``runs`` short runs, each the best of repeated copies of ``nbytes`` split
    over ``n_threads`` threads (numpy releases the GIL while copying) within about
    ``run_s``."""
    import numpy as np

    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    bounds = [len(src) * i // n_threads for i in range(n_threads + 1)]

    def part(i: int) -> None:
        a, b = bounds[i], bounds[i + 1]
        np.copyto(dst[a:b], src[a:b])

    def once() -> float:
        t0 = time.perf_counter()
        if n_threads == 1:
            part(0)
        else:
            threads = [threading.Thread(target=part, args=(i,)) for i in range(n_threads)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return time.perf_counter() - t0

    once()  # touch the pages
    rates: list[float] = []
    for _ in range(max(1, runs)):
        deadline = time.perf_counter() + run_s
        best = math.inf
        for i in range(1000):
            best = min(best, once())
            if i >= 2 and time.perf_counter() >= deadline:
                break
        # a copy reads and writes every byte
        rates.append(2 * src.nbytes / best / GB if 0 < best < math.inf else 0.0)
    return rates


BANDWIDTH_RUNS = 5  # short runs; their median is the machine's bandwidth
BANDWIDTH_RUN_S = 0.08  # seconds per run
BANDWIDTH_CACHE = "bandwidth.json"  # in the cache dir (Config.cache_dir), one entry per machine


def _measure_runs(runs: int = BANDWIDTH_RUNS, run_s: float = BANDWIDTH_RUN_S) -> list[float]:
    from ..hardware import physical_cores

    threads = max(1, min(physical_cores(), 16))
    return _copy_rates(threads, 64 * MiB, runs, run_s)


@functools.lru_cache(maxsize=1)
def measure_cpu_bandwidth(budget_s: float = BANDWIDTH_RUNS * BANDWIDTH_RUN_S) -> float:
    """The CPU's memory bandwidth in GB/s: the median of several short runs, each the
    best of repeated large-array copies (numpy, spread over the physical cores, 2 x 64
    MiB so caches do not flatter it), counting each byte read and written. One run is
    at the mercy of whatever else the machine does; the median of five is not. About
    ``budget_s`` seconds; cached for the process. Raises when numpy is missing or the
    copy fails."""
    return statistics.median(_measure_runs(BANDWIDTH_RUNS, budget_s / BANDWIDTH_RUNS))


@dataclass(frozen=True)
class CpuBandwidth:
    """The CPU memory bandwidth used for speed estimates, and where it came from."""

    gbs: float
    source: str  # "given", "measured" (now), "cached" (measured earlier), "assumed"
    measured_at: float | None = None  # when it was measured (time.time())
    runs: tuple[float, ...] = ()  # each short run's GB/s; gbs is their median
    cache_file: str | None = None

    def describe(self) -> str:
        if self.source == "cached" and self.measured_at:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.measured_at))
            return f"measured {when}, cached; --refresh measures again"
        if self.source == "measured" and self.runs:
            return f"measured, median of {len(self.runs)} runs"
        return self.source


def machine_key() -> str:
    """What a bandwidth measurement belongs to: host, CPU model, cores usable, RAM. A
    home directory shared between machines keeps one entry per machine."""
    import platform

    import psutil

    from ..hardware import physical_cores

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return "|".join((platform.node(), platform.machine(), cpu, str(physical_cores()),
                     str(psutil.virtual_memory().total)))


def bandwidth_cache_path() -> Path:
    from ..config import load_config

    return load_config().cache_dir() / BANDWIDTH_CACHE


def _read_cache(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("machines"), dict) else {}


def _cached(path: Path, key: str) -> CpuBandwidth | None:
    entry = _read_cache(path).get("machines", {}).get(key)
    try:
        gbs = float(entry["gbs"])
        at = float(entry.get("measured_at") or 0) or None
        runs = tuple(float(r) for r in entry.get("runs") or ())
    except (TypeError, KeyError, ValueError, AttributeError):
        return None
    return CpuBandwidth(gbs, "cached", at, runs, str(path)) if gbs > 0 else None


def _write_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    from .local import _write_json_atomic

    data = _read_cache(path) or {"version": 1, "machines": {}}
    data["machines"][key] = entry
    _write_json_atomic(path, data)


def cpu_bandwidth(bandwidth: float | None = None, *, cache: bool = True, refresh: bool = False,
                  cache_file: Path | None = None) -> CpuBandwidth:
    """The CPU memory bandwidth: ``bandwidth`` when given; else this machine's cached
    measurement (``cache``; ``refresh`` measures again and replaces it); else measured now
    (the median of ``BANDWIDTH_RUNS`` short runs) and cached; else assumed (20 GB/s).

    One measurement per machine, so repeated recommendations on it give the same answer
    rather than one that follows the noise of a 0.2 s benchmark."""
    if bandwidth is not None:
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be a positive number of GB/s, got {bandwidth!r}")
        return CpuBandwidth(float(bandwidth), "given")
    path: Path | None = None
    key = ""
    if cache:
        try:
            path = cache_file or bandwidth_cache_path()
            key = machine_key()
        except Exception as e:  # a bad config file, no home: measure without the cache
            log.debug("no bandwidth cache: %s", e)
            path = None
    if path is not None and not refresh:
        hit = _cached(path, key)
        if hit is not None:
            return hit
    try:
        runs = [round(r, 3) for r in _measure_runs()]  # as cached: the first answer is the same as the next
        gbs = statistics.median(runs)
    except Exception as e:  # pragma: no cover - numpy missing or broken
        log.debug("cannot measure memory bandwidth: %s", e)
        return CpuBandwidth(ASSUMED_CPU_BANDWIDTH, "assumed")
    if not gbs > 0:  # pragma: no cover
        return CpuBandwidth(ASSUMED_CPU_BANDWIDTH, "assumed")
    now = time.time()
    if path is not None:
        try:
            _write_cache(path, key, {"gbs": gbs, "runs": runs, "measured_at": now})
        except OSError as e:
            log.debug("cannot write %s: %s", path, e)
            path = None
    return CpuBandwidth(gbs, "measured", now, tuple(runs), str(path) if path else None)


# --------------------------------------------------------------------------- scoring


def quant_penalty(quant: str) -> float:
    q = quant.upper()
    if q in QUANT_PENALTY:
        return QUANT_PENALTY[q]
    m = re.match(r"I?Q(\d)", q)
    if m:
        bits = int(m.group(1))
        return 0.0 if bits >= 8 else _PENALTY_BY_BITS.get(bits, 1.0)
    return 1.0  # unknown formats are not preferred


def quality_score(parameters: int, quant: str) -> float:
    """Doublings of model size minus the quantization's cost (see the module doc)."""
    return math.log2(max(parameters, 1) / 1e9) - quant_penalty(quant)


def _rank_key(c: Candidate) -> tuple:
    return (round(c.score, 6), round(c.est_tokens_per_s, 3), -c.size)


# --------------------------------------------------------------------------- model facts


def _quant_size(model: CatalogModel, q: CatalogQuant) -> int:
    if q.size > 0:
        return q.size
    bpw = NOMINAL_BPW.get(q.quant)
    if bpw is None:
        return int(model.parameters * _BYTES_PER_PARAM_DEFAULT)
    return int(model.parameters * bpw / 8)


def _parameters(model: CatalogModel, q: CatalogQuant) -> int:
    """The catalog's count, else one estimated from the file size."""
    if model.parameters > 0:
        return model.parameters
    size = q.size or 0
    return int(size * 8 / NOMINAL_BPW.get(q.quant, 8.5)) if size else 0


def size_based_need(model: CatalogModel, q: CatalogQuant) -> int:
    """Bytes to load a model the catalog gives no architecture facts for (see _judge_by_size)."""
    return int(_quant_size(model, q) * FALLBACK_FACTOR) + FALLBACK_FIXED


def has_arch_facts(model: CatalogModel) -> bool:
    return all(model.arch.get(k, 0) > 0 for k in _ARCH_REQUIRED) and model.parameters > 0


def synthetic_info(model: CatalogModel, q: CatalogQuant) -> ModelInfo:
    """A ModelInfo from the catalog's facts, as ``inspect_model`` would read it.

    ``weights_bytes`` is the file size; the token embedding (and an untied output
    head) take ``vocab * embedding`` weights each at the file's average bits per
    weight; the rest is spread evenly over the layers. Whether the output head is
    tied to the embedding is judged from the parameter count.
    """
    a = model.arch
    n_layer, n_embd, heads = a["layers"], a["embedding"], a["heads"]
    kv_heads = a.get("kv_heads") or heads
    head_dim = a.get("head_dim") or n_embd // heads
    n_ff = a.get("feed_forward") or 4 * n_embd
    vocab = a.get("vocab") or 128_000  # unknown: assume a large one (conservative)
    size = _quant_size(model, q)
    params = model.parameters
    bytes_per_param = size / params

    emb_params = vocab * n_embd
    per_layer = 2 * n_embd * heads * head_dim + 2 * n_embd * kv_heads * head_dim + 3 * n_embd * n_ff
    residual = params - n_layer * per_layer
    tied = abs(residual - emb_params) <= abs(residual - 2 * emb_params)
    emb_bytes = int(emb_params * bytes_per_param)
    output_bytes = 0 if tied else emb_bytes
    non_layer = emb_bytes + output_bytes
    non_layer = min(non_layer, size // 2)  # keep the layers the bulk, whatever the facts
    output_bytes = min(output_bytes, non_layer // 2) if output_bytes else 0
    layer_total = size - non_layer
    base, extra = divmod(layer_total, n_layer)
    layer_bytes = [base + (1 if i < extra else 0) for i in range(n_layer)]
    sliding = a.get("sliding_window", 0)
    swa_layers = a.get("swa_layers", n_layer if sliding else 0) if sliding else 0
    return ModelInfo(
        path=Path(q.first_file),
        file_size=size,
        gguf_version=3,
        architecture=model.family,
        name=model.name,
        parameters=params,
        quantization=q.quant,
        quantization_source="catalog",
        file_type=None,
        context_length=model.context_length or 4096,
        block_count=n_layer,
        embedding_length=n_embd,
        feed_forward_length=n_ff,
        head_count=heads,
        head_count_kv=kv_heads,
        key_length=head_dim,
        value_length=head_dim,
        vocab_size=vocab,
        sliding_window=sliding,
        swa_layers=min(swa_layers, n_layer),
        chat_template=None,
        tensor_types={},
        weights_bytes=size,
        layer_bytes=layer_bytes,
        non_layer_bytes=non_layer,
        output_bytes=output_bytes,
    )


# --------------------------------------------------------------------------- judging



def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def _fmt_tps(t: float) -> str:
    return f"{t:.0f}" if t >= 10 else f"{t:.1f}"


@dataclass
class _Machine:
    hw: Hardware
    ram_budget: int
    vram_budgets: list[int]
    gpu_bw: list[tuple[float, str]]
    cpu_bw: float
    cpu_bw_source: str
    cpu: CpuBandwidth | None = None

    @property
    def vram_budget(self) -> int:
        return sum(self.vram_budgets)

    def gpu_seconds_per_byte(self) -> float:
        """Layers are split over the GPUs in proportion to their free memory and run
        one after another, so the times add up."""
        total = self.vram_budget or 1
        shares = [b / total for b in self.vram_budgets] if self.vram_budget else [
            1 / len(self.gpu_bw)
        ] * len(self.gpu_bw)
        return sum(s / (EFF_GPU * bw * GB) for s, (bw, _) in zip(shares, self.gpu_bw))

    def cpu_seconds_per_byte(self) -> float:
        return 1 / (EFF_CPU * self.cpu_bw * GB)

    def where(self) -> str:
        s = f"{fmt_bytes(self.ram_budget)} of RAM"
        if self.hw.gpus:
            s += f" and {fmt_bytes(self.vram_budget)} of VRAM"
        return s + " available (after headroom)"


def _speed(
    m: _Machine, info: ModelInfo, n_ctx: int, ngl: int, kv_type: str
) -> tuple[float, int]:
    """(tokens/s, bytes read per token) for a plan."""
    n_layer = info.block_count
    gpu_blocks = min(max(ngl, 0), n_layer)
    layer_bytes = info.layer_bytes
    gpu_read = sum(layer_bytes[n_layer - gpu_blocks :]) if gpu_blocks else 0
    cpu_read = sum(layer_bytes) - gpu_read
    # the output matmul reads the whole head (the embedding itself when tied)
    head = info.output_bytes or int(info.non_layer_bytes)
    if ngl > n_layer:
        gpu_read += head
    else:
        cpu_read += head
    # KV cache: half full on average; sliding-window layers read at most the window
    per_cell = info.head_count_kv * (info.key_length + info.value_length) * KV_TYPES[kv_type]
    cells = n_ctx / 2
    swa_cells = min(cells, info.sliding_window) if info.sliding_window else cells
    kv_layer = [
        per_cell * (swa_cells if il < info.swa_layers else cells) for il in range(n_layer)
    ]
    kv_total = sum(kv_layer)
    kv_gpu = kv_total * gpu_blocks / n_layer if n_layer else 0
    gpu_read += kv_gpu
    cpu_read += kv_total - kv_gpu
    seconds = cpu_read * m.cpu_seconds_per_byte()
    if gpu_read:
        seconds += gpu_read * m.gpu_seconds_per_byte()
    return (1 / seconds if seconds > 0 else math.inf), int(gpu_read + cpu_read)


def _judge_planned(
    m: _Machine, model: CatalogModel, q: CatalogQuant, min_ctx: int, min_tps: float
) -> Candidate:
    info = synthetic_info(model, q)
    n_ctx = max(16, min(min_ctx, info.context_length))
    total_layers = offloadable_layers(info)
    common = dict(
        name=model.name, ref=catalog_ref(model, q.quant), quant=q.quant, parameters=model.parameters,
        size=info.weights_bytes, total_layers=total_layers, n_ctx=n_ctx,
        score=quality_score(model.parameters, q.quant), estimate="planner",
    )
    try:
        plan = plan_load(info, m.hw, LoadOptions(n_ctx=n_ctx, parallel=1))
    except DoesNotFit:
        # what it would need: all of it in RAM, or all of it on the GPU where there is one
        ngl = -1 if m.hw.gpus else 0
        need = estimate_memory(info, n_ctx, n_gpu_layers=ngl, kv_type="q8_0")
        return Candidate(
            **common, memory_ram=need.ram, memory_vram=need.vram,
            n_gpu_layers=total_layers if m.hw.gpus else 0,
            est_tokens_per_s=0.0, bytes_per_token=0, fits=False, interactive=False,
            reason=f"too big: needs {fmt_bytes(need.total)} at n_ctx {n_ctx}; "
            f"{m.where()}",
        )
    tps, per_token = _speed(m, info, plan.n_ctx, plan.n_gpu_layers, plan.kv_type)
    interactive = tps >= min_tps
    mem = plan.memory
    if plan.n_gpu_layers >= total_layers:
        place = f"all {total_layers} layers on the GPU"
    elif plan.n_gpu_layers > 0:
        place = f"{plan.n_gpu_layers} of {total_layers} layers on the GPU"
    else:
        place = "on the CPU"
    needs = fmt_bytes(mem.ram) + " RAM" + (f" + {fmt_bytes(mem.vram)} VRAM" if mem.vram else "")
    if interactive:
        reason = f"fits ({needs}, {place}); ~{_fmt_tps(tps)} tok/s"
    else:
        reason = f"too slow: ~{_fmt_tps(tps)} tok/s < {min_tps:g} ({needs}, {place})"
    if plan.kv_type != "f16":
        reason += f"; KV cache {plan.kv_type}"
    return Candidate(
        **common, memory_ram=mem.ram, memory_vram=mem.vram, n_gpu_layers=plan.n_gpu_layers,
        est_tokens_per_s=tps, bytes_per_token=per_token, fits=True,
        interactive=interactive, reason=reason,
    )


def _judge_by_size(
    m: _Machine, model: CatalogModel, q: CatalogQuant, min_ctx: int, min_tps: float
) -> Candidate:
    """No architecture facts: weights x 1.25 + 300 MiB, all on the GPU or all on the CPU."""
    size = _quant_size(model, q)
    need = int(size * FALLBACK_FACTOR) + FALLBACK_FIXED
    n_ctx = max(16, min(min_ctx, model.context_length or min_ctx))
    common = dict(
        name=model.name, ref=catalog_ref(model, q.quant), quant=q.quant,
        parameters=_parameters(model, q), size=size, total_layers=0, n_ctx=n_ctx,
        score=quality_score(_parameters(model, q), q.quant), estimate="size",
    )
    note = " (size-based estimate: the catalog lists no architecture facts)"
    if size <= 0:
        return Candidate(
            **common, memory_ram=0, memory_vram=0, n_gpu_layers=0, est_tokens_per_s=0.0,
            bytes_per_token=0, fits=False, interactive=False,
            reason="unknown: the catalog gives neither its size nor its parameter count",
        )
    if m.hw.gpus and need <= m.vram_budget and FALLBACK_FIXED <= m.ram_budget:
        ram, vram, ngl = FALLBACK_FIXED, need, -1
        tps = 1 / (size * m.gpu_seconds_per_byte())
        place = "on the GPU"
    elif need <= m.ram_budget:
        ram, vram, ngl = need, 0, 0
        tps = 1 / (size * m.cpu_seconds_per_byte())
        place = "on the CPU"
    else:
        return Candidate(
            **common, memory_ram=need, memory_vram=0, n_gpu_layers=0,
            est_tokens_per_s=0.0, bytes_per_token=0, fits=False, interactive=False,
            reason=f"too big: needs about {fmt_bytes(need)}; {m.where()}{note}",
        )
    interactive = tps >= min_tps
    if interactive:
        reason = f"fits (about {fmt_bytes(need)}, {place}); ~{_fmt_tps(tps)} tok/s{note}"
    else:
        reason = f"too slow: ~{_fmt_tps(tps)} tok/s < {min_tps:g} ({place}){note}"
    return Candidate(
        **common, memory_ram=ram, memory_vram=vram, n_gpu_layers=ngl,
        est_tokens_per_s=tps, bytes_per_token=size, fits=True, interactive=interactive,
        reason=reason,
    )


def judge(
    m: _Machine, model: CatalogModel, q: CatalogQuant, min_ctx: int, min_tps: float
) -> Candidate:
    if has_arch_facts(model):
        return _judge_planned(m, model, q, min_ctx, min_tps)
    return _judge_by_size(m, model, q, min_ctx, min_tps)


# --------------------------------------------------------------------------- recommend


def _machine(hw: Hardware, bandwidth: float | None, *, cache: bool = True, refresh: bool = False) -> _Machine:
    cpu = cpu_bandwidth(bandwidth, cache=cache, refresh=refresh)
    return _Machine(
        hw=hw,
        ram_budget=memory_budget(hw.total_ram, hw.available_ram, RAM_HEADROOM),
        vram_budgets=[memory_budget(g.total_memory, g.free_memory, VRAM_HEADROOM) for g in hw.gpus],
        gpu_bw=[gpu_bandwidth(g) for g in hw.gpus],
        cpu_bw=cpu.gbs,
        cpu_bw_source=cpu.source,
        cpu=cpu,
    )


def _hardware_summary(m: _Machine) -> dict[str, Any]:
    hw = m.hw
    return {
        "physical_cores": hw.physical_cores,
        "total_ram": hw.total_ram,
        "available_ram": hw.available_ram,
        "ram_budget": m.ram_budget,
        "cpu_bandwidth_gbs": round(m.cpu_bw, 1),
        "cpu_bandwidth_source": m.cpu_bw_source,
        "cpu_bandwidth_measured_at": m.cpu.measured_at if m.cpu else None,
        "cpu_bandwidth_runs": [round(r, 1) for r in m.cpu.runs] if m.cpu else [],
        "cpu_bandwidth_cache": m.cpu.cache_file if m.cpu else None,
        "efficiency": {"cpu": EFF_CPU, "gpu": EFF_GPU},
        "gpus": [
            {
                "name": g.name,
                "description": g.description,
                "backend": g.backend,
                "integrated": g.integrated,
                "total_memory": g.total_memory,
                "free_memory": g.free_memory,
                "vram_budget": budget,
                "bandwidth_gbs": bw,
                "bandwidth_source": src,
            }
            for g, budget, (bw, src) in zip(hw.gpus, m.vram_budgets, m.gpu_bw)
        ],
    }


def _best_per_model(cands: list[Candidate]) -> list[Candidate]:
    best: dict[str, Candidate] = {}
    for c in cands:
        if c.name not in best or _rank_key(c) > _rank_key(best[c.name]):
            best[c.name] = c
    return sorted(best.values(), key=_rank_key, reverse=True)


def _speed_text(m: _Machine, c: Candidate) -> str:
    cpu = (f"{m.cpu_bw:.0f} GB/s CPU memory bandwidth ({m.cpu.describe() if m.cpu else m.cpu_bw_source}) "
           f"x {EFF_CPU} efficiency")
    gpu = "; ".join(f"{bw:.0f} GB/s GPU memory bandwidth ({src})" for bw, src in m.gpu_bw)
    gpu += f" x {EFF_GPU} efficiency"
    if c.offload == "cpu" or not m.hw.gpus:
        at = cpu
    elif c.offload == "gpu":
        at = gpu
    else:
        at = f"{gpu}, and {cpu} for the layers on the CPU"
    return (
        f"~{_fmt_tps(c.est_tokens_per_s)} tok/s expected, reading ~{c.bytes_per_token / GB:.1f} GB "
        f"per token at {at}"
    )


def _margin(choice: Candidate | None, runner_up: Candidate | None) -> dict[str, Any] | None:
    """The winner's score and speed against the runner-up's (the next model's best)."""
    if choice is None:
        return None
    d: dict[str, Any] = {"score": round(choice.score, 3),
                         "tokens_per_s": round(choice.est_tokens_per_s, 1), "runner_up": None}
    if runner_up is not None:
        d.update(runner_up=runner_up.ref, runner_up_quant=runner_up.quant,
                 runner_up_score=round(runner_up.score, 3),
                 runner_up_tokens_per_s=round(runner_up.est_tokens_per_s, 1),
                 score_margin=round(choice.score - runner_up.score, 3),
                 won_on=_rank_reason(choice, runner_up))
    return d


def _rank_reason(a: Candidate, b: Candidate) -> str:
    """Which part of the rank key put ``a`` ahead of ``b``."""
    ka, kb = _rank_key(a), _rank_key(b)
    return "score" if ka[0] != kb[0] else "speed" if ka[1] != kb[1] else "download size"


def _margin_text(choice: Candidate, runner_up: Candidate | None) -> str:
    if runner_up is None:
        return "no other model fits and runs fast enough here"
    ru = f"the runner-up {runner_up.ref} ({runner_up.quant})"
    why = _rank_reason(choice, runner_up)
    if why == "score":
        return (f"score {choice.score:.2f} vs {runner_up.score:.2f} for {ru}, "
                f"+{choice.score - runner_up.score:.2f} (a score counts doublings of model size, "
                "less the quantization's cost)")
    if why == "speed":
        return (f"tied with {ru} on score ({choice.score:.2f}); faster, "
                f"~{_fmt_tps(choice.est_tokens_per_s)} vs ~{_fmt_tps(runner_up.est_tokens_per_s)} tok/s")
    return (f"tied with {ru} on score ({choice.score:.2f}) and speed; a smaller download, "
            f"{fmt_bytes(choice.size)} vs {fmt_bytes(runner_up.size)}")


def _placement(c: Candidate) -> str:
    if c.estimate == "size":
        return "on the GPU" if c.offload == "gpu" else "on the CPU"
    return {
        "gpu": f"fully on the GPU ({c.total_layers} layers)",
        "partial": f"{c.n_gpu_layers} of {c.total_layers} layers on the GPU, the rest on the CPU",
        "cpu": "on the CPU",
    }[c.offload]


def _why_not(model_cands: list[Candidate], min_tps: float) -> str:
    """One line on why a model (any of its quantizations) was not chosen."""
    name = model_cands[0].name
    # its usual quantizations (4 bits or more); the very low-bit ones are a last resort
    usual = [c for c in model_cands if quant_penalty(c.quant) < 1] or model_cands
    fitting = [c for c in usual if c.fits]
    if fitting:
        fastest = max(fitting, key=lambda c: (c.est_tokens_per_s, -c.size))
        if fastest.interactive:
            best = max((c for c in fitting if c.interactive), key=_rank_key)
            return f"{name} {best.quant} fits at ~{_fmt_tps(best.est_tokens_per_s)} tok/s but scores lower"
        line = (
            f"{name} {fastest.quant} fits but would run ~{_fmt_tps(fastest.est_tokens_per_s)} "
            f"tok/s (< {min_tps:g})"
        )
    else:
        smallest = min(usual, key=lambda c: c.size)
        line = (
            f"{name} {smallest.quant} is too big: needs {fmt_bytes(smallest.memory)}"
            f" at n_ctx {smallest.n_ctx}"
        )
    low = [c for c in model_cands if c not in usual and c.fits and c.interactive]
    if low:
        best = max(low, key=_rank_key)
        bits = re.match(r"I?Q(\d)", best.quant)
        low_bit = f"{bits.group(1)}-bit quants" if bits else "very low-bit quants"
        line += (
            f"; {best.quant} fits and runs ~{_fmt_tps(best.est_tokens_per_s)} tok/s, "
            f"but {low_bit} score lower"
        )
    return line


def _explain(
    m: _Machine,
    choice: Candidate | None,
    all_cands: list[Candidate],
    min_tps: float,
    fallback_slow: bool,
    runner_up: Candidate | None = None,
) -> str:
    lines: list[str] = []
    if not all_cands:
        return "No catalog model has the requested tags."
    if choice is None:
        smallest = min(all_cands, key=lambda c: (c.memory, c.size))
        lines.append("Nothing in the catalog fits this machine.")
        lines.append(
            f"The smallest, {smallest.ref} ({smallest.quant}, {fmt_bytes(smallest.size)} download), "
            f"needs {fmt_bytes(smallest.memory)} at n_ctx {smallest.n_ctx}, "
            f"but there is only {m.where()}."
        )
        lines.append("Free some memory, or add a smaller model to the catalog.")
        return "\n".join(lines)

    lines.append(
        f"Recommended: {choice.ref} ({choice.quant}, {fmt_bytes(choice.size)} download)."
    )
    needs = f"{fmt_bytes(choice.memory_ram)} of RAM"
    if choice.memory_vram:
        needs += f" and {fmt_bytes(choice.memory_vram)} of VRAM"
    lines.append(
        f"Memory: needs {needs} at n_ctx {choice.n_ctx}, {_placement(choice)}; "
        f"{m.where()}."
    )
    lines.append(f"Speed: {_speed_text(m, choice)}.")
    if not fallback_slow:
        lines.append(f"Margin: {_margin_text(choice, runner_up)}.")
    if fallback_slow:
        lines.append(
            f"Warning: nothing that fits reaches {min_tps:g} tok/s here; this is the fastest "
            "model that fits."
        )
        return "\n".join(lines)
    by_model: dict[str, list[Candidate]] = {}
    for c in all_cands:
        by_model.setdefault(c.name, []).append(c)
    # the chosen model's higher-precision quantizations that were passed over
    better_quants = [
        c for c in by_model[choice.name]
        if quant_penalty(c.quant) < quant_penalty(choice.quant) and not c.interactive
    ]
    if better_quants:
        # the cheapest step up says why none of them was taken
        step = min(better_quants, key=lambda c: c.size)
        lines.append(
            f"Higher precision ({step.quant} and up) was not chosen: {step.quant} "
            + (f"would run ~{_fmt_tps(step.est_tokens_per_s)} tok/s." if step.fits
               else f"needs {fmt_bytes(step.memory)}.")
        )
    if quant_penalty(choice.quant) >= 1:
        lines.append(
            f"Note: {choice.quant} is a very low-bit quantization and quality suffers; "
            "it is the best that fits and runs fast enough here."
        )
    fuller = [
        c for c in by_model[choice.name]
        if c.quant in ("F16", "BF16", "F32") and c.fits and c.interactive
        and quant_penalty(choice.quant) == 0
    ]
    if fuller:
        lines.append(
            f"{fuller[0].quant} would fit too, but is treated as no better than {choice.quant}; "
            f"{choice.quant} is smaller and faster."
        )
    bigger = sorted(
        (cs for name, cs in by_model.items()
         if name != choice.name and cs[0].parameters > choice.parameters),
        key=lambda cs: cs[0].parameters,
    )
    if bigger:
        lines.append("Larger models not chosen:")
        for cs in bigger[:4]:
            lines.append("  " + _why_not(cs, min_tps))
        if len(bigger) > 4:
            lines.append(f"  ... and {len(bigger) - 4} larger still")
    return "\n".join(lines)


def recommend(
    catalog: Catalog | None = None,
    hardware: Hardware | None = None,
    *,
    bandwidth: float | None = None,
    min_tokens_per_s: float = 8.0,
    min_ctx: int = 4096,
    tags: tuple[str, ...] | list[str] | None = ("chat",),
    cache: bool = True,
    refresh: bool = False,
) -> Recommendation:
    """The best catalog model and quantization for ``hardware`` (detected when None).

    ``bandwidth`` is the CPU memory bandwidth in GB/s; when None, this machine's cached
    measurement (``cache``), measured first when there is none or ``refresh`` is set.
    ``tags``: only models with at least one of them; None or empty for all.
    """
    catalog = catalog if catalog is not None else load_catalog()
    hw = hardware if hardware is not None else detect_hardware()
    m = _machine(hw, bandwidth, cache=cache, refresh=refresh)
    wanted = set(tags or ())
    models = [mod for mod in catalog if not wanted or wanted & set(mod.tags)]
    cands = [
        judge(m, mod, q, min_ctx, min_tokens_per_s) for mod in models for q in mod.quants.values()
    ]
    good = [c for c in cands if c.fits and c.interactive]
    ranked = _best_per_model(good)
    fallback_slow = False
    choice: Candidate | None = ranked[0] if ranked else None
    runners_up = ranked[1 : 1 + MAX_RUNNERS_UP]
    if choice is None:
        fitting = [c for c in cands if c.fits]
        if fitting:
            choice = max(fitting, key=lambda c: (c.est_tokens_per_s, c.score, -c.size))
            fallback_slow = True
    rejected = [c for c in cands if not (c.fits and c.interactive)]
    if fallback_slow and choice is not None:
        rejected = [c for c in rejected if c is not choice]
    return Recommendation(
        choice=choice,
        runners_up=runners_up,
        rejected=rejected,
        hardware=_hardware_summary(m),
        explanation=_explain(m, choice, cands, min_tokens_per_s, fallback_slow,
                             runners_up[0] if runners_up else None),
        min_tokens_per_s=min_tokens_per_s,
        min_ctx=min_ctx,
        candidates=cands,
        margin=None if fallback_slow else _margin(choice, runners_up[0] if runners_up else None),
    )
