"""The models hearth pulled: one JSON manifest each, the weights in the HF cache.

A manifest is written only after every file of a model is downloaded, verified and
in place, so a half-downloaded or corrupt model is never listed or run. The
manifest records which files this pull downloaded (``owned``): ``models rm``
deletes those and leaves alone what was already in the cache before.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import DownloadError, ModelNotFound
from . import pull as hub
from .catalog import load_catalog

log = logging.getLogger("hearth.store")


@dataclass
class StoredFile:
    name: str  # path in the repo
    path: str  # snapshot path in the HF cache
    size: int
    sha256: str | None = None
    owned: bool = True  # downloaded by hearth (so `rm` may delete it)


@dataclass
class StoredModel:
    name: str  # canonical: "qwen2.5:7b", "qwen2.5:7b-q8_0", "hf.co/org/repo:Q4_K_M"
    source: str  # "catalog" | "hf"
    repo: str
    quant: str
    files: list[StoredFile]
    revision: str = "main"
    aliases: list[str] = field(default_factory=list)
    pulled_at: float = 0.0
    last_used: float | None = None
    manifest: str = ""  # where this record lives (not saved)

    @property
    def path(self) -> Path:
        return Path(self.files[0].path)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def matches(self, ref: str) -> bool:
        key = ref.strip().lower()
        return key == self.name.lower() or key in (a.lower() for a in self.aliases)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("manifest", None)
        return d


def store_dir() -> Path:
    from ..config import load_config

    return load_config().data_dir() / "manifests"


def _file_name(name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name.lower())
    return safe.strip("._") + ".json"


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(m: StoredModel) -> None:
    path = store_dir() / _file_name(m.name)
    _write_json_atomic(path, m.to_dict())
    m.manifest = str(path)


def _parse(path: Path) -> StoredModel:
    d = json.loads(path.read_text(encoding="utf-8"))
    files = [StoredFile(**f) for f in d.pop("files")]
    m = StoredModel(files=files, **{k: v for k, v in d.items() if k in StoredModel.__dataclass_fields__})
    m.manifest = str(path)
    if not files:
        raise ValueError("no files")
    return m


def stored_models(problems: list[str] | None = None) -> list[StoredModel]:
    """Every complete pulled model. Broken manifests and models whose files are gone are skipped."""
    out = []
    d = store_dir()
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            m = _parse(p)
        except (OSError, ValueError, TypeError, KeyError) as e:
            msg = f"skipping broken manifest {p}: {e}"
            log.warning(msg)
            if problems is not None:
                problems.append(msg)
            continue
        missing = [f.path for f in m.files if not Path(f.path).exists()]
        if missing:
            msg = f"{m.name}: file missing from the Hugging Face cache ({missing[0]}); pull it again"
            log.warning(msg)
            if problems is not None:
                problems.append(msg)
            continue
        out.append(m)
    return out


def find_stored(ref: str) -> StoredModel | None:
    canon = canonical_name(ref)
    for m in stored_models():
        if m.matches(ref) or (canon and m.matches(canon)):
            return m
    return None


def touch(m: StoredModel) -> None:
    """Record a use (for `models list`); never fails a run."""
    try:
        m.last_used = time.time()
        if m.manifest:
            _write_json_atomic(Path(m.manifest), m.to_dict())
    except OSError:
        pass


def canonical_name(ref: str) -> str | None:
    """The name a catalog reference is stored under (``qwen2.5:7b:Q4_K_M`` -> ``qwen2.5:7b``)."""
    try:
        hit = load_catalog().lookup(ref)
    except ModelNotFound:
        return None
    if hit is None:
        return None
    model, quant = hit
    return catalog_ref(model, quant.quant)


def catalog_ref(model: Any, quant: str) -> str:
    """A catalog model's stored name; never one an embedded model answers to."""
    from .embedded import KNOWN_MODELS

    name = model.ref(quant)
    return f"{model.name}-{quant.lower()}" if name in KNOWN_MODELS else name


# ----------------------------------------------------------------------------- pull

Announce = Callable[[str], None]


def pull(
    ref: str,
    *,
    progress: hub.Progress | None = None,
    announce: Announce | None = None,
) -> StoredModel:
    """Pull a catalog name (``qwen2.5:7b``, ``qwen2.5:7b:Q8_0``) or ``hf.co/ORG/REPO[:QUANT]``.

    Returns the stored model; a model already pulled is returned as it is.
    """
    say = announce or (lambda s: None)
    hf = hub.parse_hf_ref(ref)
    if hf is not None:
        repo, tag = hf
        existing = find_stored(ref)
        if existing is not None:
            return existing
        if hub.hub_offline():
            try:  # only what the cache holds can be chosen
                choice = hub.choose_quant(repo, hub.cached_ggufs(repo), tag)
            except ModelNotFound:
                raise DownloadError(f"{ref}: offline mode (HF_HUB_OFFLINE) is on and it is not downloaded") from None
        else:
            choice = hub.choose_quant(repo, hub.list_repo_ggufs(repo), tag)
        name = f"hf.co/{repo}:{choice.quant}"
        existing = find_stored(name)
        if existing is not None:
            _add_alias(existing, ref)
            return existing
        say(f"pulling {name} ({_gb(choice.size)}) from {hub.hub_endpoint()}/{repo}")
        return _pull_files(name, "hf", repo, choice.quant, list(choice.files), [None] * len(choice.files),
                           aliases=[ref] if ref.lower() != name.lower() else [], progress=progress)
    hit = load_catalog().lookup(ref)
    if hit is None:
        raise ModelNotFound(unknown_message(ref))
    model, quant = hit
    name = catalog_ref(model, quant.quant)
    existing = find_stored(name)
    if existing is not None:
        return existing
    say(f"pulling {name} ({quant.quant}, {_gb(quant.size)}) from {hub.hub_endpoint()}/{model.repo}")
    files = [hub.HubFile(f, None, s) for f, s in zip(quant.files, quant.sha256)]
    return _pull_files(name, "catalog", model.repo, quant.quant, files, list(quant.sha256), progress=progress)


def _add_alias(m: StoredModel, ref: str) -> None:
    if not m.matches(ref):
        m.aliases.append(ref)
        try:
            save(m)
        except OSError:
            pass


def _pull_files(
    name: str,
    source: str,
    repo: str,
    quant: str,
    files: list[hub.HubFile],
    shas: list[str | None],
    *,
    aliases: list[str] | None = None,
    progress: hub.Progress | None = None,
) -> StoredModel:
    got = [hub.pull_file(repo, f, expected_sha256=s, progress=progress) for f, s in zip(files, shas)]
    m = StoredModel(
        name=name,
        source=source,
        repo=repo,
        quant=quant,
        files=[StoredFile(g.name, str(g.path), g.size, g.sha256, g.downloaded) for g in got],
        aliases=list(aliases or []),
        pulled_at=time.time(),
    )
    from ..gguf import inspect_model

    inspect_model(m.path)  # the whole model (every split part) reads as a GGUF
    save(m)
    return m


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB" if n else "size unknown"


def unknown_message(ref: str) -> str:
    cat = load_catalog()
    close = cat.suggest(ref)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `hearth models list --catalog`"
    return f"unknown model {ref!r}{hint}"


# ----------------------------------------------------------------------------- remove

def remove(m: StoredModel) -> tuple[list[str], list[str]]:
    """Delete a pulled model's manifest and the files it downloaded.

    Returns (deleted paths, kept paths). A blob still used by another model or by
    another snapshot in the cache is kept.
    """
    others = [o for o in stored_models() if o.manifest != m.manifest]
    in_use = {os.path.realpath(f.path) for o in others for f in o.files}
    deleted, kept = [], []
    Path(m.manifest).unlink(missing_ok=True)  # first: a model is never listed half-removed
    for f in m.files:
        pointer = Path(f.path)
        blob = Path(os.path.realpath(pointer))
        if not f.owned or str(blob) in in_use:
            kept.append(str(pointer))
            continue
        snapshots = pointer
        while snapshots.name != "snapshots" and snapshots != snapshots.parent:
            snapshots = snapshots.parent
        pointer.unlink(missing_ok=True)
        still_linked = snapshots.is_dir() and any(
            p.is_symlink() and os.path.realpath(p) == str(blob) for p in snapshots.rglob("*")
        )
        if blob != pointer and not still_linked:
            blob.unlink(missing_ok=True)
        deleted.append(str(pointer))
    return deleted, kept
