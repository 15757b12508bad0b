"""Redis Streams: a consumer group per ``group``, pending entries reclaimed when their consumer dies.

``redis://HOST:PORT/DB?topic=in&group=g``. Options: ``claim_idle_ms`` (a message received but not
acknowledged for this long is taken over by another consumer, default 30000), ``maxlen`` (trim the
stream to about this many entries on publish, default: never).

Each message is one stream entry with a ``body`` field. A receive first claims entries idle past
``claim_idle_ms`` (XAUTOCLAIM: a crashed consumer's messages), then reads new ones (XREADGROUP >).
Redis counts deliveries per entry (XPENDING). Retry leaves the entry pending, so it is claimed
again after ``claim_idle_ms``; its reason waits in a hash beside the stream. Dead letters are
entries of the stream ``dlq`` (body, reason, id, attempts, topic, at).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import cast

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT

from ...config import redact_url
from .base import Broker, BrokerUnavailable, BrokerURL, DeadLetter, Message, ReplyHandler, ReplyInbox

# redis-py types each reply for every protocol version and decoding mode at once. This broker speaks
# RESP2 without decode_responses: a stream entry is (id, {field: value}) in bytes, and a read is a
# list of (stream, entries). The helpers below state that once, where the replies come in.
Fields = dict[bytes, bytes]
Entry = tuple[bytes, Fields]
ClaimedEntry = tuple[bytes, Fields | None]  # XAUTOCLAIM: no fields when the entry was deleted


class RedisBroker(Broker):
    scheme = "redis"

    def __init__(self, url: BrokerURL) -> None:
        super().__init__(url)
        self.claim_idle_ms = url.int("claim_idle_ms", 30_000)
        self.maxlen = url.int("maxlen", 0) or None
        self.errors_key = f"{self.topic}:last-error:{self.group}"
        self._redis: aioredis.Redis | None = None
        self._group_ready = False
        self._claim_from = "0-0"  # XAUTOCLAIM cursor: walks the pending list, wraps to the start

    async def connect(self) -> None:
        self._redis = aioredis.from_url(self.url.server, socket_connect_timeout=5, health_check_interval=30)
        try:
            await self._redis.ping()
        except (RedisConnectionError, OSError) as exc:
            raise BrokerUnavailable(
                f"cannot reach Redis at {redact_url(str(self.url))}: {redact_url(str(exc))}"
            ) from None

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @property
    def r(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("broker is not connected: use `async with open_broker(url)`")
        return self._redis

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:  # from the start of the stream: messages published before the group existed count too
            await self.r.xgroup_create(self.topic, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def publish(self, bodies: Sequence[bytes], topic: str | None = None, headers: dict | None = None) -> None:
        fields_extra: dict[FieldT, EncodableT] = {"headers": orjson.dumps(headers)} if headers else {}
        now = repr(time.time())
        async with self.r.pipeline(transaction=False) as pipe:
            for body in bodies:
                fields: dict[FieldT, EncodableT] = {"body": bytes(body), "published_at": now, **fields_extra}
                pipe.xadd(topic or self.topic, fields, maxlen=self.maxlen, approximate=True)
            await pipe.execute()

    async def receive(self, max_messages: int, timeout_s: float) -> list[Message]:
        await self._ensure_group()
        cursor, claimed_reply, _deleted = await self.r.xautoclaim(
            self.topic, self.group, self.consumer, self.claim_idle_ms, start_id=self._claim_from, count=max_messages
        )
        claimed = cast(list[ClaimedEntry], claimed_reply)
        self._claim_from = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        counts = await self._delivery_counts(claimed)
        errors = await self.r.hmget(self.errors_key, [eid for eid, _ in claimed]) if claimed else []
        messages = [
            self._message(eid, fields, counts.get(eid, 2), err) for (eid, fields), err in zip(claimed, errors) if fields
        ]
        room = max_messages - len(messages)
        if room > 0:
            block = None if messages else max(1, int(timeout_s * 1000))
            got = await self.r.xreadgroup(self.group, self.consumer, {self.topic: ">"}, count=room, block=block)
            for _stream, entries in _streams(got):
                messages.extend(self._message(eid, fields, 1, None) for eid, fields in entries)
        return messages

    async def _delivery_counts(self, claimed: list[ClaimedEntry]) -> dict[bytes, int]:
        if not claimed:
            return {}
        ids = [eid for eid, _ in claimed]
        pending = await self.r.xpending_range(
            self.topic, self.group, min=ids[0], max=ids[-1], count=len(ids) * 4, consumername=self.consumer
        )
        return {cast(bytes, p["message_id"]): int(p["times_delivered"]) for p in pending}

    def _message(self, eid: bytes, fields: Fields, attempts: int, last_error: bytes | str | None) -> Message:
        headers = orjson.loads(fields[b"headers"]) if b"headers" in fields else {}
        published = fields.get(b"published_at")
        return Message(
            broker_id=eid.decode(),
            body=fields.get(b"body", b""),
            attempts=attempts,
            published_at=float(published) if published else None,
            headers=headers,
            last_error=(last_error.decode() if isinstance(last_error, bytes) else last_error) or None,
            handle=eid,
        )

    async def ack(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        ids = [m.handle for m in messages]
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.xack(self.topic, self.group, *ids)
            pipe.hdel(self.errors_key, *ids)
            await pipe.execute()

    async def extend(self, messages: Sequence[Message]) -> None:
        if messages:  # XCLAIM to ourselves resets the idle time; JUSTID leaves the delivery count alone
            await self.r.xclaim(self.topic, self.group, self.consumer, 0, [m.handle for m in messages], justid=True)

    async def retry(self, messages: Sequence[Message], reason: str, delay_s: float = 1.0) -> None:
        # the entry stays pending: XAUTOCLAIM hands it out again once it has been idle claim_idle_ms
        if messages:
            await self.r.hset(self.errors_key, mapping={m.handle: reason[:2000] for m in messages})

    async def dead_letter(self, entries: Sequence[tuple[Message, str]]) -> None:
        if not entries:
            return
        now = repr(time.time())
        async with self.r.pipeline(transaction=True) as pipe:  # both or neither
            for m, reason in entries:
                fields: dict[FieldT, EncodableT] = {
                    "body": m.body,
                    "reason": reason,
                    "id": m.broker_id,
                    "attempts": m.attempts,
                    "topic": self.topic,
                    "at": now,
                }
                pipe.xadd(self.dlq, fields)
                pipe.xack(self.topic, self.group, m.handle)
                pipe.hdel(self.errors_key, m.handle)
            await pipe.execute()

    async def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        entries = cast(list[Entry], await self.r.xrange(self.dlq, count=limit) or [])
        return [
            DeadLetter(
                message_id=f[b"id"].decode(),
                body=f[b"body"],
                reason=f[b"reason"].decode(),
                attempts=int(f[b"attempts"]),
                topic=f[b"topic"].decode(),
                at=float(f[b"at"]),
            )
            for _eid, f in entries
        ]

    async def lag(self) -> int | None:
        await self._ensure_group()
        for g in await self.r.xinfo_groups(self.topic):
            if g["name"] in (self.group, self.group.encode()):
                return int(g.get("lag") or 0) + int(g.get("pending") or 0)
        return None

    async def open_replies(self, on_reply: ReplyHandler) -> ReplyInbox:
        return _StreamReplies(self.r, f"{self.topic}.reply.{uuid.uuid4().hex}", on_reply)


class _StreamReplies(ReplyInbox):
    """Replies on a private stream ``TOPIC.reply.<uuid>``, read by one task; deleted on close."""

    def __init__(self, r: aioredis.Redis, address: str, on_reply: ReplyHandler) -> None:
        self.address = address
        self._r = r
        self._on_reply = on_reply
        self._closing = False
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        last: bytes | str = "0-0"
        while not self._closing:
            got = await self._r.xread({self.address: last}, block=200, count=100)
            for _stream, entries in _streams(got):
                for eid, fields in entries:
                    last = eid
                    headers = orjson.loads(fields.get(b"headers", b"{}"))
                    self._on_reply(headers.get("correlation_id"), fields[b"body"])

    async def close(self) -> None:
        self._closing = True  # the reader ends after its current read (cancelling a blocked
        await asyncio.gather(self._reader, return_exceptions=True)  # XREAD can hang redis-py)
        await self._r.delete(self.address)


def _streams(reply: object) -> list[tuple[bytes, list[Entry]]]:
    """An XREAD / XREADGROUP reply: (stream, entries) per stream read; None when nothing came."""
    return cast(list[tuple[bytes, list[Entry]]], reply or [])
