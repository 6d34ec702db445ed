"""The ``hearth`` command line, run as a real subprocess on the real SmolLM2 model.

Every subprocess gets HEARTH_CONFIG pointing at an absent file and HEARTH_HOME at a
temporary folder (and no other HEARTH_* variable, nor llama-server's or Ollama's that
hearth reads), so the user's settings never leak in.
Generation is kept short (<= 32 tokens, n_ctx 512): the machine is small and shared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

import hearth

CTX = ["--n-ctx", "512"]
GREEDY = ["--max-tokens", "16", "--temperature", "0", *CTX]
PROMPT = "Name three colors."
TIMEOUT = 180

Runner = Callable[..., subprocess.CompletedProcess]


def _clean_env(sandbox: Path, **extra: str) -> dict[str, str]:
    from hearth.config import SETTINGS

    borrowed = {a.env for s in SETTINGS for a in s.aliases}  # llama-server's and Ollama's variables
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_") and k not in borrowed}
    env["HEARTH_CONFIG"] = str(sandbox / "absent-config.toml")
    env["HEARTH_HOME"] = str(sandbox / "home")
    env["PYTHONIOENCODING"] = "utf-8"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hearth-cli")


@pytest.fixture(scope="module")
def cli(sandbox: Path) -> Runner:
    """Run ``python -m hearth ARGS`` in a clean environment; stdin is empty unless given."""

    def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "hearth", *args],
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            encoding="utf-8",
            env=_clean_env(sandbox, **(env or {})),
            cwd=sandbox,
            timeout=TIMEOUT,
        )

    return run


def _ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in r.stderr
    return r.stdout


def _assert_one_line_error(r: subprocess.CompletedProcess) -> str:
    """Exit 2, stderr exactly one non-empty 'hearth: error:' line, no traceback anywhere."""
    assert r.returncode == 2, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{r.stderr}"
    line = lines[0]
    assert line.startswith("hearth: error:") and line[len("hearth: error:"):].strip(), line
    return line


@pytest.fixture(scope="module")
def greedy_text(cli: Runner) -> str:
    """The greedy answer to PROMPT through ``run -p``, computed once for the module."""
    out = _ok(cli("run", "-p", PROMPT, *GREEDY))
    assert out.strip()
    return out


# -- run ------------------------------------------------------------------------


def test_run_greedy_prints_text_and_is_deterministic(cli: Runner, greedy_text: str) -> None:
    again = _ok(cli("run", "-p", PROMPT, *GREEDY))
    assert again.strip()
    assert again == greedy_text


def test_run_json_prints_one_object_with_text_usage_and_timings(cli: Runner, greedy_text: str) -> None:
    out = _ok(cli("run", "--json", "-p", PROMPT, *GREEDY))
    assert len([ln for ln in out.splitlines() if ln.strip()]) == 1
    obj = json.loads(out)  # the whole stdout is exactly one JSON document
    assert isinstance(obj, dict)
    assert isinstance(obj["text"], str) and obj["text"].strip()
    # the same greedy request, streamed or not, gives the same text
    assert obj["text"].strip() == greedy_text.strip()
    assert obj["finish_reason"] in ("length", "stop")
    usage = obj["usage"]
    assert usage["prompt_tokens"] > 0
    assert 0 < usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    t = obj["timings"]
    assert t["ttft"] > 0
    assert t["prompt_tokens_per_second"] > 0
    assert t["generation_tokens_per_second"] >= 0


def test_run_reads_the_prompt_from_piped_stdin(cli: Runner, greedy_text: str) -> None:
    out = _ok(cli("run", *GREEDY, stdin=PROMPT))
    assert out.strip()
    assert out == greedy_text  # the piped text was the prompt, exactly as with -p


def test_run_model_with_multiline_piped_stdin_answers_and_exits(cli: Runner) -> None:
    # README: "hearth run [MODEL] [-p PROMPT]  stream an answer (stdin when piped; no prompt: chat)"
    r = cli("run", "smollm2", "--max-tokens", "8", "--temperature", "0", *CTX, stdin="hi\n/bye\n")
    assert _ok(r).strip()


def test_chat_answers_a_piped_line_and_exits_at_eof(cli: Runner) -> None:
    out = _ok(cli("chat", "--max-tokens", "8", "--temperature", "0", *CTX, stdin="hello\n"))
    assert out.strip()


def test_chat_stops_reading_lines_at_bye(cli: Runner) -> None:
    greedy = ["--max-tokens", "8", "--temperature", "0", *CTX]
    one = _ok(cli("chat", *greedy, stdin="hello\n"))
    with_bye = _ok(cli("chat", *greedy, stdin="hello\n/bye\nWhat is the capital of France?\n"))
    assert with_bye == one  # nothing after /bye was answered


def test_same_seed_same_output_at_nonzero_temperature(cli: Runner) -> None:
    args = ["run", "-p", "Tell me a story.", "--seed", "42", "--temperature", "0.9", "--max-tokens", "12", *CTX]
    a = _ok(cli(*args))
    b = _ok(cli(*args))
    assert a.strip()
    assert a == b


def test_stop_string_ends_the_output_before_it(cli: Runner, greedy_text: str) -> None:
    text = greedy_text.strip()
    candidates = [w for w in text.split() if len(w) >= 3 and text.find(w) > 0]
    assert candidates, f"no usable stop string in the greedy output {text!r}"
    stop = candidates[len(candidates) // 2]
    out = _ok(cli("run", "-p", PROMPT, *GREEDY, "--stop", stop)).strip()
    assert stop not in out
    assert text.startswith(out)
    assert len(out) < len(text)


def test_grammar_constrains_output_to_yes_or_no(cli: Runner) -> None:
    out = _ok(cli("run", "-p", "Is the sky blue?", "--grammar", 'root ::= "yes" | "no"',
                  "--max-tokens", "8", "--temperature", "0", *CTX))
    assert out.strip() in ("yes", "no")


def test_json_schema_constrains_output_to_a_matching_object(cli: Runner) -> None:
    schema = '{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}'
    out = _ok(cli("run", "-p", "Give me a JSON object.", "--json-schema", schema,
                  "--max-tokens", "32", "--temperature", "0", *CTX))
    obj = json.loads(out)
    assert isinstance(obj, dict)
    assert isinstance(obj["a"], int) and not isinstance(obj["a"], bool)


# -- info, bench ----------------------------------------------------------------


def test_info_json_reports_model_plan_and_hardware(cli: Runner) -> None:
    d = json.loads(_ok(cli("info", "--json", *CTX)))
    assert d["model"]["architecture"] == "llama"
    assert d["plan"]["n_ctx"] == 512
    assert d["hardware"]["physical_cores"] >= 1


def test_info_text_names_the_quantization(cli: Runner) -> None:
    out = _ok(cli("info", *CTX))
    assert "Q4_1" in out
    assert "llama" in out


def test_bench_json_reports_speeds_and_peak_memory(cli: Runner) -> None:
    d = json.loads(_ok(cli("bench", "-p", "16", "-n", "8", "-r", "1", "--json", *CTX)))
    assert d["n_prompt"] == 16 and d["n_gen"] == 8 and d["repetitions"] == 1
    assert d["pp_tokens_per_second"] > 0
    assert d["tg_tokens_per_second"] > 0
    assert d["peak_rss_bytes"] > 0


# -- config ---------------------------------------------------------------------


def _settings(r: subprocess.CompletedProcess) -> dict:
    return json.loads(_ok(r))["settings"]


def test_config_shows_env_as_the_source_of_an_env_setting(cli: Runner) -> None:
    s = _settings(cli("config", "--json", env={"HEARTH_N_CTX": "1234"}))
    assert s["n_ctx"]["value"] == 1234
    assert s["n_ctx"]["source"] == "env"
    assert s["port"]["source"] == "default"


def test_config_shows_file_as_the_source_of_a_file_setting(cli: Runner, tmp_path: Path) -> None:
    f = tmp_path / "config.toml"
    f.write_text("n_ctx = 999\n", encoding="utf-8")
    r = cli("config", "--json", env={"HEARTH_CONFIG": str(f)})
    d = json.loads(_ok(r))
    assert d["config_file"] == str(f)
    assert d["settings"]["n_ctx"] == {**d["settings"]["n_ctx"], "value": 999, "source": "file"}


def test_config_env_beats_config_file(cli: Runner, tmp_path: Path) -> None:
    f = tmp_path / "config.toml"
    f.write_text("n_ctx = 999\n", encoding="utf-8")
    s = _settings(cli("config", "--json", env={"HEARTH_CONFIG": str(f), "HEARTH_N_CTX": "1234"}))
    assert (s["n_ctx"]["value"], s["n_ctx"]["source"]) == (1234, "env")


def test_config_invalid_env_value_is_a_one_line_error(cli: Runner) -> None:
    line = _assert_one_line_error(cli("config", "--json", env={"HEARTH_N_CTX": "abc"}))
    assert "HEARTH_N_CTX" in line


def test_config_out_of_range_env_value_names_the_variable(cli: Runner) -> None:
    line = _assert_one_line_error(cli("config", env={"HEARTH_N_CTX": "0"}))
    assert "HEARTH_N_CTX" in line


# -- bad input: one line on stderr, exit 2 ----------------------------------------


@pytest.fixture(scope="module")
def bad_files(sandbox: Path, smollm2_path: Path) -> dict[str, Path]:
    d = sandbox / "bad"
    d.mkdir()
    corrupt = d / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    truncated = d / "truncated.gguf"
    with open(smollm2_path, "rb") as f:
        truncated.write_bytes(f.read(1024 * 1024))
    st = d / "x.safetensors"
    st.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return {"corrupt": corrupt, "truncated": truncated, "safetensors": st, "dir": d}


LONG_PROMPT = " ".join(f"word{i % 50}" for i in range(2000))

BAD_INPUTS: dict[str, tuple[Callable[[dict[str, Path]], list[str]], str]] = {
    # id: (argv builder, a word the message must contain)
    "missing-file": (lambda f: ["run", "/nonexistent/x.gguf", "-p", "hi"], "no such file"),
    "directory": (lambda f: ["run", str(f["dir"]), "-p", "hi"], "directory"),
    "corrupt-gguf": (lambda f: ["run", str(f["corrupt"]), "-p", "hi"], "corrupt.gguf"),
    "truncated-gguf": (lambda f: ["run", str(f["truncated"]), "-p", "hi"], "truncated.gguf"),
    "safetensors-file": (lambda f: ["run", str(f["safetensors"]), "-p", "hi"], "convert_hf_to_gguf"),
    "unknown-model-name": (lambda f: ["run", "nosuchmodel", "-p", "hi"], "smollm2"),
    "prompt-longer-than-context": (lambda f: ["run", "-p", LONG_PROMPT, "--n-ctx", "256", "--max-tokens", "8"], "context"),
    "negative-max-tokens": (lambda f: ["run", "-p", "hi", "--max-tokens", "-2", *CTX], "--max-tokens"),
    "negative-temperature": (lambda f: ["run", "-p", "hi", "--temperature", "-0.5", *CTX], "temperature"),
    "json-schema-not-json": (lambda f: ["run", "-p", "hi", "--json-schema", "not json", *CTX], "json-schema"),
    "zero-context": (lambda f: ["run", "-p", "hi", "--n-ctx", "0"], "--n-ctx"),  # the flag, as typed
    "negative-threads": (lambda f: ["run", "-p", "hi", "--threads", "-2", *CTX], "--threads"),
    "info-on-corrupt-gguf": (lambda f: ["info", str(f["corrupt"])], "corrupt.gguf"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_error_line(cli: Runner, bad_files: dict[str, Path], case: str) -> None:
    argv, must_mention = BAD_INPUTS[case]
    line = _assert_one_line_error(cli(*argv(bad_files)))
    assert must_mention.lower() in line.lower()


def test_invalid_grammar_exits_2_with_a_hearth_error_and_no_traceback(cli: Runner) -> None:
    r = cli("run", "-p", "hi", "--grammar", "root ::= (", "--max-tokens", "4", *CTX)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    last = r.stderr.splitlines()[-1]
    assert last.startswith("hearth: error:") and "grammar" in last
    assert "ERROR hearth.llama_cpp" not in r.stderr  # llama.cpp's log stays quiet without -v


def test_invalid_grammar_is_a_one_line_error(cli: Runner) -> None:
    _assert_one_line_error(cli("run", "-p", "hi", "--grammar", "root ::= (", "--max-tokens", "4", *CTX))


# -- version, help --------------------------------------------------------------


def test_version_flag_prints_the_version(cli: Runner) -> None:
    out = _ok(cli("--version"))
    assert out.strip() == f"hearth {hearth.__version__}"


def test_console_script_version_exits_0(sandbox: Path) -> None:
    script = Path(sys.executable).parent / "hearth"
    if not script.is_file():
        pytest.skip(f"no console script at {script}")
    r = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                       env=_clean_env(sandbox), timeout=TIMEOUT)
    assert r.returncode == 0 and r.stdout.strip() == f"hearth {hearth.__version__}"


def test_help_lists_the_commands(cli: Runner) -> None:
    out = _ok(cli("--help"))
    for command in ("run", "chat", "info", "bench", "config"):
        assert command in out


# -- llama-server's spellings of the loading flags -----------------------------------------


def test_info_takes_llama_server_spellings_of_the_loading_flags(cli: Runner) -> None:
    plan = json.loads(_ok(cli("info", "--json", "-b", "128", "-ub", "64", "-ctk", "q8_0", "-ngl", "0",
                              "-tb", "2", "-fa", "off", *CTX)))["plan"]
    assert (plan["n_batch"], plan["n_ubatch"], plan["kv_type"]) == (128, 64, "q8_0")
    assert (plan["n_gpu_layers"], plan["n_threads_batch"], plan["flash_attn"]) == (0, 2, False)


def test_config_shows_another_programs_variable_as_the_source(cli: Runner) -> None:
    s = _settings(cli("config", "--json", env={"OLLAMA_KEEP_ALIVE": "10m", "LLAMA_ARG_N_PARALLEL": "2"}))
    assert (s["keep_alive"]["value"], s["keep_alive"]["source"]) == ("10m", "env:OLLAMA_KEEP_ALIVE")
    assert (s["parallel"]["value"], s["parallel"]["source"]) == (2, "env:LLAMA_ARG_N_PARALLEL")


def test_config_bad_alias_value_is_a_one_line_error_naming_it(cli: Runner) -> None:
    line = _assert_one_line_error(cli("config", env={"OLLAMA_NUM_PARALLEL": "x"}))
    assert "OLLAMA_NUM_PARALLEL: expected an integer, got 'x'" in line
