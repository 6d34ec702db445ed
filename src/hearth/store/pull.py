"""Pull GGUF files from Hugging Face into its own cache, resumably and verified.

Everything about the hub goes through ``huggingface_hub``: the endpoint
(``HF_ENDPOINT``), the token (``HF_TOKEN`` or ``hf auth login``), offline mode
(``HF_HUB_OFFLINE``), the repo listing, file metadata, the HTTP transfer with its
retries, and the cache layout (``HF_HUB_CACHE``/``HF_HOME``), so a file pulled by
hearth is a normal cache entry that ``hf cache`` and other tools see, and a file
already in the cache is not downloaded again.

hearth adds what a model runtime needs on top:
- resume across runs: the partial transfer is kept as ``blobs/<etag>.incomplete``
  (huggingface_hub 2.x drops partial files when a process dies) and continued
  with a ranged request next time;
- a free-disk check before the first byte;
- sha256 verification against the catalog or the hub's published LFS hash, and a
  GGUF header check, before the file is moved into place; a bad file is removed;
- split GGUFs (``-00001-of-0000N``) pulled whole.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from ..errors import ChecksumMismatch, DiskFull, DownloadError, InvalidModel, ModelNotFound
from .catalog import is_quant_tag

log = logging.getLogger("hearth.store")

HF_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "huggingface.co/", "hf.co/")
SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.I)
DEFAULT_QUANTS = ("Q4_K_M", "Q4_K_S", "Q4_0", "Q5_K_M", "Q6_K", "Q8_0")
DISK_MARGIN = 256 * 1024 * 1024  # keep this much free after a pull

# progress(filename, done_bytes, total_bytes)
Progress = Callable[[str, int, int], None]


class StderrProgress:
    """A download progress line on stderr: redrawn in place on a terminal, every 10%
    as its own line otherwise (logs, CI). HF_HUB_DISABLE_PROGRESS_BARS=1 silences it."""

    def __init__(self) -> None:
        import time

        self.tty = sys.stderr.isatty()
        self.off = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in ("1", "true", "yes", "on")
        self.last: dict[str, int] = {}
        self.t0: dict[str, float] = {}
        self.clock = time.monotonic

    def __call__(self, name: str, done: int, total: int) -> None:
        if self.off:
            return
        now = self.clock()
        t0 = self.t0.setdefault(name, now)
        pct = int(done * 100 / total) if total else 0
        step = pct if self.tty else pct // 10 * 10
        if self.last.get(name) == step and done != total:
            return
        self.last[name] = step
        rate = done / max(now - t0, 1e-3) / 1e6
        line = f"{os.path.basename(name)}  {pct:3d}%  {done / 1e6:.0f}/{total / 1e6:.0f} MB  {rate:.0f} MB/s"
        if self.tty:
            end = "\n" if done >= total else ""
            sys.stderr.write(f"\r{line}\033[K{end}")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in {"1", "true", "yes", "on"}


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_offline() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> Path:
    """huggingface_hub's cache, read from the environment now (its constants are read at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.environ["HF_HUB_CACHE"])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def parse_hf_ref(ref: str) -> tuple[str, str | None] | None:
    """``hf.co/ORG/REPO[:QUANT]`` -> (``ORG/REPO``, quant or None); None if not such a ref."""
    text = ref.strip()
    low = text.lower()
    for p in HF_PREFIXES:
        if low.startswith(p):
            rest = text[len(p):].strip("/")
            break
    else:
        return None
    repo, _, tag = rest.partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ModelNotFound(f"{ref!r}: expected hf.co/ORG/REPO[:QUANT]")
    if tag.lower() == "latest":
        tag = ""
    return repo, (tag or None)


@dataclass(frozen=True)
class HubFile:
    name: str  # path in the repo
    size: int | None
    sha256: str | None  # the LFS object id: the sha256 of the content


@dataclass(frozen=True)
class HubChoice:
    repo: str
    quant: str
    files: tuple[HubFile, ...]  # split parts in order

    @property
    def size(self) -> int:
        return sum(f.size or 0 for f in self.files)


def quant_of_filename(name: str) -> str | None:
    stem = SPLIT_RE.sub("", Path(name).name)
    stem = re.sub(r"\.gguf$", "", stem, flags=re.I)
    for tok in reversed(re.split(r"[-.]", stem)):
        if is_quant_tag(tok):
            return tok.upper()
    m = re.search(r"_((?:I?Q\d(?:_[0-9A-Z]+)*|F16|BF16|F32))$", stem, re.I)
    return m.group(1).upper() if m else None


def group_ggufs(files: list[HubFile]) -> dict[str, list[HubFile]]:
    """Model GGUFs in a repo by quantization (vision projectors left out, split parts in order)."""
    groups: dict[str, list[HubFile]] = {}
    for f in files:
        base = Path(f.name).name.lower()
        if not base.endswith(".gguf") or "mmproj" in base:
            continue
        q = quant_of_filename(f.name) or Path(f.name).stem
        groups.setdefault(q.upper(), []).append(f)
    for q, fs in groups.items():
        fs.sort(key=lambda f: (f.name.count("/"), f.name))
        parts = [f for f in fs if SPLIT_RE.search(f.name)]
        if parts:
            # one split set: keep the set that the first part belongs to
            prefix = SPLIT_RE.sub("", parts[0].name)
            groups[q] = sorted((f for f in parts if SPLIT_RE.sub("", f.name) == prefix), key=lambda f: f.name)
        else:
            groups[q] = fs[:1]  # the same quant in several folders: the shallowest
    return groups


def choose_quant(repo: str, files: list[HubFile], tag: str | None) -> HubChoice:
    groups = group_ggufs(files)
    if not groups:
        raise ModelNotFound(f"hf.co/{repo} has no GGUF files")
    if tag is not None:
        key = tag.upper()
        if key not in groups:
            raise ModelNotFound(
                f"hf.co/{repo} has no {tag} GGUF; available: {', '.join(sorted(groups))}"
            )
    else:
        key = next((q for q in DEFAULT_QUANTS if q in groups), None)
        if key is None:
            if len(groups) == 1:
                key = next(iter(groups))
            else:
                raise ModelNotFound(
                    f"hf.co/{repo}: name a quantization, e.g. hf.co/{repo}:{sorted(groups)[0]}; "
                    f"available: {', '.join(sorted(groups))}"
                )
    return HubChoice(repo, key, tuple(groups[key]))


# ----------------------------------------------------------------------------- hub calls

class NotFoundOnHub(DownloadError, ModelNotFound):
    """The hub has no such repo, revision or file: a user's naming mistake (404, exit 2)."""

    http_status = 404
    exit_code = 2
    code = "model_not_found"


def _hub_error(e: BaseException, what: str) -> DownloadError:
    """One line for what went wrong talking to the hub."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, OfflineModeIsEnabled):
        return DownloadError(f"{what}: offline mode (HF_HUB_OFFLINE) is on and it is not downloaded")
    if isinstance(e, GatedRepoError):
        return DownloadError(f"{what}: the repository is gated; accept its terms on the hub and set HF_TOKEN")
    status = getattr(getattr(e, "response", None), "status_code", None)
    hint = "" if os.environ.get("HF_TOKEN") else " (set HF_TOKEN if it is private)"
    if status in (401, 403):
        return DownloadError(f"{what}: the hub refused access (HTTP {status}){hint}")
    if status == 404 or isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError)):
        return NotFoundOnHub(f"{what}: not found on {hub_endpoint()}{hint}")
    if isinstance(e, HfHubHTTPError):
        return DownloadError(f"{what}: the hub answered HTTP {status}")
    try:  # the HTTP library huggingface_hub uses: httpx2 in 2.x, httpx before
        import httpx2 as http
    except ImportError:  # pragma: no cover
        import httpx as http

    if isinstance(e, (http.ConnectError, http.TimeoutException, ConnectionError)):
        return DownloadError(
            f"{what}: cannot reach {hub_endpoint()} ({type(e).__name__}); check the network, "
            "or set HF_HUB_OFFLINE=1 to use only downloaded models"
        )
    if isinstance(e, http.HTTPError):
        return DownloadError(f"{what}: transfer failed ({type(e).__name__}: {e})")
    return DownloadError(f"{what}: {type(e).__name__}: {e}")


def _offline_guard(what: str) -> None:
    if hub_offline():
        raise DownloadError(f"{what}: offline mode (HF_HUB_OFFLINE) is on and it is not downloaded")


def list_repo_ggufs(repo: str, revision: str = "main") -> list[HubFile]:
    """GGUF files of a repo with their sizes and published sha256."""
    _offline_guard(f"hf.co/{repo}")
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=hub_endpoint()).model_info(repo, revision=revision, files_metadata=True)
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one line
        raise _hub_error(e, f"hf.co/{repo}") from None
    out = []
    for s in info.siblings or []:
        if s.rfilename.lower().endswith(".gguf"):
            sha = s.lfs.sha256 if s.lfs else None
            out.append(HubFile(s.rfilename, s.size if s.size is not None else (s.lfs.size if s.lfs else None), sha))
    return out


def cached_ggufs(repo: str, revision: str = "main") -> list[HubFile]:
    """GGUF files of a repo that are already in the local cache (offline listing)."""
    folder = hub_cache_dir() / f"models--{repo.replace('/', '--')}"
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snap = folder / "snapshots" / commit
    if not snap.is_dir():
        return []
    return [
        HubFile(str(p.relative_to(snap)), p.stat().st_size, None)
        for p in sorted(snap.rglob("*.gguf"))
        if p.exists()
    ]


# ----------------------------------------------------------------------------- transfer

@dataclass(frozen=True)
class Pulled:
    """One file in the cache: where it is and whether this pull downloaded it."""

    name: str
    path: Path  # the snapshot path (a link into blobs/)
    size: int
    sha256: str | None
    downloaded: bool


def _sha256(path: Path) -> str:
    return _hash_file(path).hexdigest()


def _hash_file(path: Path) -> Any:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h


class _HashingWriter:
    """The partial file, hashed as it is written, so the check needs no second read.

    If the transfer rewinds (a server that ignores Range makes http_get start over),
    the running hash is void and the file is hashed whole at the end instead."""

    def __init__(self, f: Any, h: Any) -> None:
        self.f, self.h, self.void = f, h, False

    def write(self, data: bytes) -> int:
        self.h.update(data)
        return self.f.write(data)

    def seek(self, *a: Any) -> int:
        self.void = True
        return self.f.seek(*a)

    def truncate(self, *a: Any) -> int:
        self.void = True
        return self.f.truncate(*a)

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        self.f.flush()

    def hexdigest(self) -> str | None:
        return None if self.void else self.h.hexdigest()


def _free_bytes(path: Path) -> int:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _progress_class(report: Progress, name: str):
    """A tqdm class that reports to ``report`` instead of drawing."""
    from tqdm.auto import tqdm

    class _Report(tqdm):  # type: ignore[misc]
        def __init__(self, *a, **kw):
            kw["disable"] = True
            self._done = int(kw.get("initial") or 0)
            self._total = int(kw.get("total") or 0)
            super().__init__(*a, **kw)

        def update(self, n=1):  # noqa: D401
            self._done += int(n or 0)
            report(name, self._done, self._total)

    return _Report


def _verify(path: Path, want: str | None, name: str, got: str | None = None) -> str | None:
    if not want:
        return None
    got = got or _sha256(path)
    if got != want.lower():
        path.unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"{name}: sha256 mismatch (expected {want[:12]}…, got {got[:12]}…); "
            "the file was removed, pull again"
        )
    return got


def pull_file(
    repo: str,
    file: HubFile,
    *,
    revision: str = "main",
    expected_sha256: str | None = None,
    progress: Progress | None = None,
) -> Pulled:
    """Bring one repo file into the cache (or find it there); verified, resumable."""
    from huggingface_hub import hf_hub_download, hf_hub_url
    from huggingface_hub.file_download import get_hf_file_metadata

    what = f"hf.co/{repo}/{file.name}"
    cache = hub_cache_dir()
    if hub_offline():
        found = _from_cache(repo, file.name, revision, cache)
        if found is None:
            raise DownloadError(f"{what}: offline mode (HF_HUB_OFFLINE) is on and it is not downloaded")
        return Pulled(file.name, found, found.stat().st_size, None, False)
    endpoint = hub_endpoint()
    url = hf_hub_url(repo, file.name, revision=revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, endpoint=endpoint)
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, what) from None
    if not meta.commit_hash or not meta.etag:
        raise DownloadError(f"{what}: {endpoint} does not answer like a Hugging Face hub")
    etag = meta.etag
    size = meta.size if meta.size is not None else file.size
    # the content hash: the catalog's, else the hub's LFS id (which is the etag of LFS files)
    want = expected_sha256 or file.sha256 or (etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None)
    folder = cache / f"models--{repo.replace('/', '--')}"
    pointer = folder / "snapshots" / meta.commit_hash / file.name
    blob = folder / "blobs" / etag
    if pointer.exists():
        return Pulled(file.name, pointer, pointer.stat().st_size, want, False)

    downloaded = False
    # one writer per blob, across threads and processes: a second pull of the same file
    # waits here, then finds the verified blob in place (the partial file is never shared)
    lock_path = cache / ".locks" / folder.name / f"{etag}.hearth-pull.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock_path):
        if not blob.exists():
            downloaded = _download_blob(what, url, meta, file, blob, etag, size, want, cache, progress)
    # let huggingface_hub make the snapshot link and the ref, as it does for its own downloads
    try:
        path = Path(hf_hub_download(repo, file.name, revision=revision, cache_dir=cache, endpoint=endpoint))
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, what) from None
    return Pulled(file.name, path, path.stat().st_size, want, downloaded)


def _download_blob(what: str, url: str, meta: Any, file: HubFile, blob: Path, etag: str,
                   size: int | None, want: str | None, cache: Path, progress: Progress | None) -> bool:
    """Transfer one blob into ``blobs/<etag>`` (resuming ``<etag>.incomplete``), verified
    before it is moved into place. The caller holds the blob's lock."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    partial = blob.with_name(etag + ".incomplete")
    blob.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if size is not None and have > size:
        partial.unlink()
        have = 0
    if size is not None:
        need = size - have + DISK_MARGIN
        free = _free_bytes(blob.parent)
        if free < need:
            raise DiskFull(
                f"{what}: needs {(size - have) / 1e9:.2f} GB more disk in {cache} "
                f"but only {free / 1e9:.2f} GB is free"
            )
    if have:
        log.info("resuming %s at %d of %s bytes", file.name, have, size)
    headers = build_hf_headers()
    headers["Accept-Encoding"] = "identity"
    target = meta.location or url
    if not _same_host(url, target):
        headers.pop("authorization", None)
    tqdm_class = _progress_class(progress, file.name) if progress else None
    try:
        # the bytes kept from an earlier run are hashed once, the rest as they arrive
        h = _hash_file(partial) if have else hashlib.sha256()
        with open(partial, "ab") as f:
            out = _HashingWriter(f, h)
            http_get(target, out, resume_size=have, headers=headers, expected_size=size,
                     displayed_filename=Path(file.name).name, tqdm_class=tqdm_class)
    except OSError as e:
        import errno

        if e.errno == errno.ENOSPC:
            raise DiskFull(f"{what}: the disk filled up during the transfer; free space and pull again to resume") from None
        got = partial.stat().st_size if partial.exists() else 0
        raise DownloadError(
            f"{what}: the transfer stopped at {got} of {size} bytes ({_short(e)}); "
            "pull again to resume"
        ) from None
    except Exception as e:  # noqa: BLE001
        got = partial.stat().st_size if partial.exists() else 0
        err = _hub_error(e, what)
        raise type(err)(f"{err}; {got} of {size} bytes kept, pull again to resume") from None
    _verify(partial, want, what, out.hexdigest())
    _check_gguf_header(partial, what)
    os.replace(partial, blob)
    return True


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _same_host(a: str, b: str) -> bool:
    from urllib.parse import urlparse

    return urlparse(a).netloc == urlparse(b).netloc


def _check_gguf_header(path: Path, what: str) -> None:
    from ..gguf import read_gguf

    try:
        read_gguf(path)
    except InvalidModel as e:
        path.unlink(missing_ok=True)
        raise InvalidModel(f"{what}: the download is not a valid GGUF ({e}); it was removed") from None


def _from_cache(repo: str, filename: str, revision: str, cache: Path) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    p = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision)
    return Path(p) if isinstance(p, str) and os.path.exists(p) else None
