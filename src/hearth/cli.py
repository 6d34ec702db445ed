"""The command line: parsing and printing only; the work is in the library."""

from __future__ import annotations

import argparse
import json
import os
import sys

TYPE_CHECKING = False  # `hearth run` on the daemon imports nothing it does not use
if TYPE_CHECKING:
    from typing import Any, Sequence

from .errors import HearthError

PROG = "hearth"
DAEMON_PROBE_SECONDS = 3.0  # a daemon's /health must answer within this, or run/chat go in process
DAEMON_READ_SECONDS = 600.0  # the longest silence within a reply before giving up on the daemon
SERVE_FOREGROUND = "serve-foreground"  # the daemon's own process (hearth.daemon.SERVE_COMMAND)


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


# -- arguments ------------------------------------------------------------------


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


def _daemon_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-daemon", action="store_true",
                   help="run in this process even when the daemon is up (also HEARTH_NO_DAEMON=1)")


def _gen_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-tokens", "-n", type=int, default=None,
                   help="tokens to generate at most (default: the model's own, else 512; -1: no limit)")
    g.add_argument("--temperature", "--temp", type=float, default=None, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repeat-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None, help="same seed, same output")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--grammar", default=None, help="GBNF grammar text, or @FILE")
    g.add_argument("--json-schema", default=None, help="constrain output to this JSON schema (text or @FILE)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Run local LLMs on llama.cpp with zero configuration.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log detail (-vv: llama.cpp's log too)")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="answer a prompt (or chat when no prompt is given)")
    r.add_argument("model", nargs="?", help="path to a .gguf or a known name (default: the embedded model)")
    r.add_argument("prompt_words", nargs="*", metavar="PROMPT", help="the prompt (or -p, or stdin)")
    r.add_argument("-p", "--prompt", help="the prompt")
    r.add_argument("--raw", action="store_true", help="complete the prompt as-is, without the chat template")
    r.add_argument("--system", help="system message")
    r.add_argument("--json", action="store_true", help="print one JSON object: text, finish_reason, usage, timings")
    _daemon_flag(r)
    _gen_flags(r)
    _load_flags(r)

    c = sub.add_parser("chat", help="interactive chat (/bye to leave)")
    c.add_argument("model", nargs="?", help="path to a .gguf or a known name")
    c.add_argument("--system", help="system message")
    _daemon_flag(c)
    _gen_flags(c)
    _load_flags(c)

    i = sub.add_parser("info", help="what a model is, and how hearth would load it here")
    i.add_argument("model", nargs="?", help="path to a .gguf or a known name")
    i.add_argument("--json", action="store_true")
    _load_flags(i)

    b = sub.add_parser("bench", help="prompt and generation speed, ttft and peak memory")
    b.add_argument("model", nargs="?", help="path to a .gguf or a known name")
    b.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens (default 512)")
    b.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens (default 128)")
    b.add_argument("-r", "--repetitions", type=int, default=3)
    b.add_argument("--concurrency", "-c", default=None,
                   help="comma-separated levels, e.g. 1,2,4,8,16: aggregate tokens/s with that many requests at once")
    b.add_argument("--json", action="store_true")
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
    _load_flags(sv)

    d = sub.add_parser("daemon", help="keep models loaded in a background server, so run/chat start at once")
    dsub = d.add_subparsers(dest="daemon_command", metavar="ACTION", required=True)
    ds = dsub.add_parser("start", help="start the daemon and load its models (default: the configured model)")
    ds.add_argument("--model", "-m", dest="models", action="append", default=[], help="load this model (repeatable)")
    _load_flags(ds)
    dst = dsub.add_parser("status", help="pid, socket, uptime and loaded models (exit 1 when not running)")
    dst.add_argument("--json", action="store_true")
    dsp = dsub.add_parser("stop", help="stop after in-flight requests finish")
    dsp.add_argument("--timeout", type=float, default=None, help="seconds to wait before killing it")
    dsub.add_parser("reload", help="re-read the config and reload the models; running requests finish first")
    df = dsub.add_parser(SERVE_FOREGROUND, help=argparse.SUPPRESS)
    df.add_argument("--model", "-m", dest="models", action="append", default=[])
    _load_flags(df)

    m = sub.add_parser("models", help="pull, list, remove and recommend models")
    msub = m.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    mp = msub.add_parser("pull", help="download a catalog model (NAME[:QUANT]) or hf.co/ORG/REPO[:QUANT]")
    mp.add_argument("names", nargs="+", metavar="NAME")
    ml = msub.add_parser("list", help="models that run without a download (embedded, pulled, Ollama's)")
    ml.add_argument("--catalog", action="store_true", help="list the catalog instead: what can be pulled")
    ml.add_argument("--json", action="store_true")
    mr = msub.add_parser("rm", help="delete a model hearth pulled")
    mr.add_argument("names", nargs="+", metavar="NAME")
    mc = msub.add_parser("recommend", help="the best catalog model for this machine, and why")
    mc.add_argument("--code", action="store_true", help="a model for code rather than chat")
    mc.add_argument("--json", action="store_true")

    cf = sub.add_parser("config", help="show each effective setting and where it came from")
    cf.add_argument("--json", action="store_true")
    return p


def _version() -> str:
    from . import __version__

    return __version__


# -- commands -------------------------------------------------------------------


def _load_wishes(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("n_ctx", "n_threads", "n_threads_batch", "n_gpu_layers", "n_batch", "n_ubatch", "kv_type", "flash_attn",
            "use_mmap", "use_mlock", "parallel")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


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
              "kv_type": "--kv-type", "parallel": "--parallel"}


def _load_argv(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for k, v in _load_wishes(args).items():
        if k == "use_mmap":
            out.append("--no-mmap")
        elif k == "use_mlock":
            out.append("--mlock")
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
    return load_model(_resolve(args.model), **wishes)


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


def cmd_run(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt is None and args.prompt_words:
        prompt = " ".join(args.prompt_words)
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
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
            _stream_out(model.stream_text(text, gcfg))
    finally:
        model.close()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    client = _daemon_client(args)
    if client is not None:
        with client:
            return _chat_on_daemon(client, args)
    _setup_logging(args.verbose)
    cfg = _gen_config(args)
    model = _load(args)

    def answer(history: list[dict[str, str]]) -> str:
        text, gcfg = model.chat_prompt(history, cfg, "cli")
        result = _stream_out(model.stream_text(text, gcfg))
        return result.text if result else ""

    try:
        return _chat_loop(args, f"{model.name} · n_ctx {model.plan.n_ctx}", answer)
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


def _daemon_stream(client, request: dict[str, Any], echo: bool) -> dict[str, Any]:
    """Stream one generation from the daemon; returns its result (GenerationResult.to_dict())."""
    from .client import DaemonError

    out = sys.stdout
    try:
        for event in client.generate(request):
            if "result" in event:
                if echo:
                    out.write("\n")
                    out.flush()
                return event["result"]
            if echo:
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
    return 0


def _chat_on_daemon(client, args: argparse.Namespace) -> int:
    kw = _gen_kwargs(args)
    model = _model_spec(args.model)

    def answer(history: list[dict[str, str]]) -> str:
        result = _daemon_stream(client, {"model": model, "messages": history, "config": kw}, echo=True)
        return result.get("text", "")

    return _chat_loop(args, f"{args.model or 'default model'} · on the daemon", answer)


def _chat_loop(args: argparse.Namespace, banner: str, answer) -> int:
    """Read lines, keep the history, let ``answer(history)`` stream each reply."""
    history: list[dict[str, str]] = []
    if getattr(args, "system", None):
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{banner} · /bye to leave, /clear to forget", file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/bye", "/exit", "/quit"):
            break
        if line == "/clear":
            history = [m for m in history if m["role"] == "system"]
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = answer(history)
        except HearthError as e:
            history.pop()
            print(f"{PROG}: error: {e}", file=sys.stderr)
            if isinstance(e, _DaemonRefused) and e.exit_code == 1:  # the daemon is gone
                return 1
            continue
        history.append({"role": "assistant", "content": reply})
    return 0


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


def cmd_info(args: argparse.Namespace) -> int:
    from .api import get_model_info, plan_model
    from .hardware import detect_hardware

    resolved = _resolve(args.model)
    info = get_model_info(resolved)
    hw = detect_hardware()
    plan = plan_model(resolved, **_load_wishes(args))
    if args.json:
        print(json.dumps({"model": info.to_dict(), "hardware": hw.to_dict(), "plan": plan.to_dict()}, indent=2))
        return 0
    rows = [
        ("file", str(info.path)),
        ("name", info.name or "-"),
        ("architecture", info.architecture),
        ("parameters", f"{info.parameters / 1e6:.1f} M" if info.parameters < 1e9 else f"{info.parameters / 1e9:.2f} B"),
        ("quantization", f"{info.quantization} ({info.bits_per_weight:.2f} bits/weight)"),
        ("file size", _gib(info.file_size)),
        ("context (trained)", str(info.context_length)),
        ("layers", str(info.block_count)),
        ("embedding", str(info.embedding_length)),
        ("heads / kv heads", f"{info.head_count} / {info.head_count_kv}"),
        ("vocabulary", str(info.vocab_size)),
        ("chat template", "embedded" if info.has_chat_template else "none (fallback for its family)"),
        ("", ""),
        ("machine", f"{hw.physical_cores} cores, {_gib(hw.available_ram)} of {_gib(hw.total_ram)} RAM free"
         + "".join(f", {g.name} {_gib(g.free_memory)} free" for g in hw.gpus)),
        ("plan: n_ctx", f"{plan.n_ctx} per request"),
        ("plan: slots", f"{plan.parallel} concurrent requests"),
        ("plan: gpu layers", f"{plan.n_gpu_layers} of {info.block_count + 1}"),
        ("plan: threads", str(plan.n_threads)),
        ("plan: batch / ubatch", f"{plan.n_batch} / {plan.n_ubatch}"),
        ("plan: kv cache", plan.kv_type),
        ("memory: weights", _gib(plan.memory.weights_ram + plan.memory.weights_vram)),
        ("memory: kv cache", _gib(plan.memory.kv_ram + plan.memory.kv_vram)),
        ("memory: compute", _gib(plan.memory.compute_ram + plan.memory.compute_vram + plan.memory.output_ram)),
        ("memory: total", f"{_gib(plan.memory.ram)} RAM" + (f" + {_gib(plan.memory.vram)} VRAM" if plan.memory.vram else "")),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}" if k else "")
    for n in plan.notes:
        print(f"note: {n}")
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
                raise BadRequest(f"cannot listen on {address(h, p)}: {e.strerror or e}") from None
        borrowed = [f"{name} from {src[4:]}" for name, src in cfg.sources.items() if src.startswith("env:")]
        if borrowed:
            _say(f"settings from other programs' variables: {', '.join(borrowed)}")
        where = ", ".join(f"http://{address(h, p)}" for h, p in listen)
        print(f"hearth: serving on {where} (OpenAI API at /v1, Ollama API at /api)", file=sys.stderr)
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

        rec = recommend(tags=("code",) if args.code else ("chat",))
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


COMMANDS = {"run": cmd_run, "chat": cmd_chat, "info": cmd_info, "bench": cmd_bench, "config": cmd_config,
            "serve": cmd_serve, "daemon": cmd_daemon, "models": cmd_models}


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
    args = parser.parse_args(argv)
    if args.command not in ("run", "chat"):  # those set it up when they run in-process
        _setup_logging(args.verbose)
    if not args.command:
        parser.print_help()
        return 0
    try:
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
