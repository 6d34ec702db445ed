"""The terminal chat of ``hearth run`` (no prompt) and ``hearth chat``, as ``ollama run``.

One loop for both back ends: a model loaded in this process (``ModelBackend``) and the
daemon (``DaemonBackend``). A back end has ``answer(messages, settings, write) -> (text,
result)`` (``write`` gets each piece of text as it streams; ``result`` is the
``GenerationResult.to_dict()`` shape) and ``cancel()``; the loop owns everything else:

- Ctrl-C during an answer stops that answer only: the request is cancelled (its slot
  freed), what was printed stays in the conversation as the assistant's (partial)
  reply, and the prompt comes back; an answer cut before any text drops the turn.
  Ctrl-C at an empty prompt says how to leave; Ctrl-D leaves (exit 0).
- Line editing and a history kept across sessions (stdlib ``readline``), in the user's
  state dir, mode 0600, the last ``HISTORY_LENGTH`` entries.
- A ``\"\"\"`` block or a bracketed paste is one turn, newlines and all.
- ``/help``, ``/set``, ``/show``, ``/clear``, ``/save``, ``/load``, ``/bye``.

Stdlib only at import, so the daemon path stays fast; readline and platformdirs load
only for a terminal. The chat's own messages go to stderr, answers to stdout; with
stdin not a terminal (piped) there is no banner and no prompt.
"""

from __future__ import annotations

import json
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Iterable, Protocol, TextIO

    Message = dict[str, str]
    Write = Callable[[str], None]

    class Backend(Protocol):
        label: str

        def answer(self, messages: list[Message], settings: dict[str, Any],
                   write: Write) -> tuple[str, dict[str, Any]]: ...

        def cancel(self) -> None: ...

        def show(self, settings: dict[str, Any]) -> tuple[list[tuple[str, str]], dict[str, Any] | None]: ...

from .errors import HearthError

PROG = "hearth"
PROMPT = ">>> "
CONTINUATION = "... "
EXIT_HINT = "Use Ctrl-D or /bye to exit."
HISTORY_NAME = "chat_history"  # one JSON string per line: entries may hold newlines
HISTORY_LENGTH = 1000
SAVE_FORMAT = "hearth-chat"
LEAVE = ("/bye", "/exit", "/quit")
ROLES = ("system", "user", "assistant")


class ChatEnded(HearthError):
    """The back end is gone (the daemon stopped): the chat cannot go on."""

    exit_code = 1


# -- settings (/set NAME VALUE) ---------------------------------------------------------


def _number(kind: type) -> Callable[[list[str]], Any]:
    def parse(words: list[str]) -> Any:
        if len(words) != 1:
            raise ValueError("takes one value")
        try:
            return kind(words[0])
        except ValueError:
            raise ValueError(f"{words[0]!r} is not {'an integer' if kind is int else 'a number'}") from None

    return parse


def _limit(words: list[str]) -> int | None:
    n = _number(int)(words)
    return None if n == -1 else n  # -1: no limit, as llama.cpp and Ollama


def _seed(words: list[str]) -> int | None:
    if len(words) == 1 and words[0].lower() in ("random", "none"):
        return None
    return _number(int)(words)


def _words(words: list[str]) -> list[str]:
    if not words:
        raise ValueError("takes one or more strings")
    return words


# the name /set takes (and Ollama's spellings) -> (GenerationParams field, parser)
PARAMETERS: dict[str, tuple[str, Callable[[list[str]], Any]]] = {
    "temperature": ("temperature", _number(float)),
    "top_p": ("top_p", _number(float)),
    "top_k": ("top_k", _number(int)),
    "min_p": ("min_p", _number(float)),
    "repeat_penalty": ("repeat_penalty", _number(float)),
    "repeat_last_n": ("repeat_last_n", _number(int)),
    "presence_penalty": ("presence_penalty", _number(float)),
    "frequency_penalty": ("frequency_penalty", _number(float)),
    "seed": ("seed", _seed),
    "max_tokens": ("max_tokens", _limit),
    "num_predict": ("max_tokens", _limit),
    "stop": ("stop", _words),
}
SETTING_FIELDS = tuple(dict.fromkeys(f for f, _ in PARAMETERS.values()))


def split_settings(kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The command line's generation keywords: (the rest: grammar, schema; those /set changes)."""
    settings = {k: v for k, v in kw.items() if k in SETTING_FIELDS}
    return {k: v for k, v in kw.items() if k not in settings}, settings


def check_settings(settings: dict[str, Any]) -> None:
    """Raise BadRequest (one line) unless these are valid generation settings."""
    from .types import GenerationParams  # validates on construction; loaded only when needed

    GenerationParams.from_kwargs(**settings)


# -- the verbose statistics, as `ollama run --verbose` ------------------------------------


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s" if seconds >= 1 else f"{seconds * 1000:.2f}ms"


def stats_lines(result: dict[str, Any]) -> list[str]:
    """Ollama's summary of one answer, from a ``GenerationResult.to_dict()``."""
    usage = result.get("usage") or {}
    t = result.get("timings") or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    rows = [
        ("total duration", _duration(t.get("total_seconds", 0.0))),
        ("time to first token", _duration(t.get("ttft", 0.0))),
        ("prompt eval count", f"{usage.get('prompt_tokens', 0)} token(s)"),
        ("cached tokens", f"{cached} token(s)"),
        ("prompt eval duration", _duration(t.get("prompt_seconds", 0.0))),
        ("prompt eval rate", f"{t.get('prompt_tokens_per_second', 0.0):.2f} tokens/s"),
        ("eval count", f"{usage.get('completion_tokens', 0)} token(s)"),
        ("eval duration", _duration(t.get("generation_seconds", 0.0))),
        ("eval rate", f"{t.get('generation_tokens_per_second', 0.0):.2f} tokens/s"),
    ]
    return [f"{name + ':':<22}{value}" for name, value in rows]


# -- history across sessions -------------------------------------------------------------


def history_path() -> str:
    from platformdirs import user_state_dir

    return os.path.join(user_state_dir("hearth", appauthor=False), HISTORY_NAME)


class History:
    """readline's history, kept in a file of the user's own (0600), bounded in length.
    A file that cannot be read or written only costs the history, never the chat."""

    def __init__(self, readline: Any, path: str, length: int = HISTORY_LENGTH) -> None:
        self.readline = readline
        self.path = path
        self.length = length
        self.last: str | None = None

    def load(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            return
        entries = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, str) and entry:
                entries.append(entry)
        kept = entries[-self.length:]
        for entry in kept:
            self.readline.add_history(entry)
        self.last = kept[-1] if kept else None
        if len(kept) != len(lines):  # over the bound, or lines that were not ours: rewrite
            self._write(kept, "w")

    def add(self, entry: str) -> None:
        if not entry or entry == self.last:
            return
        self.last = entry
        self.readline.add_history(entry)
        self._write([entry], "a")

    def _write(self, entries: Iterable[str], mode: str) -> None:
        data = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "a" else os.O_TRUNC)
            fd = os.open(self.path, flags, 0o600)
            try:
                os.fchmod(fd, 0o600)  # a file made before, or by someone's umask, gets ours
                os.write(fd, data.encode("utf-8"))
            finally:
                os.close(fd)
        except OSError:
            pass


def _setup_readline() -> Any:
    """readline with our history and bracketed paste; None where there is none."""
    try:
        import readline
    except ImportError:  # Windows, or a Python built without it: plain input()
        return None
    readline.set_auto_history(False)  # the loop adds whole turns, not each line of a block
    if "libedit" not in (readline.__doc__ or ""):
        # GNU readline turns the terminal's bracketed paste on while it reads, and inserts a
        # paste (newlines and all) as one line; libedit has no such thing
        readline.parse_and_bind("set enable-bracketed-paste on")
    return readline


# -- the loop ----------------------------------------------------------------------------

HELP = """Available commands:
  /set            Set session variables (/set alone lists them)
  /show           Show the model, how it is loaded, and the settings
  /load <file>    Load a conversation saved with /save
  /save <file>    Save the conversation (messages and settings) as JSON
  /clear          Clear the conversation
  /bye            Exit
  /?, /help       Help for a command

Use \"\"\" to begin a multi-line message; a paste is one message.
Ctrl-C stops an answer; Ctrl-D or /bye leaves."""

SET_HELP = """Available /set commands:
  /set temperature <n>      Sampling temperature (0: greedy)
  /set top_p <n>            Nucleus sampling
  /set top_k <n>            Top-k sampling
  /set min_p <n>            Min-p sampling
  /set repeat_penalty <n>   Repetition penalty
  /set seed <n|random>      Random seed
  /set max_tokens <n>       Tokens per answer at most (also num_predict; -1: no limit)
  /set stop <s> [<s> ...]   Stop strings
  /set system <text>        Set the system message
  /set verbose              Show statistics after each answer
  /set quiet                Do not show them
(/set parameter <name> <value> works too, as in Ollama.)"""


class Chat:
    """The conversation and the terminal around it."""

    def __init__(self, backend: Backend, *, system: str | None = None, settings: dict[str, Any] | None = None,
                 verbose: bool = False, stdin: TextIO | None = None, stdout: TextIO | None = None,
                 stderr: TextIO | None = None) -> None:
        self.backend = backend
        self.messages: list[Message] = [{"role": "system", "content": system}] if system else []
        self.settings = dict(settings or {})
        self.verbose = verbose
        self.stdin = stdin or sys.stdin
        self.out = stdout or sys.stdout
        self.err = stderr or sys.stderr
        self.interactive = self.stdin.isatty()
        self.history: History | None = None

    # -- output --------------------------------------------------------------------------

    def say(self, text: str) -> None:
        self.out.flush()
        print(text, file=self.err, flush=True)

    def error(self, text: str) -> None:
        self.say(f"{PROG}: {text}")

    # -- input ---------------------------------------------------------------------------

    def _input(self, prompt: str) -> str:
        if self.interactive:
            return input(prompt)
        line = self.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def read(self) -> tuple[str, bool]:
        """The next input: (text, is a message whatever it starts with). A \"\"\" block
        runs until a line that ends with \"\"\"; a paste may hold newlines already."""
        line = self._input(PROMPT)
        start = line.lstrip()
        if not start.startswith('"""'):
            return line, "\n" in line.strip()
        body = start[3:]
        if body.rstrip().endswith('"""'):
            return body.rstrip()[:-3], True
        parts = [body]
        while True:
            more = self._input(CONTINUATION)
            if more.rstrip().endswith('"""'):
                parts.append(more.rstrip()[:-3])
                return "\n".join(parts), True
            parts.append(more)

    # -- running -------------------------------------------------------------------------

    def run(self) -> int:
        if self.interactive:
            readline = _setup_readline()
            if readline is not None:
                self.history = History(readline, history_path())
                self.history.load()
            self.say(f"{self.backend.label} · /? for help, Ctrl-D or /bye to leave")
        while True:
            try:
                text, message = self.read()
            except EOFError:
                if self.interactive:
                    self.out.write("\n")
                    self.out.flush()
                return 0
            except KeyboardInterrupt:
                self._interrupted_input()
                continue
            try:
                done = self.handle(text, message)
            except KeyboardInterrupt:  # between an answer's end and its bookkeeping
                self.out.write("\n")
                self.out.flush()
                continue
            if done is not None:
                return done

    def _interrupted_input(self) -> None:
        buffer = ""
        if self.history is not None:
            try:
                buffer = self.history.readline.get_line_buffer()
            except Exception:  # noqa: BLE001 - only a nicety
                buffer = ""
        self.out.write("\n")
        self.out.flush()
        if not buffer.strip():
            self.say(EXIT_HINT)

    def handle(self, text: str, message: bool) -> int | None:
        """One input; an exit code when the chat ends."""
        stripped = text.strip()
        if not stripped:
            return None
        if self.history is not None:
            self.history.add(stripped)
        if stripped.startswith("/") and not message:
            return self.command(stripped)
        return self.turn(stripped)

    def turn(self, text: str) -> int | None:
        user = {"role": "user", "content": text}
        pieces: list[str] = []

        def write(piece: str) -> None:
            pieces.append(piece)
            self.out.write(piece)
            self.out.flush()

        try:
            reply, result = self.backend.answer([*self.messages, user], dict(self.settings), write)
        except KeyboardInterrupt:
            self._cancel()
            self.out.write("\n\n" if self.interactive else "\n")
            self.out.flush()
            partial = "".join(pieces)
            if partial.strip():  # keep what was shown: the model sees what the user saw
                self.messages += [user, {"role": "assistant", "content": partial}]
            return None
        except HearthError as e:
            if pieces:
                self.out.write("\n")
            self.error(f"error: {e}")
            return e.exit_code if isinstance(e, ChatEnded) else None
        self.messages += [user, {"role": "assistant", "content": reply}]
        self.out.write("\n")
        self.out.flush()
        if self.verbose:
            for line in stats_lines(result):
                self.say(line)
        if self.interactive:
            self.out.write("\n")
            self.out.flush()
        return None

    def _cancel(self) -> None:
        while True:  # a second Ctrl-C must not leave the request running
            try:
                self.backend.cancel()
                return
            except KeyboardInterrupt:
                continue

    # -- commands ------------------------------------------------------------------------

    def command(self, line: str) -> int | None:
        word, _, rest = line.partition(" ")
        name, rest = word.lower(), rest.strip()
        if name in LEAVE:
            return 0
        if name in ("/?", "/help"):
            self.say(SET_HELP if rest.lower().lstrip("/") == "set" else HELP)
        elif name == "/set":
            self.set(rest)
        elif name == "/show":
            self.show()
        elif name == "/clear":
            self.clear()
        elif name == "/save":
            self.save(rest)
        elif name == "/load":
            self.load(rest)
        else:
            self.say(f"Unknown command '{word}'. Type /? for help")
        return None

    def set(self, rest: str) -> None:
        words = rest.split()
        if not words:
            self.say(SET_HELP)
            return
        key = words[0].lower()
        if key == "system":
            text = rest[len(words[0]):].strip()
            if not text:
                self.error("usage: /set system <text>")
                return
            self.messages = [m for m in self.messages if m["role"] != "system"]
            self.messages.insert(0, {"role": "system", "content": text})
            self.say("Set system message.")
            return
        if key in ("verbose", "quiet") and len(words) == 1:
            self.verbose = key == "verbose"
            self.say(f"Set '{key}' mode.")
            return
        if key == "parameter":
            words = words[1:]
            if not words:
                self.error("usage: /set parameter <name> <value>")
                return
            key = words[0].lower()
        if key not in PARAMETERS:
            self.error(f"unknown setting '{words[0]}'. Type /set to list them")
            return
        field, parse = PARAMETERS[key]
        try:
            value = parse(words[1:])
        except ValueError as e:
            self.error(f"/set {key}: {e}")
            return
        try:
            check_settings({field: value})
        except HearthError as e:
            self.error(f"/set {key}: {e}")
            return
        self.settings[field] = value
        self.say(f"Set parameter '{key}' to '{' '.join(words[1:])}'")

    def show(self) -> None:
        try:
            rows, effective = self.backend.show(dict(self.settings))
        except HearthError as e:
            self.error(f"error: {e}")
            return
        w = 19
        lines = [k if v == "" else f"  {k:<{w}}{v}" for k, v in rows]
        lines.append("Settings")
        values = effective if effective is not None else self.settings
        for field in SETTING_FIELDS:
            if field in values:
                v = values[field]
                shown = ("no limit" if field == "max_tokens" else "random") if v is None else (
                    " ".join(map(json.dumps, v)) or "(none)" if isinstance(v, list) else v)
                mark = " (set)" if effective is not None and field in self.settings else ""
                lines.append(f"  {field:<{w}}{shown}{mark}")
        if effective is None:
            lines.append("  (the rest: the model's defaults)")
        system = next((m["content"] for m in self.messages if m["role"] == "system"), None)
        lines.append(f"  {'system':<{w}}{json.dumps(system, ensure_ascii=False) if system else '(none)'}")
        lines.append(f"  {'verbose':<{w}}{'on' if self.verbose else 'off'}")
        turns = sum(1 for m in self.messages if m["role"] == "user")
        lines.append(f"Conversation\n  {turns} turn(s), {len(self.messages)} message(s)")
        self.say("\n".join(lines))

    def clear(self) -> None:
        kept = [m for m in self.messages if m["role"] == "system"]
        if len(kept) == len(self.messages):
            self.say("Nothing to clear.")
            return
        if self.interactive:
            try:
                answer = input(f"Clear the conversation ({len(self.messages) - len(kept)} messages)? [y/N] ")
            except (EOFError, KeyboardInterrupt):
                answer = ""
                self.out.write("\n")
            if answer.strip().lower() not in ("y", "yes"):
                self.say("Kept the conversation.")
                return
        self.messages = kept
        self.say("Cleared session context.")

    def save(self, path: str) -> None:
        if not path:
            self.error("usage: /save <file>")
            return
        path = os.path.expanduser(path)
        data = {"format": SAVE_FORMAT, "version": 1, "model": self.backend.label, "messages": self.messages,
                "settings": {**self.settings, "verbose": self.verbose}}
        try:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False, indent=2)
                f.write("\n")
        except OSError as e:
            self.error(f"cannot save {path}: {e.strerror or e}")
            return
        self.say(f"Saved {len(self.messages)} message(s) to {path}")

    def load(self, path: str) -> None:
        if not path:
            self.error("usage: /load <file>")
            return
        path = os.path.expanduser(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            messages, settings, verbose = _conversation(data)
        except OSError as e:
            self.error(f"cannot load {path}: {e.strerror or e}")
            return
        except (ValueError, HearthError) as e:  # not JSON, not UTF-8, not a conversation
            reason = f"not JSON ({e.msg} at line {e.lineno})" if isinstance(e, json.JSONDecodeError) else str(e)
            self.error(f"cannot load {path}: {' '.join(reason.split())}")
            return
        self.messages, self.settings = messages, settings
        if verbose is not None:
            self.verbose = verbose
        self.say(f"Loaded {len(messages)} message(s) from {path}")


def _conversation(data: Any) -> tuple[list[Message], dict[str, Any], bool | None]:
    """Messages, settings and verbose from a /save file; ValueError says what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise ValueError("not a conversation saved by /save (no \"messages\" list)")
    messages = []
    for i, m in enumerate(data["messages"]):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ValueError(f"message {i + 1} is not a {{role: system|user|assistant, content: text}} object")
        messages.append({"role": m["role"], "content": m["content"]})
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise ValueError("\"settings\" is not an object")
    settings = dict(settings)
    verbose = settings.pop("verbose", None)
    if verbose is not None and not isinstance(verbose, bool):
        raise ValueError("\"verbose\" is not true or false")
    unknown = sorted(set(settings) - set(SETTING_FIELDS))
    if unknown:
        raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
    check_settings(settings)
    return messages, settings, verbose


# -- back ends ---------------------------------------------------------------------------


def _size(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


class ModelBackend:
    """A model loaded in this process; ``cancel()`` cancels the running request's handle."""

    def __init__(self, model: Any, base: dict[str, Any]) -> None:
        self.model = model
        self.base = dict(base)  # the command line's generation flags; /set goes on top
        self.label = f"{model.name} · n_ctx {model.plan.n_ctx}"
        self._handle: Any = None

    def _params(self, settings: dict[str, Any]) -> Any:
        from .types import GenerationParams

        return GenerationParams.from_kwargs(**{**self.base, **settings})

    def answer(self, messages: list[Message], settings: dict[str, Any], write: Write) -> tuple[str, dict[str, Any]]:
        text, params = self.model.chat_prompt(messages, self._params(settings), "cli")
        handle = self._handle = self.model.submit(text, params)
        for chunk in handle:  # Ctrl-C here: the handle cancels itself too as the loop unwinds
            if chunk.text:
                write(chunk.text)
        result = handle.result_now
        return result.text, result.to_dict()

    def cancel(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None and handle.result_now is None:
            handle.cancel()  # the slot is freed within one scheduler step

    def show(self, settings: dict[str, Any]) -> tuple[list[tuple[str, str]], dict[str, Any]]:
        m, plan, info = self.model, self.model.plan, self.model.info
        rows = [("Model", ""), ("name", m.name), ("path", str(info.path)), ("architecture", info.architecture),
                ("parameters", f"{info.parameters / 1e9:.2f}B" if info.parameters >= 1e9
                 else f"{info.parameters / 1e6:.0f}M"),
                ("quantization", info.quantization), ("context", f"{info.context_length} (trained)"),
                ("Plan", ""), ("n_ctx", f"{plan.n_ctx} per slot"), ("slots", str(plan.parallel)),
                ("threads", f"{plan.n_threads} (batch {plan.n_threads_batch})"),
                ("GPU layers", f"{plan.n_gpu_layers} of {info.block_count}"),
                ("memory", f"RAM {_size(plan.memory.ram)}, VRAM {_size(plan.memory.vram)}")]
        resolved = self.model.params(self._params(settings), "cli")
        effective = {f: getattr(resolved, f) for f in SETTING_FIELDS if resolved.is_set(f)}
        effective.update({k: v for k, v in {**self.base, **settings}.items() if k in SETTING_FIELDS})
        return rows, effective


class DaemonBackend:
    """The daemon, on a fresh connection for each answer: the daemon closes idle keep-alive
    connections after a few seconds, and a person types slower than that. ``cancel()``
    closes the connection mid-answer; the daemon, seeing its client gone, cancels the
    request and frees the slot."""

    def __init__(self, client: Any, model: str | None, base: dict[str, Any], label: str,
                 connect: Callable[[], Any], stream: Callable[..., dict[str, Any]]) -> None:
        self.client = client  # the connection the CLI probed the daemon with (closed at the first use)
        self.model = model
        self.base = dict(base)
        self.label = label
        self.connect = connect  # -> a DaemonClient, or None when the daemon is gone
        self.stream = stream  # (client, request, on_text) -> the result dict

    def _fresh(self) -> Any:
        self.close()
        self.client = self.connect()
        if self.client is None:
            raise ChatEnded("lost the daemon: it does not answer any more")
        return self.client

    def answer(self, messages: list[Message], settings: dict[str, Any], write: Write) -> tuple[str, dict[str, Any]]:
        request = {"model": self.model, "messages": messages, "config": {**self.base, **settings}}
        try:
            result = self.stream(self._fresh(), request, write)
        except HearthError as e:
            self.close()
            if e.exit_code == 1 and not isinstance(e, ChatEnded):  # lost it, or it failed: gone?
                self._fresh()
                self.close()
            raise
        self.close()
        return result.get("text", ""), result

    def cancel(self) -> None:
        self.close()

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            import socket

            try:
                client.sock.shutdown(socket.SHUT_RDWR)  # the daemon sees the end at once
            except OSError:
                pass
            client.close()

    def show(self, settings: dict[str, Any]) -> tuple[list[tuple[str, str]], None]:
        from .client import DaemonError

        try:
            status = self._fresh().get_json("/daemon/status")
        except (OSError, ValueError, DaemonError) as e:
            raise HearthError(f"the daemon did not say: {e}") from None
        finally:
            self.close()
        models = status.get("models") or []
        want = (self.model or "").lower()
        entry = next((e for e in models if want and want in (e.get("name", "").lower(), e.get("path"))), None)
        entry = entry or (models[0] if models else None)
        rows = [("Model", ""), ("daemon", f"pid {status.get('pid')} · {status.get('socket')}")]
        if entry is None:
            rows.append(("name", f"{self.model or 'default model'} (not loaded yet)"))
            return rows, None
        rows += [("name", entry.get("name", "?")), ("path", entry.get("path", "?")), ("Plan", ""),
                 ("n_ctx", f"{entry.get('n_ctx')} per slot"), ("slots", str(entry.get("parallel")))]
        if "n_threads" in entry:
            rows.append(("threads", str(entry["n_threads"])))
        if "n_gpu_layers" in entry:
            rows.append(("GPU layers", str(entry["n_gpu_layers"])))
        rows.append(("memory", f"RAM {_size(entry.get('ram_bytes', 0))}, VRAM {_size(entry.get('vram_bytes', 0))}"))
        return rows, None
