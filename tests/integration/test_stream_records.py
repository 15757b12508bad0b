"""Typed record columns: a stream whose generation follows a JSON Schema writes each record's
top-level properties as columns typed from the schema, in real PostgreSQL and SQLite tables and in
Parquet and JSONL files; an output that is no complete record keeps its row with null record columns
and the reason."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from moorage.batching import ModelPool, PoolConfig, Result
from moorage.runtime import Runtime
from moorage.runtime.base import Constraint, GenerateInput, GenerationParams
from moorage.streams import open_broker, open_sink
from moorage.streams.brokers import Message
from moorage.streams.records import columns_of
from moorage.streams.worker import MessageCodec, Request, Work, WorkerConfig

pytestmark = pytest.mark.anyio

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "mood": {"enum": ["calm", "busy"]},
        "text": {"type": ["string", "null"]},  # the row's own "text" column: record_text
        "not an identifier": {"type": "string"},
    },
    "required": ["name", "age"],
}
OTHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "floors": {"type": "integer"}}}
GOOD = '{"name": "Ada", "age": 36, "score": 1, "member": true, "tags": ["a", "b"], "mood": "calm", "text": "hi"}'
OUTPUTS = {
    "good": Result(GOOD, 10, 30, "stop"),
    "cut": Result('{"name": "Bo", "age": ', 10, 8, "length"),
    "wrong": Result('{"name": "Cy", "age": "old"}', 10, 12, "stop"),
    "withheld": Result("", 10, 12, "content_filter", filtered=True),
}
RECORD_COLUMNS = ["name", "age", "score", "member", "tags", "mood", "record_text"]


def test_a_schemas_top_level_properties_are_columns_of_the_kind_of_their_type():
    columns = columns_of(json.dumps(SCHEMA))
    assert columns is not None
    assert columns.kinds == {
        "name": "string",
        "age": "integer",
        "score": "number",
        "member": "boolean",
        "tags": "json",
        "mood": "string",
        "record_text": "string",
    }
    assert columns_of(json.dumps({"type": "array", "items": {"type": "integer"}})) is None


@pytest.fixture
async def served(registry, settings, fake_model):
    registry.register(fake_model("generate"), "gen", "generate")
    pool = ModelPool(registry, Runtime(registry, settings.runtime), ["gen"], PoolConfig(poll_interval_s=0))
    await pool.start()
    yield pool.lookup("gen")
    await pool.stop()


def _rows(sv, outputs: dict[str, Result], schema: dict) -> list[dict]:
    """The rows a stream worker writes for these outputs of messages whose parameters carry `schema`."""
    codec = MessageCodec(None, "gen", WorkerConfig(), None)  # type: ignore[arg-type]  # row() needs no service
    params = GenerationParams(max_new_tokens=64, constraint=Constraint("json_schema", json.dumps(schema)))
    rows = []
    for key, result in outputs.items():
        item = GenerateInput(prompt=f"about {key}", params=params)
        work = Work(key, "gen", [f"about {key}"])
        req = Request(Message(key, b"{}"), work, time.time(), sv=sv, items=[item])
        rows.append(codec.row(req, [result]))
    return rows


def _check_values(got: dict[str, dict]) -> None:
    """Record columns read back from any sink, by message id."""
    good = got["good"]
    assert (good["name"], good["age"], good["score"], good["member"]) == ("Ada", 36, 1.0, True)
    assert isinstance(good["score"], float) and isinstance(good["age"], int)
    assert json.loads(good["tags"]) == ["a", "b"] and good["mood"] == "calm" and good["record_text"] == "hi"
    assert good["record_error"] is None
    for key in ("cut", "wrong", "withheld"):
        assert all(got[key][c] is None for c in RECORD_COLUMNS), key
    assert got["cut"]["record_error"] == "length"
    assert got["wrong"]["record_error"].startswith("schema: property 'age' is str, the schema says integer")
    assert got["withheld"]["record_error"] == "content_filter"


def _read_table(url: str, table: str) -> tuple[dict[str, str], dict[str, dict]]:
    """(column -> SQL type, id -> row) of a table, as the database itself describes it."""
    engine = sa.create_engine(url)
    try:
        types = {c["name"]: str(c["type"]) for c in sa.inspect(engine).get_columns(table)}
        with engine.connect() as conn:
            rows = {r["id"]: dict(r) for r in conn.execute(sa.text(f"SELECT * FROM {table}")).mappings()}
        for row in rows.values():
            if isinstance(row["output"], str):  # SQLite's JSON is text to a plain SELECT
                row["output"] = json.loads(row["output"])
    finally:
        engine.dispose()
    return types, rows


async def _write(url: str, rows: list[dict]) -> None:
    async with open_sink(url) as sink:
        await sink.write(rows)
        await sink.flush()


async def test_record_columns_in_postgresql_are_typed_from_the_schema(served, pg_url):
    url = pg_url.replace("postgresql://", "postgresql+psycopg://")
    await _write(f"sql+{url}?table=records", _rows(served, OUTPUTS, SCHEMA))
    types, rows = _read_table(url, "records")
    assert {c: types[c] for c in [*RECORD_COLUMNS, "record_error"]} == {
        "name": "TEXT",
        "age": "BIGINT",
        "score": "DOUBLE PRECISION",
        "member": "BOOLEAN",
        "tags": "TEXT",
        "mood": "TEXT",
        "record_text": "TEXT",
        "record_error": "TEXT",
    }
    _check_values(rows)
    good = rows["good"]
    assert good["output"]["text"] == GOOD and "name" not in good["output"]  # the columns are not copied into output
    assert good["tokens"] == 40 and good["version"] == 1


async def test_record_columns_in_sqlite_and_a_second_schema_adds_its_own(served, tmp_path):
    url = f"sqlite:///{tmp_path / 'results.db'}"
    await _write(f"sql+{url}?table=records", _rows(served, OUTPUTS, SCHEMA))
    other = _rows(served, {"tower": Result('{"city": "Oslo", "floors": 12}', 5, 9, "stop")}, OTHER_SCHEMA)
    plain = _rows(served, {"plain": Result("no schema here", 5, 3, "stop")}, {"type": "string"})
    await _write(f"sql+{url}?table=records", other + plain)  # a later sink: the table has the first columns
    await _write(f"sql+{url}?table=records", _rows(served, {"good": OUTPUTS["good"]}, SCHEMA))  # a replay
    types, rows = _read_table(url, "records")
    assert (types["age"], types["score"], types["member"], types["floors"], types["city"]) == (
        "BIGINT",
        "DOUBLE",
        "BOOLEAN",
        "BIGINT",
        "TEXT",
    )
    rows["good"]["member"] = bool(rows["good"]["member"])  # SQLite keeps a boolean as 0 or 1
    _check_values(rows)
    assert (rows["tower"]["city"], rows["tower"]["floors"], rows["tower"]["name"]) == ("Oslo", 12, None)
    assert rows["plain"]["city"] is None and rows["plain"]["record_error"] is None
    assert rows["good"]["writes"] == 2


async def test_parquet_and_jsonl_files_hold_the_same_typed_columns(served, tmp_path: Path):
    rows = _rows(served, OUTPUTS, SCHEMA)
    await _write(f"parquet://{tmp_path / 'pq'}", rows)
    await _write(f"jsonl://{tmp_path / 'jsonl'}", rows)
    (parquet,) = (tmp_path / "pq").glob("*.parquet")
    table = pq.read_table(parquet)
    assert {c: str(table.schema.field(c).type) for c in ("name", "age", "score", "member", "tags")} == {
        "name": "string",
        "age": "int64",
        "score": "double",
        "member": "bool",
        "tags": "string",
    }
    _check_values({r["id"]: r for r in table.to_pylist()})
    (jsonl,) = (tmp_path / "jsonl").glob("*.jsonl")
    _check_values({r["id"]: r for r in map(orjson.loads, jsonl.read_bytes().splitlines())})


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}


def _message(msg_id: str, text: str, max_new_tokens: int) -> bytes:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    parameters = {"response_format": fmt, "max_new_tokens": max_new_tokens}
    return json.dumps({"id": msg_id, "text": text, "parameters": parameters}).encode()


async def test_a_stream_worker_writes_the_records_a_schema_constrained_model_generates(settings, registry, tmp_path):
    """End to end: stream messages whose parameters carry a JSON Schema, a real transformers model whose
    random weights write valid records only because the grammar makes them, a SQLite table with typed
    columns; a repeated greedy message is answered by the response cache, a cut one keeps its row."""
    pytest.importorskip("xgrammar")
    from moorage.config import CacheSettings
    from moorage.streams.runner import StreamJob, run_stream

    from tests.support import eventually, tiny_llama

    registry.register(tiny_llama(tmp_path / "lm", tokenizer="smollm2"), "lm", "generate")
    settings = settings.model_copy(
        update={
            "cache": CacheSettings(enabled=True),
            "runtime": settings.runtime.model_copy(update={"num_threads": 1, "dtype": "float32"}),
            "stream": settings.stream.model_copy(update={"max_wait_ms": 5, "receive_timeout_s": 0.1}),
        }
    )
    source, db = f"sqlite:///{tmp_path}/queue.db?topic=people", tmp_path / "out.db"
    stop = asyncio.Event()
    job = StreamJob(source, f"sql+sqlite:///{db}?table=people", "lm")
    async with open_broker(source) as broker:
        await broker.publish([_message("a", "describe a person", 80), _message("cut", "describe another", 3)])
        worker = asyncio.create_task(run_stream(settings, job, stop, registry=registry))
        try:
            await eventually(lambda: len(_sqlite_rows(db)) == 2, 120, "the first two rows")
            await broker.publish([_message("again", "describe a person", 80)])  # the same request as "a"
            await eventually(lambda: len(_sqlite_rows(db)) == 3, 60, "the repeated message's row")
        finally:
            stop.set()
            await worker
    types, rows = _read_table(f"sqlite:///{db}", "people")
    assert (types["name"], types["age"], types["pet"], types["tags"]) == ("TEXT", "BIGINT", "BOOLEAN", "TEXT")
    a, again, cut = rows["a"], rows["again"], rows["cut"]
    record = json.loads(a["output"]["text"])
    assert set(record) == {"name", "age", "pet", "tags"} and a["record_error"] is None
    assert (a["name"], a["age"], bool(a["pet"]), json.loads(a["tags"])) == (
        record["name"], record["age"], record["pet"], record["tags"]
    )  # fmt: skip
    assert a["output"]["json"] == record and a["output"]["finish_reason"] == "stop"
    assert again["output"].get("cached") is True and "cached" not in a["output"]
    assert {k: again[k] for k in ("name", "age", "pet", "tags", "tokens")} == {
        k: a[k] for k in ("name", "age", "pet", "tags", "tokens")
    }
    assert cut["record_error"] == "length" and cut["name"] is None and cut["output"]["finish_reason"] == "length"


def _sqlite_rows(db: Path) -> list[tuple]:
    import sqlite3

    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute("SELECT id FROM people").fetchall()
        except sqlite3.OperationalError:  # not created yet
            return []
