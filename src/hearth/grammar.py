"""Grammars and JSON schemas from clients, bounded before they reach llama.cpp.

llama.cpp's GBNF parser recurses once per nesting level and expands ``x{m,n}`` into
rules, and llama-cpp-python's schema converter writes ``maxLength: N`` as N nested
groups: a 100-byte schema with ``"maxLength": 20000`` overflowed the stack and killed
the server. Real agent tools do carry such schemas (``{"type": "string", "maxLength":
65536}``), so they are not refused: an upper bound above ``MAX_SCHEMA_BOUND`` is left
out of the grammar (the length is then bounded by ``max_tokens``, as with any string),
and what remains is checked against limits that name themselves in the 400.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from .errors import BadRequest

MAX_GRAMMAR_BYTES = 512 * 1024
MAX_RULES = 10_000
MAX_NESTING = 1_100  # parentheses; llama.cpp's parser recurses per level (20,000 crashed it)
MAX_REPETITION = 10_000  # the n of x{m,n}; each repetition becomes rules
MAX_SCHEMA_DEPTH = 64
MAX_SCHEMA_BOUND = 1_000  # maxLength, maxItems, ... above this are not put in the grammar
MAX_SCHEMA_MIN = 1_000  # minLength, minItems above this cannot be expressed within bounds

_UPPER = ("maxLength", "maxItems", "maxProperties", "maxContains")
_LOWER = ("minLength", "minItems", "minProperties", "minContains")


def check_grammar(text: str) -> None:
    """Refuse a GBNF grammar past the limits, naming the limit. Not a full parser:
    llama.cpp still says whether it is valid; this bounds what it may cost to find out."""
    if not isinstance(text, str):
        raise BadRequest("grammar must be a string (GBNF)")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_GRAMMAR_BYTES:
        raise BadRequest(f"grammar is {size} bytes; the limit is {MAX_GRAMMAR_BYTES}")
    depth = deepest = rules = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":  # a comment, to the end of the line
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif c == '"' or c == "[":  # a literal or a character class, with escapes
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and text[i] != close:
                i += 2 if text[i] == "\\" else 1
        elif c == "(":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_NESTING:
                    raise BadRequest(f"grammar nests groups more than {MAX_NESTING} deep")
        elif c == ")":
            depth -= 1
        elif c == "{":
            j = text.find("}", i)
            body = text[i + 1 : j if j >= 0 else n]
            for part in body.split(","):
                part = part.strip()
                if part.isdigit() and int(part) > MAX_REPETITION:
                    raise BadRequest(f"grammar repeats {part} times in {{{body}}}; the limit is {MAX_REPETITION}")
            i = n if j < 0 else j
        elif c == ":" and text.startswith("::=", i):
            rules += 1
            if rules > MAX_RULES:
                raise BadRequest(f"grammar has more than {MAX_RULES} rules")
            i += 2
        i += 1


def bound_schema(schema: Any) -> Any:
    """A copy of ``schema`` whose cost in grammar is bounded: large upper bounds left
    out, large lower bounds and deep nesting refused (400)."""

    def walk(node: Any, depth: int) -> Any:
        if depth > MAX_SCHEMA_DEPTH:
            raise BadRequest(f"json schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(node, list):
            return [walk(x, depth + 1) for x in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for k, v in node.items():
            if k in _UPPER and _is_int(v) and v > MAX_SCHEMA_BOUND:
                continue  # bounded by max_tokens instead
            if k in _LOWER and _is_int(v) and v > MAX_SCHEMA_MIN:
                raise BadRequest(f"json schema {k} {v} is above {MAX_SCHEMA_MIN}, which grammars cannot enforce")
            out[k] = walk(v, depth + 1)
        return out

    return walk(copy.deepcopy(schema), 0)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def schema_to_grammar(schema: dict | str) -> str:
    """A JSON schema (object or its text) as bounded GBNF (llama-cpp-python's converter)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"json schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise BadRequest("json schema must be a JSON object")
    try:
        text = json_schema_to_gbnf(json.dumps(bound_schema(schema)))
    except BadRequest:
        raise
    except RecursionError:
        raise BadRequest(f"json schema nests deeper than {MAX_SCHEMA_DEPTH} levels") from None
    except Exception as e:  # noqa: BLE001 - the converter raises assorted errors
        raise BadRequest(f"invalid JSON schema: {' '.join(str(e).split())[:300]}") from None
    check_grammar(text)
    return text
