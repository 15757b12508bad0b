"""One training run end to end: check the base model and the dataset, fine-tune, test the best
checkpoint through the runtime that will serve it, and publish it with its lineage as the model's
``challenger``. Nothing is registered when any step fails or the run is cancelled."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Settings
from ..registry import VersionInfo
from .trainer import Progress, TrainOutcome, TrainSpec


@dataclass
class TrainingResult:
    version: VersionInfo  # the registered version (alias "challenger")
    test_metrics: dict[str, Any]
    outcome: TrainOutcome


def run_training(
    settings: Settings,
    spec: TrainSpec,
    work_dir: Path,
    *,
    user: str,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainingResult:
    """Train `spec` in `work_dir` (a work dir with checkpoints of the same spec resumes), evaluate the
    best checkpoint on the test split through the runtime's handler, register it as the next version
    of ``spec.name`` with alias ``challenger`` and its full lineage, and record the dataset's use.

    An unknown base is a 404 ``model_not_found``; a base of the wrong task 400 ``wrong_base_task``;
    a dataset whose kind does not fit the task 400 ``wrong_dataset_kind``. Raises
    `TrainingCancelled` when `should_stop` says so; nothing is registered then, nor on any failure."""
    raise NotImplementedError


def evaluate_version(settings: Settings, ref: str, dataset: str, split: str = "test") -> dict[str, Any]:
    """The test metrics of any registered version on a dataset split (``dataset``: NAME or
    NAME:VERSION), computed through the runtime's handler for the version, as served."""
    raise NotImplementedError
