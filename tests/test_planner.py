"""hearth.planner on the real ModelInfo of SmolLM2 and Gemma 3, on simulated machines.

No model is loaded: the planner only needs what inspect_model reads from the real
files, and a Hardware value, which is plain data. Budgets are derived from
estimate_memory where a test needs a machine "just big enough", so the tests follow
the estimate's calibration instead of hard-coding its megabytes.
"""

from __future__ import annotations

import re

import pytest

from hearth.errors import BadRequest, DoesNotFit, HearthError
from hearth.gguf import inspect_model
from hearth.hardware import GPU, Hardware
from hearth.planner import (
    DEFAULT_PARALLEL,
    RAM_HEADROOM,
    VRAM_HEADROOM,
    LoadOptions,
    LoadPlan,
    estimate_memory,
    plan_load,
)

GiB = 1024**3
MiB = 1024**2


# --------------------------------------------------------------------------- helpers


ONE_SLOT = LoadOptions(parallel=1)  # single-slot plans, to test context and GPU choices alone


def test_memory_decides_slots_before_cutting_context(smollm2):
    # room for 4 slots at 4096 but not at 8192: keeps 4 slots, halves the context
    four = estimate_memory(smollm2, 4096, parallel=4).ram
    hw = ram_for_budget(four + MiB)
    plan = plan_load(smollm2, hw)
    assert (plan.parallel, plan.n_ctx) == (4, 4096)
    # room for 8192 cells in all: 2 slots of 4096 rather than one of 8192
    hw = ram_for_budget(estimate_memory(smollm2, 8192, parallel=1).ram + MiB)
    assert (plan_load(smollm2, hw).parallel, plan_load(smollm2, hw).n_ctx) == (2, 4096)
    # too little for 2 slots at a useful context: one slot, as much context as fits
    hw = ram_for_budget(estimate_memory(smollm2, 4096, parallel=1).ram + MiB)
    plan = plan_load(smollm2, hw)
    assert plan.parallel == 1 and plan.n_ctx == 4096
    assert any("slot" in n for n in plan.notes)
    # a user's slot count is kept
    assert plan_load(smollm2, cpu_box(24 * GiB), LoadOptions(parallel=8)).parallel == 8


def cpu_box(available: int, total: int | None = None, cores: int = 2, gpus=()) -> Hardware:
    return Hardware(
        physical_cores=cores,
        logical_cores=cores,
        total_ram=total if total is not None else max(available, 24 * GiB),
        available_ram=available,
        gpus=tuple(gpus),
    )


def gpu(free: int, total: int = 24 * GiB, index: int = 0) -> GPU:
    return GPU(
        index=index,
        name=f"CUDA{index}",
        description="Simulated GPU",
        backend="CUDA",
        total_memory=total,
        free_memory=free,
    )


def ram_for_budget(budget: int, total: int = 2 * GiB) -> Hardware:
    """A CPU-only machine whose RAM budget after the planner's headroom is ``budget``."""
    headroom = max(RAM_HEADROOM[0], int(total * RAM_HEADROOM[1]))
    return cpu_box(available=budget + headroom, total=total)


def vram_free_for_budget(budget: int, total: int = 4 * GiB) -> int:
    """Free memory a GPU of ``total`` bytes needs for a VRAM budget of ``budget``."""
    return budget + max(VRAM_HEADROOM[0], int(total * VRAM_HEADROOM[1]))


def mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB"


def kv_bytes_f16(info, n_ctx: int) -> int:
    return n_ctx * info.block_count * info.head_count_kv * (info.key_length + info.value_length) * 2


def assert_fits(plan: LoadPlan, hw: Hardware) -> None:
    headroom = max(RAM_HEADROOM[0], int(hw.total_ram * RAM_HEADROOM[1]))
    assert plan.memory.ram <= hw.available_ram - headroom
    vram_budget = sum(
        max(0, g.free_memory - max(VRAM_HEADROOM[0], int(g.total_memory * VRAM_HEADROOM[1])))
        for g in hw.gpus
    )
    assert plan.memory.vram <= vram_budget


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return inspect_model(smollm2_path)


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    return inspect_model(gemma3_path)


# --------------------------------------------------------------------------- CPU machines


def test_cpu_box_gets_full_trained_context_on_all_physical_cores(smollm2):
    hw = cpu_box(available=24 * GiB, cores=2)
    plan = plan_load(smollm2, hw)
    assert plan.n_gpu_layers == 0
    assert plan.n_threads == 2
    assert plan.n_threads_batch == 2
    assert plan.n_ctx == smollm2.context_length == 8192
    assert plan.kv_type == "f16"
    assert plan.memory.vram == 0
    assert plan.memory.weights_ram == smollm2.weights_bytes
    # one KV stream of n_ctx cells per slot
    assert plan.memory.kv_ram == DEFAULT_PARALLEL * kv_bytes_f16(smollm2, 8192)
    assert plan.n_ctx_total == DEFAULT_PARALLEL * 8192
    assert plan.n_ubatch <= plan.n_batch
    assert plan.parallel == DEFAULT_PARALLEL and plan.use_mmap and not plan.use_mlock
    assert plan.notes == []
    assert set(plan.sources.values()) == {"planner"}
    assert_fits(plan, hw)


def test_cpu_box_plans_gemma3_at_its_trained_context(gemma3):
    plan = plan_load(gemma3, cpu_box(available=24 * GiB))
    assert plan.n_ctx == gemma3.context_length == 32768
    assert plan.n_gpu_layers == 0 and plan.memory.vram == 0


def test_user_settings_win_and_are_marked_user(smollm2):
    opts = LoadOptions(n_ctx=1024, n_threads=1, n_batch=256, kv_type="q8_0")
    plan = plan_load(smollm2, cpu_box(available=24 * GiB, cores=8), opts)
    assert plan.n_ctx == 1024
    assert plan.n_threads == 1
    assert plan.n_threads_batch == 1  # follows the user's n_threads
    assert plan.n_batch == 256
    assert plan.n_ubatch <= 256
    assert plan.kv_type == "q8_0"
    for name in ("n_ctx", "n_threads", "n_threads_batch", "n_batch", "kv_type"):
        assert plan.sources[name] == "user", name
    for name in ("n_gpu_layers", "n_ubatch", "parallel"):
        assert plan.sources[name] == "planner", name
    # the user chose q8_0: no "quantized to fit" note
    assert not any("quantized" in n for n in plan.notes)


def test_user_context_beyond_training_is_kept_with_a_note(smollm2):
    plan = plan_load(smollm2, cpu_box(available=24 * GiB), LoadOptions(n_ctx=16384))
    assert plan.n_ctx == 16384
    assert any("16384" in n and "trained" in n for n in plan.notes)


def test_small_machine_caps_the_context_below_trained_with_a_note(smollm2):
    # a budget that holds 2048 tokens of context but not 4096
    need_2048 = estimate_memory(smollm2, 2048).ram
    need_4096 = estimate_memory(smollm2, 4096).ram
    assert need_2048 < need_4096
    hw = ram_for_budget(need_2048 + (need_4096 - need_2048) // 2)
    plan = plan_load(smollm2, hw)
    assert plan.n_ctx == 2048 < smollm2.context_length
    assert plan.kv_type == "f16"
    assert any("capped at 2048" in n and "8192" in n for n in plan.notes)
    assert plan.sources["n_ctx"] == "planner"
    assert_fits(plan, hw)


@pytest.mark.parametrize("available_mib", [1100, 1300, 1500])
def test_any_plan_on_a_small_machine_stays_within_its_budget(available_mib, smollm2, gemma3):
    hw = cpu_box(available=available_mib * MiB, total=2 * GiB)
    for info in (smollm2, gemma3):
        try:
            plan = plan_load(info, hw)
        except DoesNotFit as e:
            assert "does not fit" in str(e)
        else:
            assert_fits(plan, hw)


def test_kv_cache_is_quantized_when_f16_cannot_fit_at_the_smallest_context(smollm2):
    f16 = estimate_memory(smollm2, 512).ram
    q8 = estimate_memory(smollm2, 512, kv_type="q8_0", parallel=1).ram
    assert q8 < f16
    hw = ram_for_budget((q8 + f16) // 2)
    plan = plan_load(smollm2, hw, ONE_SLOT)
    assert plan.kv_type == "q8_0"
    assert plan.flash_attn is True  # a quantized V cache needs flash attention
    assert any("quantized to q8_0" in n for n in plan.notes)
    assert_fits(plan, hw)


def test_without_flash_attention_the_kv_cache_is_never_quantized_to_fit(smollm2):
    # Where only a q8_0 cache would fit, flash_attn=False leaves f16 as the only option:
    # refuse, rather than return an f16 plan that does not fit (and a note saying q8_0).
    f16 = estimate_memory(smollm2, 512, flash_attn=False).ram
    q8 = estimate_memory(smollm2, 512, kv_type="q8_0", flash_attn=False).ram
    hw = ram_for_budget((q8 + f16) // 2)
    with pytest.raises(DoesNotFit):
        plan_load(smollm2, hw, LoadOptions(flash_attn=False))
    roomy = plan_load(smollm2, cpu_box(available=24 * GiB), LoadOptions(flash_attn=False))
    assert roomy.kv_type == "f16" and roomy.flash_attn is False


def test_tiny_machine_is_refused_with_needed_and_available_amounts(smollm2):
    hw = cpu_box(available=50 * MiB, total=4 * GiB)
    with pytest.raises(DoesNotFit) as info:
        plan_load(smollm2, hw, ONE_SLOT)
    msg = str(info.value)
    assert "\n" not in msg
    # what the smallest plan (n_ctx 512, q8_0 cache) needs, and what is left after headroom
    need = estimate_memory(smollm2, 512, kv_type="q8_0", parallel=1).ram
    assert "n_ctx=512" in msg
    assert f"needs {mib(need)} of RAM" in msg
    assert "has 0 MiB of RAM available" in msg


def test_refusal_reports_the_budget_that_was_almost_enough(smollm2):
    need = estimate_memory(smollm2, 512, kv_type="q8_0", parallel=1).ram
    budget = need - 10 * MiB
    with pytest.raises(DoesNotFit) as info:
        plan_load(smollm2, ram_for_budget(budget), ONE_SLOT)
    msg = str(info.value)
    assert f"needs {mib(need)}" in msg
    assert f"has {mib(budget)} of RAM available" in msg


def test_user_context_that_cannot_fit_is_refused_not_lowered(smollm2):
    need_2048 = estimate_memory(smollm2, 2048).ram
    hw = ram_for_budget(need_2048 + 5 * MiB)
    assert plan_load(smollm2, hw).n_ctx == 2048  # the planner alone would cap to 2048
    with pytest.raises(DoesNotFit) as info:
        plan_load(smollm2, hw, LoadOptions(n_ctx=8192))
    assert "n_ctx=8192" in str(info.value)
    # and a user context that fits is honoured exactly, even if odd
    assert plan_load(smollm2, hw, LoadOptions(n_ctx=1000)).n_ctx == 1000


# --------------------------------------------------------------------------- GPUs


def test_big_gpu_takes_every_layer_and_most_of_the_memory(smollm2):
    hw = cpu_box(available=24 * GiB, gpus=[gpu(free=20 * GiB, total=24 * GiB)])
    plan = plan_load(smollm2, hw, ONE_SLOT)
    assert plan.n_gpu_layers == smollm2.block_count + 1 == 31
    assert plan.n_ctx == 8192
    m = plan.memory
    assert m.vram > m.ram
    assert m.weights_vram == sum(smollm2.layer_bytes) + smollm2.output_bytes
    assert m.kv_ram == 0 and m.kv_vram == kv_bytes_f16(smollm2, 8192)
    assert not any("layers on the GPU" in n for n in plan.notes)
    assert_fits(plan, hw)


def test_gpu_with_little_free_memory_gets_some_layers_with_a_note(smollm2):
    # room for about 10 of the 31 layers (plus compute buffers) in VRAM
    budget = estimate_memory(smollm2, 8192, n_gpu_layers=10).vram + MiB
    hw = cpu_box(available=24 * GiB, gpus=[gpu(free=vram_free_for_budget(budget), total=4 * GiB)])
    plan = plan_load(smollm2, hw, ONE_SLOT)
    assert 0 < plan.n_gpu_layers < smollm2.block_count + 1
    assert plan.n_gpu_layers == 10
    assert plan.memory.vram > 0 and plan.memory.ram > plan.memory.vram
    assert any(f"{plan.n_gpu_layers} of 31 layers on the GPU" in n for n in plan.notes)
    assert_fits(plan, hw)


def test_gpu_with_almost_no_free_memory_gets_no_layers(smollm2):
    hw = cpu_box(available=24 * GiB, gpus=[gpu(free=60 * MiB, total=8 * GiB)])
    plan = plan_load(smollm2, hw)
    assert plan.n_gpu_layers == 0
    assert plan.memory.vram == 0
    assert plan.n_ctx == 8192


def test_free_memory_of_two_gpus_is_summed(smollm2):
    share = estimate_memory(smollm2, 8192, n_gpu_layers=12).vram // 2 + MiB
    one_small = plan_load(smollm2, cpu_box(24 * GiB, gpus=[gpu(vram_free_for_budget(share), 4 * GiB)]), ONE_SLOT)
    two_small = plan_load(
        smollm2,
        cpu_box(
            24 * GiB,
            gpus=[
                gpu(vram_free_for_budget(share), 4 * GiB, index=0),
                gpu(vram_free_for_budget(share), 4 * GiB, index=1),
            ],
        ),
        ONE_SLOT,
    )
    one_big = plan_load(smollm2, cpu_box(24 * GiB, gpus=[gpu(vram_free_for_budget(2 * share), 4 * GiB)]), ONE_SLOT)
    assert two_small.n_gpu_layers == one_big.n_gpu_layers == 12
    assert one_small.n_gpu_layers < two_small.n_gpu_layers


def test_user_zero_gpu_layers_keeps_everything_on_the_cpu(smollm2):
    hw = cpu_box(available=24 * GiB, gpus=[gpu(free=20 * GiB)])
    plan = plan_load(smollm2, hw, LoadOptions(n_gpu_layers=0))
    assert plan.n_gpu_layers == 0
    assert plan.memory.vram == 0
    assert plan.sources["n_gpu_layers"] == "user"


@pytest.mark.parametrize(("asked", "expected"), [(-1, 31), (10, 10), (500, 31)])
def test_user_gpu_layers_are_honoured_on_a_gpu_box(asked, expected, smollm2):
    hw = cpu_box(available=24 * GiB, gpus=[gpu(free=20 * GiB)])
    plan = plan_load(smollm2, hw, LoadOptions(n_gpu_layers=asked))
    assert plan.n_gpu_layers == expected
    assert plan.sources["n_gpu_layers"] == "user"


@pytest.mark.parametrize("asked", [-1, 20])
def test_user_gpu_layers_on_a_cpu_only_box_run_on_the_cpu_with_a_note(asked, smollm2):
    plan = plan_load(smollm2, cpu_box(available=24 * GiB), LoadOptions(n_gpu_layers=asked))
    assert plan.n_gpu_layers == 0
    assert plan.memory.vram == 0
    assert any("no GPU backend" in n for n in plan.notes)


# --------------------------------------------------------------------------- estimate_memory


@pytest.mark.parametrize("n_ctx", [256, 512, 1024, 4096, 8192])
def test_f16_kv_cache_is_exactly_two_bytes_per_element(n_ctx, smollm2):
    m = estimate_memory(smollm2, n_ctx)
    # 8192 * 30 layers * 3 kv heads * (64 + 64) * 2 bytes = 188,743,680 at n_ctx 8192
    assert m.kv_ram == n_ctx * 30 * 3 * (64 + 64) * 2
    assert m.kv_vram == 0


def test_kv_cache_grows_linearly_with_context(smollm2):
    kv = {n: estimate_memory(smollm2, n).kv_ram for n in (1024, 2048, 4096, 8192)}
    assert kv[2048] == 2 * kv[1024]
    assert kv[8192] == 2 * kv[4096] == 8 * kv[1024]
    # n_ctx is padded to llama.cpp's 256-cell granularity
    assert estimate_memory(smollm2, 1000).kv_ram == kv[1024]


def test_quantized_kv_cache_is_smaller_than_f16(smollm2):
    f16 = estimate_memory(smollm2, 4096).kv_ram
    q8 = estimate_memory(smollm2, 4096, kv_type="q8_0").kv_ram
    q4 = estimate_memory(smollm2, 4096, kv_type="q4_0").kv_ram
    assert q4 < q8 < f16
    per_layer = 4096 * 3 * (64 + 64)
    assert q8 == 30 * int(per_layer * 34 / 32)


def test_offloading_moves_bytes_from_ram_to_vram_without_changing_the_weights(smollm2):
    base = estimate_memory(smollm2, 4096)
    prev = base
    for ngl in range(1, smollm2.block_count + 2):
        m = estimate_memory(smollm2, 4096, n_gpu_layers=ngl)
        assert m.weights_ram + m.weights_vram == smollm2.weights_bytes
        assert m.kv_ram + m.kv_vram == base.kv_ram
        assert m.weights_vram >= prev.weights_vram
        assert m.weights_ram <= prev.weights_ram
        prev = m
    assert prev.kv_ram == 0
    assert estimate_memory(smollm2, 4096, n_gpu_layers=-1) == prev


def test_gemma3_sliding_window_layers_shrink_the_kv_cache_when_not_kept_full(gemma3):
    full = estimate_memory(gemma3, 32768, swa_full=True)
    swa = estimate_memory(gemma3, 32768, swa_full=False)
    per_cell = gemma3.head_count_kv * (gemma3.key_length + gemma3.value_length) * 2
    assert full.kv_ram == 32768 * 18 * per_cell
    # 3 global layers keep every cell; 15 sliding ones keep window + ubatch (1024 cells)
    assert swa.kv_ram == 3 * 32768 * per_cell + 15 * 1024 * per_cell


# --------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_ctx": -5},
        {"n_ctx": 0},
        {"n_ctx": True},
        {"n_ctx": "4096"},
        {"n_threads": 0},
        {"n_threads_batch": -1},
        {"n_batch": 0},
        {"n_ubatch": 0},
        {"parallel": 0},
        {"kv_type": "bogus"},
        {"kv_type": "F16"},
        {"n_gpu_layers": -3},
        {"n_gpu_layers": 1.5},
    ],
    ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()),
)
def test_bad_options_are_bad_request(kwargs):
    with pytest.raises(BadRequest) as info:
        LoadOptions(**kwargs)
    msg = str(info.value)
    assert isinstance(info.value, HearthError) and "\n" not in msg
    assert next(iter(kwargs)) in msg


def test_options_broken_after_construction_are_refused_by_plan_load(smollm2):
    opts = LoadOptions()
    opts.n_ctx = -5
    with pytest.raises(BadRequest):
        plan_load(smollm2, cpu_box(available=24 * GiB), opts)


def test_merged_options_let_the_second_set_win(smollm2):
    base = LoadOptions(n_ctx=2048, n_threads=4)
    merged = base.merged(LoadOptions(n_threads=1, kv_type="q8_0"))
    assert (merged.n_ctx, merged.n_threads, merged.kv_type) == (2048, 1, "q8_0")
    assert base.n_threads == 4  # not modified


def test_plan_serialises_to_plain_data(smollm2):
    d = plan_load(smollm2, cpu_box(available=24 * GiB)).to_dict()
    assert d["n_ctx"] == 8192
    assert d["memory"]["vram"] == 0
    assert d["memory"]["ram"] == d["memory"]["total"] > 0
    assert re.fullmatch(r"\w+", d["kv_type"])
