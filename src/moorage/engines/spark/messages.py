"""Stream messages in a Spark DataFrame: the raw ``body`` column parsed into model inputs and an error.

    parsed = parse(read_stream(spark, url), task="embed", max_text_chars=20_000)

adds ``id`` (the message's own ``id``, else the broker's ``message_id``), ``text``, ``messages``
(a chat generation's messages as JSON), ``parameters`` (as JSON) and ``error``. The rules are the
stream workers' own (`moorage.streams.worker.decode`, the same function): a body that is not JSON,
has no text or is too long gets ``error`` = the reason a stream worker dead-letters it with
(``invalid_json: ...``, ``missing_text: ...``, ``text_too_long: ...``) and null inputs; the query goes
on. `moorage.engines.spark.sinks.write_stream(..., dead_letter=URL)` also puts those rows on the
broker's dead-letter destination, where ``moorage stream dead-letters`` lists them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import orjson

from ...streams.brokers.base import Message
from ...streams.worker import Poison, WorkerConfig, decode

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

PARSED = "id string, text string, messages string, parameters string, error string"
PARSED_COLUMNS = ("id", "text", "messages", "parameters", "error")


def parse_payload(message_id: str, body: bytes | None, task: str = "embed", max_text_chars: int = 20_000) -> dict:
    """One message's columns (`PARSED`): its inputs, or its error with the stream workers' reason."""
    config = WorkerConfig(max_text_chars=max_text_chars)
    try:
        envelope = decode(Message(broker_id=message_id, body=bytes(body or b"")), task, config)
    except Poison as exc:
        return {"id": message_id, "text": None, "messages": None, "parameters": None, "error": str(exc)}
    chat = isinstance(envelope.input, dict)
    return {
        "id": envelope.id,
        "text": None if chat else envelope.input,
        "messages": orjson.dumps(envelope.input["messages"]).decode() if chat else None,
        "parameters": None if envelope.parameters is None else orjson.dumps(envelope.parameters).decode(),
        "error": None,
    }


def parse(
    df: DataFrame,
    task: str = "embed",
    max_text_chars: int = 20_000,
    body: str = "body",
    message_id: str = "message_id",
) -> DataFrame:
    """`df` with the parsed columns (`PARSED_COLUMNS`) added after its own (a column of the same name is
    replaced). Works on batch and streaming DataFrames alike."""
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    pd = importlib.import_module("pandas")  # untyped: pandas ships no type information

    def parse_batch(ids, bodies):
        rows = [parse_payload(i, b, task, max_text_chars) for i, b in zip(ids, bodies)]
        return pd.DataFrame(rows, columns=list(PARSED_COLUMNS))

    # real classes, not strings: pandas_udf reads the UDF's kind from its type hints
    parse_batch.__annotations__ = {"ids": pd.Series, "bodies": pd.Series, "return": pd.DataFrame}
    udf = pandas_udf(parse_batch, PARSED)  # type: ignore[call-overload]
    kept = [c for c in df.columns if c not in PARSED_COLUMNS]
    parsed = df.withColumn("_moorage_parsed", udf(F.col(message_id), F.col(body)))
    return parsed.select(*kept, *[F.col(f"_moorage_parsed.{c}").alias(c) for c in PARSED_COLUMNS])
