"""The ``compress`` job: `compress` run by a job worker (`moorage.training.worker`).

A job whose model a gate refuses fails with ``compression_refused`` (nothing registered; the message
names the failing measures and where the report is kept), as a cancelled one registers nothing."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class CompressSpec(BaseModel):
    """A compression job: the parent, the method, its parameters, and what to do with the result."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=200, description="the parent: NAME, NAME@ALIAS or NAME:VERSION")
    method: str = Field(min_length=1, max_length=64, description="onnx, onnx-int8, prune-heads, distill, lm-int8")
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters")
    dataset: str | None = Field(None, max_length=200, description="held-out data: this dataset's test split")
    force: bool = Field(False, description="register it even if a gate refuses it (audited)")
    alias: str | None = Field(None, max_length=64, description="alias of the new version (default none)")


def run_compress_job(ctx: Any) -> dict[str, Any]:
    """Compress and register (or refuse); the result names the new version, its gates and its report.
    `ctx` is the worker's `moorage.training.jobs.JobContext` (not imported: that module imports this one)."""
    from ..trainer import Progress
    from .pipeline import CompressionRefused, compress

    spec = CompressSpec.model_validate(ctx.job.request)
    ctx.log(f"compressing {spec.model} with {spec.method}")

    def progress(what: str, done: int, total: int) -> None:
        ctx.progress(Progress(what, done, total, 0.0, None))

    outcome = compress(
        ctx.settings,
        spec.model,
        spec.method,
        dict(spec.params),
        force=spec.force,
        alias=spec.alias,
        dataset=spec.dataset,
        user=ctx.job.owner or ctx.settings.user,
        progress=progress,
        should_stop=ctx.should_stop,
    )
    if outcome.registered is None:
        raise CompressionRefused(outcome.reason)
    ctx.log(outcome.reason)
    info = outcome.registered
    return _json_ready(
        {
            "model": info.name,
            "version": info.version,
            "ref": info.ref,
            "method": spec.method,
            "forced": outcome.forced,
            "gates": [g.as_dict() for g in outcome.gates],
            "report": outcome.report,
        }
    )


def _json_ready(value: Any) -> Any:
    """The result as the job's row stores it (numbers that are not plain floats or ints, as text)."""
    return json.loads(json.dumps(value, default=str))
