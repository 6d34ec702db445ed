"""Chat messages -> prompt text, through the model's own Jinja chat template.

A model without an embedded template gets a fallback for its architecture family
(Gemma's turn markers, ChatML, Llama 3 headers) or, failing that, a plain
transcript that any base model can continue.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import BadRequest

ROLES = ("system", "user", "assistant", "tool", "developer")

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set first = true %}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set sys = messages[0]['content'] + '\n\n' %}{% set msgs = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}"
    "{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' + (sys if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

PLAIN_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# What a family's fallback stops on, since the markers may not be EOG tokens.
FALLBACK_STOPS = {
    "gemma": ["<end_of_turn>"],
    "chatml": ["<|im_end|>"],
    "llama3": ["<|eot_id|>"],
    "plain": ["\nUser:"],
}


@dataclass(frozen=True, eq=False)
class ChatTemplate:
    source: str
    kind: str  # "model" (embedded) or the fallback's name
    stop: tuple[str, ...] = ()

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        bos_token: str = "",
        eos_token: str = "",
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """``tools`` in OpenAI's shape (``{"type": "function", "function": {...}}``), as
        templates expect; ``extra``: more template variables (``enable_thinking``).

        A final assistant message (without tool calls) is continued, not closed: the
        prompt ends with its text, so the model goes on from there (assistant prefill, as
        llama-server, Anthropic and Ollama do)."""
        msgs = normalize_messages(messages)
        prefill = None
        if add_generation_prompt and len(msgs) > 1 and msgs[-1]["role"] == "assistant" \
                and not msgs[-1].get("tool_calls"):
            if msgs[-2]["role"] == "assistant":
                raise BadRequest("Cannot have 2 or more assistant messages at the end of the list.")
            prefill = msgs.pop()["content"]
        try:
            text = _compile(self.source).render(
                **(extra or {}),
                messages=msgs,
                bos_token=bos_token,
                eos_token=eos_token,
                add_generation_prompt=add_generation_prompt,
                tools=list(tools) if tools else None,
            )
            return text if prefill is None else text + prefill
        except BadRequest:
            raise
        except Exception as e:
            raise BadRequest(f"the chat template could not render these messages: {e}") from None

    def mentions(self, name: str) -> bool:
        """Whether the template's source uses this variable (e.g. ``enable_thinking``)."""
        return re.search(rf"\b{re.escape(name)}\b", self.source) is not None

    @functools.cached_property
    def renders_tools(self) -> bool:
        """Whether the template shows the tools it is given (else hearth describes them)."""
        probe = [{"type": "function", "function": {"name": "hearth_probe_tool_7f3a", "description": "",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        try:
            return "hearth_probe_tool_7f3a" in self.render([{"role": "user", "content": "hi"}], tools=probe)
        except BadRequest:
            return False

    @functools.cached_property
    def renders_tool_calls(self) -> bool:
        """Whether an assistant message's ``tool_calls`` appear in the prompt."""
        msgs = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "hearth_probe_call_7f3a", "arguments": {"a": 1}}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "probe-result-7f3a"}]
        try:
            out = self.render(msgs, add_generation_prompt=False)
        except BadRequest:
            return False
        return "hearth_probe_call_7f3a" in out


def fallback_for(architecture: str) -> ChatTemplate:
    arch = architecture.lower()
    if arch.startswith("gemma"):
        name, src = "gemma", GEMMA_TEMPLATE
    elif arch.startswith(("qwen", "smollm")):
        name, src = "chatml", CHATML_TEMPLATE
    else:
        name, src = "plain", PLAIN_TEMPLATE
    return ChatTemplate(src, name, tuple(FALLBACK_STOPS[name]))


def template_for(chat_template: str | None, architecture: str) -> ChatTemplate:
    if chat_template:
        return ChatTemplate(chat_template, "model")
    return fallback_for(architecture)


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise BadRequest("messages must be a list of {'role': ..., 'content': ...} objects")
    if not messages:
        raise BadRequest("messages must not be empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise BadRequest(f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            parts = []
            for p in content:
                if isinstance(p, Mapping) and p.get("type") in ("text", "input_text", "output_text"):
                    parts.append(str(p.get("text", "")))
                elif isinstance(p, str):
                    parts.append(p)
                else:
                    kind = p.get("type") if isinstance(p, Mapping) else type(p).__name__
                    raise BadRequest(f"messages[{i}].content: {kind!r} parts are not supported (text only)")
            content = "".join(parts)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string")
        msg = dict(m)
        msg["role"], msg["content"] = ("system" if role == "developer" else role), content
        if msg.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(msg["tool_calls"], i)
        else:
            msg.pop("tool_calls", None)
        out.append(msg)
    return out


def _tool_calls(calls: Any, i: int) -> list[dict[str, Any]]:
    """An assistant message's calls, with arguments as objects: templates write them
    with ``| tojson`` (llama.cpp does the same conversion)."""
    if not isinstance(calls, list):
        raise BadRequest(f"messages[{i}].tool_calls must be a list")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise BadRequest(f"messages[{i}].tool_calls[{j}].function.name must be a string")
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise BadRequest(f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON") from None
        if args is None:
            args = {}
        if not isinstance(args, Mapping):
            raise BadRequest(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object")
        out.append({"id": str(c.get("id") or f"call_{j}"), "type": "function",
                    "function": {"name": fn["name"], "arguments": dict(args)}})
    return out


def _raise(message: str) -> None:
    raise BadRequest(f"chat template: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson  # as transformers renders templates: not HTML-escaped
    try:
        return env.from_string(source)
    except Exception as e:
        raise BadRequest(f"the model's chat template does not compile: {e}") from None
