"""The catalog: well-known instruct models by name, with where to get each quantization.

The data lives in ``catalog.toml`` next to this file. Users (and tests) can add or
override entries with their own TOML files named in ``HEARTH_CATALOG`` (paths joined
by ``os.pathsep``), in the same format.

A reference is ``NAME``, ``NAME:QUANT`` or Ollama's ``NAME-QUANT`` style, e.g.
``qwen2.5:7b``, ``qwen2.5:7b:Q8_0``, ``qwen2.5:7b-q8_0``. The quantization tag is
case-insensitive.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import ConfigError, ModelNotFound

CATALOG_FILE = Path(__file__).with_name("catalog.toml")

# a quantization tag as it appears in names and filenames (Q4_K_M, IQ3_XXS, F16, ...)
QUANT_RE = re.compile(r"(?i)^(?:I?Q\d(?:_[0-9A-Z]+)*|TQ\d_\d|F16|BF16|F32|MXFP4)$")


def is_quant_tag(text: str) -> bool:
    return bool(QUANT_RE.match(text))


@dataclass(frozen=True)
class CatalogQuant:
    """One downloadable quantization of a catalog model."""

    quant: str  # upper case: "Q4_K_M"
    files: tuple[str, ...]  # one file, or every part of a split GGUF in order
    size: int  # bytes, all parts together (as published; the hub's own size is used to pull)
    sha256: tuple[str | None, ...]  # per file, where published

    @property
    def first_file(self) -> str:
        return self.files[0]


@dataclass(frozen=True)
class CatalogModel:
    name: str  # "qwen2.5:7b"
    aliases: tuple[str, ...]
    family: str
    description: str
    parameters: int
    license: str
    context_length: int
    tags: tuple[str, ...]  # "chat", "code", ...
    repo: str  # Hugging Face "org/repo"
    default_quant: str
    quants: dict[str, CatalogQuant]
    # architecture facts for memory estimates before anything is downloaded
    arch: dict[str, int] = field(default_factory=dict)

    def quant(self, tag: str | None) -> CatalogQuant:
        key = (tag or self.default_quant).upper()
        if key not in self.quants:
            raise ModelNotFound(
                f"{self.name} has no quantization {tag!r}; available: {', '.join(self.quants)}"
            )
        return self.quants[key]

    def ref(self, quant: str | None = None) -> str:
        """The canonical name of one of its quantizations: ``qwen2.5:7b-q8_0``."""
        q = (quant or self.default_quant).upper()
        return self.name if q == self.default_quant else f"{self.name}-{q.lower()}"


def _as_tuple(v: Any) -> tuple:
    if v is None:
        return ()
    if isinstance(v, (list, tuple)):
        return tuple(v)
    return (v,)


def _parse_model(d: dict[str, Any], origin: str) -> CatalogModel:
    try:
        name = str(d["name"]).lower()
        quants: dict[str, CatalogQuant] = {}
        for tag, q in d["quants"].items():
            files = _as_tuple(q.get("files") or q.get("file"))
            if not files or not all(isinstance(f, str) and f.endswith(".gguf") for f in files):
                raise ValueError(f"quant {tag}: needs file = \"....gguf\" or files = [...]")
            sha = _as_tuple(q.get("sha256"))
            if sha and len(sha) != len(files):
                raise ValueError(f"quant {tag}: one sha256 per file")
            for s in sha:
                if s is not None and not re.fullmatch(r"[0-9a-f]{64}", s):
                    raise ValueError(f"quant {tag}: sha256 must be 64 lower-case hex digits")
            quants[tag.upper()] = CatalogQuant(
                tag.upper(), files, int(q.get("size", 0)), sha or (None,) * len(files)
            )
        default = str(d.get("default_quant", "Q4_K_M")).upper()
        if default not in quants:
            raise ValueError(f"default_quant {default} is not among its quants")
        arch_keys = ("layers", "embedding", "feed_forward", "heads", "kv_heads", "head_dim",
                     "vocab", "sliding_window", "swa_layers")
        return CatalogModel(
            name=name,
            aliases=tuple(a.lower() for a in _as_tuple(d.get("aliases"))),
            family=str(d.get("family", name.split(":")[0])),
            description=str(d.get("description", "")),
            parameters=int(d.get("parameters", 0)),
            license=str(d.get("license", "unknown")),
            context_length=int(d.get("context_length", 0)),
            tags=tuple(_as_tuple(d.get("tags")) or ("chat",)),
            repo=str(d["repo"]),
            default_quant=default,
            quants=quants,
            arch={k: int(d[k]) for k in arch_keys if k in d},
        )
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        what = d.get("name", "?") if isinstance(d, dict) else "?"
        raise ConfigError(f"{origin}: bad catalog entry {what!r}: {e}") from None


class Catalog:
    def __init__(self, models: list[CatalogModel]) -> None:
        self.models: dict[str, CatalogModel] = {}
        self._alias: dict[str, str] = {}
        for m in models:  # later files override earlier ones
            self.models[m.name] = m
        for m in self.models.values():
            for a in (m.name, *m.aliases):
                self._alias[a] = m.name

    def __iter__(self):
        return iter(self.models.values())

    def __len__(self) -> int:
        return len(self.models)

    def get(self, name: str) -> CatalogModel | None:
        canon = self._alias.get(name.strip().lower())
        return self.models.get(canon) if canon else None

    def lookup(self, ref: str) -> tuple[CatalogModel, CatalogQuant] | None:
        """``NAME``, ``NAME:QUANT`` or ``NAME-QUANT``; None when the name is not in the catalog.

        A known name with an unknown quantization raises ``ModelNotFound`` listing the
        available ones.
        """
        ref = ref.strip()
        m = self.get(ref)
        if m is not None:
            return m, m.quant(None)
        for sep in (":", "-"):
            base, _, tag = ref.rpartition(sep)
            if base and is_quant_tag(tag):
                m = self.get(base)
                if m is not None:
                    return m, m.quant(tag)
        return None

    def suggest(self, ref: str, n: int = 3) -> list[str]:
        base = ref.strip().lower()
        return difflib.get_close_matches(base, sorted(self._alias), n=n, cutoff=0.5)


def _read(path: Path) -> list[CatalogModel]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read catalog {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"catalog {path} is not valid TOML: {e}") from None
    entries = data.get("model", [])
    if not isinstance(entries, list):
        raise ConfigError(f"catalog {path}: expected [[model]] tables")
    return [_parse_model(d, str(path)) for d in entries]


@lru_cache(maxsize=8)
def _load(extra: str) -> Catalog:
    models = _read(CATALOG_FILE)
    for p in filter(None, extra.split(os.pathsep)):
        models += _read(Path(p).expanduser())
    return Catalog(models)


def load_catalog() -> Catalog:
    """The packaged catalog plus any files named in ``HEARTH_CATALOG``."""
    return _load(os.environ.get("HEARTH_CATALOG", ""))
