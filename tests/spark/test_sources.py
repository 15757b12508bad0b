"""moorage's brokers as Spark streaming sources: replayable offset ranges, acknowledgement on commit,
and the stream workers' message validation on a DataFrame.

The readers' offset logic runs here without a query (it is what Spark's driver calls); one query
per broker kind proves the Spark side: every message read once, in micro-batches, then acknowledged.
"""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
from pyspark.sql.streaming.datasource import ReadAllAvailable, ReadMaxRows

from moorage.engines.spark.messages import parse, parse_payload
from moorage.engines.spark.sources import KafkaReader, RedisStreamReader, SQLiteQueueReader, read_stream
from moorage.errors import BadRequest
from moorage.streams.brokers import open_broker
from moorage.streams.brokers.base import Message
from moorage.streams.worker import Poison, WorkerConfig, decode


def publish(url: str, bodies: list[bytes]) -> None:
    async def go() -> None:
        async with open_broker(url) as broker:
            await broker.publish(bodies)

    asyncio.run(go())


def bodies(n: int, prefix: str = "m") -> list[bytes]:
    return [orjson.dumps({"id": f"{prefix}{i}", "text": f"sentence {i}"}) for i in range(n)]


def read_range(reader, start: dict, end: dict) -> list[tuple]:
    return [row for part in reader.partitions(start, end) for row in reader.read(part)]


def walk(reader, limit) -> list[tuple[dict, dict]]:
    """The micro-batch ranges a query would plan, from the initial offset until nothing is new."""
    ranges, start = [], reader.initialOffset()
    while (end := reader.latestOffset(start, limit)) != start:
        ranges.append((start, end))
        start = end
    return ranges


@pytest.fixture
def redis_url(redis_base):
    return f"{redis_base}?topic=t{uuid.uuid4().hex[:10]}&group=spark"


def test_redis_ranges_replay_the_same_entries_and_commit_moves_the_group(redis_url):
    import redis

    publish(redis_url, bodies(23))
    reader = RedisStreamReader({"url": redis_url, "num_partitions": "3"})
    ranges = walk(reader, ReadMaxRows(10))
    assert len(ranges) == 3  # 10 + 10 + 3
    first = [read_range(reader, *r) for r in ranges]
    again = [read_range(reader, *r) for r in ranges]  # what a restarted query reads from its checkpoint
    assert first == again
    ids = [orjson.loads(row[1])["id"] for rows in first for row in rows]
    assert sorted(ids) == sorted(f"m{i}" for i in range(23)) and len(ids) == 23
    assert [len(rows) for rows in first] == [10, 10, 3]

    reader.commit(ranges[0][1])
    r = redis.Redis.from_url(redis_url.split("?")[0])
    topic = reader.url.topic
    (group,) = r.xinfo_groups(topic)
    assert group["last-delivered-id"].decode() == ranges[0][1]["id"]
    restarted = RedisStreamReader({"url": redis_url})  # a new query on the group starts where it committed
    assert restarted.initialOffset() == ranges[0][1]
    assert r.xlen(topic) == 23

    trimming = RedisStreamReader({"url": redis_url, "trim": "true"})
    trimming.commit(ranges[1][1])
    assert r.xlen(topic) == 3  # entries up to the committed id are gone


def test_redis_available_now_stops_at_the_entries_present_when_it_started(redis_url):
    publish(redis_url, bodies(5))
    reader = RedisStreamReader({"url": redis_url, "max_batch_size": "0"})
    start = reader.initialOffset()
    reader.prepareForTriggerAvailableNow()
    publish(redis_url, bodies(4, prefix="late"))
    end = reader.latestOffset(start, reader.getDefaultReadLimit())
    assert reader.getDefaultReadLimit() == ReadAllAvailable()
    assert [orjson.loads(r[1])["id"] for r in read_range(reader, start, end)] == [f"m{i}" for i in range(5)]
    assert reader.latestOffset(end, ReadAllAvailable()) == end


def test_sqlite_queue_ranges_and_commit_deletes_what_is_done(tmp_path):
    url = f"sqlite:///{tmp_path}/queue.db?topic=news"
    publish(url, bodies(12))
    reader = SQLiteQueueReader({"url": url})
    ranges = walk(reader, ReadMaxRows(5))
    assert [r[1]["seq"] - r[0]["seq"] for r in ranges] == [5, 5, 2]
    rows = [read_range(reader, *r) for r in ranges]
    assert rows == [read_range(reader, *r) for r in ranges]
    assert [orjson.loads(row[1])["id"] for part in rows for row in part] == [f"m{i}" for i in range(12)]
    reader.commit(ranges[1][1])
    assert read_range(reader, ranges[0][0], ranges[-1][1]) == rows[2]  # acknowledged rows are deleted
    assert reader.latestOffset(ranges[-1][1], ReadAllAvailable()) == ranges[-1][1]


def test_kafka_offsets_per_partition_and_commit_to_the_group(kafka_base):
    url = f"{kafka_base}?topic=t{uuid.uuid4().hex[:10]}&group=spark&create=auto"
    publish(url, bodies(20))
    reader = KafkaReader({"url": url})
    start = reader.initialOffset()
    assert len(start) > 1 and set(start.values()) == {0}  # the test broker's default: several partitions
    end = reader.latestOffset(start, ReadAllAvailable())
    assert sum(end.values()) == 20
    rows = read_range(reader, start, end)
    assert sorted(orjson.loads(r[1])["id"] for r in rows) == sorted(f"m{i}" for i in range(20))
    assert rows == read_range(reader, start, end)
    limited = reader.latestOffset(start, ReadMaxRows(6))
    assert 0 < sum(limited.values()) < 6 + len(start)  # the limit shared out per partition, rounded up
    reader.commit(end)
    assert KafkaReader({"url": url}).initialOffset() == end  # the group's committed offsets
    assert KafkaReader({"url": url, "starting": "earliest"}).initialOffset() == start


def test_rabbitmq_and_unknown_options_are_refused_with_the_reason(redis_url):
    with pytest.raises(BadRequest, match="cannot replay"):
        read_stream(None, "amqp://guest:guest@127.0.0.1:5672/?topic=in")  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="starting"):
        RedisStreamReader({"url": redis_url, "starting": "yesterday"})


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"id": "a"}', b'{"id": "a", "text": "   "}', b'{"text": "' + b"x" * 50 + b'"}'],
)
def test_poison_rows_carry_the_stream_workers_reason(body):
    config = WorkerConfig(max_text_chars=40)
    with pytest.raises(Poison) as caught:
        decode(Message(broker_id="7-0", body=body), "embed", config)
    row = parse_payload("7-0", body, "embed", max_text_chars=40)
    assert row == {"id": "7-0", "text": None, "messages": None, "parameters": None, "error": str(caught.value)}


def test_good_rows_carry_their_inputs():
    chat = orjson.dumps({"id": 5, "messages": [{"role": "user", "content": "hi"}], "parameters": {"max_tokens": 3}})
    assert parse_payload("1-0", chat, "generate") == {
        "id": "5",
        "text": None,
        "messages": '[{"role":"user","content":"hi"}]',
        "parameters": '{"max_tokens":3}',
        "error": None,
    }
    assert parse_payload("1-1", b'{"text": "hello"}')["id"] == "1-1"  # no id: the broker's


def test_a_streaming_query_reads_every_message_once_in_micro_batches(spark, tmp_path):
    """The Spark side of the SQLite queue (Redis: tests/spark/test_sinks.py; Kafka's reader above
    runs the same calls Spark makes)."""
    url = f"sqlite:///{tmp_path}/queue.db?topic=news"
    publish(url, bodies(9) + [b"{broken"])
    seen: list[tuple[int, list]] = []
    query = (
        parse(read_stream(spark, url, max_batch_size=6))
        .writeStream.foreachBatch(lambda df, batch_id: seen.append((batch_id, df.collect())))
        .option("checkpointLocation", str(tmp_path / "ckpt"))
        .trigger(availableNow=True)
        .start()
    )
    query.awaitTermination()
    assert query.exception() is None
    rows = [row for _, batch in seen for row in batch]
    assert len(seen) == 2  # max_batch_size cut the topic into micro-batches
    assert sorted(r["id"] for r in rows if r["error"] is None) == sorted(f"m{i}" for i in range(9))
    (bad,) = [r for r in rows if r["error"] is not None]
    assert bad["error"].startswith("invalid_json:") and bad["body"] == b"{broken"
    assert len({r["message_id"] for r in rows}) == 10
