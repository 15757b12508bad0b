"""A small closed-loop HTTP/1.1 load generator for benchmarks (keep-alive, pre-encoded requests).

Each of `concurrency` clients sends its next request as soon as the previous answer arrived, until
`total` requests were sent or `seconds` passed. It is deliberately lean (raw asyncio streams, no
HTTP library) because on a small machine the load generator shares the CPU with the server.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return percentile(self.latencies, q)

    def summary(self) -> dict:
        return {
            "concurrency": self.concurrency,
            "requests_ok": self.ok,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "seconds": round(self.seconds, 3),
            "throughput_rps": round(self.throughput, 1),
            "p50_ms": round(self.percentile(50) * 1000, 2),
            "p99_ms": round(self.percentile(99) * 1000, 2),
        }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, int(q) - 1))]


def encode_post(host: str, port: int, path: str, body: bytes, key: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{auth}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:] if line)}
    if b"content-length" in headers:
        return status, await reader.readexactly(int(headers[b"content-length"]))
    body = b""  # chunked
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, body
        body += chunk[:-2]


async def run_load(
    host: str, port: int, requests: list[bytes], concurrency: int, total: int, seconds: float
) -> LoadResult:
    """Send pre-encoded `requests` (cycled) with `concurrency` connections."""
    result = LoadResult(concurrency, 0.0)
    sent = 0
    stop_at = time.perf_counter() + seconds

    async def client(index: int) -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while sent < total and time.perf_counter() < stop_at:
                request = requests[(sent + index) % len(requests)]
                sent += 1
                started = time.perf_counter()
                writer.write(request)
                status, _ = await _read_response(reader)
                result.latencies.append(time.perf_counter() - started)
                result.statuses[status] = result.statuses.get(status, 0) + 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    result.seconds = time.perf_counter() - started
    return result


@dataclass
class StreamResult:
    """One server-sent-events response: its status, when the first content arrived, the usage."""

    status: int
    ttft: float | None = None
    usage: dict | None = None
    events: int = 0


async def stream_sse(host: str, port: int, request: bytes) -> StreamResult:
    """Send one streaming request and read its events as they arrive (chunked transfer encoding).

    The first event whose delta carries text gives the time to first token; the last usage chunk
    gives the token counts.
    """
    import orjson

    reader, writer = await asyncio.open_connection(host, port)
    started = time.perf_counter()
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        result = StreamResult(int(head.split(None, 2)[1]))
        if result.status != 200 or b"chunked" not in head.lower():
            return result
        pending = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                return result
            pending += data[:-2]
            *events, pending = pending.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: {"):
                    continue
                result.events += 1
                chunk = orjson.loads(event[6:])
                choices = chunk.get("choices") or ()
                if result.ttft is None and choices and (choices[0].get("delta") or {}).get("content"):
                    result.ttft = time.perf_counter() - started
                if chunk.get("usage"):
                    result.usage = chunk["usage"]
    finally:
        writer.close()
