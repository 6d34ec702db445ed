"""llama-server's own API on hearth, side by side with the real llama-server (built from
the llama.cpp our llama-cpp-python vendors) on the same model and requests: native
routes (/completion, /tokenize, /detokenize, /apply-template, /props, /slots, /infill,
/embedding, /health), the unprefixed aliases, its validation and error shapes.

Ids, timings and the build are ignored in the diffs; everything else a client reads is
compared (shapes: key sets; greedy outputs: equal)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from gguf_variants import with_metadata  # noqa: E402
from llama_reference import llama_server  # noqa: E402
from test_server import _Server  # noqa: E402

from hearth.server import create_app  # noqa: E402

N_CTX = 1024
GREEDY = {"temperature": 0, "cache_prompt": False}


@pytest.fixture(scope="module")
def hearth(smollm2_path: Path) -> Iterator[_Server]:
    app = create_app([str(smollm2_path)], load_options={"n_ctx": N_CTX, "parallel": 1})
    with _Server(app) as s:
        yield s


@pytest.fixture(scope="module")
def ref(smollm2_path: Path) -> Iterator[str]:
    with llama_server(smollm2_path, N_CTX) as url:
        yield url


def both(hearth: _Server, ref: str, method: str, path: str, **kw: Any) -> tuple[httpx.Response, httpx.Response]:
    kw.setdefault("timeout", 120)
    return httpx.request(method, hearth.url + path, **kw), httpx.request(method, ref + path, **kw)


def missing_keys(ours: Any, theirs: Any, skip: tuple[str, ...] = ()) -> list[str]:
    """Keys llama-server sends (recursively in objects) that hearth does not."""
    out: list[str] = []
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for k, v in theirs.items():
            if k in skip:
                continue
            if k not in ours:
                out.append(k)
            else:
                out += [f"{k}.{m}" for m in missing_keys(ours[k], v, skip)]
    return out


# -- /completion ---------------------------------------------------------------------------


def test_completion_matches_llama_server(hearth, ref):
    body = {"prompt": "The capital of France is", "n_predict": 12, **GREEDY}
    h, r = both(hearth, ref, "POST", "/completion", json=body)
    assert h.status_code == r.status_code == 200
    hj, rj = h.json(), r.json()
    for k in ("content", "tokens_predicted", "tokens_evaluated", "stop", "stop_type", "stopping_word",
              "has_new_line", "truncated", "index", "tokens_cached"):
        assert hj[k] == rj[k], k
    # every field llama-server answers is there (generation_settings: the ones hearth has)
    assert missing_keys(hj, rj, skip=("generation_settings",)) == []
    assert set(hj["timings"]) == set(rj["timings"])
    for k in ("n_predict", "temperature", "top_k", "top_p", "min_p", "seed", "n_probs", "stream"):
        assert k in hj["generation_settings"], k
    assert hj["generation_settings"]["n_predict"] == rj["generation_settings"]["n_predict"] == 12


def test_completion_stop_word_and_eos_report_their_stop_type(hearth, ref):
    body = {"prompt": "One, two, three,", "n_predict": 24, "stop": [" five"], **GREEDY}
    h, r = both(hearth, ref, "POST", "/completion", json=body)
    hj, rj = h.json(), r.json()
    assert (hj["content"], hj["stop_type"], hj["stopping_word"]) == (rj["content"], rj["stop_type"], rj["stopping_word"])
    assert hj["stop_type"] == "word" and hj["stopping_word"] == " five"


def test_completion_n_probs_gives_the_same_probabilities(hearth, ref):
    body = {"prompt": "The capital of France is", "n_predict": 4, "n_probs": 3, **GREEDY}
    h, r = both(hearth, ref, "POST", "/completion", json=body)
    hp, rp = h.json()["completion_probabilities"], r.json()["completion_probabilities"]
    assert len(hp) == len(rp) == 4
    for a, b in zip(hp, rp):
        assert set(a) == set(b)
        assert (a["id"], a["token"], a["bytes"]) == (b["id"], b["token"], b["bytes"])
        assert a["logprob"] == pytest.approx(b["logprob"], abs=0.02)
        assert [t["id"] for t in a["top_logprobs"]] == [t["id"] for t in b["top_logprobs"]]
        assert set(a["top_logprobs"][0]) == set(b["top_logprobs"][0])


def test_completion_takes_token_and_mixed_prompts_as_llama_server(hearth, ref):
    tokens = httpx.post(f"{ref}/tokenize", json={"content": "Hello world"}).json()["tokens"]
    for prompt in (tokens, ["Hello", 198, "world"]):
        body = {"prompt": prompt, "n_predict": 6, "return_tokens": True, **GREEDY}
        h, r = both(hearth, ref, "POST", "/completion", json=body)
        hj, rj = h.json(), r.json()
        assert (hj["content"], hj["tokens"], hj["tokens_evaluated"]) == (rj["content"], rj["tokens"], rj["tokens_evaluated"])


def test_several_prompts_give_a_list_in_order(hearth, ref):
    body = {"prompt": ["Paris is", "Rome is"], "n_predict": 4, **GREEDY}
    h, r = both(hearth, ref, "POST", "/completion", json=body)
    hj, rj = h.json(), r.json()
    assert isinstance(hj, list) and len(hj) == len(rj) == 2
    assert [x["content"] for x in sorted(hj, key=lambda x: x["index"])] == \
        [x["content"] for x in sorted(rj, key=lambda x: x["index"])]


def _sse(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


def test_streamed_completion_has_llama_servers_events_and_no_done(hearth, ref):
    body = {"prompt": "One, two,", "n_predict": 6, "stream": True, **GREEDY}
    h, r = both(hearth, ref, "POST", "/completion", json=body)
    assert "[DONE]" not in h.text and "[DONE]" not in r.text
    he, re_ = _sse(h.text), _sse(r.text)
    assert "".join(e["content"] for e in he) == "".join(e["content"] for e in re_)
    assert [e["stop"] for e in he][-1] is True and not any(e["stop"] for e in he[:-1])
    assert missing_keys(he[0], next(e for e in re_ if not e["stop"])) == []
    assert missing_keys(he[-1], re_[-1], skip=("generation_settings",)) == []
    assert he[-1]["tokens_predicted"] == re_[-1]["tokens_predicted"] == 6


def test_the_unprefixed_completions_route_is_native_as_in_llama_server(hearth, ref):
    h, r = both(hearth, ref, "POST", "/completions", json={"prompt": "Hi", "n_predict": 3, **GREEDY})
    assert "content" in h.json() and "content" in r.json() and h.json()["content"] == r.json()["content"]


# -- tokens, templates, props, slots, health ----------------------------------------------


@pytest.mark.parametrize("body", [
    {"content": "Hello world<|im_end|>"},
    {"content": "Hello world<|im_end|>", "with_pieces": True},
    {"content": "Hello", "add_special": True},
    {"content": "<|im_end|>", "parse_special": False},
    {"content": "héllo 🌍", "with_pieces": True},
    {"content": ["Hi", 198, "there"]},
])
def test_tokenize_is_identical(hearth, ref, body):
    h, r = both(hearth, ref, "POST", "/tokenize", json=body)
    assert h.status_code == r.status_code == 200 and h.json() == r.json()


def test_detokenize_is_identical(hearth, ref):
    tokens = httpx.post(f"{ref}/tokenize", json={"content": "<|im_start|>Hello, wörld 🌍"}).json()["tokens"]
    h, r = both(hearth, ref, "POST", "/detokenize", json={"tokens": tokens})
    assert h.json() == r.json() and "wörld" in h.json()["content"]


def test_apply_template_gives_llama_servers_prompt(hearth, ref):
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]}
    h, r = both(hearth, ref, "POST", "/apply-template", json=body)
    assert h.json() == r.json()


def test_a_final_assistant_message_is_continued_as_llama_server_does(hearth, ref):
    body = {"messages": [{"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "1, 2,"}]}
    h, r = both(hearth, ref, "POST", "/apply-template", json=body)
    assert h.json() == r.json() and h.json()["prompt"].endswith("1, 2,")


def test_two_assistant_messages_at_the_end_are_400_in_both(hearth, ref):
    body = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"},
                         {"role": "assistant", "content": "b"}], "max_tokens": 2}
    h, r = both(hearth, ref, "POST", "/v1/chat/completions", json=body)
    assert h.status_code == r.status_code == 400
    assert "2 or more assistant messages" in h.json()["error"]["message"]


def test_props_has_the_fields_clients_read(hearth, ref):
    h, r = both(hearth, ref, "GET", "/props")
    hj, rj = h.json(), r.json()
    for k in ("total_slots", "chat_template", "bos_token", "eos_token"):
        assert hj[k] == rj[k], k
    assert hj["default_generation_settings"]["n_ctx"] == rj["default_generation_settings"]["n_ctx"] == N_CTX
    assert missing_keys(hj, rj, skip=("params", "ui_settings", "media_marker", "cors_proxy_enabled",
                                      "chat_template_tool_use")) == []
    assert hj["model_path"].endswith(".gguf") and hj["model_alias"]


def test_slots_show_each_slot_as_llama_server(hearth, ref):
    both(hearth, ref, "POST", "/completion", json={"prompt": "Hi there", "n_predict": 3, **GREEDY})
    h, r = both(hearth, ref, "GET", "/slots")
    assert h.status_code == r.status_code == 200
    hj, rj = h.json(), r.json()
    assert len(hj) == len(rj) == 1
    assert {k: hj[0][k] for k in ("id", "n_ctx", "is_processing")} == {k: rj[0][k] for k in ("id", "n_ctx", "is_processing")}
    assert hj[0]["n_prompt_tokens"] == rj[0]["n_prompt_tokens"]
    assert set(hj[0]["next_token"][0]) >= set(rj[0]["next_token"][0]) - {"has_new_line"}
    assert hj[0]["next_token"][0]["n_decoded"] == 3  # the last request's (llama-server's reads 0 once it ends)
    assert "prompt" not in hj[0]  # hearth never shows one client's text to another


def test_slots_can_be_turned_off_with_llama_servers_501(smollm2_path):
    with _Server(create_app([str(smollm2_path)], load_options={"n_ctx": 256}, slots_endpoint=False)) as s:
        r = httpx.get(f"{s.url}/slots")
        assert r.status_code == 501 and r.json()["error"]["type"] == "not_supported_error"
        assert "--slots" in r.json()["error"]["message"]


def test_health_has_llama_servers_shape(hearth, ref):
    for path in ("/health", "/v1/health"):
        h, r = both(hearth, ref, "GET", path)
        assert h.status_code == r.status_code == 200 and h.json() == r.json() == {"status": "ok"}


# -- /infill -------------------------------------------------------------------------------


def test_infill_on_a_model_without_fim_tokens_is_llama_servers_501(hearth, ref):
    h, r = both(hearth, ref, "POST", "/infill", json={"input_prefix": "def f(", "input_suffix": "):"})
    assert h.status_code == r.status_code == 501
    assert h.json()["error"]["type"] == r.json()["error"]["type"] == "not_supported_error"
    assert h.json()["error"]["message"] == r.json()["error"]["message"].strip()


@pytest.fixture(scope="module")
def fim_model(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 has no <fim_prefix>-style tokens; its own control tokens <filename>,
    <gh_stars>, <issue_start> and <file_sep> are named the FIM roles in the metadata, so
    both servers build an infill prompt from them (the plumbing, not the model's skill)."""
    dst = tmp_path_factory.mktemp("fim") / "smollm2-fim.gguf"
    return with_metadata(smollm2_path, dst, {
        "tokenizer.ggml.fim_pre_token_id": np.uint32(6), "tokenizer.ggml.fim_suf_token_id": np.uint32(7),
        "tokenizer.ggml.fim_mid_token_id": np.uint32(8), "tokenizer.ggml.fim_sep_token_id": np.uint32(5)})


def test_infill_builds_llama_servers_prompt_and_answer(fim_model):
    body = {"input_prefix": "def add(a, b):\n    return ", "input_suffix": "\n\nprint(add(1, 2))\n",
            "input_extra": [{"filename": "util.py", "text": "def sub(a, b):\n    return a - b\n"}],
            "prompt": "", "n_predict": 8, **GREEDY}
    with _Server(create_app([str(fim_model)], load_options={"n_ctx": N_CTX, "parallel": 1})) as s, \
            llama_server(fim_model, N_CTX) as url:
        h = httpx.post(f"{s.url}/infill", json=body, timeout=120)
        r = httpx.post(f"{url}/infill", json=body, timeout=120)
        assert h.status_code == r.status_code == 200, h.text
        hj, rj = h.json(), r.json()
        assert hj["tokens_evaluated"] == rj["tokens_evaluated"]
        assert hj["content"] == rj["content"]
        for bad in ({"input_suffix": "x"}, {"input_prefix": "x"}, {"input_prefix": "x", "input_suffix": "y",
                                                                    "input_extra": [{"filename": "a"}]}):
            hb = httpx.post(f"{s.url}/infill", json=bad, timeout=30)
            assert hb.status_code == 400 and hb.json()["error"]["type"] == "invalid_request_error"


# -- errors and validation -------------------------------------------------------------------


def test_an_over_long_prompt_is_exceed_context_size_error_with_both_numbers(hearth, ref):
    long = "hello " * 1500
    for path, body in (("/completion", {"prompt": long, "n_predict": 4}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": long}], "max_tokens": 4})):
        h, r = both(hearth, ref, "POST", path, json=body)
        assert h.status_code == r.status_code == 400
        he, re_ = h.json()["error"], r.json()["error"]
        assert he["type"] == re_["type"] == "exceed_context_size_error"
        assert he["n_ctx"] == re_["n_ctx"] == N_CTX
        assert he["n_prompt_tokens"] > N_CTX and abs(he["n_prompt_tokens"] - re_["n_prompt_tokens"]) <= 1


def test_native_errors_use_llama_servers_shape(hearth, ref):
    h, r = both(hearth, ref, "POST", "/completion", json={"prompt": "x", "json_schema": {"type": "nonsense-type"}})
    assert h.status_code == r.status_code == 400
    assert set(h.json()["error"]) >= {"code", "message", "type"} and h.json()["error"]["code"] == 400
    bad = httpx.post(f"{hearth.url}/completion", json={"prompt": "x", "n_probs": 100})
    assert bad.status_code == 400 and "n_probs" in bad.json()["error"]["message"]
    bad = httpx.post(f"{hearth.url}/tokenize", json={"content": {"a": 1}})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    bad = httpx.post(f"{hearth.url}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400


def test_first_streamed_chat_chunk_carries_role_and_null_content(hearth, ref):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True, **GREEDY}
    h, r = both(hearth, ref, "POST", "/v1/chat/completions", json=body)
    hd, rd = _sse(h.text)[0]["choices"][0]["delta"], _sse(r.text)[0]["choices"][0]["delta"]
    assert hd["role"] == rd["role"] == "assistant"
    assert "content" in hd and hd["content"] is None and rd.get("content") is None


def test_chat_responses_carry_llama_servers_timings(hearth, ref):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, **GREEDY}
    h, r = both(hearth, ref, "POST", "/v1/chat/completions", json=body)
    assert set(h.json()["timings"]) == set(r.json()["timings"])
    assert h.json()["timings"]["predicted_n"] == 3


# -- aliases, single-model mode, server-wide n_predict ----------------------------------------


def test_unprefixed_openai_aliases_work_with_the_openai_client(hearth):
    client = openai.OpenAI(base_url=hearth.url, api_key="x", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="anything", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=3, temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens == 3
    assert client.models.list().data
    resp = client.responses.create(model="anything", input="Hi", max_output_tokens=3, temperature=0)
    assert resp.output_text


def test_native_embedding_shape_matches_llama_server(hearth, smollm2_path):
    with llama_server(smollm2_path, N_CTX, "--embedding", "--pooling", "mean") as url:
        for path in ("/embedding", "/embeddings"):
            body = {"content": "Hello world"}
            h = httpx.post(hearth.url + path, json=body, timeout=60)
            r = httpx.post(url + path, json=body, timeout=60)
            assert h.status_code == r.status_code == 200
            hj, rj = h.json(), r.json()
            assert isinstance(hj, list) and isinstance(rj, list) and set(hj[0]) == set(rj[0])
            hv, rv = np.array(hj[0]["embedding"][0]), np.array(rj[0]["embedding"][0])
            assert hv.shape == rv.shape
            assert float(hv @ rv / (np.linalg.norm(hv) * np.linalg.norm(rv))) > 0.99


def test_with_several_models_an_unknown_name_is_404_with_suggestions(smollm2_path):
    app = create_app([str(smollm2_path), str(smollm2_path)], aliases=["small", "tiny"], load_options={"n_ctx": 256})
    with _Server(app) as s:
        r = httpx.post(f"{s.url}/v1/chat/completions", json={"model": "smollm", "messages": [
            {"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 404 and "did you mean" in r.json()["error"]["message"]
        ok = httpx.post(f"{s.url}/v1/chat/completions", json={"model": "tiny", "messages": [
            {"role": "user", "content": "hi"}], "max_tokens": 2})
        assert ok.status_code == 200


def test_server_wide_n_predict_caps_requests_that_set_no_limit(smollm2_path):
    with _Server(create_app([str(smollm2_path)], load_options={"n_ctx": 256}, n_predict=3)) as s:
        r = httpx.post(f"{s.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Tell a story"}],
                                                               "temperature": 0, "ignore_eos": True}, timeout=60)
        assert r.json()["usage"]["completion_tokens"] == 3
        r = httpx.post(f"{s.url}/completion", json={"prompt": "Once", "n_predict": 5, "ignore_eos": True}, timeout=60)
        assert r.json()["tokens_predicted"] == 5  # the request's own limit wins
        assert httpx.get(f"{s.url}/props").json()["default_generation_settings"]["params"]["n_predict"] == 3


def test_loaded_models_carry_llama_servers_meta(hearth, ref):
    h, r = both(hearth, ref, "GET", "/v1/models")
    hm = next(m for m in h.json()["data"] if "meta" in m)["meta"]
    rm = r.json()["data"][0]["meta"]
    assert set(hm) >= set(rm) - {"vocab_type"}
    for k in ("n_vocab", "n_ctx", "n_ctx_train", "n_embd", "ftype"):
        assert hm[k] == rm[k], k


def test_ignore_eos_bans_end_of_generation_tokens_as_llama_server(hearth, ref):
    prompt = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    natural = httpx.post(f"{ref}/completion", json={"prompt": prompt, "n_predict": 40, **GREEDY}).json()
    assert natural["stop_type"] == "eos"  # the model ends early by itself
    body = {"prompt": prompt, "n_predict": natural["tokens_predicted"] + 8, "ignore_eos": True, **GREEDY}
    h, r = both(hearth, ref, "POST", "/completion", json=body)
    hj, rj = h.json(), r.json()
    assert hj["stop_type"] == rj["stop_type"] == "limit"
    assert hj["content"] == rj["content"] and "<|im_end|>" not in hj["content"]
