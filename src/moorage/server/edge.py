"""A pure-ASGI middleware at the edge: bounds the request body and counts every request.

Routes name the model version they served in ``request.state.labels``; when the response has been
sent (streams included) the request is counted by status and its latency observed.
"""

from __future__ import annotations

import json
import time

from ..errors import PayloadTooLarge
from ..observability import metrics


class EdgeMiddleware:
    def __init__(self, app, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await _reject(send, self.max_body_bytes, declared)
            return
        started = time.perf_counter()
        # a per-request copy: some servers hand every request the same lifespan-state dict
        state = scope["state"] = {k: v for k, v in (scope.get("state") or {}).items() if k != "labels"}
        status = [500]
        received = [0]
        limit = self.max_body_bytes

        async def receive_bounded():
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
            return message

        async def send_tracked(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive_bounded, send_tracked)
        finally:
            labels = state.get("labels")
            if labels is None and scope["path"].startswith("/v1/"):
                labels = ("-", "-")  # failed before a model was chosen (unknown model, bad body)
            if labels is not None:
                metrics.REQUESTS.labels(*labels, str(status[0])).inc()
                metrics.REQUEST_LATENCY.labels(*labels).observe(time.perf_counter() - started)


async def _reject(send, limit: int, declared: bytes) -> None:
    if declared.isdigit():
        status, code, message = 413, "payload_too_large", f"the request body is larger than {limit} bytes"
    else:
        status, code, message = 400, "bad_request", "the Content-Length header is not a number"
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
