"""One request path: every id the server lists works on every route, one load per file,
a model's own defaults reach both APIs, one table of defaults per front end, loads one
at a time, and the bugs found when real clients drove the server.

Real server (uvicorn), real SmolLM2 on the real llama.cpp, official openai and ollama
clients.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

import hearth  # noqa: E402
from hearth.errors import EngineError  # noqa: E402
from hearth.server import ModelPool, create_app  # noqa: E402
from hearth.server import pool as pool_module  # noqa: E402
from hearth.server.pool import file_key  # noqa: E402
from hearth.types import FRONTEND_DEFAULTS, GenerationParams, resolve_params  # noqa: E402
from test_server import _Server  # noqa: E402

CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def isolated_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """No user config, an empty Ollama store, hearth's own home: the listing is ours."""
    root = tmp_path_factory.mktemp("env")
    with pytest.MonkeyPatch.context() as mp:
        for k in list(os.environ):
            if k.startswith("HEARTH_"):
                mp.delenv(k)
        mp.setenv("HEARTH_HOME", str(root / "home"))
        mp.setenv("HEARTH_CONFIG", str(root / "absent.toml"))
        mp.setenv("OLLAMA_MODELS", str(root / "ollama"))
        mp.setenv("HF_HUB_CACHE", str(root / "hf"))
        mp.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
        yield root


@pytest.fixture(scope="module")
def model_copy(isolated_env: Path, smollm2_path: Path) -> Path:
    """A file of our own (so deleting it later hurts nobody), named like a user's download."""
    p = isolated_env / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shutil.copyfile(smollm2_path, p)
    return p


@pytest.fixture(scope="module")
def by_path(model_copy: Path) -> Iterator[_Server]:
    """``hearth serve --model /path/to/file.gguf --models-dir <its dir>``, no alias."""
    app = create_app([str(model_copy)], load_options={"n_ctx": 512, "parallel": 2},
                     models_dirs=[str(model_copy.parent)])
    with _Server(app) as s:
        yield s


def _ids(url: str) -> tuple[list[str], list[str], list[str]]:
    oc = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
    olc = ollama.Client(host=url)
    return ([m.id for m in oc.models.list().data], [m.model for m in olc.list().models],
            [m.model for m in olc.ps().models])


def _every_route(url: str, name: str) -> None:
    """One request per route with this model id, through the official clients."""
    oc = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
    olc = ollama.Client(host=url)
    assert oc.models.retrieve(name).id == name
    r = oc.chat.completions.create(model=name, messages=CHAT, max_tokens=4, temperature=0)
    assert r.model == name and r.choices[0].message.content
    assert oc.completions.create(model=name, prompt="Hello", max_tokens=3, temperature=0).choices[0].text
    assert len(oc.embeddings.create(model=name, input="hello").data[0].embedding) > 0
    assert olc.generate(model=name, prompt="Hi", options={"num_predict": 3, "temperature": 0}).eval_count >= 1
    assert olc.chat(model=name, messages=CHAT, options={"num_predict": 3}).message.content is not None
    assert len(olc.embed(model=name, input="hello").embeddings[0]) > 0
    assert olc.show(name).details.family in ("llama", "gemma3")


def test_a_model_served_by_path_is_listed_by_a_name_every_route_accepts(by_path: _Server, model_copy: Path):
    v1, tags, ps = _ids(by_path.url)
    assert v1[0] == model_copy.name == tags[0] and ps == [model_copy.name]
    for name in dict.fromkeys([*v1, *tags, *ps]):  # every listed id, on every route of both APIs
        _every_route(by_path.url, name)


def test_one_file_by_path_name_stem_symlink_and_proc_root_is_one_load(by_path: _Server, model_copy: Path,
                                                                      isolated_env: Path):
    import psutil

    link = isolated_env / "link.gguf"
    if not link.exists():
        link.symlink_to(model_copy)
    rss0 = psutil.Process().memory_info().rss
    oc = openai.OpenAI(base_url=f"{by_path.url}/v1", api_key="x", max_retries=0, timeout=120)
    for name in (str(model_copy), model_copy.name, model_copy.stem, str(link),
                 f"/proc/self/root{model_copy}", f"{model_copy.parent}/./{model_copy.name}"):
        r = oc.chat.completions.create(model=name, messages=CHAT, max_tokens=2, temperature=0)
        assert r.model == name
    loaded = [e for e in by_path.app.state.pool.loaded() if e.key == file_key(model_copy)]
    assert len(loaded) == 1  # (other tests may have loaded other models beside it)
    assert [m.model for m in ollama.Client(host=by_path.url).ps().models].count(model_copy.name) == 1
    # a second copy of a 100 MB model would show; allow for allocator noise
    assert psutil.Process().memory_info().rss - rss0 < 60 * 2**20


def test_empty_model_means_the_default_model_on_both_apis(by_path: _Server):
    r = httpx.post(f"{by_path.url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{by_path.url}/v1/chat/completions", json={"model": "", "messages": CHAT, "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{by_path.url}/api/generate", json={"model": "", "prompt": "Hi", "stream": False,
                                                        "options": {"num_predict": 2}}, timeout=60)
    assert r.status_code == 200 and r.json()["eval_count"] >= 1, r.text
    r = httpx.post(f"{by_path.url}/api/embed", json={"input": "hi"}, timeout=60)
    assert r.status_code == 200 and r.json()["embeddings"], r.text


def test_models_retrieve_does_not_load_and_404s_for_unknown(by_path: _Server):
    r = httpx.get(f"{by_path.url}/v1/models/no-such-model", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    before = len(by_path.app.state.pool.loaded())
    r = httpx.get(f"{by_path.url}/v1/models/smollm2:135m", timeout=30)  # known: answered without loading
    assert r.status_code == 200 and r.json()["id"] == "smollm2:135m"
    assert len(by_path.app.state.pool.loaded()) == before


def test_alias_names_the_served_model(isolated_env: Path, model_copy: Path):
    app = create_app([str(model_copy)], load_options={"n_ctx": 512, "parallel": 1}, aliases=["my-model"])
    with _Server(app) as s:
        v1, tags, ps = _ids(s.url)
        assert v1[0] == tags[0] == "my-model" and ps == ["my-model"]
        _every_route(s.url, "my-model")
        assert len(app.state.pool.loaded()) == 1


def test_status_routes_survive_a_loaded_model_whose_file_was_deleted(isolated_env: Path, smollm2_path: Path):
    doomed = isolated_env / "doomed.gguf"
    shutil.copyfile(smollm2_path, doomed)
    app = create_app([str(doomed)], load_options={"n_ctx": 256, "parallel": 1})
    with _Server(app) as s:
        doomed.unlink()
        for route in ("/api/ps", "/api/tags", "/v1/models"):
            r = httpx.get(s.url + route, timeout=30)
            assert r.status_code == 200, (route, r.text)
        assert [m.model for m in ollama.Client(host=s.url).ps().models] == ["doomed.gguf"]
        # the loaded model keeps answering (its pages are mapped)
        r = httpx.post(f"{s.url}/api/generate", json={"model": "doomed.gguf", "prompt": "Hi", "stream": False,
                                                      "options": {"num_predict": 2}}, timeout=60)
        assert r.status_code == 200, r.text


def test_an_unexpected_error_is_a_500_that_does_not_echo_internals(isolated_env: Path):
    app = create_app([])

    async def boom(request):  # a handler bug: the message holds what a client must not see
        raise RuntimeError("secret at /home/owner/.ssh/id_rsa")

    app.add_route("/v1/boom", boom, methods=["GET"])
    with _Server(app) as s:
        r = httpx.get(f"{s.url}/v1/boom", timeout=30)
    assert r.status_code == 500
    assert "secret" not in r.text and "id_rsa" not in r.text and "RuntimeError" not in r.text
    assert r.json()["error"]["type"] == "server_error"


# -- defaults: one table per front end; a model's own defaults win over it ---------------


def test_each_front_end_has_its_table_and_the_request_wins():
    assert resolve_params(None, None, "openai").repeat_penalty == 1.0  # nobody asked for a penalty
    assert resolve_params(None, None, "openai").max_tokens is None
    assert resolve_params(None, None, "openai-completions").max_tokens == 16
    ol = resolve_params(None, None, "ollama")
    assert (ol.temperature, ol.top_k, ol.top_p, ol.min_p, ol.repeat_penalty, ol.repeat_last_n) == (
        0.8, 40, 0.9, 0.0, 1.1, 64)  # Ollama's documented defaults
    assert resolve_params(None, None, "library").max_tokens == 256
    model = GenerationParams(temperature=0.3, top_k=7, stop=["END"], max_tokens=9)
    r = resolve_params(GenerationParams(top_k=3, stop=["X"]), model, "ollama")
    assert (r.temperature, r.top_k, r.max_tokens, r.top_p) == (0.3, 3, 9, 0.9)
    assert r.stop == ["X", "END"]  # the model's stop strings always apply
    assert set(FRONTEND_DEFAULTS) >= {"library", "cli", "openai", "ollama"}


def test_gguf_recommended_sampling_is_the_models_default(tmp_path: Path, smollm2_path: Path):
    from gguf_variants import with_metadata

    variant = with_metadata(smollm2_path, tmp_path / "sampling.gguf",
                            {"general.sampling.top_k": 1, "general.sampling.temp": 0.25})
    assert hearth.get_model_info(variant).sampling == {"top_k": 1, "temperature": 0.25}
    m = hearth.load_model(variant, n_ctx=256, parallel=1)
    try:
        p = m.params(frontend="openai")
        assert (p.top_k, p.temperature) == (1, 0.25)
        assert m.params(GenerationParams(top_k=5), "ollama").top_k == 5  # the request wins
        # top_k 1 is greedy: the default answer is the greedy answer, every time
        greedy = m.generate_chat(CHAT, max_tokens=12, temperature=0, repeat_penalty=1.0).text
        assert {m.generate_chat(CHAT, max_tokens=12, repeat_penalty=1.0).text for _ in range(3)} == {greedy}
    finally:
        m.close()


# -- an Ollama model's manifest parameters reach both APIs --------------------------------

SEEDED = {"seed": 42, "temperature": 1.5, "top_k": 100, "top_p": 1.0, "min_p": 0.0, "num_predict": 24,
          "stop": ["ZZZ"]}


@pytest.fixture()
def seeded_store(tmp_path: Path, smollm2_path: Path, monkeypatch: pytest.MonkeyPatch):
    from test_ollama_store import MT, Store

    blob = tmp_path / "blob.gguf"
    shutil.copyfile(smollm2_path, blob)  # its own file: not the embedded model's
    import hashlib

    s = Store(tmp_path / "ollama", (blob, hashlib.sha256(blob.read_bytes()).hexdigest()))
    s.manifest("registry.ollama.ai/library/seeded/1b", [s.gguf_layer, s.blob(json.dumps(SEEDED), MT + "params")])
    for k in list(os.environ):
        if k.startswith("HEARTH_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("OLLAMA_MODELS", str(s.root))
    monkeypatch.setenv("HEARTH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HEARTH_CONFIG", str(tmp_path / "absent.toml"))
    return s


def test_ollama_manifest_params_reach_api_chat_and_v1_chat_and_the_request_wins(seeded_store):
    app = create_app([], load_options={"n_ctx": 512, "parallel": 2})
    with _Server(app) as s:
        olc = ollama.Client(host=s.url)
        oc = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": "Write a short poem about rivers."}]
        # seed 42 from the manifest: the same text every time, at temperature 1.5
        a = [olc.chat(model="seeded:1b", messages=msgs) for _ in range(2)]
        assert a[0].message.content == a[1].message.content and a[0].eval_count <= 24
        b = [oc.chat.completions.create(model="seeded:1b", messages=msgs) for _ in range(2)]
        assert b[0].choices[0].message.content == b[1].choices[0].message.content
        assert b[0].usage.completion_tokens <= 24  # num_predict from the manifest
        # the request wins where it sets a value
        assert oc.chat.completions.create(model="seeded:1b", messages=msgs, max_tokens=3).usage.completion_tokens <= 3
        assert olc.chat(model="seeded:1b", messages=msgs, options={"num_predict": 3}).eval_count <= 3
        others = {oc.chat.completions.create(model="seeded:1b", messages=msgs, seed=s_).choices[0].message.content
                  for s_ in (1, 2, 3)}
        assert len(others) > 1  # other seeds: other texts (so the default seed really was applied)


# -- temperature 0 on /v1 is llama-server's greedy answer --------------------------------


def test_temperature_zero_chat_equals_llama_server(smollm2_path: Path, by_path: _Server, model_copy: Path):
    from llama_reference import llama_server

    body = {"messages": [{"role": "user", "content": "Why is the sky blue? Answer in two sentences."}],
            "temperature": 0, "max_tokens": 64}
    # a repeat penalty at temperature 0: the same text only if the penalty sees the same
    # tokens (the prompt's too) and is applied the same way
    penalized = {**body, "repeat_penalty": 1.5, "repeat_last_n": 64, "max_tokens": 48}
    with llama_server(model_copy, n_ctx=512) as ref_url:
        ref = httpx.post(f"{ref_url}/v1/chat/completions", json=body, timeout=300).json()
        ref_c = httpx.post(f"{ref_url}/v1/completions", json={"prompt": "The capital of France is",
                                                                "temperature": 0, "max_tokens": 32}, timeout=300).json()
        ref_p = httpx.post(f"{ref_url}/v1/chat/completions", json=penalized, timeout=300).json()
    ours_p = httpx.post(f"{by_path.url}/v1/chat/completions", json={**penalized, "model": model_copy.name},
                        timeout=300).json()
    assert ours_p["choices"][0]["message"]["content"] == ref_p["choices"][0]["message"]["content"]
    assert ours_p["choices"][0]["message"]["content"] != ref["choices"][0]["message"]["content"]
    ours = httpx.post(f"{by_path.url}/v1/chat/completions", json={**body, "model": model_copy.name}, timeout=300).json()
    ours_c = httpx.post(f"{by_path.url}/v1/completions", json={"prompt": "The capital of France is", "temperature": 0,
                                                               "max_tokens": 32, "model": model_copy.name},
                        timeout=300).json()
    assert ours["choices"][0]["message"]["content"] == ref["choices"][0]["message"]["content"]
    assert ours["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]
    assert ours_c["choices"][0]["text"] == ref_c["choices"][0]["text"]


# -- the pool --------------------------------------------------------------------------


def test_concurrent_first_requests_for_two_models_load_one_at_a_time(smollm2_path: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch):
    other = tmp_path / "other.gguf"
    shutil.copyfile(smollm2_path, other)
    running, peak = [0], [0]
    lock = threading.Lock()
    real = pool_module.load_model

    def counting_load(*a, **kw):  # the real load, counted
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.2)
            return real(*a, **kw)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(pool_module, "load_model", counting_load)

    async def main() -> None:
        pool = ModelPool({"n_ctx": 256, "parallel": 1}, keep_alive="5m",
                         models_dirs=[smollm2_path.parent, tmp_path])
        try:
            a, b = await asyncio.gather(pool.acquire(str(smollm2_path)), pool.acquire(str(other)))
            assert a.entry is not b.entry and len(pool.loaded()) == 2
            a.release()
            b.release()
        finally:
            await pool.aclose()

    asyncio.run(main())
    assert peak[0] == 1


def test_free_vram_counts_when_making_room(smollm2_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A model that needs VRAM that is not free unloads an idle one even with RAM to spare."""
    import dataclasses

    other = tmp_path / "other.gguf"
    shutil.copyfile(smollm2_path, other)
    real_plan = pool_module.plan_model

    def plan_with_vram(spec, **kw):  # the real plan, as if the second model went to a GPU
        plan = real_plan(spec, **kw)
        if Path(spec.path if hasattr(spec, "path") else spec) == other:
            plan = dataclasses.replace(plan, memory=dataclasses.replace(plan.memory, weights_vram=1 << 30))
        return plan

    monkeypatch.setattr(pool_module, "plan_model", plan_with_vram)

    async def main() -> None:
        pool = ModelPool({"n_ctx": 256, "parallel": 1}, keep_alive="5m", available_ram=lambda: 1 << 50,
                         models_dirs=[smollm2_path.parent, tmp_path],
                         free_vram=lambda: 0)
        try:
            (await pool.acquire(str(smollm2_path))).release()
            (await pool.acquire(str(other))).release()
            assert [e.key for e in pool.loaded()] == [file_key(other)]  # the idle one made room
        finally:
            await pool.aclose()

    asyncio.run(main())


def test_shutdown_closes_a_model_that_was_still_loading(smollm2_path: Path, monkeypatch: pytest.MonkeyPatch):
    made: list[hearth.Model] = []
    real = pool_module.load_model
    started = threading.Event()

    def slow_load(*a, **kw):
        started.set()
        time.sleep(0.5)
        m = real(*a, **kw)
        made.append(m)
        return m

    monkeypatch.setattr(pool_module, "load_model", slow_load)

    async def main() -> None:
        pool = ModelPool({"n_ctx": 256, "parallel": 1}, models_dirs=[smollm2_path.parent])
        task = asyncio.ensure_future(pool.acquire(str(smollm2_path)))
        while not started.is_set():
            assert not task.done(), task.exception()
            await asyncio.sleep(0.01)
        await pool.aclose()  # on the loop, while the load runs in its thread
        with pytest.raises(EngineError, match="shutting down"):
            await task

    asyncio.run(main())
    assert len(made) == 1 and made[0].engine.scheduler._closed


# -- the engine ------------------------------------------------------------------------


def test_token_pieces_stay_right_when_threads_detokenize_during_generation(smollm2_path: Path):
    """The piece cache was filled through one buffer shared by the worker and callers."""
    import ctypes

    import llama_cpp as ll

    m = hearth.load_model(smollm2_path, n_ctx=512, parallel=4)
    try:
        lm = m.engine.model
        ids = list(range(lm.n_vocab))
        stop = threading.Event()

        def hammer(offset: int) -> None:
            while not stop.is_set():
                lm._piece_cache.clear()
                for i in range(offset, len(ids), 7):
                    lm.token_bytes(ids[i])

        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            futs = [ex.submit(hammer, k) for k in range(3)]
            for _ in range(3):
                m.generate_text("Once upon a time", max_tokens=48, temperature=1.0, ignore_eos=True)
            stop.set()
            for f in futs:
                f.result()
        buf = ctypes.create_string_buffer(128)
        wrong = []
        for tok, piece in list(lm._piece_cache.items()):
            n = ll.llama_token_to_piece(lm.vocab, tok, buf, len(buf), 0, False)
            if buf.raw[:n] != piece:
                wrong.append(tok)
        assert not wrong, f"{len(wrong)} cached pieces are another token's"
    finally:
        m.close()


def test_a_dead_worker_fails_waiting_requests_and_refuses_new_ones(smollm2_path: Path):
    m = hearth.load_model(smollm2_path, n_ctx=256, parallel=1)
    try:
        sched = m.engine.scheduler
        assert m.generate_text("warm up", max_tokens=2).usage.completion_tokens >= 1

        def broken_admit():
            raise MemoryError("simulated: the worker dies outside a step")

        sched._admit = broken_admit  # the next loop turn raises outside _step
        handle = m.submit("Hello", max_tokens=4)
        with pytest.raises(EngineError, match="worker stopped"):
            handle.result()
        with pytest.raises(EngineError, match="worker stopped"):
            m.generate_text("again", max_tokens=2)
    finally:
        m.close()
