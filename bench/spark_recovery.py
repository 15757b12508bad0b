"""Crash recovery of a Spark streaming query: Redis Streams -> model -> Parquet and SQL, the driver
killed with SIGKILL mid-batch and restarted from its checkpoint, N times; then every message id is
looked up in both sinks: lost and duplicated rows are counted, not assumed.

    python bench/spark_recovery.py [--kills 10] [--messages 500] [--batch 20] [--model REF]

Each run starts a driver process (this file, ``driver`` sub-command) in its own process group: a
local[2] Spark session, ``read_stream`` of a Redis stream, ``parse``, the model (``--model REF``
through ``predict_udf``; without it a hash of the text stands in), and ``write_stream`` to a
Parquet folder and a SQLite table with dead letters to the stream's ``dlq``. The driver appends one
JSON line per batch event (`moorage.engines.spark.sinks.EventHandler`) to an events file and, at
the kill point it was given, stops in place after writing that line; the parent waits for the
line and kills the whole group (driver, JVM, Python workers) with SIGKILL. Kill points cycle:
at a batch's start, after the Parquet commit (SQL not written yet), after both commits (Spark's
commit log not written yet), and while the batch runs (killed as soon as it started, not held).
The last run drains the stream with Trigger.AvailableNow and exits by itself.

Prints one line per run and the totals; exits 1 when a row is lost or duplicated. Needs
redis-server (scripts/test.sh installs it); the tests run this with 2 kills (tests/spark/test_recovery.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KILL_POINTS = ("batch_started", "parquet_committed", "sql_committed", "running")
POISON = [b"not json", b'{"id": "no-text"}', b'{"id": "long", "text": "' + b"x" * 300 + b'"}']
MAX_TEXT_CHARS = 200


# -- the driver (a separate process, killed by the parent) ------------------------------------------
def driver(args: argparse.Namespace) -> None:
    from pyspark.sql import functions as F

    from moorage.engines.spark import local_session, predict_udf
    from moorage.engines.spark.messages import parse
    from moorage.engines.spark.sinks import write_stream
    from moorage.engines.spark.sources import read_stream

    spark = local_session("local[2]", "moorage-recovery", conf={"spark.sql.shuffle.partitions": "2"})
    events = open(args.events, "a", buffering=1)  # noqa: SIM115 - open for the life of the driver
    seen_batches: list[int] = []

    def on_event(event: str, batch_id: int, detail: dict) -> None:
        sink = "parquet" if detail.get("sink", "").startswith("parquet") else "sql"
        point = f"{sink}_committed" if event == "sink_committed" else event
        events.write(json.dumps({"pid": os.getpid(), "event": point, "batch": batch_id, "detail": detail}) + "\n")
        if event == "batch_started":
            seen_batches.append(batch_id)
        if args.hold_at and point == args.hold_at and len(seen_batches) >= args.hold_after:
            events.write(json.dumps({"pid": os.getpid(), "event": "held", "batch": batch_id}) + "\n")
            os.fsync(events.fileno())
            threading.Event().wait()  # the parent's SIGKILL ends this process here

    df = parse(read_stream(spark, args.source, max_batch_size=args.batch), max_text_chars=MAX_TEXT_CHARS)
    if args.model:
        df = df.withColumn("prediction", predict_udf(args.model, batch_size=16)("text"))
    else:  # a deterministic stand-in for a model
        df = df.withColumn("prediction", F.sha2(F.col("text"), 256))
    trigger = {"availableNow": True} if args.drain else None
    sinks = [f"parquet://{args.out}", f"sql+sqlite:///{args.db}?table=results"]
    query = write_stream(df, sinks, args.checkpoint, "recovery", dead_letter=args.source, trigger=trigger,
                         on_event=on_event)  # fmt: skip
    query.awaitTermination()
    spark.stop()


# -- the parent: publish, start, kill, restart, count -----------------------------------------------
@dataclass
class Recovery:
    source: str
    work: Path
    batch: int = 20
    model: str | None = None
    hold_after: int = 2  # the kill lands in the run's second batch, so each run also commits one
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    runs: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)

    @property
    def events(self) -> Path:
        return self.work / "events.jsonl"

    def publish(self, n: int) -> set[str]:
        """`n` messages with ids and the poison ones; the ids every sink must hold exactly once (what
        `parse` names each entry: its id, or its entry id when it has none)."""
        import redis

        from moorage.engines.spark.messages import parse_payload
        from moorage.streams.brokers import open_broker

        good = [json.dumps({"id": f"m{i}", "text": f"sentence number {i}"}).encode() for i in range(n)]
        bodies = good[: n // 2] + POISON + good[n // 2 :]

        async def go() -> None:
            async with open_broker(self.source) as broker:
                await broker.publish(bodies)

        asyncio.run(go())
        topic = self.source.split("topic=")[1].split("&")[0]
        with redis.Redis.from_url(self.source.split("?")[0]) as r:
            entries = r.xrange(topic)
        return {parse_payload(eid.decode(), f[b"body"], max_text_chars=MAX_TEXT_CHARS)["id"] for eid, f in entries}

    def _start(self, hold_at: str | None, drain: bool) -> subprocess.Popen:
        args = [sys.executable, __file__, "driver", "--source", self.source, "--events", str(self.events),
                "--out", str(self.work / "out"), "--db", str(self.work / "results.db"),
                "--checkpoint", str(self.work / "ckpt"), "--batch", str(self.batch)]  # fmt: skip
        if hold_at:
            args += ["--hold-at", hold_at, "--hold-after", str(self.hold_after)]
        if drain:
            args.append("--drain")
        if self.model:
            args += ["--model", self.model]
        log = open(self.work / f"driver-{len(self.runs)}.log", "wb")  # noqa: SIM115 - closed after the run
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
                                start_new_session=True)  # fmt: skip
        log.close()
        return proc

    def all_events(self) -> list[dict]:
        """Every driver's batch events so far, in order (a line cut short by a kill is left out)."""
        if not self.events.exists():
            return []
        lines = []
        for line in self.events.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return lines

    def _lines(self, pid: int) -> list[dict]:
        return [e for e in self.all_events() if e["pid"] == pid]

    def kill_run(self, point: str, timeout_s: float = 300) -> dict:
        """One driver run, killed (SIGKILL, its whole process group) at `point` of its `hold_after`-th batch."""
        started = time.monotonic()
        proc = self._start(None if point == "running" else point, drain=False)
        want = "batch_started" if point == "running" else "held"

        def at_point() -> list[dict]:
            lines = self._lines(proc.pid)
            starts = [e for e in lines if e["event"] == "batch_started"]
            return (
                starts[self.hold_after - 1 :] if want == "batch_started" else [e for e in lines if e["event"] == "held"]
            )

        deadline = time.monotonic() + timeout_s
        try:
            while not at_point():
                if proc.poll() is not None:
                    raise RuntimeError(f"the driver exited ({proc.returncode}) before {point}: see {self.work}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the driver did not reach {point} within {timeout_s}s: see {self.work}")
                time.sleep(0.05)
        finally:
            _kill(proc)
        batch = at_point()[0]["batch"]
        run = {"run": len(self.runs), "killed_at": point, "batch": batch, "seconds": time.monotonic() - started}
        self.runs.append(run)
        return run

    def drain_run(self, timeout_s: float = 300) -> dict:
        started = time.monotonic()
        proc = self._start(None, drain=True)
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the draining run did not end within {timeout_s}s: see {self.work}") from None
        finally:
            _kill(proc)
        if code != 0:
            raise RuntimeError(f"the draining run failed ({code}): see {self.work}/driver-{len(self.runs)}.log")
        run = {"run": len(self.runs), "killed_at": None, "seconds": time.monotonic() - started}
        self.runs.append(run)
        return run

    def count(self, expected: set[str]) -> dict:
        """Lost and duplicated ids in the Parquet folder and the SQL table; dead letters by reason."""
        import pyarrow.dataset as ds

        from moorage.engines.spark.sinks import committed_batches

        parquet_ids = ds.dataset(self.work / "out", format="parquet", partitioning="hive").to_table(
            columns=["id"]).column("id").to_pylist()  # fmt: skip
        db = sqlite3.connect(self.work / "results.db")
        sql_ids = [r[0] for r in db.execute("SELECT id FROM results")]
        replayed_writes = db.execute("SELECT coalesce(sum(writes - 1), 0) FROM results").fetchone()[0]
        db.close()
        return {
            "expected": len(expected),
            "parquet_rows": len(parquet_ids),
            "parquet_lost": len(expected - set(parquet_ids)),
            "parquet_duplicated": len(parquet_ids) - len(set(parquet_ids)),
            "sql_rows": len(sql_ids),
            "sql_lost": len(expected - set(sql_ids)),
            "sql_duplicated": replayed_writes,  # the key allows no second row: a replay would rewrite it
            "batches_committed": len(committed_batches(str(self.work / "out"))),
        }

    def group_lag(self) -> int:
        """Entries of the stream after the group's last-delivered id (what Spark has not committed to Redis)."""
        import redis

        topic = self.source.split("topic=")[1].split("&")[0]
        with redis.Redis.from_url(self.source.split("?")[0]) as r:
            (group,) = r.xinfo_groups(topic)
            last = group["last-delivered-id"].decode()
            return len(r.xrange(topic, f"({last}", "+"))

    def dead_letters(self) -> list[str]:
        from moorage.streams.brokers import open_broker

        async def go():
            async with open_broker(self.source) as broker:
                return await broker.dead_letters()

        return sorted(d.message_id for d in asyncio.run(go()))


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the driver's process group (driver, JVM, Python workers), whatever state it is in."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_recovery(source: str, work: Path, kills: int, messages: int, batch: int, model: str | None = None,
                 env: dict[str, str] | None = None, points: tuple[str, ...] = KILL_POINTS, hold_after: int = 2,
                 timeout_s: float = 300, report=print) -> tuple[dict, Recovery]:  # fmt: skip
    """Publish, kill `kills` times at the kill `points` in turn, drain; the counts (`Recovery.count`)."""
    recovery = Recovery(source, work, batch=batch, model=model, hold_after=hold_after, env=env or dict(os.environ))
    expected = recovery.publish(messages)
    for i in range(kills):
        run = recovery.kill_run(points[i % len(points)], timeout_s)
        report(f"run {run['run']}: SIGKILL at {run['killed_at']} of batch {run['batch']} ({run['seconds']:.1f} s)")
    run = recovery.drain_run(timeout_s)
    report(f"run {run['run']}: drained to the end ({run['seconds']:.1f} s)")
    counts = recovery.count(expected)
    counts["group_unacknowledged"] = recovery.group_lag()
    letters = recovery.dead_letters()
    counts["dead_letters"], counts["dead_letter_ids_distinct"] = len(letters), len(set(letters))
    return counts, recovery


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    d = sub.add_parser("driver")
    for flag in ("--source", "--events", "--out", "--db", "--checkpoint"):
        d.add_argument(flag, required=True)
    d.add_argument("--batch", type=int, default=20)
    d.add_argument("--hold-at")
    d.add_argument("--hold-after", type=int, default=2)
    d.add_argument("--drain", action="store_true")
    d.add_argument("--model")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--model", help="a registry reference (default: a hash of the text stands in)")
    parser.add_argument("--work", help="folder for the checkpoint, sinks and logs (default: a temporary one)")
    args = parser.parse_args()
    if args.command == "driver":
        driver(args)
        return
    sys.path.insert(0, str(ROOT))
    import tempfile

    from tests.services.servers import redis_server

    work = Path(args.work or tempfile.mkdtemp(prefix="moorage-spark-recovery-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
          f" Spark local[2]; {args.messages} messages + {len(POISON)} poison, {args.batch} per batch,"
          f" {args.kills} kills, model {args.model or 'sha256 stand-in'}; work folder {work}")  # fmt: skip
    started = time.monotonic()
    with redis_server() as base:
        counts, _ = run_recovery(f"{base}?topic=news-{uuid.uuid4().hex[:6]}&group=spark", work, args.kills,
                              args.messages, args.batch, args.model)  # fmt: skip
    print(" ".join(f"{k}={v}" for k, v in counts.items()), f"total_s={time.monotonic() - started:.0f}")
    bad = counts["parquet_lost"] + counts["parquet_duplicated"] + counts["sql_lost"] + counts["sql_duplicated"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
