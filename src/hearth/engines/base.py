"""The Engine protocol every engine satisfies, and ``select_engine`` by model format."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence, Mapping, runtime_checkable

from ..errors import InvalidModel, ModelNotFound, UnsupportedFormat
from ..types import GenerationChunk, GenerationConfig, GenerationResult


@runtime_checkable
class Engine(Protocol):
    """A loaded model that can generate. One instance serves many threads at once."""

    name: str

    def tokenize(self, text: str, add_special: bool = True) -> list[int]: ...

    def detokenize(self, tokens: list[int]) -> str: ...

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[str]]:
        """Prompt text for these messages and the stop strings the template implies."""
        ...

    def stream(self, prompt: str | list[int], config: GenerationConfig) -> Iterator[GenerationChunk]:
        """Yield chunks; the generator's ``.result`` holds the GenerationResult at the end."""
        ...

    def generate(self, prompt: str | list[int], config: GenerationConfig) -> GenerationResult: ...

    def close(self) -> None: ...


# Formats we recognise but do not run, and what would run them.
_OTHER_FORMATS = {
    ".safetensors": "a safetensors checkpoint: convert it to GGUF with llama.cpp's "
    "convert_hf_to_gguf.py, or run it with transformers or vLLM",
    ".bin": "a PyTorch checkpoint: convert it to GGUF with llama.cpp's convert_hf_to_gguf.py",
    ".pt": "a PyTorch checkpoint: convert it to GGUF with llama.cpp's convert_hf_to_gguf.py",
    ".pth": "a PyTorch checkpoint: convert it to GGUF with llama.cpp's convert_hf_to_gguf.py",
    ".onnx": "an ONNX model: run it with onnxruntime-genai",
    ".npz": "an MLX/NumPy checkpoint: run it with mlx-lm on Apple silicon",
    ".ggml": "an old GGML file: convert it to GGUF with llama.cpp's convert_llama_ggml_to_gguf.py",
}


def detect_format(path: str | os.PathLike[str]) -> str:
    """'gguf', or raise a clear error naming what would serve this format."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFound(f"{p}: no such file")
    if p.is_dir():
        names = {c.name for c in p.iterdir()} if os.access(p, os.R_OK) else set()
        ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
        if ggufs:
            raise UnsupportedFormat(f"{p} is a directory; name one of its GGUF files, e.g. {p / ggufs[0]}")
        if any(n.endswith(".safetensors") for n in names) and "config.json" in names:
            if "mlx" in " ".join(names).lower() or any(n.endswith(".npz") for n in names):
                raise UnsupportedFormat(f"no engine for {p}: an MLX model; run it with mlx-lm on Apple silicon")
            raise UnsupportedFormat(
                f"no engine for {p}: a Hugging Face safetensors model; convert it to GGUF with "
                "llama.cpp's convert_hf_to_gguf.py, or run it with transformers or vLLM"
            )
        raise UnsupportedFormat(f"{p} is a directory, not a model file")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except PermissionError:
        raise ModelNotFound(f"{p}: permission denied") from None
    except OSError as e:
        raise InvalidModel(f"{p}: cannot read: {e.strerror or e}") from None
    if magic == b"GGUF":
        return "gguf"
    hint = _OTHER_FORMATS.get(p.suffix.lower())
    if hint:
        raise UnsupportedFormat(f"no engine for {p.name}: {hint}")
    if p.suffix.lower() == ".gguf":
        return "gguf"  # let the GGUF reader say exactly what is wrong
    raise UnsupportedFormat(
        f"no engine for {p.name}: not a GGUF file (hearth runs GGUF models on llama.cpp)"
    )


def select_engine(path: str | os.PathLike[str]) -> str:
    """The engine that runs this model file: today only 'llama.cpp' for GGUF."""
    fmt = detect_format(path)
    return {"gguf": "llama.cpp"}[fmt]
