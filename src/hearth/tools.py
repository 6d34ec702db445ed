"""Tool calls and reasoning in chat: the tools a request offers, how the model's own
template shows them, the grammar that keeps calls valid, and how the output is read
back into reasoning, content and structured calls.

Formats (llama.cpp's ``common/chat.cpp`` is the reference for what exists and how each
is recognised; it is detected from the chat template's source):

- ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
  (Hermes 2/3, Qwen 2.5, Qwen 3, and most recent templates with ``<tool_call>``);
- ``llama3``: a bare ``{"name": ..., "parameters": {...}}`` object, optionally after
  ``<|python_tag|>`` (Llama 3.1-3.3);
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}]`` (Nemo,
  Small) and ``[TOOL_CALLS]name[ARGS]{...}`` (Small 3.2, Magistral);
- ``generic``: for templates without tool support. The tools are described in a system
  message and the whole answer is one JSON object, ``{"tool_call": {...}}`` /
  ``{"tool_calls": [...]}`` or ``{"response": "..."}``, as llama.cpp's generic format.

Reasoning: a template that knows ``<think>`` gets its thinking split off (including a
template whose generation prompt already opened the block, like DeepSeek R1's).

Grammars: each tool's parameters schema becomes GBNF (bounded, ``grammar.py``); the
call grammar is the format's wrapper around "one of these tools". ``required`` and a
named function apply it from the first token; ``auto`` applies it lazily, from the
format's call opener on (llama.cpp's lazy grammars), so free text stays free.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from .errors import BadRequest
from .grammar import check_grammar, schema_to_grammar

MAX_TOOLS = 128
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_ALNUM = string.ascii_letters + string.digits


# -- what a request offers --------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # the client's JSON schema for the arguments

    def to_openai(self) -> dict[str, Any]:
        """The shape chat templates iterate over (``tools`` in Jinja)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def _check_schema(schema: Any, where: str) -> dict[str, Any]:
    if schema is None:
        return {"type": "object", "properties": {}}
    if not isinstance(schema, Mapping):
        raise BadRequest(f"{where} must be a JSON schema object")
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise BadRequest(f"{where} is not a valid JSON schema: {e.message}") from None
    except RecursionError:
        raise BadRequest(f"{where} nests too deeply") from None
    return dict(schema)


def make_tool(name: Any, description: Any, parameters: Any, where: str) -> Tool:
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        raise BadRequest(f"{where}.name must be 1-64 letters, digits, '_', '-', '.' or ':', got {name!r}")
    if description is not None and not isinstance(description, str):
        raise BadRequest(f"{where}.description must be a string")
    return Tool(name, description or "", _check_schema(parameters, f"{where}.parameters"))


def parse_tools(raw: Any, where: str = "tools") -> list[Tool]:
    """OpenAI chat tools (``{"type": "function", "function": {...}}``), or the flat
    Responses/Ollama-less shape (``{"type": "function", "name": ...}``)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BadRequest(f"{where} must be a list of tools")
    if len(raw) > MAX_TOOLS:
        raise BadRequest(f"{where} has {len(raw)} tools; at most {MAX_TOOLS}")
    tools: list[Tool] = []
    for i, t in enumerate(raw):
        w = f"{where}[{i}]"
        if not isinstance(t, Mapping):
            raise BadRequest(f"{w} must be an object")
        kind = t.get("type", "function")
        if kind != "function":
            raise BadRequest(f"{w}.type {kind!r} is not supported (only \"function\" tools)")
        fn = t.get("function")
        if fn is None and "name" in t:  # the flat shape
            fn, fw = t, w
        else:
            fw = f"{w}.function"
        if not isinstance(fn, Mapping):
            raise BadRequest(f"{fw} must be an object with a name")
        tools.append(make_tool(fn.get("name"), fn.get("description"), fn.get("parameters"), fw))
    names = [t.name for t in tools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise BadRequest(f"{where}: two tools are named {dup!r}")
    return tools


@dataclass(frozen=True)
class ToolChoice:
    mode: str = "auto"  # auto | none | required | function
    name: str | None = None  # mode "function"


def parse_tool_choice(raw: Any, tools: Sequence[Tool], where: str = "tool_choice") -> ToolChoice:
    if raw is None:
        return ToolChoice("auto")
    if isinstance(raw, str):
        if raw not in ("auto", "none", "required"):
            raise BadRequest(f"{where} must be \"auto\", \"none\", \"required\" or a function, got {raw!r}")
        choice = ToolChoice(raw)
    elif isinstance(raw, Mapping):
        fn = raw.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else raw.get("name")
        if raw.get("type", "function") != "function" or not isinstance(name, str):
            raise BadRequest(f"{where} must name a function: {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        choice = ToolChoice("function", name)
    else:
        raise BadRequest(f"{where} must be a string or an object")
    if choice.mode in ("required", "function") and not tools:
        raise BadRequest(f"{where} {choice.mode!r} needs tools")
    if choice.name is not None and choice.name not in {t.name for t in tools}:
        raise BadRequest(f"{where} names {choice.name!r}, which is not among the tools")
    return choice


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24)))

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def check_tool_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    """A tool result must answer a call an earlier assistant message made."""
    ids: set[str] = set()
    for i, m in enumerate(messages):
        for c in m.get("tool_calls") or []:
            if isinstance(c, Mapping) and c.get("id"):
                ids.add(str(c["id"]))
        if m.get("role") == "tool":
            cid = m.get("tool_call_id")
            if cid is not None and str(cid) not in ids:
                raise BadRequest(f"messages[{i}]: tool_call_id {cid!r} does not match any earlier tool call")


# -- formats ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatFormat:
    name: str  # hermes | llama3 | mistral | generic
    think: tuple[str, str] | None = None  # reasoning markers


def detect_format(source: str | None) -> ChatFormat:
    src = source or ""
    think = ("<think>", "</think>") if "<think>" in src or "</think>" in src else None
    if "[TOOL_CALLS]" in src:
        name = "mistral"
    elif "<tool_call>" in src:
        name = "hermes"
    elif "<|python_tag|>" in src or ("<|start_header_id|>" in src and "ipython" in src):
        name = "llama3"
    else:
        name = "generic"
    return ChatFormat(name, think)


GENERIC_INSTRUCTIONS = (
    "Respond in JSON format, either with `tool_call` (a request to call tools) or with "
    "`response` reply to the user's request"
)


def generic_system_prompt(tools: Sequence[Tool], choice: ToolChoice, parallel: bool) -> str:
    listing = json.dumps([t.to_openai()["function"] for t in tools], ensure_ascii=False, indent=2)
    key = "tool_calls" if parallel else "tool_call"
    if choice.mode in ("required", "function"):
        how = f"Respond in JSON format with `{key}` (a request to call tools)."
    else:
        how = GENERIC_INSTRUCTIONS.replace("`tool_call`", f"`{key}`") + "."
    return f"You can call any of the following tools to satisfy the user's requests:\n{listing}\n\n{how}"


# -- grammars -----------------------------------------------------------------------------

_RULE_DEF = re.compile(r"^([A-Za-z0-9_-]+)\s*::=", re.M)
_WORD = re.compile(r"[A-Za-z0-9_-]+")


def _prefixed(gbnf: str, prefix: str) -> str:
    """The same grammar with every rule renamed ``prefix + name`` (references too;
    literals, character classes and comments untouched), so grammars can be combined."""
    names = set(_RULE_DEF.findall(gbnf))
    out: list[str] = []
    i, n = 0, len(gbnf)
    while i < n:
        c = gbnf[i]
        if c in "\"[":
            close = '"' if c == '"' else "]"
            j = i + 1
            while j < n and gbnf[j] != close:
                j += 2 if gbnf[j] == "\\" else 1
            out.append(gbnf[i : j + 1])
            i = j + 1
        elif c == "#":
            j = gbnf.find("\n", i)
            j = n if j < 0 else j
            out.append(gbnf[i:j])
            i = j
        else:
            m = _WORD.match(gbnf, i)
            if m:
                word = m.group(0)
                out.append(prefix + word if word in names else word)
                i = m.end()
            else:
                out.append(c)
                i += 1
    return "".join(out)


def _gbnf_literal(text: str) -> str:
    return json.dumps(text)  # GBNF literals take JSON-style escapes


def _schema_rule(schema: dict[str, Any], prefix: str) -> tuple[str, str]:
    """(rules, the root rule's name) for ``schema`` with every rule prefixed."""
    return _prefixed(schema_to_grammar(schema), prefix), f"{prefix}root"


def _call_object(tool: Tool, args_key: str) -> dict[str, Any]:
    """The JSON of one call to ``tool``. The parameters' own ``$defs`` move up to this
    object's root, where their ``$ref``s point."""
    params = dict(tool.parameters)
    defs = {k: params.pop(k) for k in ("$defs", "definitions") if k in params}
    return {"type": "object", "properties": {"name": {"const": tool.name}, args_key: params},
            "required": ["name", args_key], **defs}


@dataclass
class ToolGrammar:
    grammar: str
    triggers: list[str] = field(default_factory=list)  # regexes; empty: applies from the start


def build_grammar(fmt: ChatFormat, tools: Sequence[Tool], choice: ToolChoice, parallel: bool,
                  *, in_thinking: bool = False, response_schema: Any = None) -> ToolGrammar | None:
    """The grammar that keeps this request's calls valid, or None (tool_choice none)."""
    if choice.mode == "none" or not tools:
        return None
    chosen = [t for t in tools if choice.name is None or t.name == choice.name]
    args_key = "parameters" if fmt.name == "llama3" else "arguments"
    rules: list[str] = []
    alts: list[str] = []
    for i, t in enumerate(chosen):
        body, root = _schema_rule(_call_object(t, args_key), f"t{i}-")
        rules.append(body)
        alts.append(root)
    rules.append("call ::= " + " | ".join(alts))
    ws = 'ws ::= [ \\t\\n]*'
    rules.append(ws)
    forced = choice.mode in ("required", "function")
    if fmt.name == "generic":
        key = "tool_calls" if parallel else "tool_call"
        if parallel:
            calls = f'"{{" ws "\\"{key}\\"" ws ":" ws "[" ws call ( ws "," ws call )* ws "]" ws "}}"'
        else:
            calls = f'"{{" ws "\\"{key}\\"" ws ":" ws call ws "}}"'
        if forced:
            rules.append(f"root ::= ws {calls}")
        else:
            resp_schema = response_schema if response_schema is not None else {"type": "string"}
            body, resp_root = _schema_rule(resp_schema, "resp-")
            rules.append(body)
            rules.append(f'root ::= ws ( {calls} | "{{" ws "\\"response\\"" ws ":" ws {resp_root} ws "}}" )')
        return ToolGrammar(_check("\n".join(rules)))
    if fmt.name == "hermes":
        one = '"<tool_call>\\n" call ws "</tool_call>"'
        block = f"{one} ( ws {one} )*" if parallel else one
        opener = r"<tool_call>"
    elif fmt.name == "mistral":
        block = '"[TOOL_CALLS]" "[" call ( "," ws call )* "]"' if parallel else '"[TOOL_CALLS]" "[" call "]"'
        opener = r"\[TOOL_CALLS\]"
    else:  # llama3: one bare call object
        block = '"<|python_tag|>"? call'
        opener = r"\{\s*\"name\"|<\|python_tag\|>"
    triggers: list[str] = []
    if not forced and response_schema is not None:
        # structured output and tools: the answer is either the calls or that JSON
        body, resp_root = _schema_rule(response_schema, "resp-")
        rules.append(body)
        rules.append(f"root ::= ws ( {block} | {resp_root} )")
        return ToolGrammar(_check("\n".join(rules)))
    rules.append(f"root ::= ws {block}")
    if not forced:
        triggers = [rf"[\s\S]*?({opener})[\s\S]*"]
    elif in_thinking and fmt.think:
        # the model thinks first: the calls are forced from the end of its thinking
        triggers = [rf"[\s\S]*?{re.escape(fmt.think[1])}([\s\S]*)"]
    return ToolGrammar(_check("\n".join(rules)), triggers)


def _check(grammar: str) -> str:
    try:
        check_grammar(grammar)
    except BadRequest as e:
        raise BadRequest(f"the tools' schemas are too large to enforce ({e.message}); "
                         "send fewer or smaller tools") from None
    return grammar


# -- reading the output back ----------------------------------------------------------------


@dataclass
class ParsedOutput:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


def _holdback(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class OutputParser:
    """Reads a chat model's output as it streams. ``feed`` returns what can be shown
    now as ``("reasoning" | "content", text)`` events; ``finish`` returns the whole
    parse, with the tool calls (validated against their schemas)."""

    def __init__(self, fmt: ChatFormat, tools: Sequence[Tool] = (), *, parse_calls: bool = True,
                 in_thinking: bool = False, parse_thinking: bool = True) -> None:
        self.fmt = fmt
        self.tools = {t.name: t for t in tools}
        self.parse_calls = parse_calls and bool(tools)
        self.think = fmt.think if parse_thinking else None
        self.state = "think" if (in_thinking and self.think) else "start"
        self.pending = ""
        self.out = ParsedOutput()
        self._thought = False  # one thinking block, at the start
        self._buffer: list[str] = []  # the calls / JSON answer, from the opener on
        self._content: list[str] = []
        self._reasoning: list[str] = []

    # streaming
    @property
    def passthrough(self) -> bool:
        """Nothing to parse: every piece is content as it comes."""
        return not self.parse_calls and not self.think

    def feed(self, text: str) -> list[tuple[str, str]]:
        events: list[tuple[str, str]] = []
        if self.passthrough:
            self._emit(events, "content", text)
            return events
        if self.state in ("calls", "json"):  # buffered until the end (a list: no quadratic copying)
            self._buffer.append(text)
            return events
        self.pending += text
        while True:
            if self.state == "start":
                stripped = self.pending.lstrip()
                if not stripped:
                    break
                if self.think and not self._thought:
                    opener = self.think[0]
                    if stripped.startswith(opener):
                        self.pending = stripped[len(opener):]
                        self.state = "think"
                        continue
                    if opener.startswith(stripped):
                        break  # could still be the thinking opener
                if self._thought:  # the blank line after the thinking is not content
                    self.pending = stripped
                if self.parse_calls and self.fmt.name == "generic":
                    self.state = "json"  # the whole answer is one JSON object
                    break
                if self.parse_calls and self.fmt.name == "llama3":
                    if stripped.startswith(("{", "<|python_tag|>")):
                        self.pending = stripped
                        self.state = "calls"
                        break
                    if "<|python_tag|>".startswith(stripped):
                        break
                self.state = "content"
                continue
            if self.state == "think":
                end = self.think[1]  # type: ignore[index]
                k = self.pending.find(end)
                if k >= 0:
                    self._emit(events, "reasoning", self.pending[:k])
                    self.pending = self.pending[k + len(end):]
                    self._thought = True
                    self.state = "start"
                    continue
                keep = _holdback(self.pending, end)
                self._emit(events, "reasoning", self.pending[: len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep:]
                break
            if self.state == "content":
                opener = self._opener()
                if opener is None:
                    self._emit(events, "content", self.pending)
                    self.pending = ""
                    break
                k = self.pending.find(opener)
                if k >= 0:
                    self._emit(events, "content", self.pending[:k])
                    self.pending = self.pending[k:]
                    self.state = "calls"
                    break
                keep = _holdback(self.pending, opener)
                self._emit(events, "content", self.pending[: len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep:]
                break
            break  # calls / json: buffered until the end
        return events

    def _opener(self) -> str | None:
        if not self.parse_calls:
            return None
        return {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3": "<|python_tag|>"}.get(self.fmt.name)

    def _emit(self, events: list[tuple[str, str]], kind: str, text: str) -> None:
        if not text:
            return
        if kind == "content":
            self._content.append(text)
        else:
            self._reasoning.append(text)
        events.append((kind, text))

    def finish(self) -> tuple[ParsedOutput, list[tuple[str, str]]]:
        """The whole parse, and the events still to show (held-back text, a final
        ``response``). Calls whose arguments do not fit their schema are not calls:
        their text stays content."""
        events: list[tuple[str, str]] = []
        rest = self.pending + "".join(self._buffer)
        self._buffer.clear()
        self.pending = ""
        if self.state == "think":
            self._emit(events, "reasoning", rest)
        elif self.state in ("calls", "json"):
            calls, content = self._parse_calls(rest)
            if calls is None:
                self._emit(events, "content", rest)
            else:
                self.out.tool_calls = calls
                self._emit(events, "content", content)
        elif self.state == "content":
            self._emit(events, "content", rest)
        else:  # "start": only whitespace, or an unfinished thinking opener
            self._emit(events, "content", rest if rest.strip() else "")
        self.out.content = "".join(self._content)
        self.out.reasoning = "".join(self._reasoning)
        return self.out, events

    # the formats
    def _parse_calls(self, text: str) -> tuple[list[ToolCall] | None, str]:
        """(calls, content) or (None, "") when ``text`` is not valid calls."""
        try:
            if self.fmt.name == "generic":
                return self._generic(text)
            if self.fmt.name == "hermes":
                raw = _hermes(text)
            elif self.fmt.name == "mistral":
                raw = _mistral(text)
            else:
                raw = _llama3(text)
        except (ValueError, TypeError, KeyError):
            return None, ""
        calls = self._validated(raw)
        return (calls, "") if calls else (None, "")

    def _generic(self, text: str) -> tuple[list[ToolCall] | None, str]:
        obj = json.loads(text)
        if not isinstance(obj, dict):
            return None, ""
        if "response" in obj:
            resp = obj["response"]
            return [], resp if isinstance(resp, str) else json.dumps(resp, ensure_ascii=False)
        raw = obj.get("tool_calls")
        if raw is None and "tool_call" in obj:
            raw = [obj["tool_call"]]
        if not isinstance(raw, list):
            return None, ""
        calls = self._validated([(c.get("name"), c.get("arguments"), c.get("id")) for c in raw])
        return (calls, "") if calls else (None, "")

    def _validated(self, raw: Iterable[tuple[Any, Any, Any]]) -> list[ToolCall] | None:
        import jsonschema

        calls: list[ToolCall] = []
        for name, args, cid in raw:
            if isinstance(args, str):
                args = json.loads(args)
            tool = self.tools.get(name) if isinstance(name, str) else None
            if tool is None or not isinstance(args, dict):
                return None
            try:
                jsonschema.validate(args, tool.parameters)
            except (jsonschema.ValidationError, jsonschema.SchemaError, RecursionError):
                return None
            if not (isinstance(cid, str) and cid):
                # Mistral's templates insist on 9-character ids
                cid = "".join(secrets.choice(_ALNUM) for _ in range(9)) if self.fmt.name == "mistral" else None
            calls.append(ToolCall(name, args, cid) if cid else ToolCall(name, args))
        return calls or None


def _decode_objects(text: str, pos: int = 0) -> tuple[Any, int]:
    dec = json.JSONDecoder()
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return dec.raw_decode(text, pos)


def _hermes(text: str) -> list[tuple[Any, Any, Any]]:
    out = []
    pos = 0
    while True:
        k = text.find("<tool_call>", pos)
        if k < 0:
            break
        try:
            obj, pos = _decode_objects(text, k + len("<tool_call>"))
        except ValueError:
            if out:  # a last call cut short (max_tokens): the complete ones stand
                return out
            raise
        rest = text[pos:].lstrip()
        if rest.startswith("</tool_call>"):
            pos = len(text) - len(rest) + len("</tool_call>")
        if not isinstance(obj, dict):
            raise ValueError("not an object")
        out.append((obj.get("name"), obj.get("arguments", {}), obj.get("id")))
    if text[pos:].strip():
        raise ValueError("text after the calls")
    if not out:
        raise ValueError("no call")
    return out


def _mistral(text: str) -> list[tuple[Any, Any, Any]]:
    out = []
    pos = 0
    while True:
        k = text.find("[TOOL_CALLS]", pos)
        if k < 0:
            break
        pos = k + len("[TOOL_CALLS]")
        rest = text[pos:].lstrip()
        if rest.startswith("["):  # a JSON array of calls
            arr, pos = _decode_objects(text, pos)
            for c in arr:
                out.append((c.get("name"), c.get("arguments", {}), c.get("id")))
            continue
        # name[CALL_ID]id[ARGS]{...} (Mistral Small 3.2)
        m = re.match(r"\s*([A-Za-z0-9_.:-]+)(?:\[CALL_ID\]([A-Za-z0-9]+))?\[ARGS\]", text[pos:])
        if not m:
            raise ValueError("not a call")
        args, pos = _decode_objects(text, pos + m.end())
        out.append((m.group(1), args, m.group(2)))
    if text[pos:].strip() or not out:
        raise ValueError("not only calls")
    return out


def _llama3(text: str) -> list[tuple[Any, Any, Any]]:
    s = text.strip()
    if s.startswith("<|python_tag|>"):
        s = s[len("<|python_tag|>"):]
    out = []
    pos = 0
    while True:
        obj, pos = _decode_objects(s, pos)
        if not isinstance(obj, dict):
            raise ValueError("not an object")
        name = obj.get("name", obj.get("function"))
        args = obj.get("parameters", obj.get("arguments", {}))
        out.append((name, args, None))
        rest = s[pos:].lstrip()
        if rest.startswith(";"):
            pos = len(s) - len(rest) + 1
            continue
        if not rest:
            return out
        if not rest.startswith("{"):
            raise ValueError("text after the call")
        pos = len(s) - len(rest)
