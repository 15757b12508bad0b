"""moorage's brokers as Spark Structured Streaming sources (Spark 4's Python Data Source API).

    read_stream(spark, "redis://127.0.0.1:6379/0?topic=in&group=g")     Redis Streams
    read_stream(spark, "sqlite:////var/lib/moorage/queue.db?topic=in")   the embedded SQLite queue
    read_stream(spark, "kafka://127.0.0.1:9092?topic=in&group=g")        Kafka (confluent-kafka)

The URLs are the stream workers' (``moorage.streams.brokers``); every source yields the same rows:
``message_id`` (the broker's id, as the stream workers name it in dead letters), ``body`` (the raw
message), ``published_at`` (epoch seconds, when the broker knows it) and ``topic``.
`moorage.engines.spark.messages.parse` turns ``body`` into model inputs and an ``error`` column.

Offsets are the broker's own positions, so Spark's checkpoint can replay any micro-batch exactly:
a Redis entry id, a SQLite queue row id (``seq``), a Kafka offset per partition. A micro-batch reads
the range (start, end] by id (XRANGE, ``seq`` between, a Kafka assign at the offset), never "the next
N messages", so a query restarted from its checkpoint reads the same rows again. Spark calls the
source's ``commit(end)`` only once the sink has committed the batch; that is when the broker learns
the messages are done:

- Redis: the group's last-delivered id moves to ``end`` (XGROUP SETID), so the group's lag counts
  only what Spark has not committed; with ``trim=true`` the entries up to ``end`` are also removed
  (XTRIM MINID).
- SQLite: the rows up to ``end`` are deleted (what a stream worker's ack does).
- Kafka: the group's offsets are committed at ``end``.

Options (query options of the URL or keyword arguments of `read_stream`): ``max_batch_size``
(messages per micro-batch, default 10000; 0: all available), ``num_partitions`` (Spark partitions
per micro-batch for Redis and SQLite, default 2; Kafka reads one per Kafka partition),
``starting`` (where a new query starts: ``group``, the default, continues from the group's position
(Redis: its last-delivered id; Kafka: its committed offsets; SQLite: the rows still queued),
``earliest`` or ``latest``). Trigger.AvailableNow is supported: the query reads what is there when it
starts, then stops. Spark commits a batch's offsets to its source when it plans the next batch, so
the last batch of such a run reaches the broker only when the query next starts: until then the
group's lag still counts it (the checkpoint holds it as done; it is not read again).

A Spark query is the only consumer of its topic and group: stream workers reading the same group
would take messages Spark also reads. RabbitMQ classic and quorum queues cannot replay a range, so
they have no Spark source: consume them with ``moorage stream run`` (at-least-once, the SQL sink
upserts), or publish to Redis Streams or Kafka for Spark.
"""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING, Any

from pyspark.sql.datasource import DataSource, DataSourceStreamReader, InputPartition
from pyspark.sql.streaming.datasource import ReadAllAvailable, ReadLimit, ReadMaxRows, SupportsTriggerAvailableNow

from ...errors import BadRequest
from ...streams.brokers.base import BrokerURL, redact

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

SCHEMA = "message_id string, body binary, published_at double, topic string"
MAX_SEQ = 18446744073709551615  # the largest sequence part of a Redis entry id
PAGE = 1000  # entries per XRANGE call


def read_stream(spark: SparkSession, url: str, **options: Any) -> DataFrame:
    """A streaming DataFrame of the broker's messages (columns: `SCHEMA`)."""
    parsed = BrokerURL(url)
    source = SOURCES.get(parsed.scheme)
    if source is None:
        raise BadRequest(
            f"Spark cannot read {redact(url)}: use a redis://, sqlite:// or kafka:// URL (RabbitMQ queues cannot"
            " replay a range; read them with `moorage stream run`)",
            code="invalid_broker_url",
        )
    spark.dataSource.register(source)
    reader = spark.readStream.format(source.name()).option("url", url)
    for key, value in {**parsed.options, **options}.items():
        reader = reader.option(key, str(value))
    return reader.load()


class _Options:
    """The options every moorage source reads, checked once on the driver."""

    def __init__(self, options: dict[str, str]) -> None:
        if "url" not in options:
            raise BadRequest("a moorage Spark source needs the option url (a broker URL)", code="invalid_broker_url")
        self.url = BrokerURL(options["url"])
        merged = {**self.url.options, **{k: v for k, v in options.items() if k != "url"}}
        self.url.options.update(merged)
        self.max_batch_size = self.url.int("max_batch_size", 10_000)
        self.num_partitions = max(1, self.url.int("num_partitions", 2))
        self.starting = merged.get("starting", "group")
        if self.starting not in ("group", "earliest", "latest"):
            raise BadRequest(f"starting={self.starting!r}: use group, earliest or latest", code="invalid_broker_url")

    def limit(self) -> ReadLimit:
        return ReadMaxRows(self.max_batch_size) if self.max_batch_size else ReadAllAvailable()


def _max_rows(limit: ReadLimit) -> int | None:
    return limit.max_rows if isinstance(limit, ReadMaxRows) else None


class _MoorageReader(DataSourceStreamReader, SupportsTriggerAvailableNow):
    """What every moorage stream reader shares: the options and the read limit they set."""

    def __init__(self, options: dict[str, str]) -> None:
        self.options = _Options(options)
        self.url = self.options.url

    def getDefaultReadLimit(self) -> ReadLimit:
        return self.options.limit()


class _Range(InputPartition):
    """The messages with positions in (start, end]."""

    def __init__(self, start: Any, end: Any, part: int = 0) -> None:
        self.start, self.end, self.part = start, end, part


def _split(lo: int, hi: int, n: int) -> list[tuple[int, int]]:
    """(lo, hi] cut into at most `n` contiguous, non-empty ranges."""
    n = max(1, min(n, hi - lo))
    cuts = [lo + (hi - lo) * k // n for k in range(n + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


# -- Redis Streams ------------------------------------------------------------------------------
def _entry_id(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _id_parts(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _after(entry_id: str) -> str:
    """The smallest entry id greater than `entry_id`."""
    ms, seq = _id_parts(entry_id)
    return f"{ms + 1}-0" if seq == MAX_SEQ else f"{ms}-{seq + 1}"


class RedisStreamReader(_MoorageReader):
    def __init__(self, options: dict[str, str]) -> None:
        super().__init__(options)
        self.trim = self.url.options.get("trim", "false").lower() in ("1", "true", "yes")
        self._target: str | None = None  # Trigger.AvailableNow: the last id when the query started

    def _redis(self):
        import redis

        return redis.Redis.from_url(self.url.server, socket_connect_timeout=5)

    def _ensure_group(self, r) -> None:
        from redis.exceptions import ResponseError

        try:
            r.xgroup_create(self.url.topic, self.url.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _last_id(self, r) -> str:
        newest = r.xrevrange(self.url.topic, "+", "-", count=1)
        return _entry_id(newest[0][0]) if newest else "0-0"

    def initialOffset(self) -> dict:
        with self._redis() as r:
            self._ensure_group(r)
            if self.options.starting == "earliest":
                return {"id": "0-0"}
            if self.options.starting == "latest":
                return {"id": self._last_id(r)}
            for group in r.xinfo_groups(self.url.topic):
                if _entry_id(group["name"]) == self.url.group:
                    return {"id": _entry_id(group["last-delivered-id"])}
        return {"id": "0-0"}

    def prepareForTriggerAvailableNow(self) -> None:
        with self._redis() as r:
            self._target = self._last_id(r)

    def latestOffset(self, start: dict, limit: ReadLimit) -> dict:
        upper = self._target or "+"
        max_rows = _max_rows(limit)
        with self._redis() as r:
            if max_rows:
                entries = r.xrange(self.url.topic, f"({start['id']}", upper, count=max_rows)
            else:
                entries = r.xrevrange(self.url.topic, upper, f"({start['id']}", count=1)
        return {"id": _entry_id(entries[-1][0] if max_rows else entries[0][0])} if entries else start

    def partitions(self, start: dict, end: dict) -> list[_Range]:
        if start["id"] == end["id"]:
            return []
        (lo_ms, _), (hi_ms, _) = _id_parts(start["id"]), _id_parts(end["id"])
        bounds = [start["id"]]  # cut at millisecond boundaries: the same cuts whenever the batch is replayed
        bounds += [f"{b}-{MAX_SEQ}" for _, b in _split(lo_ms, hi_ms, self.options.num_partitions)[:-1]]
        bounds.append(end["id"])
        return [_Range(a, b, i) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]

    def read(self, partition: _Range):  # type: ignore[override]
        topic = self.url.topic
        with self._redis() as r:
            low = partition.start
            while True:
                entries = r.xrange(topic, f"({low}", partition.end, count=PAGE)
                for raw_id, fields in entries:
                    published = fields.get(b"published_at")
                    yield (_entry_id(raw_id), fields.get(b"body", b""), float(published) if published else None, topic)
                if len(entries) < PAGE:
                    return
                low = _entry_id(entries[-1][0])

    def commit(self, end: dict) -> None:
        with self._redis() as r:
            r.xgroup_setid(self.url.topic, self.url.group, end["id"])
            if self.trim:
                r.xtrim(self.url.topic, minid=_after(end["id"]), approximate=False)


# -- the SQLite queue ---------------------------------------------------------------------------
class SQLiteQueueReader(_MoorageReader):
    def __init__(self, options: dict[str, str]) -> None:
        from ...streams.brokers.sqlite import SQLiteBroker

        super().__init__(options)
        self.path = str(SQLiteBroker(self.url).path)  # the stream workers' rules for the path
        self._target: int | None = None

    def _db(self) -> sqlite3.Connection:
        from ...streams.brokers.sqlite import SCHEMA as QUEUE_SCHEMA

        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(QUEUE_SCHEMA)
        return db

    def _scalar(self, sql: str, *args: Any) -> int:
        db = self._db()
        try:
            return int(db.execute(sql, (self.url.topic, *args)).fetchone()[0] or 0)
        finally:
            db.close()

    def _last_seq(self) -> int:
        return self._scalar("SELECT max(seq) FROM messages WHERE topic = ?")

    def initialOffset(self) -> dict:
        if self.options.starting == "latest":
            return {"seq": self._last_seq()}
        return {"seq": 0}  # acknowledged rows are deleted: what is left is the group's (the file's) position

    def prepareForTriggerAvailableNow(self) -> None:
        self._target = self._last_seq()

    def latestOffset(self, start: dict, limit: ReadLimit) -> dict:
        upper = self._target if self._target is not None else 2**63 - 1
        max_rows = _max_rows(limit) or -1  # LIMIT -1: no limit
        last = self._scalar(
            "SELECT max(seq) FROM (SELECT seq FROM messages WHERE topic = ? AND seq > ? AND seq <= ?"
            " ORDER BY seq LIMIT ?)",
            start["seq"],
            upper,
            max_rows,
        )
        return {"seq": last} if last else start

    def partitions(self, start: dict, end: dict) -> list[_Range]:
        return [
            _Range(a, b, i) for i, (a, b) in enumerate(_split(start["seq"], end["seq"], self.options.num_partitions))
        ]

    def read(self, partition: _Range):  # type: ignore[override]
        db = self._db()
        try:
            rows = db.execute(
                "SELECT seq, body, published_at FROM messages WHERE topic = ? AND seq > ? AND seq <= ? ORDER BY seq",
                (self.url.topic, partition.start, partition.end),
            )
            for seq, body, published in rows:
                yield (str(seq), bytes(body), published, self.url.topic)
        finally:
            db.close()

    def commit(self, end: dict) -> None:
        db = self._db()
        try:
            db.execute("DELETE FROM messages WHERE topic = ? AND seq <= ?", (self.url.topic, end["seq"]))
        finally:
            db.close()


# -- Kafka ----------------------------------------------------------------------------------------
class KafkaReader(_MoorageReader):
    """Offsets ``{"PARTITION": next offset}``; one Spark partition per Kafka partition with new messages."""

    def __init__(self, options: dict[str, str]) -> None:
        super().__init__(options)
        self.bootstrap = self.url.netloc
        self._target: dict[str, int] | None = None

    def _consumer(self, group: str | None = None):
        from confluent_kafka import Consumer

        return Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": group or self.url.group,
                "enable.auto.commit": False,
                "enable.partition.eof": False,
                "auto.offset.reset": "earliest",
            }
        )

    def _watermarks(self, consumer) -> dict[str, tuple[int, int]]:
        from confluent_kafka import TopicPartition

        meta = consumer.list_topics(self.url.topic, timeout=10).topics[self.url.topic]
        if meta.error is not None:
            raise BadRequest(f"Kafka topic {self.url.topic!r}: {meta.error}", code="invalid_broker_url")
        return {
            str(p): consumer.get_watermark_offsets(TopicPartition(self.url.topic, p), timeout=10)
            for p in sorted(meta.partitions)
        }

    def initialOffset(self) -> dict:
        from confluent_kafka import TopicPartition

        consumer = self._consumer()
        try:
            marks = self._watermarks(consumer)
            if self.options.starting == "latest":
                return {p: high for p, (_low, high) in marks.items()}
            start = {p: low for p, (low, _high) in marks.items()}
            if self.options.starting == "group":
                wanted = [TopicPartition(self.url.topic, int(p)) for p in marks]
                for tp in consumer.committed(wanted, timeout=10):
                    if tp.offset >= 0:
                        start[str(tp.partition)] = tp.offset
            return start
        finally:
            consumer.close()

    def _highs(self) -> dict[str, int]:
        consumer = self._consumer()
        try:
            return {p: high for p, (_low, high) in self._watermarks(consumer).items()}
        finally:
            consumer.close()

    def prepareForTriggerAvailableNow(self) -> None:
        self._target = self._highs()

    def latestOffset(self, start: dict, limit: ReadLimit) -> dict:
        highs = self._target or self._highs()
        max_rows = _max_rows(limit)
        share = -(-max_rows // max(1, len(highs))) if max_rows else None  # per partition, rounded up
        end = dict(start)
        for p, high in highs.items():
            begin = start.get(p, 0)
            end[p] = max(begin, min(high, begin + share) if share else high)
        return end

    def partitions(self, start: dict, end: dict) -> list[_Range]:
        return [_Range(start.get(p, 0), off, int(p)) for p, off in sorted(end.items()) if off > start.get(p, 0)]

    def read(self, partition: _Range):  # type: ignore[override]
        from confluent_kafka import TopicPartition

        consumer = self._consumer(group=f"{self.url.group}-spark-reader")  # assign() only: never commits
        try:
            consumer.assign([TopicPartition(self.url.topic, partition.part, partition.start)])
            offset, deadline = partition.start, time.monotonic() + 120
            while offset < partition.end:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Kafka partition {partition.part}: offsets {offset}..{partition.end} not read")
                for m in consumer.consume(min(PAGE, partition.end - offset), 1.0):
                    if m.error() is not None or m.offset() >= partition.end:
                        continue
                    offset = m.offset() + 1
                    _kind, stamp = m.timestamp()
                    published = stamp / 1000 if stamp > 0 else None
                    yield (
                        f"{self.url.topic}:{m.partition()}:{m.offset()}",
                        m.value() or b"",
                        published,
                        self.url.topic,
                    )
        finally:
            consumer.close()

    def commit(self, end: dict) -> None:
        from confluent_kafka import TopicPartition

        consumer = self._consumer()
        try:
            offsets = [TopicPartition(self.url.topic, int(p), off) for p, off in end.items() if off > 0]
            if offsets:
                consumer.commit(offsets=offsets, asynchronous=False)
        finally:
            consumer.close()


# -- the data sources Spark registers -----------------------------------------------------------
class _MoorageSource(DataSource):
    reader_class: type[_MoorageReader]

    def schema(self) -> str:
        return SCHEMA

    def streamReader(self, schema) -> DataSourceStreamReader:  # noqa: ARG002 - the schema is fixed
        return self.reader_class(dict(self.options))


class RedisStreamSource(_MoorageSource):
    reader_class = RedisStreamReader

    @classmethod
    def name(cls) -> str:
        return "moorage-redis"


class SQLiteQueueSource(_MoorageSource):
    reader_class = SQLiteQueueReader

    @classmethod
    def name(cls) -> str:
        return "moorage-sqlite"


class KafkaSource(_MoorageSource):
    reader_class = KafkaReader

    @classmethod
    def name(cls) -> str:
        return "moorage-kafka"


SOURCES: dict[str, type[_MoorageSource]] = {
    "redis": RedisStreamSource,
    "rediss": RedisStreamSource,
    "sqlite": SQLiteQueueSource,
    "kafka": KafkaSource,
}
