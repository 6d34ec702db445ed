"""A llama.cpp model and context, loaded from a LoadPlan on llama-cpp-python's low-level API."""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import threading
from pathlib import Path

import llama_cpp as ll

from ...errors import EngineError, InvalidModel
from ...gguf import ModelInfo
from ...planner import KV_GGML_TYPE, LoadPlan

log = logging.getLogger("hearth.llama_cpp")
# llama.cpp's own log is silent unless asked for (hearth -v, HEARTH_DEBUG=1).
# hearth raises its own one-line errors for what llama.cpp reports.
if log.level == logging.NOTSET:
    log.setLevel(logging.CRITICAL)

# enum ggml_log_level: NONE=0, DEBUG=1, INFO=2, WARN=3, ERROR=4, CONT=5
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_backend_lock = threading.Lock()
_backend_ready = False
_last_level = logging.DEBUG


@ll.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """Route llama.cpp's log into ``logging`` (quiet unless hearth's debug is on)."""
    global _last_level
    lvl = _last_level if level == 5 else _LEVELS.get(level, logging.DEBUG)
    _last_level = lvl
    if log.isEnabledFor(lvl):
        msg = text.decode("utf-8", errors="replace").rstrip("\n")
        if msg:
            log.log(lvl, "%s", msg)


def init_backend(numa: bool = False) -> None:
    global _backend_ready
    with _backend_lock:
        if _backend_ready:
            return
        ll.llama_log_set(_log_callback, ctypes.c_void_p(0))
        ll.llama_backend_init()
        if numa:
            ll.llama_numa_init(ll.GGML_NUMA_STRATEGY_DISTRIBUTE)
        _backend_ready = True


class LlamaModel:
    """Owns a ``llama_model`` and one ``llama_context``; everything else borrows them."""

    def __init__(self, info: ModelInfo, plan: LoadPlan) -> None:
        init_backend(plan.numa)
        self.info = info
        self.plan = plan
        self.path = Path(info.path)
        self.model = None
        self.ctx = None

        mp = ll.llama_model_default_params()
        mp.n_gpu_layers = plan.n_gpu_layers
        if plan.use_mmap and plan.use_mlock:
            mp.load_mode = ll.LLAMA_LOAD_MODE_MMAP_MLOCK
        elif plan.use_mlock:
            mp.load_mode = ll.LLAMA_LOAD_MODE_MLOCK
        elif plan.use_mmap:
            mp.load_mode = ll.LLAMA_LOAD_MODE_MMAP
        else:
            mp.load_mode = ll.LLAMA_LOAD_MODE_NONE
        # a split across devices (other hosts' through RPC): the plan's device list and
        # proportions, as llama-server's --device/--tensor-split; none: llama.cpp's default
        self._devices = self._split = None
        devices = list(getattr(plan, "devices", None) or [])
        if devices:
            from ...rpc import device_handles

            self._devices = device_handles(devices)
            mp.devices = ctypes.cast(self._devices, ctypes.c_void_p)
            split = list(getattr(plan, "tensor_split", None) or [])
            if split:
                self._split = (ctypes.c_float * ll.LLAMA_MAX_DEVICES)(*split[: ll.LLAMA_MAX_DEVICES])
                mp.tensor_split = self._split
        model = ll.llama_model_load_from_file(str(self.path).encode(), mp)
        if not model:
            raise InvalidModel(f"{self.path}: llama.cpp could not load this model (run with -v for its log)")
        self.model = model
        self.vocab = ll.llama_model_get_vocab(model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)

        cp = ll.llama_context_default_params()
        cp.n_ctx = plan.n_ctx_total  # one KV stream of plan.n_ctx cells per slot
        cp.n_batch = plan.n_batch
        cp.n_ubatch = plan.n_ubatch
        cp.n_seq_max = plan.parallel
        cp.n_threads = plan.n_threads
        cp.n_threads_batch = plan.n_threads_batch
        cp.type_k = KV_GGML_TYPE[plan.kv_type]
        cp.type_v = KV_GGML_TYPE[plan.kv_type]
        cp.flash_attn_type = (
            ll.LLAMA_FLASH_ATTN_TYPE_AUTO
            if plan.flash_attn is None
            else (ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if plan.flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        )
        cp.swa_full = plan.swa_full
        cp.kv_unified = False  # per-slot streams: a request's text does not depend on its neighbours
        cp.no_perf = True
        ctx = ll.llama_init_from_model(model, cp)
        if not ctx:
            self.close()
            raise EngineError(
                f"llama.cpp could not create a context of {plan.n_ctx} tokens for {self.path.name}"
            )
        self.ctx = ctx
        self.memory = ll.llama_get_memory(ctx)
        self.n_ctx = ll.llama_n_ctx(ctx)
        self.n_ctx_seq = ll.llama_n_ctx_seq(ctx)
        self.n_batch = ll.llama_n_batch(ctx)
        self.n_seq_max = ll.llama_n_seq_max(ctx)
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self.vocab))
        self.bos = ll.llama_vocab_bos(self.vocab)
        self.eos = ll.llama_vocab_eos(self.vocab)
        # token -> bytes; filled from any thread (a dict store is atomic, and each miss
        # uses a buffer of its own: a shared one raced between the worker and callers)
        self._piece_cache: dict[int, bytes] = {}
        self.n_embd = ll.llama_model_n_embd(model)
        # the embedding context: made on first use, beside the generation context
        self._embed_lock = threading.Lock()
        self._embed_ctx = None
        self._embed_n_ctx = 0

    # -- vocabulary -----------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (ll.llama_token * n_max)()
        n = ll.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            n_max = -n
            buf = (ll.llama_token * n_max)()
            n = ll.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
            if n < 0:
                raise EngineError("tokenization failed")
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token renders to (control tokens render empty)."""
        piece = self._piece_cache.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            piece = buf.raw[:n]
            self._piece_cache[token] = piece
        return piece

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def special_piece(self, token: int) -> bytes:
        """The bytes of a token with control tokens written out (``<|im_end|>``), as
        llama.cpp's ``common_token_to_piece`` gives them to llama-server's routes."""
        buf = ctypes.create_string_buffer(64)
        n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[:n]

    def fim_tokens(self) -> dict[str, int]:
        """The fill-in-the-middle tokens the vocabulary has: pre, suf, mid (needed),
        rep, sep, pad (optional)."""
        out = {}
        for name in ("pre", "suf", "mid", "rep", "sep", "pad"):
            tok = getattr(ll, f"llama_vocab_fim_{name}")(self.vocab)
            if tok is not None and tok >= 0:
                out[name] = int(tok)
        return out

    def token_text(self, token: int) -> str:
        """The vocabulary entry of a token (special tokens too), e.g. ``<|im_end|>``."""
        raw = ll.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self.vocab, token))

    @functools.cached_property
    def eog_tokens(self) -> tuple[int, ...]:
        """Every end-of-generation token of the vocabulary (EOS, EOT, <|im_end|>, ...)."""
        return tuple(t for t in range(self.n_vocab) if ll.llama_vocab_is_eog(self.vocab, t))

    # -- KV memory ------------------------------------------------------------------

    def seq_clear(self, seq_id: int, p0: int = 0) -> None:
        ll.llama_memory_seq_rm(self.memory, seq_id, p0, -1)

    # -- embeddings -----------------------------------------------------------------

    EMBED_MAX_SEQS = 16

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Mean-pooled, L2-normalised embeddings, one per token list.

        A second context on the same weights (``embeddings=True``, mean pooling) is
        made on first use and grown to fit the longest input; inputs are packed as
        separate sequences into one batch, as many as fit. One call at a time.
        """
        with self._embed_lock:
            if self.model is None:
                raise EngineError("the model has been unloaded")
            ctx = self._embedding_context(max(len(t) for t in inputs))
            n_cap = self._embed_n_ctx
            mem = ll.llama_get_memory(ctx)
            batch = ll.llama_batch_init(n_cap, 0, 1)
            out: list[list[float]] = []
            try:
                i = 0
                while i < len(inputs):
                    group: list[list[int]] = []
                    used = 0
                    while i < len(inputs) and len(group) < self.EMBED_MAX_SEQS and used + len(inputs[i]) <= n_cap:
                        group.append(inputs[i])
                        used += len(inputs[i])
                        i += 1
                    n = 0
                    for seq, toks in enumerate(group):
                        for pos, t in enumerate(toks):
                            batch.token[n] = t
                            batch.pos[n] = pos
                            batch.n_seq_id[n] = 1
                            batch.seq_id[n][0] = seq
                            batch.logits[n] = 1
                            n += 1
                    batch.n_tokens = n
                    ll.llama_memory_clear(mem, True)
                    ret = ll.llama_decode(ctx, batch)
                    if ret != 0:
                        raise EngineError(f"embedding failed: llama_decode returned {ret}")
                    for seq in range(len(group)):
                        ptr = ll.llama_get_embeddings_seq(ctx, seq)
                        if not ptr:
                            raise EngineError("embedding failed: llama.cpp returned no pooled embedding")
                        vec = ptr[: self.n_embd]
                        norm = math.sqrt(math.fsum(x * x for x in vec))
                        out.append([x / norm for x in vec] if norm > 0 else list(vec))
            finally:
                ll.llama_batch_free(batch)
            return out

    def _embedding_context(self, longest: int):
        if self._embed_ctx is not None and longest <= self._embed_n_ctx:
            return self._embed_ctx
        n_ctx = max(512, -(-longest // 256) * 256, self._embed_n_ctx)
        self._free_embedding_context()
        plan = self.plan
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_ctx
        cp.n_ubatch = n_ctx  # a sequence must not be split across ubatches when pooling
        cp.n_seq_max = self.EMBED_MAX_SEQS
        cp.kv_unified = True
        cp.n_threads = plan.n_threads
        cp.n_threads_batch = plan.n_threads_batch
        cp.embeddings = True
        cp.pooling_type = ll.LLAMA_POOLING_TYPE_MEAN
        cp.no_perf = True
        ctx = ll.llama_init_from_model(self.model, cp)
        if not ctx:
            raise EngineError(f"llama.cpp could not create an embedding context of {n_ctx} tokens")
        self._embed_ctx, self._embed_n_ctx = ctx, n_ctx
        return ctx

    def _free_embedding_context(self) -> None:
        if self._embed_ctx is not None:
            ll.llama_free(self._embed_ctx)
            self._embed_ctx = None

    def close(self) -> None:
        lock = getattr(self, "_embed_lock", None)  # absent if __init__ failed early
        if lock is not None:
            with lock:
                self._free_embedding_context()
        if self.ctx is not None:
            ll.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            ll.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:  # pragma: no cover - safety net
        try:
            self.close()
        except Exception:
            pass
