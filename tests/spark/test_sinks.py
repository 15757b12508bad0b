"""Exactly-once Spark sinks: a replayed micro-batch (same query id, same batch id) writes nothing twice
to Parquet, SQL (SQLite and PostgreSQL) or the dead-letter destination, and readers never see a
batch that is not committed."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid

import orjson
import pytest
import sqlalchemy as sa

from moorage.engines.spark.messages import parse
from moorage.engines.spark.sinks import (
    ParquetBatchWriter,
    committed_batches,
    foreach_batch,
    open_batch_writer,
    write_batch,
    write_stream,
)
from moorage.engines.spark.sources import read_stream
from moorage.errors import BadRequest
from moorage.streams.brokers import open_broker

SCHEMA = "message_id string, body binary, id string, text string, embedding array<float>, error string"


def batch(spark, n: int, start: int = 0, poison: int = 0):
    rows = [(f"{i}-0", orjson.dumps({"id": f"m{i}"}), f"m{i}", f"text {i}", [float(i), 0.5], None)
            for i in range(start, start + n)]  # fmt: skip
    rows += [(f"{i}-9", b"{bad", f"{i}-9", None, None, "invalid_json: the body is not JSON") for i in range(poison)]
    return spark.createDataFrame(rows, SCHEMA)


def checkpoint(tmp_path, query_id: str) -> str:
    """A checkpoint folder as Spark leaves it: its metadata names the query."""
    path = tmp_path / f"ckpt-{query_id}"
    path.mkdir()
    (path / "metadata").write_text(json.dumps({"id": query_id}) + "\n")
    return str(path)


def dead_letters(url: str):
    async def go():
        async with open_broker(url) as broker:
            return await broker.dead_letters()

    return asyncio.run(go())


def test_parquet_replayed_batch_writes_nothing_and_temp_folders_stay_unseen(spark, tmp_path):
    out = tmp_path / "out"
    writer = ParquetBatchWriter(str(out))
    df = batch(spark, 5)
    assert writer.write(df, "q1", 0, 5) is True
    assert writer.write(df, "q1", 0, 5) is False  # the replay after a crash between commit and checkpoint
    assert writer.write(batch(spark, 3, start=5), "q1", 1, 3) is True
    (out / "_tmp" / "q1-2-deadbeef").mkdir(parents=True)  # a crash mid-write of batch 2
    batch(spark, 4, start=100).write.parquet(str(out / "_tmp" / "q1-2-deadbeef" / "data"))

    read = spark.read.parquet(str(out))
    assert sorted(r["id"] for r in read.collect()) == sorted(f"m{i}" for i in range(8))
    assert {(r["query_id"], r["batch_id"]) for r in read.select("query_id", "batch_id").distinct().collect()} == {
        ("q1", 0),
        ("q1", 1),
    }
    assert [(m["batch_id"], m["rows"]) for m in committed_batches(f"parquet://{out}")] == [(0, 5), (1, 3)]
    assert writer.write(batch(spark, 2, start=8), "q1", 2, 2) is True
    assert not list((out / "_tmp").iterdir())  # the retried batch cleared what the crash left


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_sql_upserts_by_message_id_and_records_the_batch_in_the_same_transaction(db, spark, tmp_path, request):
    url = f"sqlite:///{tmp_path}/r.db" if db == "sqlite" else request.getfixturevalue("pg_url")
    if db == "postgresql":
        url = url.replace("postgresql://", "postgresql+psycopg://")
    writer = open_batch_writer(f"sql+{url}?table=results")
    first = batch(spark, 4, poison=1)
    assert writer.write(first, "q1", 0, 5) is True
    assert writer.write(first, "q1", 0, 5) is False
    assert writer.write(batch(spark, 2, start=3), "q1", 1, 2) is True  # m3 again: a producer's duplicate

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(sa.text("SELECT id, embedding, error, writes, batch_id FROM results"))}
        done = conn.execute(sa.text("SELECT query_id, batch_id, rows FROM results_batches ORDER BY batch_id")).all()
    engine.dispose()
    assert sorted(rows) == ["0-9", "m0", "m1", "m2", "m3", "m4"]
    assert {i: r.writes for i, r in rows.items()} == {"0-9": 1, "m0": 1, "m1": 1, "m2": 1, "m3": 2, "m4": 1}
    embedding = rows["m2"].embedding
    assert (json.loads(embedding) if isinstance(embedding, str) else embedding) == [2.0, 0.5]
    assert rows["0-9"].error.startswith("invalid_json") and rows["m3"].batch_id == 1
    assert [tuple(r) for r in done] == [("q1", 0, 5), ("q1", 1, 2)]


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_foreach_batch_replayed_writes_every_sink_and_dead_letter_once(kind, spark, tmp_path, request):
    source = (
        f"{request.getfixturevalue('redis_base')}?topic=t{uuid.uuid4().hex[:10]}"
        if kind == "redis"
        else f"sqlite:///{tmp_path}/queue.db?topic=news"
    )
    sinks = [open_batch_writer(f"parquet://{tmp_path}/out"), open_batch_writer(f"sql+sqlite:///{tmp_path}/r.db")]
    events: list[tuple] = []
    run = foreach_batch(sinks, checkpoint(tmp_path, "q7"), dead_letter=source, on_event=lambda *e: events.append(e))
    df = batch(spark, 3, poison=2)
    run(df, 4)
    run(df, 4)  # Spark replays batch 4 after a crash before its commit log was written
    assert [e[0] for e in events] == ["batch_started", "sink_committed", "sink_committed", "dead_lettered",
                                      "batch_done", "batch_started", "sink_skipped", "sink_skipped",
                                      "dead_lettered", "batch_done"]  # fmt: skip
    assert [e[2]["count"] for e in events if e[0] == "dead_lettered"] == [2, 0]
    assert events[-1][2] == {"rows": 5, "errors": 2}
    letters = dead_letters(source)
    assert sorted(d.message_id for d in letters) == ["0-9", "1-9"]
    assert all(d.reason.startswith("invalid_json:") and d.body == b"{bad" for d in letters)
    db = sqlite3.connect(tmp_path / "r.db")
    assert db.execute("SELECT count(*), sum(writes) FROM moorage_results").fetchone() == (5, 5)
    assert spark.read.parquet(str(tmp_path / "out")).count() == 5


def test_write_stream_from_redis_to_parquet_and_sql_resumes_from_its_checkpoint(spark, redis_base, tmp_path):
    source = f"{redis_base}?topic=t{uuid.uuid4().hex[:10]}&group=spark"

    def publish(bodies: list[bytes]) -> None:
        async def go() -> None:
            async with open_broker(source) as broker:
                await broker.publish(bodies)

        asyncio.run(go())

    def run() -> None:
        df = parse(read_stream(spark, source, max_batch_size=10), max_text_chars=100)
        query = write_stream(df, sinks, str(tmp_path / "ckpt"), f"q{uuid.uuid4().hex[:6]}", dead_letter=source,
                             trigger={"availableNow": True})  # fmt: skip
        query.awaitTermination()
        assert query.exception() is None

    sinks = [f"parquet://{tmp_path}/out", f"sql+sqlite:///{tmp_path}/r.db?table=news"]
    too_long = orjson.dumps({"id": "long", "text": "x" * 200})
    publish([orjson.dumps({"id": f"a{i}", "text": f"first {i}"}) for i in range(7)] + [too_long])
    run()
    publish([orjson.dumps({"id": f"b{i}", "text": f"second {i}"}) for i in range(4)] + [b"nope"])
    run()  # the same checkpoint: only what came since

    ids = [r["id"] for r in spark.read.parquet(str(tmp_path / "out")).collect()]
    named = {f"a{i}" for i in range(7)} | {f"b{i}" for i in range(4)}
    assert len(ids) == len(set(ids)) == 13 and named < set(ids)  # and the two poison rows, by entry id
    db = sqlite3.connect(tmp_path / "r.db")
    rows = dict(db.execute("SELECT id, error FROM news").fetchall())
    assert set(rows) == set(ids)
    reasons = sorted(e.split(":")[0] for e in rows.values() if e)
    assert reasons == ["invalid_json", "text_too_long"]
    assert db.execute("SELECT max(writes) FROM news").fetchone() == (1,)
    assert sorted(d.reason.split(":")[0] for d in dead_letters(source)) == ["invalid_json", "text_too_long"]


def test_write_batch_with_a_job_id_writes_once(spark, tmp_path):
    df = batch(spark, 6)
    url = f"parquet://{tmp_path}/out"
    assert write_batch(df, url, job_id="nightly-1") == 6
    write_batch(df, url, job_id="nightly-1")
    assert spark.read.parquet(str(tmp_path / "out")).count() == 6


def test_sinks_that_cannot_commit_once_are_refused(tmp_path):
    with pytest.raises(BadRequest, match="parquet:///PATH or sql"):
        open_batch_writer(f"jsonl://{tmp_path}/out")
    with pytest.raises(BadRequest, match="atomic rename"):
        open_batch_writer("parquet://s3://bucket/out")
