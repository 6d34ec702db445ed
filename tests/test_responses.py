"""OpenAI's Responses API (stateless) through the official ``openai`` client:
``responses.create`` with a string or items, instructions, function tools and their
outputs, ``text.format`` json_schema, reasoning items, streaming events, usage, and the
400s for what hearth does not keep (previous_response_id) or run (non-function tools)."""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from test_server import _Server  # noqa: E402
from test_tools import ASK, WEATHER, server, variants  # noqa: E402,F401

TOOL = {"type": "function", "name": "get_weather", "description": WEATHER["function"]["description"],
        "parameters": WEATHER["function"]["parameters"]}


@pytest.fixture(scope="module")
def client(server: _Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def test_string_input_with_instructions(client: openai.OpenAI):
    r = client.responses.create(model="smollm2", input="Name a colour.", instructions="Be brief.",
                                max_output_tokens=12, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.status in ("completed", "incomplete")
    assert r.output_text and r.output[0].type == "message"
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 12
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_max_output_tokens_makes_it_incomplete(client: openai.OpenAI):
    r = client.responses.create(model="smollm2", input="Count from 1 to 50.", max_output_tokens=3, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"


def test_function_call_then_its_output(client: openai.OpenAI):
    r = client.responses.create(model="qwen25", input=ASK, tools=[TOOL], tool_choice="required",
                                parallel_tool_calls=False, temperature=0, max_output_tokens=120)
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), TOOL["parameters"])
    follow = client.responses.create(model="qwen25", tools=[TOOL], temperature=0, max_output_tokens=16, input=[
        *ASK, {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "22 C"}])
    assert follow.status in ("completed", "incomplete") and follow.output


def test_streaming_events_and_final_response(client: openai.OpenAI):
    # a schema with one short answer: the grammar ends the text, so the response completes
    greeting = {"format": {"type": "json_schema", "name": "greeting", "schema": {
        "type": "object", "properties": {"greeting": {"type": "string", "enum": ["hello", "hi"]}},
        "required": ["greeting"]}}}
    kw = dict(model="smollm2", input="Say hello.", max_output_tokens=40, temperature=0, text=greeting)
    whole = client.responses.create(**kw)
    with client.responses.stream(**kw) as stream:
        kinds = [ev.type for ev in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in kinds and "response.output_item.done" in kinds
    assert final.output_text == whole.output_text
    # a streamed function call
    with client.responses.stream(model="qwen25", input=ASK, tools=[TOOL], tool_choice="required",
                                 parallel_tool_calls=False, temperature=0, max_output_tokens=120) as stream:
        kinds = [ev.type for ev in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    (call,) = [o for o in final.output if o.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), TOOL["parameters"])


def test_text_format_json_schema(client: openai.OpenAI):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}},
              "required": ["colour"], "additionalProperties": False}
    r = client.responses.create(model="smollm2", input="Pick a colour.", temperature=0, max_output_tokens=30,
                                text={"format": {"type": "json_schema", "name": "pick", "schema": schema}})
    jsonschema.validate(json.loads(r.output_text), schema)


def test_reasoning_is_a_reasoning_item(client: openai.OpenAI):
    r = client.responses.create(model="r1", input="What is 2 + 2?", temperature=0, max_output_tokens=40)
    kinds = [o.type for o in r.output]
    assert kinds[0] == "reasoning" and r.output[0].content[0].text  # R1's template opened the block
    assert "think>" not in r.output_text
    assert r.usage.output_tokens_details.reasoning_tokens > 0


@pytest.mark.parametrize("body, says", [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"tools": [{"type": "web_search"}]}, "web_search"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]}, "input_image"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "item references"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "nope"),
    ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, "call_x"),
])
def test_unsupported_is_a_400_in_openais_shape(server: _Server, body: dict, says: str):
    r = httpx.post(f"{server.url}/v1/responses", json={"model": "qwen25", "input": "hi", **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]["message"]
