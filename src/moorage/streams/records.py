"""Typed record columns: a stream whose generation follows a JSON Schema extracts one record per
message, and its top-level properties become columns of the sink, typed from the schema.

A message's parameters name the schema (``response_format: {"type": "json_schema", "json_schema":
{"name", "schema", "strict"}}`` or ``guided_json``); the engine enforces it while decoding. Each
top-level property of the schema is a column, next to the usual ones, of the kind its ``type``
says: integer -> BIGINT (Parquet int64), number -> DOUBLE PRECISION (float64), boolean -> BOOLEAN,
string -> TEXT, anything else (object, array, several types) -> its JSON text. Every sink writes the
same columns with the same values (JSONL and topics as JSON values of those kinds).

A property whose name is one of the row's usual columns (``id``, ``text``, ``tokens``, ...) becomes
``record_NAME``; a name that is not a plain identifier (letters, digits, ``_``; at most 55
characters) stays only in the output's text.

An output that is not a complete record keeps its row, with null record columns and the reason in
``record_error`` (null for a good record): ``length`` (max_new_tokens cut it), ``content_filter``
(the output filter withheld it), ``invalid_json: ...`` or ``schema: ...`` (a value of the wrong
kind). The message is not dead-lettered: the model answered and its tokens were spent, a delivery
again would give the same deterministic answer, and the text stays in the row to look at.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

from ..batching import Result
from ..runtime.base import GenerateInput
from .sinks import COMMON_COLUMNS, RECORD_ERROR, Row, TypedRow

KINDS = ("integer", "number", "boolean", "string", "json")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,54}")
RESERVED = frozenset(COMMON_COLUMNS) | {
    "output", "writes", "text", "finish_reason", "prompt_tokens", "completion_tokens", "json", "logprobs",
    "filtered", "cached", "tool_calls", "error", RECORD_ERROR,
}  # fmt: skip


@dataclass(frozen=True)
class RecordColumns:
    """The columns of a schema's records: column name -> (property name, kind)."""

    columns: dict[str, tuple[str, str]]

    @property
    def kinds(self) -> dict[str, str]:
        return {name: kind for name, (_, kind) in self.columns.items()}


@lru_cache(maxsize=256)
def columns_of(schema_text: str) -> RecordColumns | None:
    """The record columns of a JSON Schema (its text, as a constraint holds it); None when it
    describes no object with properties."""
    try:
        schema = json.loads(schema_text)
    except ValueError:
        return None
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict) or not properties:
        return None
    columns: dict[str, tuple[str, str]] = {}
    for prop, spec in properties.items():
        if not isinstance(prop, str) or not _IDENTIFIER.fullmatch(prop):
            continue
        name = f"record_{prop}" if prop in RESERVED else prop
        columns[name] = (prop, _kind(spec if isinstance(spec, dict) else {}))
    return RecordColumns(columns) if columns else None


def _kind(spec: dict[str, Any]) -> str:
    kind = spec.get("type")
    if isinstance(kind, list):
        given = [k for k in kind if k != "null"]
        kind = given[0] if len(given) == 1 else None
    if kind is None:  # an enum or a const without a type: the kind its values share
        values = spec.get("enum", [spec["const"]] if "const" in spec else [])
        kinds = {_value_kind(v) for v in values}
        kind = kinds.pop() if len(kinds) == 1 else None
    return kind if kind in KINDS[:4] else "json"


def _value_kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string" if isinstance(value, str) else None


def with_record(row: Row, item: Any, result: Result) -> Row:
    """`row` with the record columns of `item`'s JSON Schema (if it has one) filled from `result`."""
    constraint = item.params.constraint if isinstance(item, GenerateInput) else None
    if constraint is None or constraint.kind != "json_schema":
        return row
    columns = columns_of(constraint.spec)
    if columns is None:
        return row
    values, error = record_values(columns, result)
    return TypedRow({**row, **values, RECORD_ERROR: error}, {**columns.kinds, RECORD_ERROR: "string"})


def record_values(columns: RecordColumns, result: Result) -> tuple[dict[str, Any], str | None]:
    """(column -> value, None) of a complete record, or (column -> None, the reason) of any other output."""
    empty = dict.fromkeys(columns.columns)
    if result.filtered:
        return empty, "content_filter"
    try:
        record = orjson.loads(result.output)
    except orjson.JSONDecodeError as exc:
        if result.finish_reason == "length":
            return empty, "length"
        return empty, f"invalid_json: {exc}"
    if not isinstance(record, dict):
        return empty, f"schema: the output is a JSON {type(record).__name__}, not an object"
    values = {}
    for name, (prop, kind) in columns.columns.items():
        value = record.get(prop)
        converted = _converted(value, kind)
        if value is not None and converted is None:
            return empty, f"schema: property {prop!r} is {type(value).__name__}, the schema says {kind}"
        values[name] = converted
    return values, None


def _converted(value: Any, kind: str) -> Any:
    """`value` as a column of `kind`, or None when it is not one."""
    if value is None:
        return None
    if kind == "json":
        return orjson.dumps(value).decode()
    if kind == "boolean":
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):  # JSON's true is no number
        return None
    if kind == "integer":
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value if isinstance(value, int) else None
    if kind == "number":
        return float(value) if isinstance(value, int | float) else None
    return value if isinstance(value, str) else None
