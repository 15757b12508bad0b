"""`moorage train classify|generate` and `moorage evaluate`: a training or evaluation job.

Each command queues a job (`moorage.jobs.queue`) and by default runs it here, in the foreground,
with a progress bar (step, ETA, loss, the last validation metric); ``--queue`` leaves it to a
``moorage jobs worker``. Ctrl-C cancels the job at its next step: nothing is registered and its
checkpoints are kept in its work dir. A foreground job is the queue's like any other: it shows in
``moorage jobs list`` and over HTTP, and if this process dies, a worker resumes it from its last
checkpoint once its lease expires.
"""

from __future__ import annotations

import threading
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import MoorageError
from ..jobs import Job, JobStatus
from .context import AppState, console, err_console, state
from .jobs import work_queue

app = typer.Typer(help="Fine-tune a registered model on a registered dataset.", no_args_is_help=True)

BaseOption = Annotated[str, typer.Option("--base", help="registry ref of the base model, e.g. minilm@production")]
DatasetOption = Annotated[str, typer.Option("--dataset", help="dataset ref: NAME (latest) or NAME:VERSION")]
NameOption = Annotated[str, typer.Option("--name", help="model name the result is registered under")]
EpochsOption = Annotated[Optional[float], typer.Option(help="epochs (default 3)")]
LearningRateOption = Annotated[Optional[float], typer.Option(help="peak learning rate (default 5e-5)")]
BatchSizeOption = Annotated[Optional[int], typer.Option(help="examples per step (default 16)")]
MaxLengthOption = Annotated[Optional[int], typer.Option(help="tokens per example (default 256)")]
EvalStepsOption = Annotated[Optional[int], typer.Option(help="evaluate every N steps (default: each epoch)")]
SeedOption = Annotated[Optional[int], typer.Option(help="seed of the new weights and the data order (default 0)")]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="any other hyper-parameter, KEY=VALUE (repeat), e.g. --set warmup_ratio=0.1"),
]
PriorityOption = Annotated[int, typer.Option(help="queue priority: higher runs first")]
QueueOption = Annotated[bool, typer.Option("--queue", help="queue it for a worker instead of running it here")]


@app.command()
def classify(
    ctx: typer.Context,
    base: BaseOption,
    dataset: DatasetOption,
    name: NameOption,
    epochs: EpochsOption = None,
    learning_rate: LearningRateOption = None,
    batch_size: BatchSizeOption = None,
    max_length: MaxLengthOption = None,
    eval_steps: EvalStepsOption = None,
    seed: SeedOption = None,
    set_: SetOption = None,
    priority: PriorityOption = 0,
    queue: QueueOption = False,
) -> None:
    """Fine-tune an encoder (MiniLM, any BERT-like model) with a classification head, in full."""
    given = {"epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size}
    given |= {"max_length": max_length, "eval_steps": eval_steps, "seed": seed}
    spec = _spec("classify", base, dataset, name, given, set_)
    _submit_and_follow(state(ctx), "training", spec, priority, queue)


@app.command()
def generate(
    ctx: typer.Context,
    base: BaseOption,
    dataset: DatasetOption,
    name: NameOption,
    method: Annotated[str, typer.Option(help="full | lora")] = "full",
    epochs: EpochsOption = None,
    learning_rate: LearningRateOption = None,
    batch_size: BatchSizeOption = None,
    max_length: MaxLengthOption = None,
    eval_steps: EvalStepsOption = None,
    seed: SeedOption = None,
    set_: SetOption = None,
    priority: PriorityOption = 0,
    queue: QueueOption = False,
) -> None:
    """Fine-tune a causal language model on chat or plain-text data, in full or with LoRA."""
    given = {"method": method, "epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size}
    given |= {"max_length": max_length, "eval_steps": eval_steps, "seed": seed}
    spec = _spec("generate", base, dataset, name, given, set_)
    _submit_and_follow(state(ctx), "training", spec, priority, queue)


def evaluate(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="NAME, NAME@ALIAS or NAME:VERSION")],
    dataset: DatasetOption,
    split: Annotated[str, typer.Option(help="the split to evaluate on")] = "test",
    priority: PriorityOption = 0,
    queue: QueueOption = False,
) -> None:
    """The metrics of a registered version on a dataset split, through the runtime that serves it."""
    _submit_and_follow(state(ctx), "evaluation", {"model": ref, "dataset": dataset, "split": split}, priority, queue)


def _spec(
    task: str, base: str, dataset: str, name: str, given: dict[str, Any], settings: list[str] | None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"task": task, "base": base, "dataset": dataset, "name": name}
    spec |= {key: value for key, value in given.items() if value is not None}
    for item in settings or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MoorageError(f"--set {item!r}: give KEY=VALUE, e.g. --set warmup_ratio=0.1", code="invalid_option")
        spec[key.strip().replace("-", "_")] = _value(value.strip())
    return spec


def _value(text: str) -> Any:
    """A --set value: JSON when it parses (numbers, lists, null), else the text itself."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def _submit_and_follow(st: AppState, kind: str, spec: dict[str, Any], priority: int, queue_only: bool) -> None:
    from ..training.jobs import check_refs, validate_spec
    from ..training.worker import Worker

    request = validate_spec(kind, spec)  # a bad hyper-parameter: one line naming it, nothing queued
    check_refs(st.registry, kind, request)  # an unknown model or dataset: the same
    queue = work_queue(st)
    owner = f"cli:{st.settings.user}"
    if queue_only:
        job = queue.submit(kind, request, priority=priority, owner=owner)
        console.print(f"queued {job.id} (priority {priority}); follow it with: moorage jobs logs -f {job.id}")
        return
    bar = _Bar()
    worker = Worker(st.settings, queue, on_progress=bar.update)
    job = queue.submit(kind, request, priority=priority, owner=owner, held_by=worker.runner_id)
    err_console.print(f"job {job.id}; Ctrl-C cancels it (its checkpoints are kept)", highlight=False)
    ended = _run_here(worker, job, bar)
    _report(ended)


def _run_here(worker, job: Job, bar: _Bar) -> Job:
    """Run the job in a thread of this process; Ctrl-C cancels it and waits for it to stop."""
    from ..observability.logging import quiet_libraries

    quiet_libraries(every_tqdm_bar=True)  # the trainer's own bars; this command draws one
    outcome: list[Job] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(worker.run_foreground(job.id, on_wait=waiting))
        except BaseException as exc:  # handed to the main thread, which reports it
            failure.append(exc)

    def waiting() -> None:
        limit = worker.settings.training.max_concurrent
        err_console.print(f"waiting for a free slot: {limit} job(s) at once on this host (training.max_concurrent)")

    thread = threading.Thread(target=target, name="moorage-train", daemon=True)
    worker.start()
    try:
        with bar:
            thread.start()
            _join(thread, worker, job)
    finally:
        worker.close()
    if failure:
        raise failure[0]
    return outcome[0]


def _join(thread: threading.Thread, worker, job: Job) -> None:
    cancelled = False
    while thread.is_alive():
        try:
            thread.join(0.2)
        except KeyboardInterrupt:
            if cancelled:  # a second Ctrl-C: stop waiting; the lease expires and a worker resumes it
                worker.stopping.set()
                raise
            cancelled = True
            err_console.print("cancelling at the next step ...")
            worker.cancel(job.id)


def _report(job: Job) -> None:
    if job.status == JobStatus.SUCCEEDED:
        result = job.result or {}
        if "ref" in result:
            console.print(f"registered [bold]{result['ref']}[/] as {result['model']}@{result['alias']}")
        metrics = result.get("test_metrics") or result.get("metrics") or {}
        for key, value in metrics.items():
            if isinstance(value, int | float):
                console.print(f"  {key}: {value:.4f}", highlight=False)
        return
    if job.status == JobStatus.CANCELLED:
        err_console.print(f"{job.id} cancelled: nothing registered; its checkpoints are kept")
        raise typer.Exit(130)
    if job.status == JobStatus.FAILED and job.error is not None:
        raise MoorageError(job.error.message, code=job.error.code)
    raise MoorageError(f"{job.id} is {job.status.value}; see moorage jobs show {job.id}", code="job_not_finished")


class _Bar:
    """A rich progress bar fed by the job's progress reports (from the job's thread)."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[detail]}"),
            console=err_console,
        )
        self.task = self.progress.add_task("starting", total=None, detail="")

    def __enter__(self) -> _Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, job: Job, report: dict[str, Any]) -> None:
        detail = []
        if report.get("eta_s") is not None:
            detail.append(f"ETA {_duration(report['eta_s'])}")
        if report.get("loss") is not None:
            detail.append(f"loss {report['loss']:.4f}")
        detail += [f"{k} {v:.4f}" for k, v in (report.get("metrics") or {}).items() if isinstance(v, int | float)][:2]
        total = report.get("total_steps") or None
        self.progress.update(
            self.task,
            description=str(report.get("phase", "")),
            completed=report.get("step", 0),
            total=total,
            detail="  ".join(detail),
        )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
