"""What each kind of queued job does once a worker has claimed it (`moorage.training.worker`).

- ``training``: the job's request is a `TrainSpec`; `run_training` trains in the job's work dir,
  ``training.work_dir/<job id>`` (default ``HOME/training/<job id>``), so a job that a dead worker
  left behind resumes from its last checkpoint wherever it is claimed again (on a host that sees the
  same folder), and publishes the best checkpoint as the model's ``challenger``.
- ``evaluation``: an `EvaluationSpec`; the metrics of a registered version on a dataset split,
  through the runtime (`evaluate_version`).
- ``batch``: a `BatchSpec`; a registered model over a dataset split through the `InferenceService`
  that every edge uses, one output row per input row, written to ``HOME/jobs/<job id>/`` as JSONL or
  Parquet (the file is written under a temporary name and renamed: never half a file).
- ``compress``: a `CompressSpec`; a derived version of a registered model, registered when its
  quality gates pass (`moorage.training.compress.jobs`).

`validate_spec` checks a job's request before it is queued (HTTP and CLI both call it), so a bad
field is a 422 naming it, not a job that fails later.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import Settings
from ..errors import Unprocessable
from ..jobs.queue import WORK_KINDS, UnknownJobKind
from ..jobs.store import Job
from ..registry import Registry
from .batch import BatchSpec
from .compress.jobs import CompressSpec, run_compress_job
from .trainer import Progress, TrainSpec


class EvaluationSpec(BaseModel):
    """An evaluation job: the test metrics of a registered version on a dataset split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=200, description="registry ref: NAME, NAME@ALIAS, NAME:VERSION")
    dataset: str = Field(min_length=1, max_length=200, description="dataset ref: NAME or NAME:VERSION")
    split: str = Field("test", min_length=1, max_length=64)


SPECS: dict[str, type[BaseModel]] = {
    "training": TrainSpec,
    "evaluation": EvaluationSpec,
    "batch": BatchSpec,
    "compress": CompressSpec,
}


@dataclass
class JobContext:
    """What a job's handler is given by its worker."""

    settings: Settings
    job: Job
    work_dir: Path  # the job's own folder; the same on every attempt
    progress: Callable[[Progress], None]  # reports go to the job's row, its log and Prometheus
    should_stop: Callable[[], bool]  # cancel requested, lease lost, or the worker stopping
    log: Callable[[str], None]  # one line of the job's log


JobHandler = Callable[[JobContext], dict[str, Any]]


def validate_spec(kind: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-ready request of a job of `kind`, validated: an unknown kind is a 400
    ``unknown_job_kind``, a bad field a 422 ``invalid_job_spec`` naming it."""
    model = SPECS.get(kind)
    if model is None:
        raise UnknownJobKind(f"unknown job kind {kind!r}; one of {', '.join(WORK_KINDS)}")
    try:
        return model.model_validate(dict(spec)).model_dump(mode="json")
    except ValidationError as exc:
        raise Unprocessable(_first_error(exc), code="invalid_job_spec") from None


def check_refs(registry: Registry, kind: str, request: Mapping[str, Any]) -> None:
    """Refuse now what the job would fail on at once: an unknown model (404 ``model_not_found``) or
    dataset (404 ``dataset_not_found``). The task checks (a base of the wrong task, a dataset of the
    wrong kind) are the pipeline's, when the job runs."""
    from .datasets import Datasets

    registry.resolve(str(request["base"] if kind == "training" else request["model"]))
    if request.get("dataset") is not None:  # a compress job's is optional
        Datasets.from_registry(registry).get(str(request["dataset"]))


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "body"
    return f"{where}: {error['msg']}"


def describe(job: Job) -> dict[str, Any]:
    """A queued job as its submitter reads it (``GET /v1/training/jobs/{id}``, ``moorage jobs show``):
    JSON-ready, times in seconds since the epoch."""

    def seconds(at: Any) -> float | None:
        return at.timestamp() if at is not None else None

    return {
        "id": job.id,
        "kind": job.kind,
        "model": job.model,
        "status": job.status.value,
        "priority": job.priority,
        "spec": job.request,
        "progress": job.progress,
        "result": job.result,
        "error": job.error.as_dict() if job.error else None,
        "cancel_requested": job.cancel_requested,
        "attempts": job.attempts,
        "created_at": seconds(job.created_at),
        "started_at": seconds(job.started_at),
        "finished_at": seconds(job.finished_at),
    }


def work_dir_of(settings: Settings, job_id: str) -> Path:
    """The job's folder of checkpoints: ``training.work_dir/<job id>`` or ``HOME/training/<job id>``."""
    return (settings.training.work_dir or settings.home / "training") / job_id


def output_dir_of(settings: Settings, job_id: str) -> Path:
    """Where a batch job writes its results: ``HOME/jobs/<job id>/``."""
    return settings.home / "jobs" / job_id


def run_training_job(ctx: JobContext) -> dict[str, Any]:
    """Train, test and publish (`run_training`); the result names the registered version and its test
    metrics. Raises `TrainingCancelled` when `should_stop` says so (checkpoints kept)."""
    from .pipeline import run_training

    spec = TrainSpec.model_validate(ctx.job.request)
    ctx.log(f"training {spec.task} {spec.name} from {spec.base} on {spec.dataset}; checkpoints in {ctx.work_dir}")
    result = run_training(
        ctx.settings,
        spec,
        ctx.work_dir,
        user=ctx.job.owner or ctx.settings.user,
        progress=ctx.progress,
        should_stop=ctx.should_stop,
    )
    outcome = result.outcome
    if outcome.resumed_from_step is not None:
        ctx.log(f"resumed from the checkpoint of step {outcome.resumed_from_step}")
    ctx.log(f"registered {result.version.ref} as {spec.name}@challenger")
    return json_ready(
        {
            "model": result.version.name,
            "version": result.version.version,
            "ref": result.version.ref,
            "alias": "challenger",
            "test_metrics": result.test_metrics,
            "metric": outcome.metric,
            "best_metric": outcome.best_metric,
            "best_step": outcome.best_step,
            "resumed_from_step": outcome.resumed_from_step,
        }
    )


def run_evaluation_job(ctx: JobContext) -> dict[str, Any]:
    """The metrics of `EvaluationSpec.model` on the split (`evaluate_version`)."""
    from .pipeline import evaluate_version

    spec = EvaluationSpec.model_validate(ctx.job.request)
    ctx.log(f"evaluating {spec.model} on {spec.dataset} ({spec.split})")
    metrics = evaluate_version(ctx.settings, spec.model, spec.dataset, spec.split)
    return json_ready({"model": spec.model, "dataset": spec.dataset, "split": spec.split, "metrics": metrics})


def run_batch_job(ctx: JobContext) -> dict[str, Any]:
    """The model over every row of the split, through the `InferenceService`; the result names the
    output file and counts the rows."""
    from .batch import run_batch

    spec = BatchSpec.model_validate(ctx.job.request)
    output_dir = output_dir_of(ctx.settings, ctx.job.id)
    return run_batch(ctx.settings, spec, output_dir, progress=ctx.progress, should_stop=ctx.should_stop, log=ctx.log)


def json_ready(value: Any) -> Any:
    """`value` with numpy scalars and other number types as plain floats and ints (a job's result is JSON)."""
    return json.loads(json.dumps(value, default=_plain))


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


HANDLERS: dict[str, JobHandler] = {
    "training": run_training_job,
    "evaluation": run_evaluation_job,
    "batch": run_batch_job,
    "compress": run_compress_job,
}
