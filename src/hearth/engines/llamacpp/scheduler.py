"""The one generation loop: slots in one llama.cpp context, one ``llama_decode`` per step.

Each step packs, into a single ``llama_batch``, the next token of every generating
slot and a chunk of the prompt of every slot still prefilling; decodes once; then
samples each slot that produced logits with its own native sampler chain. A request
is a batch of one when it is alone: there is no second code path.

The worker thread owns the context; callers hand it requests through a lock and
read results from a per-request queue, so any number of threads may generate on
one model at once.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import math
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import llama_cpp as ll
import numpy as np

from ..base import END_OF_STREAM, QueuedHandle
from ...errors import Busy, Cancelled, ContextOverflow, EngineError, HearthError
from ...types import FinishReason, GenerationChunk, GenerationParams, GenerationResult, Timings, Usage
from .model import LlamaModel
from .sampling import Sampler

log = logging.getLogger(__name__)

_DONE = END_OF_STREAM


@dataclass
class Request:
    prompt_tokens: list[int]
    params: GenerationParams  # resolved
    max_tokens: int | None
    stop: list[str]
    model_name: str = ""
    ignore_eos: bool = False
    sampler: Sampler | None = None  # built by the submitter, so bad settings fail there
    stream: bool = True  # False: no per-token events, only the final result
    notify: Callable[[], None] | None = None  # called after each event (asyncio wake-up)
    submitted: float = field(default_factory=time.perf_counter)
    task_id: int = -1  # numbered by the scheduler on submit (llama-server's id_task)
    # filled in by the worker
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    result: GenerationResult | None = None
    error: BaseException | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    def put(self, item: object) -> None:
        self.events.put(item)
        if self.notify is not None:
            try:
                self.notify()
            except RuntimeError:  # the caller's event loop is gone
                self.cancelled.set()


class RequestHandle(QueuedHandle):
    """Iterate for GenerationChunks; ``result()`` waits for the final GenerationResult."""

    def __init__(self, request: Request, scheduler: Scheduler, wake: asyncio.Event | None = None) -> None:
        self.request = request
        self._scheduler = scheduler
        self._events = request.events
        self._wake = wake

    @property
    def result_now(self) -> GenerationResult | None:
        return self.request.result

    def _error_now(self) -> BaseException | None:
        return self.request.error

    def cancel(self) -> None:
        self.request.cancel()
        self._scheduler.wake()


class _StopMatcher:
    """Incremental UTF-8 text with stop strings held back until decided."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""
        self.text: list[str] = []
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, data: bytes, final: bool = False) -> tuple[str, bool]:
        """Returns (text safe to emit now, hit a stop string)."""
        self.held += self.decoder.decode(data, final)
        if self.stops:
            cut = -1
            for s in self.stops:
                i = self.held.find(s)
                if i != -1 and (cut == -1 or i < cut):
                    cut = i
                    self.matched = s
            if cut != -1:
                out = self.held[:cut]
                self.held = ""
                self.text.append(out)
                return out, True
            if not final:
                keep = 0
                for s in self.stops:
                    for k in range(min(len(s) - 1, len(self.held)), keep, -1):
                        if self.held.endswith(s[:k]):
                            keep = k
                            break
                out = self.held[: len(self.held) - keep]
                self.held = self.held[len(self.held) - keep :]
                self.text.append(out)
                return out, False
        out, self.held = self.held, ""
        self.text.append(out)
        return out, False


class _Slot:
    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.request: Request | None = None
        self.cache_tokens: list[int] = []  # what this sequence's KV cells hold
        self.last: dict[str, Any] = {}  # the previous request's figures, for /slots
        self.reset()

    def reset(self) -> None:
        self.sampler: Sampler | None = None
        self.todo: list[int] = []  # prompt tokens still to decode
        self.n_past = 0
        self.generated: list[int] = []
        self.logprobs: list[dict[str, Any]] = []  # one per generated token, when asked for
        self.next_token: int | None = None
        self.batch_index = -1
        self.matcher: _StopMatcher | None = None
        self.limit = 0
        self.cached = 0
        self.t_start = 0.0
        self.t_first = 0.0
        self.t_prompt_done = 0.0

    @property
    def busy(self) -> bool:
        return self.request is not None


class Scheduler:
    def __init__(self, model: LlamaModel, max_queue: int = 64) -> None:
        self.model = model
        self.max_queue = max_queue
        self.n_ctx_seq = model.n_ctx_seq
        self.slots = [_Slot(i) for i in range(model.n_seq_max)]
        self._pending: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._dead: HearthError | None = None  # set if the worker thread died
        self._thread: threading.Thread | None = None
        self._batch = ll.llama_batch_init(model.n_batch, 0, model.n_seq_max)
        self._batch_cap = model.n_batch
        self._kv_full = False  # the last prompt chunk found no room in the KV cache
        self._eog: dict[int, bool] = {}  # token -> is end of generation, filled lazily
        self._tasks = 0  # requests submitted so far

    # -- public ---------------------------------------------------------------------

    def submit(self, request: Request, wake: asyncio.Event | None = None) -> RequestHandle:
        n_prompt = len(request.prompt_tokens)
        if n_prompt == 0:
            raise ContextOverflow("the prompt is empty after tokenization")
        if n_prompt >= self.n_ctx_seq:
            raise ContextOverflow(
                f"the prompt has {n_prompt} tokens but the context holds {self.n_ctx_seq} "
                f"(at least 1 must be left to generate); shorten it or raise n_ctx",
                n_prompt_tokens=n_prompt, n_ctx=self.n_ctx_seq,
            )
        with self._cv:
            if self._closed:
                raise EngineError("the model has been unloaded")
            if self._dead is not None:
                raise self._dead
            free = sum(1 for s in self.slots if not s.busy)
            if len(self._pending) >= self.max_queue + free:
                raise Busy(
                    f"too many requests waiting ({max(0, len(self._pending) - free)} queued, "
                    f"{len(self.slots) - free} running); try again later"
                )
            self._tasks += 1
            request.task_id = self._tasks
            self._pending.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hearth-scheduler", daemon=True)
                self._thread.start()
            self._cv.notify()
        return RequestHandle(request, self, wake)

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return sum(1 for s in self.slots if s.busy)

    def slot_states(self) -> list[dict[str, Any]]:
        """Each slot as llama-server's ``GET /slots`` shows it (without the prompt and
        generated text, which belong to whoever sent them): the running request's
        figures, else the previous one's."""
        with self._cv:
            out = []
            for s in self.slots:
                st: dict[str, Any] = {"id": s.seq_id, "n_ctx": self.n_ctx_seq, "speculative": False,
                                      "is_processing": s.busy}
                req = s.request
                if req is not None:
                    n_prompt = len(req.prompt_tokens)
                    st.update(self._figures(s, req, n_prompt - s.cached - len(s.todo), True))
                else:
                    st.update(s.last)
                out.append(st)
            return out

    @staticmethod
    def _figures(s: _Slot, req: Request, processed: int, running: bool) -> dict[str, Any]:
        n_gen = len(s.generated)
        remain = -1 if req.max_tokens is None else max(0, s.limit - n_gen)
        return {
            # as llama-server: the tokens the slot's cache holds (prompt, then generated)
            "id_task": req.task_id, "n_prompt_tokens": len(s.cache_tokens),
            "n_prompt_tokens_processed": processed, "n_prompt_tokens_cache": s.cached,
            "params": {k: v for k, v in req.params.to_dict().items()
                       if k not in ("grammar", "json_schema", "grammar_triggers", "logit_bias")},
            "next_token": [{"has_next_token": running, "n_remain": remain, "n_decoded": n_gen}],
        }

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        for s in self.slots:
            if s.request is not None:
                self._finish(s, "cancelled", Cancelled("the model was unloaded"))
        while self._pending:
            r = self._pending.popleft()
            if r.sampler is not None:
                r.sampler.close()
            r.error = Cancelled("the model was unloaded")
            r.put(_DONE)
        if self._batch is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None

    # -- worker ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - the worker is gone: nobody may wait forever
            log.exception("the scheduler's worker died")
            self._die(EngineError(f"the generation worker stopped: {type(e).__name__}: {e}"))

    def _die(self, error: HearthError) -> None:
        """Fail what is running and waiting, and refuse new requests from now on."""
        with self._cv:
            self._dead = error
            pending = list(self._pending)
            self._pending.clear()
        for s in self.slots:
            if s.request is not None:
                try:
                    self._finish(s, "error", error)
                except Exception:  # pragma: no cover - keep failing the others
                    s.request.error = error
                    s.request.put(_DONE)
                    s.request = None
        for r in pending:
            if r.sampler is not None:
                r.sampler.close()
            r.error = error
            r.put(_DONE)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._pending and not any(s.busy for s in self.slots):
                    self._cv.wait()
                if self._closed:
                    return
                admitted = self._admit()
            for slot, req in admitted:
                self._begin(slot, req)
            try:
                self._step()
            except Exception as e:  # never let the loop die: fail what was in flight
                log.exception("scheduler step failed")
                for s in self.slots:
                    if s.request is not None:
                        s.cache_tokens = []
                        self.model.seq_clear(s.seq_id)
                        self._finish(s, "error", EngineError(f"generation failed: {e}"))

    def _admit(self) -> list[tuple[_Slot, Request]]:
        """Pick waiting requests for free slots (under the lock), preferring the slot
        with the longest cached prefix. Cancelled requests are finished here."""
        for s in self.slots:
            if s.request is not None and s.request.cancelled.is_set():
                self._finish(s, "cancelled", None)
        admitted: list[tuple[_Slot, Request]] = []
        free = [s for s in self.slots if not s.busy]
        while self._pending and free:
            req = self._pending.popleft()
            if req.cancelled.is_set():
                if req.sampler is not None:
                    req.sampler.close()
                req.error = Cancelled("the request was cancelled")
                req.put(_DONE)
                continue
            slot = max(free, key=lambda s: _common_prefix(s.cache_tokens, req.prompt_tokens))
            free.remove(slot)
            slot.request = req  # reserve it
            admitted.append((slot, req))
        return admitted

    def _begin(self, slot: _Slot, req: Request) -> None:
        try:
            self._start(slot, req)
        except Exception as e:  # a bad request fails alone
            if slot.sampler is not None:
                slot.sampler.close()
            slot.request = None
            slot.reset()
            req.error = e if isinstance(e, HearthError) else EngineError(f"cannot start generation: {e}")
            req.put(_DONE)

    def _start(self, slot: _Slot, req: Request) -> None:
        prompt = req.prompt_tokens
        keep = _common_prefix(slot.cache_tokens, prompt)
        keep = min(keep, len(prompt) - 1)  # decode at least one token to get logits
        slot.reset()
        slot.request = None
        slot.sampler = req.sampler if req.sampler is not None else Sampler(self.model, req.params)
        req.sampler = None
        slot.sampler.accept_prompt(prompt)
        self.model.seq_clear(slot.seq_id, keep)
        slot.cache_tokens = prompt[:keep]
        slot.request = req
        slot.cached = keep
        slot.n_past = keep
        slot.todo = prompt[keep:]
        room = self.n_ctx_seq - len(prompt)
        slot.limit = room if req.max_tokens is None else min(req.max_tokens, room)
        slot.matcher = _StopMatcher(req.stop)
        slot.t_start = time.perf_counter()
        if slot.limit == 0:
            self._finish(slot, "length", None)

    def _step(self) -> None:
        active = [s for s in self.slots if s.busy]
        generating = [s for s in active if s.next_token is not None]
        # Chunked prefill: a prompt gets one ubatch per step, so nobody's next token waits
        # behind a long prompt, and a request cancelled mid-prompt (its client gone) stops
        # within one ubatch. llama_decode splits a bigger batch into ubatches anyway.
        budget = min(self._batch_cap - len(generating), self.model.plan.n_ubatch)
        if self._kv_full and generating:
            budget = 0  # the cache is full: let running requests finish first
        saved = [(s, s.n_past, len(s.cache_tokens), s.todo) for s in active]
        n = self._fill(generating, [s for s in active if s.todo], budget)
        if n == 0:
            return
        self._batch.n_tokens = n
        ret = ll.llama_decode(self.model.ctx, self._batch)
        if ret != 0:
            prefilled = any(s.todo is not t for s, _, _, t in saved)
            self._rollback(saved)
            self._decode_failed(ret, active, prefilled)
            return
        # llama_decode may return before the work is done (RPC workers, GPU streams): the
        # clock is read once the logits exist, so prompt speed and ttft are what happened
        ll.llama_synchronize(self.model.ctx)
        now = time.perf_counter()
        for s in active:
            if s.batch_index < 0 or s.request is None:
                continue
            if s.next_token is not None:  # the token we just decoded is now in the cache
                s.n_past += 1
                s.cache_tokens.append(s.next_token)
            elif s.t_prompt_done == 0.0:
                s.t_prompt_done = now
            s.batch_index, idx = -1, s.batch_index
            try:
                self._sample(s, idx, now)
            except Exception as e:  # one request's failure must not touch the others
                log.exception("sampling failed")
                self._finish(s, "error", e if isinstance(e, HearthError) else EngineError(f"sampling failed: {e}"))

    def _fill(self, generating: list[_Slot], prefilling: list[_Slot], budget: int) -> int:
        """Pack one llama_batch: every generating slot's next token, then prompt chunks."""
        batch = self._batch
        tok, pos, nseq, seq, logits = batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits
        n = 0
        for s in generating:
            tok[n] = s.next_token
            pos[n] = s.n_past
            nseq[n] = 1
            seq[n][0] = s.seq_id
            logits[n] = 1
            s.batch_index = n
            n += 1
        for s in prefilling:
            s.batch_index = -1
            if budget <= 0:
                continue
            take = min(len(s.todo), budget)
            chunk = s.todo[:take]
            base = s.n_past
            for j, t in enumerate(chunk):
                tok[n] = t
                pos[n] = base + j
                nseq[n] = 1
                seq[n][0] = s.seq_id
                logits[n] = 0
                n += 1
            budget -= take
            s.todo = s.todo[take:]
            s.n_past += take
            s.cache_tokens.extend(chunk)
            if not s.todo:
                logits[n - 1] = 1
                s.batch_index = n - 1
        return n

    def _rollback(self, saved: list[tuple[_Slot, int, int, list[int]]]) -> None:
        """Undo a failed step: llama.cpp may keep the ubatches that did fit, so drop
        every cell past what each slot held before the step."""
        for s, n_past, n_cache, todo in saved:
            s.n_past = n_past
            del s.cache_tokens[n_cache:]
            s.todo = todo
            s.batch_index = -1
            self.model.seq_clear(s.seq_id, n_past)

    def _sample(self, s: _Slot, idx: int, now: float) -> None:
        req = s.request
        assert req is not None and s.sampler is not None and s.matcher is not None
        if req.cancelled.is_set():
            self._finish(s, "cancelled", None)
            return
        token = s.sampler.sample(self.model.ctx, idx)
        lp = self._logprob(idx, token, req.params.logprobs) if req.params.logprobs is not None else None
        if not s.generated:
            s.t_first = now
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = self.model.is_eog(token)
        if eog and not req.ignore_eos:
            s.next_token = None
            text, _ = s.matcher.feed(b"", final=True)
            if text:
                self._emit(req, text, [])
            self._finish(s, "stop", None)
            return
        s.generated.append(token)
        s.next_token = token
        lps = None
        if lp is not None:
            s.logprobs.append(lp)
            lps = [lp]
        text, stopped = s.matcher.feed(self.model.token_bytes(token))
        if stopped:
            if text:
                self._emit(req, text, [token], lps)
            s.next_token = None
            self._finish(s, "stop", None)
            return
        if len(s.generated) >= s.limit:
            tail, stopped = s.matcher.feed(b"", final=True)
            if text + tail:
                self._emit(req, text + tail, [token], lps)
            s.next_token = None
            self._finish(s, "length", None)
            return
        self._emit(req, text, [token], lps)

    def _logprob(self, idx: int, token: int, top: int) -> dict[str, Any]:
        """The sampled token's log probability under the model (log-softmax of the raw
        logits, as llama-server reports them) and the ``top`` most likely tokens."""
        n_vocab = self.model.n_vocab
        row = np.ctypeslib.as_array(ll.llama_get_logits_ith(self.model.ctx, idx), shape=(n_vocab,))
        peak = float(row.max())
        lse = peak + math.log(float(np.exp(row - peak, dtype=np.float64).sum()))

        def entry(t: int) -> dict[str, Any]:
            b = self.model.token_bytes(t)
            return {"id": t, "token": b.decode("utf-8", "replace"), "bytes": list(b),
                    "logprob": float(row[t]) - lse}

        out = entry(token)
        alts: list[dict[str, Any]] = []
        if top > 0:
            best = np.argpartition(row, -top)[-top:]
            alts = [entry(int(t)) for t in best[np.argsort(-row[best], kind="stable")]]
        out["top_logprobs"] = alts
        return out

    @staticmethod
    def _emit(req: Request, text: str, tokens: list[int], logprobs: list[dict[str, Any]] | None = None) -> None:
        # A non-streaming caller waits for the result alone: waking it per token
        # would steal a core from llama.cpp's threads.
        if req.stream:
            req.put(GenerationChunk(text, tokens, logprobs=logprobs))

    def _decode_failed(self, ret: int, active: list[_Slot], prefilled: bool) -> None:
        if ret == 1 and prefilled and any(s.next_token is not None for s in active):
            # No room for the prompts: hold them back until running requests free cells.
            log.info("KV cache full: deferring prompt processing")
            self._kv_full = True
            return
        if ret == 1 and len(active) > 1:
            # Even the next tokens do not fit: fail the request holding the most cells,
            # so the others can go on.
            victim = max(active, key=lambda s: s.n_past + len(s.todo))
            victim.cache_tokens = []
            self.model.seq_clear(victim.seq_id)
            held = sum(s.n_past for s in active)
            self._finish(victim, "error", ContextOverflow(
                f"the KV cache is full ({held} tokens held by {len(active)} requests in a "
                f"context of {self.model.n_ctx}); this request was stopped to let the others finish"
            ))
            return
        msg = {1: "no room left in the KV cache", 2: "aborted"}.get(ret, f"llama_decode returned {ret}")
        log.error("decode failed: %s", msg)
        for s in active:
            s.cache_tokens = []
            self.model.seq_clear(s.seq_id)
            self._finish(s, "error", EngineError(f"generation failed: {msg}"))

    def _finish(self, s: _Slot, reason: FinishReason, error: BaseException | None) -> None:
        req = s.request
        if req is None:
            return
        now = time.perf_counter()
        if s.sampler is not None:
            s.sampler.close()
        if reason in ("cancelled", "error"):
            # keep only what is known to be in the cache
            del s.cache_tokens[s.n_past :]
        self._kv_full = False  # cells may have been freed: prompts may try again
        n_prompt = len(req.prompt_tokens)
        n_gen = len(s.generated)
        t = Timings()
        t.queue_seconds = max(0.0, s.t_start - req.submitted) if s.t_start else 0.0
        if s.t_first:
            t.ttft = s.t_first - req.submitted
            t.prompt_seconds = s.t_first - s.t_start
            decoded = n_prompt - s.cached
            if t.prompt_seconds > 0:
                t.prompt_tokens_per_second = decoded / t.prompt_seconds
            t.generation_seconds = now - s.t_first
            if n_gen > 1 and t.generation_seconds > 0:
                t.generation_tokens_per_second = (n_gen - 1) / t.generation_seconds
        t.total_seconds = now - req.submitted
        text = "".join(s.matcher.text) if s.matcher else ""
        req.result = GenerationResult(
            text=text,
            finish_reason=reason,
            usage=Usage(prompt_tokens=n_prompt, completion_tokens=n_gen, cached_tokens=s.cached),
            timings=t,
            token_ids=list(s.generated),
            model=req.model_name,
            stop_sequence=s.matcher.matched if s.matcher else None,
            logprobs=list(s.logprobs) if req.params.logprobs is not None else None,
            slot=s.seq_id,
        )
        s.last = self._figures(s, req, n_prompt - s.cached - len(s.todo), False)
        if error is not None:
            req.error = error
        elif reason == "cancelled":
            req.error = Cancelled("the request was cancelled")
        s.request = None
        s.reset()
        req.put(_DONE)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
