"""The HTTP server, end to end: a real uvicorn server on the real SmolLM2 model,
driven by the official openai and ollama clients (and raw httpx for the wire)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")
uvicorn = pytest.importorskip("uvicorn")

from hearth.server import create_app  # noqa: E402

N_CTX = 1024
CHAT = [{"role": "user", "content": "Name three colors."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """uvicorn in a background thread, until ``/health`` says ready."""

    def __init__(self, app) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        from hearth.server.http import config  # the limits `hearth serve` runs with

        self.server = uvicorn.Server(config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.app = app

    def model(self):
        """The hearth Model the server loaded (to look at tokens and slots)."""
        return self.app.state.pool.loaded()[0].model

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(smollm2_path: Path) -> Iterator[_Server]:
    app = create_app([str(smollm2_path)], load_options={"n_ctx": N_CTX})
    with _Server(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: _Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def oclient(server: _Server) -> ollama.Client:
    return ollama.Client(host=server.url)


def _chat(client, **kw):
    kw.setdefault("model", "smollm2")
    kw.setdefault("messages", CHAT)
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(**kw)


# -- OpenAI API ---------------------------------------------------------------------------


def test_health_is_ok_once_the_startup_model_is_loaded(server):
    r = httpx.get(f"{server.url}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_health_is_503_while_a_startup_model_cannot_load(tmp_path):
    app = create_app([str(tmp_path / "missing.gguf")])
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health")
                if r.json().get("status") == "error" or time.monotonic() > deadline:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        err = r.json()["error"]  # llama-server's error object
        assert r.status_code == 503 and "missing.gguf" in err["message"] and err["type"] == "unavailable_error"
    finally:
        srv.should_exit = True
        t.join(timeout=30)


def test_models_lists_the_loaded_and_installed_models(client, smollm2_path):
    ids = [m.id for m in client.models.list().data]
    assert smollm2_path.name in ids  # loaded at startup, by path
    assert "smollm2:135m" in ids


def test_completion_returns_text_and_usage(client):
    r = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_returns_an_assistant_message_with_usage(client):
    r = _chat(client)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == "smollm2"
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert r.usage.prompt_tokens > 5
    assert 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert isinstance(r.usage.prompt_tokens_details.cached_tokens, int)


def test_streaming_chat_gives_the_same_text_as_non_streaming_at_temperature_0(client):
    whole = _chat(client).choices[0].message.content
    chunks = list(_chat(client, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_include_usage_sends_a_final_chunk_with_usage(client):
    chunks = list(_chat(client, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    n_text = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    assert 0 < last.usage.completion_tokens <= 12 and n_text <= last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n_returns_indexed_choices(client):
    r = _chat(client, n=2, temperature=0.9, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.message.content for c in r.choices)
    chunks = list(_chat(client, n=2, stream=True, max_tokens=4))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}


def test_stop_string_ends_the_text_before_it(client):
    full = client.completions.create(model="smollm2", prompt="One, two, three,", max_tokens=16, temperature=0)
    text = full.choices[0].text
    stop = text.strip()[2:5]
    assert len(stop) == 3
    r = client.completions.create(model="smollm2", prompt="One, two, three,", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == text[: text.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_same_seed_gives_the_same_answer(client):
    a = _chat(client, temperature=1.0, seed=1234).choices[0].message.content
    b = _chat(client, temperature=1.0, seed=1234).choices[0].message.content
    assert a == b


def test_logit_bias_bans_a_token(client, server):
    prompt = "The capital of France is"
    first = client.completions.create(model="smollm2", prompt=prompt, max_tokens=1, temperature=0).choices[0].text
    (tok,) = server.model().tokenize(first, add_special=False)
    banned = client.completions.create(model="smollm2", prompt=prompt, max_tokens=1, temperature=0,
                                       logit_bias={str(tok): -100})
    assert banned.choices[0].text != first


def test_json_mode_output_parses_as_json(client):
    r = _chat(client, max_tokens=64, response_format={"type": "json_object"},
              messages=[{"role": "user", "content": "Give a JSON object with the key name set to Bob."}])
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens: still a JSON object so far
        assert text.lstrip().startswith("{")


def test_json_schema_output_follows_the_schema(client):
    schema = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
              "required": ["color"], "additionalProperties": False}
    r = _chat(client, max_tokens=32, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    assert json.loads(r.choices[0].message.content)["color"] in ("red", "green", "blue")


def test_a_one_model_server_answers_any_model_name_with_its_model(client):
    # llama-server's single-model mode: clients with hard-coded names keep working
    r = _chat(client, model="gpt-3.5-turbo")
    assert r.choices[0].message.content and r.usage.completion_tokens > 0


def test_prompt_longer_than_the_context_is_400_with_both_numbers(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt="hello " * 2000, max_tokens=4)
    msg = e.value.body["message"] if isinstance(e.value.body, dict) else str(e.value)
    numbers = [int(n) for n in re.findall(r"\d+", msg)]
    assert N_CTX in numbers and any(n > N_CTX for n in numbers), msg
    assert e.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize("bad", [{"max_tokens": -1}, {"temperature": -0.5}, {"top_p": 2}, {"logit_bias": {"x": 1}}])
def test_invalid_parameters_are_400(client, bad):
    with pytest.raises(openai.BadRequestError):
        _chat(client, **bad)


def test_malformed_json_is_400_in_the_openai_error_shape(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "JSON" in err["message"]


def test_oversized_body_is_413(server):
    r = httpx.post(f"{server.url}/v1/completions", content=b"x" * (9 * 1024 * 1024),
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def _endless(server: _Server) -> dict:
    """A request that, left alone, runs ~1000 tokens: end-of-generation tokens banned."""
    m = server.model()
    eog = {m.engine.model.eos, *m.tokenize("<|im_end|>", add_special=False)}
    return {"model": "smollm2", "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 1000, "temperature": 0,
            "logit_bias": {str(t): -100 for t in eog}}


def test_client_disconnecting_mid_stream_cancels_its_generation(server, client):
    body = {**_endless(server), "stream": True}
    scheduler = server.model().engine.scheduler
    with httpx.Client(timeout=60) as h, h.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        for i, _line in enumerate(r.iter_lines()):
            if i >= 6:
                break  # leave with the generation still running
        assert scheduler.active == 1
    deadline = time.monotonic() + 2  # uncancelled: ~6 s
    while scheduler.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert scheduler.active == 0  # the slot was freed, not run to max_tokens
    assert _chat(client, max_tokens=4).choices[0].message.content


def test_non_streaming_client_that_gives_up_cancels_its_generation(server):
    body = _endless(server)
    scheduler = server.model().engine.scheduler
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    deadline = time.monotonic() + 2  # uncancelled: ~6 s
    while scheduler.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert scheduler.active == 0


def test_api_key_is_required_on_every_route_but_health(smollm2_path):
    app = create_app([], api_key="sekrit", load_options={"n_ctx": N_CTX})
    with _Server(app) as s:
        assert httpx.get(f"{s.url}/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="wrong", max_retries=0).models.list()
        r = httpx.get(f"{s.url}/api/tags")
        assert r.status_code == 401 and isinstance(r.json()["error"], str)
        ok = openai.OpenAI(base_url=f"{s.url}/v1", api_key="sekrit", max_retries=0).models.list()
        assert ok.data
        assert ollama.Client(host=s.url, headers={"Authorization": "Bearer sekrit"}).list().models
        with pytest.raises(ollama.ResponseError) as e:
            ollama.Client(host=s.url).list()
        assert e.value.status_code == 401


# -- Ollama API ---------------------------------------------------------------------------


def test_ollama_list_and_show(oclient):
    names = [m.model for m in oclient.list().models]
    assert "smollm2:135m" in names
    info = oclient.show("smollm2")
    assert info.details.family == "llama" and info.details.format == "gguf"


def test_ollama_generate(oclient):
    r = oclient.generate(model="smollm2", prompt="Say hello.", options={"num_predict": 8, "temperature": 0})
    assert r.done and r.response
    assert r.done_reason in ("stop", "length")
    assert 0 < r.eval_count <= 8 and r.prompt_eval_count > 0
    assert r.total_duration > 0 and r.eval_duration > 0


def test_ollama_chat_and_its_stream_agree(oclient):
    opts = {"num_predict": 10, "temperature": 0}
    whole = oclient.chat(model="smollm2", messages=CHAT, options=opts, stream=False)
    assert whole.message.role == "assistant" and whole.message.content
    parts = list(oclient.chat(model="smollm2", messages=CHAT, options=opts, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count


def test_ollama_format_json(oclient):
    r = oclient.generate(model="smollm2", prompt="A JSON object with the key name set to Bob.", format="json",
                         options={"num_predict": 48, "temperature": 0})
    if r.done_reason == "stop":
        assert isinstance(json.loads(r.response), dict)
    else:
        assert r.response.lstrip().startswith("{")


def test_ollama_ps_and_version(server, oclient):
    loaded = oclient.ps().models
    assert loaded and loaded[0].size > 0
    v = httpx.get(f"{server.url}/api/version").json()
    assert re.match(r"\d+\.\d+", v["version"])


def test_ollama_unknown_model_on_a_one_model_server_gets_that_model(oclient):
    r = oclient.generate(model="llama3.2", prompt="hi", options={"num_predict": 3, "temperature": 0})
    assert r.response and r.eval_count > 0
