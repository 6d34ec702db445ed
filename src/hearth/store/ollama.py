"""Read a user's Ollama model store in place: manifests -> GGUF blobs, nothing copied.

Layout (as Ollama writes it): ``<root>/manifests/<host>/<namespace>/<model>/<tag>``
are JSON manifests whose layers point at ``<root>/blobs/sha256-<hex>``. The model
layer is the GGUF file itself; template, system and license layers are text; params
is a JSON object. Only the first 4 bytes of a model blob are ever read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidModel

log = logging.getLogger("hearth.store")

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_MT = "application/vnd.ollama.image."
MODEL, TEMPLATE, PROMPT, SYSTEM, PARAMS, LICENSE, PROJECTOR, ADAPTER = (
    _MT + s
    for s in ("model", "template", "prompt", "system", "params", "license", "projector", "adapter")
)
_DIGEST = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")
_TEXT_LIMIT = 16 * 1024 * 1024  # a template, system prompt or license is never this big
# Ollama's name part rules (types/model/name.go): first char alnum or "_".
_PART = {
    "host": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}$"),
    "namespace": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,79}$"),
    "model": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$"),
    "tag": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$"),
}


def ollama_models_dir() -> Path | None:
    """``$OLLAMA_MODELS`` (expanded) else ``~/.ollama/models``; None if it does not exist."""
    env = os.environ.get("OLLAMA_MODELS", "").strip().strip("\"'")  # as Ollama's envconfig.Var
    if env:
        path = Path(os.path.expandvars(env)).expanduser().absolute()
    else:
        path = Path.home() / ".ollama" / "models"
    return path if path.is_dir() else None


@dataclass(frozen=True)
class OllamaModel:
    """One model in an Ollama store; ``model_path`` is Ollama's own blob (not a copy)."""

    name: str  # Ollama's short display name: "llama3.2:1b", "hf.co/org/repo:Q4_K_M"
    manifest_path: Path
    model_path: Path
    digest: str  # "sha256:<hex>" of the model blob
    size: int  # model blob bytes
    modified: float  # manifest mtime
    template: str | None = None
    system: str | None = None
    params: dict = field(default_factory=dict)
    license: str | None = None
    has_projector: bool = False
    adapters: tuple[Path, ...] = ()


@dataclass
class OllamaScan:
    models: list[OllamaModel] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class _Broken(Exception):
    """One manifest is unusable; the message is the reason."""


def display_name(host: str, namespace: str, model: str, tag: str) -> str:
    """Ollama's ``DisplayShortest``: drop the default host (and library namespace)."""
    if host.lower() != DEFAULT_HOST:
        return f"{host}/{namespace}/{model}:{tag}"
    if namespace.lower() != DEFAULT_NAMESPACE:
        return f"{namespace}/{model}:{tag}"
    return f"{model}:{tag}"


def parse_name(text: str) -> tuple[str, str, str, str] | None:
    """(host, namespace, model, tag) as Ollama's ``ParseName`` fills defaults; None if invalid."""
    s = text.strip()
    tag = DEFAULT_TAG
    if s.rfind(":") > s.rfind("/"):
        s, tag = s.rsplit(":", 1)  # a ":" promises a tag: "llama3.2:" is invalid
    parts = s.rsplit("/", 2)
    host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
    if len(parts) == 3:
        host, namespace, model = parts
        host = host.split("://", 1)[-1]  # "https://hf.co/..." -> "hf.co"
    elif len(parts) == 2:
        namespace, model = parts
    else:
        model = parts[0]
    name = (host, namespace, model, tag)
    return name if _valid(name) else None


def _valid(parts: tuple[str, ...]) -> bool:
    return all(_PART[k].fullmatch(v) for k, v in zip(("host", "namespace", "model", "tag"), parts))


def _manifest_files(root: Path) -> list[tuple[tuple[str, str, str, str], Path]]:
    """Every ``manifests/*/*/*/*`` that is not a directory (as Ollama's glob), dotfiles skipped."""
    base = root / "manifests"
    found = []
    for path in sorted(base.glob("*/*/*/*")):
        if path.name.startswith(".") or path.is_dir():
            continue
        found.append((tuple(path.relative_to(base).parts), path))  # type: ignore[arg-type]
    return found


def _blob(root: Path, layer: dict) -> tuple[str, Path]:
    digest = layer.get("digest")
    m = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if m is None:
        raise _Broken(f"bad layer digest {digest!r}")
    return f"sha256:{m.group(1).lower()}", root / "blobs" / f"sha256-{m.group(1)}"


def _read_text(path: Path, what: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(_TEXT_LIMIT + 1)
    except OSError as e:
        raise _Broken(f"cannot read {what} blob {path.name}: {e.strerror or e}") from None
    if len(data) > _TEXT_LIMIT:
        raise _Broken(f"{what} blob {path.name} is implausibly large")
    return data.decode("utf-8", errors="replace")


def _load(root: Path, parts: tuple[str, str, str, str], path: Path) -> OllamaModel:
    """Build one OllamaModel from a manifest; raises _Broken with a one-line reason."""
    try:
        st = path.stat()
        manifest = json.loads(path.read_bytes())
    except OSError as e:
        raise _Broken(f"cannot read manifest: {e.strerror or e}") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise _Broken(f"manifest is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise _Broken("manifest is not a JSON object")
    layers = manifest.get("layers") or []
    if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise _Broken("manifest's layers are not a list of objects")

    model: tuple[str, Path, Any] | None = None
    texts: dict[str, list[str]] = {}
    params: dict = {}
    projector = False
    adapters: list[Path] = []
    for layer in layers:
        kind = layer.get("mediaType")
        if kind not in (MODEL, TEMPLATE, PROMPT, SYSTEM, PARAMS, LICENSE, PROJECTOR, ADAPTER):
            continue  # config-like or unknown layers (messages, embed, tensor, ...) are not needed
        digest, blob = _blob(root, layer)
        if kind == MODEL:
            model = (digest, blob, layer.get("size"))  # the last one wins, as in Ollama
        elif kind == PARAMS:
            try:
                params = json.loads(_read_text(blob, "params"))
            except ValueError:
                raise _Broken(f"params blob {blob.name} is not valid JSON") from None
            if not isinstance(params, dict):
                raise _Broken(f"params blob {blob.name} is not a JSON object")
        elif kind in (PROJECTOR, ADAPTER):
            if not blob.is_file():
                raise _Broken(f"{kind.rsplit('.', 1)[1]} blob {blob.name} is missing")
            projector = projector or kind == PROJECTOR
            if kind == ADAPTER:
                adapters.append(blob)
        else:
            key = TEMPLATE if kind == PROMPT else kind
            texts.setdefault(key, []).append(_read_text(blob, key.rsplit(".", 1)[1]))
    if model is None:
        raise _Broken("manifest has no GGUF model layer (cloud or non-GGUF model?)")

    digest, blob, declared = model
    try:
        size = blob.stat().st_size
        with open(blob, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise _Broken(f"model blob {blob.name} is missing") from None
    except OSError as e:
        raise _Broken(f"cannot read model blob {blob.name}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise _Broken(f"model blob {blob.name} is not a GGUF file (magic {magic!r})")
    if isinstance(declared, int) and declared > 0 and declared != size:
        raise _Broken(
            f"model blob {blob.name} has {size} bytes, the manifest says {declared} (incomplete?)"
        )

    def text(kind: str) -> str | None:
        return texts[kind][-1] if kind in texts else None

    return OllamaModel(
        name=display_name(*parts),
        manifest_path=path,
        model_path=blob,
        digest=digest,
        size=size,
        modified=st.st_mtime,
        template=text(TEMPLATE),
        system=text(SYSTEM),
        params=params,
        license="\n\n".join(texts[LICENSE]) if LICENSE in texts else None,
        has_projector=projector,
        adapters=tuple(adapters),
    )


def _problem(problems: list[str], parts: tuple[str, ...] | None, path: Path, reason: str) -> None:
    line = f"{display_name(*parts)}: {reason} ({path})" if parts else f"{path}: {reason}"
    line = " ".join(line.splitlines())  # always one line
    problems.append(line)
    log.warning("Ollama store: %s", line)


def scan_ollama(root: Path | None = None) -> OllamaScan:
    """Every usable model in the store, sorted by name; broken manifests go to ``problems``."""
    scan = OllamaScan()
    root = Path(root).expanduser().absolute() if root is not None else ollama_models_dir()
    if root is None:
        return scan
    if not root.is_dir():
        _problem(scan.problems, None, root, "no Ollama store here")
        return scan
    try:
        entries = _manifest_files(root)
    except OSError as e:
        reason = f"cannot list manifests: {e.strerror or e}"
        _problem(scan.problems, None, root / "manifests", reason)
        return scan
    for parts, path in entries:
        if not _valid(parts):
            _problem(scan.problems, None, path, "not a valid Ollama model name")
            continue
        try:
            scan.models.append(_load(root, parts, path))
        except _Broken as e:
            _problem(scan.problems, parts, path, str(e))
    scan.models.sort(key=lambda m: (m.name.lower(), m.name))
    return scan


def find_ollama_model(name: str, root: Path | None = None) -> OllamaModel | None:
    """The model Ollama would pick for ``name`` (``llama3.2`` = ``llama3.2:latest``, any case).

    None when the store or the name is absent; ``InvalidModel`` when the manifest is
    there but broken (so the user learns why, not just "not found").
    """
    wanted = parse_name(name)
    root = Path(root).expanduser().absolute() if root is not None else ollama_models_dir()
    if wanted is None or root is None or not (root / "manifests").is_dir():
        return None
    try:
        entries = _manifest_files(root)
    except OSError:
        return None
    folded = tuple(p.lower() for p in wanted)
    matches = [(p, m) for p, m in entries if tuple(x.lower() for x in p) == folded]
    if not matches:
        return None
    parts, path = next(((p, m) for p, m in matches if p == wanted), matches[0])  # exact case first
    try:
        return _load(root, parts, path)
    except _Broken as e:
        raise InvalidModel(f"Ollama model {display_name(*parts)}: {e}") from None


# Ollama params -> hearth GenerationConfig fields: (kind, valid range).
_FLOATS = {
    "temperature": lambda v: v >= 0,
    "top_p": lambda v: 0 < v <= 1,
    "min_p": lambda v: 0 <= v <= 1,
    "repeat_penalty": lambda v: v > 0,
    "presence_penalty": lambda v: -2 <= v <= 2,
    "frequency_penalty": lambda v: -2 <= v <= 2,
}
_INTS = {
    "top_k": lambda v: v >= 0,
    "repeat_last_n": lambda v: v >= -1,
    "seed": lambda v: True,
}


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():  # JSON numbers may come as 4096.0
        return int(v)
    return None


def _as_float(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _ignored(key: str, value: Any) -> None:
    log.debug("ignoring Ollama parameter %s=%r (wrong type or out of range)", key, value)


def generation_defaults(params: dict) -> dict:
    """Ollama params -> ``GenerationConfig`` keyword defaults; unknown or bad values are dropped."""
    out: dict[str, Any] = {}
    for key, value in (params or {}).items():
        if key in _FLOATS:
            f = _as_float(value)
            if f is None or not _FLOATS[key](f):
                _ignored(key, value)
            else:
                out[key] = f
        elif key in _INTS:
            i = _as_int(value)
            if i is None or not _INTS[key](i):
                _ignored(key, value)
            elif key == "seed" and i < 0:
                continue  # Ollama's -1 = random, which is hearth's default
            else:
                out[key] = i
        elif key == "stop":
            stops = [value] if isinstance(value, str) else value
            if isinstance(stops, list) and all(isinstance(s, str) for s in stops):
                out["stop"] = [s for s in stops if s]
            else:
                _ignored(key, value)
        elif key == "num_predict":
            i = _as_int(value)
            if i in (-1, -2):  # -1: no limit, -2: fill the context
                out["max_tokens"] = None
            elif i is not None and i >= 0:
                out["max_tokens"] = i
            else:
                _ignored(key, value)
    return out


def load_defaults(params: dict) -> dict:
    """Load-time settings from Ollama params: ``{"n_ctx": num_ctx}`` when it is a positive int."""
    n = _as_int((params or {}).get("num_ctx"))
    return {"n_ctx": n} if n is not None and n > 0 else {}


__all__ = [
    "OllamaModel",
    "OllamaScan",
    "display_name",
    "find_ollama_model",
    "generation_defaults",
    "load_defaults",
    "ollama_models_dir",
    "parse_name",
    "scan_ollama",
]
