"""The llama.cpp engine end to end: real llama.cpp, real models, no mocks."""

from __future__ import annotations

import json
import threading

import pytest

import hearth
from hearth.engines.llamacpp.scheduler import _StopMatcher
from hearth.errors import BadRequest, Cancelled, ContextOverflow


@pytest.fixture(scope="module")
def model(smollm2_path):
    m = hearth.load_model(smollm2_path, n_ctx=2048)
    yield m
    m.close()


@pytest.fixture(scope="module")
def gemma(gemma3_path):
    m = hearth.load_model(gemma3_path, n_ctx=1024)
    yield m
    m.close()


PROMPT = "The three primary colors are"


def test_greedy_generation_is_deterministic(model):
    a = model.generate_text(PROMPT, max_tokens=24, temperature=0)
    b = model.generate_text(PROMPT, max_tokens=24, temperature=0)
    assert a.text and a.text == b.text
    assert a.token_ids == b.token_ids
    assert a.usage.completion_tokens == 24 and a.finish_reason == "length"


def test_same_seed_same_output_different_seed_differs(model):
    runs = [model.generate_text(PROMPT, max_tokens=24, temperature=1.0, seed=s).text for s in (7, 7, 8, 9)]
    assert runs[0] == runs[1]
    assert len({runs[0], runs[2], runs[3]}) > 1


def test_streaming_yields_the_same_text_as_the_result(model):
    chunks = list(model.stream_text(PROMPT, max_tokens=24, temperature=0))
    whole = model.generate_text(PROMPT, max_tokens=24, temperature=0)
    assert "".join(c.text for c in chunks) == whole.text
    assert sum(len(c.token_ids) for c in chunks) == whole.usage.completion_tokens


def test_result_carries_usage_and_timings(model):
    r = model.generate_text(PROMPT, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens == model.count_tokens(PROMPT)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    t = r.timings
    assert 0 < t.ttft <= t.total_seconds
    assert t.prompt_tokens_per_second > 0 and t.generation_tokens_per_second > 0


def test_stop_string_ends_generation_and_is_never_emitted(model):
    free = model.generate_text(PROMPT, max_tokens=32, temperature=0).text
    words = [w for w in free.split() if len(w) >= 4]
    assert words, free
    stop = words[len(words) // 2]
    chunks = list(model.stream_text(PROMPT, max_tokens=32, temperature=0, stop=[stop]))
    streamed = "".join(c.text for c in chunks)
    r = model.generate_text(PROMPT, max_tokens=32, temperature=0, stop=[stop])
    assert r.finish_reason == "stop"
    assert stop not in r.text and stop not in streamed
    assert r.text == streamed == free[: free.index(stop)]


def test_stop_matcher_holds_back_partial_stops_and_never_splits_utf8():
    m = _StopMatcher(["END"])
    out = []
    # "é" (c3 a9) and "🙂" (f0 9f 99 82) split across feeds, then a stop split as "E" "ND"
    for piece in [b"caf\xc3", b"\xa9 ", b"\xf0\x9f", b"\x99\x82", b" E", b"N", b"D tail"]:
        text, stopped = m.feed(piece)
        assert "\ufffd" not in text
        out.append(text)
        if stopped:
            break
    assert stopped
    assert "".join(out) == "café 🙂 "
    m2 = _StopMatcher(["END"])
    assert m2.feed(b"x E")[0] == "x "  # "E" could start "END": held back
    assert m2.feed(b"", final=True)[0] == "E"  # released at the end


def test_utf8_text_streams_whole_characters(model):
    prompt = "Traduis en français : « Bonjour, ça va très bien » →"
    chunks = list(model.stream_text(prompt, max_tokens=40, temperature=0))
    text = "".join(c.text for c in chunks)
    assert text
    assert all("\ufffd" not in c.text for c in chunks)
    # forcing a multi-byte token through logit bias must also come out whole
    tok = model.tokenize("é", add_special=False)
    forced = model.generate_text("x", max_tokens=4, temperature=0, logit_bias={tok[-1]: 100.0})
    assert "\ufffd" not in forced.text and forced.text


def test_logit_bias_forces_and_bans_tokens(model):
    target = model.tokenize(" banana", add_special=False)[0]
    r = model.generate_text(PROMPT, max_tokens=5, temperature=0, logit_bias={target: 100.0})
    assert r.token_ids == [target] * 5
    greedy = model.generate_text(PROMPT, max_tokens=1, temperature=0).token_ids[0]
    banned = model.generate_text(PROMPT, max_tokens=1, temperature=0, logit_bias={greedy: -1e9})
    assert banned.token_ids[0] != greedy


def test_penalties_change_greedy_output(model):
    plain = model.generate_text("one one one one one one", max_tokens=16, temperature=0)
    pen = model.generate_text(
        "one one one one one one", max_tokens=16, temperature=0, repeat_penalty=1.5,
        presence_penalty=1.0, frequency_penalty=1.0,
    )
    assert plain.text != pen.text


def test_grammar_constrains_output(model):
    r = model.generate_text("Is water wet? Answer:", max_tokens=8, temperature=0.7, seed=3,
                            grammar='root ::= " yes" | " no"')
    assert r.text in (" yes", " no")
    assert r.finish_reason == "stop"


def test_json_schema_output_is_valid_json(model):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    r = model.generate_chat(
        [{"role": "user", "content": "Give a person as JSON."}],
        max_tokens=96, temperature=0, json_schema=schema,
    )
    data = json.loads(r.text)
    assert isinstance(data["name"], str) and isinstance(data["age"], int)


def test_invalid_grammar_is_a_clear_error(model):
    with pytest.raises(BadRequest, match="grammar"):
        model.generate_text("x", max_tokens=4, grammar="root ::= (")


def test_chat_with_the_models_own_template(model):
    assert model.engine.template.kind == "model"
    r = model.generate_chat([{"role": "user", "content": "What is 2+2?"}], max_tokens=24, temperature=0)
    assert r.text.strip()
    assert "<|im_end|>" not in r.text and "<|im_start|>" not in r.text


def test_chat_without_a_template_uses_the_family_fallback(gemma):
    assert gemma.info.chat_template is None
    assert gemma.engine.template.kind == "gemma"
    text, cfg = gemma.chat_prompt([{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Say hello."}])
    assert text.endswith("<start_of_turn>model\n") and "Be brief." in text
    assert "<end_of_turn>" in cfg.stop
    r = gemma.generate_chat([{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0)
    assert r.usage.completion_tokens > 0
    assert "<end_of_turn>" not in r.text


def test_gemma_generates_deterministically(gemma):
    a = gemma.generate_text("The capital of France is", max_tokens=12, temperature=0)
    b = gemma.generate_text("The capital of France is", max_tokens=12, temperature=0)
    assert a.text == b.text and a.usage.completion_tokens > 0


def test_prompt_longer_than_context_is_refused_with_numbers(model):
    long = "word " * 3000
    with pytest.raises(ContextOverflow, match=r"\d+ tokens.*2048"):
        model.generate_text(long, max_tokens=4)


def test_max_tokens_is_clamped_to_the_context(model):
    n = model.count_tokens("hello " * 1000)
    r = model.generate_text("hello " * 1000, max_tokens=5000, temperature=0, ignore_eos=True)
    assert r.finish_reason == "length"
    assert r.usage.completion_tokens == model.plan.n_ctx - n


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"seed": "x"}, "seed"),
        ({"nonsense": 1}, "unknown generation setting"),
        ({"logit_bias": {10**9: 1.0}}, "vocabulary"),
    ],
)
def test_bad_generation_settings_are_refused(model, kwargs, match):
    with pytest.raises(BadRequest, match=match):
        model.generate_text("x", **kwargs)


def test_max_tokens_zero_returns_nothing(model):
    r = model.generate_text(PROMPT, max_tokens=0)
    assert r.text == "" and r.finish_reason == "length" and r.usage.completion_tokens == 0


def test_breaking_out_of_a_stream_frees_the_slot(model):
    stream = model.stream_text(PROMPT, max_tokens=200, temperature=0)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    r = model.generate_text(PROMPT, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4


def test_cancel_ends_a_request_with_cancelled(model):
    handle = model.engine.submit(PROMPT, hearth.GenerationConfig(max_tokens=500, temperature=0))
    it = iter(handle)
    next(it)
    handle.cancel()
    with pytest.raises(Cancelled):
        for _ in it:
            pass
    assert handle.request.result.finish_reason == "cancelled"


def test_threads_may_share_one_model(model):
    expected = model.generate_text(PROMPT, max_tokens=12, temperature=0).text
    results: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(model.generate_text(PROMPT, max_tokens=12, temperature=0).text)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [expected] * 4


def test_second_turn_reuses_the_cached_prefix(model):
    history = [{"role": "user", "content": "Tell me about the moon. " * 20}]
    first = model.generate_chat(history, max_tokens=8, temperature=0)
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And the sun?"}]
    second = model.generate_chat(history, max_tokens=8, temperature=0)
    assert second.usage.cached_tokens >= first.usage.prompt_tokens - 1


def test_library_functions_accept_a_model_or_a_name(model, smollm2_path):
    assert hearth.count_tokens(model, "hello world") == model.count_tokens("hello world")
    r = hearth.generate_text(model, PROMPT, max_tokens=4, temperature=0)
    assert isinstance(r, hearth.GenerationResult)
    chunks = list(hearth.generate_chat(model, [{"role": "user", "content": "hi"}], max_tokens=4, stream=True))
    assert chunks
    info = hearth.get_model_info(smollm2_path)
    assert info.architecture == "llama"
    est = hearth.estimate_memory_usage(smollm2_path, n_ctx=1024, parallel=2)
    assert est.kv_ram == 2 * 1024 * 30 * 3 * 128 * 2  # one KV stream per slot


def test_benchmark_inference_reports_speeds_and_memory(model):
    b = hearth.benchmark_inference(model, n_prompt=32, n_gen=8, repetitions=1)
    assert b.pp_tokens_per_second > 0 and b.tg_tokens_per_second > 0
    assert b.ttft_seconds > 0 and b.peak_rss_bytes > 0


def test_load_model_rejects_unknown_settings(smollm2_path):
    with pytest.raises(BadRequest, match="unknown load setting"):
        hearth.load_model(smollm2_path, n_ctxx=10)
