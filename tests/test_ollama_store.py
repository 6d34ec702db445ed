"""Reading an Ollama model store in place.

Every store here is laid out on disk exactly as Ollama lays it out
(``manifests/<host>/<namespace>/<model>/<tag>`` + ``blobs/sha256-<hex>``), with
SmolLM2's real GGUF as the model blob under its real sha256. Nothing is mocked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest

from hearth.errors import InvalidModel
from hearth.gguf import read_gguf
from hearth.store.ollama import (
    OllamaModel,
    OllamaScan,
    display_name,
    find_ollama_model,
    generation_defaults,
    load_defaults,
    ollama_models_dir,
    parse_name,
    scan_ollama,
)
from hearth.types import GenerationConfig

MT = "application/vnd.ollama.image."
TEMPLATE = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
SYSTEM = "You are a helpful assistant."
PARAMS = {"stop": ["<|im_start|>", "<|im_end|>"], "temperature": 0.7, "num_ctx": 4096}
LICENSE = "Apache License 2.0"


# --- building stores --------------------------------------------------------------


@pytest.fixture(scope="session")
def gguf_blob(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> tuple[Path, str]:
    """One copy of SmolLM2 named by its real sha256, made once per session."""
    h = hashlib.sha256()
    with open(smollm2_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    hexdigest = h.hexdigest()
    copy = tmp_path_factory.mktemp("ollama-blob") / f"sha256-{hexdigest}"
    shutil.copyfile(smollm2_path, copy)
    return copy, hexdigest


class Store:
    """A temporary Ollama store; the model blob is the session copy, hard-linked in."""

    def __init__(self, root: Path, gguf: tuple[Path, str]) -> None:
        self.root = root
        (root / "blobs").mkdir(parents=True)
        (root / "manifests").mkdir()
        src, self.gguf_hex = gguf
        self.gguf_blob = root / "blobs" / f"sha256-{self.gguf_hex}"
        try:
            os.link(src, self.gguf_blob)  # the same bytes, no second 98 MB write
        except OSError:
            shutil.copyfile(src, self.gguf_blob)
        self.gguf_layer = {
            "mediaType": MT + "model",
            "digest": f"sha256:{self.gguf_hex}",
            "size": self.gguf_blob.stat().st_size,
        }

    def blob(self, data: bytes | str, media: str) -> dict:
        """Write a blob under its real digest; return its manifest layer."""
        raw = data.encode() if isinstance(data, str) else data
        hexdigest = hashlib.sha256(raw).hexdigest()
        (self.root / "blobs" / f"sha256-{hexdigest}").write_bytes(raw)
        return {"mediaType": media, "digest": f"sha256:{hexdigest}", "size": len(raw)}

    def standard_layers(self) -> list[dict]:
        return [
            self.gguf_layer,
            self.blob(TEMPLATE, MT + "template"),
            self.blob(SYSTEM, MT + "system"),
            self.blob(json.dumps(PARAMS), MT + "params"),
            self.blob(LICENSE, MT + "license"),
        ]

    def manifest(
        self, path: str, layers: list[dict] | None = None, raw: bytes | None = None
    ) -> Path:
        """``path`` is ``host/namespace/model/tag``; ``raw`` replaces the JSON body."""
        target = self.root / "manifests" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if raw is None:
            config = self.blob(
                json.dumps({"model_format": "gguf"}),
                "application/vnd.docker.container.image.v1+json",
            )
            body = {
                "schemaVersion": 2,
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": config,
                "layers": self.standard_layers() if layers is None else layers,
            }
            raw = json.dumps(body).encode()
        target.write_bytes(raw)
        return target

    def files(self) -> dict[str, tuple[int, int]]:
        """Every file under the store: relative path -> (inode, size)."""
        return {
            str(p.relative_to(self.root)): (p.lstat().st_ino, p.lstat().st_size)
            for p in self.root.rglob("*")
            if not p.is_dir()
        }


@pytest.fixture
def store(tmp_path: Path, gguf_blob: tuple[Path, str]) -> Store:
    return Store(tmp_path / "models", gguf_blob)


LLAMA = "registry.ollama.ai/library/llama3.2/1b"
HF = "hf.co/bartowski/SmolLM2-135M-Instruct-GGUF/Q4_K_M"
USER = "registry.ollama.ai/someone/smol/latest"


# --- listing ---------------------------------------------------------------------


def test_lists_library_namespace_and_hf_models(store: Store) -> None:
    paths = {p: store.manifest(p) for p in (LLAMA, HF, USER)}
    scan = scan_ollama(store.root)
    assert isinstance(scan, OllamaScan)
    assert scan.problems == []
    assert [m.name for m in scan.models] == [
        "hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M",
        "llama3.2:1b",
        "someone/smol:latest",
    ]
    by_name = {m.name: m for m in scan.models}
    m = by_name["llama3.2:1b"]
    assert isinstance(m, OllamaModel)
    assert m.manifest_path == paths[LLAMA]
    assert m.model_path == store.gguf_blob
    assert m.digest == f"sha256:{store.gguf_hex}"
    assert m.size == store.gguf_blob.stat().st_size > 50_000_000
    assert m.modified == paths[LLAMA].stat().st_mtime
    assert by_name["someone/smol:latest"].manifest_path == paths[USER]
    # the blob really is SmolLM2's GGUF: hearth's own reader parses it
    assert read_gguf(m.model_path).get("general.architecture") == "llama"


def test_model_path_is_the_blob_itself(store: Store) -> None:
    store.manifest(LLAMA)
    store.manifest(HF)
    before = store.files()
    nlink = store.gguf_blob.stat().st_nlink
    models = scan_ollama(store.root).models
    found = find_ollama_model("llama3.2:1b", store.root)
    assert found is not None
    for m in [*models, found]:
        assert m.model_path.parent == store.root / "blobs"
        assert m.model_path.name == f"sha256-{store.gguf_hex}"
        assert m.model_path.samefile(store.gguf_blob)
        assert m.model_path.stat().st_ino == store.gguf_blob.stat().st_ino
    assert store.files() == before  # nothing written, copied or moved
    assert store.gguf_blob.stat().st_nlink == nlink  # no new link to the blob either


def test_text_layers_and_params_are_read(store: Store) -> None:
    store.manifest(LLAMA)
    (m,) = scan_ollama(store.root).models
    assert m.template == TEMPLATE
    assert m.system == SYSTEM
    assert m.params == PARAMS
    assert m.license == LICENSE
    assert m.has_projector is False
    assert m.adapters == ()


def test_missing_text_layers_give_none_and_empty_params(store: Store) -> None:
    store.manifest(LLAMA, layers=[store.gguf_layer])
    (m,) = scan_ollama(store.root).models
    assert (m.template, m.system, m.license, m.params) == (None, None, None, {})


def test_projector_adapter_legacy_prompt_and_other_layers(store: Store) -> None:
    adapter = store.blob(b"GGUF-lora-bytes", MT + "adapter")
    layers = [
        store.gguf_layer,
        store.blob("{{ .Prompt }}", MT + "prompt"),  # the pre-"template" media type
        store.blob(b"GGUF-projector-bytes", MT + "projector"),
        adapter,
        store.blob(json.dumps([{"role": "user", "content": "hi"}]), MT + "messages"),
        store.blob("MIT", MT + "license"),
        store.blob("Extra terms", MT + "license"),
    ]
    store.manifest(LLAMA, layers=layers)
    scan = scan_ollama(store.root)
    assert scan.problems == []
    (m,) = scan.models
    assert m.template == "{{ .Prompt }}"
    assert m.has_projector is True
    assert m.adapters == (store.root / "blobs" / ("sha256-" + adapter["digest"].split(":")[1]),)
    assert m.adapters[0].read_bytes() == b"GGUF-lora-bytes"
    assert m.license == "MIT\n\nExtra terms"


def test_empty_and_absent_stores(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert scan_ollama(tmp_path / "empty") == OllamaScan([], [])  # Ollama makes manifests/ lazily
    scan = scan_ollama(tmp_path / "nowhere")
    assert scan.models == [] and len(scan.problems) == 1 and "no Ollama store" in scan.problems[0]
    assert find_ollama_model("llama3.2", tmp_path / "nowhere") is None


# --- name matching ----------------------------------------------------------------


def test_find_latest_default_and_case_insensitive(store: Store) -> None:
    store.manifest("registry.ollama.ai/library/llama3.2/latest")
    store.manifest(LLAMA)
    store.manifest(HF)
    store.manifest(USER)

    def name_of(query: str) -> str | None:
        m = find_ollama_model(query, store.root)
        return None if m is None else m.name

    assert name_of("llama3.2") == "llama3.2:latest"
    assert name_of("llama3.2:1b") == "llama3.2:1b"
    assert name_of("LLAMA3.2:1B") == "llama3.2:1b"
    assert name_of("  Llama3.2  ") == "llama3.2:latest"
    assert name_of("library/llama3.2:1b") == "llama3.2:1b"
    assert name_of("registry.ollama.ai/library/llama3.2:1b") == "llama3.2:1b"
    assert name_of("Registry.Ollama.AI/Library/llama3.2") == "llama3.2:latest"
    assert name_of("hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M") == (
        "hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M"
    )
    assert name_of("hf.co/bartowski/smollm2-135m-instruct-gguf:q4_k_m") == (
        "hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M"
    )
    assert name_of("https://hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M") is not None
    assert name_of("someone/smol") == "someone/smol:latest"
    # absent: other tag, other namespace, other host, no tag given for a tag-only model
    assert name_of("llama3.2:3b") is None
    assert name_of("smol") is None  # library/smol does not exist, someone/smol does
    assert name_of("hf.co/bartowski/SmolLM2-135M-Instruct-GGUF") is None  # :latest is absent
    assert name_of("example.com/library/llama3.2:1b") is None
    # not names at all
    for bad in ("", ":", "a/b/c/d/e", "llama3.2:", "bad name!", "/llama3.2"):
        assert name_of(bad) is None, bad


def test_exact_case_wins_over_a_case_variant(store: Store) -> None:
    store.manifest("registry.ollama.ai/library/Smol/latest")
    store.manifest("registry.ollama.ai/library/smol/latest", layers=[store.gguf_layer])
    upper = find_ollama_model("Smol", store.root)
    lower = find_ollama_model("smol", store.root)
    assert upper is not None and upper.name == "Smol:latest" and upper.system == SYSTEM
    assert lower is not None and lower.name == "smol:latest" and lower.system is None


def test_parse_and_display_names() -> None:
    assert parse_name("llama3.2") == ("registry.ollama.ai", "library", "llama3.2", "latest")
    assert parse_name("hf.co/org/repo:Q4_K_M") == ("hf.co", "org", "repo", "Q4_K_M")
    assert parse_name("localhost:5000/me/m:v1") == ("localhost:5000", "me", "m", "v1")
    assert parse_name("x/y/z/w") is None
    assert parse_name("llama3.2:1b\nx") is None
    assert display_name("registry.ollama.ai", "library", "llama3.2", "1b") == "llama3.2:1b"
    assert display_name("REGISTRY.ollama.ai", "Library", "m", "t") == "m:t"
    assert display_name("registry.ollama.ai", "me", "m", "t") == "me/m:t"
    assert display_name("hf.co", "org", "repo", "Q4") == "hf.co/org/repo:Q4"


# --- OLLAMA_MODELS ----------------------------------------------------------------


def test_ollama_models_env_is_respected(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.manifest(LLAMA)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("OLLAMA_MODELS", str(store.root))
    assert ollama_models_dir() == store.root
    assert [m.name for m in scan_ollama().models] == ["llama3.2:1b"]
    found = find_ollama_model("llama3.2:1b")
    assert found is not None and found.model_path.samefile(store.gguf_blob)

    # quoted and "~"-relative, as users write it in service files
    link = home / "ollama-store"
    link.symlink_to(store.root, target_is_directory=True)
    monkeypatch.setenv("OLLAMA_MODELS", '"~/ollama-store"')
    assert ollama_models_dir() == link
    assert [m.name for m in scan_ollama().models] == ["llama3.2:1b"]

    # set but absent: no store, and no fallback to ~/.ollama/models
    (home / ".ollama" / "models").mkdir(parents=True)
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "absent"))
    assert ollama_models_dir() is None
    assert scan_ollama() == OllamaScan([], [])
    assert find_ollama_model("llama3.2:1b") is None


def test_default_dir_is_home_dot_ollama(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ollama_models_dir() is None
    (tmp_path / ".ollama" / "models").mkdir(parents=True)
    assert ollama_models_dir() == tmp_path / ".ollama" / "models"
    monkeypatch.setenv("OLLAMA_MODELS", "")  # empty means unset, as in Ollama
    assert ollama_models_dir() == tmp_path / ".ollama" / "models"


# --- broken stores ----------------------------------------------------------------


def _break(store: Store, kind: str) -> tuple[str, str]:
    """Write one broken manifest for model ``broken``; return (its name, expected reason)."""
    path = "registry.ollama.ai/library/broken/latest"
    target = store.root / "manifests" / path
    if kind == "bad_json":
        store.manifest(path, raw=b'{"schemaVersion": 2, "layers": [')
        return "broken:latest", "not valid JSON"
    if kind == "not_utf8":
        store.manifest(path, raw=b"\xff\xfe\x00garbage")
        return "broken:latest", "not valid JSON"
    if kind == "not_object":
        store.manifest(path, raw=b"[1, 2, 3]")
        return "broken:latest", "not a JSON object"
    if kind == "no_model_layer":
        store.manifest(path, layers=[store.blob(TEMPLATE, MT + "template")])
        return "broken:latest", "no GGUF model layer"
    if kind == "missing_blob":
        gone = {**store.gguf_layer, "digest": "sha256:" + "ab" * 32}
        store.manifest(path, layers=[gone])
        return "broken:latest", "is missing"
    if kind == "not_gguf":
        store.manifest(path, layers=[store.blob(b"PK\x03\x04 a zip, not a model", MT + "model")])
        return "broken:latest", "not a GGUF file"
    if kind == "truncated_blob":
        store.manifest(path, layers=[{**store.gguf_layer, "size": store.gguf_layer["size"] + 4096}])
        return "broken:latest", "incomplete"
    if kind == "bad_digest":
        store.manifest(path, layers=[{**store.gguf_layer, "digest": "sha256:../../etc/passwd"}])
        return "broken:latest", "bad layer digest"
    if kind == "digest_with_newline":  # "$" would let this through; fullmatch does not
        layer = {**store.gguf_layer, "digest": store.gguf_layer["digest"] + "\n"}
        store.manifest(path, layers=[layer])
        return "broken:latest", "bad layer digest"
    if kind == "unreadable_manifest":  # a dangling link: stat and open both fail
        target.parent.mkdir(parents=True)
        target.symlink_to(store.root / "manifests" / "gone")
        return "broken:latest", "cannot read manifest"
    if kind == "unreadable_text_blob":  # the system blob's name is taken by a directory
        raw = b"a system prompt that cannot be read"
        (store.root / "blobs" / f"sha256-{hashlib.sha256(raw).hexdigest()}").mkdir()
        digest = f"sha256:{hashlib.sha256(raw).hexdigest()}"
        layer = {"mediaType": MT + "system", "digest": digest, "size": len(raw)}
        store.manifest(path, layers=[store.gguf_layer, layer])
        return "broken:latest", "cannot read system blob"
    if kind == "missing_template_blob":
        layer = {"mediaType": MT + "template", "digest": "sha256:" + "cd" * 32, "size": 10}
        store.manifest(path, layers=[store.gguf_layer, layer])
        return "broken:latest", "cannot read template blob"
    if kind == "bad_params":
        bad = store.blob("{temperature: hot", MT + "params")
        store.manifest(path, layers=[store.gguf_layer, bad])
        return "broken:latest", "params blob"
    if kind == "params_not_object":
        store.manifest(path, layers=[store.gguf_layer, store.blob("[0.7]", MT + "params")])
        return "broken:latest", "not a JSON object"
    if kind == "missing_projector":
        layer = {"mediaType": MT + "projector", "digest": "sha256:" + "ef" * 32, "size": 10}
        store.manifest(path, layers=[store.gguf_layer, layer])
        return "broken:latest", "projector blob"
    if kind == "layers_not_list":
        store.manifest(path, raw=json.dumps({"schemaVersion": 2, "layers": {"a": 1}}).encode())
        return "broken:latest", "layers are not a list"
    raise AssertionError(kind)


BROKEN_KINDS = [
    "bad_json",
    "not_utf8",
    "not_object",
    "no_model_layer",
    "missing_blob",
    "not_gguf",
    "truncated_blob",
    "bad_digest",
    "digest_with_newline",
    "unreadable_manifest",
    "unreadable_text_blob",
    "missing_template_blob",
    "bad_params",
    "params_not_object",
    "missing_projector",
    "layers_not_list",
]


@pytest.mark.parametrize("kind", BROKEN_KINDS)
def test_broken_manifest_is_skipped_with_a_problem(
    store: Store, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    store.manifest(LLAMA)
    name, reason = _break(store, kind)
    with caplog.at_level(logging.WARNING, logger="hearth.store"):
        scan = scan_ollama(store.root)
    assert [m.name for m in scan.models] == ["llama3.2:1b"]
    assert len(scan.problems) == 1
    (line,) = scan.problems
    assert line.startswith(f"{name}: ") and reason in line and "\n" not in line
    assert str(store.root / "manifests") in line  # says which file to look at
    warnings = [
        r for r in caplog.records if r.name == "hearth.store" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1 and line in warnings[0].getMessage()
    # the good one is still found by name; the broken one says why it cannot be used
    assert find_ollama_model("llama3.2:1b", store.root) is not None
    with pytest.raises(InvalidModel, match=reason.split()[0]):
        find_ollama_model(name, store.root)


def test_every_kind_of_breakage_at_once(
    store: Store, gguf_blob: tuple[Path, str], tmp_path: Path
) -> None:
    store.manifest(LLAMA)
    for i, kind in enumerate(BROKEN_KINDS):
        # each breakage under its own name: build it in a scratch store, move the manifest over
        scratch = Store(tmp_path / f"scratch{i}", gguf_blob)
        _break(scratch, kind)
        src = scratch.root / "manifests" / "registry.ollama.ai" / "library" / "broken" / "latest"
        dst = store.root / "manifests" / "registry.ollama.ai" / "library" / f"broken{i}" / "latest"
        dst.parent.mkdir(parents=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copyfile(src, dst)
        for blob in (scratch.root / "blobs").iterdir():
            target = store.root / "blobs" / blob.name
            if not target.exists():
                if blob.is_dir():
                    target.mkdir()
                else:
                    shutil.copyfile(blob, target)
    scan = scan_ollama(store.root)
    assert [m.name for m in scan.models] == ["llama3.2:1b"]
    assert len(scan.problems) == len(BROKEN_KINDS)
    names = {p.split(":", 1)[0] for p in scan.problems}
    assert names == {f"broken{i}" for i in range(len(BROKEN_KINDS))}


def test_non_gguf_model_blob_is_refused(store: Store) -> None:
    # a safetensors file where the GGUF should be: valid blob, valid digest, wrong format
    header = json.dumps({"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}).encode()
    safetensors = len(header).to_bytes(8, "little") + header + b"\x00" * 4
    layer = store.blob(safetensors, MT + "model")
    store.manifest("registry.ollama.ai/library/notgguf/latest", layers=[layer])
    store.manifest(LLAMA)
    scan = scan_ollama(store.root)
    assert [m.name for m in scan.models] == ["llama3.2:1b"]
    assert len(scan.problems) == 1
    assert scan.problems[0].startswith("notgguf:latest: model blob sha256-")
    assert "not a GGUF file" in scan.problems[0]
    with pytest.raises(InvalidModel, match="not a GGUF file"):
        find_ollama_model("notgguf", store.root)


def test_odd_entries_under_manifests(store: Store) -> None:
    store.manifest(LLAMA)
    base = store.root / "manifests" / "registry.ollama.ai" / "library"
    (base / "llama3.2" / ".DS_Store").write_bytes(b"\x00\x01")  # Finder litter: ignored
    (base / "llama3.2" / "a-dir-not-a-tag").mkdir()  # directories at tag depth: ignored
    (base / "llama3.2" / "too" / "deep").mkdir(parents=True)
    (base / "llama3.2" / "too" / "deep" / "x").write_text("{}")  # not at tag depth: ignored
    (base / "llama3.2" / "bad tag!").write_text("{}")  # not an Ollama name: a problem
    scan = scan_ollama(store.root)
    assert [m.name for m in scan.models] == ["llama3.2:1b"]
    bad = base / "llama3.2" / "bad tag!"
    assert scan.problems == [f"{bad}: not a valid Ollama model name"]


def test_huge_blob_is_never_read_past_its_magic(store: Store) -> None:
    # a 64 GiB sparse blob: reading it would take minutes; checking it must not
    huge = store.root / "blobs" / ("sha256-" + "12" * 32)
    with open(huge, "wb") as f:
        f.write(b"GGUF\x03\x00\x00\x00")
        f.truncate(64 << 30)
    if huge.stat().st_blocks * 512 > 1 << 30:
        pytest.skip("this file system does not make sparse files")
    layer = {"mediaType": MT + "model", "digest": "sha256:" + "12" * 32, "size": 64 << 30}
    store.manifest("registry.ollama.ai/library/huge/70b", layers=[layer])
    start = time.perf_counter()
    scan = scan_ollama(store.root)
    assert time.perf_counter() - start < 5
    (m,) = scan.models
    assert m.name == "huge:70b" and m.size == 64 << 30 and m.model_path == huge


# --- params -> hearth settings ----------------------------------------------------


def test_generation_defaults_maps_ollama_params() -> None:
    params = {
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.9,
        "min_p": 0.0,
        "repeat_penalty": 1,  # JSON int for a float field
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repeat_last_n": -1,
        "seed": 42,
        "stop": ["<|im_end|>", "", "</s>"],
        "num_predict": 128,
        "num_ctx": 8192,  # load-time, not generation
        "num_gpu": 99,  # unsupported: ignored
        "mirostat": 2,  # unsupported: ignored
    }
    out = generation_defaults(params)
    assert out == {
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.9,
        "min_p": 0.0,
        "repeat_penalty": 1.0,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repeat_last_n": -1,
        "seed": 42,
        "stop": ["<|im_end|>", "</s>"],
        "max_tokens": 128,
    }
    assert isinstance(out["repeat_penalty"], float)
    config = GenerationConfig(**out)  # every mapped value is one hearth accepts
    assert (config.temperature, config.top_k, config.max_tokens, config.stop) == (
        0.6,
        20,
        128,
        ["<|im_end|>", "</s>"],
    )
    assert load_defaults(params) == {"n_ctx": 8192}


def test_generation_defaults_special_values() -> None:
    assert generation_defaults({"num_predict": -1}) == {"max_tokens": None}
    assert generation_defaults({"num_predict": -2}) == {"max_tokens": None}
    assert generation_defaults({"num_predict": 0}) == {"max_tokens": 0}
    assert generation_defaults({"stop": "<|eot_id|>"}) == {"stop": ["<|eot_id|>"]}
    assert generation_defaults({"seed": -1}) == {}  # Ollama's "random" is hearth's default
    assert generation_defaults({"top_k": 40.0}) == {"top_k": 40}  # JSON float for an int
    assert generation_defaults({}) == {}
    assert GenerationConfig(**generation_defaults({"num_predict": -1})).max_tokens is None


def test_generation_defaults_ignores_wrong_types(caplog: pytest.LogCaptureFixture) -> None:
    bad = {
        "temperature": "hot",
        "top_k": 40.5,
        "top_p": 0,  # out of hearth's (0, 1]
        "min_p": None,
        "repeat_penalty": True,
        "presence_penalty": 3.0,
        "repeat_last_n": -5,
        "seed": "42",
        "stop": ["ok", 7],
        "num_predict": -3,
    }
    with caplog.at_level(logging.DEBUG, logger="hearth.store"):
        assert generation_defaults({**bad, "temperature": "hot", "top_p": 0.5}) == {"top_p": 0.5}
        assert generation_defaults(bad) == {}
    logged = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    for key in bad:
        assert key in logged


def test_load_defaults() -> None:
    assert load_defaults({"num_ctx": 4096}) == {"n_ctx": 4096}
    assert load_defaults({"num_ctx": 2048.0}) == {"n_ctx": 2048}
    for bad in (0, -1, "4096", True, 10.5, None):
        assert load_defaults({"num_ctx": bad}) == {}, bad
    assert load_defaults({"temperature": 0.1}) == {}
    assert load_defaults({}) == {}


def test_store_params_feed_hearth_settings(store: Store) -> None:
    store.manifest(LLAMA)
    m = find_ollama_model("llama3.2:1b", store.root)
    assert m is not None
    assert generation_defaults(m.params) == {
        "stop": ["<|im_start|>", "<|im_end|>"],
        "temperature": 0.7,
    }
    assert load_defaults(m.params) == {"n_ctx": 4096}
