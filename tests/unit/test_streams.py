"""Stream pieces without a broker server: message decoding, sinks, the producer, a flaky sink."""

from __future__ import annotations

import asyncio
import csv
import errno
import json
import os
import sqlite3

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moorage.batching import InferenceService
from moorage.errors import BadRequest, Unprocessable
from moorage.streams import Message, open_broker, open_sink
from moorage.streams.producer import messages, produce
from moorage.streams.runner import StreamJob, run_stream
from moorage.streams.sinks import FileSink, SQLSink
from moorage.streams.worker import Envelope, Poison, WorkerConfig, decode

pytestmark = pytest.mark.anyio
CFG = WorkerConfig(max_text_chars=50)


def msg(body: bytes) -> Message:
    return Message(broker_id="b-1", body=body)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{", "invalid_json"),
        (b'"just a string"', "invalid_message"),
        (b'{"text": ""}', "missing_text"),
        (b'{"text": null}', "missing_text"),
        (b'{"id": true, "text": "x"}', "invalid_id"),
        (b'{"id": "", "text": "x"}', "invalid_id"),
        (json.dumps({"text": "y" * 51}).encode(), "text_too_long"),
    ],
)
def test_bad_messages_are_poison_with_a_reason(body, code):
    with pytest.raises(Poison, match=f"^{code}: "):
        decode(msg(body), "embed", CFG)


def test_decode_takes_the_payload_id_or_the_broker_id_and_the_service_validates_the_rest():
    assert decode(msg(b'{"id": 7, "text": "hi"}'), "embed", CFG) == Envelope("7", "hi")
    assert decode(msg(b'{"text": "hi"}'), "classify", CFG) == Envelope("b-1", "hi")
    chat = b'{"messages": [{"role": "user", "content": "hi"}], "parameters": {"max_new_tokens": 3}}'
    envelope = decode(msg(chat), "generate", CFG)
    service = InferenceService(pool=None, default_max_tokens=16)  # type: ignore[arg-type]  # prepare needs no pool
    (item,) = service.prepare("generate", [envelope.input], envelope.parameters).items
    assert item.messages[0]["content"] == "hi" and item.params.max_new_tokens == 3
    bad = decode(msg(b'{"text": "hi", "parameters": {"temperature": 9}}'), "generate", CFG)
    with pytest.raises(Unprocessable) as info:  # the same parameter rules as over HTTP
        service.prepare("generate", [bad.input], bad.parameters)
    assert info.value.code == "invalid_parameters" and "temperature" in info.value.message
    with pytest.raises(Unprocessable) as info:
        service.prepare("generate", [{"messages": [{"role": 1}]}], None)
    assert info.value.code == "invalid_input"
    with pytest.raises(Poison, match="^invalid_messages"):
        decode(msg(b'{"messages": []}'), "generate", CFG)


def test_sink_and_broker_urls_are_checked():
    with pytest.raises(BadRequest, match="unknown sink"):
        open_sink("ftp://x")
    with pytest.raises(BadRequest, match="unknown broker URL"):
        open_broker("nats://x")
    with pytest.raises(BadRequest, match="not a number"):
        open_broker("sqlite:///q.db?visibility_timeout=soon")


async def test_file_sinks_roll_and_leave_only_whole_files(tmp_path):
    rows = [{"id": str(i), "model": "m", "version": 1, "task": "embed", "embedding": [0.5, i]} for i in range(25)]
    async with open_sink(f"parquet://{tmp_path}/pq?rows=10") as sink:
        await sink.write(rows)
        assert sink.pending == 0  # 25 rows with rows=10: one file of 25 (a write rolls when it reaches the bound)
        await sink.write(rows[:3])
        assert sink.pending == 3
    files = sorted((tmp_path / "pq").glob("*.parquet"))
    table = pq.read_table(files)
    assert table.num_rows == 28 and table.schema.field("embedding").type == pa.list_(pa.float32())
    assert not list((tmp_path / "pq").glob(".*tmp")), "no temporary file is left behind"
    async with open_sink(f"jsonl://{tmp_path}/js?seconds=0") as sink:
        await sink.write(rows[:2])
        assert isinstance(sink, FileSink) and sink.flush_due()
    lines = [json.loads(line) for f in (tmp_path / "js").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["0", "1"]


async def test_a_failed_file_leaves_no_temp_file_and_writing_again_adds_rows_once(tmp_path, monkeypatch):
    rows = [{"id": str(i), "model": "m", "version": 1, "task": "embed", "embedding": [0.5, i]} for i in range(6)]
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    async with open_sink(f"parquet://{tmp_path}/pq?rows=5") as sink:
        assert isinstance(sink, FileSink)
        await sink.write(rows[:3])
        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(OSError) as info:
            await sink.write(rows[3:])  # reaches rows=5: the roll fails
        assert sink.is_transient(info.value), "a full disk is waited out, not handed back"
        assert sink.pending == 3, "the failed write's rows left the buffer again; the earlier ones stay"
        assert not list((tmp_path / "pq").iterdir()), "no temporary file is left behind"
        monkeypatch.setattr(os, "fsync", real_fsync)
        await sink.write(rows[3:])  # the worker writes the batch again once the disk has room
        assert sink.pending == 0
        await sink.write(rows[:1])
        assert sink.discard() == 1 and sink.pending == 0  # handed back: never written later as well
    ids = pq.read_table(sorted((tmp_path / "pq").glob("*.parquet"))).column("id").to_pylist()
    assert sorted(ids) == [str(i) for i in range(6)]


async def test_sql_sink_upserts_by_id_and_counts_replays(tmp_path):
    db = tmp_path / "r.db"
    sink = open_sink(f"sql+sqlite:///{db}?table=out")
    assert isinstance(sink, SQLSink)
    row = {"id": "a", "model": "m", "version": 1, "task": "classify", "label": "x", "score": 0.5}
    async with sink:
        await sink.write([row, {**row, "id": "b"}])
        await sink.write([{**row, "version": 2}])  # a replay of "a" after a crash
    got = sqlite3.connect(db).execute("SELECT id, version, writes, output FROM out ORDER BY id").fetchall()
    assert [(r[0], r[1], r[2]) for r in got] == [("a", 2, 2), ("b", 1, 1)]
    assert json.loads(got[0][3]) == {"label": "x", "score": 0.5}


async def test_sql_sink_tolerates_a_worker_that_added_the_new_columns_first(tmp_path, monkeypatch):
    """Two workers open an older table at once: both see the columns missing, one adds them, the
    other's ALTER fails with "duplicate column", which is ignored since the column is there."""
    import sqlalchemy as sa

    db = tmp_path / "r.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE out (id VARCHAR(512) PRIMARY KEY, model VARCHAR(200) NOT NULL, version INTEGER "
                     "NOT NULL, task VARCHAR(20) NOT NULL, output JSON NOT NULL, tokens INTEGER, latency_ms FLOAT, "
                     "published_at FLOAT, received_at FLOAT, completed_at FLOAT, attempts INTEGER, "
                     "writes INTEGER DEFAULT '1' NOT NULL)")  # fmt: skip
    old = [r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(out)")]
    async with open_sink(f"sql+sqlite:///{db}?table=out"):  # the first worker adds them
        pass
    real_inspect, calls = sa.inspect, []

    class Stale:  # what the second worker saw before the first one's ALTERs
        def __init__(self, engine) -> None:
            self.real = real_inspect(engine)

        def get_columns(self, table):
            calls.append(table)
            columns = self.real.get_columns(table)
            return [c for c in columns if c["name"] in old] if len(calls) == 1 else columns

    monkeypatch.setattr(sa, "inspect", Stale)
    row = {"id": "a", "model": "m", "version": 1, "task": "generate", "text": "x", "ttft_ms": 2.0}
    async with open_sink(f"sql+sqlite:///{db}?table=out") as sink:
        await sink.write([row])
    assert len(calls) == 4, "one look, then one after each of the three failed ALTERs"
    got = sqlite3.connect(db).execute("SELECT ttft_ms, queue_ms, input_sha256 FROM out").fetchall()
    assert got == [(2.0, None, None)]


def test_producer_reads_jsonl_csv_parquet_with_stable_ids(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n{"id": "x", "text": "b", "lang": "en"}\nnot json\n')
    with open(tmp_path / "in.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["text"])
        w.writeheader()
        w.writerows([{"text": "a"}, {"text": "b"}])
    pq.write_table(pa.table({"body": ["a", "b"], "key": ["k1", "k2"]}), tmp_path / "in.parquet")
    jsonl = list(messages(tmp_path / "in.jsonl"))
    first_two = [json.loads(b) for b, _ in jsonl[:2]]
    assert first_two == [{"id": "in-1", "text": "a"}, {"id": "x", "text": "b", "lang": "en"}]
    assert jsonl[2] == (b"not json", False), "a bad line is passed on as it is, to be dead-lettered"
    assert [json.loads(b)["id"] for b, _ in messages(tmp_path / "in.csv")] == ["in-1", "in-2"]
    pqm = [json.loads(b) for b, _ in messages(tmp_path / "in.parquet", id_field="key", text_field="body")]
    assert pqm == [{"id": "k1", "text": "a"}, {"id": "k2", "text": "b"}]


class FlakySink(SQLSink):
    """Fails its first writes, like a database that restarts."""

    failures = 3

    async def write(self, rows):
        if FlakySink.failures > 0:
            FlakySink.failures -= 1
            raise ConnectionError("database is restarting")
        await super().write(rows)


async def test_a_flaky_sink_is_retried_with_backoff_and_loses_nothing(settings, registry, fake_model, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    registry.register(fake_model("embed"), "emb", task="embed")
    url, db = f"sqlite:///{tmp_path}/q.db?topic=in", tmp_path / "out.db"
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(50)))
    assert await produce(tmp_path / "in.jsonl", url) == (50, 0)
    monkeypatch.setattr("moorage.streams.runner.open_sink", lambda u, name_prefix: FlakySink(f"sqlite:///{db}", "r"))
    st = settings.model_copy(update={"stream": settings.stream.model_copy(update={"backoff_s": 0.01})})
    stop = asyncio.Event()
    worker = asyncio.create_task(run_stream(st, StreamJob(url, "unused", "emb"), stop, registry=registry))

    def written() -> int:
        try:  # the file can exist a moment before the sink has created its table
            return sqlite3.connect(db).execute("SELECT count(*) FROM r").fetchone()[0] if db.exists() else 0
        except sqlite3.OperationalError:
            return 0

    for _ in range(200):
        await asyncio.sleep(0.05)
        if written() == 50:
            break
    stop.set()
    counts = await worker
    assert FlakySink.failures == 0 and counts.processed == 50 and counts.dead_lettered == 0
    ids = sorted(r[0] for r in sqlite3.connect(db).execute("SELECT id FROM r"))
    assert ids == sorted(f"in-{i}" for i in range(1, 51))


async def test_a_call_stuck_in_a_client_bounds_its_caller_and_the_close_but_closes_only_after_it():
    """A client call that does not return (a Kafka commit while the coordinator is unreachable) fails
    its caller after `run_within`'s timeout, `close` returns after `close_wait_s` without closing the
    client under the call, and the client is closed once the call returns; the call's thread is a
    daemon, so the process can still exit."""
    import threading

    from moorage.streams.brokers.base import BlockingCalls, BrokerUnavailable

    release, closed, inside = threading.Event(), threading.Event(), threading.Event()
    threads: list[threading.Thread] = []

    def stuck() -> str:
        threads.append(threading.current_thread())
        inside.set()
        release.wait(30)
        return "late"

    calls = BlockingCalls(close_wait_s=0.2)
    with pytest.raises(BrokerUnavailable, match="the commit did not finish within 0.1 s"):
        await calls.run_within(0.1, "the commit", stuck)
    assert inside.wait(30) and threads[0].daemon
    await calls.close(closed.set)  # returns: the call still runs, so the client stays open
    assert not closed.is_set()
    release.set()
    assert await asyncio.to_thread(closed.wait, 30), "closed once the stuck call returned"
    with pytest.raises(BrokerUnavailable, match="closed"):
        await calls.run(stuck)
