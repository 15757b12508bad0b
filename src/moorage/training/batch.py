"""Batch inference jobs: a registered model over every row of a dataset split, through the same
`InferenceService` as every edge (validation, the model's policy, batching), results to a file.

The version is resolved once when the job starts and pinned, so an alias that moves meanwhile does
not mix two versions in one output. Each output row carries its input's index and either the
task's encoded result or the input's error (``{"code", "message"}``): one refused input does not
fail the job. The file (``results.jsonl`` or ``results.parquet`` under ``HOME/jobs/<job id>/``) is
written under a temporary name and renamed, so a reader never sees half of it; a job that a dead
worker left behind simply runs again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import DeadlineExceeded, MoorageError
from .trainer import Progress, TrainingCancelled

if TYPE_CHECKING:
    from ..batching import InferenceService
    from ..config import Settings
    from ..security.policy import Policy
    from .datasets import Example


class BatchSpec(BaseModel):
    """A batch-inference job: a registered model over every row of a dataset split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=200, description="registry ref: NAME, NAME@ALIAS, NAME:VERSION")
    dataset: str = Field(min_length=1, max_length=200, description="dataset ref: NAME or NAME:VERSION")
    split: str = Field("test", min_length=1, max_length=64)
    format: Literal["jsonl", "parquet"] = "jsonl"
    parameters: dict[str, Any] = Field(default_factory=dict, description="the task's parameters, as in predict")
    batch_size: int = Field(64, ge=1, le=4096, description="rows submitted to the service at once")


@dataclass(frozen=True)
class _Hooks:
    progress: Callable[[Progress], None]
    should_stop: Callable[[], bool]


def run_batch(
    settings: Settings,
    spec: BatchSpec,
    output_dir: Path,
    *,
    progress: Callable[[Progress], None],
    should_stop: Callable[[], bool],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Run the job; the result names the pinned version, the file and the counts of rows and errors."""
    from ..registry import Registry
    from .datasets import Datasets

    datasets = Datasets.from_settings(settings)
    dataset = datasets.get(spec.dataset)
    examples = datasets.examples(dataset, spec.split)
    registry = Registry.from_settings(settings)
    version = registry.resolve(spec.model)
    log(f"{version.ref} over {dataset.ref} ({spec.split}): {len(examples)} rows")
    hooks = _Hooks(progress, should_stop)
    rows = asyncio.run(_infer_all(settings, hooks, registry, version.ref, examples, spec))
    path = _write(output_dir, rows, spec.format)
    errors = sum(1 for row in rows if row["error"] is not None)
    log(f"wrote {len(rows)} rows ({errors} errors) to {path}")
    return {
        "model": version.ref,
        "dataset": dataset.ref,
        "split": spec.split,
        "rows": len(rows),
        "errors": errors,
        "path": str(path),
        "format": spec.format,
    }


def _input(example: Example, task: str) -> Any:
    if task == "generate" and example.messages:
        return {"messages": [dict(m) for m in example.messages]}
    return example.text


async def _infer_all(
    settings: Settings, hooks: _Hooks, registry, ref: str, examples: list[Example], spec: BatchSpec
) -> list[dict]:
    from ..batching import InferenceService, ModelPool
    from ..batching.settings import stream_pool_config
    from ..runtime import Runtime
    from ..security.policy import Policy

    base = stream_pool_config(settings)
    config = replace(
        base,
        batch=replace(base.batch, max_queue=max(base.batch.max_queue, spec.batch_size)),
        generation=replace(base.generation, max_waiting=max(base.generation.max_waiting, spec.batch_size)),
        poll_interval_s=0.0,  # pinned: nothing to follow
    )
    pool = ModelPool(registry, Runtime(registry, settings.runtime), [ref], config)
    await pool.start()
    try:
        service = InferenceService(pool, settings.stream.default_max_tokens)
        policy = Policy.for_model(settings.security, ref.split(":")[0])
        rows: list[dict] = []
        for start in range(0, len(examples), spec.batch_size):
            if hooks.should_stop():
                raise TrainingCancelled(f"batch job stopped after {len(rows)} rows")
            chunk = examples[start : start + spec.batch_size]
            rows += await _chunk(service, ref, chunk, spec, policy, start, settings.stream.item_timeout_s)
            hooks.progress(Progress("inference", len(rows), len(examples), 0.0, None, {}, None))
        return rows
    finally:
        await pool.stop()


async def _chunk(
    service: InferenceService,
    ref: str,
    chunk: list[Example],
    spec: BatchSpec,
    policy: Policy,
    offset: int,
    timeout_s: float | None,
) -> list[dict]:
    """One chunk of rows: every input is prepared on its own, so a refused one is an error row."""
    outcomes: list[MoorageError | asyncio.Future] = []
    async with service.hold(ref) as sv:
        task = sv.task
        for example in chunk:
            try:
                call = service.prepare(task, [_input(example, task)], spec.parameters, policy=policy)
                outcomes.append(service.submit(sv, call.items[0], timeout_s, policy))
            except MoorageError as exc:
                outcomes.append(exc)
        futures = [o for o in outcomes if isinstance(o, asyncio.Future)]
        await service.wait_all([(sv, futures, timeout_s)])
    return [_row(offset + i, task, outcome) for i, outcome in enumerate(outcomes)]


def _row(index: int, task: str, outcome: MoorageError | asyncio.Future) -> dict[str, Any]:
    from ..batching import Task, encode_result

    row: dict[str, Any] = {"index": index, "result": None, "error": None}
    failure: BaseException | None = outcome if isinstance(outcome, MoorageError) else None
    if isinstance(outcome, asyncio.Future):
        if outcome.cancelled():  # wait_all gave up on an engine that showed no progress
            failure = DeadlineExceeded("the model did not answer within the deadline and a grace")
        elif (failure := outcome.exception()) is None:
            row["result"] = encode_result(Task(task), outcome.result())
    if isinstance(failure, MoorageError):
        row["error"] = {"code": failure.code, "message": failure.client_message}
    elif failure is not None:
        row["error"] = {"code": "internal_error", "message": "the model failed on this input"}
    return row


def _write(folder: Path, rows: list[dict], fmt: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"results.{fmt}"
    staging = folder / f".results.{fmt}.partial"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(
            [
                {"index": r["index"], "result": _dumps_or_none(r["result"]), "error": _dumps_or_none(r["error"])}
                for r in rows
            ]
        )
        pq.write_table(table, staging)
    else:
        with staging.open("w", encoding="utf-8") as file:
            for row in rows:
                file.write(_dumps(row) + "\n")
    staging.replace(path)
    return path


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=_plain)


def _dumps_or_none(value: Any) -> str | None:
    """Parquet keeps a result as its JSON text: the shape differs between tasks."""
    return None if value is None else _dumps(value)


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars (an embedding)
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")
