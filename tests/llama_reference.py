"""llama.cpp's own llama-server, built from the exact llama.cpp our llama-cpp-python
vendors (``../shared/tools/build-llama-reference.sh``), for side-by-side tests.

Found in ``$LLAMA_REF_BIN``, else in the build script's cache; a test that needs it
is skipped (saying how to build it) when it is not there.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest


def reference_bin() -> Path | None:
    env = os.environ.get("LLAMA_REF_BIN")
    if env:
        return Path(env)
    try:
        ver = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None
    root = Path(os.environ.get("LLAMA_REF_DIR", Path.home() / ".cache" / "llama-reference"))
    return root / ver / "build" / "bin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(model: Path, n_ctx: int = 512, *extra: str) -> Iterator[str]:
    """A running llama-server on ``model`` (one slot, its chat template through Jinja);
    yields its base URL."""
    import httpx

    b = reference_bin()
    exe = b / "llama-server" if b else None
    if exe is None or not exe.is_file():
        pytest.skip("llama-server is not built: run ../shared/tools/build-llama-reference.sh "
                    "(or set LLAMA_REF_BIN)")
    port = _free_port()
    argv = [str(exe), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", str(n_ctx),
            "-np", "1", "--jinja", "-t", str(max(1, (os.cpu_count() or 2))), *extra]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"llama-server exited: {log.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server did not become ready")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
