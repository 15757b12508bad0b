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
from .brokers import BrokerURL, ReplyInbox, open_broker


class RpcClient:
    def __init__(self, url: str) -> None:
        self.url = BrokerURL(url)
        if self.url.scheme not in ("redis", "rediss", "amqp", "amqps"):
            raise BadRequest("request/reply needs a redis:// or amqp:// broker", code="rpc_unsupported")
        self.broker = open_broker(self.url)
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._inbox: ReplyInbox | None = None

    @property
    def reply_to(self) -> str:
        return self._inbox.address if self._inbox is not None else ""

    async def __aenter__(self) -> RpcClient:
        await self.broker.connect()
        self._inbox = await self.broker.open_replies(self._resolve)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._inbox is not None:
            inbox, self._inbox = self._inbox, None
            await inbox.close()
        await self.broker.close()

    async def call(self, text: str | None = None, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        """Send one input (``text=`` or other message fields) and wait for its result row."""
        correlation_id = uuid.uuid4().hex
        body = {"id": fields.pop("id", correlation_id), **({"text": text} if text is not None else {}), **fields}
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
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
