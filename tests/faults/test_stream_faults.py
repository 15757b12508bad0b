"""Stream workers through broker restarts, sink outages and a full disk: every input once in the
sink, no duplicates, no dead letters for a fault that was not the message's, and a worker that
stops within its grace period even while its broker is gone.

Each test runs a real worker (in-process, or `moorage stream run` where a real SIGTERM matters)
against real servers from tests/services/restartable.py, and prints its figures. Kafka's test broker
(librdkafka's mock cluster) cannot restart: its broker is taken down and up again instead, which a
client sees as a connection loss."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from moorage.streams import open_broker
from moorage.streams.health import Health
from moorage.streams.runner import StreamJob, run_stream

from tests.services.restartable import kafka_service, postgres_service, rabbitmq_service, redis_service
from tests.services.servers import free_port, redis_server
from tests.support import eventually, wait_until

pytestmark = pytest.mark.anyio
N = 2000


def inputs(n: int) -> list[bytes]:
    return [json.dumps({"id": f"in-{i}", "text": f"message number {i}"}).encode() for i in range(n)]


def stream_settings(settings, **stream):
    defaults = {"batch_size": 16, "max_wait_ms": 5, "log_interval_s": 1.0, "backoff_s": 0.1, "max_backoff_s": 1.0,
                "lease_heartbeat_s": 0.5, "stop_grace_s": 5.0}  # fmt: skip
    return settings.model_copy(update={"stream": settings.stream.model_copy(update={**defaults, **stream})})


def sqlite_rows(db: Path) -> list[tuple]:
    """(id, writes, attempts) of each row of the SQLite SQL sink."""
    if not db.exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
            return conn.execute("SELECT id, writes, attempts FROM results").fetchall()
    except sqlite3.OperationalError:  # not created yet, or locked by the writer for a moment
        return []


class Counter:
    """Rows in a sink, for `eventually`: reads the sink at most every `every_s` (a read is a query or
    a folder of files; the worker shares two cores with it)."""

    def __init__(self, read, every_s: float = 0.1) -> None:
        self.read, self.every_s = read, every_s
        self.last: list[tuple] = []
        self._at = 0.0

    def __call__(self) -> int:
        if time.monotonic() - self._at >= self.every_s:
            self.last = self.read() or self.last
            self._at = time.monotonic()
        return len(self.last)

    def now(self) -> list[tuple]:
        self._at = 0.0
        self()
        return self.last


@pytest.fixture
def emb(registry, fake_model):
    """A fake embedder that takes a few milliseconds a batch, so that a fault lands mid-stream."""
    registry.register(fake_model("embed", delay_ms=25), "emb", task="embed")
    return "emb"


async def _publish(url: str, bodies: list[bytes]) -> None:
    async with open_broker(url) as b:
        for i in range(0, len(bodies), 500):
            await b.publish(bodies[i : i + 500])


async def _dead_letters(url: str) -> list:
    async with open_broker(url) as b:
        return await b.dead_letters()


async def _worker_mid_stream(service, url: str, settings, registry, model: str, tmp_path: Path):
    """N inputs on the broker and an in-process worker into a SQLite sink; returns once ~300 rows are
    written and the broker has been stopped: (rows, health, stop, worker)."""
    db = tmp_path / "out.db"
    await _publish(url, inputs(N))
    rows = Counter(lambda: sqlite_rows(db))
    health, stop = Health(), asyncio.Event()
    job = StreamJob(url, f"sql+sqlite:///{db}?table=results", model)
    worker = asyncio.create_task(run_stream(stream_settings(settings), job, stop, registry=registry, health=health))
    try:
        await eventually(lambda: rows() >= 300, 60, "300 rows before the fault")
        await asyncio.to_thread(service.stop)
    except BaseException:
        worker.cancel()
        raise
    return rows, health, stop, worker


async def _stops(worker: asyncio.Task, stop: asyncio.Event, within_s: float = 60) -> bool:
    """Ask the worker to stop; whether it did within `within_s` (if not, it is cancelled). Not
    wait_for, which would wait out the cancel too."""
    stop.set()
    done, _ = await asyncio.wait({worker}, timeout=within_s)
    if not done:
        worker.cancel()
    return bool(done)


async def _restart_mid_stream(service, url: str, settings, registry, model: str, tmp_path: Path) -> dict:
    """Stop the broker at ~300 rows, restart it once the worker says it is stuck, and measure."""
    rows, health, stop, worker = await _worker_mid_stream(service, url, settings, registry, model, tmp_path)
    try:
        at_stop = len(rows.now())
        await eventually(lambda: not health.is_healthy, 30, "the worker to report the broker down")
        problems = health.report()["problems"]
        await asyncio.to_thread(service.start)
        back_at, before = time.monotonic(), len(rows.now())
        await eventually(lambda: rows() > before, 30, "a new row after the broker's return")
        first_row_s = time.monotonic() - back_at
        await eventually(lambda: rows() >= N, 120, f"{N} rows")
        await eventually(lambda: health.is_healthy, 30, "the worker to report healthy again")
        dead = await _dead_letters(url)
    finally:
        if not service.running:  # failed mid-outage: the worker stops against a live broker, as it would
            with contextlib.suppress(Exception):
                await asyncio.to_thread(service.start)
        assert await _stops(worker, stop), "the worker stopped within 60 s of being asked"
        counts = worker.result()
    ids = [r[0] for r in rows.last]
    figures = {"rows": len(ids), "distinct": len(set(ids)), "at_stop": at_stop, "first_row_s": round(first_row_s, 2),
               "replays": sum(r[1] for r in rows.last) - len(ids), "dead": len(dead), "problems": problems,
               "counts": str(counts)}  # fmt: skip
    print(figures)
    assert set(ids) == {f"in-{i}" for i in range(N)} and len(ids) == N, "0 lost, 0 duplicated"
    assert at_stop < N, "the broker went away mid-stream"
    assert not dead, [d.reason for d in dead]
    assert first_row_s < 10, "the first new row within 10 s of the broker's return"
    assert counts.dead_lettered == 0
    return figures


async def test_rabbitmq_restart_mid_stream_loses_and_duplicates_nothing(settings, registry, emb, tmp_path):
    """A RabbitMQ restart leaves the worker's deliveries stale (their channel is gone): it treats
    them as queued again, reconnects, and carries on; meanwhile it reports itself unhealthy."""
    with rabbitmq_service() as rabbit:
        figures = await _restart_mid_stream(rabbit, f"{rabbit.url}?topic=faults&prefetch=64", settings, registry,
                                            emb, tmp_path)  # fmt: skip
    assert figures["problems"], "the worker said what it was waiting for"


async def test_kafka_connection_loss_mid_stream_loses_and_duplicates_nothing(settings, registry, emb, tmp_path):
    """librdkafka's mock cluster cannot restart: its broker goes down (connections dropped, new ones
    refused) and comes back with the same topics and offsets, which is what a consumer sees of one."""
    with kafka_service() as kafka:
        url = f"{kafka.url}?topic=faults&create=auto&session_timeout_ms=6000"
        figures = await _restart_mid_stream(kafka, url, settings, registry, emb, tmp_path)
    assert figures["problems"], "the worker said what it was waiting for"


async def test_a_kafka_worker_stopped_while_its_broker_is_down_stops(settings, registry, emb, tmp_path):
    """The broker goes away mid-stream and stays away. An ack's commit waits on a coordinator that
    cannot be reached (librdkafka waits out its request timeouts again and again): it fails after
    `commit_timeout_ms`, so the worker reports the broker down, and when asked to stop it stops, its
    close waiting only a bounded time for the commit still running."""
    with kafka_service() as kafka:
        url = f"{kafka.url}?topic=faults&create=auto&session_timeout_ms=6000&commit_timeout_ms=2000"
        rows, health, stop, worker = await _worker_mid_stream(kafka, url, settings, registry, emb, tmp_path)
        try:
            await eventually(lambda: not health.is_healthy, 30, "the worker to report the broker down")
            started = time.monotonic()
            stopped = await _stops(worker, stop)
            print({"stop_s": round(time.monotonic() - started, 1), "rows": len(rows.now()),
                   "problems": health.report()["problems"]})  # fmt: skip
            assert stopped, "the worker stopped while its broker was down"
            assert worker.result().dead_lettered == 0
        finally:
            worker.cancel()
            await asyncio.to_thread(kafka.start)
    assert len(rows.now()) < N, "the broker went away mid-stream"


async def test_redis_restart_mid_stream_loses_and_duplicates_nothing(settings, registry, emb, tmp_path):
    with redis_service() as redis:
        figures = await _restart_mid_stream(redis, f"{redis.url}?topic=faults&claim_idle_ms=2000", settings,
                                            registry, emb, tmp_path)  # fmt: skip
    assert figures["problems"], "the worker said what it was waiting for"


def _health(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def test_sigterm_while_the_broker_is_down_stops_within_the_grace_period(registry, emb, home, tmp_path):
    """`moorage stream run` on Redis; Redis goes away; /healthz turns 503; SIGTERM ends the process
    within stream.stop_grace_s, and once Redis is back a new worker writes every message: none lost."""
    n, grace, db, port = 600, 4.0, tmp_path / "out.db", free_port()
    with redis_service() as redis:
        url = f"{redis.url}?topic=faults&claim_idle_ms=2000"
        asyncio.run(_publish(url, inputs(n)))
        env = {**os.environ, "MOORAGE_HOME": str(home), "MOORAGE_STREAM__BATCH_SIZE": "16", "HF_HUB_OFFLINE": "1",
               "MOORAGE_STREAM__STOP_GRACE_S": str(grace), "MOORAGE_STREAM__MAX_BACKOFF_S": "1"}  # fmt: skip
        cmd = [sys.executable, "-m", "moorage", "stream", "run", "--source", url, "--model", emb,
               "--sink", f"sql+sqlite:///{db}?table=results", "--metrics-port", str(port)]  # fmt: skip
        log = tmp_path / "worker.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            rows = Counter(lambda: sqlite_rows(db))
            wait_until(lambda: rows() >= 100 or proc.poll() is not None, 90, "100 rows")
            assert proc.poll() is None, log.read_text()[-3000:]
            assert _health(port) == 200
            redis.stop(kill=True)  # gone at once, mid-stream, with messages in flight
            wait_until(lambda: _health(port) == 503, 30, "/healthz to report the broker down")
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(grace + 10)
            took = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        tail = log.read_text()[-3000:]
        print({"exit": code, "stop_s": round(took, 2), "grace_s": grace, "rows_before": len(rows.last)})
        assert code in (0, -signal.SIGTERM), tail
        # the worker itself is done within the grace (the in-process test below holds it to that);
        # the process then closes its clients and the interpreter exits
        assert took <= grace + 2.0, f"stopped {took:.1f}s after SIGTERM (grace {grace}s)\n{tail}"
        redis.start()
        asyncio.run(_drain(url, db, emb, registry, tmp_path, n))
    ids = [r[0] for r in sqlite_rows(db)]
    assert sorted(ids) == sorted(f"in-{i}" for i in range(n)), "no message lost"


async def _drain(url: str, db: Path, model: str, registry, tmp_path: Path, n: int) -> None:
    from moorage.config import load_settings

    settings = load_settings(environ={"MOORAGE_HOME": str(tmp_path / "home"), "MOORAGE_SECURITY__AUTH": "false"})
    stop = asyncio.Event()
    job = StreamJob(url, f"sql+sqlite:///{db}?table=results", model)
    worker = asyncio.create_task(run_stream(stream_settings(settings), job, stop, registry=registry))
    try:
        await eventually(lambda: len(sqlite_rows(db)) >= n, 60, f"{n} rows after the restart")
    finally:
        stop.set()
        await worker


def test_stop_event_while_the_broker_is_down_ends_the_worker_within_its_grace(settings, registry, emb, tmp_path):
    """The same in-process: the stop event ends the receive retry at once and the rest within the grace."""
    db, grace = tmp_path / "out.db", 3.0

    async def scenario(redis) -> float:
        url = f"{redis.url}?topic=faults&claim_idle_ms=2000"
        await _publish(url, inputs(400))
        health, stop = Health(), asyncio.Event()
        job = StreamJob(url, f"sql+sqlite:///{db}?table=results", emb)
        st = stream_settings(settings, stop_grace_s=grace)
        worker = asyncio.create_task(run_stream(st, job, stop, registry=registry, health=health))
        await eventually(lambda: len(sqlite_rows(db)) >= 50, 60, "50 rows")
        await asyncio.to_thread(redis.stop, True)
        await eventually(lambda: not health.is_healthy, 30, "the worker to report the broker down")
        started = time.monotonic()
        stop.set()
        await asyncio.wait_for(worker, grace + 10)
        return time.monotonic() - started

    with redis_service() as redis:
        took = asyncio.run(scenario(redis))
    print({"stop_s": round(took, 2), "grace_s": grace})
    assert took <= grace


@pytest.mark.parametrize("outage", ["short", "long"])  # longer than the sink's retries; than 2 deliveries
async def test_a_postgres_sink_outage_writes_every_row_once_and_dead_letters_nothing(outage, settings, registry, emb,
                                                                                    tmp_path):  # fmt: skip
    """The sink goes away for a moment, or for longer than claim_idle_ms x max_deliveries: the worker
    holds its batch and keeps its leases, so no message is delivered again or dead-lettered."""
    import psycopg

    with redis_server() as redis_url, postgres_service() as pg:
        url = f"{redis_url}?topic=faults&claim_idle_ms=2000&max_deliveries=2"
        await _publish(url, inputs(N))
        sink = "sql+" + pg.url.replace("postgresql://", "postgresql+psycopg://") + "?table=results"

        def pg_rows() -> list[tuple]:
            if not pg.running:
                return []
            try:
                with psycopg.connect(pg.url, connect_timeout=2) as conn:
                    return conn.execute("SELECT id, writes, attempts FROM results").fetchall()
            except psycopg.Error:
                return []

        rows = Counter(pg_rows)
        health, stop = Health(), asyncio.Event()
        worker = asyncio.create_task(
            run_stream(stream_settings(settings), StreamJob(url, sink, emb), stop, registry=registry, health=health)
        )
        try:
            await eventually(lambda: rows() >= 300, 60, "300 rows before the outage")
            await asyncio.to_thread(pg.stop)
            down_at = time.monotonic()
            await eventually(lambda: not health.is_healthy, 30, "the worker to report the sink down")
            # the outage's length is the fault itself, not a synchronisation: short outlasts the sink's
            # own retries (5 attempts), long outlasts max_deliveries (2) x claim_idle_ms
            while time.monotonic() - down_at < (3 if outage == "short" else 12):
                assert not health.is_healthy
                await asyncio.sleep(0.25)
            await asyncio.to_thread(pg.start)
            down_s = time.monotonic() - down_at
            await eventually(lambda: rows() >= N, 120, f"{N} rows")
            await eventually(lambda: health.is_healthy, 30, "healthy again")
            dead = await _dead_letters(url)
        finally:
            stop.set()
            counts = await asyncio.wait_for(worker, 60)
    ids = [r[0] for r in rows.last]
    figures = {"outage": outage, "down_s": round(down_s, 1), "rows": len(ids), "distinct": len(set(ids)),
               "replays": sum(r[1] for r in rows.last) - len(ids), "max_attempts": max(r[2] for r in rows.last),
               "dead": len(dead), "counts": str(counts)}  # fmt: skip
    print(figures)
    assert sorted(ids) == sorted(f"in-{i}" for i in range(N)), "every row once"
    assert not dead, [(d.message_id, d.reason) for d in dead]
    assert figures["max_attempts"] == 1, "a sink failure is not a delivery: nothing was delivered twice"


@contextlib.contextmanager
def small_disk(size: str = "2m"):
    folder = Path(tempfile.mkdtemp(prefix="moorage-disk-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        folder.rmdir()
        pytest.skip(f"cannot mount a {size} tmpfs to fill (needs root): {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        folder.rmdir()


def fill(folder: Path) -> Path:
    """Take every free byte of the filesystem."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        with contextlib.suppress(OSError):
            os.fsync(f.fileno())
    return filler


async def test_a_full_disk_under_a_parquet_sink_loses_and_duplicates_nothing(settings, registry, emb, tmp_path):
    """The disk fills while the worker rolls Parquet files: every failed file leaves no temporary
    file and its rows are written once the space is back, neither lost nor twice."""
    with small_disk() as disk:
        out = disk / "out"
        url = f"sqlite:///{tmp_path}/queue.db?topic=faults&visibility_timeout=2"
        await _publish(url, inputs(N))

        def parquet_ids() -> list[tuple]:
            ids: list[tuple] = []
            for f in sorted(out.glob("*.parquet")):
                ids.extend((i,) for i in pq.read_table(f, columns=["id"]).column("id").to_pylist())
            return ids

        rows = Counter(parquet_ids)
        health, stop = Health(), asyncio.Event()
        job = StreamJob(url, f"parquet://{out}?rows=100&seconds=0.5", emb)
        worker = asyncio.create_task(run_stream(stream_settings(settings), job, stop, registry=registry, health=health))
        try:
            await eventually(lambda: rows() >= 300, 60, "300 rows before the disk fills")
            filler = await asyncio.to_thread(fill, disk)
            full_at = time.monotonic()
            await eventually(lambda: not health.is_healthy, 30, "the worker to report the disk full")
            while time.monotonic() - full_at < 4:  # full for longer than the sink's own retries
                assert not health.is_healthy
                await asyncio.sleep(0.25)
            temp_while_full = len(list(out.glob(".*.tmp")))
            filler.unlink()
            full_s = time.monotonic() - full_at
            await eventually(lambda: rows() >= N, 120, f"{N} rows")
            dead = await _dead_letters(url)
        finally:
            stop.set()
            counts = await asyncio.wait_for(worker, 60)
        temps = list(out.glob(".*.tmp"))
        ids = [r[0] for r in parquet_ids()]
    figures = {"rows": len(ids), "distinct": len(set(ids)), "duplicates": len(ids) - len(set(ids)),
               "temp_files": len(temps), "temp_while_full": temp_while_full, "full_s": round(full_s, 1),
               "dead": len(dead), "counts": str(counts)}  # fmt: skip
    print(figures)
    assert set(ids) == {f"in-{i}" for i in range(N)}, "0 lost"
    assert len(ids) == N, f"0 duplicates, not {len(ids) - len(set(ids))}"
    assert not temps and not temp_while_full, "no temporary file left behind"
    assert not dead
