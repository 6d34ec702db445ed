"""llama-server's other sampling fields (typical_p, Mirostat, XTC, DRY, dynamic temperature,
top-n-sigma, min_keep, the ``samplers`` order, ``n_probs``): the same request with the same
seed gives llama-server's text on the same model; bad values are a 400 naming the field;
Ollama's ``mirostat``/``typical_p`` options reach the sampler. Real server, real SmolLM2,
real llama-server; no mocks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from hearth.errors import BadRequest  # noqa: E402
from hearth.server import create_app  # noqa: E402
from hearth.types import DEFAULT_SAMPLERS, GenerationParams  # noqa: E402
from llama_reference import llama_server  # noqa: E402
from test_server import _Server  # noqa: E402

N_CTX = 512
STORY = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
# a prompt that invites repetition, for DRY (its sequences are in the prompt: DRY must see it)
LOOP = "red green blue, red green blue, red green blue, red green blue, red green"
BASE = {"max_tokens": 24, "temperature": 0.8, "seed": 42, "cache_prompt": False}

# sampler family -> (prompt, the fields it adds to BASE)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "typical_p": (STORY, {"typical_p": 0.5}),
    "typical_p at temperature 0": (STORY, {"typical_p": 0.3, "temperature": 0}),
    "mirostat 1": (STORY, {"mirostat": 1, "mirostat_tau": 3.0, "mirostat_eta": 0.2}),
    "mirostat 2": (STORY, {"mirostat": 2, "mirostat_tau": 3.0, "mirostat_eta": 0.2}),
    "mirostat 2 at temperature 0": (STORY, {"mirostat": 2, "temperature": 0}),
    "xtc": (STORY, {"xtc_probability": 0.9, "xtc_threshold": 0.05}),
    "dry": (LOOP, {"dry_multiplier": 1.0, "dry_allowed_length": 1, "dry_sequence_breakers": ["\n"]}),
    "dry at temperature 0": (LOOP, {"dry_multiplier": 1.0, "dry_allowed_length": 1, "temperature": 0}),
    "dry and penalties": (LOOP, {"dry_multiplier": 0.8, "repeat_penalty": 1.3, "dry_penalty_last_n": 16}),
    "dynatemp": (STORY, {"dynatemp_range": 0.7, "dynatemp_exponent": 0.5}),
    "top_n_sigma": (STORY, {"top_n_sigma": 0.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0}),
    "min_keep": (STORY, {"min_p": 0.9, "min_keep": 4}),
    "samplers order (names)": (STORY, {"samplers": ["min_p", "temperature", "top_p", "top_k"], "min_p": 0.02,
                                       "temperature": 1.4}),
    "samplers order (codes)": (STORY, {"samplers": "tk", "temperature": 1.5, "top_k": 3}),
}


@pytest.fixture(scope="module")
def server(smollm2_path: Path) -> Iterator[_Server]:
    env = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("HEARTH_")]}
    try:
        with _Server(create_app([str(smollm2_path)], aliases=["smollm2"],
                                load_options={"n_ctx": N_CTX, "parallel": 1})) as s:
            yield s
    finally:
        os.environ.update(env)


@pytest.fixture(scope="module")
def reference(smollm2_path: Path) -> Iterator[str]:
    with llama_server(smollm2_path, N_CTX) as url:
        yield url


def _complete(url: str, prompt: str, **fields: Any) -> str:
    r = httpx.post(f"{url}/v1/completions", json={"model": "smollm2", "prompt": prompt, **fields}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_sampler_family_gives_llama_servers_text(family: str, server: _Server, reference: str):
    prompt, fields = FAMILIES[family]
    body = {**BASE, **fields}
    ours = _complete(server.url, prompt, **body)
    theirs = _complete(reference, prompt, **body)
    assert ours == theirs
    assert ours == _complete(server.url, prompt, **body)  # seeded: the same text again
    # and the sampler did something: without its fields, another text (same seed); Mirostat
    # at temperature 0 is greedy, as in llama.cpp (temperature 0 leaves it one token)
    plain = _complete(server.url, prompt, **{**BASE, **{k: v for k, v in fields.items() if k == "temperature"}})
    if family == "mirostat 2 at temperature 0":
        assert ours == plain
    else:
        assert ours != plain, f"{family} changed nothing"


def test_default_fields_spelled_out_change_nothing(server: _Server, reference: str):
    """llama.cpp's defaults sent explicitly are the same request as none of them."""
    defaults = {"typical_p": 1.0, "mirostat": 0, "xtc_probability": 0.0, "dry_multiplier": 0.0,
                "dynatemp_range": 0.0, "top_n_sigma": -1.0, "min_keep": 0, "samplers": list(DEFAULT_SAMPLERS)}
    plain = _complete(server.url, STORY, **BASE)
    assert _complete(server.url, STORY, **BASE, **defaults) == plain == _complete(reference, STORY, **BASE)


def test_n_probs_means_logprobs_on_the_openai_routes(server: _Server):
    chat = httpx.post(f"{server.url}/v1/chat/completions", json={
        "model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
        "n_probs": 2}, timeout=300).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert content and all(len(e["top_logprobs"]) == 2 for e in content)
    comp = httpx.post(f"{server.url}/v1/completions", json={
        "model": "smollm2", "prompt": STORY, "max_tokens": 4, "temperature": 0, "n_probs": 3}, timeout=300).json()
    assert all(len(t) == 3 for t in comp["choices"][0]["logprobs"]["top_logprobs"])
    # OpenAI's own fields win; n_probs 0 is none
    chat = httpx.post(f"{server.url}/v1/chat/completions", json={
        "model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
        "n_probs": 0}, timeout=300).json()
    assert chat["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema", "schema": {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}},
                                       "required": ["color"], "additionalProperties": False}},
    {"type": "json_object", "schema": {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}},
                                       "required": ["color"], "additionalProperties": False}},
])
def test_response_format_with_the_schema_inline(fmt: dict[str, Any], server: _Server):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={
        "model": "smollm2", "messages": [{"role": "user", "content": "Pick a color, as JSON."}],
        "max_tokens": 32, "temperature": 0, "response_format": fmt}, timeout=300)
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["choices"][0]["message"]["content"])["color"] in ("red", "blue")


@pytest.mark.parametrize(("field", "value"), [
    ("mirostat", 3),
    ("typical_p", 2),
    ("samplers", ["top_k", "warp_drive"]),
    ("samplers", "kz"),
    ("dry_sequence_breakers", ["x"] * 1000),
    ("dry_sequence_breakers", ["y" * 5000]),
    ("dry_base", 0.5),
    ("xtc_probability", -0.1),
    ("n_probs", 1000),
])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_bad_values_are_a_400_naming_the_field(route: str, field: str, value: Any, server: _Server):
    body = {"model": "smollm2", "max_tokens": 2, field: value}
    body.update({"messages": [{"role": "user", "content": "Hi"}]} if "chat" in route else {"prompt": "Hi"})
    r = httpx.post(f"{server.url}{route}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert field in err["message"] and err["type"] == "invalid_request_error"
    if field == "samplers":
        assert "top_p" in err["message"]  # the known names are listed


def test_ollama_options_reach_the_sampler(server: _Server):
    def generate(**options: Any) -> str:
        r = httpx.post(f"{server.url}/api/generate", json={
            "model": "smollm2", "prompt": STORY, "raw": True, "stream": False,
            "options": {"seed": 1, "temperature": 0.9, "num_predict": 24, **options}}, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["response"]

    plain = generate()
    miro = generate(mirostat=2, mirostat_tau=2.0, mirostat_eta=0.3)
    typical = generate(typical_p=0.3)
    assert miro == generate(mirostat=2, mirostat_tau=2.0, mirostat_eta=0.3)  # seeded
    assert typical == generate(typical_p=0.3)
    assert len({plain, miro, typical}) == 3
    r = httpx.post(f"{server.url}/api/generate", json={"model": "smollm2", "prompt": "Hi", "stream": False,
                                                       "options": {"mirostat": 7}}, timeout=60)
    assert r.status_code == 400 and "mirostat" in r.json()["error"]


def test_generation_params_check_and_mean_llama_cpps_values():
    for bad in ({"mirostat": 3}, {"typical_p": 1.5}, {"samplers": ["nope"]}, {"samplers": "k?"},
                {"dry_sequence_breakers": []}, {"dry_sequence_breakers": ["a"] * 17}, {"dry_base": 0.9},
                {"min_keep": -1}, {"top_n_sigma": float("nan")}, {"dry_penalty_last_n": -2}):
        with pytest.raises(BadRequest, match=next(iter(bad))):
            GenerationParams(**bad)
    # names, aliases and codes all become llama.cpp's canonical names
    assert GenerationParams(samplers=["Top-K", "nucleus", "temp", "typ"]).samplers == [
        "top_k", "top_p", "temperature", "typ_p"]
    assert GenerationParams(samplers="edskypmxt").samplers == list(DEFAULT_SAMPLERS)

    def greedy(**kw: Any) -> bool:
        return GenerationParams(**kw).resolve().greedy

    assert greedy(temperature=0) and greedy(top_k=1) and greedy(temperature=0, mirostat=2)
    assert greedy(temperature=0, dry_multiplier=0.8)  # DRY changes logits; the pick is still the top one
    assert not greedy(top_k=1, mirostat=1)  # Mirostat replaces top_k
    assert not greedy(temperature=0, typical_p=0.5)  # typical may drop the top token first
    assert not greedy(temperature=0, dynatemp_range=0.5)  # the temperature then varies above 0
    assert not greedy(temperature=0, samplers=["top_k"])  # no temperature in the chain: dist at 1.0
