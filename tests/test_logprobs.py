"""Log probabilities on every API that has them, computed only when asked: OpenAI chat
(``logprobs`` + ``top_logprobs``, streamed too), legacy completions (``logprobs: n``), and
Ollama's ``logprobs``/``top_logprobs``; the numbers checked against llama-server's on the
same model and request. Real server, real SmolLM2, official clients."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

from hearth.server import create_app  # noqa: E402
from llama_reference import llama_server  # noqa: E402
from test_server import _Server  # noqa: E402

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2_path: Path) -> Iterator[_Server]:
    env = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("HEARTH_")]}
    try:
        with _Server(create_app([str(smollm2_path)], aliases=["smollm2"],
                                load_options={"n_ctx": 512, "parallel": 2})) as s:
            yield s
    finally:
        os.environ.update(env)


@pytest.fixture(scope="module")
def client(server: _Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def _check_entries(entries, text: str, n_top: int) -> None:
    assert "".join(e.token for e in entries) == text
    for e in entries:
        assert e.logprob <= 0 and bytes(e.bytes).decode("utf-8", "replace") == e.token
        assert len(e.top_logprobs) == n_top
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        if n_top:  # greedy: the chosen token is the most likely one
            assert e.top_logprobs[0].token == e.token and math.isclose(tops[0], e.logprob)
    # probabilities, not scores: the alternatives' mass is at most 1
    assert all(sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1 + 1e-6 for e in entries)


def test_chat_logprobs_and_top_logprobs(client: openai.OpenAI):
    r = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    _check_entries(entries, r.choices[0].message.content, 3)
    # not asked: not computed, not sent
    plain = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_streamed_chat_logprobs_match(client: openai.OpenAI):
    whole = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=2)
    streamed = []
    for ev in client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=8, temperature=0,
                                             logprobs=True, top_logprobs=2, stream=True):
        if ev.choices and ev.choices[0].logprobs and ev.choices[0].logprobs.content:
            streamed.extend(ev.choices[0].logprobs.content)
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [
        (e.token, round(e.logprob, 5)) for e in whole.choices[0].logprobs.content]


def test_completion_logprobs_shape_and_offsets(client: openai.OpenAI):
    prompt = "The capital of France is"
    r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=5, temperature=0, logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert lp.text_offset[0] == len(prompt)  # echo: offsets count the prompt
    assert all(b > a for a, b in zip(lp.text_offset, lp.text_offset[1:]))
    assert r.choices[0].text == prompt + "".join(lp.tokens)
    assert all(len(t) == 2 and max(t.values()) == pytest.approx(v) for t, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_ollama_logprobs(server: _Server):
    c = ollama.Client(host=server.url)
    r = c.chat(model="smollm2", messages=CHAT, logprobs=True, top_logprobs=2,
               options={"temperature": 0, "num_predict": 6})
    assert len(r.logprobs) == r.eval_count
    assert "".join(e.token for e in r.logprobs) == r.message.content
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in r.logprobs)
    streamed = [e for ch in c.generate(model="smollm2", prompt="The capital of France is", logprobs=True,
                                       options={"temperature": 0, "num_predict": 6}, stream=True)
                for e in (ch.logprobs or [])]
    assert len(streamed) == 6


@pytest.mark.parametrize("body", [{"logprobs": True, "top_logprobs": 21}, {"top_logprobs": 2}])
def test_bad_logprobs_requests_are_400s(server: _Server, body: dict):
    r = httpx.post(f"{server.url}/v1/chat/completions",
                   json={"model": "smollm2", "messages": CHAT, "max_tokens": 2, **body}, timeout=60)
    assert r.status_code == 400 and "top_logprobs" in r.json()["error"]["message"]


def test_logprobs_equal_llama_servers(smollm2_path: Path, client: openai.OpenAI):
    """Same model, same request, greedy: the same tokens with the same log probabilities."""
    ours = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=3).choices[0].logprobs.content
    with llama_server(smollm2_path, 512) as ref:
        theirs = openai.OpenAI(base_url=f"{ref}/v1", api_key="none", max_retries=0).chat.completions.create(
            model="x", messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
        ).choices[0].logprobs.content
    assert [e.token for e in ours] == [e.token for e in theirs]
    for a, b in zip(ours, theirs):
        assert a.logprob == pytest.approx(b.logprob, abs=0.02)
        assert [t.token for t in a.top_logprobs] == [t.token for t in b.top_logprobs]
