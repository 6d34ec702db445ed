"""Split a GGUF file the way llama.cpp's ``llama-gguf-split --split`` does (test utility).

Written with ``struct`` only, from hearth.gguf's own reading of the source file:

* part ``i`` (0-based) of ``n`` is ``<stem>-{i+1:05d}-of-{n:05d}.gguf`` (llama_split_path);
* the first part holds every metadata KV of the source (copied byte for byte, so the
  long arrays hearth.gguf does not keep, such as the vocabulary, survive), then
  ``split.no`` (u16) = 0, ``split.count`` (u16) = n, ``split.tensors.count`` (i32);
* a later part holds only those three split KVs, with its own ``split.no``;
* every part holds its own tensor infos (contiguous runs of the source's tensors, in
  the source's order) and their data, each tensor padded to the alignment;
* every part is written as GGUF v3, as ggml's gguf writer does.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from hearth.gguf import DEFAULT_ALIGNMENT, TensorInfo, _Cursor, read_gguf

SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
_UINT16, _INT32 = 2, 5  # gguf_type


def split_path(prefix: Path, no: int, count: int) -> Path:
    """llama.cpp's ``llama_split_path``: ``<prefix>-%05d-of-%05d.gguf``, ``no`` 0-based."""
    return prefix.with_name(f"{prefix.name}-{no + 1:05d}-of-{count:05d}.gguf")


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, vtype: int, value: int) -> bytes:
    fmt = {_UINT16: "<H", _INT32: "<i"}[vtype]
    return _string(key) + struct.pack("<I", vtype) + struct.pack(fmt, value)


def _raw_kvs(buf: mmap.mmap, src: Path) -> list[tuple[str, bytes]]:
    """Every metadata KV of the source as (key, its exact bytes), in file order."""
    c = _Cursor(buf, src)
    c.pos = 16  # magic, version, tensor count
    n_kv = c.u64("metadata count")
    out = []
    for i in range(n_kv):
        start = c.pos
        key = c.string(f"metadata key #{i}")
        c.value(c.u32(f"type of {key!r}"), key)  # walks the value, long arrays included
        out.append((key, bytes(buf[start : c.pos])))
    return out


def _tensor_info(t: TensorInfo, offset: int) -> bytes:
    return (
        _string(t.name)
        + struct.pack("<I", len(t.shape))
        + struct.pack(f"<{len(t.shape)}Q", *t.shape)
        + struct.pack("<IQ", t.ggml_type, offset)
    )


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def split_gguf(src: Path, out_dir: Path, n_parts: int) -> list[Path]:
    """Split ``src`` into ``n_parts`` parts in ``out_dir``; returns their paths in order."""
    src, out_dir = Path(src), Path(out_dir)
    gf = read_gguf(src)
    if not 1 <= n_parts <= len(gf.tensors):
        raise ValueError(f"cannot split {len(gf.tensors)} tensors into {n_parts} parts")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = src.name[:-5] if src.name.endswith(".gguf") else src.name
    n_tensors = len(gf.tensors)
    # contiguous runs of tensors, as even as possible (gguf-split cuts by count or size)
    bounds = [n_tensors * i // n_parts for i in range(n_parts + 1)]
    paths = []
    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        # gguf_set_kv copies all KVs; setting a split key again replaces it (moved last)
        source_kvs = [raw for key, raw in _raw_kvs(buf, src) if key not in SPLIT_KEYS]
        for no in range(n_parts):
            tensors = gf.tensors[bounds[no] : bounds[no + 1]]
            kvs = list(source_kvs) if no == 0 else []
            kvs += [
                _kv("split.no", _UINT16, no),
                _kv("split.count", _UINT16, n_parts),
                _kv("split.tensors.count", _INT32, n_tensors),
            ]
            # a later part has no general.alignment: the reader's default applies there
            alignment = DEFAULT_ALIGNMENT
            if no == 0:
                alignment = gf.get("general.alignment", DEFAULT_ALIGNMENT)
            infos, offset = [], 0
            for t in tensors:
                infos.append(_tensor_info(t, offset))
                offset += _pad(t.n_bytes, alignment)
            head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
            head += b"".join(kvs) + b"".join(infos)
            head += b"\0" * (_pad(len(head), alignment) - len(head))
            path = split_path(out_dir / stem, no, n_parts)
            with open(path, "wb") as out:
                out.write(head)
                for t in tensors:
                    start = gf.data_offset + t.offset
                    out.write(buf[start : start + t.n_bytes])
                    out.write(b"\0" * (_pad(t.n_bytes, alignment) - t.n_bytes))
            paths.append(path)
    return paths
