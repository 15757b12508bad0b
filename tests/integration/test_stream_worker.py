"""The stream worker on every broker: nothing lost, nothing duplicated in the SQL sink, poison
messages dead-lettered with their reasons, two workers splitting one group, and a SIGKILL mid-batch."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moorage.streams import open_broker
from moorage.streams.runner import StreamJob, run_stream

pytestmark = pytest.mark.anyio

POISON = {
    b"this is not json": "invalid_json",
    b'["a", "list"]': "invalid_message",
    b'{"id": "p-no-text"}': "missing_text",
    b'{"id": "p-empty", "text": "   "}': "missing_text",
    b'{"id": "p-number", "text": 42}': "missing_text",
    b'{"id": {"nested": 1}, "text": "bad id"}': "invalid_id",
    json.dumps({"id": "p-long", "text": "x" * 5000}).encode(): "text_too_long",
    b"\xff\xfe not utf-8": "invalid_json",
}


def inputs(n: int, prefix: str = "in") -> list[bytes]:
    return [json.dumps({"id": f"{prefix}-{i}", "text": f"message number {i}"}).encode() for i in range(n)]


def sink_rows(db: Path, table: str = "results") -> list[tuple]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute(f"SELECT id, writes, attempts, version, model FROM {table}").fetchall()
        except sqlite3.OperationalError:  # not created yet
            return []


def stream_settings(settings, **stream):
    defaults = {"batch_size": 16, "max_wait_ms": 5, "max_text_chars": 1000, "log_interval_s": 1.0}
    return settings.model_copy(update={"stream": settings.stream.model_copy(update={**defaults, **stream})})


async def drain(url: str, until, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the worker did not finish in time"
        await asyncio.sleep(0.2)


@pytest.fixture
def emb(registry, fake_model):
    registry.register(fake_model("embed"), "emb", task="embed", alias="production")
    return "emb@production"


async def test_every_input_once_in_the_sql_sink_and_every_poison_dead_lettered(broker_url, settings, registry, emb,
                                                                                tmp_path):  # fmt: skip
    url, db = broker_url(), tmp_path / "out.db"
    good = inputs(200)
    async with open_broker(url) as b:
        await b.publish(good[:100] + list(POISON) + good[100:])
    stop = asyncio.Event()
    job = StreamJob(url, f"sql+sqlite:///{db}?table=results", emb)
    worker = asyncio.create_task(run_stream(stream_settings(settings), job, stop, registry=registry))
    try:
        await drain(url, lambda: len(sink_rows(db)) >= 200)
        async with open_broker(url) as b:
            deadline = time.monotonic() + 30
            while len(await b.dead_letters()) < len(POISON) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            dead = await b.dead_letters()
    finally:
        stop.set()
        counts = await worker
    rows = sink_rows(db)
    assert sorted(r[0] for r in rows) == sorted(f"in-{i}" for i in range(200))
    assert {(r[3], r[4]) for r in rows} == {(1, "emb")}
    assert counts.processed == 200 and counts.dead_lettered == len(POISON)
    by_body = {d.body: d.reason for d in dead}
    assert set(by_body) == set(POISON), "100% of the poison messages are in the dead-letter destination"
    for body, code in POISON.items():
        assert by_body[body].startswith(code + ":"), (body, by_body[body])


async def test_a_model_rejection_is_dead_lettered_with_its_code(broker_url, settings, registry,
                                                                               fake_model, tmp_path):  # fmt: skip
    registry.register(fake_model("generate"), "gen", task="generate")
    url, db = broker_url(), tmp_path / "out.db"
    # past the fake model's context of 2048 tokens, but within security.limits.max_tokens (4096)
    too_long = json.dumps({"id": "too-long", "text": "hi", "parameters": {"max_new_tokens": 3000}}).encode()
    too_many = json.dumps({"id": "too-many", "text": "hi", "parameters": {"max_new_tokens": 100000}}).encode()
    async with open_broker(url) as b:
        await b.publish(inputs(30) + [too_long, too_many])
    stop = asyncio.Event()
    job = StreamJob(url, f"sql+sqlite:///{db}?table=results", "gen")
    worker = asyncio.create_task(run_stream(stream_settings(settings), job, stop, registry=registry))
    try:
        await drain(url, lambda: len(sink_rows(db)) >= 30)
        async with open_broker(url) as b:
            deadline = time.monotonic() + 20
            while len(await b.dead_letters()) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            dead = await b.dead_letters()
    finally:
        stop.set()
        await worker
    assert sorted(r[0] for r in sink_rows(db)) == sorted(f"in-{i}" for i in range(30))
    # the model refuses one; the server's limits (the same policy as over HTTP) refuse the other first
    assert sorted(d.reason.split(":")[0] for d in dead) == ["context_length_exceeded", "max_tokens_too_large"]


async def test_two_workers_in_one_group_split_the_load(broker_url, settings, registry, fake_model, tmp_path):
    registry.register(fake_model("embed", delay_ms=20), "slow", task="embed")
    url, db = broker_url(), tmp_path / "out.db"
    async with open_broker(url) as b:
        await b.publish(inputs(600))
    stop = asyncio.Event()
    sink = f"sql+sqlite:///{db}?table=results"
    st = stream_settings(settings, batch_size=10)
    workers = [
        asyncio.create_task(run_stream(st, StreamJob(url + f"&consumer=w{i}", sink, "slow"), stop, registry=registry))
        for i in range(2)
    ]
    try:
        await drain(url, lambda: len(sink_rows(db)) >= 600, timeout=120)
    finally:
        stop.set()
        counts = await asyncio.gather(*workers)
    assert sorted(r[0] for r in sink_rows(db)) == sorted(f"in-{i}" for i in range(600))
    assert all(c.processed > 0 for c in counts), f"both workers did some of the work: {counts}"
    assert sum(c.processed for c in counts) >= 600


def test_sigkill_mid_batch_then_restart_loses_and_duplicates_nothing(broker_url, registry, fake_model, home, tmp_path):
    """A worker process killed while it holds a batch; after a restart every input id is in the SQL
    sink exactly once."""
    registry.register(fake_model("embed", delay_ms=40), "slow", task="embed")
    url, db, n = broker_url(), tmp_path / "out.db", 400
    asyncio.run(_publish(url, inputs(n)))
    env = {**os.environ, "MOORAGE_HOME": str(home), "MOORAGE_STREAM__BATCH_SIZE": "20", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "moorage", "stream", "run", "--source", url, "--model", "slow",
           "--sink", f"sql+sqlite:///{db}?table=results"]  # fmt: skip
    log = open(tmp_path / "worker.log", "wb")
    first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while len(sink_rows(db)) < 60:  # well into the stream: batches in flight, some written, some not
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    written_before = len(sink_rows(db))
    assert written_before < n, "killed mid-stream"
    second = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while len(sink_rows(db)) < n:
            assert second.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)  # let any late replay land: it must not add a row
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) in (0, -signal.SIGTERM)
    rows = sink_rows(db)
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids)) == n, "0 lost, 0 duplicated"
    assert set(ids) == {f"in-{i}" for i in range(n)}
    if broker_url.kind != "kafka":  # the messages the killed worker held were delivered again
        assert max(r[2] for r in rows) >= 2


async def _publish(url: str, messages: list[bytes]) -> None:
    async with open_broker(url) as b:
        await b.publish(messages)


async def test_rows_carry_engine_timings_and_the_input_hash_and_an_old_table_gains_the_columns(
    settings, registry, fake_model, tmp_path
):
    """A generation row has a time to first token within its latency and the sha256 of its input;
    an embedding row has no time to first token. A SQL table an older moorage created (without the
    newer columns) gets them added when the sink opens, and keeps its rows."""
    import hashlib

    import sqlalchemy as sa

    registry.register(fake_model("generate"), "gen", task="generate")
    registry.register(fake_model("embed"), "emb", task="embed")
    db = tmp_path / "out.db"
    with sqlite3.connect(db) as conn:  # the column set of moorage before queue_ms, ttft_ms, input_sha256
        conn.execute("CREATE TABLE results (id VARCHAR(512) PRIMARY KEY, model VARCHAR(200) NOT NULL, "
                     "version INTEGER NOT NULL, task VARCHAR(20) NOT NULL, output JSON NOT NULL, tokens INTEGER, "
                     "latency_ms FLOAT, published_at FLOAT, received_at FLOAT, completed_at FLOAT, "
                     "attempts INTEGER, writes INTEGER DEFAULT '1' NOT NULL)")  # fmt: skip
        conn.execute("INSERT INTO results (id, model, version, task, output) VALUES ('old', 'gen', 1, 'gen', '{}')")
    texts = {f"g-{i}": f"tell me about {i % 3}" for i in range(12)}
    bodies = [json.dumps({"id": k, "text": t, "parameters": {"max_new_tokens": 5}}).encode() for k, t in texts.items()]
    queue = f"sqlite:///{tmp_path}/queue.db"
    folder = tmp_path / "emb-rows"

    def file_rows() -> list[dict]:
        return [json.loads(line) for p in folder.glob("*.jsonl") for line in p.read_text().splitlines()]

    runs = [(f"{queue}?topic=gen&visibility_timeout=2", f"sql+sqlite:///{db}?table=results", "gen", bodies,
             lambda: len(sink_rows(db)) >= 13),
            (f"{queue}?topic=emb&visibility_timeout=2", f"jsonl://{folder}?rows=1&seconds=0.1", "emb", inputs(5),
             lambda: len(file_rows()) >= 5)]  # fmt: skip
    for url, sink, model, messages, done in runs:
        async with open_broker(url) as b:
            await b.publish(messages)
        stop = asyncio.Event()
        worker = asyncio.create_task(run_stream(stream_settings(settings), StreamJob(url, sink, model), stop,
                                                registry=registry))  # fmt: skip
        try:
            await drain(url, done)
        finally:
            stop.set()
            await worker
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        got = {r.id: r for r in conn.execute(sa.text("SELECT * FROM results"))}
    engine.dispose()
    assert got["old"].ttft_ms is None and got["old"].input_sha256 is None, "the old row is kept, the new columns NULL"
    for key, text in texts.items():
        row = got[key]
        assert 0 < row.ttft_ms <= row.latency_ms, (row.ttft_ms, row.latency_ms)
        assert row.queue_ms is not None and 0 <= row.queue_ms <= row.latency_ms
        assert row.input_sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert len({got[k].input_sha256 for k in texts}) == 3, "equal texts hash equal, whatever their ids"
    rows = file_rows()
    assert len(rows) == 5
    for row in rows:
        assert row["ttft_ms"] is None and row["queue_ms"] >= 0
        assert row["input_sha256"] == hashlib.sha256(f"message number {row['id'].split('-')[1]}".encode()).hexdigest()
