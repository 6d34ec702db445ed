"""hearth.config.load_config: defaults, precedence flags > env > file > default, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from hearth.config import BY_NAME, LOAD_SETTINGS, SETTINGS, Config, config_path, load_config
from hearth.errors import ConfigError, HearthError
from hearth.planner import LoadOptions


@pytest.fixture
def absent(tmp_path: Path) -> Path:
    return tmp_path / "absent.toml"


def _toml(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "config.toml"
    f.write_text(text, encoding="utf-8")
    return f


def test_defaults_when_nothing_is_set(absent: Path) -> None:
    cfg = load_config(flags={}, env={}, file=absent)
    assert isinstance(cfg, Config)
    assert cfg.file == absent
    for s in SETTINGS:
        assert cfg.values[s.name] == s.default
        assert cfg.sources[s.name] == "default"
    assert cfg.model == "smollm2"
    assert cfg.port == 11435
    assert cfg.host == "127.0.0.1"
    assert cfg.n_ctx is None and cfg.debug is False


def test_unknown_attribute_is_an_attribute_error(absent: Path) -> None:
    cfg = load_config(flags={}, env={}, file=absent)
    with pytest.raises(AttributeError):
        cfg.no_such_setting  # noqa: B018


def test_file_beats_default(tmp_path: Path) -> None:
    f = _toml(tmp_path, 'n_ctx = 999\nmodel = "gemma3:270m"\n')
    cfg = load_config(flags={}, env={}, file=f)
    assert (cfg.n_ctx, cfg.sources["n_ctx"]) == (999, "file")
    assert (cfg.model, cfg.sources["model"]) == ("gemma3:270m", "file")
    assert cfg.sources["port"] == "default"


def test_env_beats_file(tmp_path: Path) -> None:
    f = _toml(tmp_path, "n_ctx = 999\nport = 9000\n")
    cfg = load_config(flags={}, env={"HEARTH_N_CTX": "1234"}, file=f)
    assert (cfg.n_ctx, cfg.sources["n_ctx"]) == (1234, "env")
    assert (cfg.port, cfg.sources["port"]) == (9000, "file")


def test_flag_beats_env_and_file(tmp_path: Path) -> None:
    f = _toml(tmp_path, "n_ctx = 999\n")
    cfg = load_config(flags={"n_ctx": 2048}, env={"HEARTH_N_CTX": "1234"}, file=f)
    assert (cfg.n_ctx, cfg.sources["n_ctx"]) == (2048, "flag")


def test_none_flag_and_empty_env_do_not_override(tmp_path: Path) -> None:
    f = _toml(tmp_path, "n_ctx = 999\n")
    cfg = load_config(flags={"n_ctx": None}, env={"HEARTH_N_CTX": ""}, file=f)
    assert (cfg.n_ctx, cfg.sources["n_ctx"]) == (999, "file")


def test_env_values_are_converted_to_the_setting_type(absent: Path) -> None:
    cfg = load_config(env={"HEARTH_PORT": " 8080 ", "HEARTH_N_GPU_LAYERS": "-1", "HEARTH_KV_TYPE": "q8_0"}, file=absent)
    assert cfg.port == 8080
    assert cfg.n_gpu_layers == -1
    assert cfg.kv_type == "q8_0"


@pytest.mark.parametrize(
    "text, expected",
    [("1", True), ("0", False), ("true", True), ("false", False), ("TRUE", True), ("False", False),
     ("yes", True), ("off", False)],
)
def test_booleans_parse_from_env_strings(absent: Path, text: str, expected: bool) -> None:
    cfg = load_config(env={"HEARTH_USE_MMAP": text, "HEARTH_DEBUG": text}, file=absent)
    assert cfg.use_mmap is expected
    assert cfg.debug is expected
    assert cfg.sources["use_mmap"] == "env"


def test_booleans_from_toml_file(tmp_path: Path) -> None:
    f = _toml(tmp_path, "flash_attn = true\nuse_mlock = false\n")
    cfg = load_config(env={}, file=f)
    assert cfg.flash_attn is True and cfg.use_mlock is False


def test_invalid_boolean_names_the_env_variable(absent: Path) -> None:
    with pytest.raises(ConfigError, match="HEARTH_USE_MMAP") as e:
        load_config(env={"HEARTH_USE_MMAP": "maybe"}, file=absent)
    assert "use_mmap" in str(e.value)


def test_hearth_table_in_file_is_accepted(tmp_path: Path) -> None:
    f = _toml(tmp_path, "[hearth]\nn_ctx = 777\n")
    cfg = load_config(env={}, file=f)
    assert (cfg.n_ctx, cfg.sources["n_ctx"]) == (777, "file")


def test_unknown_key_in_file_is_a_config_error(tmp_path: Path) -> None:
    f = _toml(tmp_path, "n_ctx = 512\ncontext_size = 4096\n")
    with pytest.raises(ConfigError, match="context_size") as e:
        load_config(env={}, file=f)
    assert str(f) in str(e.value)


def test_malformed_toml_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    f = _toml(tmp_path, "n_ctx = = 5\n[unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_config(env={}, file=f)
    assert str(f) in str(e.value)


def test_non_utf8_config_file_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "config.toml"
    f.write_bytes(b"model = \"\xff\xfe\"\n")
    with pytest.raises(ConfigError):
        load_config(env={}, file=f)


def test_invalid_env_value_names_the_variable(absent: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(env={"HEARTH_N_CTX": "abc"}, file=absent)
    msg = str(e.value)
    assert "HEARTH_N_CTX" in msg and "n_ctx" in msg
    assert "\n" not in msg


def test_invalid_file_value_names_the_file(tmp_path: Path) -> None:
    f = _toml(tmp_path, 'n_threads = "many"\n')
    with pytest.raises(ConfigError) as e:
        load_config(env={}, file=f)
    assert str(f) in str(e.value) and "n_threads" in str(e.value)


def test_invalid_flag_value_names_the_flag(absent: Path) -> None:
    with pytest.raises(ConfigError, match="--n-ctx"):
        load_config(flags={"n_ctx": "lots"}, env={}, file=absent)


def test_boolean_is_not_accepted_as_an_integer(tmp_path: Path) -> None:
    f = _toml(tmp_path, "n_ctx = true\n")
    with pytest.raises(ConfigError, match="n_ctx"):
        load_config(env={}, file=f)


@pytest.mark.parametrize(
    "env, name",
    [({"HEARTH_N_CTX": "0"}, "HEARTH_N_CTX"), ({"HEARTH_N_THREADS": "-2"}, "HEARTH_N_THREADS"),
     ({"HEARTH_N_GPU_LAYERS": "-5"}, "HEARTH_N_GPU_LAYERS"), ({"HEARTH_KV_TYPE": "q3_zz"}, "HEARTH_KV_TYPE")],
)
def test_out_of_range_env_value_is_a_config_error_naming_the_variable(absent: Path, env: dict, name: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(env=env, file=absent)
    assert name in str(e.value)


def test_out_of_range_file_value_names_the_file(tmp_path: Path) -> None:
    f = _toml(tmp_path, "n_batch = 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(env={}, file=f)
    assert str(f) in str(e.value) and "n_batch" in str(e.value)


def test_config_error_is_a_hearth_error_with_exit_code_2() -> None:
    assert issubclass(ConfigError, HearthError)
    assert ConfigError("x").exit_code == 2


def test_load_options_carries_the_values(tmp_path: Path) -> None:
    f = _toml(tmp_path, "n_batch = 256\nuse_mmap = false\n")
    cfg = load_config(
        flags={"n_threads": 3},
        env={"HEARTH_N_CTX": "1024", "HEARTH_KV_TYPE": "q8_0", "HEARTH_FLASH_ATTN": "1"},
        file=f,
    )
    opts = cfg.load_options()
    assert isinstance(opts, LoadOptions)
    assert opts.n_ctx == 1024
    assert opts.n_threads == 3
    assert opts.n_batch == 256
    assert opts.kv_type == "q8_0"
    assert opts.flash_attn is True
    assert opts.use_mmap is False
    assert opts.n_gpu_layers is None  # unset: the planner decides
    for name in LOAD_SETTINGS:
        assert getattr(opts, name) == cfg.values[name]


def test_config_path_follows_hearth_config_env(tmp_path: Path) -> None:
    p = tmp_path / "mine.toml"
    assert config_path({"HEARTH_CONFIG": str(p)}) == p
    assert config_path({}).name == "config.toml"


def test_file_from_hearth_config_env_is_read(tmp_path: Path) -> None:
    f = _toml(tmp_path, "port = 1234\n")
    cfg = load_config(env={"HEARTH_CONFIG": str(f)})
    assert cfg.file == f
    assert (cfg.port, cfg.sources["port"]) == (1234, "file")


def test_to_dict_reports_value_source_env_and_hides_the_api_key(absent: Path) -> None:
    cfg = load_config(env={"HEARTH_API_KEY": "sekrit", "HEARTH_N_CTX": "512"}, file=absent)
    d = cfg.to_dict()
    assert set(d) == set(BY_NAME)
    assert d["n_ctx"] == {**d["n_ctx"], "value": 512, "source": "env", "env": "HEARTH_N_CTX"}
    assert d["api_key"]["value"] == "***"
    assert "sekrit" not in repr(d)


def test_data_dir_follows_home(tmp_path: Path, absent: Path) -> None:
    cfg = load_config(env={"HEARTH_HOME": str(tmp_path / "h")}, file=absent)
    assert cfg.data_dir() == tmp_path / "h"


def test_aliases_rank_below_the_config_file_and_show_their_variable(tmp_path: Path, absent: Path) -> None:
    cfg = load_config(env={"OLLAMA_NUM_PARALLEL": "2", "LLAMA_ARG_BATCH": "256"}, file=absent)
    assert (cfg.parallel, cfg.sources["parallel"]) == (2, "env:OLLAMA_NUM_PARALLEL")
    assert cfg.to_dict()["n_batch"]["source"] == "env:LLAMA_ARG_BATCH"
    f = _toml(tmp_path, "parallel = 3\n")
    assert load_config(env={"OLLAMA_NUM_PARALLEL": "2"}, file=f).sources["parallel"] == "file"


def test_alias_names_are_other_programs_and_each_setting_lists_its_own() -> None:
    for s in SETTINGS:
        names = [a.env for a in s.aliases]
        assert len(names) == len(set(names)), s.name
        assert not any(n.startswith("HEARTH_") for n in names), s.name
    assert "aliases" in load_config(env={}, file=Path("/nonexistent/absent.toml")).to_dict()["port"]


def test_tensor_split_and_devices_take_llama_cpps_syntax(tmp_path):
    cfg = load_config(env={"HEARTH_TENSOR_SPLIT": "3/1", "LLAMA_ARG_DEVICE": "RPC0,RPC1"},
                      file=tmp_path / "absent.toml")
    assert cfg.tensor_split == [3.0, 1.0] and cfg.sources["tensor_split"] == "env"
    assert cfg.devices == ["RPC0", "RPC1"] and cfg.sources["devices"] == "env:LLAMA_ARG_DEVICE"
    assert load_config(env={"HEARTH_DEVICES": "none"}, file=tmp_path / "absent.toml").devices == []
