"""`moorage jobs ...`: the queue of training, evaluation and batch jobs, and the worker that runs them.

The HTTP server does not run these jobs unless ``training.run_in_server`` is on: a training job
would take the cores that serving needs. Run ``moorage jobs worker`` next to the servers instead,
one or more per host (``training.max_concurrent`` jobs run at once per host, whichever process).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import MoorageError
from ..jobs import JobNotFound
from ..jobs.queue import WORK_KINDS, WorkQueue
from .context import AppState, console, err_console, state

app = typer.Typer(
    help="Queued training, evaluation and batch jobs: run, list, show, cancel, logs.", no_args_is_help=True
)


def work_queue(st: AppState) -> WorkQueue:
    return WorkQueue(st.registry.catalog.engine, lease_s=st.settings.jobs.lease_s)


@app.command()
def worker(
    ctx: typer.Context,
    kinds: Annotated[
        Optional[list[str]], typer.Option("--kind", "-k", help="job kinds to run (repeat; default: all)")
    ] = None,
    poll: Annotated[float, typer.Option(help="seconds between looks at an empty queue", min=0.05)] = 1.0,
    metrics_port: Annotated[
        Optional[int], typer.Option(help="serve Prometheus metrics on 127.0.0.1:PORT/metrics")
    ] = None,
) -> None:
    """Run queued jobs until SIGTERM or Ctrl-C (a running job stops at its next step and goes back to
    the queue, to resume from its checkpoint)."""
    from ..observability.logging import quiet_libraries, setup_logging
    from ..training.worker import Worker

    st = state(ctx)
    root_level = "DEBUG" if st.settings.log_level == "DEBUG" else "WARNING"
    setup_logging(root_level, st.settings.observability.log_format, moorage_level=st.settings.log_level)
    quiet_libraries(every_tqdm_bar=True)
    unknown = sorted(set(kinds or ()) - set(WORK_KINDS))
    if unknown:
        raise MoorageError(f"unknown job kind {unknown[0]!r}; one of {', '.join(WORK_KINDS)}", code="unknown_job_kind")
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr="127.0.0.1")
    runner = Worker(st.settings, work_queue(st), kinds=kinds or WORK_KINDS)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    err_console.print(
        f"worker {runner.runner_id}: {', '.join(runner.kinds)} jobs, "
        f"{st.settings.training.max_concurrent} at once on this host",
        highlight=False,
    )
    runner.run(stop)


@app.command("list")
def list_(
    ctx: typer.Context,
    kind: Annotated[Optional[str], typer.Option(help=" | ".join(WORK_KINDS))] = None,
    status: Annotated[Optional[str], typer.Option(help="queued | running | succeeded | failed | cancelled")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The newest jobs, with their status and progress."""
    from ..training.jobs import describe

    jobs = work_queue(state(ctx)).jobs([kind] if kind else WORK_KINDS, [status] if status else None, limit)
    if as_json:
        print(json.dumps([describe(job) for job in jobs], indent=2))
        return
    table = Table("id", "kind", "model", "priority", "status", "progress", "created")
    table.columns[0].no_wrap = True
    for job in jobs:
        table.add_row(
            job.id,
            job.kind,
            job.model,
            str(job.priority),
            job.status.value + (" (cancel requested)" if job.cancel_requested and not job.is_finished else ""),
            _progress_text(job.progress),
            f"{job.created_at:%Y-%m-%d %H:%M:%S}",
        )
    console.print(table)


@app.command()
def show(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="the job's id")]) -> None:
    """A job as JSON: spec, status, progress, result or error."""
    from ..training.jobs import describe

    print(json.dumps(describe(_get(state(ctx), job_id)), indent=2))


@app.command()
def cancel(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="the job's id")]) -> None:
    """Cancel a job: a queued one at once, a running one at its next step (its checkpoints are kept)."""
    st = state(ctx)
    _get(st, job_id)  # a job of this queue (an inference job's message is the server's)
    job = work_queue(st).cancel(job_id)
    st.audit("cancel_job", model=job.model, job=job.id, kind=job.kind)
    if job.status.value == "cancelled":
        console.print(f"{job.id}: cancelled", highlight=False)
    elif job.is_finished:
        console.print(f"{job.id}: already {job.status.value}", highlight=False)
    else:
        console.print(f"{job.id}: cancel requested; it stops at its next step", highlight=False)


@app.command()
def logs(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="the job's id")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until the job ends")] = False,
) -> None:
    """A job's log lines."""
    st = state(ctx)
    queue = work_queue(st)
    job = _get(st, job_id)
    seen = 0
    while True:
        for seq, line in queue.logs(job_id, after=seen):
            console.print(f"{seq:>5}  {escape(line)}", highlight=False)
            seen = seq
        if not follow or job.is_finished:
            return
        time.sleep(1.0)
        job = _get(st, job_id)


def _get(st: AppState, job_id: str):
    job = work_queue(st).get(job_id) if len(job_id) <= 64 else None
    if job is None or job.kind not in WORK_KINDS:
        raise JobNotFound(f"no job {job_id!r}")
    return job


def _progress_text(progress: dict[str, Any] | None) -> str:
    if not progress:
        return "-"
    text = f"{progress.get('phase', '')} {progress.get('step', 0)}/{progress.get('total_steps', 0)}"
    if progress.get("loss") is not None:
        text += f" loss {progress['loss']:.4g}"
    return text
