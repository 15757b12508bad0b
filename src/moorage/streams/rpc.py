"""Request/reply over a broker: publish a request with a reply-to and a correlation id, await the
worker's answer. Works with a `moorage stream run` worker on Redis Streams or RabbitMQ.

    async with RpcClient("redis://127.0.0.1:6379/0?topic=in") as rpc:
        row = await rpc.call("some text")          # {"id", "model", "version", "embedding", ...}

Redis: replies arrive on a private stream ``TOPIC.reply.<uuid>`` (deleted on close). RabbitMQ: on
an exclusive, auto-deleted queue. A request the worker rejects answers ``{"error": {"code", ...}}``.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson

from ..errors import BadRequest, DeadlineExceeded
from .brokers import BrokerURL, open_broker


class RpcClient:
    def __init__(self, url: str) -> None:
        self.url = BrokerURL(url)
        if self.url.scheme not in ("redis", "rediss", "amqp", "amqps"):
            raise BadRequest("request/reply needs a redis:// or amqp:// broker", code="rpc_unsupported")
        self.broker = open_broker(self.url)
        self._waiting: dict[str, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self.reply_to = ""
        self._closing = False

    async def __aenter__(self) -> RpcClient:
        await self.broker.connect()
        if self.url.scheme.startswith("redis"):
            self.reply_to = f"{self.url.topic}.reply.{uuid.uuid4().hex}"
            self._reader = asyncio.create_task(self._read_redis())
        else:
            queue = await self.broker._channel.declare_queue("", exclusive=True, auto_delete=True)
            self.reply_to = queue.name
            await queue.consume(self._on_amqp_reply, no_ack=True)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._reader is not None:
            self._closing = True  # the reader ends after its current read (cancelling a blocked
            await asyncio.gather(self._reader, return_exceptions=True)  # XREAD can hang redis-py)
            await self.broker.r.delete(self.reply_to)
        await self.broker.close()

    async def call(self, text: str | None = None, timeout: float = 30.0, **fields: Any) -> dict:
        """Send one input (``text=`` or other message fields) and wait for its result row."""
        correlation_id = uuid.uuid4().hex
        body = {"id": fields.pop("id", correlation_id), **({"text": text} if text is not None else {}), **fields}
        future = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = future
        try:
            headers = {"reply_to": self.reply_to, "correlation_id": correlation_id}
            await self.broker.publish([orjson.dumps(body)], headers=headers)
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"no reply within {timeout}s (is a worker running on {self.url}?)") from None
        finally:
            self._waiting.pop(correlation_id, None)

    def _resolve(self, correlation_id: str | None, body: bytes) -> None:
        future = self._waiting.get(correlation_id or "")
        if future is not None and not future.done():
            future.set_result(orjson.loads(body))

    async def _read_redis(self) -> None:
        last = "0-0"
        while not self._closing:
            got = await self.broker.r.xread({self.reply_to: last}, block=200, count=100)
            for _stream, entries in got or []:
                for eid, fields in entries:
                    last = eid
                    headers = orjson.loads(fields.get(b"headers", b"{}"))
                    self._resolve(headers.get("correlation_id"), fields[b"body"])

    async def _on_amqp_reply(self, message) -> None:
        self._resolve(message.correlation_id, message.body)
