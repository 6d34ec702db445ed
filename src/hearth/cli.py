"""The command line: parsing and printing only; the work is in the library."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

TYPE_CHECKING = False  # `hearth run` on the daemon imports nothing it does not use
if TYPE_CHECKING:
    from typing import Any, NoReturn, Sequence

from .errors import HearthError

PROG = "hearth"
DAEMON_PROBE_SECONDS = 3.0  # a daemon's /health must answer within this, or run/chat go in process
DAEMON_READ_SECONDS = 600.0  # the longest silence within a reply before giving up on the daemon
SERVE_FOREGROUND = "serve-foreground"  # the daemon's own process (hearth.daemon.SERVE_COMMAND)


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


# -- arguments ------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with hearth's errors: one line, the flag as the user typed it, a "did you
    mean" for a mistyped command or flag, and where to read more, not a usage block."""

    argv: Sequence[str] = ()  # the command line being parsed (set by main), to name flags as typed

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        import re

        m = re.match(r"argument (\S+): invalid choice: '([^']*)'", message)
        names = _command_names(self)
        if m and names:
            word = m.group(2)
            what = f"command {word!r}" if self.prog == PROG else f"action {word!r} for {self.prog}"
            close = _close(word, names)
            hint = f"; did you mean {close}?" if close else f" (one of: {', '.join(names)})"
            self.exit(2, f"{PROG}: error: unknown {what}{hint}\n")
        m = re.match(r"argument (\S+?): (.*)", message, re.S)
        if m:  # "argument --threads/-t: invalid int value" -> "--threads: invalid int value"
            message = f"{_typed(m.group(1).split('/'), self.argv)}: {m.group(2)}"
        self.exit(2, f"{PROG}: error: {' '.join(message.split())}; see {self.prog} --help\n")


def _command_names(p: argparse.ArgumentParser) -> list[str]:
    """The visible subcommands of ``p`` (aliases included)."""
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            visible = {id(a.choices[c.dest]) for c in a._choices_actions}
            return [n for n, sub in a.choices.items() if id(sub) in visible]
    return []


def _close(word: str, names: Sequence[str]) -> str | None:
    import difflib

    hit = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    return hit[0] if hit else None


def _typed(flags: Sequence[str], argv: Sequence[str]) -> str:
    """Of an option's spellings, the one on the command line (else its first long one)."""
    for tok in argv:
        for f in flags:
            if tok == f or (f.startswith("--") and tok.startswith(f + "=")) or (
                    not f.startswith("--") and len(f) == 2 and tok.startswith(f) and not tok.startswith("--")):
                return f
    return next((f for f in flags if f.startswith("--")), flags[0])


def _arg_type(convert_name: str):
    """An argparse type from one of config's converters (llama-server's value syntax)."""

    def convert(value: str) -> Any:
        from . import config

        try:
            return getattr(config, convert_name)(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = convert_name.strip("_")
    return convert


def _load_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("loading (override the planner)")
    g.add_argument("--n-ctx", "--ctx", dest="n_ctx", type=int, help="context length in tokens, per slot")
    g.add_argument("--threads", "-t", dest="n_threads", type=int, help="CPU threads")
    g.add_argument("--threads-batch", "-tb", dest="n_threads_batch", type=int,
                   help="CPU threads for prompt processing (default: --threads)")
    g.add_argument("--gpu-layers", "--n-gpu-layers", "-ngl", dest="n_gpu_layers", type=_arg_type("_llama_gpu_layers"),
                   metavar="N|all|auto",
                   help="layers on the GPU: a number, all (or -1), auto (as many as fit: the default)")
    g.add_argument("--batch-size", "-b", dest="n_batch", type=int, help="logical batch size")
    g.add_argument("--ubatch-size", "-ub", dest="n_ubatch", type=int, help="physical batch size")
    g.add_argument("--kv-type", "--cache-type-k", "-ctk", dest="kv_type",
                   help="KV cache type, for keys and values (f16, q8_0, q4_0, ...)")
    g.add_argument("--flash-attn", "-fa", dest="flash_attn", type=_arg_type("_llama_bool"), nargs="?", const=True,
                   metavar="on|off|auto", help="flash attention (default: auto, llama.cpp decides)")
    g.add_argument("--no-mmap", dest="use_mmap", action="store_const", const=False, help="read the model into RAM instead of mapping it")
    g.add_argument("--mlock", dest="use_mlock", action="store_const", const=True, help="lock the model in RAM")
    g.add_argument("--parallel", "-np", dest="parallel", type=int, help="concurrent requests (slots)")
    g.add_argument("--tensor-split", "-ts", dest="tensor_split", type=_arg_type("_floats"), metavar="N,N,...",
                   help="the share of the offloaded layers per device, as llama.cpp (default: by free memory)")
    g.add_argument("--device", "-dev", dest="devices", type=_arg_type("_names"), metavar="DEV,DEV,...",
                   help="llama.cpp devices to offload to (CUDA0, RPC0, ...; none: this CPU only)")
    g.add_argument("--hosts", dest="worker_hosts", default=None, metavar="HOST:PORT,...",
                   help="split the model across these machines' `hearth worker`s too (llama.cpp RPC; default "
                   "port 50052; default: HEARTH_HOSTS, else this machine only)")
    g.add_argument("--hosts-optional", dest="hosts_optional", action="store_const", const=True,
                   help="load without a worker that cannot be reached, instead of failing")


def _daemon_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-daemon", action="store_true",
                   help="run in this process even when the daemon is up (also HEARTH_NO_DAEMON=1)")


def _gen_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-tokens", "-n", type=int, default=None,
                   help="tokens to generate at most (default: the model's own, else 512; -1: no limit)")
    g.add_argument("--temperature", "--temp", type=float, default=None, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=None, help="sample from the K most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the tokens within this probability mass")
    g.add_argument("--min-p", type=float, default=None,
                   help="drop tokens less likely than this fraction of the most likely one")
    g.add_argument("--repeat-penalty", type=float, default=None, help="penalise repeated tokens (1: off)")
    g.add_argument("--seed", type=int, default=None, help="same seed, same output")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--grammar", default=None, help="GBNF grammar text, or @FILE")
    g.add_argument("--json-schema", default=None, help="constrain output to this JSON schema (text or @FILE)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Run local LLMs on llama.cpp with zero configuration.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log detail (-vv: llama.cpp's log too)")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="answer a prompt (or chat when no prompt is given)")
    r.add_argument("model", nargs="?", help="path to a .gguf or a known name (default: the embedded model)")
    r.add_argument("prompt_words", nargs="*", metavar="PROMPT", help="the prompt (or -p, or stdin)")
    r.add_argument("-p", "--prompt", help="the prompt")
    r.add_argument("--raw", action="store_true", help="complete the prompt as-is, without the chat template")
    r.add_argument("--system", help="system message")
    r.add_argument("--verbose", dest="stats", action="store_true",
                   help="after each answer, print token counts, speeds and timings (as ollama run --verbose)")
    r.add_argument("--json", action="store_true", help="print one JSON object: text, finish_reason, usage, timings")
    _daemon_flag(r)
    _gen_flags(r)
    _load_flags(r)

    c = sub.add_parser("chat", help="interactive chat (/bye to leave)")
    c.add_argument("model", nargs="?", help="path to a .gguf or a known name")
    c.add_argument("--system", help="system message")
    c.add_argument("--verbose", dest="stats", action="store_true",
                   help="after each answer, print token counts, speeds and timings (as ollama run --verbose)")
    _daemon_flag(c)
    _gen_flags(c)
    _load_flags(c)

    _info_args(sub.add_parser("info", help="what a model is, and how hearth would load it here "
                              "(a catalog model not pulled yet: from the catalog's facts)"))

    b = sub.add_parser("bench", help="prompt and generation speed, ttft and peak memory")
    b.add_argument("model", nargs="?", help="path to a .gguf or a known name")
    b.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens (default 512)")
    b.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens (default 128)")
    b.add_argument("-r", "--repetitions", type=int, default=3, help="runs of each measurement (default 3)")
    b.add_argument("--concurrency", "-c", default=None,
                   help="comma-separated levels, e.g. 1,2,4,8,16: aggregate tokens/s with that many requests at once")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    _load_flags(b)

    sv = sub.add_parser("serve", help="serve the OpenAI- and Ollama-compatible HTTP API",
                        description="Serve the OpenAI, Ollama, Anthropic and llama-server HTTP APIs. "
                        "llama-server's flags are accepted in its spelling (see the README: "
                        "Coming from llama-server or Ollama).")
    sv.add_argument("--host", dest="hosts", action="append", default=None,
                    help="address to listen on (repeatable: listen on each; default: 127.0.0.1, HEARTH_HOST)")
    sv.add_argument("--port", type=int, default=None, help="port (default: 11435, HEARTH_PORT)")
    sv.add_argument("--model", "-m", dest="models", action="append", default=[],
                    help="load this model at startup (repeatable); the first is the default for requests "
                    "that name none; others load on first request")
    sv.add_argument("--alias", "-a", dest="aliases", action="append", default=[],
                    help="the name clients use for the --model in the same position (default: its name, "
                    "or the file name for a path)")
    sv.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (default: HEARTH_API_KEY)")
    sv.add_argument("--models-dir", dest="models_dirs", action="append", default=None,
                    help="a directory whose .gguf files clients may use by file name or path (repeatable; "
                    "default: HEARTH_MODELS_DIR; otherwise clients name only models the store knows)")
    sv.add_argument("--cors-origins", dest="origins", default=None,
                    help="web origins allowed besides localhost's, comma-separated, * wildcards (HEARTH_ORIGINS)")
    sv.add_argument("--ollama-port", type=int, nargs="?", const=0, default=None, metavar="N",
                    help="listen on Ollama's port as well, so Ollama's clients reach hearth (default N: "
                    "OLLAMA_HOST's port, else 11434)")
    ls = sv.add_argument_group("llama-server's flags (same meaning unless said)")
    ls.add_argument("--ctx-size", "-c", dest="ctx_size", type=int, metavar="N",
                    help="context over all slots, as llama-server: each slot gets N / --parallel (--n-ctx is per "
                    "slot; give one). Without --parallel every slot gets N and the planner picks how many fit")
    ls.add_argument("--n-predict", "--predict", "-n", dest="n_predict", type=int, metavar="N",
                    help="tokens a request generates at most when it sets no limit (-1: no limit, the default)")
    ls.add_argument("--chat-template", metavar="NAME|JINJA",
                    help="use this chat template for every model: a llama.cpp built-in name (chatml, llama3, "
                    "gemma, mistral-v7, phi3, zephyr, deepseek3, ...) or Jinja text")
    ls.add_argument("--chat-template-file", metavar="PATH", help="use the Jinja chat template in this file")
    ls.add_argument("--jinja", action="store_true", help="accepted: hearth always renders templates with Jinja")
    ls.add_argument("--no-jinja", action="store_true",
                    help="accepted, no effect: hearth always renders templates with Jinja")
    ls.add_argument("--slots", action=argparse.BooleanOptionalAction, default=True,
                    help="serve GET /slots, each slot's state without any request's text (default: on, as "
                    "llama-server; --no-slots answers 501)")
    ls.add_argument("--metrics", action="store_true", help="accepted: hearth always serves /metrics (Prometheus)")
    ls.add_argument("--embedding", "--embeddings", dest="embedding", action="store_true",
                    help="accepted: every model serves embeddings here (/v1/embeddings, /embedding, /api/embed)")
    ls.add_argument("--pooling", metavar="TYPE",
                    help="embedding pooling: only mean (what hearth does) is available")
    sv.add_argument("--quiet", "-q", action="store_true",
                    help="no request log (one line per request on stderr; also HEARTH_REQUEST_LOG=0)")
    _load_flags(sv)

    d = sub.add_parser("daemon", help="keep models loaded in a background server, so run/chat start at once")
    dsub = d.add_subparsers(dest="daemon_command", metavar="ACTION", required=True)
    ds = dsub.add_parser("start", help="start the daemon and load its models (default: the configured model)")
    ds.add_argument("--model", "-m", dest="models", action="append", default=[], help="load this model (repeatable)")
    _load_flags(ds)
    dst = dsub.add_parser("status", help="pid, socket, uptime and loaded models (exit 1 when not running)")
    dst.add_argument("--json", action="store_true", help="print the status as JSON")
    dsp = dsub.add_parser("stop", help="stop after in-flight requests finish")
    dsp.add_argument("--timeout", type=float, default=None, help="seconds to wait before killing it")
    dsub.add_parser("reload", help="re-read the config and reload the models; running requests finish first")
    df = dsub.add_parser(SERVE_FOREGROUND)  # the daemon's own process; no help: not listed
    df.add_argument("--model", "-m", dest="models", action="append", default=[], help="load this model (repeatable)")
    _load_flags(df)

    m = sub.add_parser("models", help="pull, list, remove and recommend models")
    msub = m.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    _pull_args(msub.add_parser("pull", help=PULL_HELP))
    _list_args(msub.add_parser("list", help=LIST_HELP))
    _rm_args(msub.add_parser("rm", help=RM_HELP))
    mc = msub.add_parser("recommend", help="the best catalog model for this machine, and why")
    mc.add_argument("--code", action="store_true", help="a model for code rather than chat")
    mc.add_argument("--refresh", action="store_true",
                    help="measure the memory bandwidth again (it is measured once per machine and cached)")
    mc.add_argument("--json", action="store_true", help="print the recommendation as JSON")

    cf = sub.add_parser("config", help="show each effective setting and where it came from")
    cf.add_argument("--json", action="store_true", help="print the settings as JSON")

    # Ollama's verbs, for the same commands
    _pull_args(sub.add_parser("pull", help=f"{PULL_HELP} (= models pull)"))
    _list_args(sub.add_parser("list", aliases=["ls"], help=f"{LIST_HELP} (= models list)"))
    _rm_args(sub.add_parser("rm", help=f"{RM_HELP} (= models rm)"))
    _info_args(sub.add_parser("show", help="what a model is, and how hearth would load it here (= info)"))
    ps = sub.add_parser("ps", help="the models loaded in the daemon (or the server at --host): memory, "
                        "context, until when they stay loaded")
    _host_flag(ps)
    ps.add_argument("--json", action="store_true", help="print the server's /api/ps answer")
    st = sub.add_parser("stop", help="unload a model from the daemon (or the server at --host) now")
    st.add_argument("model", metavar="MODEL", help="the name `hearth ps` shows")
    _host_flag(st)

    wk = sub.add_parser("worker", help="serve this machine's devices to other hearth hosts (llama.cpp RPC)",
                        description="Serve this machine's CPU and GPUs to hearth on other machines, which split "
                        "models across them with --hosts. The RPC protocol has no authentication: anyone who "
                        "reaches the port can use and read the devices. Keep it on loopback (the default) with "
                        "an SSH tunnel, or on a trusted network or WireGuard.")
    wk.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1; another address warns: no authentication)")
    wk.add_argument("--port", type=int, default=50052, help="port (default 50052, as llama.cpp's rpc-server)")
    wk.add_argument("--devices", default=None,
                    help="comma-separated llama.cpp device names to serve (default: every local device; "
                    "`hearth worker --list-devices` shows them)")
    wk.add_argument("--list-devices", action="store_true", help="list this machine's devices and exit")
    wk.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: the physical cores)")
    wk.add_argument("--cache", default=None, metavar="DIR",
                    help="keep received tensors here, so a second load of a model does not resend them "
                    "(default: the user cache dir's hearth/rpc)")
    wk.add_argument("--no-cache", action="store_true", help="keep no tensor cache")
    wk.add_argument("--announce", action="store_true",
                    help="announce this worker on the local network (UDP broadcast) so `hearth workers` lists it "
                    "(default: off)")
    ws = sub.add_parser("workers", help="list the `hearth worker --announce`s heard on the local network")
    ws.add_argument("--timeout", type=float, default=3.0, help="seconds to listen (default 3)")
    ws.add_argument("--json", action="store_true", help="print JSON")

    co = sub.add_parser("completion", help="print a shell completion script (bash, zsh or fish)",
                        description="Print a completion script. bash: eval \"$(hearth completion bash)\" in "
                        "~/.bashrc; zsh: eval \"$(hearth completion zsh)\" in ~/.zshrc after compinit; fish: "
                        "hearth completion fish > ~/.config/fish/completions/hearth.fish")
    co.add_argument("shell", choices=("bash", "zsh", "fish"), help="the shell: bash, zsh or fish")
    _verbose_after(p)
    return p


PULL_HELP = "download a catalog model (NAME[:QUANT]) or hf.co/ORG/REPO[:QUANT]"
LIST_HELP = "models that run without a download (embedded, pulled, Ollama's)"
RM_HELP = "delete a model hearth pulled"


def _pull_args(p: argparse.ArgumentParser) -> None:
    p.set_defaults(models_command="pull")
    p.add_argument("names", nargs="+", metavar="NAME", help="NAME[:QUANT] from the catalog, or hf.co/ORG/REPO[:QUANT]")


def _list_args(p: argparse.ArgumentParser) -> None:
    p.set_defaults(models_command="list")
    p.add_argument("--catalog", action="store_true", help="list the catalog instead: what can be pulled")
    p.add_argument("--json", action="store_true", help="print the list as JSON")


def _rm_args(p: argparse.ArgumentParser) -> None:
    p.set_defaults(models_command="rm")
    p.add_argument("names", nargs="+", metavar="NAME", help="a model `hearth list` shows as pulled")


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="path to a .gguf or a known name (default: the configured model)")
    p.add_argument("--json", action="store_true", help="print model, hardware and plan as JSON")
    _load_flags(p)


def _host_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None, metavar="HOST[:PORT]|URL",
                   help="ask the hearth (or Ollama) server there instead of the daemon (port default 11435)")


def _verbose_after(p: argparse.ArgumentParser) -> None:
    """``-v`` after any subcommand too (``hearth serve -v``), counted with the one before it.
    ``run`` and ``chat`` take ``-v`` only: their ``--verbose`` prints timing statistics."""
    for a in p._actions:
        if not isinstance(a, argparse._SubParsersAction):
            continue
        for name, sub in a.choices.items():
            flags = [f for f in ("-v", "--verbose") if f not in sub._option_string_actions
                     and not (f == "--verbose" and name in ("run", "chat"))]
            if "-v" in flags:
                sub.add_argument(*flags, dest="verbose_after", action="count", default=argparse.SUPPRESS,
                                 help="log detail (-vv: llama.cpp's log too)")
            _verbose_after(sub)


def _version() -> str:
    from . import __version__

    return __version__


# -- commands -------------------------------------------------------------------


def _load_wishes(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("n_ctx", "n_threads", "n_threads_batch", "n_gpu_layers", "n_batch", "n_ubatch", "kv_type", "flash_attn",
            "use_mmap", "use_mlock", "parallel", "tensor_split", "devices", "hosts_optional")
    wishes = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if getattr(args, "worker_hosts", None) is not None:  # --hosts (serve's --host is where it listens)
        wishes["hosts"] = args.worker_hosts
    return wishes


def _file_or_text(v: str | None) -> str | None:
    if v and v.startswith("@"):
        try:
            with open(v[1:], encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            from .errors import BadRequest

            raise BadRequest(f"cannot read {v[1:]}: {e.strerror}") from None
    return v


def _gen_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The generation flags as GenerationParams keywords (only those given)."""
    from .errors import BadRequest

    kw: dict[str, Any] = {}
    if args.max_tokens is not None:
        kw["max_tokens"] = None if args.max_tokens == -1 else args.max_tokens  # -1: no limit, as llama.cpp
    for k in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "stop"):
        v = getattr(args, k)
        if v is not None:
            kw[k] = v
    grammar = _file_or_text(args.grammar)
    if grammar:
        kw["grammar"] = grammar
    schema = _file_or_text(args.json_schema)
    if schema:
        try:
            kw["json_schema"] = json.loads(schema)
        except json.JSONDecodeError as e:
            raise BadRequest(f"--json-schema is not valid JSON: {e.msg} at line {e.lineno}") from None
    return kw


def _gen_config(args: argparse.Namespace):
    from .types import GenerationParams

    return GenerationParams.from_kwargs(**_gen_kwargs(args))


# load flags -> the same flags for the daemon's process
_LOAD_ARGV = {"n_ctx": "--n-ctx", "n_threads": "--threads", "n_threads_batch": "--threads-batch",
              "n_gpu_layers": "--gpu-layers", "n_batch": "--batch-size", "n_ubatch": "--ubatch-size",
              "kv_type": "--kv-type", "parallel": "--parallel", "hosts": "--hosts"}


def _load_argv(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for k, v in _load_wishes(args).items():
        if k == "use_mmap":
            out.append("--no-mmap")
        elif k == "use_mlock":
            out.append("--mlock")
        elif k == "hosts_optional":
            out.append("--hosts-optional")
        elif k in ("tensor_split", "devices"):
            out += ["--tensor-split" if k == "tensor_split" else "--device", ",".join(map(str, v)) or "none"]
        elif k == "flash_attn":
            out += ["--flash-attn", "on" if v else "off"]
        else:
            out += [_LOAD_ARGV[k], str(v)]
    return out


def _load(args: argparse.Namespace):
    from .api import load_model
    from .config import load_config

    wishes = _load_wishes(args)
    if args.command in ("run", "chat") and "parallel" not in wishes and (
        load_config().sources["parallel"] == "default"
    ):
        # one user at a terminal: one slot, so start-up does not clear KV cells for four
        wishes["parallel"] = 1
    model = load_model(_resolve(args.model), **wishes)
    _gpu_note(wishes, model.hardware.gpus)
    return model


def _gpu_note(wishes: dict[str, Any], gpus: Any) -> None:
    """Say once that ``--gpu-layers`` does nothing on a machine llama.cpp sees no GPU on."""
    if wishes.get("n_gpu_layers") not in (None, 0) and not gpus:
        _say(f"note: {_typed(['--gpu-layers', '--n-gpu-layers', '-ngl'], _Parser.argv)} has no effect: "
             "llama.cpp has no GPU backend here; running on the CPU")


def _note(note: str, args: argparse.Namespace) -> str:
    """A planner note that starts with a setting the user gave as a flag names the flag."""
    if note.split(" ", 1)[0] not in _load_wishes(args):
        return note
    p = _Parser(prog=PROG)
    _load_flags(p)
    return _flag_message(note, p, _Parser.argv)


def _resolve(model: str | None):
    """The model on disk; a catalog or hf.co model is pulled first, with progress."""
    from .store import resolve_model

    return resolve_model(model, announce=_say)


def _stream_out(chunks) -> Any:
    out = sys.stdout
    gen = iter(chunks)
    while True:
        try:
            ch = next(gen)
        except StopIteration as stop:
            out.write("\n")
            out.flush()
            return stop.value
        if ch.text:
            out.write(ch.text)
            out.flush()


def _read_prompt(args: argparse.Namespace) -> str | None:
    """``-p`` or the words after the model, then piped stdin after a blank line
    (``git diff | hearth run -p "Review this:"``, as llm and Ollama take both); stdin
    alone when no prompt is given; None (chat) when stdin is a terminal and no prompt is
    given. An empty prompt is an error, not a request for nothing."""
    from .errors import BadRequest

    prompt = args.prompt
    if prompt is None and args.prompt_words:
        prompt = " ".join(args.prompt_words)
    piped = None if sys.stdin.isatty() else sys.stdin.read()
    if prompt is None and piped is None:
        return None
    parts = [t for t in (prompt, piped) if t and t.strip()]
    if not parts:
        raise BadRequest("the prompt is empty: give it with -p, as words after the model, or on stdin")
    return "\n\n".join(parts)


def cmd_run(args: argparse.Namespace) -> int:
    prompt = _read_prompt(args)
    if prompt is None:
        return cmd_chat(args)
    client = _daemon_client(args)
    if client is not None:
        with client:
            return _run_on_daemon(client, args, prompt)
    _setup_logging(args.verbose)
    cfg = _gen_config(args)  # validate before loading anything
    model = _load(args)
    try:
        if args.raw:
            text, gcfg = prompt, model.params(cfg, "cli")
        else:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            messages.append({"role": "user", "content": prompt})
            text, gcfg = model.chat_prompt(messages, cfg, "cli")
        if args.json:
            result = model.generate_text(text, gcfg)
            print(json.dumps(result.to_dict(), ensure_ascii=False))
        else:
            result = _stream_out(model.stream_text(text, gcfg))
            if getattr(args, "stats", False) and result is not None:
                _print_stats(result.to_dict())
    finally:
        model.close()
    return 0


def _print_stats(result: dict[str, Any]) -> None:
    from .chatloop import stats_lines

    sys.stdout.flush()
    print("\n".join(stats_lines(result)), file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> int:
    client = _daemon_client(args)
    if client is not None:
        with client:
            return _chat_on_daemon(client, args)
    _setup_logging(args.verbose)
    from .chatloop import ModelBackend, split_settings

    _gen_config(args)  # validate before loading anything
    base, settings = split_settings(_gen_kwargs(args))
    model = _load(args)
    try:
        return _chat_loop(args, ModelBackend(model, base), settings)
    finally:
        model.close()


# -- run and chat on the daemon (stdlib only: nothing heavy is imported on this path) ---


def _daemon_client(args: argparse.Namespace):
    """A connection to the daemon when one is up and may serve this command, else None.

    Loading flags (--n-ctx, --gpu-layers, ...) run in-process: the daemon's models are
    already planned and loaded with its own settings."""
    from .client import DaemonClient, DaemonError, daemon_disabled

    if getattr(args, "no_daemon", False) or daemon_disabled() or _load_wishes(args):
        return None
    client = DaemonClient.connect(timeout=DAEMON_PROBE_SECONDS)
    if client is None:
        return None
    try:  # a daemon that is stopped (SIGSTOP) or wedged accepts the connection and says nothing
        client.health()
    except (OSError, ValueError, DaemonError):
        client.close()
        _say(f"the daemon does not answer within {DAEMON_PROBE_SECONDS:.0f} s; running without it "
             "(`hearth daemon stop` or `hearth daemon status` to look)")
        return None
    client.sock.settimeout(DAEMON_READ_SECONDS)  # a reply may be slow to start (a model loading), not silent
    return client


def _model_spec(model: str | None) -> str | None:
    """A relative path means the caller's directory, not the daemon's."""
    if model and os.path.exists(model):
        return os.path.abspath(model)
    if model:
        from .store.registry import KNOWN_MODELS

        if model.strip().lower() not in KNOWN_MODELS:
            from .store import resolve_model

            resolve_model(model, announce=_say)  # a catalog or hf.co model not yet here: pull it now
    return model


def _daemon_stream(client, request: dict[str, Any], echo: bool, on_text=None) -> dict[str, Any]:
    """Stream one generation from the daemon; returns its result (GenerationResult.to_dict()).
    ``echo`` prints the text and a newline; ``on_text`` gets each piece instead."""
    from .client import DaemonError

    out = sys.stdout
    try:
        for event in client.generate(request):
            if "result" in event:
                if echo:
                    out.write("\n")
                    out.flush()
                return event["result"]
            if on_text is not None:
                on_text(event["text"])
            elif echo:
                out.write(event["text"])
                out.flush()
    except DaemonError as e:
        raise _DaemonRefused(e.message, e.status) from None
    except (OSError, ValueError) as e:  # the daemon went away mid-request, or sent garbage
        raise _DaemonRefused(f"lost the daemon: {e or type(e).__name__}", 500) from None
    raise _DaemonRefused("the daemon sent no result", 500)  # pragma: no cover


class _DaemonRefused(HearthError):
    """A daemon's error, with the exit code its HTTP status stands for."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.exit_code = {503: 3, 499: 130}.get(status, 1 if status >= 500 else 2)


def _run_on_daemon(client, args: argparse.Namespace, prompt: str) -> int:
    request: dict[str, Any] = {"model": _model_spec(args.model), "config": _gen_kwargs(args)}
    if args.raw:
        request.update(prompt=prompt, raw=True)
    else:
        request.update(prompt=prompt, system=args.system)
    result = _daemon_stream(client, request, echo=not args.json)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    elif getattr(args, "stats", False):
        _print_stats(result)
    return 0


def _chat_on_daemon(client, args: argparse.Namespace) -> int:
    from .chatloop import DaemonBackend, split_settings

    base, settings = split_settings(_gen_kwargs(args))

    def connect():
        from .client import DaemonClient

        c = DaemonClient.connect(timeout=DAEMON_PROBE_SECONDS)
        if c is not None:
            c.sock.settimeout(DAEMON_READ_SECONDS)
        return c

    def stream(c, request: dict[str, Any], on_text) -> dict[str, Any]:
        return _daemon_stream(c, request, echo=False, on_text=on_text)

    backend = DaemonBackend(client, _model_spec(args.model), base,
                            f"{args.model or 'default model'} · on the daemon", connect, stream)
    try:
        return _chat_loop(args, backend, settings)
    finally:
        backend.close()


def _chat_loop(args: argparse.Namespace, backend, settings: dict[str, Any]) -> int:
    """The terminal chat (hearth.chatloop), the same for a model here and on the daemon."""
    from .chatloop import Chat

    return Chat(backend, system=getattr(args, "system", None), settings=settings,
                verbose=getattr(args, "stats", False)).run()


# -- the daemon ---------------------------------------------------------------------------


def _ago(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 86400}d {s % 86400 // 3600}h" if s >= 86400 else (
        f"{s // 3600}h {s % 3600 // 60}m" if s >= 3600 else f"{s // 60}m {s % 60}s" if s >= 60 else f"{s}s")


def _print_status(st: dict[str, Any]) -> None:
    print(f"running  pid {st['pid']} · up {_ago(st['uptime_seconds'])} · {st['socket']}")
    print(f"memory   {_gib(st['rss_bytes'])} resident")
    if not st["models"]:
        print("models   none loaded")
    for m in st["models"]:
        vram = f" + {_gib(m['vram_bytes'])} VRAM" if m["vram_bytes"] else ""
        print(f"model    {m['name']} · n_ctx {m['n_ctx']} · {_gib(m['ram_bytes'])} RAM{vram} · {m['path']}")


def cmd_daemon(args: argparse.Namespace) -> int:
    from . import daemon

    action = args.daemon_command
    if action == SERVE_FOREGROUND:
        return daemon.serve_foreground(args.models, _load_wishes(args), args.verbose)
    if action == "start":
        st = daemon.start(args.models, _load_argv(args), verbose=args.verbose)
        for what in st.get("cleaned") or []:
            print(f"{PROG}: removed stale {what}", file=sys.stderr)
        if st.get("already_running"):
            print(f"{PROG}: the daemon is already running (pid {st['pid']}); "
                  "`hearth daemon reload` or `hearth daemon stop` first to change it", file=sys.stderr)
        _print_status(st)
        return 0
    if action == "status":
        st = daemon.status()
        if args.json:
            print(json.dumps(st, indent=2))
        elif st["running"]:
            _print_status(st)
        else:
            print(f"not running ({st['socket']})")
            for what in st["stale"]:
                print(f"stale    {what}; `hearth daemon start` removes it")
        return 0 if st["running"] else 1
    if action == "stop":
        r = daemon.stop(**({"timeout": args.timeout} if args.timeout is not None else {}))
        if "stopped" in r:
            print(f"stopped (pid {r['stopped']}{', killed after the timeout' if r['killed'] else ''})")
        else:
            for what in r.get("cleaned") or []:
                print(f"{PROG}: removed stale {what}", file=sys.stderr)
            print("not running")
        return 0
    if action == "reload":
        r = daemon.reload()
        print(f"reloaded {', '.join(r['reloaded']) or 'no models'} in {r['seconds']:.2f}s")
        return 0
    raise AssertionError(action)  # pragma: no cover - argparse allows only the above


# -- Ollama's ps and stop: the daemon's (or a server's) /api routes ------------------------


def _base_url(host: str) -> str:
    """``HOST``, ``HOST:PORT``, ``[V6]:PORT`` or ``http(s)://HOST:PORT`` -> a base URL (port 11435
    when none is written, hearth's default)."""
    from .config import ollama_host
    from .errors import BadRequest

    try:
        h, port = ollama_host(host)
    except ValueError as e:
        raise BadRequest(f"--host: {e}") from None
    scheme = "https" if host.strip().lower().startswith("https://") else "http"
    return f"{scheme}://{f'[{h}]' if ':' in h else h}:{port or 11435}"


def _server_json(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """A JSON answer from the daemon (on its socket), or from the server at ``--host``."""
    if args.host is None:
        from .client import DaemonClient, DaemonError

        client = DaemonClient.connect(timeout=DAEMON_PROBE_SECONDS)
        if client is None:
            raise _DaemonRefused("the daemon is not running (`hearth daemon start`), or give --host for a server",
                                 500)
        with client:
            client.sock.settimeout(DAEMON_READ_SECONDS)
            try:
                return client.get_json(path) if method == "GET" else client.post_json(path, body)
            except DaemonError as e:
                raise _DaemonRefused(e.message, e.status) from None
            except (OSError, ValueError) as e:
                raise _DaemonRefused(f"lost the daemon: {e or type(e).__name__}", 500) from None
    import urllib.error
    import urllib.request

    from .config import load_config

    url = _base_url(args.host) + path
    headers = {"Content-Type": "application/json"}
    key = load_config().api_key
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=DAEMON_READ_SECONDS) as resp:  # the URL the user gave
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            err = json.loads(e.read()).get("error")
            msg = err.get("message") if isinstance(err, dict) else err
        except (ValueError, AttributeError):
            msg = None
        raise _DaemonRefused(f"{url}: {msg or f'HTTP {e.code}'}", e.code) from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise _DaemonRefused(f"cannot reach {url}: {reason}", 500) from None


def _until(expires_at: str | None) -> str:
    from datetime import datetime, timezone

    if not expires_at or expires_at.startswith("2318-"):  # Ollama's "never"
        return "forever"
    try:
        t = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    except ValueError:
        return expires_at
    left = (t - datetime.now(timezone.utc)).total_seconds()
    return "now" if left < 1 else f"{_ago(left)} from now"


def _processor(size: int, vram: int) -> str:
    if not vram:
        return "CPU"
    if vram >= size:
        return "GPU"
    gpu = round(100 * vram / size)
    return f"{100 - gpu}%/{gpu}% CPU/GPU"


def cmd_ps(args: argparse.Namespace) -> int:
    ps = _server_json(args, "GET", "/api/ps")
    if args.json:
        print(json.dumps(ps, indent=2))
        return 0
    rows = [(m.get("name", "?"), _gib(int(m.get("size") or 0)),
             _processor(int(m.get("size") or 0), int(m.get("size_vram") or 0)),
             str(m.get("context_length") or "-"), _until(m.get("expires_at"))) for m in ps.get("models", [])]
    _table(("NAME", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"), rows)
    return 0


def _loaded_as(model: str, loaded: dict[str, str]) -> str | None:
    """The loaded name ``model`` stands for: its canonical name here (``smollm2`` ->
    ``smollm2:135m``), else the one loaded name with that base (Ollama's ``NAME`` for
    ``NAME:TAG``)."""
    from .store import resolve_model

    try:
        canon = resolve_model(model, pull=False, announce=None).name.lower()
    except HearthError:
        canon = None
    if canon in loaded:
        return loaded[canon]
    base = [v for k, v in loaded.items() if k.split(":", 1)[0] == model.strip().lower()]
    return base[0] if len(base) == 1 else None


def cmd_stop(args: argparse.Namespace) -> int:
    """Unload now, as ``ollama stop`` does: a generate request with no prompt and keep_alive 0.
    Only a loaded model is asked for, so a mistyped name never loads anything."""
    from .errors import ModelNotFound

    loaded = {m["name"].lower(): m["name"] for m in _server_json(args, "GET", "/api/ps").get("models", [])}
    name = loaded.get(args.model.strip().lower()) or _loaded_as(args.model, loaded)
    if name is None:
        where = args.host or "the daemon"
        raise ModelNotFound(f"{args.model} is not loaded in {where}"
                            + (f" (loaded: {', '.join(loaded.values())})" if loaded else " (no model is loaded)"))
    _server_json(args, "POST", "/api/generate", {"model": name, "keep_alive": 0})
    print(f"unloaded {name}")
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    from .completion import script

    sys.stdout.write(script(args.shell, build_parser(), PROG))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .api import get_model_info, plan_model
    from .errors import ModelNotFound
    from .hardware import detect_hardware
    from .store import resolve_model

    from .config import load_config

    hosts = args.worker_hosts if args.worker_hosts is not None else load_config().hosts
    remote = _remote_devices(hosts, bool(args.hosts_optional)) if hosts else None
    try:  # never a download: a catalog model not pulled yet is described from the catalog
        resolved = resolve_model(args.model, pull=False, announce=_say)
    except ModelNotFound:
        hit = _catalog_entry(args.model)
        if hit is None:
            raise
        return _info_from_catalog(args, *hit, remote=remote)
    info = get_model_info(resolved)
    hw = detect_hardware()
    plan = plan_model(resolved, **_load_wishes(args)) if remote is None else \
        _plan_with_hosts(info, hw, args, remote, resolved.load)
    if args.json:
        print(json.dumps({"model": info.to_dict(), "hardware": hw.to_dict(), "plan": plan.to_dict()}, indent=2))
        return 0
    rows = [
        ("file", str(info.path)),
        ("name", info.name or "-"),
        ("architecture", info.architecture),
        ("parameters", _params(info.parameters)),
        ("quantization", f"{info.quantization} ({info.bits_per_weight:.2f} bits/weight)"),
        ("file size", _gib(info.file_size)),
        ("context (trained)", str(info.context_length)),
        ("layers", str(info.block_count)),
        ("embedding", str(info.embedding_length)),
        ("heads / kv heads", f"{info.head_count} / {info.head_count_kv}"),
        ("vocabulary", str(info.vocab_size)),
        ("chat template", "embedded" if info.has_chat_template else "none (fallback for its family)"),
        ("", ""),
        *_plan_rows(plan, hw, info.block_count),
    ]
    _print_rows(rows)
    _print_placement(plan, info.block_count)
    for n in plan.notes:
        print(f"note: {_note(n, args)}")
    return 0


def _remote_devices(hosts: str, optional: bool = False) -> list[Any]:
    """Each worker's devices and free memory, asked over the RPC protocol with a timeout
    (no llama.cpp: a host that does not answer is a WorkerError naming it, not an abort),
    named as llama.cpp will name them once added in this order: RPC0, RPC1, ..."""
    from . import rpc

    return rpc.remote_devices(rpc.parse_hosts(hosts), optional, warn=_say)[0]


def _plan_with_hosts(info: Any, hw: Any, args: argparse.Namespace, remote: list[Any],
                     load: dict[str, Any] | None = None) -> Any:
    """plan_model's plan (the model's own settings < config < flags), split across ``remote``."""
    from .api import _load_options
    from .config import load_config
    from .planner import plan_load

    wishes = {k: v for k, v in _load_wishes(args).items() if k not in ("hosts", "hosts_optional")}
    opts = _load_options(load or {}).merged(load_config().load_options()).merged(_load_options(wishes))
    return plan_load(info, hw, opts, remote=remote)


def _print_placement(plan: Any, block_count: int) -> None:
    """The split across devices and hosts: what each holds, and the memory it has."""
    if not plan.placement:
        return
    hosts = {p["host"] for p in plan.placement}
    print(f"\nsplit across {len(hosts)} host{'s' if len(hosts) > 1 else ''} (layers of {block_count + 1}, "
          f"{block_count} = the output head; memory = weights + KV cache, + compute buffers):")
    rows = [(p["host"], p["device"], f"{p['layers'][0]}-{p['layers'][1] - 1}" if p["n_layers"] else "-",
             str(p["n_layers"]), _gib(p["bytes"]), _gib(p["compute"]), _gib(p["free"]), _gib(p["budget"]))
            for p in plan.placement]
    _table(("  host", "device", "layers", "n", "memory", "compute", "free", "usable"),
           [("  " + r[0], *r[1:]) for r in rows])
    if plan.devices:
        print(f"llama.cpp: devices {','.join(plan.devices)}, tensor_split "
              f"{','.join(f'{v:g}' for v in plan.tensor_split)}, n_gpu_layers {plan.n_gpu_layers}")


def _params(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n < 1e9 else f"{n / 1e9:.2f} B"


def _print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}" if k else "")


def _machine_row(hw: Any) -> tuple[str, str]:
    return ("machine", f"{hw.physical_cores} cores, {_gib(hw.available_ram)} of {_gib(hw.total_ram)} RAM free"
            + "".join(f", {g.name} {_gib(g.free_memory)} free" for g in hw.gpus))


def _plan_rows(plan: Any, hw: Any, block_count: int) -> list[tuple[str, str]]:
    return [
        _machine_row(hw),
        ("plan: n_ctx", f"{plan.n_ctx} per request"),
        ("plan: slots", f"{plan.parallel} concurrent requests"),
        ("plan: gpu layers", f"{plan.n_gpu_layers} of {block_count + 1}"),
        ("plan: threads", str(plan.n_threads)),
        ("plan: batch / ubatch", f"{plan.n_batch} / {plan.n_ubatch}"),
        ("plan: kv cache", plan.kv_type),
        ("memory: weights", _gib(plan.memory.weights_ram + plan.memory.weights_vram)),
        ("memory: kv cache", _gib(plan.memory.kv_ram + plan.memory.kv_vram)),
        ("memory: compute", _gib(plan.memory.compute_ram + plan.memory.compute_vram + plan.memory.output_ram)),
        ("memory: total", f"{_gib(plan.memory.ram)} RAM" + (f" + {_gib(plan.memory.vram)} VRAM" if plan.memory.vram else "")),
    ]


def _catalog_entry(model: str | None):
    """(CatalogModel, CatalogQuant) when ``model`` (default: the configured one) is a catalog name."""
    from .config import load_config
    from .store.catalog import load_catalog

    return load_catalog().lookup(model if model else load_config().model)


def _info_from_catalog(args: argparse.Namespace, cm: Any, q: Any, remote: list[Any] | None = None) -> int:
    """``info`` for a catalog model that is not pulled: its catalog facts, and the plan
    for this machine from them (the planner takes a ModelInfo built from the catalog, as
    ``models recommend`` does), or a size-based estimate where the catalog has no
    architecture facts. Nothing is downloaded."""
    from .api import plan_model
    from .errors import DoesNotFit
    from .hardware import detect_hardware
    from .planner import RAM_HEADROOM, VRAM_HEADROOM, memory_budget
    from .store.local import catalog_ref
    from .store.recommend import has_arch_facts, size_based_need, synthetic_info

    ref = catalog_ref(cm, q.quant)
    pull = f"{PROG} pull {ref}"
    hw = detect_hardware()
    plan, reason, need = None, None, None
    if has_arch_facts(cm):
        estimate = "planner"
        try:
            if remote is not None:
                plan = _plan_with_hosts(synthetic_info(cm, q), hw, args, remote)
            else:
                plan = plan_model(synthetic_info(cm, q), **_load_wishes(args))
        except DoesNotFit as e:
            reason = e.message
    else:
        estimate = "size"
        need = size_based_need(cm, q)
        budget = max(memory_budget(hw.total_ram, hw.available_ram, RAM_HEADROOM),
                     sum(memory_budget(g.total_memory, g.free_memory, VRAM_HEADROOM) for g in hw.gpus))
        if remote:  # split across hosts: all of it together
            from .planner import REMOTE_HEADROOM

            budget = (memory_budget(hw.total_ram, hw.available_ram, RAM_HEADROOM)
                      + sum(memory_budget(g.total_memory, g.free_memory, VRAM_HEADROOM) for g in hw.gpus)
                      + sum(memory_budget(d.total, d.free, REMOTE_HEADROOM) for d in remote))
        if need > budget:
            reason = f"needs about {_gib(need)}, {_gib(budget)} available (after headroom)"
    fits = reason is None
    a = cm.arch
    if args.json:
        print(json.dumps({
            "model": {"name": ref, "catalog_name": cm.name, "description": cm.description, "family": cm.family,
                      "parameters": cm.parameters, "quantization": q.quant, "size": q.size,
                      "quants": list(cm.quants), "context_length": cm.context_length, "license": cm.license,
                      "repo": cm.repo, "files": list(q.files), "tags": list(cm.tags), "arch": dict(a)},
            "pulled": False, "pull": pull, "estimate": estimate, "fits": fits, "reason": reason,
            "memory_estimate": need if need is not None else (plan.memory.ram + plan.memory.vram if plan else None),
            "hardware": hw.to_dict(), "plan": plan.to_dict() if plan else None,
        }, indent=2))
        return 0
    others = [t for t in cm.quants if t != q.quant]
    rows = [
        ("name", f"{ref} (in the catalog, not pulled: `{pull}` downloads it)"),
        ("description", cm.description or "-"),
        ("family", cm.family),
        ("parameters", _params(cm.parameters) if cm.parameters else "?"),
        ("quantization", q.quant + (f" (also {', '.join(others)})" if others else "")),
        ("download size", _gib(q.size) if q.size else "?"),
        ("context (trained)", str(cm.context_length or "?")),
    ]
    if estimate == "planner":
        rows += [("layers", str(a["layers"])), ("embedding", str(a["embedding"])),
                 ("heads / kv heads", f"{a['heads']} / {a.get('kv_heads') or a['heads']}")]
    rows += [("license", cm.license), ("repo", f"hf.co/{cm.repo}"), ("", "")]
    if plan is not None:
        rows += _plan_rows(plan, hw, a["layers"])
    else:
        rows.append(_machine_row(hw))
        if need is not None:
            rows.append(("memory: total", f"about {_gib(need)} (from the download size: the catalog lists "
                                          "no architecture facts)"))
    rows.append(("fits here", "yes" if fits else f"no: {reason}"))
    _print_rows(rows)
    if plan is not None:
        _print_placement(plan, a["layers"])
    for n in plan.notes if plan else ():
        print(f"note: {_note(n, args)}")
    print(f"note: estimated from the catalog's facts; nothing was downloaded. Pull it with: {pull}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .api import benchmark_inference

    for name in ("n_prompt", "n_gen"):
        if getattr(args, name) < 0:
            from .errors import BadRequest

            raise BadRequest(f"--{name.replace('_', '-')} must be >= 0")
    if args.repetitions < 1:
        from .errors import BadRequest

        raise BadRequest("--repetitions must be >= 1")
    levels: list[int] = []
    if args.concurrency:
        try:
            levels = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
        except ValueError:
            from .errors import BadRequest

            raise BadRequest(f"--concurrency must be integers like 1,2,4,8, got {args.concurrency!r}") from None
        if not levels or levels[0] < 1:
            from .errors import BadRequest

            raise BadRequest("--concurrency levels must be >= 1")
        # enough slots and cache for the highest level, unless the user said otherwise
        args.parallel = max(levels)
        if args.n_ctx is None:  # per slot
            args.n_ctx = args.n_prompt + args.n_gen + 1
    model = _load(args)
    try:
        r = benchmark_inference(model, n_prompt=args.n_prompt, n_gen=args.n_gen,
                                repetitions=args.repetitions, concurrency=levels)
    finally:
        model.close()
    if args.json:
        print(json.dumps(r.to_dict(), indent=2))
        return 0
    print(f"model    {r.model}  (threads {r.n_threads}, gpu layers {r.n_gpu_layers})")
    if r.n_prompt:
        print(f"pp{r.n_prompt:<5} {r.pp_tokens_per_second:10.1f} tokens/s   ttft {r.ttft_seconds * 1000:.0f} ms")
    if r.n_gen:
        print(f"tg{r.n_gen:<5} {r.tg_tokens_per_second:10.1f} tokens/s")
    for lv in r.concurrency:
        print(f"c={lv['concurrency']:<3} pp {lv['pp_tokens_per_second']:8.1f} t/s  "
              f"tg {lv['tg_tokens_per_second']:8.1f} t/s  mean ttft {lv['mean_ttft_seconds'] * 1000:.0f} ms")
    print(f"peak RSS {_gib(r.peak_rss_bytes)}")
    return 0


def _serve_wishes(args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    """The load wishes of ``serve``: the loading flags, with llama-server's ``--ctx-size``
    (or ``LLAMA_ARG_CTX_SIZE``), a context over all slots, made hearth's per-slot n_ctx."""
    from .config import LLAMA_CTX, per_slot_ctx
    from .errors import BadRequest

    wishes = _load_wishes(args)
    if args.ctx_size is not None:
        if "n_ctx" in wishes:
            raise BadRequest("--ctx-size is llama-server's context over all slots, --n-ctx hearth's per slot: "
                             "give one of them")
        try:
            n_ctx = per_slot_ctx(args.ctx_size, wishes.get("parallel", cfg.parallel))
        except ValueError as e:
            raise BadRequest(f"--ctx-size: {e}") from None
        if n_ctx is not None:
            wishes["n_ctx"] = n_ctx
    elif "n_ctx" not in wishes and cfg.sources["n_ctx"] == f"env:{LLAMA_CTX.env}" and cfg.n_ctx is not None:
        wishes["n_ctx"] = cfg.n_ctx  # divided by this command's --parallel, which the config did not see
    return wishes


def _serve_chat_template(args: argparse.Namespace) -> str | None:
    """``--chat-template NAME|JINJA`` or ``--chat-template-file PATH`` as checked Jinja text."""
    from .chat_templates import resolve_chat_template
    from .errors import BadRequest

    if args.chat_template is not None and args.chat_template_file is not None:
        raise BadRequest("give --chat-template or --chat-template-file, not both")
    if args.chat_template_file is not None:
        path = args.chat_template_file
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise BadRequest(f"--chat-template-file {path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise BadRequest(f"--chat-template-file {path}: not UTF-8 text") from None
        return resolve_chat_template(text, f"--chat-template-file {path}")
    if args.chat_template is not None:
        return resolve_chat_template(args.chat_template)
    return None


def _ollama_port(env: Any = None) -> int:
    """The port Ollama's clients go to: OLLAMA_HOST's, else Ollama's 11434."""
    from .config import ollama_host

    value = (os.environ if env is None else env).get("OLLAMA_HOST", "").strip().strip("\"'").strip()
    return (ollama_host(value)[1] if value else None) or 11434


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import load_config
    from .errors import BadRequest
    from .store import resolve_model

    hosts = list(dict.fromkeys(args.hosts or []))
    cfg = load_config({"host": hosts[0] if hosts else None, "port": args.port, "api_key": args.api_key,
                       "origins": args.origins, "parallel": args.parallel})
    if not 0 < cfg.port < 65536:
        raise BadRequest(f"the port must be in 1..65535, got {cfg.port}")
    if args.pooling is not None and args.pooling.strip().lower() != "mean":
        raise BadRequest(f"--pooling {args.pooling}: hearth's embeddings are the mean over the tokens; "
                         "only --pooling mean is available")
    if args.n_predict is not None and args.n_predict < -1:
        raise BadRequest(f"--n-predict must be -1 (no limit) or >= 0, got {args.n_predict}")
    n_predict = None if args.n_predict in (None, -1) else args.n_predict
    wishes = _serve_wishes(args, cfg)
    if wishes.get("n_gpu_layers"):
        from .hardware import detect_hardware

        _gpu_note(wishes, detect_hardware().gpus)
    template = _serve_chat_template(args)
    models = list(args.models)
    if not models and cfg.sources["model"].startswith("env:"):
        models = [cfg.model]  # LLAMA_ARG_MODEL: loaded at startup, as llama-server does
    if len(args.aliases) > len(models):
        raise BadRequest(f"{len(args.aliases)} --alias for {len(models)} --model: give one per model")
    if len(set(a.lower() for a in args.aliases)) < len(args.aliases):
        raise BadRequest("each --alias must be different")
    for m in models:
        resolve_model(m)  # an unknown model fails here, before the server starts
    dirs = args.models_dirs
    for d in dirs or []:
        if not os.path.isdir(d):
            raise BadRequest(f"--models-dir {d}: not a directory")
    if args.no_jinja:
        _say("note: --no-jinja has no effect: hearth renders every chat template with Jinja")

    from .server import create_app
    from .server.http import address, bind, serve
    from .server.web import is_loopback, split_list

    hosts = hosts or [cfg.host]
    listen = [(h, cfg.port) for h in hosts]
    if args.ollama_port is not None:
        port = args.ollama_port or _ollama_port()
        if not 0 < port < 65536:
            raise BadRequest(f"--ollama-port must be in 1..65535, got {port}")
        listen += [(h, port) for h in hosts]
    listen = list(dict.fromkeys(listen))
    # the Host check guards a loopback-only server; one that also listens elsewhere was exposed on purpose
    policy_host = next((h for h in hosts if not is_loopback(h)), hosts[0])
    app = create_app(models, api_key=cfg.api_key, load_options=wishes, aliases=args.aliases, host=policy_host,
                     models_dirs=dirs, origins=split_list(cfg.origins), slots_endpoint=args.slots,
                     n_predict=n_predict, chat_template=template)
    sockets = []
    try:
        for h, p in listen:
            try:
                sockets.append(bind(h, p))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    flag = "--port" if p == cfg.port else "--ollama-port"
                    on = f" on {h}" if len(hosts) > 1 else ""
                    raise BadRequest(f"port {p} is in use{on}; pick another with {flag}") from None
                raise BadRequest(f"cannot listen on {address(h, p)}: {e.strerror or e}") from None
        borrowed = [f"{name} from {src[4:]}" for name, src in cfg.sources.items() if src.startswith("env:")]
        if borrowed:
            _say(f"settings from other programs' variables: {', '.join(borrowed)}")
        where = ", ".join(f"http://{address(h, p)}" for h, p in listen)
        print(f"hearth: serving on {where} (OpenAI API at /v1, Ollama API at /api)", file=sys.stderr)
        if cfg.request_log and not args.quiet:  # one line per request, as Ollama logs them
            from .server.metrics import enable_request_log

            enable_request_log()
        serve(app, sockets, log_level="info" if args.verbose else "warning")
    finally:
        for sock in sockets:
            sock.close()
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config()
    d = cfg.to_dict()
    if args.json:
        print(json.dumps({"config_file": str(cfg.file), "settings": d}, indent=2))
        return 0
    print(f"config file: {cfg.file}{'' if cfg.file.exists() else ' (absent)'}")
    width = max(len(n) for n in d)
    src_width = max(8, *(len(s["source"]) for s in d.values()))
    for name, s in d.items():
        also = f" (also {', '.join(s['aliases'])})" if s["aliases"] else ""
        print(f"{name:<{width}} {s['value']!s:<22} {s['source']:<{src_width}} {s['env']}{also}")
    return 0


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _when(ts: float | None) -> str:
    if not ts:
        return "never"
    import time

    return _ago(time.time() - ts)


def cmd_models(args: argparse.Namespace) -> int:
    from .store import installed, remove_model

    action = args.models_command
    if action == "pull":
        from .store import local

        from .store import KNOWN_MODELS, resolve_model

        for name in args.names:
            if name.strip().lower() in KNOWN_MODELS:
                r = resolve_model(name)
                print(f"{r.name} is embedded (it comes with hearth's packages): {r.path}")
                continue
            before = local.find_stored(name)
            from .store.pull import StderrProgress

            m = before or local.pull(name, announce=_say, progress=StderrProgress())
            verb = "already pulled" if before else "pulled"
            print(f"{verb} {m.name} ({m.quant}, {_gib(m.size)}): {m.path}")
        return 0
    if action == "list":
        if args.catalog:
            return _list_catalog(args)
        problems: list[str] = []
        models = installed(problems)
        for p in problems:
            _say(f"warning: {p}")
        if args.json:
            print(json.dumps([m.to_dict() for m in models], indent=2))
            return 0
        rows = [(m.name, m.quantization or "?", _gib(m.size) if m.size else "?", m.source,
                 _when(m.last_used) if m.source in ("catalog", "hf") else "",
                 str(m.path) if m.path else "(assembled on first use)") for m in models]
        _table(("NAME", "QUANT", "SIZE", "SOURCE", "LAST USED", "PATH"), rows)
        return 0
    if action == "rm":
        for name in args.names:
            canon, deleted, kept = remove_model(name)
            extra = f"; kept {len(kept)} file(s) that were in the Hugging Face cache before" if kept else ""
            print(f"removed {canon} ({len(deleted)} file(s) deleted{extra})")
        return 0
    if action == "recommend":
        from .store.recommend import recommend

        rec = recommend(tags=("code",) if args.code else ("chat",), refresh=args.refresh)
        if args.json:
            print(json.dumps(rec.to_dict(), indent=2))
        else:
            print(rec.to_text())
        return 0 if rec.choice is not None else 1
    raise AssertionError(action)  # pragma: no cover - argparse refuses others


def _list_catalog(args: argparse.Namespace) -> int:
    from .store import local
    from .store.catalog import load_catalog

    pulled = {m.name for m in local.stored_models()}
    cat = load_catalog()
    if args.json:
        print(json.dumps([{
            "name": m.name, "description": m.description, "parameters": m.parameters, "license": m.license,
            "context_length": m.context_length, "tags": list(m.tags), "repo": m.repo,
            "default_quant": m.default_quant,
            "quants": {q: {"files": list(v.files), "size": v.size, "sha256": list(v.sha256),
                           "pulled": local.catalog_ref(m, q) in pulled} for q, v in m.quants.items()},
        } for m in cat], indent=2))
        return 0
    rows = []
    for m in cat:
        for q, v in m.quants.items():
            ref = local.catalog_ref(m, q)
            rows.append((ref, q, _gib(v.size) if v.size else "?", m.license,
                         "yes" if ref in pulled else "", m.repo))
    _table(("NAME", "QUANT", "SIZE", "LICENSE", "PULLED", "REPO"), rows)
    return 0


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def cmd_worker(args: argparse.Namespace) -> int:
    """Serve local devices over llama.cpp's RPC protocol until Ctrl-C / SIGTERM."""
    import ipaddress
    import signal
    import threading

    from . import rpc
    from .errors import BadRequest
    from .hardware import physical_cores

    rpc.require("hearth worker")
    if not 0 < args.port < 65536:
        raise BadRequest(f"--port must be in 1..65535, got {args.port}")
    if args.threads is not None and args.threads < 1:
        raise BadRequest(f"--threads must be >= 1, got {args.threads}")
    devices = rpc.local_devices()
    local = [d for d in devices if not d.name.startswith("RPC")]
    if args.list_devices:
        for d in local:
            print(f"{d.name:<12} {d.kind:<5} {_gib(d.free):>10} free of {_gib(d.total):<10} {d.description}")
        return 0
    if args.devices:
        wanted = [n.strip() for n in args.devices.split(",") if n.strip()]
        known = {d.name for d in local}
        bad = [n for n in wanted if n not in known]
        if bad:
            raise BadRequest(f"--devices: no device named {', '.join(bad)} here (these are: {', '.join(sorted(known))})")
        serve = [d for d in local if d.name in wanted]
    else:
        serve = local
    cache = None
    if not args.no_cache:
        if args.cache:
            cache = os.path.expanduser(args.cache)
        else:
            from platformdirs import user_cache_dir

            cache = os.path.join(user_cache_dir("hearth", appauthor=False), "rpc")
        os.makedirs(cache, mode=0o700, exist_ok=True)
    host = args.host
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    endpoint = f"[{host.strip('[]')}]:{args.port}" if ":" in host else f"{host}:{args.port}"
    threads = args.threads or physical_cores()
    print(f"hearth worker: serving on {endpoint} (llama.cpp RPC protocol {rpc.RPC_PROTO_MAJOR_VERSION}."
          f"{rpc.RPC_PROTO_MINOR_VERSION}.{rpc.RPC_PROTO_PATCH_VERSION}), {threads} threads, tensor cache "
          f"{cache or 'off'}", file=sys.stderr)
    for d in serve:
        print(f"  {d.name:<10} {d.kind:<5} {_gib(d.free)} free of {_gib(d.total)}  {d.description}", file=sys.stderr)
    if not loopback:
        print(f"hearth worker: WARNING: listening on {host}, not loopback. The RPC protocol has NO "
              "authentication: anyone who reaches this port can run computations on these devices and read "
              "what they hold. Use it only on a trusted network, or keep the default 127.0.0.1 and reach it "
              "through an SSH tunnel or WireGuard.", file=sys.stderr)
    print(f"use it from another machine: hearth run --hosts {endpoint if not loopback else 'THIS-HOST:' + str(args.port)} "
          "MODEL", file=sys.stderr, flush=True)
    # the server loop runs in C and never returns: serve from a thread, wait for a signal here
    probe = socket_in_use(host.strip("[]"), args.port)
    if probe:
        raise BadRequest(f"port {args.port} is in use; pick another with --port")
    failed = threading.Event()

    def run() -> None:
        rpc.serve_worker(endpoint, cache, threads, [d.name for d in serve])
        failed.set()  # start_server returns only when it could not listen

    threading.Thread(target=run, name="hearth-worker", daemon=True).start()
    stop = threading.Event()
    if args.announce:
        from . import discovery

        version = f"{rpc.RPC_PROTO_MAJOR_VERSION}.{rpc.RPC_PROTO_MINOR_VERSION}.{rpc.RPC_PROTO_PATCH_VERSION}"
        names = {d.name for d in serve}

        def current() -> list[dict[str, Any]]:
            return [{"name": d.name, "kind": d.kind, "free": d.free, "total": d.total, "description": d.description}
                    for d in rpc.local_devices() if d.name in names]

        threading.Thread(target=discovery.announce_forever, args=(endpoint, host.strip("[]"), current, version, stop),
                         name="hearth-announce", daemon=True).start()
        print(f"hearth worker: announcing on UDP port {discovery.PORT} (`hearth workers` lists it)", file=sys.stderr)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.2):
        if failed.is_set():
            raise BadRequest(f"cannot listen on {endpoint}")
    print("hearth worker: stopped", file=sys.stderr)
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    from . import discovery

    found = list(discovery.listen(max(0.1, args.timeout)))
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if not found:
        print(f"no worker announced itself within {args.timeout:g} s (start them with `hearth worker --announce`)",
              file=sys.stderr)
        return 1
    for w in found:
        devs = ", ".join(f"{d.get('name')} {_gib(int(d.get('free', 0)))} free" for d in w.get("devices", []))
        print(f"{w['endpoint']:<24} RPC {w.get('version', '?'):<7} {devs}")
    print(f"use them: --hosts {','.join(w['endpoint'] for w in found)}", file=sys.stderr)
    return 0


def socket_in_use(host: str, port: int) -> bool:
    """Whether something already listens on host:port (llama.cpp's server only prints
    when it cannot bind)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


COMMANDS = {"run": cmd_run, "chat": cmd_chat, "info": cmd_info, "bench": cmd_bench, "config": cmd_config,
            "serve": cmd_serve, "daemon": cmd_daemon, "models": cmd_models,
            # Ollama's verbs
            "pull": cmd_models, "list": cmd_models, "ls": cmd_models, "rm": cmd_models, "show": cmd_info,
            "ps": cmd_ps, "stop": cmd_stop, "completion": cmd_completion, "worker": cmd_worker,
            "workers": cmd_workers}


def _leaf_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command given: ``hearth models pull`` -> the pull parser."""
    p = parser
    while True:
        sp = next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, sp.dest, None) if sp is not None else None
        if sp is None or name not in sp.choices:
            return p
        p = sp.choices[name]


def _unrecognized(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> NoReturn:
    leaf = _leaf_parser(parser, args)
    flag = next((x.split("=", 1)[0] for x in extra if x.startswith("-")), None)
    if flag is not None:
        close = _close(flag, [f for a in leaf._actions for f in a.option_strings if f.startswith("--")])
        leaf.error(f"unknown option {flag}" + (f" (did you mean {close}?)" if close else ""))
    leaf.error(f"unexpected argument(s): {' '.join(extra)}")


def _flag_message(message: str, leaf: argparse.ArgumentParser, argv: Sequence[str]) -> str:
    """A setting's name at the start of a message -> the flag the user typed for it
    (``n_threads must be >= 1`` -> ``--threads must be >= 1``)."""
    name = message.split(" ", 1)[0]
    for a in leaf._actions:
        if a.option_strings and a.dest == name:
            return _typed(a.option_strings, argv) + message[len(name):]
    return message


def _check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Validate the loading and generation flags before anything loads, so an error names
    the flag as typed (the planner and GenerationParams know only setting names)."""
    from .errors import BadRequest

    try:
        wishes = _load_wishes(args)
        hosts = wishes.pop("hosts", None)
        wishes.pop("hosts_optional", None)
        if hosts:
            from .rpc import parse_hosts

            parse_hosts(hosts)
        if wishes:
            from .planner import LoadOptions

            LoadOptions(**wishes)
        if hasattr(args, "max_tokens"):
            _gen_config(args)
    except BadRequest as e:
        raise BadRequest(_flag_message(e.message, _leaf_parser(parser, args), argv)) from None


def _setup_logging(verbose: int) -> None:
    import logging

    debug = verbose > 0 or os.environ.get("HEARTH_DEBUG", "").lower() in ("1", "true", "yes", "on")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hearth").setLevel(logging.DEBUG if debug else logging.WARNING)
    # llama.cpp's own log: all of it with -vv (or HEARTH_DEBUG), its errors with -v,
    # nothing otherwise, so a refused request prints the one "hearth: error:" line only
    logging.getLogger("hearth.llama_cpp").setLevel(
        logging.DEBUG if (verbose > 1 or (debug and verbose != 1))
        else logging.ERROR if debug else logging.CRITICAL
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _Parser.argv = argv
    args, extra = parser.parse_known_args(argv)
    if extra:
        _unrecognized(parser, args, extra)
    args.verbose += getattr(args, "verbose_after", 0)  # -v after the subcommand counts the same
    if args.command not in ("run", "chat"):  # those set it up when they run in-process
        _setup_logging(args.verbose)
    if not args.command:
        parser.print_help()
        return 0
    try:
        _check_flags(parser, args, argv)
        return COMMANDS[args.command](args)
    except HearthError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
