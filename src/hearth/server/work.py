"""Bounded worker pools for what must not run on the event loop.

The event loop does I/O only. CPU work (tokenizing, template rendering, grammar
compilation, detokenizing), disk work (the store's scans, GGUF headers), model
loads and pulls each go to a pool of their own, so a burst of one kind cannot starve the others
(the default executor is shared by everything and small on small machines).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_CPU = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="hearth-cpu")
_DISK = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hearth-disk")
_LOAD = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hearth-load")
_PULL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hearth-pull")


async def _run(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    return await loop.run_in_executor(pool, functools.partial(ctx.run, fn, *args, **kw))


async def cpu(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Tokenize, render, compile a grammar, detokenize."""
    return await _run(_CPU, fn, *args, **kw)


async def disk(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Resolve names in the store, read GGUF headers, stat files."""
    return await _run(_DISK, fn, *args, **kw)


async def load(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Load or free a model."""
    return await _run(_LOAD, fn, *args, **kw)


async def pull(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Download a model (long: minutes)."""
    return await _run(_PULL, fn, *args, **kw)
