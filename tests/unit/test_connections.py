"""The connection limits of `moorage serve` (server/connections.py) on a real uvicorn server in this
process: a request's headers within their deadline and size pass, the body does not count as
headers, and a connection that sends no complete headers is closed at the deadline."""

from __future__ import annotations

import asyncio
import socket

import pytest

uvicorn = pytest.importorskip("uvicorn")

from moorage.server.connections import bounded_protocol  # noqa: E402

from tests.support import eventually  # noqa: E402

pytestmark = pytest.mark.anyio
MAX_HEADER_BYTES = 4096


async def _app(scope, receive, send):
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = str(size).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]}
    )
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def server():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        _app,
        lifespan="off",
        log_level="warning",
        timeout_keep_alive=60,  # longer than any wait here: a close comes from the header deadline
        http=bounded_protocol(header_timeout_s=0.5, max_header_bytes=MAX_HEADER_BYTES, max_connections=None),
    )
    srv = uvicorn.Server(config)
    task = asyncio.create_task(srv.serve(sockets=[sock]))
    await eventually(lambda: srv.started, what="the server listens")
    yield sock.getsockname()[1]
    srv.should_exit = True
    await task
    sock.close()


async def _exchange(port: int, *chunks: bytes) -> bytes:
    """Send `chunks` one write each; everything the server answers until it closes (or 10 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_headers_within_the_limit_pass_and_the_body_does_not_count_as_headers(server):
    body = b"x" * (MAX_HEADER_BYTES * 16)
    head = b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode()
    whole = await _exchange(server, head + b"\r\n\r\n" + body)  # headers and body in one write
    assert whole.startswith(b"HTTP/1.1 200") and whole.endswith(str(len(body)).encode())
    straddling = await _exchange(server, head + b"\r\n\r", b"\n" + body)  # the end of the headers split
    assert straddling.startswith(b"HTTP/1.1 200")


async def test_too_large_headers_are_answered_431(server):
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * MAX_HEADER_BYTES + b"\r\n\r\n"
    answer = await _exchange(server, big[:1000], big[1000:])
    assert answer.startswith(b"HTTP/1.1 431") and b'"code":"headers_too_large"' in answer


async def test_a_connection_without_complete_headers_is_closed_at_the_deadline(server):
    assert await _exchange(server) == b""  # nothing sent: closed, no answer
    assert await _exchange(server, b"GET / HTTP/1.1\r\nHost: x\r\n") == b""  # half a request (slowloris)
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    assert await reader.readexactly(1) == b"0"
    writer.write(b"GET / HT")  # the next request on the kept-alive connection stops halfway
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
