"""A model in a child process of its own (engines/subprocess.py): the same engine
behind a pipe, and the loss of that process costs the model, never this process.

Real llama.cpp on the embedded SmolLM2, real child processes, real signals; the RPC
faults use a real worker (``hearth.rpc.serve_worker``) on a loopback port.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from hearth import rpc
from hearth.engines.base import Engine, Handle, load_engine
from hearth.engines.llamacpp import LlamaCppEngine
from hearth.engines.subprocess import ProcessEngine
from hearth.errors import BadRequest, Cancelled, ContextOverflow, EngineError
from hearth.gguf import inspect_model
from hearth.hardware import detect_hardware
from hearth.planner import LoadOptions, LoadPlan, plan_load
from hearth.types import GenerationParams

N_CTX = 512
PROMPTS = ["The three primary colors are", "def fibonacci(n):", "Once upon a time, in a small village,"]


def _plan(path: Path, **wishes) -> tuple:
    info = inspect_model(path)
    return info, plan_load(info, detect_hardware(), LoadOptions(n_ctx=N_CTX, parallel=2, **wishes))


def _greedy(max_tokens: int = 24, **kw) -> GenerationParams:
    return GenerationParams(temperature=0, max_tokens=max_tokens, **kw).resolve()


@pytest.fixture(scope="module")
def loaded(smollm2_path):
    info, plan = _plan(smollm2_path)
    return info, plan


@pytest.fixture(scope="module")
def local(loaded) -> Iterator[LlamaCppEngine]:
    e = LlamaCppEngine(*loaded, model_name="smollm2")
    yield e
    e.close()


@pytest.fixture(scope="module")
def isolated(loaded) -> Iterator[ProcessEngine]:
    e = load_engine(*loaded, model_name="smollm2", isolate=True)
    assert isinstance(e, ProcessEngine)
    yield e
    e.close()


@pytest.fixture
def doomed(loaded) -> Iterator[ProcessEngine]:
    """A child process of its own, for a test to kill."""
    e = ProcessEngine(*loaded, model_name="smollm2")
    yield e
    e.close()


# -- the same engine -------------------------------------------------------------------


def test_load_engine_isolates_on_request_and_is_an_engine(loaded, isolated):
    assert isinstance(isolated, Engine) and isolated.alive and isolated.pid != os.getpid()
    handle = isolated.submit("Hi", _greedy(2))
    assert isinstance(handle, Handle)
    handle.result()


def test_same_greedy_tokens_as_in_process(local, isolated):
    for prompt in PROMPTS:
        a = local.submit(prompt, _greedy(32), stream=False).result()
        b = isolated.submit(prompt, _greedy(32), stream=False).result()
        assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason
        assert b.usage.prompt_tokens == a.usage.prompt_tokens and b.usage.completion_tokens == 32
        assert b.timings.ttft > 0 and b.timings.generation_tokens_per_second > 0
        assert b.model == "smollm2"


def test_stream_chunks_add_up_to_the_result_with_logprobs(local, isolated):
    handle = isolated.submit(PROMPTS[0], _greedy(16, logprobs=2))
    chunks = list(handle)
    result = handle.result_now
    assert result is not None and handle.result() is result
    assert "".join(c.text for c in chunks) == result.text
    assert [t for c in chunks for t in c.token_ids] == result.token_ids
    assert len(result.logprobs) == 16 and len(result.logprobs[0]["top_logprobs"]) == 2
    ref = local.submit(PROMPTS[0], _greedy(16, logprobs=2)).result()
    assert [lp["id"] for lp in result.logprobs] == [lp["id"] for lp in ref.logprobs]
    assert result.logprobs[0]["logprob"] == pytest.approx(ref.logprobs[0]["logprob"], abs=1e-4)


def test_async_iteration_on_the_callers_loop(isolated):
    async def run() -> tuple[list[str], str]:
        loop = asyncio.get_running_loop()
        h = await asyncio.to_thread(isolated.submit, PROMPTS[1], _greedy(12), loop=loop)
        pieces = [c.text async for c in h]
        h2 = await asyncio.to_thread(isolated.submit, PROMPTS[1], _greedy(12), False, loop=loop)
        return pieces, (await h2.aresult()).text

    pieces, text = asyncio.run(run())
    assert "".join(pieces) == text and text
    with pytest.raises(RuntimeError, match="loop"):
        asyncio.run(isolated.submit("x", _greedy(1)).__aiter__().__anext__())


def test_cancel_and_leaving_early_free_the_slot(isolated):
    h = isolated.submit(PROMPTS[2], _greedy(400))
    it = iter(h)
    next(it)
    h.cancel()
    with pytest.raises(Cancelled):
        for _ in it:
            pass
    assert h.result_now is not None and h.result_now.finish_reason == "cancelled"
    h2 = isolated.submit(PROMPTS[2], _greedy(400))
    for _ in h2:
        break  # leaving the loop cancels it
    deadline = time.monotonic() + 10
    while isolated.stats().active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isolated.stats().active == 0
    assert isolated.submit("Hi", _greedy(3)).result().usage.completion_tokens == 3


def test_concurrent_requests_from_many_threads(isolated):
    want = {p: isolated.submit(p, _greedy(20), stream=False).result().token_ids for p in PROMPTS}
    got: dict[int, tuple[str, list[int]]] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            p = PROMPTS[i % len(PROMPTS)]
            h = isolated.submit(p, _greedy(20), stream=i % 2 == 0)
            got[i] = (p, h.result().token_ids)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(got) == 9
    assert all(ids == want[p] for p, ids in got.values())


def test_text_tokens_templates_and_embeddings_match_in_process(local, isolated):
    assert (isolated.n_vocab, isolated.n_embd, isolated.n_ctx_per_slot) == (
        local.n_vocab, local.n_embd, local.n_ctx_per_slot)
    assert isolated.add_bos == local.add_bos and isolated.special_texts == local.special_texts
    assert isolated.fim_tokens() == local.fim_tokens()
    text = "Hello, wörld! <|im_start|>"
    assert isolated.tokenize(text) == local.tokenize(text)
    assert isolated.tokenize(text, parse_special=False) == local.tokenize(text, parse_special=False)
    assert isolated.detokenize(local.tokenize(text)) == local.detokenize(local.tokenize(text))
    assert isolated.token_piece(1) == local.token_piece(1)
    assert isolated.token_piece(5, False) == local.token_piece(5, False)
    msgs = [{"role": "user", "content": "Name three colors."}]
    assert isolated.render_chat(msgs) == local.render_chat(msgs)
    assert isolated.chat_template.source == local.chat_template.source
    vecs, counts = isolated.embed(["a red apple", [1, 2, 3]])
    ref, ref_counts = local.embed(["a red apple", [1, 2, 3]])
    assert counts == ref_counts and len(vecs[0]) == local.n_embd
    assert vecs[0] == pytest.approx(ref[0], abs=1e-5)
    states = isolated.slot_states()
    assert len(states) == isolated.stats().slots == 2 and states[0]["n_ctx"] == N_CTX


def test_a_chat_template_override_renders_in_the_child(loaded):
    from hearth.chat_templates import as_template, resolve_chat_template

    e = ProcessEngine(*loaded)
    try:
        template = as_template(resolve_chat_template("llama3", "chat_template"))
        e.use_chat_template(template)
        assert e.chat_template is template
        text, _ = e.render_chat([{"role": "user", "content": "hi"}])
        assert "<|start_header_id|>" in text
    finally:
        e.close()


def test_request_errors_come_back_as_their_own_type(isolated):
    with pytest.raises(ContextOverflow, match="context holds") as err:
        isolated.submit(list(range(10, 10 + N_CTX + 5)), _greedy(4))
    assert err.value.n_ctx == N_CTX
    with pytest.raises(BadRequest, match="token ids"):
        isolated.submit([isolated.n_vocab + 7], _greedy(4))
    with pytest.raises(BadRequest, match="outside the vocabulary"):
        isolated.token_piece(-1)
    with pytest.raises(BadRequest):
        isolated.embed([])
    assert isolated.alive and isolated.submit("Hi", _greedy(2)).result()


def test_close_ends_running_requests_and_refuses_new_ones(loaded):
    e = ProcessEngine(*loaded)
    h = e.submit(PROMPTS[2], _greedy(400))
    it = iter(h)
    next(it)
    e.close()
    with pytest.raises(Cancelled, match="unloaded"):
        for _ in it:
            pass
    assert not e.alive and e._proc.poll() == 0
    with pytest.raises(EngineError, match="unloaded"):
        e.submit("x", _greedy(1))
    assert e.stats().active == 0
    e.close()  # twice is fine


# -- its death ----------------------------------------------------------------------------


@pytest.mark.parametrize("sig, how", [(signal.SIGKILL, "killed, SIGKILL"), (signal.SIGABRT, "aborted, SIGABRT")])
def test_a_killed_child_fails_its_requests_and_spares_this_process(doomed, sig, how):
    running = [doomed.submit(p, _greedy(400)) for p in PROMPTS]  # two run, one waits
    it = iter(running[0])
    next(it)
    os.kill(doomed.pid, sig)
    with pytest.raises(EngineError) as err:
        for _ in it:
            pass
    msg = str(err.value)
    assert f"the model's process died ({how})" in msg and "the next request loads it again" in msg
    for h in running[1:]:
        with pytest.raises(EngineError, match="process died"):
            h.result()
    assert not doomed.alive
    with pytest.raises(EngineError, match="process died"):
        doomed.submit("Hi", _greedy(2))
    with pytest.raises(EngineError, match="process died"):
        doomed.tokenize("Hi")
    assert doomed.stats().active == 0 and doomed.slot_states() == []
    assert os.getpid() and threading.main_thread().is_alive()  # still here


def test_async_handles_end_when_the_child_dies(doomed):
    async def run() -> BaseException:
        loop = asyncio.get_running_loop()
        h = await asyncio.to_thread(doomed.submit, PROMPTS[0], _greedy(400), loop=loop)
        try:
            async for _ in h:
                os.kill(doomed.pid, signal.SIGKILL)
        except EngineError as e:
            return e
        raise AssertionError("the stream ended without an error")

    assert "process died" in str(asyncio.run(asyncio.wait_for(run(), 60)))


# -- RPC workers: llama.cpp's aborts stay in the model's process ----------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@pytest.fixture
def worker() -> Iterator[tuple[str, subprocess.Popen]]:
    """A real RPC worker serving this machine's CPU on a loopback port."""
    if not rpc.available():
        pytest.skip("this llama-cpp-python has no RPC backend")
    port = _free_port()
    code = f"from hearth.rpc import serve_worker; serve_worker('127.0.0.1:{port}', None, 1, ['CPU'])"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port)
        yield f"127.0.0.1:{port}", proc
    finally:
        proc.kill()
        proc.wait()


def _remote_plan(loaded) -> LoadPlan:
    """Every layer on the worker's device (the first one a process adds is RPC0)."""
    info, plan = loaded
    plan = dataclasses.replace(plan, n_gpu_layers=-1 if plan.n_gpu_layers < 0 else 99)
    plan.devices = ["RPC0"]
    return plan


def test_an_unreachable_worker_is_the_load_error_itself(loaded):
    port = _free_port()  # nothing listens there
    with pytest.raises(rpc.WorkerError, match=f"127.0.0.1:{port}"):
        load_engine(*loaded, hosts=[f"127.0.0.1:{port}"])


def test_a_worker_lost_mid_generation_costs_only_the_model(loaded, worker):
    endpoint, proc = worker
    plan = _remote_plan(loaded)
    plan.hosts = [endpoint]  # a plan over workers runs in a process of its own, unasked
    e = load_engine(loaded[0], plan, "smollm2")
    try:
        assert isinstance(e, ProcessEngine) and e.hosts == [endpoint]
        assert e.submit("Hi", _greedy(4)).result().usage.completion_tokens == 4
        h = e.submit(PROMPTS[2], _greedy(400))
        it = iter(h)
        next(it)
        proc.kill()
        with pytest.raises(EngineError) as err:
            for _ in it:
                pass
        assert "the model's process died (aborted, SIGABRT): Remote RPC server crashed" in str(err.value)
        assert not e.alive
    finally:
        e.close()


class _OneConnection:
    """A TCP proxy to a worker that passes its first connection (hearth's own probe)
    and hangs up on every later one (llama.cpp's): a worker lost during the load."""

    def __init__(self, target: str) -> None:
        self.target = target.rsplit(":", 1)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        first = True
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if not first:
                conn.close()
                continue
            first = False
            up = socket.create_connection((self.target[0], int(self.target[1])))
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def test_a_child_that_dies_loading_says_what_it_loaded_and_why(loaded, worker):
    proxy = _OneConnection(worker[0])
    try:
        with pytest.raises(EngineError) as err:
            load_engine(loaded[0], _remote_plan(loaded), "smollm2", hosts=[proxy.endpoint])
    finally:
        proxy.close()
    msg = str(err.value)
    assert msg.startswith("could not load smollm2 (") and proxy.endpoint in msg
    assert "its process died (aborted, SIGABRT)" in msg
    assert "RPC" in msg.split("SIGABRT):", 1)[1]  # llama.cpp's own last words


# -- a server whose model process dies ------------------------------------------------------


def test_the_server_keeps_serving_and_reloads_a_model_whose_process_died(smollm2_path, tmp_path):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from test_server import _Server

    from hearth.server import create_app

    other = tmp_path / "other.gguf"  # a second model: another file
    shutil.copyfile(smollm2_path, other)
    app = create_app([str(smollm2_path), str(other)], load_options={"n_ctx": N_CTX, "isolate": True},
                     aliases=["first", "second"])

    def engine_of(name: str) -> ProcessEngine:
        (entry,) = [e for e in app.state.pool.loaded() if e.model.name == name]
        return entry.model.engine

    def complete(model: str, **kw) -> httpx.Response:
        body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, **kw}
        return httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)

    with _Server(app) as server:
        first = engine_of("first")
        assert isinstance(first, ProcessEngine) and isinstance(engine_of("second"), ProcessEngine)
        want = complete("first").json()["choices"][0]["text"]
        # a stream in flight when its model's process is killed ends, with an error
        body = {"model": "first", "prompt": PROMPTS[2], "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            os.kill(first.pid, signal.SIGKILL)
            rest = "\n".join(lines)
        assert "the model's process died (killed, SIGKILL)" in rest and '"code": "engine_error"' in rest
        assert not first.alive
        # the other model answers meanwhile, and the next request loads the first again
        assert complete("second").status_code == 200
        r = complete("first")
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        again = engine_of("first")
        assert again is not first and again.alive and again.pid != first.pid
        assert first._proc.poll() is not None  # the dead one was let go
