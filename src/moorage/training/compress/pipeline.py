"""One compression end to end: resolve the parent, build the derived model with its method, measure
it against the parent (`report`), check the gates (`gate`), then register it as the next version of
the parent's name, or refuse it.

A refused model registers nothing: its report is kept under ``HOME/compression-reports/`` and the
one-line reason names each failing measure. ``force`` registers it anyway; the manifest says so
(``params.compression.forced``) and so does the audit log, which records every decision."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ...config import Settings
from ...errors import BadRequest, MoorageError, Unprocessable
from ...refs import validate_alias
from ...registry import Lineage, Registry, VersionInfo
from ...security.audit import AuditEntry, AuditLog
from ..datasets import DatasetNotFound, Datasets
from ..pipeline import base_folder
from ..publish import code_version, package_versions
from . import gate
from .methods import BuildContext, BuildResult, check_task, method
from .report import HeldOut, measure

DEMO_DATASET = "bbc-news"
TORCH_FRAMEWORKS = ("transformers", "sentence-transformers")
REPORTS = "compression-reports"
Phase = Callable[[str, int, int], None]  # (what, done, total)


class CompressionRefused(Unprocessable):
    """The derived model failed a gate: nothing registered (the report is kept)."""

    code = "compression_refused"


class CompressionCancelled(MoorageError):
    code = "job_cancelled"


@dataclass
class CompressionOutcome:
    registered: VersionInfo | None  # None: refused by a gate
    report: dict[str, Any]
    gates: list[gate.Gate]
    reason: str  # one line: why it was refused, or what was registered
    forced: bool = False
    report_path: Path | None = None  # where a refused model's report is kept
    build: BuildResult | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not gate.failing(self.gates)


def compress(
    settings: Settings,
    ref: str,
    method_name: str,
    params: dict[str, Any] | None = None,
    *,
    force: bool = False,
    alias: str | None = None,
    dataset: str | None = None,
    texts: list[str] | None = None,
    user: str | None = None,
    progress: Phase | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> CompressionOutcome:
    """Compress `ref` with `method_name` and register the result if its gates pass (or `force`).

    Held-out data: the test split of `dataset`, else `texts`; else a classifier's own test split
    (its lineage), an embedding model's the demo ``bbc-news`` dataset's. An unknown method is a 400
    ``unknown_method``; a model whose task the method does not compress, 400 ``unsupported_method``;
    no held-out data, 400 ``no_held_out_data``. `should_stop` is asked between the steps: when it says
    so, `CompressionCancelled` is raised and nothing is registered."""
    actor = user or settings.user
    report_step = _stepper(progress)
    if alias is not None:
        validate_alias(alias)
    registry = Registry.from_settings(settings).acting_as(actor)
    try:
        parent = registry.resolve(ref)
        chosen = method(method_name)
        check_task(chosen, parent.task, parent.ref)
        check_parent(parent)
        held_out = held_out_data(registry, parent, dataset, texts, settings.compression.max_texts)
        with base_folder(registry, parent) as parent_dir, _work_dir(settings) as work:
            out_dir = work / "derived"
            report_step("building", 0, 1)
            build_params = dict(params or {})
            if dataset is not None and getattr(chosen, "learns_from_data", False):
                build_params.setdefault("dataset", dataset)  # it learns on train/validation; test stays held out
            ctx = BuildContext(parent, parent_dir, out_dir, build_params, settings, _build_progress(progress))
            built = chosen.build(ctx)
            _stop_if(should_stop, parent.ref)
            report_step("measuring", 0, 1)
            report = measure(
                parent.task, parent_dir, out_dir, held_out, settings.runtime, step=lambda what: report_step(what, 0, 1)
            )
            report = {**report, "method": chosen.name, "parent": parent.ref, "precision": built.precision}
            gates = gate.check(parent.task, report, settings.compression)
            _stop_if(should_stop, parent.ref)
            failed = gate.reason(gates)
            if failed and not force:
                path = keep_report(settings, parent, chosen.name, report, gates, built)
                why = f"{parent.name} {chosen.name} not registered: {failed} (report: {path})"
                _audit(settings, registry, actor, parent, chosen.name, None, gates, force, why)
                return CompressionOutcome(None, report, gates, why, False, path, built, built.notes)
            report_step("registering", 0, 1)
            info = register(registry, parent, chosen.name, out_dir, built, report, gates, held_out, force, alias)
        why = f"registered {info.ref} ({chosen.name} of {parent.ref})"
        if failed:
            why += f", forced by {actor} past the gates: {failed}"
        _audit(settings, registry, actor, parent, chosen.name, info, gates, force, why)
        report_step("done", 1, 1)
        return CompressionOutcome(info, report, gates, why, bool(failed), None, built, built.notes)
    finally:
        registry.close()


def check_parent(parent: VersionInfo) -> None:
    """Methods start from torch weights: a fake model has none, a derived ONNX one only its graph."""
    if parent.framework in TORCH_FRAMEWORKS:
        return
    if parent.framework == "fake":
        raise BadRequest(f"{parent.ref} is a fake model: it has no weights to compress", code="unsupported_method")
    origin = (parent.manifest.params.get("compression") or {}).get("parent")
    hint = f"; compress its parent {origin} instead" if origin else ""
    raise BadRequest(
        f"{parent.ref} is a {parent.framework} model: compression starts from transformers weights{hint}",
        code="unsupported_method",
    )


# ---- held-out data ----------------------------------------------------------------------------------
def held_out_data(
    registry: Registry, parent: VersionInfo, dataset: str | None, texts: list[str] | None, limit: int
) -> HeldOut:
    """What the parent and its derived model are compared on (at most `limit` rows)."""
    datasets = Datasets.from_registry(registry)
    if parent.task == "classify":
        return _labelled(datasets, parent, dataset, limit)
    if dataset is not None:
        return _dataset_texts(datasets, dataset, "test", limit)
    if texts:
        return HeldOut([str(t) for t in texts[:limit]], source={"source": "texts", "given": len(texts)})
    if parent.task == "generate":
        recorded = parent.manifest.lineage.dataset
        if recorded:
            return _dataset_texts(datasets, f"{recorded['name']}:{recorded['version']}", "test", limit)
    try:
        return _dataset_texts(datasets, DEMO_DATASET, "test", limit)
    except DatasetNotFound:
        raise BadRequest(
            f"no held-out texts to compare {parent.ref} with its derived model on: give --dataset NAME (its test "
            f"split) or --texts FILE, or register the demo {DEMO_DATASET!r} dataset (moorage demo)",
            code="no_held_out_data",
        ) from None


def _dataset_texts(datasets: Datasets, ref: str, split: str, limit: int) -> HeldOut:
    data = datasets.get(ref)
    rows = _split_rows(datasets, data, split)
    source = {"dataset": data.ref, "dataset_sha256": data.digest, "split": split}
    return HeldOut([_text(r) for r in rows[:limit]], source={**source, "split_sha256": data.splits[split].digest})


def _labelled(datasets: Datasets, parent: VersionInfo, dataset: str | None, limit: int) -> HeldOut:
    lineage = parent.manifest.lineage
    split = str((lineage.hyperparameters.get("spec") or {}).get("test_split") or "test")
    if dataset is None:
        if not lineage.dataset:
            raise BadRequest(
                f"{parent.ref} names no dataset in its lineage: give --dataset NAME (a classify dataset with its "
                "labels) to compare it with its derived model on",
                code="no_held_out_data",
            )
        dataset = f"{lineage.dataset['name']}:{lineage.dataset['version']}"
    data = datasets.get(dataset)
    if data.kind != "classify":
        raise BadRequest(f"dataset {data.ref} holds {data.kind} data; a classifier is compared on classify data")
    rows = _split_rows(datasets, data, split)[:limit]
    labels = sorted(data.label_map, key=data.label_map.__getitem__)
    source = {"dataset": data.ref, "dataset_sha256": data.digest, "split": split}
    source["split_sha256"] = data.splits[split].digest
    return HeldOut([r.text for r in rows], [str(r.label) for r in rows], labels, source)


def _split_rows(datasets: Datasets, data, split: str) -> list:
    if split not in data.splits:
        raise BadRequest(
            f"dataset {data.ref} has no split {split!r}; its splits are {', '.join(sorted(data.splits))}",
            code="split_not_found",
        )
    rows = datasets.examples(data, split)
    if len(rows) < 2:
        raise BadRequest(
            f"split {split!r} of dataset {data.ref} has fewer than 2 rows to compare on", code="empty_split"
        )
    return rows


def _text(row) -> str:
    return str(row.text)  # a conversation's rendered text for chat data


def read_texts(path: Path) -> list[str]:
    """A --texts FILE: one text a line (blank lines skipped), or JSONL rows with a "text" field."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise BadRequest(f"cannot read --texts {path}: {exc}", code="no_held_out_data") from None
    texts = []
    for line in lines:
        if line.lstrip().startswith("{"):
            try:
                texts.append(str(json.loads(line)["text"]))
                continue
            except (ValueError, KeyError, TypeError):
                pass
        texts.append(line)
    if len(texts) < 2:
        raise BadRequest(f"--texts {path} has fewer than 2 texts to compare on", code="no_held_out_data")
    return texts


# ---- registering or refusing --------------------------------------------------------------------------
def register(
    registry: Registry,
    parent: VersionInfo,
    method_name: str,
    folder: Path,
    built: BuildResult,
    report: dict[str, Any],
    gates: list[gate.Gate],
    held_out: HeldOut,
    forced: bool,
    alias: str | None,
) -> VersionInfo:
    """The derived folder as the next version of the parent's name, with everything that made it."""
    compression = {
        "method": method_name,
        "parameters": built.parameters,
        "parent": parent.ref,
        "forced": bool(forced and gate.failing(gates)),
        "gates": {g.name: {"value": g.value, "threshold": g.threshold, "passed": g.passed} for g in gates},
        "report": report,
        "notes": built.notes,
    }
    lineage = Lineage(
        parent=parent.ref,
        parent_manifest_sha256=parent.manifest_sha256,
        dataset=parent.manifest.lineage.dataset,
        dataset_sha256=parent.manifest.lineage.dataset_sha256,
        label_map=parent.manifest.lineage.label_map,
        hyperparameters={"compression": {"method": method_name, "parameters": built.parameters}},
        packages={**package_versions(), **_compression_packages()},
        code_version=code_version(),
    )
    metrics: dict[str, Any] = {k: v for k, v in report["quality"].items() if isinstance(v, int | float)}
    derived_metrics = report["quality"].get("derived_metrics")
    if derived_metrics is not None:  # a classifier: its test metrics as training records them (promotion reads them)
        metrics = {
            **metrics,
            **derived_metrics,
            "evaluated_on": {**(held_out.source or {}), "rows": len(held_out.texts)},
        }
    return registry.register(
        folder,
        parent.name,
        parent.task,
        alias=alias,
        description=f"{method_name} of {parent.ref}",
        params={**dict(parent.manifest.params), "precision": built.precision, "compression": compression},
        metrics=metrics,
        lineage=lineage,
        tags={"compression": method_name, "parent": parent.ref},
        reason=f"{method_name} of {parent.ref}" + (" (forced past its gates)" if compression["forced"] else ""),
    )


def keep_report(
    settings: Settings,
    parent: VersionInfo,
    method_name: str,
    report: dict[str, Any],
    gates: list[gate.Gate],
    built: BuildResult,
) -> Path:
    """A refused model's report, kept as ``HOME/compression-reports/NAME-VERSION-METHOD-STAMP.json``."""
    folder = settings.home / REPORTS
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    path = folder / f"{parent.name}-{parent.version}-{method_name}-{stamp}.json"
    body = {
        "parent": parent.ref,
        "method": method_name,
        "parameters": built.parameters,
        "precision": built.precision,
        "registered": False,
        "gates": [g.as_dict() for g in gates],
        "report": report,
    }
    path.write_text(json.dumps(body, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def _audit(
    settings: Settings,
    registry: Registry,
    actor: str,
    parent: VersionInfo,
    method_name: str,
    info: VersionInfo | None,
    gates: list[gate.Gate],
    force: bool,
    why: str,
) -> None:
    if not settings.security.audit:
        return
    detail = {
        "parent": parent.ref,
        "method": method_name,
        "registered": info.ref if info is not None else None,
        "force": force,
        "forced": bool(info is not None and gate.failing(gates)),
        "gates": [g.as_dict() for g in gates],
        "reason": why,
    }
    version = info.version if info is not None else parent.version
    entry = AuditEntry(key_id=actor, action="compress", status=0, model=parent.name, version=version, detail=detail)
    AuditLog(registry.catalog).append([entry])


def _compression_packages() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in ("onnx", "onnxruntime"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


@contextmanager
def _work_dir(settings: Settings) -> Iterator[Path]:
    root = settings.home / "compress-work"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as work:
        yield Path(work)


def _stop_if(should_stop: Callable[[], bool] | None, ref: str) -> None:
    if should_stop is not None and should_stop():
        raise CompressionCancelled(f"compression of {ref} was cancelled: nothing registered")


def _stepper(progress: Phase | None) -> Phase:
    return progress or (lambda what, done, total: None)


def _build_progress(progress: Phase | None) -> Callable[[int, int, str], None] | None:
    if progress is None:
        return None
    return lambda done, total, what: progress(what, done, total)
