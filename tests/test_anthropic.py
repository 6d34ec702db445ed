"""Anthropic's Messages API through the official ``anthropic`` client: text, system,
multi-turn, stop sequences, streaming events, tool_use / tool_result, thinking blocks,
count_tokens, x-api-key and Anthropic's error shape. Real server, real SmolLM2 (with
other chat templates where the test needs tools or thinking)."""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")
anthropic = pytest.importorskip("anthropic")
jsonschema = pytest.importorskip("jsonschema")

from hearth.server import create_app  # noqa: E402
from test_server import _Server  # noqa: E402
from test_tools import ASK, WEATHER, server, variants  # noqa: E402,F401

GREEDY = {"temperature": 0}  # the newest client no longer sends sampling fields itself
TOOL = {"name": "get_weather", "description": WEATHER["function"]["description"],
        "input_schema": WEATHER["function"]["parameters"]}


@pytest.fixture(scope="module")
def client(server: _Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0)


def test_text_system_and_usage(client: anthropic.Anthropic):
    r = client.messages.create(model="smollm2", max_tokens=16, system="You are terse.",
                               messages=[{"role": "user", "content": "Name a colour."}], extra_body=GREEDY)
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_")
    assert r.content[0].type == "text" and r.content[0].text
    assert r.stop_reason in ("end_turn", "max_tokens")
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 16
    # multi-turn, with content blocks
    r2 = client.messages.create(model="smollm2", max_tokens=8, extra_body=GREEDY, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
        {"role": "assistant", "content": r.content[0].text},
        {"role": "user", "content": "Another one."}])
    assert r2.content[0].text and r2.usage.input_tokens > r.usage.input_tokens


def test_max_tokens_and_stop_sequence_reasons(client: anthropic.Anthropic):
    r = client.messages.create(model="smollm2", max_tokens=3, extra_body=GREEDY,
                               messages=[{"role": "user", "content": "Count from 1 to 20."}])
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 3
    free = client.messages.create(model="smollm2", max_tokens=40, extra_body=GREEDY,
                                  messages=[{"role": "user", "content": "Count from 1 to 20, comma separated."}])
    text = free.content[0].text
    stop = next(tok for tok in (" 3", "3", ",") if tok in text)
    r = client.messages.create(model="smollm2", max_tokens=40, stop_sequences=[stop], extra_body=GREEDY,
                               messages=[{"role": "user", "content": "Count from 1 to 20, comma separated."}])
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop
    assert r.content[0].text == text[: text.index(stop)]


def test_streaming_events_add_up_to_the_message(client: anthropic.Anthropic):
    kw = dict(model="smollm2", max_tokens=20, extra_body=GREEDY, messages=[{"role": "user", "content": "Say hello."}])
    whole = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        kinds = [ev.type for ev in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds and "message_delta" in kinds
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_tool_use_then_tool_result(client: anthropic.Anthropic, stream: bool):
    kw = dict(model="qwen25", max_tokens=120, extra_body=GREEDY, messages=ASK, tools=[TOOL],
              tool_choice={"type": "any", "disable_parallel_tool_use": True})
    if stream:
        with client.messages.stream(**kw) as s:
            for _ in s:
                pass
            r = s.get_final_message()
    else:
        r = client.messages.create(**kw)
    assert r.stop_reason == "tool_use"
    (use,) = [b for b in r.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, TOOL["input_schema"])
    # the result goes back as a tool_result block
    follow = client.messages.create(model="qwen25", max_tokens=16, extra_body=GREEDY, tools=[TOOL], messages=[
        *ASK, {"role": "assistant", "content": [b.model_dump() for b in r.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "22 C"}]}])
    assert follow.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_named_tool_choice(client: anthropic.Anthropic):
    other = {"name": "get_time", "description": "time", "input_schema": {
        "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}
    r = client.messages.create(model="qwen25", max_tokens=80, extra_body=GREEDY, messages=ASK, tools=[TOOL, other],
                               tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True})
    (use,) = [b for b in r.content if b.type == "tool_use"]
    assert use.name == "get_time" and isinstance(use.input.get("tz"), str)


def test_thinking_blocks(client: anthropic.Anthropic):
    r = client.messages.create(model="r1", max_tokens=60, extra_body=GREEDY, messages=ASK)
    kinds = [b.type for b in r.content]
    assert kinds[0] == "thinking" and r.content[0].thinking  # R1's template opened the block
    with client.messages.stream(model="r1", max_tokens=60, extra_body=GREEDY, messages=ASK) as s:
        for _ in s:
            pass
        final = s.get_final_message()
    assert [b.type for b in final.content] == kinds and final.content[0].thinking == r.content[0].thinking


def test_count_tokens_matches_the_prompt(client: anthropic.Anthropic):
    kw = dict(model="qwen25", messages=ASK)
    n = client.messages.count_tokens(**kw).input_tokens
    r = client.messages.create(max_tokens=1, extra_body=GREEDY, **kw)
    assert n == r.usage.input_tokens + r.usage.cache_read_input_tokens
    with_tools = client.messages.count_tokens(tools=[TOOL], **kw).input_tokens
    assert with_tools > n  # the template shows the tools


@pytest.mark.parametrize("body, says", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64",
                                                                            "media_type": "image/png", "data": ""}}]}]},
     "image"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
    ({"tools": [TOOL], "tool_choice": {"type": "tool", "name": "nope"}}, "nope"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}]},
     "toolu_x"),
    ({"max_tokens": 0}, "max_tokens"),
])
def test_bad_requests_are_anthropic_errors(server: _Server, body: dict, says: str):
    r = httpx.post(f"{server.url}/v1/messages", json={"model": "qwen25", "max_tokens": 4, "messages": ASK, **body},
                   timeout=60)
    assert r.status_code == 400, r.text
    j = r.json()
    assert j["type"] == "error" and j["error"]["type"] == "invalid_request_error" and says in j["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0).messages.create(
            **{"model": "qwen25", "max_tokens": 4, "messages": ASK, **body})


def test_x_api_key_is_accepted(smollm2_path):
    app = create_app([str(smollm2_path)], api_key="s3cret", aliases=["x"], load_options={"n_ctx": 256, "parallel": 1})
    with _Server(app) as s:
        ok = anthropic.Anthropic(base_url=s.url, api_key="s3cret", max_retries=0)
        assert ok.messages.create(model="x", max_tokens=2, messages=ASK).content
        with pytest.raises(anthropic.AuthenticationError) as e:
            anthropic.Anthropic(base_url=s.url, api_key="wrong", max_retries=0).messages.create(
                model="x", max_tokens=2, messages=ASK)
        assert e.value.body["error"]["type"] == "authentication_error"
        json.dumps(e.value.body)
