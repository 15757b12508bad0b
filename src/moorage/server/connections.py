"""Connection limits uvicorn does not have: a deadline for a request's headers, and a cap on open
connections that holds for connections that never send a request.

uvicorn arms no timer on a connection until it has answered a request (then the keep-alive
timeout), so a client that connects and sends nothing, or sends a header line now and then
(slowloris), holds a connection, a file descriptor and memory for as long as it likes; and its
``limit_concurrency`` answers 503 only to a request whose headers arrived, so such connections pile
up uncounted until the process runs out of descriptors. Here, every connection must deliver the
complete headers of a request within ``serve.header_timeout_s`` of connecting (or, on a kept-alive
connection, of the first byte of the next request), or it is closed; and a connection beyond
``serve.limit_concurrency`` is answered 503 and closed at once instead of being held.

The body is not under this deadline (an upload may take minutes): its size is bounded by the edge
middleware, its pace only by the request's own deadline. With TLS (``serve.ssl_certfile``) a
connection reaches this protocol only once its handshake is done: until then it is neither counted
nor timed here, and the event loop holds an unfinished handshake up to its default of 60 s (uvicorn
does not pass ``ssl_handshake_timeout``). Where that matters, terminate TLS in a proxy in front.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any

import orjson
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("moorage.server")


def _response(status: bytes, message: str, kind: str, code: str, headers: bytes = b"") -> bytes:
    """A whole HTTP/1.1 response with moorage's error body, for a connection the app never sees."""
    body = orjson.dumps({"error": {"message": message, "type": kind, "code": code}})
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n" + headers + b"connection: close\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


TOO_MANY_CONNECTIONS = _response(
    b"503 Service Unavailable",
    "too many open connections; retry shortly",
    "server_error",
    "overloaded",
    b"retry-after: 1\r\n",
)
HEADERS_TOO_LARGE = _response(
    b"431 Request Header Fields Too Large",
    "the request headers are too large",
    "invalid_request_error",
    "headers_too_large",
)


class _Bounded:
    """Mixed into one of uvicorn's HTTP/1.1 protocols (which own `connections`, `cycle` and
    `transport`); one instance per connection."""

    connections: set
    cycle: Any
    transport: asyncio.Transport

    def __init__(
        self, *args: Any, header_timeout_s: float, max_header_bytes: int, max_connections: int | None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._max_header_bytes = max_header_bytes
        self._max_connections = max_connections
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0  # of the request whose headers are arriving
        self._tail = b""  # the last bytes of the previous chunk: the end of the headers may straddle two

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if self._max_connections is not None and len(self.connections) > self._max_connections:
            log.warning("%d connections open (serve.limit_concurrency): refused one", len(self.connections) - 1)
            self.transport.write(TOO_MANY_CONNECTIONS)
            self.transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers and self._too_large(data):
            log.debug("refused request headers over %d bytes", self._max_header_bytes)
            self._disarm()
            self.transport.write(HEADERS_TOO_LARGE)
            self.transport.close()
            return
        super().data_received(data)  # type: ignore[misc]
        if self.transport.is_closing():
            self._disarm()
        elif self._awaiting_headers:  # a request has begun, its headers are not all here
            if self._header_timer is None:  # from its first byte, not reset by each byte (slowloris)
                self._arm()
        else:  # the headers are complete: the request is the app's now
            self._disarm()
            self._header_bytes, self._tail = 0, b""

    @property
    def _awaiting_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _too_large(self, data: bytes) -> bool:
        """Count the bytes up to the end of the headers; those of the body that follows are not headers."""
        end = (self._tail + data).find(b"\r\n\r\n")
        self._header_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._tail))
        self._tail = data[-3:]
        return self._header_bytes > self._max_header_bytes

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        self._header_timer = asyncio.get_running_loop().call_later(self._header_timeout_s, self._headers_too_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            log.debug("closed a connection that sent no complete request headers in %ss", self._header_timeout_s)
            self.transport.close()


class BoundedH11Protocol(_Bounded, H11Protocol):
    pass


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # uvicorn without its [standard] extra: h11 only
    BoundedHttpToolsProtocol = None
else:

    class BoundedHttpToolsProtocol(_Bounded, HttpToolsProtocol):  # type: ignore[no-redef]
        pass


def bounded_protocol(header_timeout_s: float, max_header_bytes: int, max_connections: int | None) -> partial:
    """The `http` protocol factory for uvicorn: httptools where installed (what uvicorn's ``auto``
    picks), else h11. A partial of a module-level class, so that it pickles to `--workers` processes."""
    protocol = BoundedHttpToolsProtocol or BoundedH11Protocol
    return partial(
        protocol, header_timeout_s=header_timeout_s, max_header_bytes=max_header_bytes, max_connections=max_connections
    )
