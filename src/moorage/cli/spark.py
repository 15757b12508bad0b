"""`moorage spark run`: a registry model over a file, a table or a broker, as a Spark job.

Files and tables make a batch job (read, predict, write once); brokers a Structured Streaming query
(moorage's Python data sources, exactly-once sinks, progress from the query's progress events).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from ..errors import BadRequest, MoorageError
from .context import console, err_console, state

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from ..engines.spark.udf import PredictUDF

app = typer.Typer(help="Registry models inside Spark jobs (extra: spark).", no_args_is_help=True)

BROKER_SCHEMES = ("redis", "rediss", "sqlite", "kafka", "amqp", "amqps")
FILE_FORMATS = {"parquet": "parquet", "jsonl": "json", "json": "json", "csv": "csv"}
SINK_HELP = "parquet:///DIR or sql+URL?table=NAME (exactly once)"


@app.command()
def run(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Option(
            help="a file or folder (.parquet, .jsonl, .json, .csv; or parquet://, jsonl://, csv:// PATH), "
            "table://NAME (the session's catalog), or a broker: redis://, sqlite:///q.db?topic=T, kafka://"
        ),
    ],
    model: Annotated[str, typer.Option("--model", "-m", help="NAME, NAME@ALIAS or NAME:VERSION")],
    sink: Annotated[str, typer.Option(help=SINK_HELP)],
    master: Annotated[str, typer.Option(help="Spark master")] = "local[2]",
    column: Annotated[str, typer.Option(help="the column of input texts (files and tables)")] = "text",
    batch_size: Annotated[int, typer.Option(min=1, help="inputs per model batch")] = 32,
    max_tokens: Annotated[Optional[int], typer.Option(min=1, help="generation: new tokens per input")] = None,
    checkpoint: Annotated[
        Optional[Path],
        typer.Option(help="brokers: the query's checkpoint folder (required: a restarted query resumes from it)"),
    ] = None,
    once: Annotated[bool, typer.Option(help="brokers: process what is there now, then stop")] = False,
) -> None:
    """Run MODEL over SOURCE with Spark and write the results to SINK (Ctrl-C/SIGTERM stop a streaming query)."""
    is_stream = _scheme(source) in BROKER_SCHEMES
    _check_sink(sink)
    if is_stream and checkpoint is None:
        raise BadRequest("a broker source needs --checkpoint DIR: the query resumes from it", code="missing_checkpoint")
    st = state(ctx)
    st.registry.resolve(model)  # an unknown reference is one line before a JVM starts
    from ..engines.spark import local_session, predict_udf

    started = time.perf_counter()
    spark = local_session(master, app_name=f"moorage {model}")
    try:
        parameters = {"max_new_tokens": max_tokens} if max_tokens else None
        udf = predict_udf(
            model, batch_size=batch_size, parameters=parameters, settings=st.settings,
            config_file=str(st.config_file) if st.config_file else None, spark=spark,
        )  # fmt: skip
        console.print(f"spark {master}: {model} -> {udf.pinned.ref} ({udf.pinned.task})", highlight=False)
        if is_stream:
            assert checkpoint is not None
            _stream(spark, udf, source, sink, checkpoint, once, st.settings.stream.max_text_chars)
        else:
            rows = _batch(spark, udf, source, sink, column)
            seconds = time.perf_counter() - started
            console.print(
                f"wrote {rows} rows to {sink} in {seconds:.1f}s; {udf.pinned.ref} loaded {udf.loads} time(s) "
                f"on {len(udf.workers)} Python worker(s)",
                highlight=False,
            )
    finally:
        spark.stop()


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower() if "://" in url else ""


def _check_sink(url: str) -> None:
    if not (url.startswith("parquet://") or url.startswith("sql+")):
        raise BadRequest(f"unknown Spark sink {url.partition('?')[0]!r}: use {SINK_HELP}", code="invalid_sink_url")


def read_source(spark: SparkSession, url: str) -> DataFrame:
    """A batch DataFrame of a file, folder or table source."""
    scheme = _scheme(url)
    if scheme == "table":
        return spark.table(url.partition("://")[2])
    path = url.partition("://")[2] if scheme else url
    fmt = FILE_FORMATS.get(scheme) or FILE_FORMATS.get(Path(path).suffix.lstrip(".").lower())
    if fmt is None:
        raise BadRequest(
            f"cannot tell the format of {url!r}: name a .parquet, .jsonl, .json or .csv file, or prefix "
            "parquet://, jsonl:// or csv://",
            code="invalid_source_url",
        )
    if not Path(path).expanduser().exists():
        raise BadRequest(f"source {path} does not exist", code="invalid_source_url")
    reader = spark.read.option("header", "true") if fmt == "csv" else spark.read
    return reader.format(fmt).load(str(Path(path).expanduser()))


def predicted(df: DataFrame, udf: PredictUDF, column: str) -> DataFrame:
    """`df`'s own columns, the version that answered, and the result columns (`error` among them)."""
    from pyspark.sql import functions as F

    if column not in df.columns:
        raise BadRequest(f"the source has no column {column!r} (it has {', '.join(df.columns)}): pass --column")
    kept = [c for c in df.columns if c not in {f.name for f in udf.schema.fields}]
    out = df.withColumn("_moorage", udf(F.col(column).cast("string")))
    pin = udf.pinned
    return out.select(*kept, F.lit(pin.name).alias("model"), F.lit(pin.version).alias("version"), "_moorage.*")


def _batch(spark: SparkSession, udf: PredictUDF, source: str, sink: str, column: str) -> int:
    from pyspark.errors import PySparkException

    from ..engines.spark.sinks import write_batch

    df = predicted(read_source(spark, source), udf, column)
    try:
        return write_batch(df, sink)
    except PySparkException as exc:  # a task failed (not a bad row: a model that cannot load, a sink)
        raise MoorageError(f"the Spark job failed: {_last_line(str(exc))}", code="spark_job_failed") from None


def _last_line(text: str) -> str:
    """The last line of a Spark error: for a Python worker's error, its exception."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no details"


def _stream(
    spark: SparkSession, udf: PredictUDF, source: str, sink: str, checkpoint: Path, once: bool, max_text_chars: int
) -> None:
    from pyspark.sql import functions as F

    from ..engines.spark.messages import parse
    from ..engines.spark.sinks import write_stream
    from ..engines.spark.sources import read_stream

    messages = parse(read_stream(spark, source), task=str(udf.pinned.task), max_text_chars=max_text_chars)
    out = predicted(messages.withColumnRenamed("error", "_message_error"), udf, "text")
    out = out.withColumn("error", F.coalesce(F.col("_message_error"), F.col("error"))).drop("_message_error")
    spark.streams.addListener(_progress_listener())
    query = write_stream(
        out, sink, str(checkpoint.expanduser()), query_name=f"moorage_{udf.pinned.name}",
        dead_letter=source, trigger={"availableNow": True} if once else None,
    )  # fmt: skip
    stop = lambda *_: query.stop()  # noqa: E731 - a signal handler
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    query.awaitTermination()
    rows = sum(p.numInputRows for p in query.recentProgress)  # the same progress events, kept by the query
    console.print(f"stopped after {rows} rows; {udf.pinned.ref} loaded {udf.loads} time(s)", highlight=False)


def _progress_listener() -> Any:
    from pyspark.sql.streaming import StreamingQueryListener

    class Progress(StreamingQueryListener):
        """One line per micro-batch, from the query's own progress events."""

        def onQueryStarted(self, event: Any) -> None:  # noqa: N802 - Spark's names
            err_console.print(f"query {event.name} started (id {event.id})", highlight=False)

        def onQueryProgress(self, event: Any) -> None:  # noqa: N802
            p = event.progress
            if p.numInputRows:
                err_console.print(
                    f"batch {p.batchId}: {p.numInputRows} rows, {p.processedRowsPerSecond:.1f} rows/s",
                    highlight=False,
                )

        def onQueryIdle(self, event: Any) -> None:  # noqa: N802
            return None

        def onQueryTerminated(self, event: Any) -> None:  # noqa: N802
            if event.exception:
                err_console.print(f"[red]query failed:[/] {event.exception.splitlines()[0]}", highlight=False)

    return Progress()
