"""One exception hierarchy for everything hearth refuses or fails at.

Every error a user can cause is a ``HearthError`` with a one-line message. The CLI
maps ``exit_code`` and the HTTP server maps ``http_status`` in one place each, so no
front end invents its own mapping.
"""

from __future__ import annotations


class HearthError(Exception):
    """Base class: a clear, one-line message meant for the user."""

    exit_code: int = 2
    http_status: int = 400
    code: str = "hearth_error"

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self)


class ModelNotFound(HearthError):
    """No such file, or a name hearth does not know."""

    http_status = 404
    code = "model_not_found"


class InvalidModel(HearthError):
    """The file exists but is not a usable model (corrupt, truncated, unsupported)."""

    code = "invalid_model"


class UnsupportedFormat(HearthError):
    """A model format no installed engine can run."""

    code = "unsupported_format"


class DoesNotFit(HearthError):
    """The model (with the requested context) cannot fit in this machine's memory."""

    http_status = 507
    code = "does_not_fit"


class BadRequest(HearthError):
    """Invalid parameters: sampling settings, grammar, sizes."""

    code = "invalid_request"


class ContextOverflow(BadRequest):
    """The prompt (plus what must be generated) does not fit in the context.
    ``n_prompt_tokens`` and ``n_ctx``, when known, go into the HTTP error as
    llama-server's ``exceed_context_size_error`` does."""

    code = "context_length_exceeded"

    def __init__(self, message: str, n_prompt_tokens: int | None = None, n_ctx: int | None = None) -> None:
        super().__init__(message)
        self.n_prompt_tokens = n_prompt_tokens
        self.n_ctx = n_ctx


class ConfigError(HearthError):
    """A setting in the config file or the environment has an invalid value."""

    code = "invalid_config"


class Busy(HearthError):
    """Too many requests are waiting; try again later."""

    http_status = 503
    exit_code = 3
    code = "busy"


class Cancelled(HearthError):
    """The request was cancelled before it finished."""

    http_status = 499
    exit_code = 130
    code = "cancelled"


class EngineError(HearthError):
    """The engine failed in a way that is not the user's fault."""

    http_status = 500
    exit_code = 1
    code = "engine_error"


class DownloadError(HearthError):
    """A pull failed: no network, offline mode, the hub refused, a bad checksum."""

    http_status = 502
    exit_code = 1
    code = "download_failed"


class ChecksumMismatch(DownloadError):
    """A downloaded file's sha256 is not the published one; the file was removed."""

    code = "checksum_mismatch"


class DiskFull(DownloadError):
    """Not enough free disk for a pull (checked before it starts)."""

    http_status = 507
    code = "disk_full"


class NotOwned(HearthError):
    """``models rm`` on something hearth did not download (Ollama's blobs, a user's file)."""

    http_status = 403
    code = "not_owned"


class ModelChanged(HearthError):
    """A loaded model's file was changed in place; new requests may not use the stale mapping."""

    http_status = 409
    exit_code = 1
    code = "model_changed"


class WorkerError(HearthError):
    """An RPC worker (``hearth worker``) that cannot be used: unreachable, busy, another
    protocol version."""

    http_status = 502
    exit_code = 1
    code = "worker_unavailable"


class RpcUnavailable(HearthError):
    """This llama-cpp-python was built without the RPC backend."""

    exit_code = 2
    code = "rpc_unavailable"
