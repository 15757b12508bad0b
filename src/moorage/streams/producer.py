"""The collection layer: load JSONL, CSV or Parquet rows into a broker topic, in chunks.

Each row becomes one JSON message ``{"id": ..., "text": ..., <other fields>}``. A row without an id
gets ``<file stem>-<row number>``, so loading the same file twice produces the same ids and the
idempotent sink keeps one row per input. A JSONL line that is not a JSON object is published as it
is: the worker dead-letters it with its reason, so bad input is never silently dropped.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from ..errors import BadRequest
from .brokers import open_broker

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


def file_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise BadRequest(f"{path}: unknown file type {path.suffix!r}; use .jsonl, .csv or .parquet", code="bad_file")
    if not path.is_file():
        raise BadRequest(f"{path}: no such file", code="bad_file")
    return fmt


def count_rows(path: Path) -> int:
    fmt = file_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as f:
        lines = sum(1 for line in f if line.strip())
    return lines - 1 if fmt == "csv" and lines else lines


def messages(path: Path, id_field: str = "id", text_field: str = "text") -> Iterator[tuple[bytes, bool]]:
    """(message body, whether the row was well-formed) for every row of the file."""
    fmt = file_format(path)
    for n, row in enumerate(_rows(path, fmt), start=1):
        if not isinstance(row, dict):
            yield row, False
            continue
        msg: dict[str, Any] = {k: v for k, v in row.items() if k not in (id_field, text_field)}
        msg["id"] = str(row[id_field]) if row.get(id_field) not in (None, "") else f"{path.stem}-{n}"
        msg["text"] = row.get(text_field)
        yield orjson.dumps(msg, option=orjson.OPT_SERIALIZE_NUMPY), isinstance(msg["text"], str) and bool(msg["text"])


def _rows(path: Path, fmt: str) -> Iterator[Any]:
    if fmt == "jsonl":
        with open(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:
                    row = None
                yield row if isinstance(row, dict) else line.rstrip(b"\r\n")
    elif fmt == "csv":
        with open(path, newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f)
    else:
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=2048):
            yield from batch.to_pylist()


async def produce(
    path: Path,
    url: str,
    *,
    id_field: str = "id",
    text_field: str = "text",
    chunk: int = 500,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Publish every row of `path` to `url`; returns (messages published, malformed rows among them)."""
    sent = bad = 0
    buffer: list[bytes] = []
    async with open_broker(url) as broker:

        async def flush() -> None:
            nonlocal sent, buffer
            if buffer:
                await broker.publish(buffer)
                sent += len(buffer)
                if progress:
                    progress(len(buffer))
                buffer = []

        for body, ok in messages(path, id_field, text_field):
            buffer.append(body)
            bad += not ok
            if len(buffer) >= chunk:
                await flush()
        await flush()
    return sent, bad
