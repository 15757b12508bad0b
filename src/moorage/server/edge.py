"""A pure-ASGI middleware at the edge: names, bounds and counts every request.

Each request gets an id: the caller's ``X-Request-ID`` if it is a sane one (1 to 128 letters, digits
and ``._:-``), else a new one. It is echoed in the response's ``X-Request-ID`` header, held in
`moorage.observability.logging.request_id` while the request is handled (every log line and every
error body carries it), and recorded on the request's spans. With tracing on, the W3C
``traceparent`` header becomes the parent of the request's spans. An exception that no route or
handler answered becomes the opaque 500 here, so that it too carries the header and the id.

Routes name the model version they served in ``request.state.labels``; when the response has been
sent (streams included) the request is counted by status and its latency observed.
"""

from __future__ import annotations

import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import BadRequest, MoorageError, PayloadTooLarge
from ..observability import metrics, tracing
from ..observability.logging import request_id
from .errors import error_response, unexpected_response

REQUEST_ID_HEADER = b"x-request-id"
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, upload_bytes: int | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.upload_bytes = upload_bytes or max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        rid = new_request_id(headers.get(REQUEST_ID_HEADER))
        token = request_id.set(rid)
        parent = None
        if tracing.is_enabled():  # off: not even the header is read
            traceparent = headers.get(b"traceparent", b"").decode("latin-1")
            parent = tracing.incoming.set(tracing.valid_traceparent(traceparent))
        try:
            await self._handle(scope, receive, _with_request_id(send, rid), headers)
        finally:
            if parent is not None:
                tracing.incoming.reset(parent)
            request_id.reset(token)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes]) -> None:
        declared = headers.get(b"content-length")
        if declared is not None and not declared.isdigit():
            await reject(scope, receive, send, BadRequest("the Content-Length header is not a number"))
            return
        upload = scope["method"] == "POST" and is_upload(scope["path"])  # streamed to disk by its route
        limit = self.upload_bytes if upload else self.max_body_bytes
        if declared is not None and int(declared) > limit:
            await reject(scope, receive, send, PayloadTooLarge(f"the request body is larger than {limit} bytes"))
            return
        started = time.perf_counter()
        # a per-request copy: some servers hand every request the same lifespan-state dict
        state = scope["state"] = {k: v for k, v in (scope.get("state") or {}).items() if k != "labels"}
        if declared is None and scope["method"] in ("POST", "PUT", "PATCH") and not upload:
            body = await _read_bounded(receive, self.max_body_bytes)  # chunked: count while reading
            if body is None:
                too_large = PayloadTooLarge(f"the request body is larger than {self.max_body_bytes} bytes")
                await reject(scope, receive, send, too_large)
                return
            receive = _replay(body, receive)

        send_tracked, status = track_status(send)
        try:
            await self._answered(scope, receive, send_tracked)
        finally:
            labels = state.get("labels")
            if labels is None and scope["path"].startswith("/v1/"):
                labels = ("-", "-")  # failed before a model was chosen (unknown model, bad body)
            if labels is not None:
                metrics.REQUESTS.labels(*labels, str(status[0])).inc()
                metrics.REQUEST_LATENCY.labels(*labels).observe(time.perf_counter() - started)

    async def _answered(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app's answer, or the opaque 500 of an exception raised before the response started."""
        started = False

        async def watching(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watching)
        except Exception as exc:
            if started:  # a response is under way: the server closes the connection
                raise
            await unexpected_response(scope["method"], scope["path"], exc)(scope, receive, watching)


def new_request_id(offered: bytes | None) -> str:
    """The caller's request id if it is a sane one, else a new random one."""
    if offered is not None and _SANE_REQUEST_ID.fullmatch(offered):
        return offered.decode("ascii")
    return uuid.uuid4().hex


def _with_request_id(send: Send, rid: str) -> Send:
    header = (REQUEST_ID_HEADER, rid.encode("ascii"))

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), header]}
        await send(message)

    return sending


def is_upload(path: str) -> bool:
    """Model uploads (``POST /v1/registry/models/{name}/versions``) are bounded by their own limit."""
    return path.startswith("/v1/registry/models/") and path.endswith("/versions")


async def _read_bounded(receive: Receive, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def reject(scope: Scope, receive: Receive, send: Send, exc: MoorageError) -> None:
    """Answer `exc` from a pure-ASGI middleware, exactly as a route's error would be answered."""
    await error_response(exc)(scope, receive, send)


def track_status(send: Send) -> tuple[Send, list[int]]:
    """(a `send` that records the response status, the one-item list it records it in; 500 until sent)."""
    status = [500]

    async def tracked(message: Message) -> None:
        if message["type"] == "http.response.start":
            status[0] = message["status"]
        await send(message)

    return tracked, status
