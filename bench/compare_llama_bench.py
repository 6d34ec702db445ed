#!/usr/bin/env python3
"""Compare hearth's speed with llama.cpp's own llama-bench, interleaved in one run.

For each model and round, ``hearth bench`` and ``llama-bench`` run one after the
other on the same model file and thread count (which goes first alternates each
round), so that noise on a shared machine hits both alike. The result is a set of
ratios hearth/llama for prompt processing (pp) and token generation (tg), plus the
cold start of ``hearth run`` (process start to first byte of output).

usage (from the repository root):
    /work/venv/bin/python bench/compare_llama_bench.py \
        [--models smollm2 gemma3:270m] [--rounds 3] [--threads N] \
        [-p 512] [-n 128] [-r 3] [--json OUT]

llama-bench comes from ../shared/tools/build-llama-reference.sh (a sibling folder
``shared`` of the repository root; built once and cached), or from the folder named
by the environment variable LLAMA_REF_BIN (or --llama-bin).

Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import select
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO.parent / "shared" / "tools" / "build-llama-reference.sh"
GOAL_RATIO = 0.97
GOAL_COLD_S = 1.0


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt_cmd(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def run_capture(cmd: list[str], timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """Run ``cmd``, return its stdout; raise BenchError with its stderr tail on failure."""
    try:
        p = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, timeout=timeout, env=env, cwd=cwd,
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"timed out after {timeout:.0f} s: {fmt_cmd(cmd)}") from e
    except OSError as e:
        raise BenchError(f"cannot run {cmd[0]}: {e}") from e
    if p.returncode != 0:
        tail = "\n".join(p.stderr.strip().splitlines()[-15:])
        raise BenchError(f"exit {p.returncode}: {fmt_cmd(cmd)}\n{tail}")
    return p.stdout


def parse_json_out(text: str, what: str):
    """Parse a program's JSON stdout, tolerating stray lines before the JSON."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    for opener in ("[", "{"):
        i = text.find("\n" + opener)
        if i >= 0:
            try:
                return json.loads(text[i + 1:])
            except json.JSONDecodeError:
                pass
    raise BenchError(f"{what}: output is not JSON:\n{text[:2000]}")


# -- locating the programs ---------------------------------------------------------


def venv_bin() -> Path:
    return Path(sys.executable).parent


def find_hearth(explicit: str | None) -> str:
    if explicit:
        return explicit
    cand = venv_bin() / "hearth"
    if cand.exists():
        return str(cand)
    import shutil

    found = shutil.which("hearth")
    if not found:
        raise BenchError("hearth CLI not found (pass --hearth PATH)")
    return found


def find_llama_bin(explicit: str | None, timeout: float) -> tuple[Path, str]:
    """The folder holding llama-bench, and how it was found."""
    if explicit:
        return Path(explicit), "--llama-bin"
    env_bin = os.environ.get("LLAMA_REF_BIN")
    if env_bin:
        return Path(env_bin), "LLAMA_REF_BIN"
    if not BUILD_SCRIPT.exists():
        raise BenchError(f"{BUILD_SCRIPT} not found; set LLAMA_REF_BIN to the folder holding llama-bench")
    env = dict(os.environ)
    env["PATH"] = str(venv_bin()) + os.pathsep + env.get("PATH", "")
    log(f"# locating llama.cpp reference programs: bash {BUILD_SCRIPT} (may build once, cached afterwards)")
    try:
        # stderr passes through: a first build shows its progress
        p = subprocess.run(
            ["bash", str(BUILD_SCRIPT)], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{BUILD_SCRIPT} timed out after {timeout:.0f} s") from e
    lines = [ln.strip() for ln in p.stdout.splitlines() if ln.strip()]
    if p.returncode != 0 or not lines:
        raise BenchError(f"{BUILD_SCRIPT} failed (exit {p.returncode})")
    return Path(lines[-1]), str(BUILD_SCRIPT.relative_to(REPO.parent))


# -- llama-bench flags matched to hearth's load plan -------------------------------


def llama_bench_help(llama_bench: str) -> str:
    p = subprocess.run([llama_bench, "--help"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=60)
    return p.stdout


def help_default(help_text: str, long_flag: str) -> tuple[bool, str | None, str]:
    """(flag exists, its default as printed, the accepted-values hint) for ``--long-flag``."""
    for line in help_text.splitlines():
        if re.search(rf"(^|[\s,]){re.escape(long_flag)}(\s|$|,)", line):
            hint = line.split(long_flag, 1)[1]
            m = re.search(r"\(default:\s*([^)]*)\)", line)
            return True, (m.group(1).strip() if m else None), hint
    return False, None, ""


def llama_flags_for_plan(plan: dict, help_text: str) -> tuple[list[str], list[str], list[str]]:
    """llama-bench flags that make it load the model the way hearth's plan does.

    Returns (flags to pass, settings left at llama-bench's default because they
    already match, notes about settings that cannot be matched).
    """
    flags: list[str] = []
    same: list[str] = []
    notes: list[str] = []

    def want(short: str, long: str, value: str, equal_defaults: tuple[str, ...] = ()) -> None:
        exists, default, _ = help_default(help_text, long)
        if not exists:
            notes.append(f"llama-bench has no {long}; wanted {value}")
            return
        if default is not None and (default == value or default in equal_defaults):
            same.append(f"{short} {value}")
        else:
            flags.extend([short, value])

    want("-ngl", "--n-gpu-layers", str(plan["n_gpu_layers"]))
    want("-b", "--batch-size", str(plan["n_batch"]))
    want("-ub", "--ubatch-size", str(plan["n_ubatch"]))
    want("-ctk", "--cache-type-k", str(plan["kv_type"]))
    want("-ctv", "--cache-type-v", str(plan["kv_type"]))

    fa = plan.get("flash_attn")
    exists, _, hint = help_default(help_text, "--flash-attn")
    if exists and "auto" in hint:
        want("-fa", "--flash-attn", {None: "auto", True: "on", False: "off"}[fa])
    elif exists:  # older llama-bench: -fa 0|1, no auto
        if fa is None:
            notes.append("hearth lets llama.cpp pick flash attention (auto); this llama-bench has no auto, left at its default")
        else:
            want("-fa", "--flash-attn", "1" if fa else "0")

    use_mmap, use_mlock = bool(plan.get("use_mmap", True)), bool(plan.get("use_mlock", False))
    if help_default(help_text, "--load-mode")[0]:
        mode = {(True, False): "mmap", (True, True): "mmap+mlock",
                (False, True): "mlock", (False, False): "none"}[(use_mmap, use_mlock)]
        # hearth names the mode explicitly; llama-bench's "auto" means mmap only where the
        # device supports it, so pass it whenever it is not literally the default
        want("-lm", "--load-mode", mode)
    else:
        if help_default(help_text, "--mmap")[0]:
            want("-mmp", "--mmap", "1" if use_mmap else "0")
        if use_mlock:
            notes.append("hearth locks the model in RAM (mlock); not matched")
    return flags, same, notes


# -- one measurement each ----------------------------------------------------------


def hearth_info(hearth: str, model: str, threads: int | None, timeout: float) -> dict:
    cmd = [hearth, "info", model, "--json"]
    if threads:
        cmd += ["--threads", str(threads)]
    return parse_json_out(run_capture(cmd, timeout), "hearth info")


def run_hearth_bench(hearth: str, model: str, args, threads: int, timeout: float) -> dict:
    cmd = [hearth, "bench", model, "-p", str(args.n_prompt), "-n", str(args.n_gen),
           "-r", str(args.repetitions), "--threads", str(threads), "--json", *args.hearth_arg]
    t0 = time.perf_counter()
    d = parse_json_out(run_capture(cmd, timeout), "hearth bench")
    return {
        "pp": float(d.get("pp_tokens_per_second") or 0.0),
        "tg": float(d.get("tg_tokens_per_second") or 0.0),
        "pp_samples": d.get("pp_samples", []),
        "tg_samples": d.get("tg_samples", []),
        "ttft_seconds": d.get("ttft_seconds"),
        "load_seconds": d.get("load_seconds"),
        "peak_rss_bytes": d.get("peak_rss_bytes"),
        "n_threads": d.get("n_threads"),
        "wall_seconds": time.perf_counter() - t0,
        "command": fmt_cmd(cmd),
    }


def run_llama_bench(llama_bench: str, path: str, args, threads: int, flags: list[str], timeout: float) -> dict:
    cmd = [llama_bench, "-m", path, "-p", str(args.n_prompt), "-n", str(args.n_gen),
           "-t", str(threads), "-r", str(args.repetitions), "-o", "json", *flags, *args.llama_arg]
    t0 = time.perf_counter()
    rows = parse_json_out(run_capture(cmd, timeout), "llama-bench")
    if isinstance(rows, dict):
        rows = [rows]
    out = {"pp": 0.0, "tg": 0.0, "pp_samples": [], "tg_samples": [], "pp_stddev": None, "tg_stddev": None}
    for r in rows:
        if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0:
            key = "pp"
        elif r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
            key = "tg"
        else:
            continue
        out[key] = float(r["avg_ts"])
        out[key + "_samples"] = r.get("samples_ts", [])
        out[key + "_stddev"] = r.get("stddev_ts")
        out["build"] = {k: r.get(k) for k in ("build_commit", "build_number", "backends", "cpu_info",
                                              "flash_attn", "load_mode", "n_batch", "n_ubatch",
                                              "type_k", "type_v", "n_gpu_layers", "n_threads")}
    if (args.n_prompt and not out["pp"]) or (args.n_gen and not out["tg"]):
        raise BenchError(f"llama-bench printed no pp/tg result:\n{json.dumps(rows)[:2000]}")
    out["wall_seconds"] = time.perf_counter() - t0
    out["command"] = fmt_cmd(cmd)
    return out


def cold_start_once(hearth: str, model: str, threads: int | None, timeout: float) -> dict:
    """Process start to the first byte on stdout, and to exit, of one ``hearth run``."""
    cmd = [hearth, "run", model, "-p", "hi", "--max-tokens", "1", "--temperature", "0"]
    if threads:
        cmd += ["--threads", str(threads)]
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, bufsize=0)
        fd = p.stdout.fileno()
        first = None
        data = b""
        deadline = t0 + timeout
        try:
            while True:
                left = deadline - time.perf_counter()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise BenchError(f"timed out after {timeout:.0f} s: {fmt_cmd(cmd)}")
                chunk = os.read(fd, 4096)  # returns as soon as any bytes arrive; b"" when closed
                if not chunk:
                    break
                if first is None and chunk.strip():
                    first = time.perf_counter() - t0
                data += chunk
            rc = p.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except BaseException:
            p.kill()
            p.wait()
            raise
        total = time.perf_counter() - t0
        p.stdout.close()
        if rc != 0:
            err.seek(0)
            tail = "\n".join(err.read().decode(errors="replace").strip().splitlines()[-15:])
            raise BenchError(f"exit {rc}: {fmt_cmd(cmd)}\n{tail}")
    return {"first_byte_seconds": first, "exit_seconds": total,
            "output": data.decode(errors="replace"), "command": fmt_cmd(cmd)}


# -- statistics and report ---------------------------------------------------------


def ratio(a: float, b: float) -> float | None:
    return a / b if a and b else None


def f1(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def f3(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def aggregate(rounds: list[dict]) -> dict:
    agg: dict = {}
    for k in ("pp", "tg"):
        h = [r["hearth"][k] for r in rounds]
        lb = [r["llama"][k] for r in rounds]
        per = [ratio(a, b) for a, b in zip(h, lb)]
        per_ok = [x for x in per if x is not None]
        agg[k] = {
            "hearth_mean": statistics.fmean(h) if h else 0.0,
            "llama_mean": statistics.fmean(lb) if lb else 0.0,
            "hearth_rounds": h,
            "llama_rounds": lb,
            "ratio_rounds": per,
        }
        agg[k]["ratio"] = ratio(agg[k]["hearth_mean"], agg[k]["llama_mean"])
        agg[k]["ratio_median"] = statistics.median(per_ok) if per_ok else None
        agg[k]["ratio_min"] = min(per_ok) if per_ok else None
        agg[k]["ratio_max"] = max(per_ok) if per_ok else None
    return agg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="hearth bench vs llama.cpp's llama-bench, interleaved; prints ratios hearth/llama.")
    ap.add_argument("--models", nargs="+", default=["smollm2", "gemma3:270m"],
                    help="model names or .gguf paths (default: smollm2 gemma3:270m)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per model (default 3)")
    ap.add_argument("--threads", "-t", type=int, default=None,
                    help="threads for both (default: what hearth's planner picks)")
    ap.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens (default 512)")
    ap.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens (default 128)")
    ap.add_argument("-r", "--repetitions", type=int, default=3,
                    help="repetitions inside each hearth bench / llama-bench call (default 3)")
    ap.add_argument("--cold-model", default="smollm2", help="model for the cold-start runs (default smollm2)")
    ap.add_argument("--cold-runs", type=int, default=5, help="cold-start runs (default 5; 0 skips)")
    ap.add_argument("--json", dest="json_out", metavar="OUT", help="write every number to this JSON file")
    ap.add_argument("--llama-bin", help="folder holding llama-bench (default: $LLAMA_REF_BIN, else build-llama-reference.sh)")
    ap.add_argument("--hearth", help="hearth CLI (default: the one next to this Python)")
    ap.add_argument("--hearth-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for hearth bench (repeatable, e.g. --hearth-arg=--n-ctx=640)")
    ap.add_argument("--llama-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for llama-bench (repeatable)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per program run (default 1800)")
    ap.add_argument("--strict", action="store_true", help="exit 2 when a goal is not met")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.repetitions < 1 or args.n_prompt < 0 or args.n_gen < 0:
        ap.error("--rounds and -r must be >= 1, -p and -n >= 0")

    return guarded(run, args)


def guarded(fn, *args) -> int:
    """Run a benchmark's main step: a BenchError is one line and exit 1, ^C exit 130."""
    try:
        return fn(*args)
    except BenchError as e:
        log(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130


def run(args) -> int:
    hearth = find_hearth(args.hearth)
    llama_dir, llama_src = find_llama_bin(args.llama_bin, args.timeout)
    llama_bench = str(llama_dir / "llama-bench")
    if not os.access(llama_bench, os.X_OK):
        raise BenchError(f"{llama_bench} is not an executable")
    help_text = llama_bench_help(llama_bench)
    lb_version = subprocess.run([llama_bench, "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=60).stdout.strip()
    hearth_version = run_capture([hearth, "--version"], 60).strip()

    print(f"# hearth      : {hearth} ({hearth_version})")
    print(f"# llama-bench : {llama_bench} ({lb_version.splitlines()[0] if lb_version else '?'}; via {llama_src})")
    print(f"# settings    : rounds {args.rounds}, -p {args.n_prompt}, -n {args.n_gen}, -r {args.repetitions}"
          f" per call; host {platform.node()}, {os.cpu_count()} CPUs")
    sys.stdout.flush()

    report: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"node": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "hearth": {"cli": hearth, "version": hearth_version},
        "llama_bench": {"path": llama_bench, "version": lb_version, "found_via": llama_src},
        "settings": {"rounds": args.rounds, "n_prompt": args.n_prompt, "n_gen": args.n_gen,
                     "repetitions": args.repetitions, "threads": args.threads,
                     "hearth_extra": args.hearth_arg, "llama_extra": args.llama_arg},
        "goal": {"ratio_min": GOAL_RATIO, "cold_start_max_seconds": GOAL_COLD_S},
        "models": [],
    }

    for model in args.models:
        info = hearth_info(hearth, model, args.threads, args.timeout)
        path = info["model"]["path"]
        plan = info["plan"]
        threads = args.threads or int(plan["n_threads"])
        flags, same, notes = llama_flags_for_plan(plan, help_text)
        notes.append(f"n_ctx: hearth {plan['n_ctx']} (its planner), llama-bench n_prompt+n_gen per test")
        print(f"\n## {model}: {path}")
        print(f"#   threads {threads}; hearth plan: batch {plan['n_batch']}/{plan['n_ubatch']}, kv {plan['kv_type']},"
              f" flash_attn {'auto' if plan.get('flash_attn') is None else plan['flash_attn']},"
              f" mmap {plan.get('use_mmap')}, gpu layers {plan['n_gpu_layers']}")
        print(f"#   llama-bench flags passed to match : {' '.join(flags) or '(none)'}")
        print(f"#   already llama-bench's defaults    : {', '.join(same) or '(none)'}")
        for n in notes:
            print(f"#   note: {n}")
        sys.stdout.flush()

        rounds = []
        for i in range(args.rounds):
            order = ["hearth", "llama"] if i % 2 == 0 else ["llama", "hearth"]
            rnd: dict = {"round": i + 1, "order": order}
            for side in order:
                if side == "hearth":
                    rnd["hearth"] = run_hearth_bench(hearth, model, args, threads, args.timeout)
                else:
                    rnd["llama"] = run_llama_bench(llama_bench, path, args, threads, flags, args.timeout)
            h, lb = rnd["hearth"], rnd["llama"]
            print(f"  round {i + 1} ({order[0]} first): "
                  f"pp {f1(h['pp'])} vs {f1(lb['pp'])} = {f3(ratio(h['pp'], lb['pp']))}   "
                  f"tg {f1(h['tg'])} vs {f1(lb['tg'])} = {f3(ratio(h['tg'], lb['tg']))}", flush=True)
            rounds.append(rnd)
        agg = aggregate(rounds)
        report["models"].append({
            "model": model, "path": path, "threads": threads, "hearth_plan": plan,
            "llama_flags": flags, "llama_defaults_matching": same, "notes": notes,
            "llama_build": rounds[-1]["llama"].get("build"),
            "hearth_commands": [r["hearth"]["command"] for r in rounds],
            "llama_commands": [r["llama"]["command"] for r in rounds],
            "rounds": rounds, "aggregate": agg,
        })

    cold = None
    if args.cold_runs > 0:
        print(f"\n## cold start: hearth run {args.cold_model} -p hi --max-tokens 1 --temperature 0"
              f" ({args.cold_runs} runs)", flush=True)
        runs = []
        for i in range(args.cold_runs):
            r = cold_start_once(hearth, args.cold_model, args.threads, args.timeout)
            runs.append(r)
            print(f"  run {i + 1}: first byte {f3(r['first_byte_seconds'])} s, exit {f3(r['exit_seconds'])} s"
                  f"  output {r['output'].strip()[:40]!r}", flush=True)
        fb = [r["first_byte_seconds"] for r in runs if r["first_byte_seconds"] is not None]
        cold = {
            "model": args.cold_model,
            "runs": runs,
            "first_byte_median_seconds": statistics.median(fb) if fb else None,
            "exit_median_seconds": statistics.median(r["exit_seconds"] for r in runs),
            "runs_without_output": len(runs) - len(fb),
        }
        report["cold_start"] = cold

    # -- summary ---------------------------------------------------------------
    print("\n## summary (tokens/s: mean of per-round values; ratio = hearth / llama-bench)\n")
    print("| model | pp hearth | pp llama | pp ratio | tg hearth | tg llama | tg ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m in report["models"]:
        a = m["aggregate"]
        print(f"| {m['model']} | {f1(a['pp']['hearth_mean'])} | {f1(a['pp']['llama_mean'])} | {f3(a['pp']['ratio'])}"
              f" | {f1(a['tg']['hearth_mean'])} | {f1(a['tg']['llama_mean'])} | {f3(a['tg']['ratio'])} |")
    print()
    for m in report["models"]:
        a = m["aggregate"]
        for k in ("pp", "tg"):
            per = ", ".join(f3(x) for x in a[k]["ratio_rounds"])
            print(f"{m['model']} {k}{args.n_prompt if k == 'pp' else args.n_gen} per-round ratios: [{per}]"
                  f"  median {f3(a[k]['ratio_median'])}  (min {f3(a[k]['ratio_min'])}, max {f3(a[k]['ratio_max'])})")
    if cold:
        print(f"cold start ({cold['model']}): median first byte {f3(cold['first_byte_median_seconds'])} s,"
              f" median exit {f3(cold['exit_median_seconds'])} s")

    checks = []
    for m in report["models"]:
        for k in ("pp", "tg"):
            if (args.n_prompt if k == "pp" else args.n_gen) == 0:
                continue
            r = m["aggregate"][k]["ratio"]
            checks.append({"check": f"{m['model']} {k} ratio >= {GOAL_RATIO}", "value": r,
                           "ok": r is not None and r >= GOAL_RATIO})
    if cold:
        v = cold["first_byte_median_seconds"]
        checks.append({"check": f"cold start first byte < {GOAL_COLD_S} s", "value": v,
                       "ok": v is not None and v < GOAL_COLD_S})
    report["checks"] = checks
    report["goal_met"] = all(c["ok"] for c in checks)
    print("\n## goal check")
    for c in checks:
        print(f"  [{'ok' if c['ok'] else 'MISS'}] {c['check']}: {f3(c['value'])}")
    print(f"  => {'all goals met' if report['goal_met'] else 'goal NOT met'}"
          " (single run on a possibly busy machine: compare ratios, rerun with more --rounds before concluding)")

    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {out}")
    return 2 if args.strict and not report["goal_met"] else 0


if __name__ == "__main__":
    sys.exit(main())
