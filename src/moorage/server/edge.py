"""A pure-ASGI middleware at the edge: bounds the request body and counts every request.

Routes name the model version they served in ``request.state.labels``; when the response has been
sent (streams included) the request is counted by status and its latency observed.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import BadRequest, MoorageError, PayloadTooLarge
from ..observability import metrics
from .errors import error_response


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, upload_bytes: int | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.upload_bytes = upload_bytes or max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
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
            await self.app(scope, receive, send_tracked)
        finally:
            labels = state.get("labels")
            if labels is None and scope["path"].startswith("/v1/"):
                labels = ("-", "-")  # failed before a model was chosen (unknown model, bad body)
            if labels is not None:
                metrics.REQUESTS.labels(*labels, str(status[0])).inc()
                metrics.REQUEST_LATENCY.labels(*labels).observe(time.perf_counter() - started)


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
