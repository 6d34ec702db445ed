"""The planner across hosts: layers split over local GPUs, other hosts' devices (llama.cpp's
RPC backend) and the local CPU, on simulated devices; then against real workers.

The simulated tests need no llama.cpp: a ModelInfo read from the real SmolLM2 and Gemma 3
files (and "big" models made from them by scaling the per-layer weights), a Hardware
value and RemoteDevice values, which are plain data. Where a test needs real workers it
starts llama.cpp's own ``ggml-rpc-server`` (the reference build) on loopback ports, and
loads the model in a child process: llama.cpp's RPC client aborts its process when a
worker goes away.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hearth.errors import BadRequest, DoesNotFit
from hearth.gguf import inspect_model
from hearth.hardware import GPU, Hardware
from hearth.planner import (
    RAM_HEADROOM,
    REMOTE_HEADROOM,
    VRAM_HEADROOM,
    LoadOptions,
    LoadPlan,
    plan_load,
    split_layers,
)
from hearth.rpc import RemoteDevice

GiB = 1024**3
MiB = 1024**2


# --------------------------------------------------------------------------- helpers


def box(ram_free: int = 4 * GiB, ram_total: int = 16 * GiB, gpus=()) -> Hardware:
    return Hardware(physical_cores=2, logical_cores=2, total_ram=ram_total, available_ram=ram_free,
                    gpus=tuple(gpus))


def gpu(free: int, total: int = 24 * GiB, index: int = 0) -> GPU:
    return GPU(index=index, name=f"CUDA{index}", description="Simulated GPU", backend="CUDA",
               total_memory=total, free_memory=free)


def worker(n: int, free: int, total: int = 32 * GiB, name: str = "") -> RemoteDevice:
    return RemoteDevice(endpoint=f"10.0.0.{n}:50052", index=0, name=name, free=free, total=total)


def budget(free: int, total: int, headroom: tuple[int, float]) -> int:
    return max(0, free - max(headroom[0], int(total * headroom[1])))


def big(info, factor: int):
    """The same architecture with ``factor`` times the per-layer weights (the output head
    too when it has its own): a model too big for one small machine."""
    layers = [b * factor for b in info.layer_bytes]
    out = info.output_bytes * factor
    return dataclasses.replace(info, layer_bytes=layers, output_bytes=out,
                               weights_bytes=sum(layers) + info.non_layer_bytes - info.output_bytes + out)


def device_ranges(plan: LoadPlan) -> list[tuple[int, int]]:
    by_name = {p["device"]: p for p in plan.placement}
    return [tuple(by_name[d]["layers"]) for d in plan.devices]


def assert_consistent(plan: LoadPlan, info, hw: Hardware) -> None:
    """Each device within its budget, the layer ranges llama.cpp will make of the plan's
    devices and tensor_split, and every layer somewhere exactly once."""
    total = info.block_count + 1
    assert len(plan.devices) == len(plan.tensor_split)
    assert device_ranges(plan) == split_layers(info.block_count, plan.n_gpu_layers, plan.tensor_split)
    cpu = plan.placement[0]
    assert (cpu["device"], cpu["host"]) == ("CPU", "local")
    assert cpu["layers"] == [0, total - plan.n_gpu_layers]
    assert plan.memory.ram <= budget(hw.available_ram, hw.total_ram, RAM_HEADROOM) == cpu["budget"]
    for p in plan.placement[1:]:
        assert p["bytes"] + p["compute"] <= p["budget"], p
    assert sum(p["n_layers"] for p in plan.placement) == total
    assert plan.hosts == list(dict.fromkeys(p["host"] for p in plan.placement
                                            if p["device"] in plan.devices and p["host"] != "local"))


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return inspect_model(smollm2_path)


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    return inspect_model(gemma3_path)


# --------------------------------------------------------------------------- llama.cpp's rule


def test_split_layers_is_llama_cpps_rule():
    # checked against llama.cpp's load log (test_placement_matches_llama_cpp_on_real_workers)
    assert split_layers(30, 20, [0.3, 0.7]) == [(11, 17), (17, 31)]
    assert split_layers(30, -1, [1, 1, 1]) == [(0, 11), (11, 21), (21, 31)]
    assert split_layers(30, 31, [3, 0, 5]) == [(0, 12), (12, 12), (12, 31)]  # a 0 share gets nothing
    assert split_layers(30, 0, [1, 1]) == [(31, 31), (31, 31)]
    assert split_layers(30, 99, [2, 1]) == [(0, 21), (21, 31)]  # more than there are: all
    # layer counts as proportions land exactly: the planner's own tensor_split
    for counts in ([17, 14], [1, 29, 1], [5, 0, 7, 3], [31]):
        ngl = sum(counts)
        ranges = split_layers(30, ngl, counts)
        assert [b - a for a, b in ranges] == counts
        assert ranges[-1][1] == 31  # the output head (layer 30) on the last device


# --------------------------------------------------------------------------- the split


def test_without_hosts_the_plan_is_unchanged(smollm2, gemma3):
    machines = [box(), box(ram_free=1536 * MiB, ram_total=2 * GiB), box(gpus=[gpu(2 * GiB)]),
                box(gpus=[gpu(20 * GiB), gpu(6 * GiB, index=1)])]
    for info in (smollm2, gemma3):
        for hw in machines:
            plan = plan_load(info, hw, remote=())
            assert plan.to_dict() == plan_load(info, hw).to_dict()
            assert (plan.devices, plan.tensor_split, plan.placement, plan.hosts) == ([], [], [], [])


def test_layers_split_in_proportion_to_usable_free_memory(smollm2):
    model = big(smollm2, 200)  # ~12.4 GiB of layers
    hw = box(ram_free=4 * GiB)
    remote = [worker(2, 14 * GiB, 32 * GiB), worker(3, 9 * GiB, 16 * GiB)]
    plan = plan_load(model, hw, LoadOptions(n_ctx=2048, parallel=1), remote=remote)
    assert plan.devices == ["RPC0", "RPC1"] and plan.hosts == ["10.0.0.2:50052", "10.0.0.3:50052"]
    assert plan.n_gpu_layers == model.block_count + 1  # all of it on the workers
    assert_consistent(plan, model, hw)
    rpc0, rpc1 = plan.placement[1:]
    b0, b1 = budget(14 * GiB, 32 * GiB, REMOTE_HEADROOM), budget(9 * GiB, 16 * GiB, REMOTE_HEADROOM)
    assert (rpc0["budget"], rpc1["budget"]) == (b0, b1)
    # each filled to about the same fraction of what it may use: shares follow the budgets
    fill0, fill1 = (rpc0["bytes"] + rpc0["compute"]) / b0, (rpc1["bytes"] + rpc1["compute"]) / b1
    assert abs(fill0 - fill1) < 0.1, (fill0, fill1)
    assert 1.3 < rpc0["n_layers"] / rpc1["n_layers"] < 2.3  # budgets ~11 : ~7.4 GiB
    assert plan.tensor_split == [float(rpc0["n_layers"]), float(rpc1["n_layers"])]


def test_local_gpu_alone_when_the_model_fits_there(smollm2):
    hw = box(gpus=[gpu(20 * GiB)])
    plan = plan_load(smollm2, hw, remote=[worker(2, 30 * GiB)])
    assert plan.devices == ["CUDA0"] and plan.hosts == [] and plan.n_gpu_layers == smollm2.block_count + 1
    assert any("hosts are not used" in n for n in plan.notes)
    assert [p["n_layers"] for p in plan.placement] == [0, smollm2.block_count + 1, 0]
    assert_consistent(plan, smollm2, hw)


def test_local_gpu_first_then_the_workers(smollm2):
    model = big(smollm2, 200)
    hw = box(ram_free=4 * GiB, gpus=[gpu(6 * GiB, 8 * GiB)])
    plan = plan_load(model, hw, LoadOptions(n_ctx=2048, parallel=1), remote=[worker(2, 14 * GiB)])
    assert plan.devices == ["CUDA0", "RPC0"] and plan.hosts == ["10.0.0.2:50052"]
    assert_consistent(plan, model, hw)
    cuda, rpc = plan.placement[1:]
    assert cuda["layers"][0] == model.block_count + 1 - plan.n_gpu_layers  # the first offloaded layers
    assert rpc["layers"][1] == model.block_count + 1  # the output head on the last device
    assert cuda["n_layers"] > 0 and rpc["n_layers"] > 0
    # the memory estimate is this machine's: the GPU's part, not the worker's
    assert plan.memory.vram == cuda["bytes"] + cuda["compute"]


def test_workers_before_the_local_cpu(smollm2):
    # plenty of RAM here, yet the layers go to the worker first
    hw = box(ram_free=60 * GiB, ram_total=64 * GiB)
    plan = plan_load(smollm2, hw, remote=[worker(2, 16 * GiB)])
    assert plan.n_gpu_layers == smollm2.block_count + 1 and plan.devices == ["RPC0"]
    # a worker too small for all of it takes the last layers; the first stay on this CPU
    model = big(smollm2, 200)
    plan = plan_load(model, hw, LoadOptions(n_ctx=2048, parallel=1), remote=[worker(2, 8 * GiB, 16 * GiB)])
    assert_consistent(plan, model, hw)
    cpu, rpc = plan.placement
    assert 0 < plan.n_gpu_layers < model.block_count + 1
    assert cpu["layers"] == [0, rpc["layers"][0]] and rpc["layers"][1] == model.block_count + 1
    assert any("the rest on this CPU" in n for n in plan.notes)


def test_headroom_is_kept_on_every_device(smollm2):
    model = big(smollm2, 300)  # more than the devices can hold: each is filled to its budget
    hw = box(ram_free=20 * GiB, ram_total=32 * GiB, gpus=[gpu(5 * GiB, 8 * GiB)])
    remote = [worker(2, 6 * GiB, 12 * GiB), worker(3, 5 * GiB, 8 * GiB)]
    plan = plan_load(model, hw, LoadOptions(n_ctx=1024, parallel=1), remote=remote)
    assert_consistent(plan, model, hw)
    expected = [budget(5 * GiB, 8 * GiB, VRAM_HEADROOM), budget(6 * GiB, 12 * GiB, REMOTE_HEADROOM),
                budget(5 * GiB, 8 * GiB, REMOTE_HEADROOM)]
    assert [p["budget"] for p in plan.placement[1:]] == expected
    layer = max(model.layer_bytes)
    for p in plan.placement[1:]:  # full, short of a layer or so
        assert p["budget"] - 2 * layer < p["bytes"] + p["compute"] <= p["budget"]


def test_a_host_with_no_memory_to_spare_gets_nothing(smollm2):
    hw = box()
    remote = [worker(2, 1 * GiB, 32 * GiB), worker(3, 8 * GiB, 16 * GiB)]  # 1 GiB free < 3.2 GiB headroom
    plan = plan_load(smollm2, hw, remote=remote)
    assert plan.devices == ["RPC1"] and plan.hosts == ["10.0.0.3:50052"]
    rpc0 = next(p for p in plan.placement if p["device"] == "RPC0")
    assert (rpc0["n_layers"], rpc0["bytes"], rpc0["budget"]) == (0, 0, 0)
    assert any("RPC0 (10.0.0.2:50052)" in n and "no layers" in n for n in plan.notes)
    assert_consistent(plan, smollm2, hw)


def test_gemma_output_head_carries_its_copy_of_the_embeddings(gemma3):
    # Gemma ties the output head to the token embeddings: llama.cpp copies them to the
    # output head's device, so that device must have room for them
    assert gemma3.output_bytes == 0
    hw = box()
    plan = plan_load(gemma3, hw, LoadOptions(n_ctx=1024, parallel=1),
                     remote=[worker(2, 8 * GiB, 16 * GiB), worker(3, 8 * GiB, 16 * GiB)])
    assert_consistent(plan, gemma3, hw)
    last = next(p for p in plan.placement if p["layers"][1] == gemma3.block_count + 1 and p["n_layers"])
    assert last["bytes"] >= gemma3.non_layer_bytes
    assert plan.memory.weights_ram >= gemma3.non_layer_bytes  # and the input side stays here


def test_partial_offload_ranges_match_llama_cpp(smollm2, gemma3):
    for info in (big(smollm2, 300), big(gemma3, 250)):
        hw = box(ram_free=30 * GiB, ram_total=32 * GiB, gpus=[gpu(3 * GiB, 4 * GiB)])
        plan = plan_load(info, hw, LoadOptions(n_ctx=2048, parallel=1),
                         remote=[worker(2, 5 * GiB, 8 * GiB), worker(3, 7 * GiB, 12 * GiB)])
        assert 0 < plan.n_gpu_layers < info.block_count + 1
        assert_consistent(plan, info, hw)


# --------------------------------------------------------------------------- the user's settings win


def test_user_tensor_split_wins(smollm2):
    hw = box()
    remote = [worker(2, 16 * GiB), worker(3, 16 * GiB)]
    plan = plan_load(smollm2, hw, LoadOptions(tensor_split=[1, 3]), remote=remote)
    assert (plan.devices, plan.tensor_split) == (["RPC0", "RPC1"], [1.0, 3.0])
    assert device_ranges(plan) == split_layers(smollm2.block_count, plan.n_gpu_layers, [1, 3]) \
        == [(0, 8), (8, 31)]
    assert plan.sources["tensor_split"] == "user" and plan.sources["devices"] == "planner"
    assert_consistent(plan, smollm2, hw)


def test_user_devices_win(smollm2):
    hw = box(gpus=[gpu(20 * GiB)])
    remote = [worker(2, 16 * GiB), worker(3, 16 * GiB)]
    plan = plan_load(smollm2, hw, LoadOptions(devices=["RPC1"]), remote=remote)
    assert plan.devices == ["RPC1"] and plan.hosts == ["10.0.0.3:50052"]
    assert [p["device"] for p in plan.placement if p["n_layers"]] == ["RPC1"]  # not the GPU, not RPC0
    plan = plan_load(smollm2, hw, LoadOptions(devices=["RPC1", "CUDA0"], tensor_split=[1, 1]), remote=remote)
    assert plan.devices == ["RPC1", "CUDA0"] and device_ranges(plan) == [(0, 16), (16, 31)]
    plan = plan_load(smollm2, hw, LoadOptions(devices=[]), remote=remote)  # none: all on the CPU
    assert (plan.n_gpu_layers, plan.devices, plan.hosts) == (0, [], [])


def test_user_n_gpu_layers_wins(smollm2):
    hw = box()
    plan = plan_load(smollm2, hw, LoadOptions(n_gpu_layers=12), remote=[worker(2, 16 * GiB), worker(3, 8 * GiB)])
    assert plan.n_gpu_layers == 12 and plan.sources["n_gpu_layers"] == "user"
    assert plan.placement[0]["layers"] == [0, 19]
    assert sum(p["n_layers"] for p in plan.placement[1:]) == 12
    assert_consistent(plan, smollm2, hw)
    plan = plan_load(smollm2, hw, LoadOptions(n_gpu_layers=0), remote=[worker(2, 16 * GiB)])
    assert (plan.n_gpu_layers, plan.devices, plan.hosts) == (0, [], [])


def test_user_split_that_overflows_a_device_does_not_fit(smollm2):
    model = big(smollm2, 200)
    remote = [worker(2, 16 * GiB), worker(3, 6 * GiB, 8 * GiB)]
    with pytest.raises(DoesNotFit) as e:
        plan_load(model, box(), LoadOptions(tensor_split=[1, 9], n_ctx=1024), remote=remote)
    assert "tensor_split as given" in e.value.message and "RPC1 (10.0.0.3:50052) would need" in e.value.message
    # the planner's own split fits the same devices
    plan_load(model, box(), LoadOptions(n_ctx=1024), remote=remote)


def test_bad_device_settings_are_refused_clearly(smollm2):
    for kw, words in [
        ({"tensor_split": [1, -1]}, "numbers >= 0"),
        ({"tensor_split": [0, 0]}, "at least one must be > 0"),
        ({"tensor_split": "1,2"}, "numbers >= 0"),
        ({"devices": "RPC0"}, "list of llama.cpp device names"),
        ({"devices": ["RPC0", "RPC0"]}, "twice"),
        ({"devices": ["RPC0"], "tensor_split": [1, 2]}, "one proportion per device"),
    ]:
        with pytest.raises(BadRequest, match=re.escape(words)):
            LoadOptions(**kw)
    remote = [worker(2, 16 * GiB)]
    with pytest.raises(BadRequest, match=r"no device named CUDA7 \(known: RPC0 \(10.0.0.2:50052\)\)"):
        plan_load(smollm2, box(), LoadOptions(devices=["CUDA7"]), remote=remote)
    with pytest.raises(BadRequest, match=r"tensor_split has 2 values for 1 devices"):
        plan_load(smollm2, box(), LoadOptions(tensor_split=[1, 1]), remote=remote)
    with pytest.raises(BadRequest, match=r"no device named RPC0 \(known: none"):
        plan_load(smollm2, box(), LoadOptions(devices=["RPC0"]))


# --------------------------------------------------------------------------- too big for all hosts


def test_too_big_for_all_hosts_says_how_much_more(smollm2):
    model = big(smollm2, 700)  # ~43 GiB of layers
    hw = box(ram_free=10 * GiB, ram_total=16 * GiB)
    remote = [worker(2, 14 * GiB, 64 * GiB), worker(3, 12 * GiB, 64 * GiB)]
    with pytest.raises(DoesNotFit) as e:
        plan_load(model, hw, remote=remote)
    msg = e.value.message
    m = re.search(r"does not fit across 3 hosts: at n_ctx=\d+ it needs ([\d.]+) GiB; the 3 hosts have "
                  r"([\d.]+) GiB free \(after headroom\): ([\d.]+) GiB more across all hosts$", msg)
    assert m, msg
    need, free, more = (float(x) for x in m.groups())
    expected_free = (budget(10 * GiB, 16 * GiB, RAM_HEADROOM) + budget(14 * GiB, 64 * GiB, REMOTE_HEADROOM)
                     + budget(12 * GiB, 64 * GiB, REMOTE_HEADROOM)) / GiB
    assert abs(free - expected_free) < 0.06
    assert need > model.weights_bytes / GiB
    assert abs(need - free - more) < 0.11
    # that much more free on the workers (and a layer each, for the rounding to whole
    # layers), and it fits
    extra = int(more * GiB / 2 + max(model.layer_bytes))
    plan = plan_load(model, hw, remote=[dataclasses.replace(d, free=d.free + extra) for d in remote])
    assert_consistent(plan, model, hw)
    # and half a GiB less than it said is not enough
    short = int((more - 0.5) * GiB / 2)
    with pytest.raises(DoesNotFit):
        plan_load(model, hw, remote=[dataclasses.replace(d, free=d.free + short) for d in remote])


# --------------------------------------------------------------------------- real workers


def _rpc_server_bin() -> Path | None:
    sys.path.insert(0, str(Path(__file__).parent))
    from llama_reference import reference_bin

    b = reference_bin()
    exe = b / "ggml-rpc-server" if b else None
    return exe if exe is not None and exe.is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rpc_available() -> bool:
    from hearth import rpc

    return rpc.available()


def _start_worker(port: int) -> subprocess.Popen:
    """llama.cpp's rpc-server (the reference build), else the RPC backend of our own
    llama-cpp-python serving its CPU (what ``hearth worker`` does), on loopback."""
    exe = _rpc_server_bin()
    if exe is not None:
        argv = [str(exe), "-H", "127.0.0.1", "-p", str(port), "-t", "1"]
    elif _rpc_available():
        code = f"from hearth import rpc; rpc.serve_worker('127.0.0.1:{port}', None, 1, ['CPU'])"
        argv = [sys.executable, "-c", code]
    else:
        pytest.skip("no RPC worker to test with: build the reference (../shared/tools/build-llama-reference.sh) "
                    "or install llama-cpp-python with CMAKE_ARGS=-DGGML_RPC=ON")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def workers():
    """Three workers on loopback ports; yields their endpoints."""
    from hearth import rpc

    procs, endpoints = [], []
    try:
        for _ in range(3):
            port = _free_port()
            procs.append(_start_worker(port))
            endpoints.append(f"127.0.0.1:{port}")
        for ep, proc in zip(endpoints, procs):
            deadline = time.monotonic() + 30
            while True:
                try:
                    rpc.probe(ep, timeout=2)
                    break
                except rpc.WorkerError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"worker {ep} did not start") from None
                    time.sleep(0.1)
        yield endpoints
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


LOAD_AND_REPORT = textwrap.dedent(r"""
    # loads the model across the workers once per (n_gpu_layers, tensor_split) and prints
    # llama.cpp's own record of where each layer went (its load_tensors debug log)
    import ctypes, json, re, sys
    import llama_cpp as ll
    from hearth import rpc
    path, hosts, cases = sys.argv[1], sys.argv[2].split(","), json.loads(sys.argv[3])
    lines = []

    @ll.llama_log_callback
    def log(level, text, user):
        lines.append(text.decode(errors="replace"))

    ll.llama_log_set(log, ctypes.c_void_p(0))
    ll.llama_backend_init()
    names = [d.name for d in rpc.add_workers(hosts)]
    out = []
    for ngl, split in cases:
        del lines[:]
        mp = ll.llama_model_default_params()
        mp.n_gpu_layers = ngl
        devs = rpc.device_handles(names)
        mp.devices = ctypes.cast(devs, ctypes.c_void_p)
        ts = (ctypes.c_float * ll.llama_max_devices())(*split)
        mp.tensor_split = ts
        model = ll.llama_model_load_from_file(path.encode(), mp)
        assert model, "".join(lines)[-2000:]
        where = {}
        for line in "".join(lines).splitlines():
            m = re.search(r"layer\s+(\d+) assigned to device (\S+),", line)
            if m:
                where[int(m.group(1))] = m.group(2)
        out.append(where)
        ll.llama_model_free(model)
    print(json.dumps({"names": names, "placements": out}))
""")


def _llama_cpp_placement(path: Path, endpoints: list[str], cases: list) -> dict:
    r = subprocess.run([sys.executable, "-c", LOAD_AND_REPORT, str(path), ",".join(endpoints), json.dumps(cases)],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _expected(n_layer: int, ngl: int, split: list[float], names: list[str]) -> dict[int, str]:
    where = {il: "CPU" for il in range(n_layer + 1)}
    for name, (a, b) in zip(names, split_layers(n_layer, ngl, split)):
        for il in range(a, b):
            where[il] = name
    return where


def test_placement_matches_llama_cpp_on_real_workers(workers, smollm2_path, smollm2):
    if not _rpc_available():
        pytest.skip("this llama-cpp-python has no RPC backend (CMAKE_ARGS=-DGGML_RPC=ON)")
    from hearth import rpc

    # the planner's own split over the real workers (their free memory, probed)
    remote = [dataclasses.replace(d, name=f"RPC{i}")
              for i, d in enumerate(d for ep in workers for d in rpc.probe(ep).devices)]
    plan = plan_load(smollm2, box(ram_free=4 * GiB), LoadOptions(n_ctx=512, parallel=1, n_gpu_layers=23),
                     remote=remote)
    assert plan.devices and set(plan.devices) <= {"RPC0", "RPC1", "RPC2"}
    # the plan's split as a tensor_split over all three (a device it leaves out: 0)
    planned = [float(next(p["n_layers"] for p in plan.placement if p["device"] == n)) for n in ("RPC0", "RPC1", "RPC2")]
    assert [v for v in planned if v] == plan.tensor_split
    # odd proportions too, where float32 rounding decides a layer's device
    cases = [[plan.n_gpu_layers, planned], [20, [0.3, 0.7, 0.0]], [-1, [1, 1, 1]],
             [31, [0.1, 0.2, 0.7]], [7, [3, 0, 5]], [30, [1 / 3, 1 / 3, 1 / 3]]]
    got = _llama_cpp_placement(smollm2_path, workers, cases)
    assert got["names"] == ["RPC0", "RPC1", "RPC2"]  # llama.cpp's names, in the order added
    for (ngl, split), where in zip(cases, got["placements"]):
        expected = _expected(smollm2.block_count, ngl, split, got["names"])
        assert {int(k): v for k, v in where.items()} == expected, (ngl, split)
    # and the plan's placement says the same
    by_name = {p["device"]: p["layers"] for p in plan.placement}
    first = {int(k): v for k, v in got["placements"][0].items()}
    for name in plan.devices:
        a, b = by_name[name]
        assert {il for il, v in first.items() if v == name} == set(range(a, b))


def _hearth(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
    env.update(HEARTH_CONFIG=str(tmp / "absent.toml"), HEARTH_HOME=str(tmp / "home"), PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "hearth", *args], capture_output=True, text=True, env=env,
                          cwd=tmp, timeout=120, check=False)


def test_info_hosts_shows_the_split_per_host(workers, smollm2_path, smollm2, tmp_path):
    hosts = ",".join(workers[:2])
    r = _hearth("info", str(smollm2_path), "--hosts", hosts, "--n-ctx", "512", tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "split across 3 hosts" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ")}
    assert rows["local"][1] == "CPU"
    assert rows[workers[0]][1] == "RPC0" and rows[workers[1]][1] == "RPC1"
    assert "llama.cpp: devices RPC0,RPC1, tensor_split" in out
    r = _hearth("info", str(smollm2_path), "--hosts", hosts, "--n-ctx", "512", "--json", tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)["plan"]
    assert plan["devices"] == ["RPC0", "RPC1"] and plan["hosts"] == workers[:2]
    assert [p["host"] for p in plan["placement"]] == ["local", *workers[:2]]
    assert sum(p["n_layers"] for p in plan["placement"]) == smollm2.block_count + 1
    for p in plan["placement"][1:]:
        assert p["n_layers"] > 0 and 0 < p["bytes"] + p["compute"] <= p["budget"] <= p["free"]


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hearth: error: "), r.stderr
    return lines[0]


def test_info_with_an_unreachable_host_is_one_line_naming_it(smollm2_path, tmp_path):
    port = _free_port()  # nothing listens there
    line = _one_line_error(_hearth("info", str(smollm2_path), "--hosts", f"127.0.0.1:{port}", tmp=tmp_path))
    assert f"worker 127.0.0.1:{port} cannot be reached" in line


def test_info_with_a_host_that_answers_nothing_is_one_line_naming_it(smollm2_path, tmp_path):
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        ep = f"127.0.0.1:{silent.getsockname()[1]}"
        line = _one_line_error(_hearth("info", str(smollm2_path), "--hosts", ep, tmp=tmp_path))
    assert f"worker {ep} accepted the connection but did not answer" in line
