"""One exception tree for the whole package.

Every error a user can trigger is a `MoorageError`: it carries the HTTP status a server answers
with and a stable machine-readable `code`, and its message says what went wrong and, where it
can, how to fix it. Edges (CLI, HTTP, stream workers) catch `MoorageError` once and render it;
anything else is a bug and is logged with its traceback.
"""

from __future__ import annotations


class MoorageError(Exception):
    """Base of every error moorage raises on purpose."""

    status: int = 500
    code: str = "internal_error"
    type: str = "server_error"
    # What a network client is told instead of `message`, for an error whose message may name
    # infrastructure (a database URL, host, port, user or driver): the message goes to the log only.
    public: str | None = None
    param: str | None = None  # the request field at fault, when one is (OpenAI clients read error.param)

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if param is not None:
            self.param = param

    @property
    def client_message(self) -> str:
        """The text an HTTP body (or another remote caller) may carry."""
        return self.public or self.message


class BadRequest(MoorageError):
    status = 400
    code = "bad_request"
    type = "invalid_request_error"


class InvalidReference(BadRequest):
    code = "invalid_reference"


class InvalidName(BadRequest):
    code = "invalid_name"


class NotFound(MoorageError):
    status = 404
    code = "not_found"
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(MoorageError):
    status = 409
    code = "conflict"
    type = "invalid_request_error"


class IntegrityError(MoorageError):
    """An artifact does not match its manifest (tampered, truncated or missing file)."""

    status = 409
    code = "checksum_mismatch"
    type = "invalid_request_error"


class UnsafeArtifact(MoorageError):
    """An artifact would need pickle (or another unsafe format) to load."""

    status = 400
    code = "unsafe_artifact"
    type = "invalid_request_error"


class InvalidArtifact(BadRequest):
    """A model file or archive member moorage refuses to store: a malformed safetensors header, an
    absolute or ``..`` name, a setuid/setgid file, a device, fifo or sparse member."""

    code = "invalid_artifact"


class ModelLoadFailed(MoorageError):
    """A registered version could not be loaded (its files or its handler failed): serve another
    version, e.g. move the alias back."""

    status = 422
    code = "model_load_failed"
    type = "invalid_request_error"


class ConfigError(MoorageError):
    status = 500
    code = "config_error"


class MissingDependency(MoorageError):
    """An optional extra is not installed; the message names the extra."""

    status = 501
    code = "missing_dependency"


class Unprocessable(MoorageError):
    status = 422
    code = "invalid_input"
    type = "invalid_request_error"


class PayloadTooLarge(MoorageError):
    status = 413
    code = "payload_too_large"
    type = "invalid_request_error"


class Overloaded(MoorageError):
    """A bounded queue is full: try again after `retry_after` seconds (HTTP 429 + Retry-After)."""

    status = 429
    code = "overloaded"
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class RateLimited(Overloaded):
    """A key spent its requests or tokens for the minute (HTTP 429 + Retry-After)."""

    code = "rate_limited"


class Unauthorized(MoorageError):
    """No API key, or one that is unknown, revoked or expired (HTTP 401)."""

    status = 401
    code = "invalid_api_key"
    type = "authentication_error"


class Forbidden(MoorageError):
    """A valid key without the right for this action or model (HTTP 403)."""

    status = 403
    code = "permission_denied"
    type = "permission_error"


class ContentBlocked(BadRequest):
    """A content filter refused the input (HTTP 400)."""

    code = "content_blocked"


class EncryptionError(MoorageError):
    """An encrypted artifact cannot be opened: no master key, the wrong one, or tampered bytes."""

    status = 500
    code = "encryption_error"


class NotReady(MoorageError):
    status = 503
    code = "not_ready"
    type = "server_error"


class ModelLoading(NotReady):
    """The served models are still loading (a cold start) and the request's hold ran out, or the hold
    is full: HTTP 503 with Retry-After."""

    code = "model_loading"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class EngineFailed(NotReady):
    """The engine of a model version died (a bug or a broken device): every waiting call fails at once
    with 503 instead of hanging, and ``/readyz`` answers 503 until the process is restarted."""

    code = "engine_failed"


class DeadlineExceeded(MoorageError):
    """A request waited in a queue past its deadline and was never started."""

    status = 504
    code = "deadline_exceeded"
    type = "timeout_error"


def require(module: str, extra: str):
    """Import an optional dependency, or fail with the pip command that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised when extras are absent
        raise MissingDependency(
            f"'{module}' is not installed; install it with: pip install 'moorage[{extra}]'"
        ) from exc
