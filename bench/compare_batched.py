#!/usr/bin/env python3
"""Continuous-batching throughput: hearth vs llama-batched-bench vs llama-cpp-python, interleaved.

For each model and round, three programs run one after another on the same model
file and thread count (the order rotates every round, so that noise on a shared
machine hits all of them alike):

* ``hearth bench MODEL -p P -n N -r 1 --concurrency LEVELS --threads T --json``:
  for each level c, c distinct random prompts of P tokens submitted together
  (aggregate prompt tokens/s, mean ttft), then the same prompts again with N tokens
  each: c sequences generating side by side (aggregate generation tokens/s).
  hearth sizes itself to max(LEVELS) slots of P+N+1 tokens each, one KV stream per slot.
* ``llama-batched-bench -m PATH -c max(LEVELS)*(P+N+1) -npp P -ntg N -npl LEVELS -t T`` (one KV stream per sequence, as hearth)
  (llama.cpp's own reference; S_PP and S_TG are the matching aggregate rates).
* llama-cpp-python's high-level ``Llama`` in a subprocess, serving c requests of the
  same kind one after another (``create_completion`` with a token-list prompt,
  temperature 0, end of stream masked by a logits processor): the rate you get
  without batching.

usage (from the repository root):
    /work/venv/bin/python bench/compare_batched.py \
        [--models smollm2] [--levels 1,2,4,8,16] [-p 512] [-n 128] [--rounds 2] \
        [--threads N] [--json OUT]

llama-batched-bench is found like in compare_llama_bench.py: --llama-bin, else
$LLAMA_REF_BIN, else ../shared/tools/build-llama-reference.sh (built once, cached).

Standard library only in this process; the llama-cpp-python worker needs
llama_cpp (and numpy, which it depends on) in the Python given by --python.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_llama_bench import (  # noqa: E402  (shared helpers)
    BenchError,
    f1,
    f3,
    find_hearth,
    find_llama_bin,
    fmt_cmd,
    guarded,
    hearth_info,
    help_default,
    log,
    parse_json_out,
    ratio,
    run_capture,
)

GOAL_RATIO = 0.95  # hearth / llama-batched-bench, pp and tg, at every level
GOAL_SCALING = 1.6  # hearth tg at --scale-level / tg at 1
SIDES = ("hearth", "batched", "llamapy")
SIDE_NAMES = {"hearth": "hearth bench", "batched": "llama-batched-bench", "llamapy": "llama-cpp-python"}


def parse_levels(text: str) -> list[int]:
    try:
        levels = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels must be integers like 1,2,4,8, got {text!r}") from None
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError("levels must be >= 1")
    return levels


def mean_or_none(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


# -- hearth ------------------------------------------------------------------------


def run_hearth(hearth: str, model: str, args, threads: int, timeout: float) -> dict:
    cmd = [hearth, "bench", model, "-p", str(args.n_prompt), "-n", str(args.n_gen), "-r", "1",
           "--concurrency", ",".join(map(str, args.levels)), "--threads", str(threads), "--json",
           *args.hearth_arg]
    t0 = time.perf_counter()
    d = parse_json_out(run_capture(cmd, timeout), "hearth bench")
    levels = {}
    for lv in d.get("concurrency") or []:
        c = int(lv["concurrency"])
        pp = float(lv.get("pp_tokens_per_second") or 0.0)
        tg = float(lv.get("tg_tokens_per_second") or 0.0)
        tg_s = lv.get("tg_seconds")
        # end to end: generated tokens over (prompt phase + generation phase) time
        t_pp = c * args.n_prompt / pp if pp else None
        e2e = c * args.n_gen / (t_pp + tg_s) if t_pp is not None and tg_s else None
        levels[c] = {"pp": pp, "tg": tg, "ttft": lv.get("mean_ttft_seconds"), "tg_seconds": tg_s,
                     "pp_seconds": t_pp, "e2e": e2e, "cached_tokens": lv.get("cached_tokens")}
    missing = [c for c in args.levels if c not in levels]
    if missing:
        raise BenchError(f"hearth bench printed no result for levels {missing}:\n{json.dumps(d)[:2000]}")
    return {"levels": levels, "single_stream": {k: d.get(k) for k in (
                "pp_tokens_per_second", "tg_tokens_per_second", "ttft_seconds", "peak_rss_bytes", "n_threads")},
            "wall_seconds": time.perf_counter() - t0, "command": fmt_cmd(cmd)}


# -- llama-batched-bench -----------------------------------------------------------


def batched_flags(plan: dict, help_text: str) -> tuple[list[str], list[str]]:
    """Flags that load the model as hearth's plan does, and notes on what could not be matched."""
    flags: list[str] = []
    notes: list[str] = []

    def put(short: str, long: str, value: str) -> None:
        if help_default(help_text, long)[0]:
            flags.extend([short, value])
        else:
            notes.append(f"llama-batched-bench has no {long}; wanted {value}")

    put("-b", "--batch-size", str(plan["n_batch"]))
    put("-ub", "--ubatch-size", str(plan["n_ubatch"]))
    put("-ngl", "--n-gpu-layers", str(plan["n_gpu_layers"]))
    put("-ctk", "--cache-type-k", str(plan["kv_type"]))
    put("-ctv", "--cache-type-v", str(plan["kv_type"]))
    put("-fa", "--flash-attn", {None: "auto", True: "on", False: "off"}[plan.get("flash_attn")])
    use_mmap, use_mlock = bool(plan.get("use_mmap", True)), bool(plan.get("use_mlock", False))
    if help_default(help_text, "--load-mode")[0]:
        # named explicitly: llama.cpp's "auto" means mmap only where the device supports it
        put("-lm", "--load-mode", {(True, False): "mmap", (True, True): "mmap+mlock",
                                   (False, True): "mlock", (False, False): "none"}[(use_mmap, use_mlock)])
    else:
        if not use_mmap:
            if help_default(help_text, "--no-mmap")[0]:
                flags.append("--no-mmap")
            else:
                notes.append("hearth reads the model into RAM (no mmap); not matched")
        if use_mlock:
            if help_default(help_text, "--mlock")[0]:
                flags.append("--mlock")
            else:
                notes.append("hearth locks the model in RAM (mlock); not matched")
    return flags, notes


def parse_batched_jsonl(text: str) -> dict[int, dict]:
    rows = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "pl" not in r:
            continue
        rows[int(r["pl"])] = {"pp": float(r["speed_pp"]), "tg": float(r["speed_tg"]),
                              "t_pp": float(r["t_pp"]), "t_tg": float(r["t_tg"]), "n_kv": r.get("n_kv"),
                              "flash_attn": r.get("flash_attn"), "n_kv_max": r.get("n_kv_max")}
    return rows


def parse_batched_md(text: str) -> dict[int, dict]:
    """The Markdown table: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |"""
    rows: dict[int, dict] = {}
    header: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if "S_TG t/s" in cells:
            header = cells
            continue
        if header is None or len(cells) != len(header) or set(cells[0]) <= set("-: "):
            continue
        r = dict(zip(header, cells))
        try:
            rows[int(r["B"])] = {"pp": float(r["S_PP t/s"]), "tg": float(r["S_TG t/s"]),
                                 "t_pp": float(r["T_PP s"]), "t_tg": float(r["T_TG s"]), "n_kv": int(r["N_KV"])}
        except (KeyError, ValueError):
            continue
    return rows


def run_batched(binary: str, path: str, args, threads: int, flags: list[str], jsonl: bool,
                timeout: float) -> dict:
    ctx = max(args.levels) * (args.n_prompt + args.n_gen + 1)
    cmd = [binary, "-m", path, "-c", str(ctx), *flags,
           "-npp", str(args.n_prompt), "-ntg", str(args.n_gen), "-npl", ",".join(map(str, args.levels)),
           "-t", str(threads), "-tb", str(threads)]
    if jsonl:
        cmd += ["--output-format", "jsonl"]
    cmd += args.batched_arg
    t0 = time.perf_counter()
    out = run_capture(cmd, timeout)
    rows = parse_batched_jsonl(out) if jsonl else parse_batched_md(out)
    if not rows:  # e.g. --batched-arg changed the format
        rows = parse_batched_md(out) or parse_batched_jsonl(out)
    missing = [c for c in args.levels if c not in rows]
    if missing:
        raise BenchError(f"llama-batched-bench printed no row for B = {missing}:\n{out[-2000:]}")
    levels = {}
    for c in args.levels:
        r = rows[c]
        t = r["t_pp"] + r["t_tg"]
        levels[c] = {**r, "e2e": c * args.n_gen / t if t else None}
    return {"levels": levels, "wall_seconds": time.perf_counter() - t0, "command": fmt_cmd(cmd)}


# -- llama-cpp-python (runs in a subprocess: this file with --_worker SPEC) ----------


def llamapy_worker(spec: dict) -> dict:
    """Load llama_cpp.Llama once, then for each level c serve c requests one after another."""
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama, LogitsProcessorList

    p, n, threads = spec["n_prompt"], spec["n_gen"], spec["threads"]
    kw = dict(model_path=spec["path"], n_ctx=p + n + 16, n_threads=threads, n_threads_batch=threads,
              n_batch=spec["n_batch"], n_ubatch=spec["n_ubatch"], n_gpu_layers=spec["n_gpu_layers"],
              use_mmap=spec["use_mmap"], use_mlock=spec["use_mlock"], seed=spec["seed"], verbose=False)
    fa = spec["flash_attn"]  # "auto" | "on" | "off"
    t0 = time.perf_counter()
    if fa == "auto":
        # Llama() only knows flash_attn=True/False (enabled/disabled). hearth lets llama.cpp
        # choose (auto): make "False" mean auto while the context is created.
        mod = sys.modules[Llama.__module__].llama_cpp
        saved = mod.LLAMA_FLASH_ATTN_TYPE_DISABLED
        mod.LLAMA_FLASH_ATTN_TYPE_DISABLED = mod.LLAMA_FLASH_ATTN_TYPE_AUTO
        try:
            llm = Llama(flash_attn=False, **kw)
        finally:
            mod.LLAMA_FLASH_ATTN_TYPE_DISABLED = saved
    else:
        llm = Llama(flash_attn=(fa == "on"), **kw)
    load_s = time.perf_counter() - t0

    n_vocab = llm.n_vocab()
    try:
        vocab = llm._model.vocab
        eog = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    except AttributeError:  # older bindings
        eog = [llm.token_eos()]
    eog_idx = np.array(sorted(set(eog)), dtype=np.intp)
    stamps: list[float] = []

    def no_eos(_input_ids, logits):
        # called once per sampled token, right after the decode that produced the logits
        stamps.append(time.perf_counter())
        logits[eog_idx] = -np.inf
        return logits

    procs = LogitsProcessorList([no_eos])
    rng = random.Random(spec["seed"])
    mode = spec["mode"]

    def request(toks: list[int], max_tokens: int) -> dict:
        llm.reset()  # no prefix reuse between requests
        stamps.clear()
        t_start = time.perf_counter()
        if mode == "completion":
            r = llm.create_completion(prompt=toks, max_tokens=max_tokens, temperature=0.0,
                                      repeat_penalty=1.0, logits_processor=procs)
            got = int(r["usage"]["completion_tokens"])
        else:  # generate: the token loop under create_completion, no text handling
            got = 0
            for _tok in llm.generate(toks, temp=0.0, repeat_penalty=1.0, logits_processor=procs):
                got += 1
                if got >= max_tokens:
                    break
        t_end = time.perf_counter()
        return {"t_start": t_start, "t_end": t_end, "stamps": list(stamps), "tokens": got}

    request([rng.randrange(n_vocab) for _ in range(min(p, 32) or 1)], 2)  # warm-up
    levels = {}
    for c in spec["levels"]:
        reqs = [request([rng.randrange(n_vocab) for _ in range(p)], n) for _ in range(c)]
        ttft = [r["stamps"][0] - r["t_start"] for r in reqs]  # prompt done (first logits)
        # steady-state generation: one full token cycle (sample, text handling, decode) per
        # interval between consecutive logits; k logits = k-1 intervals
        cycles = sum(len(r["stamps"]) - 1 for r in reqs)
        t_cycles = sum(r["stamps"][-1] - r["stamps"][0] for r in reqs)
        total = sum(r["t_end"] - r["t_start"] for r in reqs)
        tokens = sum(r["tokens"] for r in reqs)
        levels[c] = {
            "pp": c * p / sum(ttft),
            "tg": cycles / t_cycles if t_cycles > 0 else None,
            "e2e": tokens / total,
            "ttft": statistics.fmean(ttft),
            "tokens": tokens,
            "short_requests": sum(1 for r in reqs if r["tokens"] != n),
            "seconds": total,
        }
    return {"levels": levels, "load_seconds": load_s, "n_vocab": n_vocab, "eog_tokens": eog_idx.tolist(),
            "llama_cpp_python": getattr(llama_cpp, "__version__", "?"), "n_ctx": llm.n_ctx()}


def run_llamapy(python: str, spec: dict, timeout: float) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
    t0 = time.perf_counter()
    d = parse_json_out(run_capture(cmd, timeout), "llama-cpp-python worker")
    d["levels"] = {int(k): v for k, v in d["levels"].items()}
    short = sum(v["short_requests"] for v in d["levels"].values())
    if short:
        raise BenchError(f"llama-cpp-python: {short} requests stopped before {spec['n_gen']} tokens")
    d["wall_seconds"] = time.perf_counter() - t0
    d["command"] = f"{python} {Path(__file__).name} --_worker '<spec>'"
    d["spec"] = spec
    return d


# -- aggregation and report --------------------------------------------------------


def aggregate(rounds: list[dict], levels: list[int], py_levels: list[int]) -> dict:
    """Per level: mean over rounds of each side's numbers, ratios of the means, per-round ratios."""
    agg: dict = {}
    for c in levels:
        a: dict = {}
        for side, keys in (("hearth", ("pp", "tg", "ttft", "e2e")), ("batched", ("pp", "tg", "e2e")),
                           ("llamapy", ("pp", "tg", "ttft", "e2e"))):
            for k in keys:
                vals = [r[side]["levels"][c][k] for r in rounds
                        if side in r and c in r[side]["levels"]]
                a[f"{side}_{k}"] = mean_or_none(vals)
        for k in ("pp", "tg"):
            per = [ratio(r["hearth"]["levels"][c][k], r["batched"]["levels"][c][k]) for r in rounds]
            ok = [x for x in per if x is not None]
            a[f"{k}_ratio"] = ratio(a[f"hearth_{k}"], a[f"batched_{k}"])
            a[f"{k}_ratio_rounds"] = per
            a[f"{k}_ratio_min"] = min(ok) if ok else None
            a[f"{k}_ratio_max"] = max(ok) if ok else None
        agg[c] = a
    # llama-cpp-python serves one request at a time, so its rate does not depend on c:
    # levels it did not run are compared with the mean of the levels it did run
    seq_tg = mean_or_none([agg[c]["llamapy_tg"] for c in py_levels])
    seq_e2e = mean_or_none([agg[c]["llamapy_e2e"] for c in py_levels])
    for c in levels:
        a = agg[c]
        a["llamapy_measured"] = c in py_levels
        ref_tg = a["llamapy_tg"] if c in py_levels else seq_tg
        ref_e2e = a["llamapy_e2e"] if c in py_levels else seq_e2e
        a["vs_llamapy_tg"] = ratio(a["hearth_tg"], ref_tg) if ref_tg else None
        a["vs_llamapy_e2e"] = ratio(a["hearth_e2e"], ref_e2e) if ref_e2e else None
    return agg


def fmt_py(a: dict, key: str) -> str:
    return f1(a[f"llamapy_{key}"]) if a["llamapy_measured"] else "—"


def print_model_report(m: dict, args) -> None:
    agg, levels = m["aggregate"], args.levels
    has_py = not args.no_llama_py
    print(f"\n### {m['model']}: mean of {args.rounds} round(s), pp{args.n_prompt} / tg{args.n_gen}, "
          f"{m['threads']} threads (tokens/s are aggregate over the c sequences)\n")
    head = ("| c | hearth tg | batched S_TG | tg ratio | hearth pp | batched S_PP | pp ratio | hearth mean ttft s |")
    sep = "|---:|---:|---:|---:|---:|---:|---:|---:|"
    if has_py:
        head += " llama-cpp-python seq tg | hearth / llama-cpp-python |"
        sep += "---:|---:|"
    print(head)
    print(sep)
    for c in levels:
        a = agg[c]
        row = (f"| {c} | {f1(a['hearth_tg'])} | {f1(a['batched_tg'])} | {f3(a['tg_ratio'])} "
               f"| {f1(a['hearth_pp'])} | {f1(a['batched_pp'])} | {f3(a['pp_ratio'])} | {f3(a['hearth_ttft'])} |")
        if has_py:
            row += f" {fmt_py(a, 'tg')} | {f3(a['vs_llamapy_tg'])} |"
        print(row)
    if has_py:
        print("\nllama-cpp-python serves the requests one after another, so its rate does not depend on c;"
              " it ran at c in {" + ",".join(map(str, m["py_levels"])) + "} and '—' rows are compared"
              " with the mean of those.")

    # end-to-end: generated tokens over prompt + generation time
    print("\nend to end (generated tokens / (prompt time + generation time), all c requests):\n")
    head = "| c | hearth | llama-batched-bench | ratio |"
    sep = "|---:|---:|---:|---:|"
    if has_py:
        head += " llama-cpp-python seq | hearth / llama-cpp-python |"
        sep += "---:|---:|"
    print(head)
    print(sep)
    for c in levels:
        a = agg[c]
        row = (f"| {c} | {f1(a['hearth_e2e'])} | {f1(a['batched_e2e'])} "
               f"| {f3(ratio(a['hearth_e2e'], a['batched_e2e']))} |")
        if has_py:
            row += f" {fmt_py(a, 'e2e')} | {f3(a['vs_llamapy_e2e'])} |"
        print(row)

    print()
    for k in ("tg", "pp"):
        for c in levels:
            a = agg[c]
            per = ", ".join(f3(x) for x in a[f"{k}_ratio_rounds"])
            print(f"{m['model']} c={c} {k} per-round ratios hearth/batched: [{per}]"
                  f"  (min {f3(a[f'{k}_ratio_min'])}, max {f3(a[f'{k}_ratio_max'])})")
    s = m["scaling"]
    print(f"\nscaling tg@{s['level']}/tg@{s['base']}: hearth {f3(s['hearth'])}, llama-batched-bench {f3(s['batched'])}"
          + (f", llama-cpp-python {f3(s['llamapy'])}" if has_py and s.get("llamapy") is not None else ""))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_worker"]:  # internal: the llama-cpp-python subprocess
        print(json.dumps(llamapy_worker(json.loads(argv[1]))))
        return 0

    ap = argparse.ArgumentParser(
        description="hearth's continuous batching vs llama-batched-bench and sequential llama-cpp-python, interleaved.")
    ap.add_argument("--models", nargs="+", default=["smollm2"], help="model names or .gguf paths (default: smollm2)")
    ap.add_argument("--levels", type=parse_levels, default=parse_levels("1,2,4,8,16"),
                    help="concurrency levels (default 1,2,4,8,16)")
    ap.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens per request (default 512)")
    ap.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens per request (default 128)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per model (default 2)")
    ap.add_argument("--threads", "-t", type=int, default=None,
                    help="threads for all three (default: what hearth's planner picks)")
    ap.add_argument("--json", dest="json_out", metavar="OUT", help="write every number to this JSON file")
    ap.add_argument("--py-levels", type=parse_levels, default=None,
                    help="levels at which to run llama-cpp-python (default: 1 and 8 where in --levels,"
                         " else the lowest and highest level)")
    ap.add_argument("--py-mode", choices=("completion", "generate"), default="completion",
                    help="llama-cpp-python path: create_completion (default; detokenizes like a server) "
                         "or the bare Llama.generate token loop")
    ap.add_argument("--py-flash-attn", choices=("match", "auto", "on", "off"), default="match",
                    help="flash attention for llama-cpp-python (default: match hearth's plan)")
    ap.add_argument("--no-llama-py", action="store_true", help="skip the llama-cpp-python baseline")
    ap.add_argument("--scale-level", type=int, default=8, help="scaling goal: tg at this level / tg at 1 (default 8)")
    ap.add_argument("--llama-bin", help="folder holding llama-batched-bench"
                                        " (default: $LLAMA_REF_BIN, else build-llama-reference.sh)")
    ap.add_argument("--hearth", help="hearth CLI (default: the one next to this Python)")
    ap.add_argument("--python", default=sys.executable, help="Python with llama_cpp for the baseline (default: this one)")
    ap.add_argument("--hearth-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for hearth bench (repeatable)")
    ap.add_argument("--batched-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for llama-batched-bench (repeatable)")
    ap.add_argument("--seed", type=int, default=1234, help="seed for the llama-cpp-python prompts (default 1234)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per program run (default 3600)")
    ap.add_argument("--strict", action="store_true", help="exit 2 when a goal is not met")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.n_prompt < 1 or args.n_gen < 2:
        ap.error("--rounds and -p must be >= 1, -n >= 2")
    return guarded(run, args)


def default_py_levels(levels: list[int]) -> list[int]:
    want = [c for c in (1, 8) if c in levels]
    return want if len(want) == 2 else sorted({levels[0], levels[-1]})


def run(args) -> int:
    levels = args.levels
    if args.no_llama_py:
        args.py_levels = []
    elif args.py_levels is None:
        args.py_levels = default_py_levels(levels)
    else:
        args.py_levels = [c for c in args.py_levels if c in levels]
        if not args.py_levels:
            raise BenchError("--py-levels has no level that is in --levels")

    hearth = find_hearth(args.hearth)
    llama_dir, llama_src = find_llama_bin(args.llama_bin, args.timeout)
    batched = str(llama_dir / "llama-batched-bench")
    if not os.access(batched, os.X_OK):
        raise BenchError(f"{batched} is not an executable")
    help_text = subprocess.run([batched, "--help"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, timeout=60).stdout
    jsonl = help_default(help_text, "--output-format")[0] and "jsonl" in help_default(help_text, "--output-format")[2]
    bb_version = subprocess.run([batched, "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=60).stdout.strip()
    hearth_version = run_capture([hearth, "--version"], 60).strip()

    print(f"# hearth              : {hearth} ({hearth_version})")
    print(f"# llama-batched-bench : {batched} ({bb_version.splitlines()[0] if bb_version else '?'}; via {llama_src};"
          f" output {'jsonl' if jsonl else 'markdown'})")
    if not args.no_llama_py:
        print(f"# llama-cpp-python    : {args.python}, Llama.{'create_completion' if args.py_mode == 'completion' else 'generate'},"
              f" sequential, levels {','.join(map(str, args.py_levels))}")
    print(f"# settings            : levels {','.join(map(str, levels))}, -p {args.n_prompt}, -n {args.n_gen},"
          f" rounds {args.rounds}; host {platform.node()}, {os.cpu_count()} CPUs")
    sys.stdout.flush()

    report: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"node": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "hearth": {"cli": hearth, "version": hearth_version},
        "llama_batched_bench": {"path": batched, "version": bb_version, "found_via": llama_src, "jsonl": jsonl},
        "settings": {"levels": levels, "n_prompt": args.n_prompt, "n_gen": args.n_gen, "rounds": args.rounds,
                     "threads": args.threads, "py_levels": args.py_levels, "py_mode": args.py_mode,
                     "py_flash_attn": args.py_flash_attn, "hearth_extra": args.hearth_arg,
                     "batched_extra": args.batched_arg, "seed": args.seed},
        "goal": {"ratio_min": GOAL_RATIO, "scaling_min": GOAL_SCALING, "scale_level": args.scale_level},
        "models": [],
    }

    for model in args.models:
        info = hearth_info(hearth, model, args.threads, args.timeout)
        path = info["model"]["path"]
        plan = info["plan"]
        threads = args.threads or int(plan["n_threads"])
        flags, notes = batched_flags(plan, help_text)
        fa_plan = {None: "auto", True: "on", False: "off"}[plan.get("flash_attn")]
        py_fa = fa_plan if args.py_flash_attn == "match" else args.py_flash_attn
        ctx = max(levels) * (args.n_prompt + args.n_gen + 1)
        print(f"\n## {model}: {path}")
        print(f"#   threads {threads}; hearth plan: batch {plan['n_batch']}/{plan['n_ubatch']}, kv {plan['kv_type']},"
              f" flash_attn {fa_plan}, mmap {plan.get('use_mmap')}, gpu layers {plan['n_gpu_layers']};"
              f" with --concurrency: {max(levels)} slots, {ctx} cells in all, one KV stream per slot")
        print(f"#   llama-batched-bench: -c {ctx} {' '.join(flags)}")
        if not args.no_llama_py:
            print(f"#   llama-cpp-python: n_ctx {args.n_prompt + args.n_gen + 16}, n_batch {plan['n_batch']}/{plan['n_ubatch']},"
                  f" flash_attn {py_fa}, EOS masked by a logits processor")
        for n_ in notes:
            print(f"#   note: {n_}")
        sys.stdout.flush()

        spec = {"path": path, "n_prompt": args.n_prompt, "n_gen": args.n_gen, "threads": threads,
                "levels": args.py_levels, "mode": args.py_mode, "flash_attn": py_fa,
                "n_batch": int(plan["n_batch"]), "n_ubatch": int(plan["n_ubatch"]),
                "n_gpu_layers": int(plan["n_gpu_layers"]), "use_mmap": bool(plan.get("use_mmap", True)),
                "use_mlock": bool(plan.get("use_mlock", False)), "seed": args.seed}
        sides = [s for s in SIDES if not (s == "llamapy" and args.no_llama_py)]
        rounds = []
        for i in range(args.rounds):
            order = sides[i % len(sides):] + sides[:i % len(sides)]
            rnd: dict = {"round": i + 1, "order": order, "loadavg_before": os.getloadavg()[0]}
            for side in order:
                log(f"#   round {i + 1}: {SIDE_NAMES[side]} ...")
                if side == "hearth":
                    rnd[side] = run_hearth(hearth, model, args, threads, args.timeout)
                elif side == "batched":
                    rnd[side] = run_batched(batched, path, args, threads, flags, jsonl, args.timeout)
                else:
                    rnd[side] = run_llamapy(args.python, {**spec, "seed": args.seed + i}, args.timeout)
            h, b = rnd["hearth"]["levels"], rnd["batched"]["levels"]
            parts = [f"c={c}: tg {f1(h[c]['tg'])}/{f1(b[c]['tg'])}={f3(ratio(h[c]['tg'], b[c]['tg']))}"
                     f" pp {f1(h[c]['pp'])}/{f1(b[c]['pp'])}={f3(ratio(h[c]['pp'], b[c]['pp']))}" for c in levels]
            rnd["loadavg_after"] = os.getloadavg()[0]
            line = (f"  round {i + 1} ({' > '.join(order)}; load {rnd['loadavg_before']:.1f}->{rnd['loadavg_after']:.1f}):"
                    " hearth/batched " + "; ".join(parts))
            if "llamapy" in rnd:
                lp = rnd["llamapy"]["levels"]
                line += "; llama-cpp-python tg " + ", ".join(f"c={c} {f1(lp[c]['tg'])}" for c in args.py_levels)
            print(line, flush=True)
            rounds.append(rnd)

        agg = aggregate(rounds, levels, args.py_levels)
        base = levels[0]
        top = args.scale_level if args.scale_level in levels else levels[-1]
        scaling = {"base": base, "level": top}
        for side in ("hearth", "batched", "llamapy"):
            lo, hi = agg[base].get(f"{side}_tg"), agg[top].get(f"{side}_tg")
            scaling[side] = ratio(hi, lo) if lo and hi and (side != "llamapy" or
                                                            (base in args.py_levels and top in args.py_levels)) else None
        m = {"model": model, "path": path, "threads": threads, "hearth_plan": plan, "n_ctx": ctx,
             "batched_flags": flags, "notes": notes, "py_levels": args.py_levels, "py_flash_attn": py_fa,
             "rounds": rounds, "aggregate": agg, "scaling": scaling,
             "commands": {s: [r[s]["command"] for r in rounds if s in r] for s in sides}}
        report["models"].append(m)
        print_model_report(m, args)

    # -- goals -----------------------------------------------------------------
    checks = []
    for m in report["models"]:
        for c in levels:
            for k in ("tg", "pp"):
                r = m["aggregate"][c][f"{k}_ratio"]
                checks.append({"check": f"{m['model']} c={c} {k} hearth/batched >= {GOAL_RATIO}", "value": r,
                               "ok": r is not None and r >= GOAL_RATIO})
        s = m["scaling"]
        if s["base"] == 1 and s["level"] == args.scale_level:
            checks.append({"check": f"{m['model']} hearth tg@{s['level']}/tg@1 >= {GOAL_SCALING}"
                                    f" (llama-batched-bench here: {f3(s['batched'])})",
                           "value": s["hearth"], "ok": s["hearth"] is not None and s["hearth"] >= GOAL_SCALING})
    report["checks"] = checks
    report["goal_met"] = all(c["ok"] for c in checks)
    print("\n## goal check")
    for c in checks:
        print(f"  [{'ok' if c['ok'] else 'MISS'}] {c['check']}: {f3(c['value'])}")
    wild = [(m["model"], c, k, x) for m in report["models"] for c in levels for k in ("tg", "pp")
            for x in m["aggregate"][c][f"{k}_ratio_rounds"] if x is not None and not 0.5 <= x <= 2.0]
    if wild:
        loads = [r["loadavg_before"] for m in report["models"] for r in m["rounds"]]
        print(f"  WARNING: {len(wild)} per-round ratio(s) hearth/batched outside 0.5..2 (e.g. {wild[0][0]} c={wild[0][1]}"
              f" {wild[0][2]} {wild[0][3]:.3f}): some runs were disturbed by other load (1-min load average up to"
              f" {max(loads):.1f} on {os.cpu_count()} CPUs); these numbers say nothing about hearth, rerun on a quiet machine")
    report["disturbed_ratios"] = wild
    if not any("tg@" in c["check"] for c in checks):
        print(f"  (scaling goal tg@{args.scale_level}/tg@1 not checked: levels 1 and {args.scale_level} were not both run)")
    print(f"  => {'all goals met' if report['goal_met'] else 'goal NOT met'}"
          " (a busy machine skews single runs: compare ratios, rerun with more --rounds before concluding)")

    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nwrote {out}")
    return 2 if args.strict and not report["goal_met"] else 0


if __name__ == "__main__":
    sys.exit(main())
