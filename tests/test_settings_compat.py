"""Coming from llama-server or Ollama: their environment variables as aliases of hearth's
settings (in their own syntax, ranked below hearth's own names), llama-server's serve
flags, built-in chat template names, several listen addresses and Ollama's port.

Config parsing runs in process on explicit environments; ``hearth config`` and
``hearth serve`` run as real subprocesses (a clean environment each), the servers on
the real SmolLM2 model and answered by real clients (httpx, ollama).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hearth.chat_templates import BUILTINS, as_template, resolve_chat_template
from hearth.cli import _serve_wishes, build_parser
from hearth.config import BY_NAME, load_config, ollama_host, per_slot_ctx
from hearth.errors import BadRequest, ConfigError

httpx = pytest.importorskip("httpx")

TIMEOUT = 180


@pytest.fixture
def absent(tmp_path: Path) -> Path:
    return tmp_path / "absent.toml"


def _toml(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "config.toml"
    f.write_text(text, encoding="utf-8")
    return f


# -- aliases: other programs' variables, in their syntax ----------------------------------


@pytest.mark.parametrize("env, name, value", [
    ({"LLAMA_ARG_N_GPU_LAYERS": "all"}, "n_gpu_layers", -1),
    ({"LLAMA_ARG_N_GPU_LAYERS": "-1"}, "n_gpu_layers", -1),
    ({"LLAMA_ARG_N_GPU_LAYERS": "auto"}, "n_gpu_layers", None),
    ({"LLAMA_ARG_N_GPU_LAYERS": "20"}, "n_gpu_layers", 20),
    ({"LLAMA_ARG_THREADS": "6"}, "n_threads", 6),
    ({"LLAMA_ARG_THREADS": "-1"}, "n_threads", None),
    ({"LLAMA_ARG_THREADS_BATCH": "8"}, "n_threads_batch", 8),
    ({"LLAMA_ARG_BATCH": "1024"}, "n_batch", 1024),
    ({"LLAMA_ARG_UBATCH": "256"}, "n_ubatch", 256),
    ({"LLAMA_ARG_N_PARALLEL": "3"}, "parallel", 3),
    ({"LLAMA_ARG_N_PARALLEL": "-1"}, "parallel", None),
    ({"LLAMA_ARG_HOST": "0.0.0.0"}, "host", "0.0.0.0"),
    ({"LLAMA_ARG_PORT": "8080"}, "port", 8080),
    ({"LLAMA_API_KEY": "k1"}, "api_key", "k1"),
    ({"LLAMA_ARG_API_KEY": "k2"}, "api_key", "k2"),
    ({"LLAMA_ARG_MODEL": "/models/x.gguf"}, "model", "/models/x.gguf"),
    ({"LLAMA_ARG_FLASH_ATTN": "on"}, "flash_attn", True),
    ({"LLAMA_ARG_FLASH_ATTN": "off"}, "flash_attn", False),
    ({"LLAMA_ARG_FLASH_ATTN": "auto"}, "flash_attn", None),
    ({"LLAMA_ARG_CACHE_TYPE_K": "q8_0"}, "kv_type", "q8_0"),
    ({"LLAMA_ARG_MLOCK": "1"}, "use_mlock", True),
    ({"LLAMA_ARG_NO_MMAP": "1"}, "use_mmap", False),
    ({"LLAMA_ARG_LOAD_MODE": "mlock"}, "use_mlock", True),
    ({"LLAMA_ARG_CTX_SIZE": "8192"}, "n_ctx", 8192),
    ({"LLAMA_ARG_CTX_SIZE": "0"}, "n_ctx", None),
    ({"OLLAMA_KEEP_ALIVE": "1h30m"}, "keep_alive", "1h30m"),
    ({"OLLAMA_KEEP_ALIVE": "-1"}, "keep_alive", "-1"),
    ({"OLLAMA_NUM_PARALLEL": "2"}, "parallel", 2),
    ({"OLLAMA_CONTEXT_LENGTH": "4096"}, "n_ctx", 4096),
    ({"OLLAMA_ORIGINS": "https://a.example,chrome-extension://*"}, "origins", "https://a.example,chrome-extension://*"),
    ({"OLLAMA_MAX_LOADED_MODELS": "2"}, "max_loaded_models", 2),
    ({"LLAMACPP_MODEL": "/m/y.gguf"}, "model", "/m/y.gguf"),
    ({"LLAMACPP_N_CTX": "2048"}, "n_ctx", 2048),
    ({"LLAMACPP_N_GPU_LAYERS": "-1"}, "n_gpu_layers", -1),
    ({"LLAMACPP_N_THREADS": "4"}, "n_threads", 4),
    ({"OLLAMA_NUM_PARALLEL": "'2'"}, "parallel", 2),  # quotes and spaces cleaned, as Ollama does
])
def test_alias_is_read_in_its_programs_syntax_and_named_as_the_source(absent, env, name, value):
    cfg = load_config(flags={}, env=env, file=absent)
    assert cfg.values[name] == value
    assert cfg.sources[name] == f"env:{next(iter(env))}"


@pytest.mark.parametrize("value, host, port", [
    ("0.0.0.0", "0.0.0.0", None),
    (":11434", "0.0.0.0", 11434),
    ("127.0.0.1:11500", "127.0.0.1", 11500),
    ("http://example.lan:8000/", "example.lan", 8000),
    ("https://example.lan", "example.lan", None),
    ("[::1]:9000", "::1", 9000),
    ("::1", "::1", None),
    ('"localhost:11434"', "localhost", 11434),
])
def test_ollama_host_forms(value, host, port):
    assert ollama_host(value) == (host, port)


def test_ollama_host_sets_host_and_the_port_only_when_it_writes_one(absent):
    cfg = load_config(env={"OLLAMA_HOST": "0.0.0.0"}, file=absent)
    assert (cfg.host, cfg.sources["host"]) == ("0.0.0.0", "env:OLLAMA_HOST")
    assert (cfg.port, cfg.sources["port"]) == (11435, "default")
    cfg = load_config(env={"OLLAMA_HOST": "http://127.0.0.2:11500"}, file=absent)
    assert (cfg.host, cfg.port, cfg.sources["port"]) == ("127.0.0.2", 11500, "env:OLLAMA_HOST")


@pytest.mark.parametrize("total, parallel, per_slot", [
    (8192, 4, 2048), (1024, 2, 512), (1000, 3, 512), (4096, None, 4096), (0, 2, None), (None, 2, None),
])
def test_llama_server_ctx_size_is_divided_per_slot_as_llama_cpp_does(total, parallel, per_slot):
    assert per_slot_ctx(total, parallel) == per_slot


def test_llama_arg_ctx_size_is_the_total_over_the_slots_from_any_source(tmp_path, absent):
    cfg = load_config(env={"LLAMA_ARG_CTX_SIZE": "8192", "LLAMA_ARG_N_PARALLEL": "4"}, file=absent)
    assert (cfg.n_ctx, cfg.parallel) == (2048, 4)
    cfg = load_config(env={"LLAMA_ARG_CTX_SIZE": "8192", "HEARTH_PARALLEL": "2"}, file=absent)
    assert cfg.n_ctx == 4096
    cfg = load_config(flags={"parallel": 8}, env={"LLAMA_ARG_CTX_SIZE": "8192"}, file=absent)
    assert cfg.n_ctx == 1024
    # Ollama's and llama-cpp-python's context lengths are per request already
    cfg = load_config(env={"OLLAMA_CONTEXT_LENGTH": "8192", "OLLAMA_NUM_PARALLEL": "4"}, file=absent)
    assert cfg.n_ctx == 8192


def test_hearth_names_win_over_aliases_and_aliases_over_defaults(tmp_path, absent):
    f = _toml(tmp_path, "port = 9000\nkeep_alive = \"10m\"\n")
    env = {"LLAMA_ARG_PORT": "8080", "OLLAMA_KEEP_ALIVE": "1h", "OLLAMA_NUM_PARALLEL": "2",
           "HEARTH_PARALLEL": "3", "LLAMA_ARG_THREADS": "5"}
    cfg = load_config(flags={"n_threads": 7}, env=env, file=f)
    assert (cfg.port, cfg.sources["port"]) == (9000, "file")  # the config file beats the alias
    assert (cfg.keep_alive, cfg.sources["keep_alive"]) == ("10m", "file")
    assert (cfg.parallel, cfg.sources["parallel"]) == (3, "env")  # HEARTH_* beats the alias
    assert (cfg.n_threads, cfg.sources["n_threads"]) == (7, "flag")
    cfg = load_config(env=env, file=absent)
    assert (cfg.port, cfg.sources["port"]) == (8080, "env:LLAMA_ARG_PORT")


def test_the_first_alias_listed_wins(absent):
    cfg = load_config(env={"LLAMA_ARG_N_PARALLEL": "2", "OLLAMA_NUM_PARALLEL": "6"}, file=absent)
    assert (cfg.parallel, cfg.sources["parallel"]) == (2, "env:LLAMA_ARG_N_PARALLEL")
    assert [a.env for a in BY_NAME["parallel"].aliases] == ["LLAMA_ARG_N_PARALLEL", "OLLAMA_NUM_PARALLEL"]


@pytest.mark.parametrize("env, message", [
    ({"OLLAMA_NUM_PARALLEL": "x"}, "OLLAMA_NUM_PARALLEL: expected an integer, got 'x'"),
    ({"LLAMA_ARG_FLASH_ATTN": "sometimes"}, "LLAMA_ARG_FLASH_ATTN: expected on, off or auto, got 'sometimes'"),
    ({"OLLAMA_KEEP_ALIVE": "forever"}, "OLLAMA_KEEP_ALIVE: expected seconds or a duration"),
    ({"OLLAMA_HOST": "127.0.0.1:port"}, "OLLAMA_HOST: invalid port 'port'"),
    ({"OLLAMA_HOST": "ftp://h:1"}, "OLLAMA_HOST: expected host, host:port"),
    ({"LLAMA_API_KEY": "a,b"}, "LLAMA_API_KEY: hearth takes one API key, got 2"),
    ({"LLAMA_ARG_N_GPU_LAYERS": "some"}, "LLAMA_ARG_N_GPU_LAYERS: expected an integer"),
    ({"LLAMA_ARG_CACHE_TYPE_K": "q3_zz"}, "LLAMA_ARG_CACHE_TYPE_K: invalid value for kv_type"),
    ({"OLLAMA_MAX_LOADED_MODELS": "-2"}, "OLLAMA_MAX_LOADED_MODELS: invalid value for max_loaded_models"),
    ({"LLAMA_ARG_UBATCH": "0"}, "LLAMA_ARG_UBATCH: invalid value for n_ubatch"),
])
def test_a_bad_alias_value_is_one_line_naming_the_variable(absent, env, message):
    with pytest.raises(ConfigError) as e:
        load_config(env=env, file=absent)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_a_bad_value_of_an_alias_that_is_outranked_still_fails(tmp_path):
    """An alias is read whenever it is set: a typo in it is reported, not hidden."""
    with pytest.raises(ConfigError, match="OLLAMA_NUM_PARALLEL"):
        load_config(env={"HEARTH_PARALLEL": "2", "OLLAMA_NUM_PARALLEL": "x"}, file=tmp_path / "absent.toml")


def test_ollama_models_is_environment_only(tmp_path):
    with pytest.raises(ConfigError, match="OLLAMA_MODELS"):
        load_config(env={}, file=_toml(tmp_path, 'ollama_models = "/x"\n'))


def test_hearth_keep_alive_is_checked_too(absent):
    with pytest.raises(ConfigError, match="HEARTH_KEEP_ALIVE"):
        load_config(env={"HEARTH_KEEP_ALIVE": "soon"}, file=absent)
    assert load_config(env={"HEARTH_KEEP_ALIVE": "90"}, file=absent).keep_alive == "90"


# -- hearth config, as a process -------------------------------------------------------------


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HEARTH_", "OLLAMA_", "LLAMA_ARG_", "LLAMACPP_")) and k != "LLAMA_API_KEY"}
    env.update(HEARTH_CONFIG=str(tmp / "absent.toml"), HEARTH_HOME=str(tmp / "home"),
               OLLAMA_MODELS=str(tmp / "ollama"), HF_HUB_CACHE=str(tmp / "hf"),
               HF_ENDPOINT="http://127.0.0.1:9", PYTHONIOENCODING="utf-8")
    env.update(extra)
    return env


def _hearth(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hearth", *args], capture_output=True, text=True,
                          encoding="utf-8", env=_env(tmp, **env), cwd=tmp, timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hearth: error: "), r.stderr
    return lines[0]


def test_hearth_config_json_shows_each_alias_as_the_source(tmp_path):
    r = _hearth(tmp_path, "config", "--json", OLLAMA_KEEP_ALIVE="1h", LLAMA_ARG_CTX_SIZE="4096",
                LLAMA_ARG_N_PARALLEL="2", OLLAMA_HOST="0.0.0.0:11500", LLAMA_API_KEY="sekrit",
                OLLAMA_MODELS=str(tmp_path / "store"), HEARTH_N_THREADS="3")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["settings"]
    assert (s["keep_alive"]["value"], s["keep_alive"]["source"]) == ("1h", "env:OLLAMA_KEEP_ALIVE")
    assert (s["n_ctx"]["value"], s["n_ctx"]["source"]) == (2048, "env:LLAMA_ARG_CTX_SIZE")
    assert (s["parallel"]["value"], s["parallel"]["source"]) == (2, "env:LLAMA_ARG_N_PARALLEL")
    assert (s["host"]["value"], s["host"]["source"]) == ("0.0.0.0", "env:OLLAMA_HOST")
    assert (s["port"]["value"], s["port"]["source"]) == (11500, "env:OLLAMA_HOST")
    assert (s["api_key"]["value"], s["api_key"]["source"]) == ("***", "env:LLAMA_API_KEY")
    assert "sekrit" not in r.stdout
    assert (s["ollama_models"]["value"], s["ollama_models"]["source"]) == (str(tmp_path / "store"), "env")
    assert (s["n_threads"]["value"], s["n_threads"]["source"]) == (3, "env")
    assert "OLLAMA_KEEP_ALIVE" in s["keep_alive"]["aliases"]
    text = _hearth(tmp_path, "config", OLLAMA_KEEP_ALIVE="1h")
    assert text.returncode == 0
    assert any(line.split()[:3] == ["keep_alive", "1h", "env:OLLAMA_KEEP_ALIVE"] for line in text.stdout.splitlines())


@pytest.mark.parametrize("env, says", [
    ({"OLLAMA_NUM_PARALLEL": "x"}, "OLLAMA_NUM_PARALLEL: expected an integer, got 'x'"),
    ({"LLAMA_ARG_FLASH_ATTN": "maybe"}, "LLAMA_ARG_FLASH_ATTN"),
    ({"OLLAMA_HOST": "h:99999"}, "OLLAMA_HOST"),
])
def test_hearth_config_with_a_bad_alias_is_one_line_and_exit_2(tmp_path, env, says):
    assert says in _one_line_error(_hearth(tmp_path, "config", "--json", **env))


# -- serve's llama-server flags ---------------------------------------------------------------


def _serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_ctx_size_with_parallel_gives_the_per_slot_n_ctx(absent):
    cfg = load_config(flags={"parallel": 2}, env={}, file=absent)
    assert _serve_wishes(_serve_args("--ctx-size", "1024", "-np", "2"), cfg) == {"n_ctx": 512, "parallel": 2}
    cfg = load_config(env={"HEARTH_PARALLEL": "4"}, file=absent)  # the slot count from the settings
    assert _serve_wishes(_serve_args("-c", "8192"), cfg) == {"n_ctx": 2048}
    cfg = load_config(env={}, file=absent)  # no slot count: each slot may use all of it
    assert _serve_wishes(_serve_args("-c", "4096"), cfg) == {"n_ctx": 4096}
    assert _serve_wishes(_serve_args("-c", "0"), cfg) == {}
    assert _serve_wishes(_serve_args("--n-ctx", "300", "-np", "2"), cfg) == {"n_ctx": 300, "parallel": 2}


def test_llama_arg_ctx_size_is_divided_by_the_parallel_flag(absent):
    cfg = load_config(flags={"parallel": 4}, env={"LLAMA_ARG_CTX_SIZE": "4096"}, file=absent)
    assert _serve_wishes(_serve_args("-np", "4"), cfg) == {"n_ctx": 1024, "parallel": 4}


def test_ctx_size_and_n_ctx_together_are_refused(absent):
    cfg = load_config(env={}, file=absent)
    with pytest.raises(BadRequest, match="give one of them"):
        _serve_wishes(_serve_args("--ctx-size", "1024", "--n-ctx", "512"), cfg)


def test_llama_server_load_flags_parse_into_hearth_wishes(absent):
    from hearth.cli import _load_argv, _load_wishes

    args = _serve_args("-tb", "3", "-b", "256", "-ub", "128", "-ctk", "q8_0", "-fa", "off", "-ngl", "all",
                       "--mlock", "--no-mmap", "-t", "2")
    wishes = _load_wishes(args)
    assert wishes == {"n_threads": 2, "n_threads_batch": 3, "n_gpu_layers": -1, "n_batch": 256, "n_ubatch": 128,
                      "kv_type": "q8_0", "flash_attn": False, "use_mmap": False, "use_mlock": True}
    # the daemon gets the same wishes through its own argv
    again = build_parser().parse_args(["daemon", "serve-foreground", *_load_argv(args)])
    assert _load_wishes(again) == wishes
    assert _load_wishes(_serve_args("--n-gpu-layers", "auto", "-fa")) == {"flash_attn": True}


def test_serve_help_documents_every_flag(tmp_path):
    r = _hearth(tmp_path, "serve", "--help")
    assert r.returncode == 0
    for flag in ("--ctx-size", "--n-predict", "--jinja", "--no-jinja", "--chat-template", "--chat-template-file",
                 "--api-key", "--cors-origins", "--metrics", "--slots", "--no-slots", "--embedding", "--pooling",
                 "--host", "--ollama-port", "--threads-batch", "--batch-size", "--ubatch-size", "--cache-type-k",
                 "--flash-attn", "--mlock", "--no-mmap", "--n-gpu-layers", "--parallel"):
        assert flag in r.stdout, flag


@pytest.mark.parametrize("argv, says", [
    (["--chat-template", "nosuch"], "known names: chatml, llama3"),
    (["--chat-template", "{% for %}"], "--chat-template: not a usable Jinja chat template"),
    (["--chat-template", "chatml", "--chat-template-file", "x.jinja"], "not both"),
    (["--chat-template-file", "does-not-exist.jinja"], "does-not-exist.jinja"),
    (["--pooling", "cls"], "--pooling cls"),
    (["--ctx-size", "512", "--n-ctx", "256"], "give one of them"),
    (["--n-predict", "-5"], "--n-predict"),
    (["-fa", "sometimes"], "on, off or auto"),
])
def test_bad_llama_server_flags_are_refused_before_anything_loads(tmp_path, argv, says):
    r = _hearth(tmp_path, "serve", "--port", str(_free_port()), *argv)
    if argv[0] == "-fa":  # argparse's own refusal: usage and one error line, exit 2
        assert r.returncode == 2 and says in r.stderr
        return
    assert says in _one_line_error(r)


# -- built-in chat templates ------------------------------------------------------------------


def test_builtin_names_render_what_llama_cpp_writes():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert as_template(BUILTINS["chatml"].source).render(msgs) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert as_template(BUILTINS["llama3"].source).render(msgs) == (
        "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert as_template(BUILTINS["gemma"].source).render(msgs) == (
        "<start_of_turn>user\nS\n\nHi<end_of_turn>\n<start_of_turn>model\n")
    assert as_template(BUILTINS["mistral-v7"].source).render(msgs) == (
        "[SYSTEM_PROMPT] S[/SYSTEM_PROMPT][INST] Hi[/INST]")
    assert as_template(BUILTINS["phi3"].source).render(msgs) == (
        "<|system|>\nS<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n")
    assert as_template(BUILTINS["zephyr"].source).render(msgs) == (
        "<|system|>\nS<|endoftext|>\n<|user|>\nHi<|endoftext|>\n<|assistant|>\n")
    assert as_template(BUILTINS["deepseek3"].source).render(msgs) == "S\n\n<｜User｜>Hi<｜Assistant｜>"
    for name in ("chatml", "llama3", "gemma", "mistral-v7", "phi3", "zephyr", "deepseek3"):
        t = as_template(resolve_chat_template(name))
        assert t.kind == f"builtin:{name}" and t.stop, name


def test_jinja_text_is_taken_as_is_and_read_like_a_models_template():
    text = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template(text) == text
    assert as_template(text).kind == "model"


# -- max_loaded_models in the pool ------------------------------------------------------------


def test_max_loaded_models_unloads_the_idle_lru_before_loading_another(smollm2_path, tmp_path):
    from hearth.server.pool import ModelPool, file_key

    a, b, c = smollm2_path, tmp_path / "b.gguf", tmp_path / "c.gguf"
    shutil.copy(a, b)  # other files: other models for the pool
    shutil.copy(a, c)

    async def main() -> None:
        pool = ModelPool({"n_ctx": 256, "parallel": 1}, keep_alive="5m", available_ram=lambda: 1 << 50,
                         models_dirs=[a.parent, tmp_path], max_loaded_models=2)
        try:
            for path in (a, b):
                (await pool.acquire(str(path))).release()
            first = next(e for e in pool.loaded() if e.key == file_key(a))
            first.last_used -= 10  # the least recently used
            lc = await pool.acquire(str(c))
            assert sorted(e.key for e in pool.loaded()) == sorted([file_key(b), file_key(c)])
            lb = await pool.acquire(str(b))
            la = await pool.acquire(str(a))  # both others in use: loaded beyond the count
            assert len(pool.loaded()) == 3
            for lease in (la, lb, lc):
                lease.release()
        finally:
            await pool.aclose()

    asyncio.run(main())


# -- hearth serve, as a process ----------------------------------------------------------------


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class Serve:
    """``python -m hearth serve ARGS`` in its own process group, up once ``url``'s /health is 200."""

    def __init__(self, tmp: Path, *args: str, url: str, **env: str) -> None:
        self.url = url
        self.log = open(tmp / f"serve-{time.monotonic_ns()}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "hearth", "serve", *args], env=_env(tmp, **env),
                                     cwd=tmp, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> Serve:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"hearth serve exited {self.proc.returncode}: {self.output()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"hearth serve did not come up: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_bytes()[-3000:].decode(errors="replace")

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def _chat_prompt_tokens(url: str) -> int:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens"]


def _text_prompt_tokens(url: str, prompt: str) -> int:
    r = httpx.post(f"{url}/v1/completions", timeout=120, json={"model": "smollm2", "prompt": prompt, "max_tokens": 1})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens"]


def test_chat_template_chatml_changes_the_prompt_the_server_renders(tmp_path, smollm2_path):
    chatml = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with Serve(tmp_path, "--port", str(port), "-m", str(smollm2_path), "--alias", "smollm2", "-c", "512",
               "-np", "1", url=url):
        own = _chat_prompt_tokens(url)  # SmolLM2's own template adds its default system prompt
        assert own > _text_prompt_tokens(url, chatml)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with Serve(tmp_path, "--port", str(port), "-m", str(smollm2_path), "--alias", "smollm2", "-c", "512",
               "-np", "1", "--jinja", "--chat-template", "chatml", url=url):
        assert _chat_prompt_tokens(url) == _text_prompt_tokens(url, chatml) < own
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] ",
                        encoding="utf-8")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with Serve(tmp_path, "--port", str(port), "-m", str(smollm2_path), "--alias", "smollm2", "-c", "512",
               "-np", "1", "--chat-template-file", str(template), url=url):
        assert _chat_prompt_tokens(url) == _text_prompt_tokens(url, "[user] Hi\n[assistant] ")


@pytest.fixture
def two_loopbacks() -> tuple[str, str]:
    if _ipv6():
        return "127.0.0.1", "::1"
    if sys.platform != "linux":
        pytest.skip("neither ::1 nor 127.0.0.2 to listen on")
    return "127.0.0.1", "127.0.0.2"


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def test_two_hosts_both_answer_and_ollama_port_serves_ollama_clients(tmp_path, smollm2_path, two_loopbacks):
    ollama = pytest.importorskip("ollama")
    a, b = two_loopbacks
    port, oport = _free_port(), _free_port()
    # LLAMA_ARG_MODEL loads at startup (as llama-server); OLLAMA_HOST's port is where Ollama clients go
    with Serve(tmp_path, "--host", a, "--host", b, "--port", str(port), "--ollama-port", "-np", "1",
               "--ctx-size", "512", url=_url(a, port), LLAMA_ARG_MODEL=str(smollm2_path),
               OLLAMA_HOST=f"127.0.0.1:{oport}") as s:
        for host in (a, b):
            r = httpx.get(f"{_url(host, port)}/health", timeout=10)
            assert r.status_code == 200 and r.json()["status"] == "ok", host
        client = ollama.Client(host=f"http://127.0.0.1:{oport}")
        names = [m.model for m in client.list().models]
        assert smollm2_path.name in names or any(smollm2_path.stem in n for n in names), names
        out = client.generate(model=smollm2_path.name, prompt="Hi", options={"num_predict": 2, "temperature": 0})
        assert out.done and out.eval_count >= 1
        assert httpx.get(f"{_url(b, oport)}/api/version", timeout=10).status_code == 200
        assert "model from LLAMA_ARG_MODEL" in s.output()


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _one_line_error(_hearth(tmp_path, "serve", "--port", str(port)))
        assert f"port {port} is in use; pick another with --port" in line
        # the second of two addresses in use: nothing is left listening on the first
        free = _free_port()
        line = _one_line_error(_hearth(tmp_path, "serve", "--port", str(free), "--ollama-port", str(port)))
        assert f"port {port} is in use; pick another with --ollama-port" in line


def test_a_chat_template_override_is_what_api_show_and_apply_template_see(smollm2_path):
    import httpx
    from test_server import _Server

    from hearth.server import create_app

    zephyr = BUILTINS["zephyr"].source
    with _Server(create_app([str(smollm2_path)], load_options={"n_ctx": 256}, chat_template="zephyr")) as s:
        shown = httpx.post(f"{s.url}/api/show", json={"model": "smollm2"}, timeout=60).json()["template"]
        assert shown == zephyr
        prompt = httpx.post(f"{s.url}/apply-template", json={"messages": [{"role": "user", "content": "hi"}]},
                            timeout=60).json()["prompt"]
        assert "<|user|>" in prompt and "<|im_start|>" not in prompt
