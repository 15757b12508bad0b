"""Exactly-once sinks for Spark: a replayed micro-batch writes nothing twice.

    query = write_stream(df, ["parquet:///data/out", "sql+postgresql+psycopg://.../db?table=results"],
                         checkpoint_location="/data/ckpt", query_name="news", dead_letter=source_url)
    rows = write_batch(df, "parquet:///data/out")

Spark replays a micro-batch after a crash: its offsets are in the checkpoint, so the same rows come
again under the same batch id. Every write is therefore keyed by (query id, batch id), the query id
being the one the checkpoint keeps across restarts:

- ``parquet://DIR`` (a local or mounted folder): the batch is written by Spark to a temporary folder
  ``DIR/_tmp/...``, a commit marker ``_moorage_commit.json`` (query, batch, rows) is added, and the
  folder is renamed into place as ``DIR/query_id=Q/batch_id=B`` in one atomic rename. A replayed
  batch finds its folder and writes nothing. Readers (Spark, pyarrow, DuckDB) skip names starting
  with ``_``, so they never see a batch that is not committed; ``query_id`` and ``batch_id`` read as
  partition columns.
- ``sql+URL?table=NAME`` (any SQLAlchemy URL; SQLite and PostgreSQL upsert natively): the rows are
  upserted by message id (``key``, default ``id``) and a row ``(query id, batch id)`` goes into
  ``NAME_batches`` in the same transaction; a replayed batch finds its row and writes nothing. The
  table's columns follow the DataFrame's schema (arrays, structs and maps as JSON), plus
  ``query_id``, ``batch_id`` and ``writes`` (how many batches wrote this id: more than 1 only when a
  producer sent the same id twice).

With ``dead_letter=URL`` (the source's broker URL), rows whose ``error`` is set (see
`moorage.engines.spark.messages.parse`) are also put on that broker's dead-letter destination with
their reason, once per message id on Redis and the SQLite queue (Kafka's dead-letter topic may get a
replayed entry twice). The rows stay in the sinks too, with their error.

Your own writer joins the same protocol through `foreach_batch`: anything with
``write(df, query_id, batch_id, rows) -> bool`` that makes a batch durable in one step and returns False for
a batch it already holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl

from ...errors import BadRequest
from ...streams.brokers.base import BrokerURL, redact

if TYPE_CHECKING:
    from pyspark.sql import DataFrame
    from pyspark.sql.streaming import StreamingQuery

COMMIT_MARKER = "_moorage_commit.json"
EventHandler = Callable[[str, int, dict], None]
"""Called on the driver as a batch goes: (event, batch id, detail). Events: ``batch_started``,
``sink_committed`` / ``sink_skipped`` (detail: ``sink``, ``rows``), ``dead_lettered`` (``count``),
``batch_done`` (``rows``, ``errors``)."""


class BatchWriter(Protocol):
    name: str

    def write(self, df: DataFrame, query_id: str, batch_id: int, rows: int) -> bool:
        """Make the batch (`rows` rows) durable in one step; False when this (query id, batch id) is
        already there."""
        ...


# -- Parquet ---------------------------------------------------------------------------------------
class ParquetBatchWriter:
    """One folder per (query id, batch id), renamed into place once complete."""

    def __init__(self, path: str) -> None:
        if "://" in path:
            raise BadRequest(
                f"parquet://{path}: the Parquet sink commits a batch with an atomic rename, so it needs a local or"
                " mounted folder (parquet:///PATH)",
                code="invalid_sink_url",
            )
        self.root = Path(path).expanduser()
        self.name = f"parquet://{self.root}"

    def batch_dir(self, query_id: str, batch_id: int) -> Path:
        return self.root / f"query_id={query_id}" / f"batch_id={batch_id}"

    def write(self, df: DataFrame, query_id: str, batch_id: int, rows: int) -> bool:
        final = self.batch_dir(query_id, batch_id)
        if final.exists():  # committed before a crash: Spark replays the batch, we keep what is there
            return False
        tmp_root = self.root / "_tmp"
        for stale in tmp_root.glob(f"{query_id}-{batch_id}-*"):  # a crash mid-write left these
            shutil.rmtree(stale, ignore_errors=True)
        tmp = tmp_root / f"{query_id}-{batch_id}-{uuid.uuid4().hex[:8]}"
        try:
            df.write.parquet(str(tmp))
            marker = {"query_id": query_id, "batch_id": batch_id, "rows": rows, "committed_at": time.time()}
            _write_synced(tmp / COMMIT_MARKER, json.dumps(marker).encode())
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, final)  # atomic; a non-empty folder already there makes it fail, not merge
            _fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return True


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def committed_batches(path: str) -> list[dict]:
    """The commit markers of the batches under a Parquet sink folder."""
    root = Path(path.removeprefix("parquet://")).expanduser()
    return [json.loads(p.read_text()) for p in sorted(root.glob(f"query_id=*/batch_id=*/{COMMIT_MARKER}"))]


# -- SQL -------------------------------------------------------------------------------------------
class SQLBatchWriter:
    """Upsert by message id plus a ``NAME_batches`` row, in one transaction."""

    def __init__(self, url: str, table: str = "moorage_results", key: str = "id") -> None:
        import sqlalchemy as sa

        for name in (table, key):
            if not name.replace("_", "").isalnum():
                raise BadRequest(f"invalid SQL name {name!r}: letters, digits and _ only", code="invalid_sink_url")
        self.engine = sa.create_engine(url, pool_pre_ping=True)
        self.name = f"sql+{redact(url)}?table={table}"
        self.table_name, self.key = table, key
        self.meta = sa.MetaData()
        self.batches = sa.Table(
            f"{table}_batches",
            self.meta,
            sa.Column("query_id", sa.String(64), primary_key=True),
            sa.Column("batch_id", sa.BigInteger, primary_key=True),
            sa.Column("rows", sa.BigInteger, nullable=False),
            sa.Column("committed_at", sa.Float, nullable=False),
        )
        self.table: sa.Table | None = None

    def _table_for(self, df: DataFrame):
        import sqlalchemy as sa

        if self.table is not None:
            return self.table
        if self.key not in df.columns:
            raise BadRequest(f"the SQL sink keys rows by {self.key!r}, which the DataFrame lacks", code="invalid_sink")
        columns = [
            sa.Column(
                f.name, sa.String(512) if f.name == self.key else _sql_type(f.dataType), primary_key=f.name == self.key
            )
            for f in df.schema.fields
            if f.name not in ("query_id", "batch_id", "writes")
        ]
        self.table = sa.Table(
            self.table_name,
            self.meta,
            *columns,
            sa.Column("query_id", sa.String(64)),
            sa.Column("batch_id", sa.BigInteger),
            sa.Column("writes", sa.Integer, nullable=False, server_default="1"),
        )
        try:
            self.meta.create_all(self.engine)
        except sa.exc.OperationalError:  # another writer created it between the check and the CREATE
            self.meta.create_all(self.engine)
        return self.table

    def write(self, df: DataFrame, query_id: str, batch_id: int, rows: int) -> bool:
        import sqlalchemy as sa

        table = self._table_for(df)
        with self.engine.begin() as conn:
            done = conn.execute(
                sa.select(self.batches.c.rows).where(
                    self.batches.c.query_id == query_id, self.batches.c.batch_id == batch_id
                )
            ).first()
            if done is not None:
                return False
            for chunk in _chunks(df.collect(), 500):  # one Spark job (toLocalIterator runs one per partition)
                values = [{**_sql_row(r), "query_id": query_id, "batch_id": batch_id} for r in chunk]
                conn.execute(self._upsert(table, values), values)
            conn.execute(self.batches.insert().values(query_id=query_id, batch_id=batch_id, rows=rows,
                                                      committed_at=time.time()))  # fmt: skip
        return True

    def _upsert(self, table, rows: list[dict]):
        from sqlalchemy.dialects import postgresql, sqlite

        dialect = self.engine.dialect.name
        if dialect not in ("postgresql", "sqlite"):
            raise BadRequest(f"the Spark SQL sink upserts on SQLite and PostgreSQL, not {dialect}", code="invalid_sink")
        stmt = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
        update: dict[str, Any] = {c: stmt.excluded[c] for c in rows[0] if c != self.key}
        update["writes"] = table.c.writes + 1
        return stmt.on_conflict_do_update(index_elements=[self.key], set_=update)


def _sql_type(data_type: Any) -> Any:
    import sqlalchemy as sa
    from pyspark.sql import types as T

    simple = [
        ((T.StringType,), sa.Text),
        ((T.LongType,), sa.BigInteger),
        ((T.IntegerType, T.ShortType, T.ByteType), sa.Integer),
        ((T.DoubleType, T.FloatType), sa.Float),
        ((T.BooleanType,), sa.Boolean),
        ((T.BinaryType,), sa.LargeBinary),
        ((T.TimestampType, T.TimestampNTZType), sa.DateTime),
        ((T.DateType,), sa.Date),
        ((T.DecimalType,), sa.Numeric),
    ]
    for kinds, sql in simple:
        if isinstance(data_type, kinds):
            return sql()
    return sa.JSON()  # arrays, structs, maps


def _sql_row(row: Any) -> dict:
    out = row.asDict(recursive=True)
    return {k: bytes(v) if isinstance(v, bytearray) else v for k, v in out.items()}


def _chunks(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -- dead letters ------------------------------------------------------------------------------
_REDIS_DEAD_LETTER = """
local n = 0
for i = 3, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], '1') == 1 then
    redis.call('XADD', KEYS[1], '*', 'body', ARGV[i + 1], 'reason', ARGV[i + 2], 'id', ARGV[i],
               'attempts', '1', 'topic', ARGV[1], 'at', ARGV[2])
    n = n + 1
  end
end
return n
"""


class DeadLetterWriter:
    """Poison rows onto the source broker's dead-letter destination, in the stream workers' format."""

    def __init__(self, url: str) -> None:
        self.url = BrokerURL(url)
        if self.url.scheme not in ("redis", "rediss", "sqlite", "kafka"):
            raise BadRequest(f"dead letters go to a redis://, sqlite:// or kafka:// URL, not {self.url}",
                             code="invalid_broker_url")  # fmt: skip

    def write(self, entries: Sequence[tuple[str, bytes, str]]) -> int:
        """Each (message id, body, reason) once; how many were new."""
        if not entries:
            return 0
        if self.url.scheme.startswith("redis"):
            return self._redis(entries)
        if self.url.scheme == "sqlite":
            return self._sqlite(entries)
        return self._kafka(entries)

    def _redis(self, entries: Sequence[tuple[str, bytes, str]]) -> int:
        import redis

        args: list[Any] = [self.url.topic, repr(time.time())]
        for message_id, body, reason in entries:
            args += [message_id, body, reason]
        with redis.Redis.from_url(self.url.server, socket_connect_timeout=5) as r:  # atomic: a crash adds all or none
            return int(r.eval(_REDIS_DEAD_LETTER, 2, self.url.dlq, f"{self.url.dlq}:dead-lettered", *args))

    def _sqlite(self, entries: Sequence[tuple[str, bytes, str]]) -> int:
        import sqlite3

        from ...streams.brokers.sqlite import SCHEMA, SQLiteBroker

        db = sqlite3.connect(SQLiteBroker(self.url).path, timeout=30, isolation_level=None)
        try:
            db.executescript(SCHEMA)
            db.execute("BEGIN IMMEDIATE")
            added = 0
            for message_id, body, reason in entries:
                added += db.execute(
                    "INSERT INTO dead_letters (topic, source_topic, message_id, body, reason, attempts, dead_at)"
                    " SELECT ?, ?, ?, ?, ?, 1, ? WHERE NOT EXISTS"
                    " (SELECT 1 FROM dead_letters WHERE topic = ? AND message_id = ?)",
                    (self.url.dlq, self.url.topic, message_id, body, reason, time.time(), self.url.dlq, message_id),
                ).rowcount
            db.execute("COMMIT")
            return added
        finally:
            db.close()

    def _kafka(self, entries: Sequence[tuple[str, bytes, str]]) -> int:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.url.netloc, "acks": "all", "enable.idempotence": True})
        at = repr(time.time())
        for message_id, body, reason in entries:
            headers: dict[str, str | bytes | None] = {"reason": reason, "id": message_id, "attempts": "1",
                                                      "topic": self.url.topic, "at": at}  # fmt: skip
            producer.produce(self.url.dlq, value=body, headers=headers)
        if producer.flush(30) > 0:
            raise TimeoutError(f"Kafka did not confirm {len(entries)} dead letters on {self.url.dlq}")
        return len(entries)


# -- putting it together -------------------------------------------------------------------------
def open_batch_writer(url: str) -> BatchWriter:
    """The exactly-once writer for a sink URL."""
    scheme, sep, rest = url.partition("://")
    if scheme == "parquet" and sep and rest:
        return ParquetBatchWriter(rest.partition("?")[0])
    if scheme.startswith("sql+"):
        db_url, _, query = url[4:].partition("?")
        options = dict(parse_qsl(query))
        table, key = options.pop("table", "moorage_results"), options.pop("key", "id")
        if options:
            db_url += "?" + "&".join(f"{k}={v}" for k, v in options.items())
        return SQLBatchWriter(db_url, table, key)
    raise BadRequest(
        f"unknown Spark sink {redact(url)!r}: use parquet:///PATH or sql+URL?table=NAME (both exactly once)",
        code="invalid_sink_url",
    )


def query_id(checkpoint_location: str) -> str:
    """The id of the streaming query that owns a checkpoint: the same across every restart from it."""
    import fsspec

    with fsspec.open(f"{checkpoint_location.rstrip('/')}/metadata", "r") as f:
        return str(json.loads(f.readline())["id"])


def foreach_batch(
    writers: Sequence[BatchWriter],
    checkpoint_location: str,
    dead_letter: str | None = None,
    on_event: EventHandler | None = None,
) -> Callable[[DataFrame, int], None]:
    """A `foreachBatch` function writing each micro-batch to every writer, keyed by (query id, batch id).

    The batch is computed once (persisted) and reused by every writer and the dead letters."""
    dead = DeadLetterWriter(dead_letter) if dead_letter else None
    emit = on_event or (lambda event, batch_id, detail: None)
    owner: list[str] = []  # the query id, read from the checkpoint on the first batch

    def run(df: DataFrame, batch_id: int) -> None:
        if not owner:
            owner.append(query_id(checkpoint_location))
        emit("batch_started", batch_id, {"query_id": owner[0]})
        df = df.persist()
        try:
            rows, errors = _counts(df)
            for writer in writers:
                wrote = writer.write(df, owner[0], batch_id, rows)
                emit("sink_committed" if wrote else "sink_skipped", batch_id, {"sink": writer.name, "rows": rows})
            if dead is not None and errors:
                emit("dead_lettered", batch_id, {"count": _dead_letter(df, dead)})
            emit("batch_done", batch_id, {"rows": rows, "errors": errors})
        finally:
            df.unpersist()

    return run


def _counts(df: DataFrame) -> tuple[int, int]:
    """Rows, and rows with an error, in one Spark job."""
    from pyspark.sql import functions as F

    if "error" not in df.columns:
        return df.count(), 0
    row = df.agg(F.count(F.lit(1)).alias("rows"), F.count("error").alias("errors")).first()
    return (int(row["rows"]), int(row["errors"])) if row is not None else (0, 0)


def _dead_letter(df: DataFrame, dead: DeadLetterWriter) -> int:
    from pyspark.sql import functions as F

    body = F.col("body") if "body" in df.columns else F.lit(b"")
    poison = df.where(F.col("error").isNotNull()).select("message_id", body.alias("body"), "error").collect()
    return dead.write([(r["message_id"], bytes(r["body"] or b""), r["error"]) for r in poison])


def write_stream(
    df: DataFrame,
    url: str | Sequence[str],
    checkpoint_location: str,
    query_name: str,
    *,
    dead_letter: str | None = None,
    trigger: dict | None = None,
    on_event: EventHandler | None = None,
) -> StreamingQuery:
    """Start the streaming query writing `df` to one sink URL or several, exactly once.

    `trigger` is `DataStreamWriter.trigger`'s keywords (``{"availableNow": True}``,
    ``{"processingTime": "5 seconds"}``); default: the next batch as soon as the last one is done."""
    urls = [url] if isinstance(url, str) else list(url)
    if not urls:
        raise BadRequest("write_stream needs at least one sink URL", code="invalid_sink_url")
    writers = [open_batch_writer(u) for u in urls]
    stream = (
        df.writeStream.queryName(query_name)
        .option("checkpointLocation", checkpoint_location)
        .foreachBatch(foreach_batch(writers, checkpoint_location, dead_letter, on_event))
    )
    if trigger:
        stream = stream.trigger(**trigger)
    return stream.start()


def write_batch(df: DataFrame, url: str | Sequence[str], job_id: str | None = None) -> int:
    """Write a (non-streaming) DataFrame to one sink URL or several; how many rows. Each run is its own
    batch (``query_id=batch-...``) unless `job_id` names it: a run repeated with the same `job_id`
    writes nothing twice."""
    urls = [url] if isinstance(url, str) else list(url)
    key = job_id or f"batch-{uuid.uuid4().hex}"
    df = df.persist()
    try:
        rows = df.count()
        for writer in (open_batch_writer(u) for u in urls):
            writer.write(df, key, 0, rows)
        return rows
    finally:
        with contextlib.suppress(Exception):
            df.unpersist()
