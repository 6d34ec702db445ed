"""The terminal chat (``hearth chat``, ``hearth run`` without a prompt), in a real terminal.

pexpect drives ``python -m hearth chat`` on the embedded SmolLM2 in a pseudo-terminal as
a person would: typing, arrow keys, pastes, Ctrl-C, Ctrl-D. Every session has its own
HOME, XDG_STATE_HOME (where the history file goes), HEARTH_HOME and config under a
temporary folder, so nothing of the user's is read or written; a daemon started here has
its own runtime dir and is stopped (killed if need be) at the end.

The machine is small and shared: n_ctx 2048 in process (512 on the daemon), greedy, and
answers of a few tokens except the long one that Ctrl-C cuts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from hearth.chatloop import HISTORY_NAME, History, _conversation, split_settings, stats_lines
from hearth.client import DaemonClient
from hearth.errors import HearthError

pexpect = pytest.importorskip("pexpect")

TIMEOUT = 120
PROMPT = ">>> "
LONG = "Write a long story about a dragon who collects teapots."
SHORT = "What is the capital of France?"
CSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z~]")  # bracketed-paste mode switches, cursor moves
STATS = ("total duration:", "time to first token:", "prompt eval count:", "cached tokens:",
         "prompt eval duration:", "prompt eval rate:", "eval count:", "eval duration:", "eval rate:")
HEAVY = re.compile(r"\|\s+(llama_cpp|numpy|fastapi|pydantic|starlette)(\.|\s*$)", re.M)


def _env(root: Path, **extra: str) -> dict[str, str]:
    from hearth.config import SETTINGS

    borrowed = {a.env for s in SETTINGS for a in s.aliases}  # llama-server's and Ollama's variables
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_") and k not in borrowed}
    env.update(HOME=str(root / "home"), XDG_STATE_HOME=str(root / "state"), HEARTH_HOME=str(root / "hearth"),
               HEARTH_CONFIG=str(root / "absent-config.toml"), HEARTH_RUNTIME_DIR=str(root / "rt"),
               TERM="xterm", PYTHONIOENCODING="utf-8")
    env.update(extra)
    return env


def _clean(text: str) -> str:
    return CSI.sub("", text).replace("\r", "")


class Term:
    """One ``python -m hearth ARGS`` in a pseudo-terminal."""

    def __init__(self, root: Path, args: tuple[str, ...], env: dict[str, str]) -> None:
        self.root = root
        self.child = pexpect.spawn(sys.executable, ["-m", "hearth", *args], env=env, cwd=str(root),
                                   encoding="utf-8", codec_errors="replace", timeout=TIMEOUT, dimensions=(60, 250))
        self.transcript: list[str] = []

    def expect(self, pattern: str, timeout: float = TIMEOUT, exact: bool = True) -> str:
        """Wait for ``pattern``; returns what came before it, without escape sequences."""
        c = self.child
        try:
            if exact:
                c.expect_exact(pattern, timeout=timeout)
            else:
                c.expect(pattern, timeout=timeout)
        except (pexpect.TIMEOUT, pexpect.EOF) as e:
            raise AssertionError(f"no {pattern!r} in time; the terminal showed:\n{_clean(str(c.before))[-3000:]}") \
                from e
        self.transcript.append(c.before + str(c.after))
        return _clean(c.before)

    def prompt(self, timeout: float = TIMEOUT) -> str:
        return self.expect(PROMPT, timeout)

    def do(self, line: str, timeout: float = TIMEOUT) -> str:
        """Type a line and Enter; what it printed until the next prompt."""
        self.child.sendline(line)
        return self.prompt(timeout)

    def start_answer(self, question: str, words: int = 8) -> None:
        """Ask and wait until the answer has streamed a few words."""
        self.child.sendline(question)
        self.expect(question)  # readline's echo of the typing
        self.expect(r"\n\W*(\w+\W+){" + str(words) + "}", exact=False)

    def ctrl_c(self) -> None:
        self.child.sendintr()

    def leave(self) -> int:
        """Ctrl-D at the prompt: the exit status."""
        self.child.sendeof()
        self.child.expect(pexpect.EOF, timeout=30)
        self.child.close()
        return self.child.exitstatus

    def save(self, name: str = "conv.json") -> dict[str, Any]:
        path = self.root / name
        out = self.do(f"/save {path}")
        assert f"to {path}" in out, out
        return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Callable[..., Term]]:
    made: list[Term] = []

    def spawn(*args: str, root: Path | None = None, env: dict[str, str] | None = None) -> Term:
        r = root or tmp_path
        t = Term(r, args, env or _env(r))
        made.append(t)
        return t

    yield spawn
    for t in made:
        t.child.close(force=True)


def chat(terminal: Callable[..., Term], *flags: str, **kw: Any) -> Term:
    """``hearth chat --no-daemon`` on the embedded model, at its first prompt."""
    t = terminal("chat", "--no-daemon", "--n-ctx", "2048", *flags, **kw)
    banner = t.prompt()
    assert "/? for help" in banner and "Ctrl-D or /bye" in banner, banner
    return t


# -- Ctrl-C and Ctrl-D ----------------------------------------------------------------------


def test_ctrl_c_mid_answer_stops_only_that_answer_and_keeps_the_turn(terminal: Callable[..., Term]) -> None:
    t = chat(terminal)
    assert "Set parameter 'temperature' to '0'" in t.do("/set temperature 0")
    t.do("/set max_tokens 400")
    t.start_answer(LONG)
    t0 = time.monotonic()
    t.ctrl_c()
    t.prompt(timeout=15)
    assert time.monotonic() - t0 < 10, "the prompt should come back at once, not after 400 tokens"
    t.do("/set max_tokens 12")
    answer = t.do(SHORT)
    assert answer.replace(SHORT, "").strip(), "the next question was not answered"
    saved = t.save()
    roles = [m["role"] for m in saved["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"], saved["messages"]
    assert saved["messages"][0]["content"] == LONG
    partial = saved["messages"][1]["content"]
    assert len(partial.split()) >= 5, partial  # what was shown is kept
    assert saved["settings"] == {"temperature": 0.0, "max_tokens": 12, "verbose": False}
    assert t.leave() == 0


def test_ctrl_c_at_an_empty_prompt_says_how_to_leave_and_ctrl_d_leaves_with_0(
        terminal: Callable[..., Term]) -> None:
    t = chat(terminal)
    t.ctrl_c()
    assert "Use Ctrl-D or /bye to exit." in t.prompt(timeout=10)
    t.child.send("half a sentence")
    t.expect("sentence", timeout=10)
    time.sleep(0.3)  # readline is back waiting for keys (a signal during a key's handling waits for the next)
    t.ctrl_c()  # a line being typed is dropped, no hint
    assert "Use Ctrl-D" not in t.prompt(timeout=10)
    t.child.sendeof()
    t.child.expect(pexpect.EOF, timeout=30)
    assert t.child.before.endswith("\n")  # the shell's prompt starts on a line of its own
    t.child.close()
    assert t.child.exitstatus == 0


def test_run_without_a_prompt_chats_and_bye_leaves_with_0(terminal: Callable[..., Term]) -> None:
    t = terminal("run", "--no-daemon", "--n-ctx", "2048")
    assert "/? for help" in t.prompt()
    t.child.sendline("/bye")
    t.child.expect(pexpect.EOF, timeout=30)
    t.child.close()
    assert t.child.exitstatus == 0


# -- history and line editing ---------------------------------------------------------------


def test_arrow_up_recalls_the_last_input_and_the_history_survives_a_restart(
        terminal: Callable[..., Term], tmp_path: Path) -> None:
    flags = ("--max-tokens", "6", "--temperature", "0")
    t = chat(terminal, *flags)
    t.do(SHORT)
    t.child.send("\x1b[A")  # arrow up: the question again, ready to edit
    t.expect(SHORT, timeout=10)
    t.child.send("\r")
    t.prompt()
    assert [m["content"] for m in t.save()["messages"] if m["role"] == "user"] == [SHORT, SHORT]
    assert t.leave() == 0

    path = tmp_path / "state" / "hearth" / HISTORY_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert SHORT in entries and entries[-1].startswith("/save ")

    again = chat(terminal, *flags)
    again.child.send("\x1b[A\x1b[A")  # past the /save, to the question of the last session
    again.expect(SHORT, timeout=10)
    again.child.send("\r")
    again.prompt()
    assert [m["content"] for m in again.save("again.json")["messages"] if m["role"] == "user"] == [SHORT]
    assert again.leave() == 0


def test_history_is_bounded_private_and_keeps_multi_line_entries(tmp_path: Path) -> None:
    class FakeReadline:
        def __init__(self) -> None:
            self.items: list[str] = []

        def add_history(self, s: str) -> None:
            self.items.append(s)

    path = tmp_path / "state" / HISTORY_NAME
    h = History(FakeReadline(), str(path), length=5)
    h.load()  # no file yet: nothing, no error
    for i in range(8):
        h.add(f"line {i}\nand more")
    h.add("line 7\nand more")  # the same twice in a row: once
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text().splitlines()) == 8
    with open(path, "a") as f:
        f.write("not json\n")
    rl = FakeReadline()
    History(rl, str(path), length=5).load()
    assert rl.items == [f"line {i}\nand more" for i in range(3, 8)]
    assert len(path.read_text().splitlines()) == 5  # rewritten to its bound


# -- multi-line input ----------------------------------------------------------------------


def test_a_bracketed_paste_of_three_lines_is_one_turn(terminal: Callable[..., Term]) -> None:
    t = chat(terminal, "--max-tokens", "6", "--temperature", "0")
    assert "\x1b[?2004h" in t.transcript[-1]  # the terminal is asked to bracket pastes
    t.child.send("\x1b[200~Here are three words:\napple\nbanana\x1b[201~")
    t.child.send("\r")
    t.prompt()
    user = [m["content"] for m in t.save()["messages"] if m["role"] == "user"]
    assert user == ["Here are three words:\napple\nbanana"]


def test_a_triple_quoted_block_is_one_turn(terminal: Callable[..., Term]) -> None:
    t = chat(terminal, "--max-tokens", "6", "--temperature", "0")
    t.child.sendline('"""')
    t.expect("... ")
    t.child.sendline("first line")
    t.expect("... ")
    t.child.sendline('second line"""')
    t.prompt()
    t.child.sendline('"""one line, quoted"""')
    t.prompt()
    user = [m["content"] for m in t.save()["messages"] if m["role"] == "user"]
    assert user == ["first line\nsecond line", "one line, quoted"]


# -- commands ------------------------------------------------------------------------------


def test_help_set_unknown_commands_and_bad_values_stay_in_the_chat(terminal: Callable[..., Term]) -> None:
    t = chat(terminal)
    out = t.do("/help")
    assert "/set" in out and "/show" in out and "/save" in out and '"""' in out
    assert "Available commands" in t.do("/?")
    assert "/set temperature" in t.do("/set")
    assert "Set parameter 'temperature' to '0.2'" in t.do("/set temperature 0.2")
    for bad, says in (("/set temperature hot", "is not a number"), ("/set top_p 2", "top_p must be in"),
                      ("/set top_k", "takes one value"), ("/set nosuch 1", "unknown setting 'nosuch'"),
                      ("/set system", "usage: /set system")):
        _, _, out = t.do(bad).partition("\n")
        out = out.strip()
        assert says in out and len(out.splitlines()) == 1, (bad, out)
    assert "Unknown command '/x'. Type /? for help" in t.do("/x")
    assert "Set system message." in t.do("/set system You answer in one word.")
    t.do("/set num_predict 7")
    t.do("/set seed 42")
    out = t.do("/show")
    for shown in ("n_ctx", "2048", "slots", "threads", "GPU layers", "memory", "smollm2"):
        assert shown in out, (shown, out)
    assert re.search(r"temperature\s+0\.2 \(set\)", out) and re.search(r"max_tokens\s+7 \(set\)", out), out
    assert "You answer in one word." in out
    saved = t.save()
    assert saved["messages"] == [{"role": "system", "content": "You answer in one word."}]  # /x was not sent
    assert saved["settings"] == {"temperature": 0.2, "max_tokens": 7, "seed": 42, "verbose": False}


def test_clear_asks_first_and_save_load_restore_the_conversation(terminal: Callable[..., Term],
                                                                 tmp_path: Path) -> None:
    t = chat(terminal, "--max-tokens", "6", "--temperature", "0")
    t.do(SHORT)
    saved = t.save("before.json")
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]

    t.child.sendline("/clear")
    t.expect("[y/N] ")
    t.child.sendline("n")
    assert "Kept" in t.prompt()
    assert len(t.save("kept.json")["messages"]) == 2
    t.child.sendline("/clear")
    t.expect("[y/N] ")
    t.child.sendline("y")
    assert "Cleared" in t.prompt()
    assert t.save("cleared.json")["messages"] == []

    t.do("/set temperature 0.5")
    assert "Loaded 2 message(s)" in t.do(f"/load {tmp_path / 'before.json'}")
    restored = t.save("restored.json")
    assert restored["messages"] == saved["messages"] and restored["settings"] == saved["settings"]

    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "wrong.json").write_text(json.dumps({"messages": [{"role": "robot", "content": 1}]}))
    for name, says in (("bad.json", "not JSON"), ("wrong.json", "message 1 is not"),
                       ("missing.json", "No such file")):
        out = t.do(f"/load {tmp_path / name}").partition("\n")[2].strip()
        assert says in out and len(out.splitlines()) == 1, (name, out)
    assert t.save("after.json")["messages"] == saved["messages"]  # a bad file changes nothing
    assert "cannot save" in t.do(f"/save {tmp_path / 'no' / 'such' / 'dir.json'}")
    assert t.leave() == 0


def test_conversation_files_are_checked_before_anything_changes() -> None:
    ok = {"messages": [{"role": "user", "content": "hi"}], "settings": {"temperature": 0.5, "verbose": True}}
    assert _conversation(ok) == ([{"role": "user", "content": "hi"}], {"temperature": 0.5}, True)
    for bad in ([], {"messages": "hi"}, {"messages": [{"role": "user"}]},
                {"messages": [], "settings": {"temperature": -1}}, {"messages": [], "settings": {"grammar": "x"}},
                {"messages": [], "settings": {"verbose": "yes"}}):
        with pytest.raises((ValueError, HearthError)):
            _conversation(bad)
    assert split_settings({"temperature": 0, "grammar": "root ::= x", "max_tokens": None}) == (
        {"grammar": "root ::= x"}, {"temperature": 0, "max_tokens": None})


# -- --verbose ------------------------------------------------------------------------------


def test_verbose_prints_ollamas_statistics_after_each_answer(terminal: Callable[..., Term]) -> None:
    t = chat(terminal, "--verbose", "--max-tokens", "6", "--temperature", "0")
    out = t.do(SHORT)
    for label in STATS:
        assert label in out, (label, out)
    assert re.search(r"^eval count:\s+[1-6] token\(s\)$", out, re.M), out
    assert re.search(r"^eval rate:\s+[\d.]+ tokens/s$", out, re.M), out
    assert "Set 'quiet' mode." in t.do("/set quiet")
    assert "eval rate:" not in t.do(SHORT)
    t.do("/set verbose")
    out = t.do("And of Italy?")
    assert "eval rate:" in out
    assert re.search(r"cached tokens:\s+[1-9]\d* token\(s\)", out), out  # the conversation so far was reused


def test_stats_lines_read_a_result_dict() -> None:
    lines = stats_lines({"usage": {"prompt_tokens": 26, "completion_tokens": 290,
                                   "prompt_tokens_details": {"cached_tokens": 20}},
                         "timings": {"ttft": 0.05, "prompt_seconds": 0.1, "generation_seconds": 3.2,
                                     "prompt_tokens_per_second": 260.0, "generation_tokens_per_second": 90.0,
                                     "total_seconds": 3.3}})
    assert lines == ["total duration:       3.300s", "time to first token:  50.00ms",
                     "prompt eval count:    26 token(s)", "cached tokens:        20 token(s)",
                     "prompt eval duration: 100.00ms", "prompt eval rate:     260.00 tokens/s",
                     "eval count:           290 token(s)", "eval duration:        3.200s",
                     "eval rate:            90.00 tokens/s"]


def test_run_with_a_prompt_and_verbose_prints_the_statistics_on_stderr(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "hearth", "run", "--no-daemon", "--n-ctx", "2048", "--max-tokens", "4",
                        "--temperature", "0", "--verbose", "-p", SHORT], capture_output=True, text=True,
                       env=_env(tmp_path), cwd=tmp_path, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "eval rate" not in r.stdout
    for label in STATS:
        assert label in r.stderr


def test_piped_chat_prints_only_answers_and_never_sends_commands(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "hearth", "chat", "--no-daemon", "--n-ctx", "2048", "--max-tokens", "4",
                        "--temperature", "0"], input=f"/x\n{SHORT}\n/bye\nnot this\n", capture_output=True, text=True,
                       env=_env(tmp_path), cwd=tmp_path, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and PROMPT not in r.stdout  # the answer, no prompt
    assert "Unknown command '/x'" in r.stderr and "/? for help," not in r.stderr  # no banner


# -- cancelling frees the slot -------------------------------------------------------------


def test_cancelling_an_answer_in_process_frees_its_slot(smollm2_path: Path) -> None:
    from hearth import load_model
    from hearth.chatloop import ModelBackend

    model = load_model(smollm2_path, n_ctx=512, parallel=1)
    try:
        backend = ModelBackend(model, {})
        pieces: list[str] = []

        def write(text: str) -> None:  # Ctrl-C arrives while the answer streams
            pieces.append(text)
            if len(pieces) == 5:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            backend.answer([{"role": "user", "content": LONG}], {"max_tokens": 400, "temperature": 0}, write)
        backend.cancel()
        deadline = time.monotonic() + 5
        while any(s["is_processing"] for s in model.engine.slot_states()) and time.monotonic() < deadline:
            time.sleep(0.05)
        (slot,) = model.engine.slot_states()
        assert not slot["is_processing"]
        assert slot["next_token"][0]["n_decoded"] < 50
        text, result = backend.answer([{"role": "user", "content": SHORT}], {"max_tokens": 4, "temperature": 0},
                                      lambda _: None)
        assert text and result["usage"]["completion_tokens"] <= 4
    finally:
        model.close()


# -- the same through the daemon -----------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def daemon_root(smollm2_path: Path) -> Iterator[Path]:
    """A daemon with one slot (n_ctx 512) in a runtime dir of its own (a short path: a Unix
    socket's must fit in 108 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="hc-", dir="/tmp"))
    env = _env(root, HEARTH_N_CTX="512")
    try:
        r = subprocess.run([sys.executable, "-m", "hearth", "daemon", "start", "--model", "smollm2", "--parallel", "1"],
                           capture_output=True, text=True, env=env, cwd=root, timeout=300)
        assert r.returncode == 0, r.stderr
        yield root
    finally:
        try:
            pid = int((root / "rt" / "hearth.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = None
        subprocess.run([sys.executable, "-m", "hearth", "daemon", "stop", "--timeout", "20"], capture_output=True,
                       env=env, cwd=root, timeout=120)
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def _slots(root: Path) -> list[dict[str, Any]]:
    c = DaemonClient.connect(root / "rt" / "hearth.sock", timeout=30)
    assert c is not None, "the daemon does not answer"
    with c:
        return c.get_json("/slots")


def test_ctrl_c_on_the_daemon_cancels_the_request_there_and_the_chat_goes_on(
        terminal: Callable[..., Term], daemon_root: Path) -> None:
    t = terminal("chat", root=daemon_root, env=_env(daemon_root, HEARTH_N_CTX="512"))
    assert "on the daemon" in t.prompt()
    time.sleep(6)  # longer than the daemon keeps an idle connection: the chat must not care
    t.do("/set temperature 0")
    t.do("/set max_tokens 400")
    t.start_answer(LONG)
    t.ctrl_c()
    t.prompt(timeout=15)
    deadline = time.monotonic() + 5  # the daemon sees its client leave and frees the slot
    while (slots := _slots(daemon_root)) and slots[0]["is_processing"] and time.monotonic() < deadline:
        time.sleep(0.1)
    (slot,) = slots
    assert not slot["is_processing"], slot
    assert slot["next_token"][0]["n_decoded"] < 100, slot  # stopped, not run to 400

    t.do("/set max_tokens 8")
    t0 = time.monotonic()
    answer = t.do(SHORT, timeout=60)
    assert answer.replace(SHORT, "").strip() and time.monotonic() - t0 < 30
    saved = t.save()
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant"]
    assert saved["messages"][0]["content"] == LONG and saved["messages"][1]["content"].strip()
    assert "pid" in t.do("/show")
    assert t.leave() == 0


def test_chat_on_the_daemon_imports_nothing_heavy(daemon_root: Path) -> None:
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "hearth", "chat", "--verbose"],
                       input=f"/set max_tokens 4\n/set temperature 0\n{SHORT}\n", capture_output=True, text=True,
                       env=_env(daemon_root, HEARTH_N_CTX="512"), cwd=daemon_root, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() and "eval rate:" in r.stderr
    heavy = sorted({m.group(1) for m in HEAVY.finditer(r.stderr)})
    assert heavy == [], f"hearth chat on the daemon imported {heavy}"
