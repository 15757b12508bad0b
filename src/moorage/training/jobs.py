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

`validate_spec` checks a job's request before it is queued (HTTP and CLI both call it), so a bad
field is a 422 naming it, not a job that fails later.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import Settings
from ..errors import Unprocessable
from ..jobs.queue import WORK_KINDS, UnknownJobKind
from ..jobs.store import Job
from .trainer import Progress, TrainSpec


class EvaluationSpec(BaseModel):
    """An evaluation job: the test metrics of a registered version on a dataset split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=200, description="registry ref: NAME, NAME@ALIAS, NAME:VERSION")
    dataset: str = Field(min_length=1, max_length=200, description="dataset ref: NAME or NAME:VERSION")
    split: str = Field("test", min_length=1, max_length=64)


class BatchSpec(BaseModel):
    """A batch-inference job: a registered model over every row of a dataset split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=200, description="registry ref: NAME, NAME@ALIAS, NAME:VERSION")
    dataset: str = Field(min_length=1, max_length=200, description="dataset ref: NAME or NAME:VERSION")
    split: str = Field("test", min_length=1, max_length=64)
    format: Literal["jsonl", "parquet"] = "jsonl"
    parameters: dict[str, Any] = Field(default_factory=dict, description="the task's parameters, as in predict")
    batch_size: int = Field(64, ge=1, le=4096, description="rows submitted to the service at once")


SPECS: dict[str, type[BaseModel]] = {"training": TrainSpec, "evaluation": EvaluationSpec, "batch": BatchSpec}


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


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "body"
    return f"{where}: {error['msg']}"


def work_dir_of(settings: Settings, job_id: str) -> Path:
    """The job's folder of checkpoints: ``training.work_dir/<job id>`` or ``HOME/training/<job id>``."""
    return (settings.training.work_dir or settings.home / "training") / job_id


def output_dir_of(settings: Settings, job_id: str) -> Path:
    """Where a batch job writes its results: ``HOME/jobs/<job id>/``."""
    return settings.home / "jobs" / job_id


def run_training_job(ctx: JobContext) -> dict[str, Any]:
    """Train, test and publish (`run_training`); the result names the registered version and its test
    metrics. Raises `TrainingCancelled` when `should_stop` says so (checkpoints kept)."""
    raise NotImplementedError


def run_evaluation_job(ctx: JobContext) -> dict[str, Any]:
    """The metrics of `EvaluationSpec.model` on the split (`evaluate_version`)."""
    raise NotImplementedError


def run_batch_job(ctx: JobContext) -> dict[str, Any]:
    """The model over every row of the split, through the `InferenceService`; the result names the
    output file and counts the rows."""
    raise NotImplementedError


HANDLERS: dict[str, JobHandler] = {
    "training": run_training_job,
    "evaluation": run_evaluation_job,
    "batch": run_batch_job,
}
