"""Kafka (confluent-kafka): consumer groups, offsets committed only after the sink write.

``kafka://HOST:PORT[,HOST:PORT]?topic=in&group=g``. Options: ``partitions`` (when moorage creates
the topic, default 4), ``session_timeout_ms`` (how soon the group notices a dead consumer,
default 10000), ``commit_timeout_ms`` (how long an ack waits for the group coordinator to confirm
its commit, default 10000: while the coordinator is unreachable librdkafka would wait out its
request timeouts again and again; past this the ack fails, the worker reports the broker down and
the offsets are committed by a later ack), ``replication`` (default 1), ``create`` (how a missing
topic is made: ``admin``, the default, creates it with CreateTopics; ``auto`` lets the broker
create it on first use with its own default partition count, for clusters that allow
auto-creation and for test brokers).

Offsets are per partition, so an ack commits the lowest offset still outstanding on each
partition (everything below it is done): acks may come in any order and nothing unfinished is
skipped. Retry seeks the partition back to the message, so it and what follows are delivered again
(the sink is idempotent). Kafka does not count deliveries; this consumer counts them while it runs,
so a message that crashes the process every time is not caught by ``max_deliveries``. Dead letters
are messages on the ``dlq`` topic with the reason in their headers.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka import Message as KafkaMessage
from confluent_kafka.admin import AdminClient, NewTopic

from ...config import redact_url
from .base import BlockingCalls, Broker, BrokerUnavailable, BrokerURL, DeadLetter, Message


class KafkaBroker(Broker):
    scheme = "kafka"

    def __init__(self, url: BrokerURL) -> None:
        super().__init__(url)
        self.bootstrap = url.netloc
        self.partitions = url.int("partitions", 4)
        self.replication = url.int("replication", 1)
        self.session_timeout_ms = url.int("session_timeout_ms", 10_000)
        self.commit_timeout_s = url.int("commit_timeout_ms", 10_000) / 1000
        self.create = url.options.get("create", "admin")
        self._producer: Producer | None = None
        self._consumer: Consumer | None = None
        self._created: set[str] = set()
        self._lock = threading.Lock()
        self._calls = BlockingCalls()
        self._outstanding: dict[int, set[int]] = {}  # partition -> offsets received, not acked
        self._next: dict[int, int] = {}  # partition -> offset after the highest received
        self._deliveries: dict[tuple[int, int], int] = {}
        self._errors: dict[tuple[int, int], str] = {}

    # -- connections -------------------------------------------------------------------------
    async def connect(self) -> None:
        self._producer = Producer(
            {"bootstrap.servers": self.bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 5}
        )
        self._calls.open()
        await self._calls.run(self._ensure_topic, self.topic)

    async def close(self) -> None:
        await self._calls.close(self._close_clients)

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            raise RuntimeError("broker is not connected: use `async with open_broker(url)`")
        return self._producer

    def _close_clients(self) -> None:
        if self._producer is not None:
            self._producer.flush(10)
            self._producer = None
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            consumer.close()

    def _ensure_topic(self, topic: str) -> None:
        if topic in self._created:
            return
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        try:
            metadata = admin.list_topics(timeout=10)
        except KafkaException as exc:
            raise BrokerUnavailable(
                f"cannot reach Kafka at {redact_url(str(self.url))}: {redact_url(str(exc))}"
            ) from None
        if topic not in metadata.topics and self.create == "auto":
            self.producer.list_topics(topic, timeout=10)  # a metadata request for it creates it
        elif topic not in metadata.topics:
            future = admin.create_topics([NewTopic(topic, self.partitions, self.replication)])[topic]
            try:
                future.result(10)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        self._created.add(topic)

    def _new_consumer(self) -> Consumer:
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": self.group,
                "client.id": self.consumer,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": self.session_timeout_ms,
                "heartbeat.interval.ms": max(100, self.session_timeout_ms // 4),
                "enable.partition.eof": False,
            }
        )
        consumer.subscribe([self.topic], on_revoke=self._on_revoke)
        return consumer

    def _on_revoke(self, _consumer, partitions) -> None:
        with self._lock:  # another consumer owns these now; what we hold will reach it again
            for tp in partitions:
                self._outstanding.pop(tp.partition, None)
                self._next.pop(tp.partition, None)

    # -- the contract ---------------------------------------------------------------------------
    async def publish(self, bodies: Sequence[bytes], topic: str | None = None, headers: dict | None = None) -> None:
        topic = topic or self.topic
        await self._calls.run(self._ensure_topic, topic)
        await self._calls.run(self._produce, topic, [(bytes(b), headers or {}) for b in bodies])

    def _produce(self, topic: str, items: list[tuple[bytes, dict]]) -> None:
        failures: list[str] = []

        def report(err, _msg) -> None:
            if err is not None:
                failures.append(str(err))

        producer = self.producer
        now = repr(time.time()).encode()
        for body, headers in items:
            hdrs: list[tuple[str, str | bytes | None]] = [
                ("published_at", now),
                *((k, str(v).encode()) for k, v in headers.items()),
            ]
            while True:
                try:
                    producer.produce(topic, body, key=uuid.uuid4().bytes, headers=hdrs, on_delivery=report)
                    break
                except BufferError:  # the local queue is full: let it drain
                    producer.poll(0.1)
        remaining = producer.flush(30)
        if failures or remaining:
            raise BrokerUnavailable(f"Kafka did not confirm {len(failures) + remaining} messages: {failures[:1]}")

    async def receive(self, max_messages: int, timeout_s: float) -> list[Message]:
        if self._consumer is None:
            self._consumer = await self._calls.run(self._new_consumer)
        raw = await self._calls.run(self._consumer.consume, max_messages, timeout_s)
        out = []
        with self._lock:
            for m in raw:
                if m.error() is not None:
                    if m.error().code() != KafkaError._PARTITION_EOF:
                        raise BrokerUnavailable(f"Kafka consumer error: {m.error()}")
                    continue
                p, off = m.partition(), m.offset()
                self._outstanding.setdefault(p, set()).add(off)
                self._next[p] = max(self._next.get(p, 0), off + 1)
                key = (p, off)
                self._deliveries[key] = self._deliveries.get(key, 0) + 1
                headers = _headers(m)
                published = headers.pop("published_at", None)
                out.append(
                    Message(
                        broker_id=f"{m.topic()}:{p}:{off}",
                        body=m.value() or b"",
                        attempts=self._deliveries[key],
                        published_at=float(published) if published else None,
                        headers=headers,
                        last_error=self._errors.get(key),
                        handle=key,
                    )
                )
        return out

    async def ack(self, messages: Sequence[Message]) -> None:
        offsets = []
        with self._lock:
            touched = set()
            for m in messages:
                p, off = m.handle
                self._outstanding.get(p, set()).discard(off)
                self._deliveries.pop(m.handle, None)
                self._errors.pop(m.handle, None)
                touched.add(p)
            for p in touched:
                if p not in self._next:  # revoked meanwhile: the new owner commits
                    continue
                pending = self._outstanding.get(p)
                offsets.append(TopicPartition(self.topic, p, min(pending) if pending else self._next[p]))
        if offsets and self._consumer is not None:
            await self._calls.run_within(self.commit_timeout_s, "the Kafka offset commit", self._commit, self._consumer,
                                         offsets)  # fmt: skip

    def _commit(self, consumer: Consumer, offsets: list[TopicPartition]) -> None:
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:  # e.g. a rebalance took the partition: it will be redelivered
            if exc.args[0].code() not in (KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION,
                                          KafkaError.UNKNOWN_MEMBER_ID, KafkaError._NO_OFFSET):  # fmt: skip
                raise

    async def retry(self, messages: Sequence[Message], reason: str, delay_s: float = 1.0) -> None:
        first: dict[int, int] = {}
        with self._lock:
            for m in messages:
                p, off = m.handle
                self._errors[m.handle] = reason
                first[p] = min(first.get(p, off), off)  # stays outstanding: commits stop below it
        await asyncio.sleep(min(delay_s, 5.0))
        consumer = self._consumer
        if consumer is None:  # closed meanwhile: the group's next reader starts from the commit
            return
        for p, off in first.items():  # read the partition again from the first failed message
            try:
                await self._calls.run(consumer.seek, TopicPartition(self.topic, p, off))
            except KafkaException:  # not assigned any more: its new owner reads it from the commit
                pass

    async def dead_letter(self, entries: Sequence[tuple[Message, str]]) -> None:
        if not entries:
            return
        await self._calls.run(self._ensure_topic, self.dlq)
        items = [
            (
                m.body,
                {
                    "reason": reason,
                    "id": m.broker_id,
                    "attempts": m.attempts,
                    "topic": self.topic,
                    "at": repr(time.time()),
                },
            )  # fmt: skip
            for m, reason in entries
        ]
        await self._calls.run(self._produce, self.dlq, items)
        await self.ack([m for m, _ in entries])

    async def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        return await self._calls.run(self._read_dlq, limit)

    def _read_dlq(self, limit: int) -> list[DeadLetter]:
        self._ensure_topic(self.dlq)
        reader = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"moorage-dlq-reader-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        try:
            meta = reader.list_topics(self.dlq, timeout=10).topics[self.dlq]
            parts = []
            for p in meta.partitions:
                low, high = reader.get_watermark_offsets(TopicPartition(self.dlq, p), timeout=10)
                if high > low:
                    parts.append((p, low, high))
            reader.assign([TopicPartition(self.dlq, p, low) for p, low, _ in parts])
            want = sum(high - low for _, low, high in parts)
            out: list[DeadLetter] = []
            deadline = time.monotonic() + 15
            while len(out) < min(want, limit) and time.monotonic() < deadline:
                for m in reader.consume(500, 0.5):
                    if m.error() is None:
                        h = _headers(m)
                        out.append(DeadLetter(h.get("id", ""), m.value() or b"", h.get("reason", "unknown"),
                                              int(h.get("attempts", 0)), h.get("topic", self.topic),
                                              float(h.get("at", 0))))  # fmt: skip
            return out[:limit]
        finally:
            reader.close()

    async def lag(self) -> int | None:
        return await self._calls.run(self._lag)

    def _lag(self) -> int | None:
        """Messages behind the end of the assigned partitions, from local state only (no broker round
        trip: a blocking metadata call here stalls the consumer's fetches)."""
        consumer = self._consumer
        if consumer is None:
            return None
        assigned = consumer.assignment()
        if not assigned:
            return None
        total = 0
        for tp in consumer.position(assigned):
            _low, high = consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0 and tp.offset >= 0:
                total += max(0, high - tp.offset)
        with self._lock:
            total += sum(len(offsets) for offsets in self._outstanding.values())
        return total


def _headers(m: KafkaMessage) -> dict[str, str]:
    """A consumed message's headers as text (they arrive as a list of (name, bytes) pairs)."""
    raw = m.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return {k: v.decode(errors="replace") if isinstance(v, bytes) else (v or "") for k, v in pairs}
