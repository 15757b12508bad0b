"""RabbitMQ (aio-pika): a durable quorum queue per topic, manual acks, prefetch, a dead-letter queue.

``amqp://USER:PASS@HOST:PORT/VHOST?topic=in``. Options: ``prefetch`` (unacknowledged messages this
consumer may hold, default 256), ``reconnect_s`` (how often a lost connection is tried again,
default 1).

The queue is a quorum queue: it counts deliveries (``x-delivery-count``) and, past
``max_deliveries`` + 1, dead-letters a message itself (a poison message that crashes every worker
still ends there, reason ``delivery_limit``). The worker dead-letters earlier, with its own reason:
it publishes the message to the ``dlq`` queue with an ``x-moorage-reason`` header, waits for the
broker's confirm, then acks the original. A connection that drops (a killed worker) returns its
unacknowledged messages to the queue at once. All consumers of a queue share its work; ``group``
is not used.

The connection is robust: when RabbitMQ restarts it reconnects (every ``reconnect_s``), declares the queues again
and resumes consuming. The deliveries received on the old channel are stale: RabbitMQ queued them
again when that channel closed, so acking or retrying one is a no-op (`is_stale`) and they come back
as new deliveries. While the connection is down every call raises `BrokerUnavailable`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, FieldValue

from ...config import redact_url
from .base import Broker, BrokerUnavailable, BrokerURL, DeadLetter, Message, ReplyHandler, ReplyInbox

log = logging.getLogger(__name__)


class RabbitMQBroker(Broker):
    scheme = "amqp"

    def __init__(self, url: BrokerURL) -> None:
        super().__init__(url)
        self.prefetch = url.int("prefetch", 256)
        self.reconnect_s = url.number("reconnect_s", 1.0)
        self._conn: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._queues: dict[str, aio_pika.abc.AbstractQueue] = {}
        self._buffer: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._consuming = False
        self._last_errors: dict[str, str] = {}

    async def connect(self) -> None:
        try:
            self._conn = await aio_pika.connect_robust(self.url.server, timeout=10, reconnect_interval=self.reconnect_s)
        except (OSError, aio_pika.exceptions.AMQPConnectionError) as exc:
            raise BrokerUnavailable(
                f"cannot reach RabbitMQ at {redact_url(str(self.url))}: {redact_url(str(exc))}"
            ) from None
        self._channel = await self._conn.channel(publisher_confirms=True)
        await self._channel.set_qos(prefetch_count=self.prefetch)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:  # a connection that is reconnecting to a server that is gone must not hold up a stop
                await asyncio.wait_for(conn.close(), 5)
            except (TimeoutError, *_LOST) as exc:
                log.warning("RabbitMQ connection did not close cleanly: %s", _why(exc))

    @asynccontextmanager
    async def _reachable(self, what: str) -> AsyncIterator[None]:
        """A lost connection or channel, in any of the forms aio-pika reports it, as BrokerUnavailable."""
        try:
            yield
        except _LOST as exc:
            raise BrokerUnavailable(f"RabbitMQ {what} failed, the connection is down: {_why(exc)}") from None

    @property
    def channel(self) -> AbstractChannel:
        if self._channel is None:
            raise RuntimeError("broker is not connected: use `async with open_broker(url)`")
        return self._channel

    async def _queue(self, topic: str) -> aio_pika.abc.AbstractQueue:
        queue = self._queues.get(topic)
        if queue is None:
            ch = self.channel
            if topic.endswith(".dlq") or topic.startswith("amq."):
                queue = await ch.declare_queue(topic, durable=True, arguments={"x-queue-type": "quorum"})
            else:
                dlq = f"{topic}.dlq"
                await ch.declare_queue(dlq, durable=True, arguments={"x-queue-type": "quorum"})
                args: dict[str, FieldValue] = {
                    "x-queue-type": "quorum",
                    "x-delivery-limit": self.max_deliveries,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": dlq,
                }
                queue = await ch.declare_queue(topic, durable=True, arguments=args)
            self._queues[topic] = queue
        return queue

    async def publish(self, bodies: Sequence[bytes], topic: str | None = None, headers: dict | None = None) -> None:
        topic = topic or self.topic
        async with self._reachable("publish"):
            await self._queue(topic)
            await self._send(topic, bodies, headers)

    async def _send(self, topic: str, bodies: Sequence[bytes], headers: dict | None) -> None:
        headers = dict(headers or {})
        correlation_id = headers.pop("correlation_id", None) or None
        reply_to = headers.pop("reply_to", None) or None
        now = time.time()
        exchange = self.channel.default_exchange
        confirms = [
            exchange.publish(
                aio_pika.Message(
                    bytes(body),
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    headers={**headers, "x-published-at": repr(now)},
                    correlation_id=correlation_id,
                    reply_to=reply_to,
                    message_id=uuid.uuid4().hex,
                ),
                routing_key=topic,
            )
            for body in bodies
        ]
        await asyncio.gather(*confirms)  # every publish confirmed by the broker

    async def receive(self, max_messages: int, timeout_s: float) -> list[Message]:
        await self._connected(timeout_s)
        if not self._consuming:
            async with self._reachable("consume"):
                queue = await self._queue(self.topic)
                await queue.consume(self._buffer.put, no_ack=False)
            self._consuming = True
        raw: list[AbstractIncomingMessage] = []
        deadline = time.monotonic() + timeout_s
        while not raw:
            try:
                first = await asyncio.wait_for(self._buffer.get(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                await self._connected(0)  # a receive during an outage says so rather than "nothing"
                return []
            raw = [first]
            while len(raw) < max_messages and not self._buffer.empty():
                raw.append(self._buffer.get_nowait())
            raw = [m for m in raw if not _stale(m)]  # from a channel that closed: queued again already
        return [self._message(m) for m in raw]

    async def _connected(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for a connection that is being restored; BrokerUnavailable if it is not."""
        conn = self._conn
        if conn is None:
            raise RuntimeError("broker is not connected: use `async with open_broker(url)`")
        if conn.connected.is_set() and not self.channel.is_closed:
            return
        try:
            await asyncio.wait_for(conn.connected.wait(), timeout_s)
        except TimeoutError:
            pass
        if not conn.connected.is_set() or self.channel.is_closed:
            raise BrokerUnavailable(f"lost the connection to RabbitMQ at {redact_url(str(self.url))}; reconnecting")

    def is_stale(self, message: Message) -> bool:
        return _stale(message.handle)

    def _message(self, m: AbstractIncomingMessage) -> Message:
        headers = dict(m.headers or {})
        previous = _int(headers.get("x-delivery-count"))
        msg_id = m.message_id or _key(m)
        published = headers.get("x-published-at")
        extra = {"correlation_id": m.correlation_id or "", "reply_to": m.reply_to or ""}
        return Message(
            broker_id=msg_id,
            body=m.body,
            attempts=previous + 1,
            published_at=_float(published),
            headers={k: v for k, v in extra.items() if v},
            last_error=self._last_errors.get(_key(m)),
            handle=m,
        )

    async def ack(self, messages: Sequence[Message]) -> None:
        stale = 0
        for m in messages:
            self._last_errors.pop(_key(m.handle), None)
            stale += not await _settle(m.handle, m.handle.ack)
        _log_stale(stale, "acknowledged")

    async def retry(self, messages: Sequence[Message], reason: str, delay_s: float = 1.0) -> None:
        stale = 0
        for m in messages:  # back to the queue; the quorum queue raises x-delivery-count
            if len(self._last_errors) < 100_000:
                self._last_errors[_key(m.handle)] = reason
            stale += not await _settle(m.handle, lambda h=m.handle: h.nack(requeue=True))
        _log_stale(stale, "retried")

    async def dead_letter(self, entries: Sequence[tuple[Message, str]]) -> None:
        if not entries:
            return
        async with self._reachable("dead-letter"):
            await self._dead_letter(entries)
        await self.ack([m for m, _ in entries])

    async def _dead_letter(self, entries: Sequence[tuple[Message, str]]) -> None:
        await self._queue(self.dlq)
        exchange = self.channel.default_exchange
        confirms = [
            exchange.publish(
                aio_pika.Message(
                    m.body,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    headers={
                        "x-moorage-reason": reason,
                        "x-moorage-id": m.broker_id,
                        "x-moorage-attempts": m.attempts,
                        "x-moorage-topic": self.topic,
                        "x-moorage-at": repr(time.time()),
                    },
                ),
                routing_key=self.dlq,
            )
            for m, reason in entries
        ]
        await asyncio.gather(*confirms)

    async def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        """Read the dead-letter queue and put every message back (the listing consumes nothing)."""
        queue = await self._queue(self.dlq)
        got: list[AbstractIncomingMessage] = []
        try:
            while len(got) < limit:
                m = await queue.get(no_ack=False, fail=False)
                if m is None:
                    break
                got.append(m)
            return [_dead_letter(m, self.topic) for m in got]
        finally:
            for m in got:
                await m.nack(requeue=True)

    async def lag(self) -> int | None:
        async with self._reachable("queue declare"):
            declared = await self.channel.declare_queue(self.topic, passive=True)
        return declared.declaration_result.message_count

    async def reply(self, message: Message, body: bytes) -> None:
        if message.reply_to:  # the caller's own (exclusive) queue: publish to it, never declare it
            async with self._reachable("reply"):
                await self._send(message.reply_to, [body], {"correlation_id": message.correlation_id or ""})

    async def open_replies(self, on_reply: ReplyHandler) -> ReplyInbox:
        queue = await self.channel.declare_queue("", exclusive=True, auto_delete=True)

        async def deliver(message: AbstractIncomingMessage) -> None:
            on_reply(message.correlation_id, message.body)

        await queue.consume(deliver, no_ack=True)
        return _QueueReplies(queue)


class _QueueReplies(ReplyInbox):
    """Replies on an exclusive, auto-deleted queue: RabbitMQ removes it with the connection."""

    def __init__(self, queue: AbstractQueue) -> None:
        self.address = queue.name

    async def close(self) -> None:
        pass


_LOST = (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, OSError)
"""How aio-pika says a connection or channel is gone (ChannelInvalidStateError's text is empty)."""


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


def _stale(m: AbstractIncomingMessage) -> bool:
    """Whether the message's channel closed: RabbitMQ has handed its unacknowledged messages back to
    the queue (they will be delivered again), and the handle can settle nothing any more."""
    try:
        return m.channel.is_closed  # aio-pika raises ChannelInvalidStateError once it is closed
    except aiormq.exceptions.ChannelInvalidStateError:
        return True


async def _settle(m: AbstractIncomingMessage, settle) -> bool:
    """Ack or nack one delivery; False when it was stale (already queued again), before or during."""
    if _stale(m):
        return False
    try:
        await settle()
    except _LOST as exc:
        if _stale(m):
            return False
        raise BrokerUnavailable(f"RabbitMQ did not take the ack of {m.message_id}: {_why(exc)}") from None
    return True


def _log_stale(count: int, what: str) -> None:
    if count:
        log.warning("%d deliveries could not be %s: their channel closed and RabbitMQ delivers them again",
                    count, what)  # fmt: skip


def _key(m: AbstractIncomingMessage) -> str:
    """A message's id, stable across redeliveries (publish sets one; else the body's digest)."""
    return m.message_id or hashlib.sha256(m.body).hexdigest()[:32]


def _dead_letter(m: AbstractIncomingMessage, topic: str) -> DeadLetter:
    h = dict(m.headers or {})
    reason = h.get("x-moorage-reason")
    if reason is None:  # dead-lettered by the queue itself (x-death): delivery limit, rejection, expiry
        deaths = h.get("x-death")
        first_death = deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
        why = _text(h.get("x-first-death-reason") or first_death.get("reason") or "unknown")
        reason = f"{why}: dead-lettered by RabbitMQ" + (" after too many deliveries" if why == "delivery_limit" else "")
    at = h.get("x-moorage-at")
    return DeadLetter(
        message_id=str(h.get("x-moorage-id") or m.message_id or ""),
        body=m.body,
        reason=str(reason),
        attempts=_int(h.get("x-moorage-attempts")),
        topic=str(h.get("x-moorage-topic") or topic),
        at=_float(at) or time.time(),
    )


def _float(value) -> float | None:
    try:
        return float(value.decode() if isinstance(value, bytes) else value)
    except (TypeError, ValueError):
        return None


def _int(value: FieldValue | None) -> int:
    """A count from a message header; 0 when it is absent."""
    return int(value) if isinstance(value, int | float | str | bytes | Decimal) and value else 0


def _text(value: FieldValue) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
