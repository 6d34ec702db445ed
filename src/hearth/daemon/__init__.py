"""The preload daemon: ``control`` starts, stops and asks it (stdlib only, for a fast
CLI); ``server`` is the daemon's own process (FastAPI, the pool, the models)."""

from __future__ import annotations

from typing import Any, Mapping

from .control import (
    GRACE_SECONDS,
    SERVE_COMMAND,
    START_TIMEOUT,
    DaemonFailed,
    State,
    clean_stale,
    ensure_runtime_dir,
    inspect_state,
    reload,
    start,
    status,
    stop,
)


def serve_foreground(models: list[str], load_options: Mapping[str, Any], verbose: int = 0,
                     aliases: list[str] | None = None) -> int:
    """Run the daemon's server in this process (``hearth daemon serve-foreground``)."""
    from .server import DaemonServer

    return DaemonServer(models, load_options, verbose, aliases).run()


__all__ = ["GRACE_SECONDS", "SERVE_COMMAND", "START_TIMEOUT", "DaemonFailed", "State", "clean_stale",
           "ensure_runtime_dir", "inspect_state", "reload", "serve_foreground", "start", "status", "stop"]
