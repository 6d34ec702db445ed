"""Every setting once: name, type, default, environment variable, doc.

Precedence: flags > HEARTH_* environment > config file > other programs' environment
variables (aliases) > default (None = the planner decides).
The config file is TOML at ``$HEARTH_CONFIG`` or ``<user config dir>/hearth/config.toml``.

Aliases are the variables people bring from llama-server (``LLAMA_ARG_*``), Ollama
(``OLLAMA_*``) and llama-cpp-python setups (``LLAMACPP_*``), read in those programs'
own syntax (``on``/``off``/``auto``, ``OLLAMA_HOST=0.0.0.0:11434``, ...). They rank below
everything written in hearth's own names, flags, environment or config file, so a
variable set for another program never overrides what was written for hearth; when
several aliases of one setting are set, the first in its list wins. ``hearth config``
shows which one a value came from (``env:OLLAMA_KEEP_ALIVE``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ConfigError


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (1/0, true/false), got {v!r}")


def _int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError(f"expected an integer, got {v!r}")
    if isinstance(v, int):
        return v
    try:
        return int(str(v).strip())
    except ValueError:
        raise ValueError(f"expected an integer, got {v!r}") from None


def _str(v: Any) -> str:
    return str(v)


_DURATION = re.compile(r"[+-]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+")


def _floats(v: Any) -> list[float]:
    """``"3,1"`` or ``"0.5/0.5"`` (llama.cpp's --tensor-split), or a list."""
    items = v if isinstance(v, (list, tuple)) else str(v).replace("/", ",").split(",")
    return [float(x) for x in items if str(x).strip() != ""]


def _names(v: Any) -> list[str]:
    """``"CUDA0,RPC0"`` (llama.cpp's --device), or a list; ``none``: no devices."""
    items = v if isinstance(v, (list, tuple)) else str(v).split(",")
    out = [str(x).strip() for x in items if str(x).strip()]
    return [] if out == ["none"] else out


def _duration(v: Any) -> str:
    """A keep-alive: seconds, or a Go duration (``30s``, ``5m``, ``1h30m``); kept as text
    (the server parses it, ``server.pool.parse_keep_alive``)."""
    s = str(v).strip()
    try:
        float(s)
    except ValueError:
        if not _DURATION.fullmatch(s):
            raise ValueError(f"expected seconds or a duration like 30s, 5m, 1h, got {v!r}") from None
    return s


# -- other programs' syntax (aliases) ----------------------------------------------------

SKIP = object()  # an alias converter's answer for "this variable does not set this setting"


def _llama_bool(v: str) -> bool | None:
    """llama.cpp's switches: on/enabled/true/1, off/disabled/false/0, auto/-1 (= unset)."""
    s = v.lower()
    if s in ("on", "enabled", "true", "1"):
        return True
    if s in ("off", "disabled", "false", "0"):
        return False
    if s in ("auto", "-1"):
        return None
    raise ValueError(f"expected on, off or auto, got {v!r}")


def _llama_no(v: str) -> bool:
    """A negative switch (LLAMA_ARG_NO_MMAP=1): true turns the setting off."""
    on = _llama_bool(v)
    if on is None:
        raise ValueError(f"expected 1 or 0, got {v!r}")
    return not on


def _llama_gpu_layers(v: str) -> int | None:
    """``-ngl``: a number, ``all`` (-1 here) or ``auto`` (as many as fit: the planner)."""
    s = v.lower()
    if s == "auto":
        return None
    if s == "all":
        return -1
    n = _int(v)
    if n < -1:
        raise ValueError(f"expected a number of layers, all, auto or -1, got {v!r}")
    return n


def _positive_or_auto(v: str) -> int | None:
    """Counts where llama.cpp and Ollama read 0 or -1 as "choose for me" (threads, slots)."""
    n = _int(v)
    return None if n <= 0 else n


def _zero_is_auto(v: str) -> int | None:
    n = _int(v)
    return None if n == 0 else n


def _one_api_key(v: str) -> str:
    keys = [k.strip() for k in v.split(",") if k.strip()]
    if len(keys) != 1:
        raise ValueError(f"hearth takes one API key, got {len(keys)} (comma-separated)")
    return keys[0]


def _load_mode(mmap: bool, mlock: bool) -> Callable[[str], Any]:
    """LLAMA_ARG_LOAD_MODE (auto, none, mmap, mlock, mmap+mlock, dio) -> use_mmap or use_mlock."""
    modes = {"none": (False, False), "mmap": (True, False), "mlock": (False, True),
             "mmap+mlock": (True, True), "dio": (False, False)}

    def convert(v: str) -> Any:
        s = v.lower()
        if s == "auto":
            return SKIP
        if s not in modes:
            raise ValueError(f"expected auto, none, mmap, mlock, mmap+mlock or dio, got {v!r}")
        return modes[s][0] if mmap else modes[s][1]

    return convert


def ollama_host(value: str) -> tuple[str, int | None]:
    """``OLLAMA_HOST`` as Ollama reads it (envconfig): ``0.0.0.0``, ``:11434``,
    ``host:port``, ``[::1]:11434``, ``http://host:port``. The port is None when the
    value writes none (Ollama would use 11434, or 80/443 after a scheme)."""
    s = value.strip().strip("\"'").strip()
    scheme, sep, hostport = s.partition("://")
    if not sep:
        hostport = s
    elif scheme not in ("http", "https"):
        raise ValueError(f"expected host, host:port or http://host:port, got {value!r}")
    hostport = hostport.rstrip("/")
    port: str | None = None
    if hostport.startswith("["):  # [v6] or [v6]:port
        end = hostport.find("]")
        rest = hostport[end + 1:] if end > 0 else "?"
        if rest and not rest.startswith(":"):
            raise ValueError(f"expected [address]:port, got {value!r}")
        host, port = hostport[1:end], (rest[1:] if rest else None)
    elif hostport.count(":") == 1:
        host, port = hostport.split(":")
    else:  # a name, an IPv4 address or a bare IPv6 address
        host = hostport
    if "/" in host:
        raise ValueError(f"expected host, host:port or http://host:port, got {value!r}")
    n: int | None = None
    if port is not None:
        try:
            n = int(port)
        except ValueError:
            raise ValueError(f"invalid port {port!r} in {value!r}") from None
        if not 0 < n < 65536:
            raise ValueError(f"port must be in 1..65535, got {n}")
    if not host:  # ":11434": Ollama listens on every interface
        host = "0.0.0.0" if port is not None else "127.0.0.1"
    return host, n


def _ollama_port(v: str) -> Any:
    port = ollama_host(v)[1]
    return SKIP if port is None else port


@dataclass(frozen=True)
class Alias:
    """Another program's environment variable for a setting, read in its own syntax
    (``convert``; default: the setting's type). ``convert`` may answer ``SKIP``."""

    env: str
    convert: Callable[[str], Any] | None = None
    total_ctx: bool = False  # a context size over all slots (llama-server's -c): divided per slot


def _aliases(*items: str | Alias) -> tuple[Alias, ...]:
    return tuple(a if isinstance(a, Alias) else Alias(a) for a in items)


@dataclass(frozen=True)
class Setting:
    name: str
    type: Callable[[Any], Any]
    default: Any
    env: str
    doc: str
    aliases: tuple[Alias, ...] = ()
    in_file: bool = True  # False: environment only (Ollama's own variable)


LLAMA_CTX = Alias("LLAMA_ARG_CTX_SIZE", _zero_is_auto, total_ctx=True)

SETTINGS: tuple[Setting, ...] = (
    Setting("model", _str, "smollm2", "HEARTH_MODEL", "default model: a known name or a path to a .gguf",
            _aliases("LLAMA_ARG_MODEL", "LLAMACPP_MODEL")),
    Setting("home", _str, None, "HEARTH_HOME", "where hearth keeps models and state (default: the user data dir)"),
    Setting("debug", _bool, False, "HEARTH_DEBUG", "log hearth's and llama.cpp's detail to stderr"),
    Setting("request_log", _bool, True, "HEARTH_REQUEST_LOG",
            "hearth serve logs one line per HTTP request to stderr (method, route, model, status, tokens, "
            "time; never prompt text); 0 or serve --quiet: off"),
    Setting("n_ctx", _int, None, "HEARTH_N_CTX",
            "context length in tokens, per slot (default: trained length, capped by memory); "
            "LLAMA_ARG_CTX_SIZE is llama-server's total over all slots, divided by parallel here",
            _aliases(LLAMA_CTX, Alias("LLAMACPP_N_CTX", _zero_is_auto),
                     Alias("OLLAMA_CONTEXT_LENGTH", _zero_is_auto))),
    Setting("n_gpu_layers", _int, None, "HEARTH_N_GPU_LAYERS",
            "layers to offload to the GPU; -1 = all (default: all that fit)",
            _aliases(Alias("LLAMA_ARG_N_GPU_LAYERS", _llama_gpu_layers),
                     Alias("LLAMACPP_N_GPU_LAYERS", _llama_gpu_layers))),
    Setting("n_threads", _int, None, "HEARTH_N_THREADS", "threads for generation (default: physical cores)",
            _aliases(Alias("LLAMA_ARG_THREADS", _positive_or_auto), Alias("LLAMACPP_N_THREADS", _positive_or_auto))),
    Setting("n_threads_batch", _int, None, "HEARTH_N_THREADS_BATCH",
            "threads for prompt processing (default: n_threads)",
            _aliases(Alias("LLAMA_ARG_THREADS_BATCH", _positive_or_auto))),
    Setting("n_batch", _int, None, "HEARTH_N_BATCH", "logical batch size (default: 2048, capped by n_ctx)",
            _aliases("LLAMA_ARG_BATCH")),
    Setting("n_ubatch", _int, None, "HEARTH_N_UBATCH", "physical batch size (default: 512)",
            _aliases("LLAMA_ARG_UBATCH")),
    Setting("kv_type", _str, None, "HEARTH_KV_TYPE",
            "KV cache type, keys and values: f16, q8_0, q4_0, ... (default: f16, q8_0 if needed to fit)",
            _aliases("LLAMA_ARG_CACHE_TYPE_K", "OLLAMA_KV_CACHE_TYPE")),
    Setting("flash_attn", _bool, None, "HEARTH_FLASH_ATTN", "flash attention on/off (default: llama.cpp decides)",
            _aliases(Alias("LLAMA_ARG_FLASH_ATTN", _llama_bool), Alias("OLLAMA_FLASH_ATTENTION", _llama_bool))),
    Setting("use_mmap", _bool, None, "HEARTH_USE_MMAP", "memory-map the model file (default: on)",
            _aliases(Alias("LLAMA_ARG_NO_MMAP", _llama_no), Alias("LLAMA_ARG_MMAP", _llama_bool),
                     Alias("LLAMA_ARG_LOAD_MODE", _load_mode(mmap=True, mlock=False)))),
    Setting("use_mlock", _bool, None, "HEARTH_USE_MLOCK", "lock the model in RAM (default: off)",
            _aliases(Alias("LLAMA_ARG_MLOCK", _llama_bool),
                     Alias("LLAMA_ARG_LOAD_MODE", _load_mode(mmap=False, mlock=True)))),
    Setting("numa", _bool, None, "HEARTH_NUMA", "spread work over NUMA nodes (default: off)"),
    Setting("parallel", _int, None, "HEARTH_PARALLEL", "concurrent sequences per model (default: planner)",
            _aliases(Alias("LLAMA_ARG_N_PARALLEL", _positive_or_auto),
                     Alias("OLLAMA_NUM_PARALLEL", _positive_or_auto))),
    Setting("max_queue", _int, 64, "HEARTH_MAX_QUEUE", "requests that may wait for a slot; beyond that, a busy error",
            _aliases("OLLAMA_MAX_QUEUE")),
    Setting("host", _str, "127.0.0.1", "HEARTH_HOST", "address the server listens on",
            _aliases("LLAMA_ARG_HOST", Alias("OLLAMA_HOST", lambda v: ollama_host(v)[0]))),
    Setting("port", _int, 11435, "HEARTH_PORT", "port the server listens on",
            _aliases("LLAMA_ARG_PORT", Alias("OLLAMA_HOST", _ollama_port))),
    Setting("api_key", _str, None, "HEARTH_API_KEY", "require this bearer token on the HTTP API",
            _aliases(Alias("LLAMA_API_KEY", _one_api_key), Alias("LLAMA_ARG_API_KEY", _one_api_key))),
    Setting("origins", _str, None, "HEARTH_ORIGINS", "web origins allowed besides localhost's, comma-separated, * wildcards (as OLLAMA_ORIGINS)",
            _aliases("OLLAMA_ORIGINS")),
    Setting("allowed_hosts", _str, None, "HEARTH_ALLOWED_HOSTS", "Host names a loopback server answers besides localhost and loopback addresses, comma-separated"),
    Setting("models_dir", _str, None, "HEARTH_MODELS_DIR", "directories whose .gguf files HTTP clients may use by name or path (os.pathsep-separated)"),
    Setting("keep_alive", _duration, "5m", "HEARTH_KEEP_ALIVE", "how long an idle model stays loaded in the server: seconds or 30s/5m/1h; 0 = unload at once, negative = forever",
            _aliases("OLLAMA_KEEP_ALIVE")),
    Setting("tensor_split", _floats, None, "HEARTH_TENSOR_SPLIT",
            "the share of the offloaded layers each device gets, comma-separated, in the order of `devices` "
            "(else local GPUs, then the hosts' devices), as llama.cpp's --tensor-split (default: the planner, "
            "by free memory)", _aliases("LLAMA_ARG_TENSOR_SPLIT")),
    Setting("devices", _names, None, "HEARTH_DEVICES",
            "llama.cpp devices to offload to, comma-separated (CUDA0, RPC0, ...; none = this CPU only), as "
            "llama.cpp's --device (default: the planner)", _aliases("LLAMA_ARG_DEVICE")),
    Setting("hosts", _str, None, "HEARTH_HOSTS",
            "other machines' `hearth worker`s to split models across, HOST[:PORT] comma-separated "
            "(llama.cpp RPC; default port 50052; default: none, this machine only)"),
    Setting("max_loaded_models", _int, None, "HEARTH_MAX_LOADED_MODELS",
            "models the server keeps loaded at most: idle ones are unloaded, least recently used first, "
            "to load another (default: as many as fit in memory; 0 = the same)",
            _aliases("OLLAMA_MAX_LOADED_MODELS")),
    Setting("ollama_models", lambda v: str(v).strip().strip("\"'"), "~/.ollama/models", "OLLAMA_MODELS",
            "Ollama's model store, whose models hearth runs in place (environment only: Ollama's own variable)",
            in_file=False),
)
BY_NAME = {s.name: s for s in SETTINGS}
# settings that go to the planner as LoadOptions
LOAD_SETTINGS = (
    "n_ctx", "n_gpu_layers", "n_threads", "n_threads_batch", "n_batch", "n_ubatch",
    "kv_type", "flash_attn", "use_mmap", "use_mlock", "numa", "parallel", "tensor_split", "devices",
)


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("HEARTH_CONFIG"):
        return Path(env["HEARTH_CONFIG"]).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("hearth", appauthor=False)) / "config.toml"


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        import tomllib  # type: ignore[import-not-found]
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    if isinstance(data.get("hearth"), dict):  # allow a [hearth] table too
        data = {**data, **data["hearth"]}
        data.pop("hearth")
    unknown = sorted(k for k in data if k not in BY_NAME)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s): {', '.join(unknown)}")
    env_only = sorted(k for k in data if not BY_NAME[k].in_file)
    if env_only:
        raise ConfigError(f"{path}: {', '.join(env_only)} can be set only in the environment "
                          f"({', '.join(BY_NAME[k].env for k in env_only)})")
    return data


@dataclass(frozen=True)
class Config:
    values: Mapping[str, Any]
    sources: Mapping[str, str]  # name -> "default" | "file" | "env" | "flag"
    file: Path

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def load_options(self):
        from .planner import LoadOptions

        return LoadOptions(**{k: self.values[k] for k in LOAD_SETTINGS})

    def data_dir(self) -> Path:
        if self.values.get("home"):
            return Path(self.values["home"]).expanduser()
        from platformdirs import user_data_dir

        return Path(user_data_dir("hearth", appauthor=False))

    def cache_dir(self) -> Path:
        """Measurements worth keeping between runs (memory bandwidth): ``$HEARTH_HOME/cache``,
        else the user cache dir (``$XDG_CACHE_HOME/hearth`` on Linux)."""
        if self.values.get("home"):
            return Path(self.values["home"]).expanduser() / "cache"
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("hearth", appauthor=False))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {
            s.name: {
                "value": self.values[s.name] if s.name != "api_key" or not self.values[s.name] else "***",
                "source": self.sources[s.name],
                "env": s.env,
                "aliases": [a.env for a in s.aliases],
                "doc": s.doc,
            }
            for s in SETTINGS
        }


def per_slot_ctx(total: int | None, parallel: int | None) -> int | None:
    """llama-server's ``-c``/``LLAMA_ARG_CTX_SIZE`` (the KV cache over all slots) as
    hearth's per-slot ``n_ctx``: ``total / parallel`` rounded up to a multiple of 256, as
    llama.cpp does. 0 or None: the planner decides. Without a slot count, llama-server
    shares one cache among its automatic slots and lets each use all of it: here every
    slot gets the whole context, and the planner picks how many slots fit."""
    if not total:
        return None
    if total < 0:
        raise ValueError(f"expected a context size >= 0, got {total}")
    if not parallel:
        return total
    per = total // parallel
    if per == 0:
        raise ValueError(f"a context of {total} tokens is less than one per slot for {parallel} slots")
    return (per + 255) // 256 * 256


def _from_aliases(s: Setting, env: Mapping[str, str]) -> tuple[Any, Alias] | None:
    """The first alias of ``s`` that is set in ``env`` (in its program's syntax)."""
    for a in s.aliases:
        text = (env.get(a.env) or "").strip().strip("\"'").strip()  # as Ollama's envconfig cleans them
        if not text:
            continue
        try:
            value = (a.convert or s.type)(text)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{a.env}: {e}") from None
        if value is not SKIP:
            return value, a
    return None


def load_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    file: Path | None = None,
) -> Config:
    """The effective settings, each with where it came from."""
    env = os.environ if env is None else env
    path = file or config_path(env)
    from_file = _read_file(path)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    origins: dict[str, str] = {}
    for s in SETTINGS:
        value, source = s.default, "default"
        hit = _from_aliases(s, env)
        if hit is not None:
            value, alias = hit
            source, origins[s.name] = f"env:{alias.env}", alias.env
        for layer, where, origin in (
            (from_file, "file", f"{path}"),
            ({k: v for k, v in env.items() if k == s.env and v != ""}, "env", s.env),
            (flags or {}, "flag", f"--{s.name.replace('_', '-')}"),
        ):
            key = s.env if where == "env" else s.name
            if where == "file" and not s.in_file:
                continue
            if key in layer and layer[key] is not None:
                try:
                    value = s.type(layer[key])
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"{origin}: invalid value for {s.name}: {e}") from None
                source, origins[s.name] = where, origin
        values[s.name], sources[s.name] = value, source
    if sources["n_ctx"] == f"env:{LLAMA_CTX.env}":  # llama-server's total over all slots
        try:
            values["n_ctx"] = per_slot_ctx(values["n_ctx"], values["parallel"])
        except ValueError as e:
            raise ConfigError(f"{LLAMA_CTX.env}: {e}") from None
    if values["max_loaded_models"] is not None and values["max_loaded_models"] < 0:
        raise ConfigError(f"{origins.get('max_loaded_models', 'default')}: invalid value for max_loaded_models: "
                          f"expected an integer >= 0, got {values['max_loaded_models']}")
    from .planner import LoadOptions

    for name in LOAD_SETTINGS:  # validate ranges here, naming where a bad value came from
        if values[name] is not None:
            try:
                LoadOptions(**{name: values[name]})
            except Exception as e:
                raise ConfigError(f"{origins.get(name, 'default')}: invalid value for {name}: {e}") from None
    return Config(values, sources, path)
