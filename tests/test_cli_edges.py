"""The rest of the command line (issue 14): piped prompts, ``info`` without a download,
a stable ``models recommend``, Ollama's verbs, ``serve``'s port and request log, flag
errors, ``-v`` after the command, help on every option, shell completion.

Every subprocess runs ``python -m hearth`` with HOME, the XDG dirs, HEARTH_HOME and the
daemon's runtime dir in a temporary folder, no HEARTH_* or other programs' settings from
the caller, and a Hugging Face endpoint that does not answer (nothing may download).
Models are the embedded SmolLM2 135M, generation is a few tokens: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

TIMEOUT = 180
Runner = Callable[..., subprocess.CompletedProcess]
TINY = ["--max-tokens", "4", "--temperature", "0", "--n-ctx", "256"]


def _env(root: Path, **extra: str) -> dict[str, str]:
    from hearth.config import SETTINGS

    borrowed = {a.env for s in SETTINGS for a in s.aliases} | {"OLLAMA_MODELS", "OLLAMA_HOST"}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HEARTH_", "XDG_", "HF_")) and k not in borrowed}
    env.update({
        "HOME": str(root / "home"), "XDG_CACHE_HOME": str(root / "xdg-cache"),
        "XDG_CONFIG_HOME": str(root / "xdg-config"), "XDG_DATA_HOME": str(root / "xdg-data"),
        "HEARTH_CONFIG": str(root / "absent-config.toml"), "HEARTH_HOME": str(root / "hearth-home"),
        "HEARTH_RUNTIME_DIR": str(root / "run"), "HEARTH_NO_DAEMON": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root / "hf-cache"),
        "PYTHONIOENCODING": "utf-8",
    })
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    # short: the daemon's Unix socket path must fit in 108 bytes
    d = Path(tempfile.mkdtemp(prefix="hce-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cli(root: Path) -> Runner:
    def run(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hearth", *args], input=stdin, capture_output=True,
                              text=True, encoding="utf-8", env=_env(root, **(env or {})), cwd=root,
                              timeout=TIMEOUT)

    return run


def _ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in r.stderr
    return r.stdout


def _one_line_error(r: subprocess.CompletedProcess, code: int = 2) -> str:
    assert r.returncode == code, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in r.stderr and "usage:" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hearth: error: "), r.stderr
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- 1. the prompt: -p or words, then piped stdin ----------------------------------------


def _raw_json(r: subprocess.CompletedProcess) -> dict:
    return json.loads(_ok(r))


def test_piped_stdin_follows_the_prompt_after_a_blank_line(cli: Runner) -> None:
    piped = "The sky is blue. Grass is green.\n"
    combined = _raw_json(cli("run", "--raw", "--json", "-p", "Summarise this:", *TINY, stdin=piped))
    written = _raw_json(cli("run", "--raw", "--json", "-p", "Summarise this:\n\n" + piped, *TINY))
    alone = _raw_json(cli("run", "--raw", "--json", "-p", "Summarise this:", *TINY))
    # the same tokens in: the same greedy answer; the prompt alone is shorter
    assert combined["usage"]["prompt_tokens"] == written["usage"]["prompt_tokens"]
    assert combined["text"] == written["text"]
    assert alone["usage"]["prompt_tokens"] < combined["usage"]["prompt_tokens"]


def test_piped_stdin_follows_positional_prompt_words(cli: Runner) -> None:
    piped = "The sky is blue."
    words = _raw_json(cli("run", "smollm2", "Summarise", "this:", "--raw", "--json", *TINY, stdin=piped))
    written = _raw_json(cli("run", "smollm2", "--raw", "--json", "-p", "Summarise this:\n\nThe sky is blue.", *TINY))
    assert words["usage"]["prompt_tokens"] == written["usage"]["prompt_tokens"]
    assert words["text"] == written["text"]


@pytest.mark.parametrize("argv,stdin", [
    (["-p", ""], ""),
    (["-p", "   \n\t"], ""),
    ([], ""),  # nothing piped
    ([], "  \n\n"),  # only whitespace piped
], ids=["empty-p", "whitespace-p", "empty-stdin", "whitespace-stdin"])
def test_an_empty_prompt_is_one_line_and_exit_2(cli: Runner, argv: list[str], stdin: str) -> None:
    line = _one_line_error(cli("run", *argv, *TINY, stdin=stdin))
    assert "prompt is empty" in line


# -- 2. info on a catalog model that is not pulled -----------------------------------------


def test_info_on_a_catalog_model_not_pulled_answers_from_the_catalog(cli: Runner, root: Path) -> None:
    out = _ok(cli("info", "qwen2.5:7b"))
    assert "not pulled" in out and "hearth pull qwen2.5:7b" in out
    for row in ("parameters", "quantization", "Q4_K_M", "download size", "context (trained)", "plan: n_ctx",
                "memory: total", "fits here"):
        assert row in out, row
    assert not list(root.rglob("*.gguf")) and not list(root.rglob("*.incomplete"))  # nothing downloaded


def test_info_json_on_a_catalog_model_not_pulled(cli: Runner, root: Path) -> None:
    d = json.loads(_ok(cli("info", "--json", "qwen2.5:7b-q8_0")))
    assert d["pulled"] is False and d["pull"] == "hearth pull qwen2.5:7b-q8_0"
    assert d["model"]["quantization"] == "Q8_0" and d["model"]["parameters"] > 7e9
    assert d["model"]["context_length"] == 32768 and d["model"]["size"] > 7e9
    assert d["estimate"] == "planner" and isinstance(d["fits"], bool)
    if d["fits"]:
        assert d["plan"]["n_ctx"] > 0 and d["memory_estimate"] > d["model"]["size"] * 0.9
    else:
        assert d["reason"]
    assert "total_ram" in d["hardware"]
    # the planner took the flags too
    small = json.loads(_ok(cli("show", "--json", "qwen2.5:7b-q8_0", "--n-ctx", "1024", "--parallel", "1")))
    assert small["plan"]["n_ctx"] == 1024 and small["plan"]["parallel"] == 1
    assert not list(root.rglob("*.gguf"))


def test_info_without_architecture_facts_estimates_from_the_size(cli: Runner, root: Path) -> None:
    cat = root / "bare-catalog.toml"
    cat.write_text('[[model]]\nname = "bare:1b"\nrepo = "x/y"\nparameters = 1000000000\ncontext_length = 4096\n'
                   'default_quant = "Q4_K_M"\n[model.quants.Q4_K_M]\nfile = "bare.gguf"\nsize = 700000000\n')
    d = json.loads(_ok(cli("info", "--json", "bare:1b", env={"HEARTH_CATALOG": str(cat)})))
    assert d["estimate"] == "size" and d["plan"] is None and d["memory_estimate"] > 700000000
    out = _ok(cli("info", "bare:1b", env={"HEARTH_CATALOG": str(cat)}))
    assert "not pulled" in out and "from the download size" in out


# -- 3. models recommend: one answer per machine, and by how much it won ------------------------


def test_recommend_gives_the_same_answer_each_run_and_refresh_measures_again(cli: Runner, root: Path) -> None:
    env = {"HEARTH_HOME": str(root / "rec-home")}
    runs = [json.loads(_ok(cli("models", "recommend", "--json", env=env))) for _ in range(3)]
    first = runs[0]["hardware"]
    assert first["cpu_bandwidth_source"] == "measured" and len(first["cpu_bandwidth_runs"]) >= 3
    assert Path(first["cpu_bandwidth_cache"]).is_file()
    for r in runs[1:]:
        hw = r["hardware"]
        assert hw["cpu_bandwidth_source"] == "cached"
        assert hw["cpu_bandwidth_gbs"] == first["cpu_bandwidth_gbs"]
        assert hw["cpu_bandwidth_measured_at"] == first["cpu_bandwidth_measured_at"]
        assert (r["choice"] or {}).get("ref") == (runs[0]["choice"] or {}).get("ref")
    again = json.loads(_ok(cli("models", "recommend", "--json", "--refresh", env=env)))["hardware"]
    assert again["cpu_bandwidth_source"] == "measured"
    assert again["cpu_bandwidth_measured_at"] > first["cpu_bandwidth_measured_at"]
    after = json.loads(_ok(cli("models", "recommend", "--json", env=env)))["hardware"]
    assert after["cpu_bandwidth_source"] == "cached" and after["cpu_bandwidth_gbs"] == again["cpu_bandwidth_gbs"]


def test_recommend_shows_the_margin_over_the_runner_up(cli: Runner, root: Path) -> None:
    env = {"HEARTH_HOME": str(root / "rec-home")}
    d = json.loads(_ok(cli("models", "recommend", "--json", env=env)))
    if d["choice"] is None:
        pytest.skip("nothing in the catalog fits this machine")
    m = d["margin"]
    assert m["score"] == round(d["choice"]["score"], 3)
    if d["runners_up"]:
        assert m["runner_up"] == d["runners_up"][0]["ref"]
        assert m["score_margin"] == pytest.approx(m["score"] - m["runner_up_score"], abs=1e-3)
        assert m["score_margin"] >= 0 and m["won_on"] in ("score", "speed", "download size")
    text = _ok(cli("models", "recommend", env=env))
    margin = [ln for ln in text.splitlines() if ln.startswith("Margin: ")]
    assert len(margin) == 1
    if d["runners_up"]:
        assert d["runners_up"][0]["ref"] in margin[0]
    assert "score " in text  # each runner-up's score in the table


def test_bandwidth_cache_is_per_machine_and_refreshable(tmp_path: Path) -> None:
    from hearth.store import recommend as rec

    f = tmp_path / "bw.json"
    f.write_text(json.dumps({"version": 1, "machines": {"another|machine": {"gbs": 1.0, "measured_at": 1}}}))
    a = rec.cpu_bandwidth(cache_file=f)
    assert a.source == "measured" and a.gbs > 1.0 and len(a.runs) == rec.BANDWIDTH_RUNS
    assert a.gbs == sorted(a.runs)[len(a.runs) // 2]  # the median of the runs
    b = rec.cpu_bandwidth(cache_file=f)
    assert (b.source, b.gbs, b.measured_at) == ("cached", a.gbs, a.measured_at)
    assert json.loads(f.read_text())["machines"]["another|machine"]["gbs"] == 1.0  # others kept
    c = rec.cpu_bandwidth(cache_file=f, refresh=True)
    assert c.source == "measured" and c.measured_at > a.measured_at
    assert rec.cpu_bandwidth(5.0, cache_file=f).source == "given"


# -- 4. Ollama's verbs --------------------------------------------------------------------------


def test_list_and_ls_are_models_list(cli: Runner) -> None:
    want = json.loads(_ok(cli("models", "list", "--json")))
    assert json.loads(_ok(cli("list", "--json"))) == want
    assert json.loads(_ok(cli("ls", "--json"))) == want
    assert "smollm2" in _ok(cli("ls"))


def test_pull_rm_and_show_are_the_models_and_info_commands(cli: Runner) -> None:
    assert "is embedded" in _ok(cli("pull", "smollm2"))
    assert "does not delete" in _one_line_error(cli("rm", "smollm2"))  # embedded: refused, one line
    assert json.loads(_ok(cli("show", "--json", "--n-ctx", "256")))["plan"] == \
        json.loads(_ok(cli("info", "--json", "--n-ctx", "256")))["plan"]


def test_ps_without_a_daemon_is_one_line_exit_1(cli: Runner) -> None:
    line = _one_line_error(cli("ps"), code=1)
    assert "daemon is not running" in line


def test_ps_and_stop_on_the_daemon(cli: Runner, root: Path) -> None:
    env = {"HEARTH_NO_DAEMON": "0", "HEARTH_RUNTIME_DIR": str(root / "rd")}
    _ok(cli("daemon", "start", "--model", "smollm2", "--n-ctx", "256", env=env))
    try:
        ps = _ok(cli("ps", env=env)).splitlines()
        assert ps[0].split() == ["NAME", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
        assert len(ps) == 2 and ps[1].startswith("smollm2") and "256" in ps[1] and "forever" in ps[1]
        assert json.loads(_ok(cli("ps", "--json", env=env)))["models"][0]["context_length"] == 256
        assert "not loaded" in _one_line_error(cli("stop", "llama3.2:1b", env=env))  # never loads it
        assert "unloaded smollm2" in _ok(cli("stop", "smollm2", env=env))
        assert _ok(cli("ps", env=env)).splitlines()[1:] == []
    finally:
        cli("daemon", "stop", "--timeout", "20", env=env)


# -- 5. serve: a port in use, and the request log ------------------------------------------------


def test_serve_on_a_port_in_use_is_one_line_and_says_nothing_first(cli: Runner) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = _one_line_error(cli("serve", "--port", str(port)))
        assert line == f"hearth: error: port {port} is in use; pick another with --port"
        line = _one_line_error(cli("serve", "--port", str(_free_port()), "--ollama-port", str(port)))
        assert line.endswith(f"port {port} is in use; pick another with --ollama-port")


@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[tuple[str, Path]]:
    """``hearth serve`` with SmolLM2 loaded at startup; yields (base URL, its stderr file)."""
    port = _free_port()
    err = root / "serve.err"
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "hearth", "serve", "--port", str(port), "--model", "smollm2",
                                 "--n-ctx", "256", "--parallel", "1"], stdout=subprocess.DEVNULL, stderr=f,
                                env=_env(root), cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None, err.read_text()
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.3)
        yield url, err
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        return json.loads(r.read())


def test_serve_logs_one_line_per_request_without_the_prompt(server: tuple[str, Path]) -> None:
    url, err = server
    _post(url + "/api/generate", {"model": "smollm2", "prompt": "xyzzy-secret say hi", "stream": False,
                                  "options": {"num_predict": 3, "temperature": 0}})
    _post(url + "/v1/chat/completions", {"model": "smollm2", "max_tokens": 2,
                                         "messages": [{"role": "user", "content": "plugh-secret"}]})
    time.sleep(0.3)
    log = err.read_text()
    assert "xyzzy" not in log and "plugh" not in log
    gen = [ln for ln in log.splitlines() if "POST /api/generate" in ln]
    chat = [ln for ln in log.splitlines() if "POST /v1/chat/completions" in ln]
    assert len(gen) == 1 and len(chat) == 1, log
    # time | status | seconds | client | method path | model | tokens
    assert re.search(r"\| 200 \| +\d+\.\d+s \| 127\.0\.0\.1 \| POST /api/generate \| smollm2\S* \| \d+\+3 tokens$",
                     gen[0]), gen[0]
    assert re.search(r"\| 200 \| .* \| smollm2\S* \| \d+\+\d tokens$", chat[0]), chat[0]
    assert log.index("serving on") < log.index("POST /api/generate")


def test_ps_and_stop_on_a_server_given_host(cli: Runner, server: tuple[str, Path]) -> None:
    url, _ = server
    host = url.removeprefix("http://")
    ps = _ok(cli("ps", "--host", host)).splitlines()
    assert len(ps) == 2 and ps[1].startswith("smollm2")
    assert "unloaded smollm2" in _ok(cli("stop", "smollm2", "--host", url))
    assert _ok(cli("ps", "--host", host)).splitlines()[1:] == []


def test_request_log_can_be_silenced(cli: Runner, root: Path) -> None:
    for how in (["--quiet"], []):
        port = _free_port()
        extra = {} if how else {"HEARTH_REQUEST_LOG": "0"}
        proc = subprocess.Popen([sys.executable, "-m", "hearth", "serve", "--port", str(port), *how],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=_env(root, **extra), cwd=root)
        try:
            deadline = time.monotonic() + TIMEOUT
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                        break
                except OSError:
                    assert proc.poll() is None and time.monotonic() < deadline
                    time.sleep(0.3)
        finally:
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=30)
        assert "serving on" in stderr and "GET /health" not in stderr, stderr


# -- 6. flags ------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,start", [
    (["--threads", "-2"], "hearth: error: --threads must be"),
    (["-t", "0"], "hearth: error: -t must be"),
    (["--n-ctx", "0"], "hearth: error: --n-ctx must be"),
    (["--ctx", "8"], "hearth: error: --ctx must be"),
    (["--parallel", "0"], "hearth: error: --parallel must be"),
    (["--temp", "-1"], "hearth: error: --temp must be"),
    (["--top-p", "2"], "hearth: error: --top-p must be"),
], ids=["threads", "t", "n-ctx", "ctx", "parallel", "temp", "top-p"])
def test_a_bad_flag_value_names_the_flag_as_typed(cli: Runner, argv: list[str], start: str) -> None:
    line = _one_line_error(cli("run", "-p", "hi", *argv))
    assert line.startswith(start), line
    assert "n_threads" not in line and "n_ctx" not in line


def test_an_argparse_type_error_is_one_line_with_where_to_read_more(cli: Runner) -> None:
    line = _one_line_error(cli("run", "--threads", "x", "-p", "hi"))
    assert line == "hearth: error: --threads: invalid int value: 'x'; see hearth run --help"
    line = _one_line_error(cli("bench", "-r", "many"))
    assert line.startswith("hearth: error: -r: invalid int value") and line.endswith("see hearth bench --help")


@pytest.mark.parametrize("argv,hint", [
    (["rnu"], "unknown command 'rnu'; did you mean run?"),
    (["mdoels", "list"], "did you mean models?"),
    (["models", "pul", "x"], "unknown action 'pul' for hearth models; did you mean pull?"),
    (["daemon", "statsu"], "did you mean status?"),
    (["run", "--temprature", "1", "-p", "hi"], "unknown option --temprature (did you mean --temperature?)"),
], ids=["command", "command-2", "nested", "daemon", "flag"])
def test_a_mistyped_command_or_flag_gets_did_you_mean(cli: Runner, argv: list[str], hint: str) -> None:
    assert hint in _one_line_error(cli(*argv))


def test_gpu_layers_without_a_gpu_says_so_once_in_run(cli: Runner) -> None:
    from hearth.hardware import llama_gpus

    r = cli("run", "-p", "hi", "--gpu-layers", "4", *TINY)
    _ok(r)
    notes = [ln for ln in r.stderr.splitlines() if "--gpu-layers" in ln]
    if llama_gpus():
        assert notes == []
    else:
        assert notes == [("hearth: note: --gpu-layers has no effect: llama.cpp has no GPU backend here; "
                          "running on the CPU")]


def test_v_after_the_command_means_what_it_means_before(cli: Runner) -> None:
    quiet = cli("run", "-p", "hi", *TINY)
    after = cli("run", "-p", "hi", "-vv", *TINY)
    before = cli("-v", "run", "-v", "-p", "hi", *TINY)  # counted together: -vv
    _ok(quiet), _ok(after), _ok(before)
    assert "hearth.llama_cpp" not in quiet.stderr
    assert "hearth.llama_cpp" in after.stderr and "hearth.llama_cpp" in before.stderr
    assert _ok(cli("config", "-v", "--json")) and _ok(cli("models", "list", "-v"))


def test_daemon_help_lists_no_hidden_action(cli: Runner) -> None:
    out = _ok(cli("daemon", "--help"))
    assert "SUPPRESS" not in out and "serve-foreground" not in out
    for action in ("start", "status", "stop", "reload"):
        assert action in out


def test_every_option_and_command_has_help() -> None:
    from hearth.cli import SERVE_FOREGROUND, build_parser

    missing: list[str] = []

    def walk(p: argparse.ArgumentParser, path: str) -> None:
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                listed = {c.dest: c.help for c in a._choices_actions}
                for name, sub in a.choices.items():
                    if name != SERVE_FOREGROUND and not any(a.choices.get(n) is sub and h for n, h in listed.items()):
                        missing.append(f"{path} {name} (command)")
                    walk(sub, f"{path} {name}")
            elif not a.help or a.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(a.option_strings) or a.dest}")

    walk(build_parser(), "hearth")
    assert missing == []


# -- 7. shell completion ------------------------------------------------------------------------

COMMANDS = ("run", "chat", "info", "bench", "serve", "daemon", "models", "config", "pull", "list", "ls", "rm",
            "show", "ps", "stop", "completion")


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_script_is_valid_and_names_the_commands(cli: Runner, tmp_path: Path, shell: str) -> None:
    text = _ok(cli("completion", shell))
    for word in (*COMMANDS, "recommend", "gpu-layers", "json"):  # fish writes options without dashes
        assert word in text, word
    assert "serve-foreground" not in text and "SUPPRESS" not in text
    exe = shutil.which(shell)
    if exe is None:
        pytest.skip(f"{shell} is not installed: the script's syntax is not checked")
    f = tmp_path / f"hearth.{shell}"
    f.write_text(text)
    r = subprocess.run([exe, "-n", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr, r.stderr


def test_bash_completion_completes_commands_actions_options_and_choices(cli: Runner, tmp_path: Path) -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    f = tmp_path / "hearth.bash"
    f.write_text(_ok(cli("completion", "bash")))
    probe = f"""source {f}
t() {{ COMP_WORDS=("$@"); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 )); COMPREPLY=(); _hearth; echo "${{COMPREPLY[*]}}"; }}
t hearth r
t hearth models p
t hearth run --thr
t hearth completion ''
t hearth -v daemon st
"""
    r = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["run rm", "pull", "--threads --threads-batch", "bash zsh fish",
                                     "start status stop"]
