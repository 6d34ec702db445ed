"""Continuous batching: many requests in one llama.cpp context (real llama.cpp, real model)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

import hearth
from hearth.engines.llamacpp.sampling import Sampler
from hearth.engines.llamacpp.scheduler import Request
from hearth.errors import Busy, Cancelled, EngineError

N = 8


@pytest.fixture(scope="module")
def model(smollm2_path):
    m = hearth.load_model(smollm2_path, n_ctx=2048, parallel=N)
    yield m
    m.close()


def prompts(k: int = N) -> list[str]:
    return [f"Write one sentence about the number {i}." for i in range(k)]


def chat(p: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": p}]


@pytest.fixture(scope="module")
def alone(model):
    """Each prompt's greedy answer when it runs by itself."""
    return [model.generate_chat(chat(p), max_tokens=24, temperature=0).token_ids for p in prompts()]


def test_plan_has_the_requested_slots_each_with_its_own_context(model):
    assert model.plan.parallel == N
    assert model.engine.model.n_seq_max == N
    assert model.engine.scheduler.n_ctx_seq == model.plan.n_ctx == 2048


def test_threads_get_their_own_answers_and_greedy_text_does_not_change_under_load(model, alone):
    results: list[list[int] | None] = [None] * N
    errors: list[BaseException] = []
    barrier = threading.Barrier(N)

    def work(i: int) -> None:
        try:
            barrier.wait()
            r = model.generate_chat(chat(prompts()[i]), max_tokens=24, temperature=0)
            results[i] = r.token_ids
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # Each slot has its own KV stream, so batching does not change a request's text.
    assert results == alone


def test_requests_run_side_by_side_not_one_after_another(model):
    seen = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(model.engine.scheduler.active)
            time.sleep(0.005)

    w = threading.Thread(target=watch)
    w.start()
    handles = [model.engine.submit(p, hearth.GenerationConfig(max_tokens=16, temperature=0, ignore_eos=True), stream=False) for p in prompts()]
    results = [h.result() for h in handles]
    stop.set()
    w.join()
    assert all(r.usage.completion_tokens == 16 for r in results)
    assert max(seen) == N  # all eight were in slots at once


def test_asyncio_callers_get_their_own_answers(model, alone):
    async def main():
        return await asyncio.gather(*(model.agenerate_chat(chat(p), max_tokens=24, temperature=0) for p in prompts()))

    results = asyncio.run(main())
    assert [r.token_ids for r in results] == alone


def test_async_streams_yield_the_same_text_as_the_results(model):
    async def one(p: str) -> tuple[str, str]:
        parts = [c.text async for c in model.astream_text(p, max_tokens=16, temperature=0, ignore_eos=True)]
        whole = await model.agenerate_text(p, max_tokens=16, temperature=0, ignore_eos=True)
        return "".join(parts), whole.text

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts()))

    for streamed, whole in asyncio.run(main()):
        assert streamed == whole and whole


def _wait_until(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_breaking_out_of_a_stream_frees_its_slot(model):
    sched = model.engine.scheduler
    stream = model.stream_text("Count to one thousand:", max_tokens=1000, temperature=0, ignore_eos=True)
    next(iter(stream))
    assert sched.active == 1
    stream.close()
    assert _wait_until(lambda: sched.active == 0)


def test_cancelling_an_async_task_frees_its_slot(model):
    sched = model.engine.scheduler

    async def main():
        task = asyncio.create_task(model.agenerate_text("Count to one thousand:", max_tokens=1000, ignore_eos=True))
        while sched.active == 0:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert _wait_until(lambda: sched.active == 0)


def test_a_freed_slot_is_taken_by_a_waiting_request(smollm2_path):
    with hearth.load_model(smollm2_path, n_ctx=512, parallel=1) as m:
        long = m.engine.submit("Count:", hearth.GenerationConfig(max_tokens=400, temperature=0, ignore_eos=True))
        it = iter(long)
        next(it)
        waiting = m.engine.submit("Hi", hearth.GenerationConfig(max_tokens=4, temperature=0, ignore_eos=True), stream=False)
        assert m.engine.scheduler.queue_depth == 1
        long.cancel()
        with pytest.raises(Cancelled):
            for _ in it:
                pass
        assert waiting.result().usage.completion_tokens == 4


def test_queue_overflow_fails_fast_with_busy_and_the_depth(smollm2_path):
    with hearth.load_model(smollm2_path, n_ctx=512, parallel=1) as m:
        m.engine.scheduler.max_queue = 2
        cfg = hearth.GenerationConfig(max_tokens=300, temperature=0, ignore_eos=True)
        running = m.engine.submit("a", cfg)
        next(iter(running))
        queued = [m.engine.submit("b", cfg), m.engine.submit("c", cfg)]
        with pytest.raises(Busy, match="2 queued"):
            m.engine.submit("d", cfg)
        for h in [running, *queued]:
            h.cancel()


def test_second_turn_of_a_long_chat_decodes_only_the_new_tokens(model):
    history = [{"role": "system", "content": "You are terse."},
               {"role": "user", "content": "Remember these facts. " + " ".join(f"Fact {i} is {i * 7}." for i in range(160))}]
    first = model.generate_chat(history, max_tokens=8, temperature=0)
    assert first.usage.prompt_tokens >= 1000
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "What is fact 3?"}]
    second = model.generate_chat(history, max_tokens=8, temperature=0)
    new_tokens = second.usage.prompt_tokens - second.usage.cached_tokens
    # everything up to the first answer is reused; only the new turn is decoded
    assert second.usage.cached_tokens >= first.usage.prompt_tokens
    assert new_tokens < 40
    assert second.usage.to_dict()["prompt_tokens_details"]["cached_tokens"] == second.usage.cached_tokens


def test_a_failing_request_ends_alone_and_the_others_finish(model):
    cfg = hearth.GenerationConfig(max_tokens=12, temperature=0, ignore_eos=True)
    good = [model.engine.submit(p, cfg, stream=False) for p in prompts(3)]
    sampler = Sampler(model.engine.model, cfg.resolve())

    def boom(ctx, idx):
        raise RuntimeError("sampler exploded")

    sampler.sample = boom  # the worker calls this for that request only
    req = Request(prompt_tokens=model.tokenize("This one breaks."), params=cfg.resolve(),
                  max_tokens=12, stop=[], sampler=sampler, stream=False)
    bad = model.engine.scheduler.submit(req)
    with pytest.raises(EngineError, match="sampler exploded"):
        bad.result()
    assert [h.result().usage.completion_tokens for h in good] == [12, 12, 12]
    assert model.generate_text("still alive", max_tokens=3, temperature=0).usage.completion_tokens > 0


def test_queue_bound_comes_from_the_environment(smollm2_path, monkeypatch):
    monkeypatch.setenv("HEARTH_MAX_QUEUE", "0")
    with hearth.load_model(smollm2_path, n_ctx=512, parallel=1) as m:
        assert m.engine.scheduler.max_queue == 0
        cfg = hearth.GenerationConfig(max_tokens=200, temperature=0, ignore_eos=True)
        running = m.engine.submit("a", cfg)
        next(iter(running))
        with pytest.raises(Busy, match="0 queued"):
            m.engine.submit("b", cfg)
        running.cancel()


def test_cancelling_a_long_prefill_stops_it_within_a_ubatch(smollm2_path: Path):
    """A client that leaves during a long prompt frees the engine within one ubatch of
    prefill, not after the whole prompt (each step decodes at most n_ubatch of it)."""
    m = hearth.load_model(smollm2_path, n_ctx=4096, parallel=1, n_batch=2048, n_ubatch=128)
    try:
        sched = m.engine.scheduler
        prompt = list(range(100, 100 + 3000))  # 3,000 tokens: 24 ubatches
        handle = m.submit(prompt, max_tokens=4, temperature=0)
        slot = sched.slots[0]
        deadline = time.monotonic() + 120
        while slot.n_past == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        handle.cancel()
        with pytest.raises(hearth.Cancelled):
            handle.result()
        # what the slot keeps is what was decoded before the cancel took effect
        assert 0 < len(slot.cache_tokens) <= 3 * 128, len(slot.cache_tokens)
        assert m.generate_text("Hello", max_tokens=2).usage.completion_tokens >= 1
    finally:
        m.close()
