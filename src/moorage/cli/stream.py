"""`moorage stream`: run workers, load files into a source, read the dead letters."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..errors import MoorageError
from ..observability.logging import setup_logging
from .context import console, err_console, state

app = typer.Typer(help="Stream inference: broker -> model -> sink, at least once.", no_args_is_help=True)


@app.command()
def run(
    ctx: typer.Context,
    source: Annotated[
        str, typer.Option(help="broker URL to read: sqlite:///q.db?topic=in, redis://, amqp://, kafka://")
    ],
    model: Annotated[str, typer.Option("--model", "-m", help="NAME, NAME@ALIAS or NAME:VERSION")],
    sink: Annotated[str, typer.Option(help="parquet://DIR, jsonl://DIR, sql+URL?table=T or a broker URL")],
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="messages per batch (default 64)")] = None,
    max_wait_ms: Annotated[Optional[float], typer.Option(min=0, help="how long a batch waits to fill")] = None,
    workers: Annotated[int, typer.Option(min=1, help="worker processes in the same consumer group")] = 1,
    metrics_port: Annotated[
        Optional[int], typer.Option(help="serve Prometheus /metrics and /healthz on 127.0.0.1:PORT")
    ] = None,
) -> None:
    """Consume SOURCE, run MODEL in micro-batches, write results to SINK, then ack (Ctrl-C/SIGTERM stop cleanly)."""
    from ..streams.brokers import BrokerURL
    from ..streams.runner import StreamJob, run_forever
    from ..streams.sinks import open_sink

    st = state(ctx)
    opts = {"batch_size": batch_size, "max_wait_ms": max_wait_ms, "metrics_port": metrics_port}
    stream = st.settings.stream.model_copy(update={k: v for k, v in opts.items() if v is not None})
    settings = st.settings.model_copy(update={"stream": stream})
    BrokerURL(source)  # a bad URL is one line here, not a traceback in every worker
    open_sink(sink)
    info = st.registry.resolve(model)
    console.print(f"stream {model} -> {info.name}:{info.version} ({info.task}), {workers} worker(s)", highlight=False)
    _setup_logging(settings)
    job = StreamJob(source=source, sink=sink, model=model)
    if workers == 1:
        counts = run_forever(settings, job)
        console.print(f"stopped: {counts}")
        return
    _run_processes(settings, job, workers)


def _setup_logging(settings) -> None:
    root_level = "DEBUG" if settings.log_level == "DEBUG" else "WARNING"
    setup_logging(root_level, settings.observability.log_format, moorage_level=settings.log_level)
    logging.getLogger("moorage.streams").setLevel(logging.INFO)


def _worker_process(settings, job, name: str) -> None:
    """A spawned worker process: a fresh interpreter, so the same logging setup as its parent first."""
    from ..streams.runner import run_forever

    _setup_logging(settings)
    run_forever(settings, job, name)


def _run_processes(settings, job, workers: int) -> None:
    """N worker processes (each loads the model), one consumer group; SIGTERM stops them all."""
    spawn = multiprocessing.get_context("spawn")
    procs = []
    base_port = settings.stream.metrics_port
    for i in range(workers):
        mine = settings
        if base_port is not None:  # each worker its own port: PORT, PORT+1, ...
            mine = settings.model_copy(
                update={"stream": settings.stream.model_copy(update={"metrics_port": base_port + i})}
            )
        p = spawn.Process(target=_worker_process, args=(mine, job, f"w{i}"), name=f"moorage-stream-{i}")
        p.start()
        procs.append(p)

    def forward(signum, _frame) -> None:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: each worker finishes and acks what it holds

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for p in procs:
        p.join()
    failed = [p.name for p in procs if p.exitcode not in (0, -signal.SIGTERM)]
    if failed:
        raise MoorageError(f"worker(s) {', '.join(failed)} failed; see the log above")


@app.command()
def produce(
    file: Annotated[Path, typer.Argument(help="JSONL, CSV or Parquet file, one input per row")],
    to: Annotated[str, typer.Option("--to", help="broker URL to publish to")],
    id_field: Annotated[str, typer.Option(help="column holding the message id")] = "id",
    text_field: Annotated[str, typer.Option(help="column holding the text")] = "text",
) -> None:
    """Load a file into a source topic (ids default to FILE-ROW, so reloading is harmless)."""
    from ..streams.producer import count_rows, produce

    total = count_rows(file)
    bar = Progress(
        TextColumn("publishing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err_console
    )
    with bar:
        task = bar.add_task("publish", total=total)
        sent, bad = asyncio.run(
            produce(file, to, id_field=id_field, text_field=text_field, progress=lambda n: bar.advance(task, n))
        )
    console.print(f"published {sent} messages from {file}", highlight=False)
    if bad:
        err_console.print(f"[yellow]{bad} rows had no text or were not JSON objects: the worker will dead-letter them")


@app.command("dead-letters")
def dead_letters(
    source: Annotated[str, typer.Option(help="broker URL of the source (its dead-letter destination is read)")],
    limit: Annotated[int, typer.Option(min=1, help="at most this many")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """List dead-lettered messages with their reasons (the destination is left as it is)."""
    import orjson

    from ..streams.brokers import open_broker

    async def read():
        async with open_broker(source) as broker:
            return await broker.dead_letters(limit)

    entries = asyncio.run(read())
    if as_json:
        for d in entries:
            row = {"id": d.message_id, "reason": d.reason, "attempts": d.attempts, "topic": d.topic, "at": d.at,
                   "body": d.body.decode(errors="replace")}  # fmt: skip
            print(orjson.dumps(row).decode())
        return
    table = Table("id", "attempts", "reason", "body")
    for d in entries:
        table.add_row(d.message_id, str(d.attempts), d.reason, d.body[:60].decode(errors="replace"))
    console.print(table)
    console.print(f"{len(entries)} dead letter(s)")
