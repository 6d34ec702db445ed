"""Tool calls and reasoning through the real server, driven by the official clients.

SmolLM2 135M does not choose tools by itself, so nothing here depends on its judgement:
calls are forced with ``tool_choice`` (required / a named function), and thinking is
forced with a grammar. What is proven is the plumbing: the model's own template shows
the tools, the grammar keeps the call valid, the output is read back into structured
calls / reasoning, and the clients reassemble them. Test models are the embedded GGUF
with other chat templates (``chat_templates.py``), written with the ``gguf`` package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")
jsonschema = pytest.importorskip("jsonschema")

from chat_templates import QWEN3, QWEN25, R1  # noqa: E402
from gguf_variants import with_metadata  # noqa: E402
from hearth.server import create_app  # noqa: E402
from test_server import _Server  # noqa: E402

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                # what real agents send: very long string bounds, enums, nested objects
                "city": {"type": "string", "maxLength": 65536},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "when": {"type": "object", "properties": {"days_ahead": {"type": "integer", "minimum": 0}}},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a timezone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("templates")
    return {name: with_metadata(smollm2_path, root / f"{name}.gguf", {"tokenizer.chat_template": t})
            for name, t in (("qwen25", QWEN25), ("qwen3", QWEN3), ("r1", R1))}


@pytest.fixture(scope="module")
def server(variants: dict[str, Path], smollm2_path: Path) -> Iterator[_Server]:
    names = ["qwen25", "qwen3", "r1", "smollm2"]
    paths = [str(variants["qwen25"]), str(variants["qwen3"]), str(variants["r1"]), str(smollm2_path)]
    env = {k: v for k, v in os.environ.items() if k.startswith("HEARTH_")}
    for k in env:
        os.environ.pop(k)
    try:
        app = create_app(paths, aliases=names, load_options={"n_ctx": 2048, "parallel": 2})
        with _Server(app) as s:
            yield s
    finally:
        os.environ.update(env)


@pytest.fixture(scope="module")
def client(server: _Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def _valid(call, tool: dict) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


# -- OpenAI: calls ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["qwen25", "smollm2"])  # the model's own format, and the generic one
def test_required_tool_call_is_a_valid_structured_call(client: openai.OpenAI, model: str):
    r = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], tool_choice="required",
                                       parallel_tool_calls=False, temperature=0, max_tokens=120)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    _valid(call, WEATHER)
    assert not choice.message.content


def test_named_function_is_the_one_called(client: openai.OpenAI):
    r = client.chat.completions.create(
        model="qwen25", messages=ASK, tools=[WEATHER, TIME], parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=0, max_tokens=80)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    _valid(call, TIME)


def test_streamed_tool_call_is_reassembled_by_the_client(client: openai.OpenAI):
    with client.chat.completions.stream(model="qwen25", messages=ASK, tools=[WEATHER], tool_choice="required",
                                        parallel_tool_calls=False, temperature=0, max_tokens=120) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    _valid(call, WEATHER)
    # the same call as without streaming (greedy, same grammar)
    whole = client.chat.completions.create(model="qwen25", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=120)
    assert json.loads(whole.choices[0].message.tool_calls[0].function.arguments) == json.loads(call.function.arguments)


def test_tool_result_goes_back_through_the_template(client: openai.OpenAI, server: _Server):
    first = client.chat.completions.create(model="qwen25", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=120)
    call = first.choices[0].message.tool_calls[0]

    def follow_up(result: str):
        messages = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": result}]
        return client.chat.completions.create(model="qwen25", messages=messages, tools=[WEATHER],
                                              temperature=0, max_tokens=24)

    short, long = "22 C", "22 C, sunny, with a light wind from the west and no rain expected today"
    a, b = follow_up(short), follow_up(long)
    assert a.choices[0].finish_reason in ("stop", "length", "tool_calls")
    model = next(e.model for e in server.app.state.pool.loaded() if e.model.name.startswith("qwen25"))
    # the tool's answer is in the prompt: the prompts differ by exactly its extra tokens
    extra = model.count_tokens(long) - model.count_tokens(short)
    assert b.usage.prompt_tokens - a.usage.prompt_tokens == extra


# -- OpenAI: bad input, each a 400 in OpenAI's shape -------------------------------------------------


@pytest.mark.parametrize("body, says", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "code_interpreter"}]}, "code_interpreter"),
    ({"tools": [WEATHER, WEATHER]}, "two tools"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]}, "call_x"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "not supported"),
])
def test_bad_tool_requests_are_400s(server: _Server, body: dict, says: str):
    r = httpx.post(f"{server.url}/v1/chat/completions",
                   json={"model": "qwen25", "messages": ASK, "max_tokens": 4, **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert says in err["message"] and err["type"] == "invalid_request_error"
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


# -- reasoning --------------------------------------------------------------------------------------

# forces "<thinking words></think>\n\n<answer words>" out of the real model
THINK_THEN_ANSWER = 'root ::= [a-z ]{3,40} "</think>\\n\\n" [A-Za-z ]{3,40}'


def test_reasoning_is_split_from_content(client: openai.OpenAI):
    r = client.chat.completions.create(model="r1", messages=ASK, temperature=0, max_tokens=60,
                                       extra_body={"grammar": THINK_THEN_ANSWER})
    msg = r.choices[0].message
    reasoning = msg.model_extra.get("reasoning_content")
    assert reasoning and "</think>" not in reasoning
    assert msg.content and "think>" not in msg.content
    # streamed: reasoning deltas, then content deltas, the same text
    parts = {"reasoning_content": "", "content": ""}
    for ev in client.chat.completions.create(model="r1", messages=ASK, temperature=0, max_tokens=60, stream=True,
                                             extra_body={"grammar": THINK_THEN_ANSWER}):
        if ev.choices:
            d = ev.choices[0].delta
            parts["content"] += d.content or ""
            parts["reasoning_content"] += (d.model_extra or {}).get("reasoning_content") or ""
    assert parts == {"reasoning_content": reasoning, "content": msg.content}


def test_enable_thinking_reaches_the_template(client: openai.OpenAI, server: _Server):
    def prompt_tokens(**extra):
        return client.chat.completions.create(model="qwen3", messages=ASK, max_tokens=1, **extra).usage.prompt_tokens

    default = prompt_tokens()
    off = prompt_tokens(extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    effort_none = prompt_tokens(reasoning_effort="none")
    model = next(e.model for e in server.app.state.pool.loaded() if e.model.name.startswith("qwen3"))
    # Qwen3's template writes an empty thinking block when thinking is off
    assert off - default == len(model.tokenize("<think>\n\n</think>\n\n", add_special=False))
    assert effort_none == off


# -- Ollama ----------------------------------------------------------------------------------------


def test_ollama_client_tool_call_and_result(server: _Server):
    c = ollama.Client(host=server.url)
    r = c.chat(model="qwen25", messages=ASK, tools=[WEATHER],
               options={"temperature": 0, "num_predict": 120, "tool_choice": "required"})
    (call,) = r.message.tool_calls[:1]
    assert call.function.name == "get_weather"
    jsonschema.validate(dict(call.function.arguments), WEATHER["function"]["parameters"])
    # the result goes back as a tool message, as Ollama's clients send it
    follow = c.chat(model="qwen25", messages=[*ASK, r.message, {"role": "tool", "content": "22 C",
                                                                "tool_name": "get_weather"}],
                    tools=[WEATHER], options={"temperature": 0, "num_predict": 8})
    assert follow.done and follow.message.role == "assistant"
    # streamed: the calls arrive in a chunk before the last
    chunks = list(c.chat(model="qwen25", messages=ASK, tools=[WEATHER], stream=True,
                         options={"temperature": 0, "num_predict": 120, "tool_choice": "required"}))
    calls = [tc for ch in chunks for tc in (ch.message.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather" and chunks[-1].done


def test_ollama_thinking_goes_to_message_thinking(server: _Server):
    c = ollama.Client(host=server.url)
    opts = {"temperature": 0, "num_predict": 60}
    full = c.chat(model="r1", messages=ASK, options=opts)
    # R1's template opened the thinking block: what the model writes first is thinking
    assert full.message.thinking and "think>" not in full.message.thinking
    assert "think>" not in (full.message.content or "")
    streamed = list(c.chat(model="r1", messages=ASK, options=opts, stream=True))
    thinking = "".join(ch.message.thinking or "" for ch in streamed)
    content = "".join(ch.message.content or "" for ch in streamed)
    assert thinking == full.message.thinking and content == (full.message.content or "")


# -- each format's grammar, on the real model -------------------------------------------------------


def _smollm2(server: _Server):
    return next(e.model for e in server.app.state.pool.loaded() if e.model.name.startswith("qwen25"))


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral", "generic"])
def test_each_formats_grammar_makes_calls_its_parser_reads(client: openai.OpenAI, server: _Server, fmt: str):
    from hearth.tools import ChatFormat, OutputParser, ToolChoice, build_grammar, parse_tools

    client.chat.completions.create(model="qwen25", messages=ASK, max_tokens=1)  # loaded
    model = _smollm2(server)
    tools = parse_tools([WEATHER, TIME])
    f = ChatFormat(fmt)
    for choice in (ToolChoice("required"), ToolChoice("function", "get_time")):
        g = build_grammar(f, tools, choice, False)
        r = model.generate_text("The weather in Paris, as a tool call:", grammar=g.grammar,
                                grammar_triggers=g.triggers, temperature=0, max_tokens=150)
        p = OutputParser(f, tools)
        p.feed(r.text)
        out, _ = p.finish()
        assert len(out.tool_calls) == 1, r.text
        call = out.tool_calls[0]
        if choice.name:
            assert call.name == choice.name
        spec = WEATHER if call.name == "get_weather" else TIME
        jsonschema.validate(call.arguments, spec["function"]["parameters"])


FEW_SHOT = ('Q: weather in Rome?\nA: <tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", '
            '"unit": "celsius"}}\n</tool_call>\nQ: say hello, then the weather in Oslo?\nA: Hello! <tool_call>\n'
            '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>\n'
            "Q: say hi, then the weather in Paris?\nA:")


def test_auto_grammar_is_lazy_free_text_then_a_constrained_call(client: openai.OpenAI, server: _Server):
    """``auto``: text before the call opener is free; from ``<tool_call>`` on the grammar
    holds, and ends the answer with the call (the model alone would go on to the next Q)."""
    from hearth.tools import ChatFormat, OutputParser, ToolChoice, build_grammar, parse_tools

    client.chat.completions.create(model="qwen25", messages=ASK, max_tokens=1)
    model = _smollm2(server)
    tools = parse_tools([WEATHER])
    g = build_grammar(ChatFormat("hermes"), tools, ToolChoice("auto"), False)
    assert g.triggers
    free = model.generate_text(FEW_SHOT, temperature=0, max_tokens=80, repeat_penalty=1.0)
    assert "Q:" in free.text  # without the grammar, the model goes on
    lazy = model.generate_text(FEW_SHOT, temperature=0, max_tokens=80, repeat_penalty=1.0,
                               grammar=g.grammar, grammar_triggers=g.triggers)
    assert lazy.finish_reason == "stop" and "Q:" not in lazy.text
    p = OutputParser(ChatFormat("hermes"), tools)
    p.feed(lazy.text)
    out, _ = p.finish()
    assert out.content.strip() and "<tool_call>" not in out.content  # the free text before the call
    (call,) = out.tool_calls
    jsonschema.validate(call.arguments, WEATHER["function"]["parameters"])


# -- a whole agent loop with an agent framework ---------------------------------------------------


@pytest.mark.parametrize("api", ["chat_completions", "responses"])
def test_openai_agents_sdk_loop_calls_the_tool_and_answers(server: _Server, api: str):
    agents = pytest.importorskip("agents")
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, function_tool

    agents.set_tracing_disabled(True)
    seen: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather for a city."""
        seen.append(city)
        return f"It is 22 C and sunny in {city}."

    kind = OpenAIChatCompletionsModel if api == "chat_completions" else OpenAIResponsesModel
    model = kind(model="qwen25",
                 openai_client=openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0))
    # the first turn must call the tool (SmolLM2 would not choose to); the SDK then resets
    # tool_choice to auto, so the second turn answers with the tool's result in the prompt
    agent = Agent(name="weather", instructions="Answer with the weather tool.", tools=[get_weather], model=model,
                  model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=96,
                                               parallel_tool_calls=False))
    result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4)
    assert seen and all(isinstance(c, str) and c for c in seen)
    kinds = [item.type for item in result.new_items]
    assert "tool_call_item" in kinds and "tool_call_output_item" in kinds
    assert kinds[-1] == "message_output_item" and isinstance(result.final_output, str) and result.final_output


# -- the library ------------------------------------------------------------------------------------


def test_library_chat_with_tools_and_thinking(variants: dict[str, Path]):
    import hearth

    with hearth.load_model(variants["qwen25"], n_ctx=1024, parallel=1) as m:
        r = m.generate_chat(ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                            temperature=0, max_tokens=120)
        (call,) = r.tool_calls
        assert call.name == "get_weather" and r == ""
        jsonschema.validate(call.arguments, WEATHER["function"]["parameters"])
        assert r.to_dict()["tool_calls"][0]["arguments"] == call.arguments
    with hearth.load_model(variants["r1"], n_ctx=1024, parallel=1) as m:
        kw = dict(temperature=0, max_tokens=60, grammar=THINK_THEN_ANSWER)
        r = m.generate_chat(ASK, **kw)
        assert r.reasoning and r.text and "think>" not in r.text + r.reasoning
        chunks = list(m.stream_chat(ASK, **kw))
        assert "".join(c for c in chunks if c.kind == "reasoning") == r.reasoning
        assert "".join(c for c in chunks if c.kind == "content") == r.text
        kinds = [c.kind for c in chunks]
        assert kinds == sorted(kinds, key=lambda k: k != "reasoning")  # thinking first, then the answer


def test_ollama_show_lists_tools_and_thinking_capabilities(server: _Server):
    c = ollama.Client(host=server.url)
    assert "tools" in c.show("qwen25").capabilities and "thinking" not in c.show("qwen25").capabilities
    assert {"tools", "thinking"} <= set(c.show("qwen3").capabilities)
    assert "thinking" in c.show("r1").capabilities and "tools" not in c.show("r1").capabilities
    assert c.show("smollm2").capabilities == ["completion"]


def test_ollama_think_false_reaches_the_template(server: _Server):
    c = ollama.Client(host=server.url)
    opts = {"temperature": 0, "num_predict": 1}
    on = c.chat(model="qwen3", messages=ASK, think=True, options=opts).prompt_eval_count
    off = c.chat(model="qwen3", messages=ASK, think=False, options=opts).prompt_eval_count
    model = next(e.model for e in server.app.state.pool.loaded() if e.model.name.startswith("qwen3"))
    assert off - on == len(model.tokenize("<think>\n\n</think>\n\n", add_special=False))
