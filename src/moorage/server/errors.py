"""One error vocabulary over HTTP: every failure becomes ``{"error": {"message", "type", "code"}}``,
with the request's id in ``error.request_id`` (the ``X-Request-ID`` response header's value), so a
user's report of an error finds its log lines.

`MoorageError` carries its status and code; pydantic validation errors become 422 naming the
field; Starlette's own HTTP errors (unknown route, wrong method) keep their status; anything else
is logged with its traceback and answered with an opaque 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from ..errors import ModelLoading, MoorageError, Overloaded
from ..observability.logging import request_id
from .common import ClientGone

log = logging.getLogger("moorage.server")

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


class _ErrorDetail(BaseModel):
    message: str
    type: str
    code: str
    param: str | None = None
    request_id: str | None = None


class ErrorBody(BaseModel):
    """Every error: ``{"error": {"message", "type", "code", "param", "request_id"}}`` (OpenAI's shape)."""

    error: _ErrorDetail


# Declared on every route so that the OpenAPI schema describes the errors the server really sends.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "bad request (stable code in error.code)",
        401: "no API key, or an invalid, revoked or expired one",
        403: "the key's role or model patterns do not allow this",
        404: "unknown model, version, alias, job, key or route",
        409: "conflict (e.g. nothing to roll back, task mismatch)",
        413: "body, upload, text or input count too large",
        422: "a field is invalid (error.param names it)",
        429: "overloaded or rate limited; see Retry-After",
        500: "internal error (opaque; logged on the server)",
        503: "not ready (models loading) or a backing store is unavailable",
        504: "deadline exceeded while queued",
    }.items()
}


def error_body(message: str, type_: str, code: str, param: str | None = None) -> dict[str, Any]:
    """The error object, with the id of the request being handled (none outside a request)."""
    error = {"message": message, "type": type_, "code": code, "param": param}
    rid = request_id.get()
    return {"error": error | {"request_id": rid}} if rid is not None else {"error": error}


def error_response(exc: MoorageError) -> JSONResponse:
    headers = {}
    if isinstance(exc, Overloaded | ModelLoading):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="moorage"'

    if exc.public is not None and exc.message != exc.public:
        log.warning("answered %d %s to a client; the error was: %s", exc.status, exc.code, exc.message)
    body = error_body(exc.client_message, exc.type, exc.code, exc.param)
    return JSONResponse(body, status_code=exc.status, headers=headers)


async def _moorage_error(request: Request, exc: MoorageError) -> JSONResponse:
    return error_response(exc)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    # keep field names and indexes; drop "body" and pydantic's union-member tags (e.g. "constrained-str")
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and (isinstance(p, int) or str(p).isidentifier())]
    where = ".".join(loc) or "body"
    message = f"{where}: {first.get('msg', 'invalid value')}"
    if first.get("type") == "json_invalid":
        message = "the request body is not valid JSON"
    return JSONResponse(error_body(message, "invalid_request_error", "invalid_input", where), status_code=422)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return JSONResponse(
        error_body(str(exc.detail), "invalid_request_error", code), status_code=exc.status_code, headers=exc.headers
    )


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody reads it: the client disconnected


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return unexpected_response(request.method, request.url.path, exc)


def unexpected_response(method: str, path: str, exc: BaseException) -> JSONResponse:
    """The opaque 500 of an exception no handler knows; its traceback goes to the log only."""
    log.error("unexpected error on %s %s", method, path, exc_info=exc)
    return JSONResponse(error_body("internal server error", "server_error", "internal_error"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    # FastAPI's decorator form: Starlette types add_exception_handler for handlers of any Exception,
    # so a handler of one exception class (as these are) only fits the decorator's signature.
    app.exception_handler(MoorageError)(_moorage_error)
    app.exception_handler(RequestValidationError)(_validation_error)
    app.exception_handler(HTTPException)(_http_error)
    app.exception_handler(ClientGone)(_client_gone)
    app.exception_handler(Exception)(_unexpected)
