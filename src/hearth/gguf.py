"""Read and validate a GGUF file's header, metadata and tensor table, never its weights.

A small reader of our own rather than ``gguf.GGUFReader``: it reads only what the
planner needs, bounds-checks every length against the file size, and turns every
malformed byte into one ``InvalidModel`` line, so a corrupt or truncated file is
refused before llama.cpp opens it. It needs no numpy, so ``hearth info`` starts fast.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import stat
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidModel, ModelNotFound, UnsupportedFormat
from .types import GiB, MappingView

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_KEY_LEN = 65_536
MAX_STRING_LEN = 256 * 1024 * 1024  # a chat template or merges entry is never this big
MAX_ARRAY_KEEP = 64  # arrays longer than this are skipped, only their length is kept

# ggml_type -> (name, block size, bytes per block), from ggml/src/ggml.c
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
    42: ("Q2_0", 64, 18),
}

# llama_ftype (general.file_type) -> the name llama.cpp's quantizer uses
FILE_TYPES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
    41: "Q2_0",
}

# The ggml tensor type a file type mostly uses, to cross-check general.file_type.
_FTYPE_MAIN_TENSOR = {
    "F32": "F32", "F16": "F16", "BF16": "BF16", "Q4_0": "Q4_0", "Q4_1": "Q4_1",
    "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0", "Q2_K": "Q2_K", "Q2_K_S": "Q2_K",
    "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K",
    "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
    "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_S", "IQ2_M": "IQ2_S",
    "IQ3_XXS": "IQ3_XXS", "IQ3_XS": "IQ3_S", "IQ3_S": "IQ3_S", "IQ3_M": "IQ3_S",
    "IQ1_S": "IQ1_S", "IQ1_M": "IQ1_M", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS",
    "TQ1_0": "TQ1_0", "TQ2_0": "TQ2_0", "MXFP4_MOE": "MXFP4", "NVFP4": "NVFP4",
    "Q1_0": "Q1_0", "Q2_0": "Q2_0",
}

# Known names first, longest first, so "Q4_K_M" is not cut to "Q4_K" by the lookahead.
_FILENAME_QUANT = re.compile(
    r"(?<![A-Za-z0-9])("
    + "|".join(sorted(map(re.escape, FILE_TYPES.values()), key=len, reverse=True))
    + r"|I?Q[0-9]_[A-Z0-9_]*?|TQ[12]_0|F16|F32|BF16|MXFP4(?:_MOE)?)(?=[.\-_]|$)",
    re.IGNORECASE,
)

# GGUF metadata value types
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY = range(10)
_UINT64, _INT64, _FLOAT64 = 10, 11, 12
_SCALARS: dict[int, struct.Struct] = {
    _UINT8: struct.Struct("<B"),
    _INT8: struct.Struct("<b"),
    _UINT16: struct.Struct("<H"),
    _INT16: struct.Struct("<h"),
    _UINT32: struct.Struct("<I"),
    _INT32: struct.Struct("<i"),
    _FLOAT32: struct.Struct("<f"),
    _BOOL: struct.Struct("<?"),
    _UINT64: struct.Struct("<Q"),
    _INT64: struct.Struct("<q"),
    _FLOAT64: struct.Struct("<d"),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # relative to the start of the data section

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_bytes(self) -> int:
        _, block, size = GGML_TYPES[self.ggml_type]
        return self.n_elements // block * size


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array too long to keep (e.g. the vocabulary): its type and length."""

    item_type: int
    length: int

    def __len__(self) -> int:
        return self.length


@dataclass
class GGUFFile:
    path: Path
    version: int
    file_size: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


@dataclass
class ModelInfo(MappingView):
    """What a GGUF file says about the model, without loading any weights.

    Also a read-only mapping (``info["quantization"]``, ``dict(info)``) of ``to_dict()``,
    which adds the names other libraries use: ``parameter_count``, ``n_layers``,
    ``n_ctx_train``, ``file_size_gb``."""

    path: Path
    file_size: int
    gguf_version: int
    architecture: str
    name: str | None
    parameters: int
    quantization: str
    quantization_source: str  # "file_type", "tensors" or "filename"
    file_type: int | None
    context_length: int
    block_count: int
    embedding_length: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int
    key_length: int
    value_length: int
    vocab_size: int
    sliding_window: int  # 0 = no sliding-window attention
    swa_layers: int  # layers that use the sliding window (their KV cache is small)
    chat_template: str | None
    tensor_types: dict[str, int]  # type name -> number of tensors
    weights_bytes: int
    # bytes of the weights that belong to the repeating blocks, per block (offloadable)
    layer_bytes: list[int] = field(default_factory=list)
    # bytes outside the blocks: token embedding, output head, final norm
    non_layer_bytes: int = 0
    output_bytes: int = 0  # the output head (offloaded with the last layer)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    split_count: int = 1
    # the model maker's recommended sampling (general.sampling.*), as GenerationParams fields
    sampling: dict[str, Any] = field(default_factory=dict)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.weights_bytes / self.parameters if self.parameters else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "file_size": self.file_size,
            "gguf_version": self.gguf_version,
            "architecture": self.architecture,
            "name": self.name,
            "parameters": self.parameters,
            "parameter_count": self.parameters,
            "quantization": self.quantization,
            "quantization_source": self.quantization_source,
            "bits_per_weight": round(self.bits_per_weight, 2),
            "context_length": self.context_length,
            "n_ctx_train": self.context_length,
            "block_count": self.block_count,
            "n_layers": self.block_count,
            "embedding_length": self.embedding_length,
            "feed_forward_length": self.feed_forward_length,
            "head_count": self.head_count,
            "head_count_kv": self.head_count_kv,
            "key_length": self.key_length,
            "value_length": self.value_length,
            "vocab_size": self.vocab_size,
            "sliding_window": self.sliding_window,
            "swa_layers": self.swa_layers,
            "has_chat_template": self.has_chat_template,
            "chat_template": self.chat_template,
            "tensor_types": dict(self.tensor_types),
            "weights_bytes": self.weights_bytes,
            "file_size_gb": round(self.file_size / GiB, 3),
            "split_count": self.split_count,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "sampling": dict(self.sampling),
        }


class _Cursor:
    """Bounds-checked little-endian reads over a buffer."""

    __slots__ = ("buf", "pos", "end", "path")

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.end = len(buf)
        self.path = path

    def fail(self, what: str) -> InvalidModel:
        return InvalidModel(f"{self.path}: not a valid GGUF file: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise self.fail(f"truncated while reading {what} at byte {self.pos}")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str, limit: int = MAX_STRING_LEN) -> str:
        n = self.u64(f"{what} length")
        if n > limit:
            raise self.fail(f"{what} length {n} is absurd")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_string(self, what: str) -> None:
        n = self.u64(f"{what} length")
        self.need(n, what)
        self.pos += n

    def scalar(self, vtype: int, what: str) -> Any:
        s = _SCALARS[vtype]
        self.need(s.size, what)
        (v,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return v

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(vtype, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth > 2:
                raise self.fail(f"{what}: arrays nested too deeply")
            item_type = self.u32(f"{what} item type")
            count = self.u64(f"{what} count")
            if item_type in _SCALARS:
                size = _SCALARS[item_type].size
                if count * size > self.end - self.pos:
                    raise self.fail(f"{what}: array of {count} items runs past the end of the file")
                if count > MAX_ARRAY_KEEP:
                    self.pos += count * size
                    return ArrayInfo(item_type, count)
                return [self.scalar(item_type, what) for _ in range(count)]
            if item_type == _STRING:
                # every string costs at least its 8-byte length
                if count * 8 > self.end - self.pos:
                    raise self.fail(f"{what}: array of {count} strings runs past the end of the file")
                if count > MAX_ARRAY_KEEP:
                    for _ in range(count):
                        self.skip_string(what)
                    return ArrayInfo(item_type, count)
                return [self.string(what) for _ in range(count)]
            if item_type == _ARRAY:
                if count * 12 > self.end - self.pos:
                    raise self.fail(f"{what}: nested array of {count} runs past the end of the file")
                return [self.value(_ARRAY, what, depth + 1) for _ in range(count)]
            raise self.fail(f"{what}: unknown array item type {item_type}")
        raise self.fail(f"{what}: unknown value type {vtype}")


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse and validate a GGUF file's header, metadata and tensor table."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFound(f"{p}: no such file")
    if p.is_dir():
        raise UnsupportedFormat(f"{p} is a directory, not a GGUF file")
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the reader forever
            raise UnsupportedFormat(f"{p} is not a regular file")
        size = st.st_size
        with open(p, "rb") as f:
            if size == 0:
                raise InvalidModel(f"{p}: not a valid GGUF file: the file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(mm, p, size)
    except PermissionError as e:
        raise ModelNotFound(f"{p}: permission denied") from e
    except IsADirectoryError as e:
        raise UnsupportedFormat(f"{p} is a directory, not a GGUF file") from e
    except OSError as e:
        raise InvalidModel(f"{p}: cannot read: {e.strerror or e}") from e


def _parse(buf: Any, path: Path, size: int) -> GGUFFile:
    c = _Cursor(buf, path)
    c.need(4, "magic")
    magic = bytes(buf[0:4])
    if magic != GGUF_MAGIC:
        raise InvalidModel(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    c.pos = 4
    version = c.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise InvalidModel(
            f"{path}: unsupported GGUF version {version} (supported: "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))})"
        )
    n_tensors = c.u64("tensor count")
    n_kv = c.u64("metadata count")
    # The smallest metadata entry is 8 (key len) + 1 (key) + 4 (type) + 1 (u8) bytes;
    # the smallest tensor entry 8 + 1 + 4 + 8 + 4 + 8.
    if n_kv * 14 > size:
        raise c.fail(
            f"metadata count {n_kv} is absurd for a {size}-byte file (truncated or corrupt)"
        )
    if n_tensors * 33 > size:
        raise c.fail(
            f"tensor count {n_tensors} is absurd for a {size}-byte file (truncated or corrupt)"
        )

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}", MAX_KEY_LEN)
        vtype = c.u32(f"type of {key!r}")
        metadata[key] = c.value(vtype, repr(key))

    tensors: list[TensorInfo] = []
    for i in range(n_tensors):
        name = c.string(f"tensor name #{i}", MAX_KEY_LEN)
        n_dims = c.u32(f"dimensions of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        shape = tuple(c.u64(f"shape of tensor {name!r}") for _ in range(n_dims))
        n_el = 1
        for d in shape:
            if d == 0 or d > 1 << 40:
                raise c.fail(f"tensor {name!r} has an absurd shape {shape}")
            n_el *= d
        ttype = c.u32(f"type of tensor {name!r}")
        if ttype not in GGML_TYPES:
            raise InvalidModel(
                f"{path}: tensor {name!r} has unknown type {ttype}; this file needs a newer "
                "llama.cpp than hearth ships"
            )
        block = GGML_TYPES[ttype][1]
        if shape[0] % block:
            raise c.fail(f"tensor {name!r}: row size {shape[0]} is not a multiple of {block}")
        if n_el > size * 8:
            raise c.fail(
                f"tensor {name!r} of shape {shape} cannot fit in a {size}-byte file "
                "(truncated or corrupt)"
            )
        offset = c.u64(f"offset of tensor {name!r}")
        tensors.append(TensorInfo(name, shape, ttype, offset))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise c.fail(f"general.alignment {alignment!r} is not a power of two")
    data_offset = (c.pos + alignment - 1) // alignment * alignment
    data_size = size - data_offset
    seen_names: set[str] = set()
    for t in tensors:
        if t.name in seen_names:
            raise c.fail(f"duplicate tensor name {t.name!r}")
        seen_names.add(t.name)
        if t.offset % alignment:
            raise c.fail(f"tensor {t.name!r} is not aligned to {alignment} bytes")
        if t.offset + t.n_bytes > data_size:
            raise InvalidModel(
                f"{path}: truncated or corrupt GGUF file: tensor {t.name!r} ends at byte "
                f"{data_offset + t.offset + t.n_bytes} but the file has {size} bytes"
            )
    return GGUFFile(path, version, size, metadata, tensors, data_offset)


def _int(meta: dict[str, Any], key: str, default: int = 0) -> int:
    v = meta.get(key, default)
    if isinstance(v, list):  # per-layer arrays (e.g. head_count_kv): use the largest
        v = max((x for x in v if isinstance(x, (int, float))), default=default)
    if isinstance(v, ArrayInfo):
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return default
    if isinstance(v, float) and not math.isfinite(v):  # NaN or inf from a corrupt file
        return default
    return int(v)


def quantization_from_filename(name: str) -> str | None:
    """The quantization tag in a filename such as ``model.Q4_K_M.gguf``, if any."""
    stem = name[:-5] if name.lower().endswith(".gguf") else name
    matches = _FILENAME_QUANT.findall(stem)
    return matches[-1].upper() if matches else None


_BLOCK_SIZE = {name: block for name, block, _ in GGML_TYPES.values()}
# llama.cpp quantizes a row that is not a multiple of 256 (most rows of a small model
# such as SmolLM2, n_embd 576) with a 32-block type instead of the k-/i-quant.
_FALLBACK: dict[str, tuple[str, ...]] = {
    "Q2_K": ("Q4_0", "IQ4_NL"), "Q3_K": ("Q4_0", "IQ4_NL"), "Q4_K": ("Q5_0",),
    "Q5_K": ("Q5_1",), "Q6_K": ("Q8_0",), "TQ1_0": ("Q4_0",), "TQ2_0": ("Q4_0",),
    **{t: ("IQ4_NL", "Q4_0") for t in (
        "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_XS")},
}


def _fell_back(expected: str, type_counts: Counter[str], main_tensor: str | None) -> bool:
    """Whether the main tensors are ``expected``'s fallback type, inside a k-/i-quant
    mix (some other 256-block tensor; Q6_K does not count, as llama.cpp puts the
    output head in Q6_K for every quantization)."""
    return main_tensor in _FALLBACK.get(expected, ()) and any(
        _BLOCK_SIZE.get(t) == 256 and t != "Q6_K" for t in type_counts
    )


def _name_quantization(gf: GGUFFile, type_counts: Counter[str], type_bytes: Counter[str]) -> tuple[str, str, int | None]:
    """(name, source, file_type) for the quantization, cross-checked with the tensors."""
    ftype = gf.get("general.file_type")
    # the type of the biggest 2D weights, ignoring 1D norms and embeddings' F32
    main_tensor = type_bytes.most_common(1)[0][0] if type_bytes else None
    if isinstance(ftype, int) and not isinstance(ftype, bool) and ftype in FILE_TYPES:
        name = FILE_TYPES[ftype]
        expected = _FTYPE_MAIN_TENSOR.get(name)
        if (
            expected is None
            or expected in type_counts
            or main_tensor is None
            or _fell_back(expected, type_counts, main_tensor)
        ):
            return name, "file_type", ftype
        # file_type disagrees with every tensor: trust the tensors
    from_file = quantization_from_filename(gf.path.name)
    if main_tensor is not None:
        expected = _FTYPE_MAIN_TENSOR.get(from_file or "")
        if expected is not None and (
            expected == main_tensor
            or (expected in type_counts and _fell_back(expected, type_counts, main_tensor))
        ):
            return from_file, "filename", None
        return main_tensor, "tensors", None
    if from_file:
        return from_file, "filename", None
    return "unknown", "tensors", None


# llama.cpp's split naming (llama_split_path / llama_split_prefix in src/llama.cpp):
# "<prefix>-%05d-of-%05d.gguf", parts numbered from 1.
_SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>[0-9]{5,})-of-(?P<count>[0-9]{5,})\.gguf$")


def _split_name(no: int, count: int) -> str:
    """The suffix llama.cpp gives part ``no`` (0-based) of ``count``."""
    return f"-{no + 1:05d}-of-{count:05d}.gguf"


def _parse_split_name(path: Path) -> tuple[str, int, int] | None:
    """(prefix, 0-based part number, part count) if ``path`` is named like a part of a
    split model exactly as llama.cpp names them, else None."""
    m = _SPLIT_NAME.match(path.name)
    if not m:
        return None
    no, count = int(m.group("no")), int(m.group("count"))
    if not 1 <= no <= count or path.name != m.group("prefix") + _split_name(no - 1, count):
        return None  # e.g. 000001 (llama.cpp pads to 5 digits, no more) or part 0
    return m.group("prefix"), no - 1, count


def split_parts(path: str | os.PathLike[str]) -> list[Path]:
    """Every part of the split model ``path`` belongs to, in order, by llama.cpp's naming.

    ``name-00002-of-00003.gguf`` -> ``[name-00001-of-00003.gguf, name-00002-of-00003.gguf,
    name-00003-of-00003.gguf]`` (any part gives all of them); any other name -> ``[path]``.
    Works from the name alone: the files need not exist (a downloader can ask first).
    """
    p = Path(path)
    parsed = _parse_split_name(p)
    if parsed is None or parsed[2] == 1:
        return [p]
    prefix, _, count = parsed
    return [p.with_name(prefix + _split_name(i, count)) for i in range(count)]


def _split_key(gf: GGUFFile, key: str) -> int | None:
    """An integer split.* key, None when absent; any other type is refused."""
    if key not in gf.metadata:
        return None
    v = gf.metadata[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise InvalidModel(f"{gf.path}: not a valid GGUF file: {key} is {v!r}, not a count")
    return v


def _read_split(gf: GGUFFile) -> GGUFFile:
    """``gf`` (the file the user gave) joined with the other parts of its split model, as
    llama.cpp finds and checks them; ``gf`` itself when it is not split."""
    count = _split_key(gf, "split.count")
    if count is None or count <= 1:
        return gf
    no = _split_key(gf, "split.no")
    if no is None:  # llama.cpp requires it too
        raise InvalidModel(f"{gf.path}: split model (split.count {count}) without split.no")
    first = gf.path
    if no != 0:
        parsed = _parse_split_name(gf.path)
        hint = ""
        if parsed is not None and parsed[2] == count:
            hint = f": {gf.path.with_name(parsed[0] + _split_name(0, count))}"
        raise InvalidModel(
            f"{gf.path} is part {no + 1} of a {count}-part split model; give its first "
            f"part{hint or ' (the one whose name ends in ' + _split_name(0, count) + ')'}"
        )
    suffix = _split_name(0, count)
    name = first.name
    if not name.endswith(suffix) or len(name) == len(suffix):
        raise InvalidModel(
            f"{first}: the first part of a {count}-part split model must be named "
            f"<name>{suffix} (llama.cpp finds the other parts by that name)"
        )
    prefix = name[: -len(suffix)]
    n_tensors = _split_key(gf, "split.tensors.count")
    if n_tensors is None:
        raise InvalidModel(f"{first}: split model without split.tensors.count")
    tensors = list(gf.tensors)
    names = {t.name for t in tensors}
    total_size = gf.file_size
    for i in range(1, count):
        part = first.with_name(prefix + _split_name(i, count))
        where = f"part {i + 1} of {count} of split model {first.name}"
        if not part.is_file():
            raise InvalidModel(f"{part}: {where} is missing")
        try:
            pf = read_gguf(part)  # an InvalidModel from here names the part already
        except (ModelNotFound, UnsupportedFormat) as e:
            raise InvalidModel(f"{part}: {where} cannot be read: {e}") from e
        part_count = _split_key(pf, "split.count")
        if part_count != count:
            raise InvalidModel(
                f"{part}: {where}, but its split.count is {part_count} "
                f"(the first part says {count})"
            )
        part_no = _split_key(pf, "split.no")
        if part_no != i:
            raise InvalidModel(f"{part}: {where}, but its split.no is {part_no} (expected {i})")
        for t in pf.tensors:
            if t.name in names:
                raise InvalidModel(
                    f"{part}: tensor {t.name!r} of {where} is also in an earlier part"
                )
            names.add(t.name)
        tensors.extend(pf.tensors)
        total_size += pf.file_size
    if len(tensors) != n_tensors:
        raise InvalidModel(
            f"{first}: split model says {n_tensors} tensors (split.tensors.count) but its "
            f"{count} parts hold {len(tensors)}"
        )
    return GGUFFile(gf.path, gf.version, total_size, gf.metadata, tensors, gf.data_offset)


def inspect_model(path: str | os.PathLike[str]) -> ModelInfo:
    """Read a GGUF file's metadata and tensor table into a ``ModelInfo``.

    A split model (``name-00001-of-00003.gguf`` ...) is given by its first part; every
    part is found and validated as llama.cpp would, and the ModelInfo describes the
    whole model (``file_size`` is the sum of the parts).
    """
    gf = _read_split(read_gguf(path))
    meta = gf.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise InvalidModel(f"{gf.path}: GGUF file has no general.architecture")

    def a(key: str, default: int = 0) -> int:
        return _int(meta, f"{arch}.{key}", default)

    block_count = a("block_count")
    # every block has at least one tensor; a corrupt count must not allocate gigabytes
    if not 0 <= block_count <= len(gf.tensors):
        raise InvalidModel(
            f"{gf.path}: {arch}.block_count {block_count} is absurd for a file with "
            f"{len(gf.tensors)} tensors"
        )
    layer_bytes = [0] * block_count
    non_layer = 0
    output = 0
    parameters = 0
    type_counts: Counter[str] = Counter()
    type_bytes: Counter[str] = Counter()
    for t in gf.tensors:
        parameters += t.n_elements
        type_counts[t.type_name] += 1
        if len(t.shape) >= 2:
            type_bytes[t.type_name] += t.n_bytes
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m and int(m.group(1)) < block_count:
            layer_bytes[int(m.group(1))] += t.n_bytes
        else:
            non_layer += t.n_bytes
            if t.name.startswith("output."):
                output += t.n_bytes
    weights = sum(t.n_bytes for t in gf.tensors)

    head_count = a("attention.head_count")
    n_embd = a("embedding_length")
    head_dim = n_embd // head_count if head_count else 0
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if isinstance(tokens, (list, ArrayInfo)) else a("vocab_size")
    sliding = a("attention.sliding_window")
    swa_layers = _swa_layer_count(meta, arch, block_count, sliding)
    quant, qsource, ftype = _name_quantization(gf, type_counts, type_bytes)
    template = meta.get("tokenizer.chat_template")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelInfo(
        path=gf.path,
        file_size=gf.file_size,
        gguf_version=gf.version,
        architecture=arch,
        name=meta.get("general.name") if isinstance(meta.get("general.name"), str) else None,
        parameters=parameters,
        quantization=quant,
        quantization_source=qsource,
        file_type=ftype,
        context_length=a("context_length", 2048),
        block_count=block_count,
        embedding_length=n_embd,
        feed_forward_length=a("feed_forward_length"),
        head_count=head_count,
        head_count_kv=a("attention.head_count_kv", head_count),
        key_length=a("attention.key_length", head_dim),
        value_length=a("attention.value_length", head_dim),
        vocab_size=vocab,
        sliding_window=sliding,
        swa_layers=swa_layers,
        chat_template=template if isinstance(template, str) and template.strip() else None,
        tensor_types=dict(type_counts),
        weights_bytes=weights,
        layer_bytes=layer_bytes,
        non_layer_bytes=non_layer,
        output_bytes=output,
        bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_id=eos if isinstance(eos, int) else None,
        split_count=_int(meta, "split.count", 1) or 1,
        sampling=_sampling_defaults(meta),
    )


# general.sampling.* (llama.cpp's LLM_KV_GENERAL_SAMPLING_*) -> GenerationParams field
_SAMPLING_KEYS = {
    "general.sampling.temp": ("temperature", float),
    "general.sampling.top_k": ("top_k", int),
    "general.sampling.top_p": ("top_p", float),
    "general.sampling.min_p": ("min_p", float),
    "general.sampling.penalty_last_n": ("repeat_last_n", int),
    "general.sampling.penalty_repeat": ("repeat_penalty", float),
}


def _sampling_defaults(meta: dict[str, Any]) -> dict[str, Any]:
    """The recommended sampling a GGUF carries; values of the wrong type are ignored."""
    out: dict[str, Any] = {}
    for key, (name, kind) in _SAMPLING_KEYS.items():
        v = meta.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if kind is int and (not float(v).is_integer()):
            continue
        out[name] = kind(v)
    return out


# Architectures whose sliding-window layers follow a fixed pattern in llama.cpp when
# the file does not say: every Nth layer is global (dense), the rest use the window.
_SWA_DENSE_EVERY = {"gemma3": 6, "gemma2": 2, "cohere2": 4, "gemma3n": 5}


def _swa_layer_count(meta: dict[str, Any], arch: str, n_layer: int, window: int) -> int:
    if window <= 0 or n_layer <= 0:
        return 0
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list) and pattern and all(isinstance(x, bool) for x in pattern):
        return sum(1 for x in pattern[:n_layer] if x)
    if isinstance(pattern, int) and not isinstance(pattern, bool) and pattern > 0:
        every = pattern
    else:
        every = _SWA_DENSE_EVERY.get(arch, 0)
    if every <= 0:
        return n_layer  # every layer uses the window (e.g. mistral-style SWA)
    return sum(1 for il in range(n_layer) if (il + 1) % every != 0)


# Formats we recognise but do not run, and what would run them.
_OTHER_FORMATS = {
    ".safetensors": "a safetensors checkpoint: convert it to GGUF with llama.cpp's "
    "convert_hf_to_gguf.py, or run it with transformers or vLLM",
    ".bin": "a PyTorch checkpoint: convert it to GGUF with llama.cpp's convert_hf_to_gguf.py",
    ".pt": "a PyTorch checkpoint: convert it to GGUF with llama.cpp's convert_hf_to_gguf.py",
    ".pth": "a PyTorch checkpoint: convert it to GGUF with llama.cpp's convert_hf_to_gguf.py",
    ".onnx": "an ONNX model: run it with onnxruntime-genai",
    ".npz": "an MLX/NumPy checkpoint: run it with mlx-lm on Apple silicon",
    ".ggml": "an old GGML file: convert it to GGUF with llama.cpp's convert_llama_ggml_to_gguf.py",
}


def detect_format(path: str | os.PathLike[str]) -> str:
    """'gguf', or raise a clear error naming what would serve this format."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFound(f"{p}: no such file")
    if p.is_dir():
        names = {c.name for c in p.iterdir()} if os.access(p, os.R_OK) else set()
        ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
        if ggufs:
            raise UnsupportedFormat(f"{p} is a directory; name one of its GGUF files, e.g. {p / ggufs[0]}")
        if any(n.endswith(".safetensors") for n in names) and "config.json" in names:
            if "mlx" in " ".join(names).lower() or any(n.endswith(".npz") for n in names):
                raise UnsupportedFormat(f"no engine for {p}: an MLX model; run it with mlx-lm on Apple silicon")
            raise UnsupportedFormat(
                f"no engine for {p}: a Hugging Face safetensors model; convert it to GGUF with "
                "llama.cpp's convert_hf_to_gguf.py, or run it with transformers or vLLM"
            )
        raise UnsupportedFormat(f"{p} is a directory, not a model file")
    try:
        if not stat.S_ISREG(p.stat().st_mode):  # a FIFO or a device would block or never end
            raise UnsupportedFormat(f"{p} is not a regular file")
        with open(p, "rb") as f:
            magic = f.read(4)
    except PermissionError:
        raise ModelNotFound(f"{p}: permission denied") from None
    except OSError as e:
        raise InvalidModel(f"{p}: cannot read: {e.strerror or e}") from None
    if magic == b"GGUF":
        return "gguf"
    hint = _OTHER_FORMATS.get(p.suffix.lower())
    if hint:
        raise UnsupportedFormat(f"no engine for {p.name}: {hint}")
    if p.suffix.lower() == ".gguf":
        return "gguf"  # let the GGUF reader say exactly what is wrong
    raise UnsupportedFormat(
        f"no engine for {p.name}: not a GGUF file (hearth runs GGUF models on llama.cpp)"
    )
