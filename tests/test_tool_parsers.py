"""The output parsers on recorded outputs of each format. The fixtures are written from
the formats' own documentation (Hermes 2 Pro's and Qwen's function-calling guides, Meta's
Llama 3.1 prompt format, Mistral's tokenizer docs, llama.cpp's docs/function-calling.md,
DeepSeek R1's model card), not from this parser's output."""

from __future__ import annotations

import json

import pytest

from hearth.errors import BadRequest
from hearth.tools import (
    ChatFormat,
    OutputParser,
    ToolChoice,
    build_grammar,
    detect_format,
    parse_tool_choice,
    parse_tools,
)

TOOLS = parse_tools([
    {"type": "function", "function": {"name": "get_stock_fundamentals", "parameters": {
        "type": "object", "properties": {"symbol": {"type": "string"}}, "required": ["symbol"]}}},
    {"type": "function", "function": {"name": "get_current_temperature", "parameters": {
        "type": "object", "properties": {"location": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["location"]}}},
    {"type": "function", "function": {"name": "get_temperature_date", "parameters": {
        "type": "object", "properties": {"location": {"type": "string"}, "date": {"type": "string"}},
        "required": ["location", "date"]}}},
    {"type": "function", "function": {"name": "get_current_conditions", "parameters": {
        "type": "object", "properties": {"location": {"type": "string"}, "unit": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_current_weather", "parameters": {
        "type": "object", "properties": {"location": {"type": "string"}, "format": {"type": "string"}}}}},
])

HERMES = ChatFormat("hermes")
QWEN3 = ChatFormat("hermes", ("<think>", "</think>"))
LLAMA3 = ChatFormat("llama3")
MISTRAL = ChatFormat("mistral")
GENERIC = ChatFormat("generic")
R1 = ChatFormat("generic", ("<think>", "</think>"))


def parse(fmt, text, *, tools=TOOLS, in_thinking=False, pieces=None):
    """Whole, and fed in ``pieces``-sized bits (1 = a character at a time): same result."""
    whole = OutputParser(fmt, tools, in_thinking=in_thinking)
    whole_events = whole.feed(text)
    out, rest = whole.finish()
    whole_events += rest  # fed at once, the stream adds up to the parse too
    assert "".join(t for k, t in whole_events if k == "content") == out.content
    assert "".join(t for k, t in whole_events if k == "reasoning") == out.reasoning
    for size in (1, 3, 7):
        p = OutputParser(fmt, tools, in_thinking=in_thinking)
        events = []
        for i in range(0, len(text), size):
            events += p.feed(text[i : i + size])
        o2, r2 = p.finish()
        events += r2
        assert (o2.content, o2.reasoning, [(c.name, c.arguments) for c in o2.tool_calls]) == (
            out.content, out.reasoning, [(c.name, c.arguments) for c in out.tool_calls])
        # what was streamed adds up to the parse
        assert "".join(t for k, t in events if k == "content") == o2.content
        assert "".join(t for k, t in events if k == "reasoning") == o2.reasoning
    return out


def calls(out):
    return [(c.name, c.arguments) for c in out.tool_calls]


def test_hermes_2_pro_documented_call():
    out = parse(HERMES, '<tool_call>\n{"arguments": {"symbol": "TSLA"}, "name": "get_stock_fundamentals"}\n</tool_call>')
    assert calls(out) == [("get_stock_fundamentals", {"symbol": "TSLA"})] and out.content == ""


def test_qwen25_documented_parallel_calls_after_text():
    text = ("Let me check.\n<tool_call>\n"
            '{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}\n'
            "</tool_call>\n<tool_call>\n"
            '{"name": "get_temperature_date", "arguments": {"location": "San Francisco, CA, USA", "date": "2024-10-01"}}\n'
            "</tool_call>")
    out = parse(HERMES, text)
    assert calls(out) == [("get_current_temperature", {"location": "San Francisco, CA, USA"}),
                          ("get_temperature_date", {"location": "San Francisco, CA, USA", "date": "2024-10-01"})]
    assert out.content == "Let me check.\n"


def test_qwen3_thinking_then_call():
    text = ("<think>\nOkay, the user wants the temperature. I should call the tool.\n</think>\n\n"
            '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "Paris"}}\n</tool_call>')
    out = parse(QWEN3, text)
    assert out.reasoning == "\nOkay, the user wants the temperature. I should call the tool.\n"
    assert calls(out) == [("get_current_temperature", {"location": "Paris"})] and out.content == ""


def test_llama31_documented_json_call():
    out = parse(LLAMA3, '{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA", '
                        '"unit": "Fahrenheit"}}')
    assert calls(out) == [("get_current_conditions", {"location": "San Francisco, CA", "unit": "Fahrenheit"})]
    out = parse(LLAMA3, '<|python_tag|>{"type": "function", "name": "get_current_conditions", '
                        '"parameters": {"location": "Paris"}}')
    assert calls(out) == [("get_current_conditions", {"location": "Paris"})]
    # built-in tools (brave_search.call(...)) are not JSON calls: they stay text
    out = parse(LLAMA3, '<|python_tag|>brave_search.call(query="weather")')
    assert out.tool_calls == [] and "brave_search" in out.content


def test_mistral_documented_calls_both_generations():
    out = parse(MISTRAL, '[TOOL_CALLS][{"name": "get_current_weather", "arguments": {"location": "Paris, France", '
                         '"format": "celsius"}, "id": "abcdefghi"}]')
    assert calls(out) == [("get_current_weather", {"location": "Paris, France", "format": "celsius"})]
    assert out.tool_calls[0].id == "abcdefghi"
    out = parse(MISTRAL, '[TOOL_CALLS]get_current_weather[ARGS]{"location": "Paris, France", "format": "celsius"}')
    assert calls(out) == [("get_current_weather", {"location": "Paris, France", "format": "celsius"})]
    assert len(out.tool_calls[0].id) == 9 and out.tool_calls[0].id.isalnum()  # Mistral's templates insist


def test_generic_json_call_and_response():
    out = parse(GENERIC, '{"tool_call": {"name": "get_current_weather", "arguments": {"location": "Paris"}}}')
    assert calls(out) == [("get_current_weather", {"location": "Paris"})]
    out = parse(GENERIC, '{"tool_calls": [{"name": "get_current_weather", "arguments": {"location": "Paris"}}, '
                         '{"name": "get_stock_fundamentals", "arguments": {"symbol": "TSLA"}}]}')
    assert [n for n, _ in calls(out)] == ["get_current_weather", "get_stock_fundamentals"]
    out = parse(GENERIC, '{"response": "It is sunny in Paris."}')
    assert out.tool_calls == [] and out.content == "It is sunny in Paris."


def test_deepseek_r1_opened_thinking():
    out = parse(R1, "Okay, 2 + 2 is 4.\n</think>\n\nThe answer is 4.", tools=[], in_thinking=True)
    assert out.reasoning == "Okay, 2 + 2 is 4.\n" and out.content == "The answer is 4."


def test_arguments_that_break_the_schema_are_not_calls():
    # symbol is required; a call without it stays text, never reaches a client as a call
    text = '<tool_call>\n{"name": "get_stock_fundamentals", "arguments": {}}\n</tool_call>'
    out = parse(HERMES, text)
    assert out.tool_calls == [] and out.content == text
    # an unknown tool name, likewise
    out = parse(HERMES, '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>')
    assert out.tool_calls == []


def test_a_call_cut_short_keeps_the_complete_ones():
    text = ('<tool_call>\n{"name": "get_stock_fundamentals", "arguments": {"symbol": "TSLA"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_stock_fundamentals", "argu')
    assert calls(parse(HERMES, text)) == [("get_stock_fundamentals", {"symbol": "TSLA"})]


def test_text_that_only_looks_like_an_opener_is_content():
    out = parse(HERMES, "Use <tool_ to call. <tool_cal and < and <tool")
    assert out.content == "Use <tool_ to call. <tool_cal and < and <tool" and out.tool_calls == []


def test_plain_output_passes_through_untouched():
    p = OutputParser(ChatFormat("generic"), [])
    assert p.passthrough
    assert p.feed("  leading spaces kept") == [("content", "  leading spaces kept")]


def test_formats_are_detected_from_the_template():
    assert detect_format("{{ '<tool_call>' }}").name == "hermes"
    assert detect_format("[TOOL_CALLS]").name == "mistral"
    assert detect_format("<|start_header_id|>ipython<|end_header_id|>").name == "llama3"
    assert detect_format("{{ messages }}").name == "generic"
    assert detect_format("<think>{{ x }}").think == ("<think>", "</think>")


def test_tool_choice_and_tools_validation():
    assert parse_tool_choice(None, TOOLS) == ToolChoice("auto")
    assert parse_tool_choice({"type": "function", "function": {"name": "get_current_weather"}}, TOOLS).name == (
        "get_current_weather")
    assert parse_tool_choice({"type": "function", "name": "get_current_weather"}, TOOLS).mode == "function"
    for bad, says in [("sometimes", "tool_choice"), ({"type": "function", "function": {"name": "x"}}, "'x'")]:
        with pytest.raises(BadRequest, match=says):
            parse_tool_choice(bad, TOOLS)
    with pytest.raises(BadRequest, match=r"tools\[0\]\.function\.parameters"):
        parse_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}])
    with pytest.raises(BadRequest, match="at most"):
        parse_tools([{"type": "function", "function": {"name": f"f{i}"}} for i in range(200)])


def test_grammars_for_each_format_are_bounded_and_lazy_only_for_auto():
    big = parse_tools([{"type": "function", "function": {"name": f"tool_{i}", "parameters": {
        "type": "object",
        "properties": {"text": {"type": "string", "maxLength": 65536},
                       "opts": {"type": "object", "properties": {"n": {"type": "integer"}, "tags": {
                           "type": "array", "items": {"type": "string"}, "maxItems": 100000}}}},
        "required": ["text"]}}} for i in range(30)])
    for fmt in (HERMES, LLAMA3, MISTRAL, GENERIC):
        auto = build_grammar(fmt, big, ToolChoice("auto"), True)
        forced = build_grammar(fmt, big, ToolChoice("required"), True)
        assert forced.triggers == []
        assert (auto.triggers == []) == (fmt.name == "generic")  # generic: the answer is always JSON
        assert "65536" not in auto.grammar and "100000" not in auto.grammar
        assert auto.grammar.count("::=") < 10_000
    assert build_grammar(HERMES, big, ToolChoice("none"), True) is None
    named = build_grammar(HERMES, big, ToolChoice("function", "tool_7"), True).grammar
    assert '"\\"tool_7\\""' in named and "tool_8" not in named
    # a thinking model whose prompt opened the block: the calls are forced after it
    thinking = build_grammar(QWEN3, big, ToolChoice("required"), False, in_thinking=True)
    assert thinking.triggers and "</think>" in thinking.triggers[0]


def test_schema_refs_inside_tool_parameters_resolve():
    # pydantic writes nested models as $defs + $ref, as agent frameworks send them
    tools = parse_tools([{"type": "function", "function": {"name": "book", "parameters": {
        "$defs": {"Guest": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}},
        "type": "object", "properties": {"guest": {"$ref": "#/$defs/Guest"}}, "required": ["guest"]}}}])
    g = build_grammar(HERMES, tools, ToolChoice("required"), False).grammar
    assert "Guest" in g
    out = parse(HERMES, '<tool_call>\n{"name": "book", "arguments": {"guest": {"name": "Ada"}}}\n</tool_call>',
                tools=tools)
    assert calls(out) == [("book", {"guest": {"name": "Ada"}})]
    json.dumps(g)
