"""One training run end to end: check the base model and the dataset, fine-tune, test the best
checkpoint through the runtime that will serve it, and publish it with its lineage as the model's
``challenger``. Nothing is registered when any step fails or the run is cancelled."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..config import Settings
from ..errors import BadRequest, Conflict, require
from ..refs import validate_name
from ..registry import Manifest, Registry, VersionInfo
from ..registry.crypto import MemoryFolder
from ..registry.manifest import detect_framework
from ..runtime import Runtime
from ..runtime.base import TaskHandler
from ..runtime.loader import handler_for
from .datasets import Datasets, DatasetVersion, Example
from .evaluation import classification_metrics, language_model_metrics
from .publish import publish, published, run_id, unpublish
from .trainer import Progress, TrainingCancelled, TrainOutcome, TrainSpec, _encode_generate, train

# The registered tasks a base may have, per training task: a classifier starts from an encoder
# (an embedding model, or another classifier), a generator from a causal LM.
BASE_TASKS = {"classify": ("embed", "classify"), "generate": ("generate",)}
DATASET_KINDS = {"classify": ("classify",), "generate": ("chat", "text")}


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
    registry = Registry.from_settings(settings).acting_as(user)
    try:
        datasets = Datasets.from_registry(registry)
        base = check_base(registry, spec)
        dataset = check_dataset(datasets, spec)
        check_target(registry, spec)
        with base_folder(registry, base) as base_dir:
            outcome = train(
                spec,
                base_dir,
                datasets.examples(dataset, spec.train_split),
                datasets.examples(dataset, spec.validation_split),
                dataset.label_map,
                Path(work_dir),
                progress=progress,
                should_stop=should_stop,
            )
        run = run_id(spec, base, dataset, Path(work_dir))
        done = published(registry, spec.name, run)
        if done is not None:  # this run registered it before its process stopped: the same version
            datasets.record_use(dataset, done.name, done.version)
            return TrainingResult(done, dict(done.manifest.metrics), outcome)
        _report(progress, "testing", outcome)
        test_rows = datasets.examples(dataset, spec.test_split)
        test_metrics = evaluate_folder(settings, outcome.best_dir, spec.task, test_rows, dataset, spec.test_split, spec)
        if should_stop is not None and should_stop():
            raise TrainingCancelled(f"training of {spec.name} was cancelled before it was registered")
        _report(progress, "publishing", outcome)
        info, previous = publish(registry, spec, outcome, base, dataset, test_metrics, run)
        try:
            datasets.record_use(dataset, info.name, info.version)
        except BaseException:
            unpublish(registry, info, previous)
            raise
        return TrainingResult(registry.resolve(info.ref), test_metrics, outcome)
    finally:
        registry.close()


def evaluate_version(settings: Settings, ref: str, dataset: str, split: str = "test") -> dict[str, Any]:
    """The test metrics of any registered version on a dataset split (``dataset``: NAME or
    NAME:VERSION), computed through the runtime's handler for the version, as served."""
    registry = Registry.from_settings(settings)
    try:
        info = registry.resolve(ref)
        datasets = Datasets.from_registry(registry)
        data = datasets.get(dataset)
        _check_kind(info.task, data)
        _check_split(data, split)
        loaded = Runtime(registry, settings.runtime).load(info)
        rows = datasets.examples(data, split)
        return _metrics(loaded.handler, info.task, rows, data, split, settings, _spec_of(info, data, loaded.handler))
    finally:
        registry.close()


def evaluate_folder(
    settings: Settings,
    folder: Path,
    task: str,
    rows: Sequence[Example],
    dataset: DatasetVersion,
    split: str,
    spec: TrainSpec | None = None,
) -> dict[str, Any]:
    """The metrics of an unregistered model folder, loaded by the handler the registry and the
    runtime would pick for it (the one that serves it once registered)."""
    framework = detect_framework(folder, task)
    handler = handler_for(task, framework)
    handler.load(
        folder, Manifest(name="candidate", version=0, task=task, framework=framework, files=[]), settings.runtime
    )
    return _metrics(handler, task, rows, dataset, split, settings, spec)


# ---- checks, all before any training ------------------------------------------------------------
def check_base(registry: Registry, spec: TrainSpec) -> VersionInfo:
    base = registry.resolve(spec.base)  # 404 model_not_found / version_not_found
    if base.task not in BASE_TASKS[spec.task]:
        raise BadRequest(
            f"base {base.ref} is a {base.task} model; a {spec.task} model is trained from a "
            f"{' or '.join(BASE_TASKS[spec.task])} model",
            code="wrong_base_task",
        )
    if base.framework == "fake":
        raise BadRequest(f"base {base.ref} is a fake model: it has no weights to fine-tune", code="wrong_base_task")
    return base


def check_dataset(datasets: Datasets, spec: TrainSpec) -> DatasetVersion:
    dataset = datasets.get(spec.dataset)  # 404 dataset_not_found
    _check_kind(spec.task, dataset)
    for split in (spec.train_split, spec.validation_split, spec.test_split):
        _check_split(dataset, split)
    return dataset


def check_target(registry: Registry, spec: TrainSpec) -> None:
    """The result's name is valid and not taken by a model of another task (found out now, not after
    training)."""
    validate_name(spec.name)
    for model in registry.list_models():
        if model.name == spec.name and model.task != spec.task:
            raise Conflict(
                f"model {spec.name!r} holds {model.task!r} models; train this {spec.task} model under another name",
                code="task_mismatch",
            )


def _check_kind(task: str, dataset: DatasetVersion) -> None:
    kinds = DATASET_KINDS.get(task)
    if kinds is None:
        raise BadRequest(f"{task} models are not evaluated on datasets; choose a classify or generate model")
    if dataset.kind not in kinds:
        raise BadRequest(
            f"dataset {dataset.ref} holds {dataset.kind} data; a {task} model needs {' or '.join(kinds)} data",
            code="wrong_dataset_kind",
        )


def _check_split(dataset: DatasetVersion, split: str) -> None:
    if split not in dataset.splits:
        raise BadRequest(
            f"dataset {dataset.ref} has no split {split!r}; its splits are {', '.join(sorted(dataset.splits))}",
            code="split_not_found",
        )


@contextlib.contextmanager
def base_folder(registry: Registry, base: VersionInfo) -> Iterator[Path]:
    """The base's verified local folder; an encrypted base is decrypted into memory only."""
    folder = registry.local_path(base)
    if not base.manifest.encryption:
        yield folder
        return
    with MemoryFolder(registry.read_plaintext(base, folder)) as plain:
        yield plain


# ---- metrics through a loaded handler -----------------------------------------------------------
def _metrics(
    handler: TaskHandler,
    task: str,
    rows: Sequence[Example],
    dataset: DatasetVersion,
    split: str,
    settings: Settings,
    spec: TrainSpec | None = None,
) -> dict[str, Any]:
    if not rows:
        raise BadRequest(
            f"split {split!r} of dataset {dataset.ref} is empty: nothing to evaluate on", code="empty_split"
        )
    if task == "classify":
        metrics = _classification(handler, rows, dataset.label_map, settings.serve.max_batch_size)
    else:
        if spec is None:
            raise TypeError("a language model is scored with the spec it was trained with")
        metrics = language_model_metrics(_mean_token_loss(handler, rows, spec))
    return {**metrics, "evaluated_on": _evaluated_on(dataset, split, len(rows))}


def _classification(
    handler: TaskHandler, rows: Sequence[Example], label_map: dict[str, int], batch_size: int
) -> dict[str, Any]:
    """The handler's labels for every row, in the batches it is served in."""
    predicted: list[str] = []
    for start in range(0, len(rows), batch_size):
        predicted += [c.label for c in handler([r.text for r in rows[start : start + batch_size]])]
    labels = sorted(label_map, key=label_map.__getitem__)
    return classification_metrics([str(r.label) for r in rows], predicted, labels)


def _mean_token_loss(handler: TaskHandler, rows: Sequence[Example], spec: TrainSpec) -> float:
    """Mean next-token cross-entropy of the served causal LM over the rows, on the tokens the trainer
    learns (a conversation's assistant turns, all of a plain text): the validation loss's definition,
    with the trainer's own encoding."""
    torch = require("torch", "ml")
    model, tokenizer = handler.model, handler.tokenizer  # type: ignore[attr-defined]
    encoded = _encode_generate(spec, tokenizer, rows, {})
    total, count = 0.0, 0
    with torch.inference_mode():
        for row in encoded:
            labels = torch.tensor([row["labels"]], device=model.device)
            learned = int((labels[0, 1:] != -100).sum())
            if learned == 0:
                continue
            ids = torch.tensor([row["input_ids"]], device=model.device)
            loss = model(input_ids=ids, labels=labels).loss.float().item()
            total, count = total + loss * learned, count + learned
    if count == 0:
        raise BadRequest("no row of the split has a token to score", code="empty_split")
    return total / count


def _spec_of(info: VersionInfo, dataset: DatasetVersion, handler: TaskHandler) -> TrainSpec | None:
    """The spec a version was trained with (its tokens' length and encoding), or for a language model
    registered by hand one that reads whole texts up to the model's context."""
    recorded = info.manifest.lineage.hyperparameters.get("spec")
    if recorded:
        with contextlib.suppress(ValidationError):  # a spec of an older moorage: read it as a hand-made one
            return TrainSpec.model_validate(recorded)
    if info.task != "generate":
        return None
    context = int(getattr(handler, "max_context", 2048))
    return TrainSpec(task="generate", base=info.ref, dataset=dataset.ref, name=info.name, max_length=max(8, context))


def _evaluated_on(dataset: DatasetVersion, split: str, rows: int) -> dict[str, Any]:
    return {
        "dataset": dataset.ref,
        "dataset_sha256": dataset.digest,
        "split": split,
        "split_sha256": dataset.splits[split].digest,
        "rows": rows,
    }


def _report(progress: Callable[[Progress], None] | None, phase: str, outcome: TrainOutcome) -> None:
    if progress is not None:
        last = outcome.history[-1] if outcome.history else {}
        best = {outcome.metric: outcome.best_metric}
        progress(
            Progress(phase, int(last.get("step", 0)), int(last.get("step", 0)), last.get("epoch") or 0.0, None, best)
        )
