"""Where results go: files (Parquet or JSONL through fsspec), a SQL table, or a broker topic.

    parquet://PATH   jsonl://PATH    PATH is a folder or any fsspec URL (parquet://s3://bucket/out)
                                     options: ?rows=10000&seconds=5 (roll a file at whichever first)
    sql+URL?table=NAME               any SQLAlchemy URL (sql+sqlite:///results.db,
                                     sql+postgresql+psycopg://...), upsert keyed by message id
    BROKER URL                       sqlite://, redis://, amqp://, kafka:// with ?topic=NAME

The worker acknowledges a message only once the sink says its row is durable (`pending == 0` after
`write`, or after `flush`). Files are rolled and each is written atomically (a temporary name,
then a rename; object stores publish an object in one PUT), so a reader never sees half a file.
The SQL sink is idempotent: a replayed message overwrites its own row and counts the extra write.
A table an older moorage created gets the newer nullable columns added when the sink opens.
Rows of a stream whose generation follows a JSON Schema carry typed record columns
(`streams.records`): the SQL sink adds each as a nullable column of its kind the first time it sees
it (a column keeps the type it was added with), Parquet files type them the same way.
Files and topics are at-least-once: after a crash a row may appear twice; dedupe by ``id``. A
file that cannot be written (a full disk) leaves no temporary file, and its rows leave the buffer
or are written again once, never both.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl

import orjson

from ..errors import BadRequest, MissingDependency
from .brokers.base import SCHEMES, Broker, BrokerUnavailable, open_broker, redact

Row = dict[str, Any]
COMMON_COLUMNS = ("id", "model", "version", "task", "tokens", "latency_ms", "published_at", "received_at",
                  "completed_at", "attempts", "queue_ms", "ttft_ms", "input_sha256")  # fmt: skip
RECORD_ERROR = "record_error"  # why a row's record columns are null (None: the record is complete)


class TypedRow(dict):
    """A row with typed record columns: `kinds` maps each to "integer", "number", "boolean",
    "string" or "json" (its JSON text), so that a sink types the columns it has not seen yet."""

    def __init__(self, values: Row, kinds: dict[str, str]) -> None:
        super().__init__(values)
        self.kinds = kinds


def record_kinds(rows: Sequence[Row]) -> dict[str, str]:
    """The record columns of `rows` and their kinds (the first row that names a column decides)."""
    kinds: dict[str, str] = {}
    for row in rows:
        for name, kind in getattr(row, "kinds", {}).items():
            kinds.setdefault(name, kind)
    return kinds


class Sink(ABC):
    """Write result rows; `pending` says how many written rows are not durable yet."""

    pending = 0

    async def open(self) -> None:  # noqa: B027 - optional hook
        pass

    async def close(self) -> None:
        await self.flush()

    async def __aenter__(self) -> Sink:
        await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @abstractmethod
    async def write(self, rows: Sequence[Row]) -> None: ...

    async def flush(self) -> None:  # noqa: B027 - unbuffered sinks are always flushed
        pass

    def flush_due(self) -> bool:
        return False

    def discard(self) -> int:
        """Drop the rows written but not durable yet (their messages go back to the broker); how many."""
        return 0

    def is_transient(self, exc: Exception) -> bool:
        """Whether `exc` says the sink is unreachable for now (wait for it) rather than that it refuses
        these rows (hand them back, which counts as a delivery)."""
        return isinstance(exc, OSError | BrokerUnavailable)


def open_sink(url: str, name_prefix: str = "part") -> Sink:
    """The sink for a URL (not opened yet: use ``async with``)."""
    scheme, sep, rest = url.partition("://")
    if scheme in ("parquet", "jsonl") and sep and rest:
        path, _, query = rest.partition("?")
        options = dict(parse_qsl(query))
        return FileSink(path, scheme, rows=int(options.get("rows", 10_000)),
                        seconds=float(options.get("seconds", 5)), prefix=name_prefix)  # fmt: skip
    if scheme.startswith("sql+"):
        db_url, _, query = url[4:].partition("?")
        options = dict(parse_qsl(query))
        table = options.pop("table", "moorage_results")
        if options:
            db_url += "?" + "&".join(f"{k}={v}" for k, v in options.items())
        return SQLSink(db_url, table)
    if scheme in SCHEMES:
        return TopicSink(open_broker(url))
    raise BadRequest(
        f"unknown sink {redact(url)!r}: use parquet://PATH, jsonl://PATH, sql+URL?table=NAME or a broker URL",
        code="invalid_sink_url",
    )


# -- files -------------------------------------------------------------------------------------
class FileSink(Sink):
    def __init__(self, path: str, fmt: str, rows: int = 10_000, seconds: float = 5.0, prefix: str = "part") -> None:
        import fsspec

        self.fmt = fmt
        self.fs, self.root = fsspec.core.url_to_fs(path)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.max_rows = max(1, rows)
        self.max_age = seconds
        self.prefix = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self._seq = itertools.count()
        self._rows: list[Row] = []
        self._first_at = 0.0
        self.files: list[str] = []
        if fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise MissingDependency("the Parquet sink needs pyarrow: pip install 'moorage[streams]'") from None

    @property
    def pending(self) -> int:  # type: ignore[override]
        return len(self._rows)

    async def open(self) -> None:
        await asyncio.to_thread(self.fs.makedirs, self.root, exist_ok=True)

    async def write(self, rows: Sequence[Row]) -> None:
        """Buffer `rows`; roll a file once the buffer is full. If that fails, `rows` leave the buffer
        again (the rest stays): writing them again after the error adds each row once."""
        if not self._rows:
            self._first_at = time.monotonic()
        self._rows.extend(rows)
        if len(self._rows) >= self.max_rows:
            try:
                await self.flush()
            except BaseException:
                del self._rows[len(self._rows) - len(rows) :]
                raise

    def flush_due(self) -> bool:
        return bool(self._rows) and time.monotonic() - self._first_at >= self.max_age

    def discard(self) -> int:
        dropped = len(self._rows)
        self._rows.clear()
        return dropped

    def is_transient(self, exc: Exception) -> bool:
        return isinstance(exc, OSError)  # a full disk, a network file system away; not a row pyarrow refuses

    async def flush(self) -> None:
        if not self._rows:
            return
        rows = list(self._rows)
        await asyncio.to_thread(self._write_file, rows)
        del self._rows[: len(rows)]

    def _write_file(self, rows: list[Row]) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"{self.prefix}-{stamp}-{next(self._seq):06d}.{self.fmt}"
        final = f"{self.root.rstrip('/')}/{name}"
        data = _parquet_bytes(rows) if self.fmt == "parquet" else b"".join(_jsonl(r) for r in rows)
        if self.local:  # write, fsync, then rename: readers see a whole file or none
            tmp = f"{self.root.rstrip('/')}/.{name}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            except BaseException:  # e.g. the disk is full: no partial file stays behind
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
        else:  # an object store publishes an object in one PUT
            self.fs.pipe_file(final, data)
        self.files.append(final)


def _jsonl(row: Row) -> bytes:
    return orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)


def _parquet_bytes(rows: list[Row]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_(), "string": pa.string(),
             "json": pa.string()}  # fmt: skip
    kinds = record_kinds(rows)
    columns: dict[str, list] = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        values = [r.get(key) for r in rows]
        if key in ("scores", "json"):  # mappings whose keys vary from row to row: their JSON text
            values = [json.dumps(v) if v is not None else None for v in values]
        columns[key] = values
    arrays = {}
    for key, values in columns.items():
        if key == "embedding":
            arrays[key] = pa.array([None if v is None else list(map(float, v)) for v in values], pa.list_(pa.float32()))
        elif key in kinds:
            arrays[key] = pa.array(values, types[kinds[key]])
        else:
            arrays[key] = pa.array(values)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(arrays), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


# -- SQL ---------------------------------------------------------------------------------------
class SQLSink(Sink):
    """One row per message id; a replay updates the row in place and adds one to ``writes``."""

    def __init__(self, url: str, table: str) -> None:
        import sqlalchemy as sa

        if not table.replace("_", "").isalnum():
            raise BadRequest(f"invalid table name {table!r}: letters, digits and _ only", code="invalid_sink_url")
        self.url = url
        self.engine = sa.create_engine(url, pool_pre_ping=True)
        meta = sa.MetaData()
        self.table = sa.Table(
            table,
            meta,
            sa.Column("id", sa.String(512), primary_key=True),
            sa.Column("model", sa.String(200), nullable=False),
            sa.Column("version", sa.Integer, nullable=False),
            sa.Column("task", sa.String(20), nullable=False),
            sa.Column("output", sa.JSON, nullable=False),
            sa.Column("tokens", sa.Integer),
            sa.Column("latency_ms", sa.Float),
            sa.Column("published_at", sa.Float),
            sa.Column("received_at", sa.Float),
            sa.Column("completed_at", sa.Float),
            sa.Column("attempts", sa.Integer),
            sa.Column("queue_ms", sa.Float),
            sa.Column("ttft_ms", sa.Float),
            sa.Column("input_sha256", sa.String(64)),
            sa.Column("writes", sa.Integer, nullable=False, server_default="1"),
        )
        self._meta = meta

    async def open(self) -> None:
        await asyncio.to_thread(self._create)

    def _create(self) -> None:
        import sqlalchemy as sa

        try:
            self._meta.create_all(self.engine)
        except sa.exc.OperationalError:  # another worker created it between the check and the CREATE
            self._meta.create_all(self.engine)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """A table an older moorage created lacks the newer nullable columns (``create_all`` alters
        no existing table): add them. Two workers may race to add one; the loser's error is ignored
        once the column is there."""
        import sqlalchemy as sa

        existing = {c["name"] for c in sa.inspect(self.engine).get_columns(self.table.name)}
        for column in self.table.columns:
            if column.name in existing or not column.nullable:  # a NOT NULL one the old table has always had
                continue
            self._add_column(column)

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.dispose)

    def is_transient(self, exc: Exception) -> bool:
        """The database is unreachable or restarting; a constraint or a type it refuses is not that."""
        import sqlalchemy as sa

        if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
            return True
        transient = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError, sa.exc.TimeoutError)
        return isinstance(exc, (*transient, OSError))

    async def write(self, rows: Sequence[Row]) -> None:
        if rows:
            kinds = record_kinds(rows)
            await asyncio.to_thread(self._upsert, [_sql_row(r, kinds) for r in rows], kinds)

    def _add_record_columns(self, kinds: dict[str, str]) -> None:
        """Columns for record fields this table lacks: nullable, of the SQL type of their kind."""
        import sqlalchemy as sa

        new = {name: kind for name, kind in kinds.items() if name not in self.table.c}
        if not new:
            return
        types = {"integer": sa.BigInteger, "number": sa.Double, "boolean": sa.Boolean, "string": sa.Text,
                 "json": sa.Text}  # fmt: skip
        existing = {c["name"] for c in sa.inspect(self.engine).get_columns(self.table.name)}
        for name, kind in new.items():
            column: sa.Column[Any] = sa.Column(name, types[kind], nullable=True)
            if name not in existing:
                self._add_column(column)
            self.table.append_column(column)

    def _add_column(self, column: Any) -> None:
        """ALTER TABLE ADD COLUMN; a racing worker's "duplicate column" is ignored once it is there."""
        import sqlalchemy as sa

        kind = column.type.compile(dialect=self.engine.dialect)
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.text(f'ALTER TABLE "{self.table.name}" ADD COLUMN "{column.name}" {kind}'))
        except (sa.exc.OperationalError, sa.exc.ProgrammingError):
            if column.name not in {c["name"] for c in sa.inspect(self.engine).get_columns(self.table.name)}:
                raise

    def _upsert(self, rows: list[Row], kinds: dict[str, str] | None = None) -> None:
        from sqlalchemy.dialects import postgresql, sqlite

        self._add_record_columns(kinds or {})
        dialect = self.engine.dialect.name
        # the same id twice in one batch (a producer sent it twice): keep the last, like a replay would
        rows = list({r["id"]: r for r in rows}.values())
        with self.engine.begin() as conn:
            if dialect not in ("postgresql", "sqlite"):  # pragma: no cover - delete then insert, one transaction
                conn.execute(self.table.delete().where(self.table.c.id.in_([r["id"] for r in rows])))
                conn.execute(self.table.insert(), rows)
                return
            stmt = postgresql.insert(self.table) if dialect == "postgresql" else sqlite.insert(self.table)
            update: dict[str, Any] = {c: stmt.excluded[c] for c in rows[0] if c != "id"}
            update["writes"] = self.table.c.writes + 1
            conn.execute(stmt.on_conflict_do_update(index_elements=["id"], set_=update), rows)


def _sql_row(row: Row, kinds: dict[str, str]) -> Row:
    """The table's columns of `row` (every record column of the batch: one statement writes it), and
    the rest of it as the ``output`` JSON."""
    out = {k: row.get(k) for k in (*COMMON_COLUMNS, *kinds)}
    output = {k: v for k, v in row.items() if k not in COMMON_COLUMNS and k not in kinds}
    out["output"] = orjson.loads(orjson.dumps(output, option=orjson.OPT_SERIALIZE_NUMPY))
    return out


# -- a broker topic ------------------------------------------------------------------------------
class TopicSink(Sink):
    """Each row as one JSON message on the topic (durable when the broker confirms the publish)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def open(self) -> None:
        await self.broker.connect()

    async def close(self) -> None:
        await self.broker.close()

    async def write(self, rows: Sequence[Row]) -> None:
        if rows:
            await self.broker.publish([_jsonl(r).rstrip(b"\n") for r in rows])

    def is_transient(self, exc: Exception) -> bool:
        return not isinstance(exc, TypeError | ValueError)  # any client's connection errors; not a bad row
