"""Publishing a trained folder: the lineage its manifest records (parent and its digest, the data
and its split digests, label map, every hyper-parameter, package and code versions, the validation
history) and its registration as the model's ``challenger``, undone if what follows it fails."""

from __future__ import annotations

import hashlib
import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelNotFound
from ..registry import Lineage, Registry, VersionInfo
from .trainer import TrainOutcome, TrainSpec

if TYPE_CHECKING:
    from .datasets import DatasetVersion

CHALLENGER = "challenger"
RUN_TAG = "training_run"  # one training run (spec, base, data, work dir): registered once, even when run again
# What trained the version: its weights depend on these (the rest of the environment does not).
PACKAGES = ("torch", "transformers", "peft", "accelerate", "sentence-transformers", "scikit-learn", "moorage")


def package_versions() -> dict[str, str]:
    """The installed version of each package in `PACKAGES` (the absent ones are left out)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def code_version() -> str:
    """`git describe` of the checkout moorage runs from (``-dirty`` when it has local changes), else
    the installed package's version."""
    try:
        done = subprocess.run(
            ["git", "describe", "--tags", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        done = None
    if done is not None and done.returncode == 0 and done.stdout.strip():
        return done.stdout.strip()
    try:
        return metadata.version("moorage")
    except metadata.PackageNotFoundError:
        return "unknown"


def lineage(spec: TrainSpec, outcome: TrainOutcome, base: VersionInfo, dataset: DatasetVersion) -> Lineage:
    """Everything that made the version, recorded with no user code and nothing truncated."""
    return Lineage(
        parent=base.ref,
        parent_manifest_sha256=base.manifest_sha256,
        dataset_sha256=dataset.digest,
        dataset=dataset.lineage(),
        label_map=dict(dataset.label_map) if spec.task == "classify" else None,
        hyperparameters={
            "spec": spec.model_dump(mode="json"),
            "trainer": outcome.hyperparameters,
            "best_metric": outcome.metric,
            "best_step": outcome.best_step,
            "resumed_from_step": outcome.resumed_from_step,
        },
        validation=list(outcome.history),
        packages=package_versions(),
        code_version=code_version(),
    )


def publish(
    registry: Registry,
    spec: TrainSpec,
    outcome: TrainOutcome,
    base: VersionInfo,
    dataset: DatasetVersion,
    test_metrics: dict[str, Any],
    run: str,
) -> tuple[VersionInfo, int | None]:
    """Register the best folder as the next version of ``spec.name`` with alias ``challenger``, tagged
    with its `run`. Returns the version and the one ``challenger`` pointed at before (for `unpublish`)."""
    previous = challenger_of(registry, spec.name)
    info = registry.register(
        outcome.best_dir,
        spec.name,
        spec.task,
        alias=CHALLENGER,
        description=f"{spec.task} fine-tune of {base.ref} on {dataset.ref}",
        metrics=test_metrics,
        lineage=lineage(spec, outcome, base, dataset),
        reason=f"trained from {base.ref} on {dataset.ref}; {_summary(test_metrics)}",
        tags={RUN_TAG: run},
    )
    return info, previous


def run_id(spec: TrainSpec, base: VersionInfo, dataset: DatasetVersion, work_dir: Path) -> str:
    """What identifies one training run: a job that is run again in its work dir (after its process
    died between registering and reporting) finds the version it registered instead of adding one."""
    identity = [spec.model_dump(mode="json"), base.manifest_sha256, dataset.digest, str(work_dir.resolve())]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def published(registry: Registry, name: str, run: str) -> VersionInfo | None:
    """The ready version of `name` registered by `run`, if there is one."""
    if name not in {m.name for m in registry.list_models()}:
        return None
    return next((v for v in registry.list_versions(name) if v.status == "ready" and v.tags.get(RUN_TAG) == run), None)


def unpublish(registry: Registry, info: VersionInfo, previous: int | None) -> None:
    """Undo `publish`: ``challenger`` goes back where it was (or away), then the version is deleted."""
    reason = f"{info.ref} withdrawn: publishing it failed"
    if previous is not None:
        registry.set_alias(info.name, CHALLENGER, previous, reason)
    else:
        registry.remove_alias(info.name, CHALLENGER, reason)
    registry.delete_version(info.name, info.version, reason)


def challenger_of(registry: Registry, name: str) -> int | None:
    try:
        return registry.resolve(f"{name}@{CHALLENGER}").version
    except ModelNotFound:
        return None


def _summary(metrics: dict[str, Any]) -> str:
    shown = [f"test {k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)]
    return ", ".join(shown) or "no test metrics"
