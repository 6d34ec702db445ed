"""The planner's memory estimate against what a loaded model really uses (RSS)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Runs in a fresh interpreter so nothing else in the test session inflates RSS.
MEASURE = r"""
import json, sys
import llama_cpp  # library code pages are not the model's
from hearth import load_model
from hearth.hardware import process_rss
path, n_ctx = sys.argv[1], int(sys.argv[2])
before = process_rss()
m = load_model(path, n_ctx=n_ctx)
# a prompt longer than one ubatch, so the compute buffers are in use
m.generate_text([(i * 7919) % 30000 + 100 for i in range(700)], max_tokens=4, temperature=0)
print(json.dumps({"measured": process_rss() - before, "estimated": m.plan.memory.ram}))
"""


def measure(path, n_ctx):
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), str(n_ctx)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("n_ctx", [2048, 8192])
def test_estimate_is_within_10_percent_of_measured_rss_smollm2(smollm2_path, n_ctx):
    r = measure(smollm2_path, n_ctx)
    assert abs(r["estimated"] - r["measured"]) <= 0.10 * r["measured"], r


@pytest.mark.parametrize("n_ctx", [2048, 16384])
def test_estimate_is_within_10_percent_of_measured_rss_gemma3(gemma3_path, n_ctx):
    r = measure(gemma3_path, n_ctx)
    assert abs(r["estimated"] - r["measured"]) <= 0.10 * r["measured"], r
