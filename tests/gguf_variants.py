"""Variants of a real GGUF made at test time: the same tensors, other metadata (a
chat template, recommended sampling, ...), written with the ``gguf`` package the way
its own ``gguf_new_metadata.py`` does."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def with_metadata(src: Path, dst: Path, new: dict[str, Any], remove: tuple[str, ...] = ()) -> Path:
    """Copy ``src`` to ``dst`` with the keys in ``new`` set (type from the Python value:
    bool, int -> INT32, numpy.uint32 -> UINT32, float -> FLOAT32, str) and the keys in
    ``remove`` dropped."""
    import gguf

    def typed(v: Any) -> gguf.GGUFValueType:
        import numpy as np

        if isinstance(v, np.uint32):  # token ids: llama.cpp reads them as UINT32
            return gguf.GGUFValueType.UINT32
        if isinstance(v, bool):
            return gguf.GGUFValueType.BOOL
        if isinstance(v, int):
            return gguf.GGUFValueType.INT32
        if isinstance(v, float):
            return gguf.GGUFValueType.FLOAT32
        if isinstance(v, str):
            return gguf.GGUFValueType.STRING
        raise TypeError(f"no GGUF type for {v!r}")

    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    align = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if align is not None:
        writer.data_alignment = align.contents()
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or field.name in new \
                or field.name in remove:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for key, value in new.items():
        writer.add_key_value(key, int(value) if typed(value) == gguf.GGUFValueType.UINT32 else value, typed(value))
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    return dst
