"""llama.cpp's built-in chat templates by name, as Jinja, for ``--chat-template NAME``.

llama-server accepts a template name from ``src/llama-chat.cpp`` (``chatml``, ``llama3``,
...) where a Jinja template would go; hearth renders every template with Jinja, so each
name here is a Jinja text that writes what llama.cpp's C++ writes for it (without a BOS:
the tokenizer adds the model's). Each has the stop strings that end its turns, since a
model given another family's template may not treat those markers as end of generation.
"""

from __future__ import annotations

from dataclasses import dataclass

from .chat import CHATML_TEMPLATE, ChatTemplate
from .errors import BadRequest

_SYSTEM_NS = "{% set sys = namespace(text='') %}"


@dataclass(frozen=True)
class Builtin:
    source: str
    stop: tuple[str, ...]


def _each(turn: str, generation: str) -> str:
    """A template that writes ``turn`` for every message (``m``) and ``generation`` at the end."""
    return ("{% for m in messages %}{{ " + turn + " }}{% endfor %}"
            "{% if add_generation_prompt %}{{ " + repr(generation) + " }}{% endif %}")


BUILTINS: dict[str, Builtin] = {
    "chatml": Builtin(CHATML_TEMPLATE, ("<|im_end|>",)),
    "llama3": Builtin(_each("'<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim"
                            " + '<|eot_id|>'", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
                      ("<|eot_id|>",)),
    "gemma": Builtin(
        # no system role: its text goes before the next user turn's
        _SYSTEM_NS
        + "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set sys.text = sys.text + m['content'] | trim %}"
        "{% else %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' }}"
        "{% if sys.text and role != 'model' %}{{ sys.text + '\\n\\n' }}{% set sys.text = '' %}{% endif %}"
        "{{ m['content'] | trim + '<end_of_turn>\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
        ("<end_of_turn>",)),
    "mistral-v7": Builtin(
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ '[SYSTEM_PROMPT] ' + m['content'] + '[/SYSTEM_PROMPT]' }}"
        "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + '[/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + '</s>' }}{% endif %}"
        "{% endfor %}", ("</s>",)),
    "mistral-v7-tekken": Builtin(
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + m['content'] + '[/SYSTEM_PROMPT]' }}"
        "{% elif m['role'] == 'user' %}{{ '[INST]' + m['content'] + '[/INST]' }}"
        "{% else %}{{ m['content'] + '</s>' }}{% endif %}"
        "{% endfor %}", ("</s>",)),
    "phi3": Builtin(_each("'<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n'", "<|assistant|>\n"),
                    ("<|end|>",)),
    "phi4": Builtin(_each("'<|im_start|>' + m['role'] + '<|im_sep|>' + m['content'] + '<|im_end|>'",
                          "<|im_start|>assistant<|im_sep|>"), ("<|im_end|>",)),
    "falcon3": Builtin(_each("'<|' + m['role'] + '|>\\n' + m['content'] + '\\n'", "<|assistant|>\n"),
                       ("\n<|user|>",)),
    "zephyr": Builtin(_each("'<|' + m['role'] + '|>\\n' + m['content'] + '<|endoftext|>\\n'", "<|assistant|>\n"),
                      ("<|endoftext|>",)),
    "vicuna": Builtin(
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
        "{% elif m['role'] == 'user' %}{{ 'USER: ' + m['content'] + '\\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ 'ASSISTANT: ' + m['content'] + '</s>\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}", ("</s>", "\nUSER:")),
    "deepseek": Builtin(
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ '### Response:\\n' + m['content'] + '\\n<|EOT|>\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}", ("<|EOT|>",)),
    "deepseek3": Builtin(
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
        "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
        "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}", ("<｜end▁of▁sentence｜>",)),
    "command-r": Builtin(
        "{% set tags = {'system': '<|SYSTEM_TOKEN|>', 'user': '<|USER_TOKEN|>', 'assistant': '<|CHATBOT_TOKEN|>'} %}"
        "{% for m in messages %}{% if m['role'] in tags %}"
        "{{ '<|START_OF_TURN_TOKEN|>' + tags[m['role']] + m['content'] | trim + '<|END_OF_TURN_TOKEN|>' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}",
        ("<|END_OF_TURN_TOKEN|>",)),
    "granite": Builtin(_each("'<|start_of_role|>' + m['role'] + '<|end_of_role|>' + m['content']"
                             " + '<|end_of_text|>\\n'", "<|start_of_role|>assistant<|end_of_role|>"),
                       ("<|end_of_text|>",)),
}
_BY_SOURCE = {b.source: (name, b) for name, b in BUILTINS.items()}


def looks_like_jinja(text: str) -> bool:
    return "{{" in text or "{%" in text


def resolve_chat_template(value: str, what: str = "--chat-template") -> str:
    """A built-in name or Jinja text -> the Jinja text, checked: it compiles and renders a
    one-message conversation. Anything else is a ``BadRequest`` naming the known names."""
    name = value.strip()
    if name.lower() in BUILTINS:
        return BUILTINS[name.lower()].source
    if not looks_like_jinja(value):
        raise BadRequest(f"{what} {name[:60]!r} is neither a known template name nor Jinja text; "
                         f"known names: {', '.join(BUILTINS)}")
    try:
        as_template(value).render([{"role": "user", "content": "hi"}])
    except BadRequest as e:
        raise BadRequest(f"{what}: not a usable Jinja chat template: {' '.join(str(e).split())}") from None
    return value


def as_template(text: str) -> ChatTemplate:
    """The ChatTemplate for an override's text: a built-in keeps its stop strings and is
    treated as a plain template (tools described in the prompt); any other text is read
    like a model's own template (its tool-call format detected)."""
    hit = _BY_SOURCE.get(text)
    if hit is not None:
        return ChatTemplate(hit[1].source, f"builtin:{hit[0]}", hit[1].stop)
    return ChatTemplate(text, "model")
