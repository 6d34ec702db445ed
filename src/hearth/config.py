"""Every setting once: name, type, default, environment variable, doc.

Precedence: flags > environment > config file > default (None = the planner decides).
The config file is TOML at ``$HEARTH_CONFIG`` or ``<user config dir>/hearth/config.toml``.
"""

from __future__ import annotations

import os
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
    return int(str(v).strip())


def _str(v: Any) -> str:
    return str(v)


@dataclass(frozen=True)
class Setting:
    name: str
    type: Callable[[Any], Any]
    default: Any
    env: str
    doc: str


SETTINGS: tuple[Setting, ...] = (
    Setting("model", _str, "smollm2", "HEARTH_MODEL", "default model: a known name or a path to a .gguf"),
    Setting("home", _str, None, "HEARTH_HOME", "where hearth keeps models and state (default: the user data dir)"),
    Setting("debug", _bool, False, "HEARTH_DEBUG", "log hearth's and llama.cpp's detail to stderr"),
    Setting("n_ctx", _int, None, "HEARTH_N_CTX", "context length in tokens (default: trained length, capped by memory)"),
    Setting("n_gpu_layers", _int, None, "HEARTH_N_GPU_LAYERS", "layers to offload to the GPU; -1 = all (default: all that fit)"),
    Setting("n_threads", _int, None, "HEARTH_N_THREADS", "threads for generation (default: physical cores)"),
    Setting("n_threads_batch", _int, None, "HEARTH_N_THREADS_BATCH", "threads for prompt processing (default: n_threads)"),
    Setting("n_batch", _int, None, "HEARTH_N_BATCH", "logical batch size (default: 2048, capped by n_ctx)"),
    Setting("n_ubatch", _int, None, "HEARTH_N_UBATCH", "physical batch size (default: 512)"),
    Setting("kv_type", _str, None, "HEARTH_KV_TYPE", "KV cache type: f16, q8_0, q4_0, ... (default: f16, q8_0 if needed to fit)"),
    Setting("flash_attn", _bool, None, "HEARTH_FLASH_ATTN", "flash attention on/off (default: llama.cpp decides)"),
    Setting("use_mmap", _bool, None, "HEARTH_USE_MMAP", "memory-map the model file (default: on)"),
    Setting("use_mlock", _bool, None, "HEARTH_USE_MLOCK", "lock the model in RAM (default: off)"),
    Setting("numa", _bool, None, "HEARTH_NUMA", "spread work over NUMA nodes (default: off)"),
    Setting("parallel", _int, None, "HEARTH_PARALLEL", "concurrent sequences per model (default: planner)"),
    Setting("max_queue", _int, 64, "HEARTH_MAX_QUEUE", "requests that may wait for a slot; beyond that, a busy error"),
    Setting("host", _str, "127.0.0.1", "HEARTH_HOST", "address the server listens on"),
    Setting("port", _int, 11435, "HEARTH_PORT", "port the server listens on"),
    Setting("api_key", _str, None, "HEARTH_API_KEY", "require this bearer token on the HTTP API"),
    Setting("origins", _str, None, "HEARTH_ORIGINS", "web origins allowed besides localhost's, comma-separated, * wildcards (as OLLAMA_ORIGINS)"),
    Setting("allowed_hosts", _str, None, "HEARTH_ALLOWED_HOSTS", "Host names a loopback server answers besides localhost and loopback addresses, comma-separated"),
    Setting("models_dir", _str, None, "HEARTH_MODELS_DIR", "directories whose .gguf files HTTP clients may use by name or path (os.pathsep-separated)"),
    Setting("keep_alive", _str, "5m", "HEARTH_KEEP_ALIVE", "how long an idle model stays loaded in the server: seconds or 30s/5m/1h; 0 = unload at once, negative = forever"),
)
BY_NAME = {s.name: s for s in SETTINGS}
# settings that go to the planner as LoadOptions
LOAD_SETTINGS = (
    "n_ctx", "n_gpu_layers", "n_threads", "n_threads_batch", "n_batch", "n_ubatch",
    "kv_type", "flash_attn", "use_mmap", "use_mlock", "numa", "parallel",
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

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {
            s.name: {
                "value": self.values[s.name] if s.name != "api_key" or not self.values[s.name] else "***",
                "source": self.sources[s.name],
                "env": s.env,
                "doc": s.doc,
            }
            for s in SETTINGS
        }


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
        for layer, where, origin in (
            (from_file, "file", f"{path}"),
            ({k: v for k, v in env.items() if k == s.env and v != ""}, "env", s.env),
            (flags or {}, "flag", f"--{s.name.replace('_', '-')}"),
        ):
            key = s.env if where == "env" else s.name
            if key in layer and layer[key] is not None:
                try:
                    value = s.type(layer[key])
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"{origin}: invalid value for {s.name}: {e}") from None
                source, origins[s.name] = where, origin
        values[s.name], sources[s.name] = value, source
    from .planner import LoadOptions

    for name in LOAD_SETTINGS:  # validate ranges here, naming where a bad value came from
        if values[name] is not None:
            try:
                LoadOptions(**{name: values[name]})
            except Exception as e:
                raise ConfigError(f"{origins.get(name, 'default')}: invalid value for {name}: {e}") from None
    return Config(values, sources, path)
