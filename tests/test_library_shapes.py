"""The library in the shape existing code already calls it: plain-text results, dict-style
info, memory and benchmark results, llama-cpp-python's load arguments. Real llama.cpp,
the real embedded model (SmolLM2 135M), no mocks."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import sys
import textwrap
from collections.abc import Mapping

import pytest

import hearth
from hearth import BadRequest, GenerationResult

EXAMPLE = '''
from hearth import load_model, generate_text, get_model_info, benchmark_inference, estimate_memory_usage

model = load_model("model.gguf", n_ctx=2048, n_threads=8)
text = generate_text(model, "The meaning of life is", max_tokens=50)
print(text)                              # prints GenerationResult(text=..., usage=...) instead of the text
info = get_model_info("model.gguf")
print(info["quantization"])              # TypeError: 'ModelInfo' object is not subscriptable
metrics = benchmark_inference(model, ["Test prompt"] * 10)
print(metrics["tokens_per_second"])      # TypeError: 'BenchmarkResult' object is not subscriptable
estimate_memory_usage("model.gguf", 2048)["total_ram"]   # TypeError: not subscriptable
'''


@pytest.fixture(scope="module")
def model(smollm2_path):
    m = hearth.load_model(smollm2_path, n_ctx=1024)
    yield m
    m.close()


def test_the_common_example_runs_verbatim(smollm2_path, tmp_path, monkeypatch, capsys):
    (tmp_path / "model.gguf").symlink_to(smollm2_path)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(textwrap.dedent(EXAMPLE), "example.py", "exec"), scope)
    out = capsys.readouterr().out
    text, metrics, info = scope["text"], scope["metrics"], scope["info"]
    try:
        # print(text) printed the generated text itself, then the quantization, then the speed
        assert text.text and text.usage.completion_tokens <= 50
        assert out == f"{text.text}\nQ4_1\n{metrics['tokens_per_second']}\n"
        assert info["quantization"] == "Q4_1"
        assert metrics["tokens_per_second"] > 0 and len(metrics["per_prompt"]) == 10
    finally:
        scope["model"].close()


# -- generation results are text -----------------------------------------------------------

def test_generation_result_is_its_text_everywhere(model):
    r = hearth.generate_text(model, "The sky is", max_tokens=8, temperature=0)
    assert isinstance(r, str) and isinstance(r, GenerationResult)
    assert str(r) == r.text and type(str(r)) is str
    assert r == r.text and hash(r) == hash(r.text)
    assert repr(r) == repr(r.text)
    assert f"[{r}]" == f"[{r.text}]"
    assert r + "!" == r.text + "!" and "<" + r == "<" + r.text
    assert len(r) == len(r.text)
    if r.text:
        assert r.text[:2] in r
    assert json.dumps(r) == json.dumps(r.text)
    assert json.dumps({"answer": r}) == json.dumps({"answer": r.text})
    # the typed attributes are unchanged
    assert r.usage.completion_tokens == 8 and r.finish_reason == "length"
    assert r.timings.ttft > 0 and len(r.token_ids) == 8 and r.to_dict()["text"] == r.text
    # copies keep both faces
    for c in (copy.copy(r), copy.deepcopy(r), pickle.loads(pickle.dumps(r))):
        assert c == r.text and c.usage.completion_tokens == 8 and c.finish_reason == "length"
    # its text is its value: it cannot drift from what it prints
    with pytest.raises(AttributeError):
        r.text = "something else"
    changed = dataclasses.replace(r, text="other")
    assert changed == "other" and changed.usage is r.usage


def test_chat_result_and_stream_chunks_are_text(model):
    r = hearth.generate_chat(model, [{"role": "user", "content": "Say hi"}], max_tokens=6, temperature=0)
    assert isinstance(r, str) and str(r) == r.text and r.usage.completion_tokens > 0
    chunks = list(hearth.generate_text(model, "Once upon a time", max_tokens=6, temperature=0, stream=True))
    assert chunks and all(isinstance(c, str) for c in chunks)
    whole = hearth.generate_text(model, "Once upon a time", max_tokens=6, temperature=0)
    assert "".join(chunks) == whole.text  # print(chunk, end="") prints the text


# -- results as mappings ------------------------------------------------------------------------

INFO_KEYS = ("architecture", "quantization", "parameters", "parameter_count", "context_length", "file_size",
             "n_layers", "embedding_length", "vocab_size", "chat_template")
MEMORY_KEYS = ("model_size", "kv_cache", "compute", "total_ram", "total")
BENCH_KEYS = ("tokens_per_second", "time_to_first_token", "prompt_tokens_per_second", "memory_usage",
              "total_tokens", "per_prompt")


def _is_read_only_mapping(obj, keys):
    assert isinstance(obj, Mapping) and dataclasses.is_dataclass(obj)
    for k in keys:
        assert k in obj and k in obj.keys() and obj.get(k) == obj[k]
    assert set(dict(obj)) == set(obj.keys()) and len(obj) == len(dict(obj))
    assert json.loads(json.dumps(dict(obj))) == json.loads(json.dumps(obj.to_dict()))
    with pytest.raises(KeyError):
        obj["no such key"]
    with pytest.raises(TypeError):
        obj["architecture"] = "x"  # read-only


def test_model_info_reads_as_a_dict(smollm2_path, model):
    info = hearth.get_model_info(smollm2_path)
    _is_read_only_mapping(info, INFO_KEYS)
    assert info["architecture"] == info.architecture == "llama"
    assert info["quantization"] == "Q4_1"
    assert info["parameters"] == info["parameter_count"] == info.parameters > 100_000_000
    assert info["n_layers"] == info.block_count == 30
    assert info["context_length"] == info.context_length
    assert info["file_size"] == smollm2_path.stat().st_size
    assert info["embedding_length"] == 576 and info["vocab_size"] == 49152
    assert "im_start" in info["chat_template"]
    # the same from a loaded model, or by path keyword (llama-cpp-python's name)
    assert dict(hearth.get_model_info(model)) == dict(info)
    assert hearth.get_model_info(model_path=smollm2_path)["n_layers"] == 30


def test_memory_estimate_reads_as_a_dict(smollm2_path, model):
    est = hearth.estimate_memory_usage(smollm2_path, 2048)
    _is_read_only_mapping(est, MEMORY_KEYS)
    assert est["total_ram"] == est.ram == est["total"]  # CPU only here: all of it is RAM
    assert est["model_size"] == est.weights_ram + est.weights_vram > 90_000_000
    assert est["kv_cache"] == est.kv_ram + est.kv_vram
    assert est["model_size"] + est["kv_cache"] + est["compute"] == est["total"]
    assert est["total_gb"] == pytest.approx(est["total"] / 1024**3, abs=1e-3)
    assert est["n_ctx"] == 2048 and est["file_size"] == smollm2_path.stat().st_size
    # twice the context: twice the KV cache
    assert hearth.estimate_memory_usage(smollm2_path, 4096)["kv_cache"] == 2 * est["kv_cache"]
    # a loaded model's estimate uses the plan it was loaded with
    assert hearth.estimate_memory_usage(model)["n_ctx"] == model.plan.n_ctx


def test_load_plan_reads_as_a_dict(model):
    plan = hearth.plan_model(model)
    assert plan is model.plan
    _is_read_only_mapping(plan, ("n_ctx", "n_gpu_layers", "n_threads", "memory"))
    assert plan["memory"]["total"] == plan.memory.total
    assert isinstance(plan["memory"], dict)  # JSON-ready all the way down


def test_benchmark_over_a_list_of_prompts(model):
    prompts = [f"Write one sentence about the number {i}." for i in range(10)]
    b = hearth.benchmark_inference(model, prompts, max_tokens=8, temperature=0, ignore_eos=True)
    _is_read_only_mapping(b, BENCH_KEYS)
    assert b["mode"] == "prompts" and b["concurrent"] is (model.plan.parallel > 1)
    assert len(b["per_prompt"]) == 10
    assert [p["prompt"] for p in b["per_prompt"]] == prompts
    for p in b["per_prompt"]:
        assert p["completion_tokens"] == 8 and p["time_to_first_token"] > 0 and p["output"]
    assert b["total_tokens"] == sum(p["completion_tokens"] for p in b["per_prompt"])
    assert b["tokens_per_second"] > 0 and b["prompt_tokens_per_second"] > 0
    assert b["time_to_first_token"] > 0 and b["memory_usage"] > 50_000_000
    assert b.tokens_per_second == b["tokens_per_second"] == b.tg_tokens_per_second
    # greedy is reproducible: one by one gives the same answers as side by side
    seq = hearth.benchmark_inference(model, prompts[:3], max_tokens=8, temperature=0, ignore_eos=True,
                                     concurrent=False)
    assert seq["concurrent"] is False
    assert [p["output"] for p in seq["per_prompt"]] == [p["output"] for p in b["per_prompt"][:3]]


def test_benchmark_synthetic_form_keeps_working(model):
    b = hearth.benchmark_inference(model, n_prompt=32, n_gen=8, repetitions=1)
    _is_read_only_mapping(b, BENCH_KEYS)
    assert b["mode"] == "synthetic" and b["per_prompt"] == []
    assert b["tokens_per_second"] == b.tg_tokens_per_second > 0
    assert b["prompt_tokens_per_second"] == b.pp_tokens_per_second > 0
    assert b["total_tokens"] == 8


def test_benchmark_refuses_bad_input_clearly(model):
    with pytest.raises(BadRequest, match="empty"):
        hearth.benchmark_inference(model, [])
    with pytest.raises(BadRequest, match="strings"):
        hearth.benchmark_inference(model, ["ok", 3])
    with pytest.raises(BadRequest, match="temperature"):
        hearth.benchmark_inference(model, n_prompt=8, n_gen=2, repetitions=1, temperature=0.2)
    with pytest.raises(BadRequest, match="unknown generation setting"):
        hearth.benchmark_inference(model, ["ok"], tempreature=0.2)


# -- load arguments as llama-cpp-python takes them ---------------------------------------------

def test_load_model_takes_llama_cpp_python_arguments(smollm2_path):
    with hearth.load_model(model_path=str(smollm2_path), n_ctx=256, n_gpu_layers=0, n_threads=None,
                           seed=7, verbose=False, type_k=8, type_v=8) as m:
        assert m.plan.n_gpu_layers == 0 and m.plan.n_threads >= 1
        assert m.plan.kv_type == "q8_0" and m.defaults.seed == 7
        a = m.generate_text("Tell me a story", max_tokens=8)
        b = m.generate_text("Tell me a story", max_tokens=8)
        assert a == b  # seed=7 is every request's default seed
    with pytest.raises(BadRequest, match="chat_format"):
        hearth.load_model(smollm2_path, chat_format="chatml")
    with pytest.raises(BadRequest, match="same"):
        hearth.load_model(smollm2_path, type_k="q8_0", type_v="f16")


def test_more_threads_than_cpus_are_capped_with_a_note(smollm2_path):
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    plan = hearth.plan_model(smollm2_path, n_threads=cpus + 6)
    assert plan.n_threads == cpus and any("more than the" in n for n in plan.notes)
    assert hearth.plan_model(smollm2_path, n_threads=1).n_threads == 1


def test_names_paths_and_models_work_alike(smollm2_path, model):
    # the embedded default by name, a path, and a loaded model
    by_name = hearth.get_model_info("smollm2")
    assert by_name["file_size"] == hearth.get_model_info(smollm2_path)["file_size"] == model.info["file_size"]
    assert hearth.count_tokens(model, "hello world") == hearth.count_tokens(smollm2_path, "hello world")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
