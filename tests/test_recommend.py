"""hearth.store.recommend on simulated machines (Hardware/GPU values, no detection).

Two catalogs: a hand-built one with real architecture facts and published file sizes
of a range of models (so the assertions do not move when the packaged catalog
changes), and the packaged catalog itself, asserted on in terms of whatever it holds.
Every test passes ``bandwidth=`` so nothing depends on this machine's memory speed,
except the one that checks the measurement itself.
"""

from __future__ import annotations

import json
import math

import pytest

from hearth.hardware import GPU, Hardware
from hearth.planner import LoadOptions, plan_load
from hearth.store.catalog import Catalog, CatalogModel, CatalogQuant, load_catalog
from hearth.store.recommend import (
    Candidate,
    Recommendation,
    gpu_bandwidth,
    measure_cpu_bandwidth,
    quality_score,
    recommend,
    synthetic_info,
)

GiB = 1024**3
MiB = 1024**2


# --------------------------------------------------------------------------- machines


def cpu_box(total: int, available: int, cores: int = 4, gpus=()) -> Hardware:
    return Hardware(
        physical_cores=cores, logical_cores=cores * 2, total_ram=total,
        available_ram=available, gpus=tuple(gpus),
    )


def laptop_8gb() -> Hardware:
    return cpu_box(8 * GiB, 5 * GiB)


def cpu_24gb() -> Hardware:
    return cpu_box(24 * GiB, 20 * GiB, cores=8)


def h100_box() -> Hardware:
    h100 = GPU(
        index=0, name="CUDA0", description="NVIDIA H100 80GB HBM3", backend="CUDA",
        total_memory=80 * GiB, free_memory=80 * GiB,
    )
    return cpu_box(128 * GiB, 110 * GiB, cores=16, gpus=[h100])


def tiny_box() -> Hardware:
    return cpu_box(2 * GiB, int(1.3 * GiB), cores=1)  # 0.3 GiB after headroom


# --------------------------------------------------------------------------- a catalog


def model(name, params, ctx, arch, quants, tags=("chat",), default="Q4_K_M") -> CatalogModel:
    return CatalogModel(
        name=name, aliases=(), family=name.split(":")[0], description="", parameters=params,
        license="test", context_length=ctx, tags=tuple(tags), repo=f"test/{name}",
        default_quant=default,
        quants={q: CatalogQuant(q, (f"{name.replace(':', '-')}-{q}.gguf",), size, (None,))
                for q, size in quants.items()},
        arch=arch,
    )


def arch(layers, embedding, ff, heads, kv, head_dim, vocab, **extra) -> dict[str, int]:
    return dict(layers=layers, embedding=embedding, feed_forward=ff, heads=heads,
                kv_heads=kv, head_dim=head_dim, vocab=vocab, **extra)


QWEN_VOCAB = 151936
TEST_MODELS = [
    model("qwen2.5:0.5b", 494_032_768, 32768, arch(24, 896, 4864, 14, 2, 64, QWEN_VOCAB),
          {"Q4_K_M": 397_808_192, "Q8_0": 531_068_096, "F16": 994_156_544}),
    model("qwen2.5:1.5b", 1_543_714_304, 32768, arch(28, 1536, 8960, 12, 2, 128, QWEN_VOCAB),
          {"Q4_K_M": 986_048_768, "Q8_0": 1_646_572_800, "F16": 3_087_845_632}),
    model("llama3.2:1b", 1_235_814_400, 131072, arch(16, 2048, 8192, 32, 8, 64, 128256),
          {"Q4_K_M": 807_694_464, "Q8_0": 1_321_083_008}),
    model("qwen2.5:3b", 3_085_938_688, 32768, arch(36, 2048, 11008, 16, 2, 128, QWEN_VOCAB),
          {"Q3_K_M": 1_590_000_000, "Q4_K_M": 1_929_903_264, "Q6_K": 2_538_158_240,
           "Q8_0": 3_285_475_456, "F16": 6_178_316_448}),
    model("llama3.2:3b", 3_212_749_824, 131072, arch(28, 3072, 8192, 24, 8, 128, 128256),
          {"Q4_K_M": 2_019_377_696, "Q8_0": 3_421_898_912}),
    model("gemma3:4b", 3_880_263_168, 131072,
          arch(34, 2560, 10240, 8, 4, 256, 262208, sliding_window=1024, swa_layers=29),
          {"Q4_K_M": 2_489_757_856, "Q8_0": 4_130_402_464}),
    model("qwen2.5:7b", 7_615_616_512, 32768, arch(28, 3584, 18944, 28, 4, 128, 152064),
          {"Q2_K": 3_015_940_800, "Q3_K_M": 3_808_391_872, "Q4_K_M": 4_683_074_240,
           "Q6_K": 6_254_199_008, "Q8_0": 8_098_525_888, "F16": 15_237_853_888}),
    model("qwen2.5:14b", 14_770_033_664, 32768, arch(48, 5120, 13824, 40, 8, 128, 152064),
          {"Q4_K_M": 8_988_110_976, "Q6_K": 12_124_684_096, "Q8_0": 15_701_597_440,
           "F16": 29_550_653_952}),
    # a code model: only offered when asked for
    model("coder:33b", 33_000_000_000, 16384, arch(62, 7168, 19200, 56, 8, 128, 32256),
          {"Q4_K_M": 19_940_000_000}, tags=("code",)),
]


def test_catalog() -> Catalog:
    return Catalog(list(TEST_MODELS))


test_catalog.__test__ = False  # a helper, not a test


def real_catalog_chat() -> list[CatalogModel]:
    return [m for m in load_catalog() if "chat" in m.tags]


def check_sorted_and_fitting(rec: Recommendation) -> None:
    assert rec.choice is not None
    assert rec.choice.fits and rec.choice.interactive
    seq = [rec.choice, *rec.runners_up]
    assert len({c.name for c in seq}) == len(seq), "one candidate per model"
    assert len(rec.runners_up) <= 5
    for a, b in zip(seq, seq[1:]):
        assert (a.score, a.est_tokens_per_s) >= (b.score, b.est_tokens_per_s)
    for c in rec.runners_up:
        assert c.fits and c.interactive and c.est_tokens_per_s >= rec.min_tokens_per_s
    for c in rec.rejected:
        assert not (c.fits and c.interactive)


# --------------------------------------------------------------------------- machines


def test_8gb_laptop_gets_a_small_model_and_says_why_not_larger():
    rec = recommend(test_catalog(), laptop_8gb(), bandwidth=50)
    c = rec.choice
    assert c is not None and c.fits and c.interactive
    assert c.parameters <= 4.5e9  # a 3-4B at most
    assert c.offload == "cpu" and c.n_gpu_layers == 0
    assert c.memory_ram <= rec.hardware["ram_budget"]
    assert c.quant not in ("Q2_K", "Q3_K_M")
    assert c.est_tokens_per_s >= 8
    # the 7B and 14B are rejected, and the explanation says so, with numbers
    text = rec.explanation
    assert "Larger models not chosen" in text
    assert "qwen2.5:7b" in text and "qwen2.5:14b" in text
    assert "qwen2.5:14b Q4_K_M is too big: needs" in text
    assert "qwen2.5:7b Q4_K_M is too big" in text
    assert "50 GB/s CPU memory bandwidth (given)" in text
    assert rec.hardware["cpu_bandwidth_source"] == "given"
    assert rec.rejected_counts["too_big"] > 0
    check_sorted_and_fitting(rec)


def test_8gb_laptop_with_the_packaged_catalog():
    rec = recommend(None, laptop_8gb(), bandwidth=50)
    chat = real_catalog_chat()
    assert chat, "the packaged catalog has chat models"
    assert rec.choice is not None
    assert rec.choice.parameters <= 4.5e9
    assert rec.choice.n_gpu_layers == 0
    if any(m.parameters > 5e9 for m in chat):
        assert "Larger models not chosen" in rec.explanation
    check_sorted_and_fitting(rec)


def test_24gb_cpu_box_gets_a_sensible_model():
    rec = recommend(test_catalog(), cpu_24gb(), bandwidth=40)
    c = rec.choice
    assert c is not None
    assert 2.5e9 <= c.parameters <= 8e9
    assert c.quant in ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")  # >= 4-bit, not F16
    assert c.est_tokens_per_s >= 8
    # plenty of memory here: what stops the 7B and 14B is speed, and it says so
    assert "qwen2.5:14b Q4_K_M fits but would run" in rec.explanation
    assert rec.rejected_counts["too_slow"] > 0
    check_sorted_and_fitting(rec)


def test_24gb_cpu_box_with_the_packaged_catalog():
    rec = recommend(None, cpu_24gb(), bandwidth=40)
    assert rec.choice is not None
    assert rec.choice.est_tokens_per_s >= 8
    assert rec.choice.quant not in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "F16", "BF16", "F32")
    chat = real_catalog_chat()
    sizes = sorted({m.parameters for m in chat})
    if any(2.5e9 <= p <= 8e9 for p in sizes):
        assert 2.5e9 <= rec.choice.parameters <= 8e9
    else:  # a catalog with only small models: the largest of them
        assert rec.choice.parameters == max(sizes)
    check_sorted_and_fitting(rec)


def test_h100_gets_the_largest_model_at_q8_fully_on_gpu():
    rec = recommend(test_catalog(), h100_box(), bandwidth=40)
    c = rec.choice
    assert c is not None
    assert c.name == "qwen2.5:14b"
    assert c.quant == "Q8_0"  # F16 fits too but is no better than Q8_0
    assert c.ref == "qwen2.5:14b-q8_0"
    assert c.offload == "gpu" and c.n_gpu_layers == c.total_layers == 49
    assert c.est_tokens_per_s > 50
    assert "H100 SXM" in rec.explanation and "3350 GB/s" in rec.explanation
    assert rec.hardware["gpus"][0]["bandwidth_gbs"] == 3350
    check_sorted_and_fitting(rec)
    # the code model is not among them unless asked for
    assert all(x.name != "coder:33b" for x in [c, *rec.runners_up, *rec.rejected])
    code = recommend(test_catalog(), h100_box(), bandwidth=40, tags=("code",))
    assert code.choice is not None and code.choice.name == "coder:33b"


def test_h100_with_the_packaged_catalog():
    rec = recommend(None, h100_box(), bandwidth=40)
    chat = real_catalog_chat()
    largest = max(chat, key=lambda m: m.parameters)
    c = rec.choice
    assert c is not None and c.name == largest.name
    assert c.offload == "gpu"
    # the highest precision it offers, F16/BF16 counting only where no Q8_0 exists
    quants = set(largest.quants)
    if "Q8_0" in quants:
        assert c.quant == "Q8_0"
    else:
        assert c.quant == max(quants, key=lambda q: quality_score(largest.parameters, q))
    check_sorted_and_fitting(rec)


def test_too_small_for_anything():
    rec = recommend(test_catalog(), tiny_box(), bandwidth=20)
    assert rec.choice is None
    assert rec.runners_up == []
    assert all(not c.fits for c in rec.rejected)
    assert rec.rejected_counts == {"too_big": len(rec.rejected), "too_slow": 0}
    text = rec.explanation
    assert "Nothing in the catalog fits" in text
    assert "qwen2.5:0.5b" in text  # the smallest model, named
    assert "needs" in text and "available" in text
    json.dumps(rec.to_dict())


def test_too_small_for_anything_with_the_packaged_catalog():
    hw = cpu_box(2 * GiB, int(1.05 * GiB), cores=1)  # about 50 MiB after headroom
    rec = recommend(None, hw, bandwidth=20)
    assert rec.choice is None and rec.runners_up == []
    smallest = min(real_catalog_chat(), key=lambda m: min(q.size for q in m.quants.values()))
    assert "Nothing in the catalog fits" in rec.explanation
    assert smallest.name in rec.explanation
    assert "Get it with" not in rec.to_text()


def test_to_text_lists_runners_up_and_how_to_pull():
    rec = recommend(test_catalog(), cpu_24gb(), bandwidth=40)
    text = rec.to_text()
    assert text.startswith(rec.explanation)
    assert "Also good here:" in text
    for c in rec.runners_up:
        assert c.ref in text
    assert text.endswith(f"hearth models pull {rec.choice.ref}")


def test_low_bit_choice_is_flagged():
    qwen7 = next(m for m in TEST_MODELS if m.name == "qwen2.5:7b")
    rec = recommend(Catalog([qwen7]), cpu_box(8 * GiB, int(4.7 * GiB)), bandwidth=100)
    assert rec.choice.quant == "Q2_K"  # 3.7 GiB after headroom: even Q3_K_M is too big
    assert "very low-bit" in rec.explanation
    assert "Higher precision (Q3_K_M and up) was not chosen: Q3_K_M needs" in rec.explanation


def test_fits_but_too_slow_offers_the_fastest_with_a_warning():
    rec = recommend(test_catalog(), cpu_24gb(), bandwidth=0.5)
    assert rec.choice is not None
    assert not rec.choice.interactive
    assert rec.choice.name == "qwen2.5:0.5b" and rec.choice.quant == "Q4_K_M"
    assert "Warning" in rec.explanation


# --------------------------------------------------------------------------- scoring


def test_low_bit_quants_of_a_bigger_model_do_not_win_unfairly():
    assert quality_score(7_615_616_512, "Q2_K") < quality_score(3_085_938_688, "Q4_K_M")
    assert quality_score(7_615_616_512, "Q3_K_M") < quality_score(3_085_938_688, "Q8_0")
    # ordinary quants: the larger model wins
    assert quality_score(7_615_616_512, "Q4_K_M") > quality_score(3_085_938_688, "Q8_0")
    assert quality_score(14_770_033_664, "Q4_K_M") > quality_score(7_615_616_512, "Q8_0")
    # within one model: more precision is better, but F16 is no better than Q8_0
    p = 3_085_938_688
    assert quality_score(p, "Q8_0") > quality_score(p, "Q6_K") > quality_score(p, "Q4_K_M")
    assert quality_score(p, "Q4_K_M") > quality_score(p, "Q3_K_M") > quality_score(p, "Q2_K")
    assert quality_score(p, "F16") == quality_score(p, "Q8_0")


def test_q2_of_7b_loses_to_q4_of_3b_on_a_machine_that_fits_only_those():
    cat = Catalog([m for m in TEST_MODELS if m.name in ("qwen2.5:3b", "qwen2.5:7b")])
    # about 3.7 GiB of budget: the 7B's Q2_K fits, its Q4_K_M does not
    rec = recommend(cat, cpu_box(8 * GiB, int(4.7 * GiB)), bandwidth=100)
    by = {(c.name, c.quant): c for c in rec.candidates}
    assert by[("qwen2.5:7b", "Q2_K")].fits and by[("qwen2.5:7b", "Q2_K")].interactive
    assert not by[("qwen2.5:7b", "Q4_K_M")].fits
    assert rec.choice.name == "qwen2.5:3b"
    assert rec.choice.quant in ("Q8_0", "Q6_K", "Q4_K_M")


def test_bigger_gpu_model_partially_offloaded_is_slower():
    # 8 GiB card: the 14B Q4_K_M does not fit on it, so part of it runs on the CPU
    card = GPU(0, "CUDA0", "NVIDIA GeForce RTX 3060", "CUDA", 8 * GiB, 8 * GiB)
    rec = recommend(test_catalog(), cpu_box(32 * GiB, 28 * GiB, gpus=[card]), bandwidth=40)
    allc = {(c.name, c.quant): c for c in rec.candidates}
    big = allc[("qwen2.5:14b", "Q4_K_M")]
    assert big.fits and big.offload == "partial"
    small = allc[("qwen2.5:3b", "Q4_K_M")]
    assert small.offload == "gpu"
    assert small.est_tokens_per_s > big.est_tokens_per_s
    # the 14B Q4_K_M still makes ~10 tok/s split over GPU and CPU, and wins
    assert (rec.choice.name, rec.choice.quant, rec.choice.offload) == ("qwen2.5:14b", "Q4_K_M", "partial")
    assert "for the layers on the CPU" in rec.explanation
    check_sorted_and_fitting(rec)
    # asking for more speed keeps it all on the GPU
    fast = recommend(test_catalog(), cpu_box(32 * GiB, 28 * GiB, gpus=[card]), bandwidth=40,
                     min_tokens_per_s=20)
    assert fast.choice.offload == "gpu" and fast.choice.name == "qwen2.5:7b"
    check_sorted_and_fitting(fast)


# --------------------------------------------------------------------------- parts


def test_synthetic_info_matches_what_the_planner_needs():
    qwen7 = next(m for m in TEST_MODELS if m.name == "qwen2.5:7b")
    info = synthetic_info(qwen7, qwen7.quants["Q4_K_M"])
    assert info.weights_bytes == 4_683_074_240
    assert len(info.layer_bytes) == 28
    assert sum(info.layer_bytes) + info.non_layer_bytes == info.weights_bytes
    assert info.output_bytes > 0  # the 7B has its own output head
    assert info.head_count_kv == 4 and info.key_length == info.value_length == 128
    qwen05 = next(m for m in TEST_MODELS if m.name == "qwen2.5:0.5b")
    assert synthetic_info(qwen05, qwen05.quants["Q8_0"]).output_bytes == 0  # tied
    gemma = next(m for m in TEST_MODELS if m.name == "gemma3:4b")
    g = synthetic_info(gemma, gemma.quants["Q4_K_M"])
    assert (g.sliding_window, g.swa_layers) == (1024, 29)
    # the real planner takes it
    plan = plan_load(info, cpu_24gb(), LoadOptions(n_ctx=4096, parallel=1))
    assert plan.n_ctx == 4096 and plan.memory.ram > info.weights_bytes


def test_candidate_memory_is_the_planners():
    rec = recommend(test_catalog(), cpu_24gb(), bandwidth=40)
    c = rec.choice
    m = next(x for x in TEST_MODELS if x.name == c.name)
    plan = plan_load(synthetic_info(m, m.quants[c.quant]), cpu_24gb(),
                     LoadOptions(n_ctx=4096, parallel=1))
    assert c.memory_ram == plan.memory.ram and c.memory_vram == plan.memory.vram
    assert c.n_ctx == 4096


def test_model_without_arch_facts_uses_a_size_estimate():
    bare = model("mystery:2b", 2_000_000_000, 8192, {}, {"Q4_K_M": 1_300_000_000})
    rec = recommend(Catalog([bare]), cpu_24gb(), bandwidth=40)
    assert rec.choice is not None and rec.choice.estimate == "size"
    assert rec.choice.memory_ram >= 1_300_000_000 * 1.25
    assert "size-based" in rec.choice.reason
    rec = recommend(Catalog([bare]), tiny_box(), bandwidth=40)
    assert rec.choice is None and "mystery:2b" in rec.explanation


def test_to_dict_is_json():
    for hw in (laptop_8gb(), cpu_24gb(), h100_box(), tiny_box()):
        rec = recommend(test_catalog(), hw, bandwidth=40)
        d = json.loads(json.dumps(rec.to_dict()))
        assert set(d) >= {"choice", "runners_up", "rejected", "hardware", "explanation"}
        if rec.choice:
            assert d["choice"]["ref"] == rec.choice.ref
            assert isinstance(Candidate(**{k: v for k, v in d["choice"].items()
                                            if k not in ("memory", "offload")}), Candidate)


def test_gpu_bandwidth_table():
    def g(desc, total=24 * GiB, integrated=False, backend="CUDA"):
        return gpu_bandwidth(GPU(0, "CUDA0", desc, backend, total, total, integrated))[0]

    assert g("NVIDIA H100 80GB HBM3") == 3350
    assert g("NVIDIA H100 PCIe") == 2000
    assert g("NVIDIA H200") == 4800
    assert g("NVIDIA A100-SXM4-80GB", 80 * GiB) == 2039
    assert g("NVIDIA A100-PCIE-40GB", 40 * GiB) == 1555
    assert g("NVIDIA L40S") == 864
    assert g("NVIDIA L4") == 300
    assert g("NVIDIA A10G") == 600
    assert g("Tesla T4") == 320
    assert g("Tesla V100-SXM2-16GB") == 900
    assert g("NVIDIA GeForce RTX 4090") == 1008
    assert g("NVIDIA GeForce RTX 3060") == 360
    assert g("Apple M2 Max", backend="Metal") == 400
    assert g("Apple M1", backend="Metal") == 68
    assert g("Some Future GPU") == 300
    assert g("Intel(R) UHD Graphics", integrated=True, backend="Vulkan") == 60


def test_measured_bandwidth_is_plausible():
    bw = measure_cpu_bandwidth()
    assert math.isfinite(bw) and 0.5 < bw < 5000
    assert measure_cpu_bandwidth() == bw  # cached for the process


def test_bad_bandwidth_is_refused():
    with pytest.raises(ValueError):
        recommend(test_catalog(), cpu_24gb(), bandwidth=0)
