"""The server's embeddings, /metrics, keep-alive and eviction, and busy answers: a real
uvicorn server on the real SmolLM2 model, driven by the official openai and ollama clients."""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from test_server import N_CTX, _Server, client, oclient, server  # noqa: E402,F401  (shared fixtures)

from hearth.errors import BadRequest  # noqa: E402
from hearth.server import ModelPool, create_app  # noqa: E402
from hearth.server.pool import file_key, parse_keep_alive  # noqa: E402

N_EMBD = 576  # SmolLM2-135M


@pytest.fixture
def lazy_server(smollm2_path: Path) -> Iterator[_Server]:
    """A server with no startup model: models load on first use, with the default keep-alive."""
    with _Server(create_app([], load_options={"n_ctx": N_CTX})) as s:
        yield s


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _endless(model, max_tokens: int = 1000) -> dict:
    """A completion that runs ``max_tokens`` tokens: end-of-generation tokens banned."""
    eog = {model.engine.model.eos, *model.tokenize("<|im_end|>", add_special=False)}
    return {"model": "smollm2", "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": max_tokens, "temperature": 0,
            "logit_bias": {str(t): -100 for t in eog}, "stream": True}


def _ps(url: str) -> list[dict]:
    return httpx.get(f"{url}/api/ps").json()["models"]


def _wait(cond, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


# -- embeddings -----------------------------------------------------------------------------


def test_openai_embedding_of_a_string_is_a_unit_vector_of_n_embd(client):
    for fmt in ("float", None):  # None: the client asks for base64 and decodes it
        kw = {"encoding_format": fmt} if fmt else {}
        r = client.embeddings.create(model="smollm2", input="The sky is blue.", **kw)
        assert r.object == "list" and len(r.data) == 1 and r.data[0].index == 0
        v = r.data[0].embedding
        assert len(v) == N_EMBD and abs(_norm(v) - 1) < 1e-4
        assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens


def test_openai_embeddings_of_a_list_same_text_same_vector(client):
    texts = ["The sky is blue.", "Quantum chromodynamics describes quarks.", "The sky is blue."]
    r = client.embeddings.create(model="smollm2", input=texts, encoding_format="float")
    assert [d.index for d in r.data] == [0, 1, 2]
    a, b, c = (d.embedding for d in r.data)
    assert _dot(a, c) > 0.9999  # same text, same vector
    assert _dot(a, b) < 0.99  # different texts, different vectors
    single = client.embeddings.create(model="smollm2", input=texts[1], encoding_format="float")
    assert _dot(single.data[0].embedding, b) > 0.9999  # batching does not change a vector
    assert r.usage.prompt_tokens == 2 * client.embeddings.create(
        model="smollm2", input=texts[0]).usage.prompt_tokens + single.usage.prompt_tokens


def test_openai_embeddings_accept_token_lists(client, server):
    tokens = server.model().tokenize("The sky is blue.")
    r = client.embeddings.create(model="smollm2", input=[tokens], encoding_format="float")
    text = client.embeddings.create(model="smollm2", input="The sky is blue.", encoding_format="float")
    assert r.usage.prompt_tokens == len(tokens)
    assert _dot(r.data[0].embedding, text.data[0].embedding) > 0.9999


def test_embedding_input_longer_than_the_context_is_400_with_both_numbers(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="smollm2", input=["short", "hello " * 2000])
    msg = e.value.body["message"]
    numbers = [int(n) for n in re.findall(r"\d+", msg)]
    assert N_CTX in numbers and any(n > N_CTX for n in numbers), msg


def test_embedding_errors_are_in_the_openai_shape(server):
    r = httpx.post(f"{server.url}/v1/embeddings", json={"model": "smollm2", "input": []})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{server.url}/v1/embeddings", json={"model": "smollm2", "input": "x", "dimensions": 3})
    assert r.status_code == 400 and "576" in r.json()["error"]["message"]


def test_ollama_embed_matches_the_openai_vectors(oclient, client):
    r = oclient.embed(model="smollm2", input=["The sky is blue.", "Cats purr."])
    assert len(r.embeddings) == 2 and all(len(v) == N_EMBD for v in r.embeddings)
    assert all(abs(_norm(v) - 1) < 1e-4 for v in r.embeddings)
    assert r.prompt_eval_count > 0 and r.total_duration > 0
    o = client.embeddings.create(model="smollm2", input="The sky is blue.", encoding_format="float")
    assert _dot(r.embeddings[0], o.data[0].embedding) > 0.9999
    one = oclient.embed(model="smollm2", input="Cats purr.")
    assert _dot(one.embeddings[0], r.embeddings[1]) > 0.9999


def test_ollama_embed_truncates_unless_told_not_to(server, oclient):
    long = "hello " * 2000
    assert len(oclient.embed(model="smollm2", input=long).embeddings[0]) == N_EMBD
    r = httpx.post(f"{server.url}/api/embed", json={"model": "smollm2", "input": long, "truncate": False})
    assert r.status_code == 400 and str(N_CTX) in r.json()["error"]


# -- metrics --------------------------------------------------------------------------------


def _metrics(url: str, headers: dict | None = None) -> dict[str, float]:
    r = httpx.get(f"{url}/metrics", headers=headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_metrics_count_requests_and_tokens(server, client):
    model = server.model().name
    req_key = 'hearth_requests_total{api="openai",route="/v1/chat/completions",status="200"}'
    gen_key = f'hearth_generated_tokens_total{{model="{model}"}}'
    prompt_key = f'hearth_prompt_tokens_total{{model="{model}"}}'
    before = _metrics(server.url)
    results = [client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi!"}],
                                              max_tokens=5, temperature=0) for _ in range(2)]
    after = _metrics(server.url)
    assert after[req_key] - before.get(req_key, 0) == 2
    assert after[gen_key] - before.get(gen_key, 0) == sum(r.usage.completion_tokens for r in results)
    assert after[prompt_key] - before.get(prompt_key, 0) == sum(r.usage.prompt_tokens for r in results)
    ttft = f'hearth_time_to_first_token_seconds_count{{model="{model}"}}'
    assert after[ttft] - before.get(ttft, 0) == 2
    assert f'hearth_generation_tokens_per_second_count{{model="{model}"}}' in after
    assert after[f'hearth_slots{{model="{model}"}}'] == server.model().plan.parallel
    assert after[f'hearth_queue_depth{{model="{model}"}}'] == 0
    assert after["hearth_models_loaded"] == 1
    missing = 'hearth_requests_total{api="hearth",route="other",status="404"}'
    httpx.get(f"{server.url}/no/such/route")
    assert _metrics(server.url)[missing] >= 1


def test_metrics_need_the_api_key():
    with _Server(create_app([], api_key="sekrit")) as s:
        assert httpx.get(f"{s.url}/metrics").status_code == 401
        m = _metrics(s.url, {"Authorization": "Bearer sekrit"})
        assert m['hearth_requests_total{api="hearth",route="/metrics",status="401"}'] == 1


# -- keep-alive -----------------------------------------------------------------------------


def test_keep_alive_0_unloads_after_the_request_and_the_next_request_reloads(lazy_server):
    o = ollama.Client(host=lazy_server.url)
    r = o.generate(model="smollm2", prompt="Hi", options={"num_predict": 2}, keep_alive=0)
    assert r.done
    assert _ps(lazy_server.url) == []
    r = o.generate(model="smollm2", prompt="Hi", options={"num_predict": 2})
    assert r.load_duration > 0
    (m,) = _ps(lazy_server.url)
    assert m["size"] > 0
    left = o.ps().models[0].expires_at.timestamp() - time.time()
    assert 240 < left <= 300  # the default keep-alive, 5 minutes


def test_short_keep_alive_expires(lazy_server):
    o = ollama.Client(host=lazy_server.url)
    o.generate(model="smollm2", prompt="Hi", options={"num_predict": 2}, keep_alive="1s")
    assert len(_ps(lazy_server.url)) == 1
    assert _wait(lambda: _ps(lazy_server.url) == [], 5)


def test_a_model_with_a_stream_in_flight_is_not_unloaded(lazy_server):
    o = ollama.Client(host=lazy_server.url)
    o.generate(model="smollm2", prompt="")  # load it
    model = lazy_server.app.state.pool.loaded()[0].model
    body = _endless(model, max_tokens=150)
    with httpx.Client(timeout=60) as h, h.stream("POST", f"{lazy_server.url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        # another request asks to unload it when done: not while the stream runs
        o.generate(model="smollm2", prompt="Hi", options={"num_predict": 2}, keep_alive=0)
        time.sleep(0.3)
        assert len(_ps(lazy_server.url)) == 1
        rest = [x for x in lines if x]
    assert rest[-1] == "data: [DONE]" and not any("error" in x for x in rest)
    assert _wait(lambda: _ps(lazy_server.url) == [], 5)  # then it goes, as asked


def test_keep_alive_values_parse():
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive("30s") == 30 and parse_keep_alive("250ms") == 0.25
    assert parse_keep_alive(0) == 0 and parse_keep_alive("10") == 10 and parse_keep_alive(2.5) == 2.5
    assert parse_keep_alive(-1) is None and parse_keep_alive("-1m") is None
    for bad in ("5 minutes", "m", "", True):
        with pytest.raises(BadRequest):
            parse_keep_alive(bad)


def test_bad_keep_alive_is_400(server):
    r = httpx.post(f"{server.url}/api/generate", json={"model": "smollm2", "prompt": "", "keep_alive": "soon"})
    assert r.status_code == 400 and "keep_alive" in r.json()["error"]


# -- the pool: one load for concurrent first requests, eviction by memory ------------------


def test_concurrent_first_requests_load_once_and_memory_evicts_the_idle_lru(smollm2_path, tmp_path):
    other = tmp_path / "other.gguf"
    shutil.copy(smollm2_path, other)  # another file (a hard link would be the same model)
    room = {"bytes": 1 << 50}

    async def main() -> None:
        pool = ModelPool({"n_ctx": 256}, keep_alive="5m", available_ram=lambda: room["bytes"],
                         models_dirs=[smollm2_path.parent, tmp_path])
        try:
            leases = await asyncio.gather(*(pool.acquire(str(smollm2_path)) for _ in range(3)))
            assert len({id(x.entry) for x in leases}) == 1 and len(pool.loaded()) == 1
            room["bytes"] = 0  # from now on nothing fits beside anything
            b = await pool.acquire(str(other))  # the first model is leased: kept
            assert len(pool.loaded()) == 2
            for x in leases:
                x.release()
            b.release()
            first = leases[0].entry
            first.last_used -= 10  # make it the least recently used
            third = tmp_path / "third.gguf"
            shutil.copy(other, third)
            c = await pool.acquire(str(third))  # idle LRU go first, until none is left idle
            c.release()
            assert [e.key for e in pool.loaded()] == [file_key(third)]
            await asyncio.sleep(0.5)  # models are freed in a worker
            assert first.model.engine.scheduler._closed
        finally:
            await pool.aclose()

    asyncio.run(main())


# -- busy -----------------------------------------------------------------------------------


def test_a_full_queue_is_503_with_retry_after_in_both_apis(smollm2_path, monkeypatch):
    monkeypatch.setenv("HEARTH_MAX_QUEUE", "0")
    app = create_app([str(smollm2_path)], load_options={"n_ctx": N_CTX, "parallel": 1})
    with _Server(app) as s:
        body = _endless(s.model(), max_tokens=400)
        with httpx.Client(timeout=60) as h, h.stream("POST", f"{s.url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            r2 = httpx.post(f"{s.url}/v1/chat/completions",
                            json={"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]})
            assert r2.status_code == 503 and r2.headers["retry-after"] == "1"
            assert r2.json()["error"]["code"] == "busy"
            with pytest.raises(openai.InternalServerError) as e:
                openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0).completions.create(
                    model="smollm2", prompt="hi", max_tokens=2)
            assert e.value.status_code == 503
            r3 = httpx.post(f"{s.url}/api/generate", json={"model": "smollm2", "prompt": "hi"})
            assert r3.status_code == 503 and r3.headers["retry-after"] == "1"
            assert isinstance(r3.json()["error"], str)
            with pytest.raises(ollama.ResponseError) as oe:
                ollama.Client(host=s.url).generate(model="smollm2", prompt="hi", stream=False)
            assert oe.value.status_code == 503
