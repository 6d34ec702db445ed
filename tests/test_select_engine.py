"""hearth.engines.base.select_engine / detect_format: which engine serves a path, or why none."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

import hearth
from hearth.engines.base import detect_format, select_engine
from hearth.errors import HearthError, ModelNotFound, UnsupportedFormat
from hearth.store import resolve_model


@pytest.fixture
def hf_folder(tmp_path: Path) -> Path:
    d = tmp_path / "hf-model"
    d.mkdir()
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}', encoding="utf-8")
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return d


def test_real_gguf_selects_llama_cpp(smollm2_path: Path) -> None:
    assert detect_format(smollm2_path) == "gguf"
    assert select_engine(smollm2_path) == "llama.cpp"
    assert select_engine(str(smollm2_path)) == "llama.cpp"


def test_gguf_magic_without_gguf_suffix_selects_llama_cpp(tmp_path: Path, smollm2_path: Path) -> None:
    f = tmp_path / "model.bin"
    with open(smollm2_path, "rb") as src:
        f.write_bytes(src.read(4096))
    assert select_engine(f) == "llama.cpp"  # the magic decides, not the name


def test_hf_safetensors_folder_names_the_converter_and_transformers(hf_folder: Path) -> None:
    with pytest.raises(UnsupportedFormat) as e:
        select_engine(hf_folder)
    msg = str(e.value)
    assert "convert_hf_to_gguf" in msg
    assert "transformers" in msg


def test_folder_with_gguf_files_names_one_of_them(tmp_path: Path) -> None:
    d = tmp_path / "models"
    d.mkdir()
    for name in ("b-model.Q8_0.gguf", "a-model.Q4_K_M.gguf"):
        (d / name).write_bytes(b"GGUF")
    with pytest.raises(UnsupportedFormat) as e:
        select_engine(d)
    msg = str(e.value)
    assert "a-model.Q4_K_M.gguf" in msg or "b-model.Q8_0.gguf" in msg


def test_mlx_folder_names_mlx_lm(tmp_path: Path) -> None:
    d = tmp_path / "mlx-model"
    d.mkdir()
    (d / "config.json").write_text("{}", encoding="utf-8")
    (d / "model.safetensors").write_bytes(b"x")
    (d / "weights.npz").write_bytes(b"x")
    with pytest.raises(UnsupportedFormat, match="mlx-lm"):
        select_engine(d)


def test_empty_folder_is_unsupported(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFormat, match="directory"):
        select_engine(tmp_path)


@pytest.mark.parametrize(
    "name, content, names",
    [
        ("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ", ("convert_hf_to_gguf", "transformers")),
        ("pytorch_model.bin", b"PK\x03\x04" + b"\x00" * 60, ("convert_hf_to_gguf",)),
        ("model.onnx", b"\x08\x07\x12\x04test" + b"\x00" * 20, ("onnxruntime",)),
        ("model.pt", b"PK\x03\x04" + b"\x00" * 60, ("convert_hf_to_gguf",)),
        ("old.ggml", b"lmgg" + b"\x00" * 60, ("convert_llama_ggml_to_gguf",)),
    ],
)
def test_other_format_file_names_what_would_serve_it(tmp_path: Path, name: str, content: bytes, names: tuple[str, ...]) -> None:
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(UnsupportedFormat) as e:
        select_engine(f)
    msg = str(e.value)
    assert name in msg
    for n in names:
        assert n in msg


def test_unknown_non_gguf_file_is_unsupported(tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("hello", encoding="utf-8")
    with pytest.raises(UnsupportedFormat, match="not a GGUF file"):
        select_engine(f)


def test_gguf_suffix_with_bad_magic_is_left_to_the_gguf_reader(tmp_path: Path) -> None:
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"NOPE" + b"\x00" * 64)
    assert detect_format(f) == "gguf"  # the GGUF reader gives the precise error


def test_missing_path_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        select_engine(tmp_path / "nope.gguf")


def test_unreadable_path_is_a_hearth_error_not_an_oserror(tmp_path: Path) -> None:
    sock_path = tmp_path / "s"
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(sock_path))
        with pytest.raises(UnsupportedFormat, match="not a regular file"):
            select_engine(sock_path)
    finally:
        s.close()
    fifo = tmp_path / "f.gguf"
    os.mkfifo(fifo)  # opening it would block forever: refused without opening
    with pytest.raises(UnsupportedFormat, match="not a regular file"):
        select_engine(fifo)


def test_errors_are_one_line_hearth_errors(hf_folder: Path) -> None:
    with pytest.raises(HearthError) as e:
        select_engine(hf_folder)
    assert "\n" not in str(e.value)
    assert e.value.exit_code == 2


# -- the library's entry points reach the same verdicts, before llama.cpp -------------


def test_load_model_on_hf_folder_raises_unsupported_format(hf_folder: Path) -> None:
    with pytest.raises(UnsupportedFormat) as e:
        hearth.load_model(hf_folder)
    assert "convert_hf_to_gguf" in str(e.value)


def test_load_model_on_safetensors_file_raises_unsupported_format(tmp_path: Path) -> None:
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"hi\n")
    with pytest.raises(UnsupportedFormat, match="convert_hf_to_gguf"):
        hearth.load_model(f)


def test_model_info_on_onnx_file_raises_unsupported_format(tmp_path: Path) -> None:
    f = tmp_path / "model.onnx"
    f.write_bytes(b"\x08\x07" + b"\x00" * 30)
    with pytest.raises(UnsupportedFormat, match="onnxruntime"):
        hearth.get_model_info(f)


def test_resolve_model_accepts_a_real_gguf(smollm2_path: Path) -> None:
    r = resolve_model(smollm2_path)
    assert r.path == smollm2_path.resolve()
    assert r.source == "local"


def test_load_model_refuses_a_folder_without_touching_llama_cpp(hf_folder: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    code = (
        "import sys, hearth\n"
        "try:\n"
        f"    hearth.load_model({str(hf_folder)!r})\n"
        "except hearth.UnsupportedFormat:\n"
        "    print('llama_cpp' in sys.modules, 'hearth.engines.llamacpp' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
    env.update(HEARTH_CONFIG=str(tmp_path / "absent.toml"), HEARTH_HOME=str(tmp_path / "home"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]
