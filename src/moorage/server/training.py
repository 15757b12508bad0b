"""Training, evaluation and batch jobs over HTTP (operator role, ``manage_models``):

- ``POST /v1/training/jobs``: a `TrainSpec` (``kind`` ``training``, the default), an `EvaluationSpec`
  or a `BatchSpec`, plus a ``priority`` (higher runs first). A bad field is a 422
  ``invalid_job_spec`` naming it; an unknown base model or dataset a 404; nothing is queued then.
  Answers 202 with the job and its ``Location``.
- ``GET /v1/training/jobs/{id}``: status, progress (phase, step, total steps, ETA, loss, the last
  validation metrics), the result once it succeeded (the registered version and its test metrics),
  or the error.
- ``POST /v1/training/jobs/{id}/cancel``: a queued job ends at once, a running one at its next step.
- ``GET /v1/training/jobs/{id}/logs?after=N``: the job's log lines numbered above N.

A job is its submitter's (and an admin's): anyone else gets the 404 of an unknown job. The jobs run
in ``moorage jobs worker`` processes; with ``training.run_in_server`` the server runs a worker too
(`start_worker`), which takes cores from serving.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request
from starlette.responses import Response

from ..config import Settings
from ..errors import Unprocessable
from ..jobs import Job, JobNotFound
from ..jobs.queue import WORK_KINDS, WorkQueue
from ..refs import parse_ref
from ..security.keys import Principal
from ..training.jobs import check_refs, describe, validate_spec
from .common import FastJSON
from .security import require

router = APIRouter(tags=["training"])
MAX_PRIORITY = 1000


def queue_of(request: Request) -> WorkQueue:
    queue = getattr(request.app.state, "work_queue", None)
    if queue is None:
        settings: Settings = request.app.state.settings
        queue = request.app.state.work_queue = WorkQueue(
            request.app.state.registry.catalog.engine, lease_s=settings.jobs.lease_s
        )
    return queue


@router.post("/v1/training/jobs", status_code=202)
async def submit_job(
    request: Request,
    body: dict[str, Any] = Body(
        ..., examples=[{"task": "classify", "base": "minilm@production", "dataset": "bbc-news", "name": "news"}]
    ),
    caller: Principal = Depends(require("manage_models")),
) -> Response:
    """Queue a training (default), evaluation or batch job; poll ``GET /v1/training/jobs/{id}``."""
    spec = dict(body)
    kind = spec.pop("kind", "training")
    priority = _priority(spec.pop("priority", 0))
    request_spec = validate_spec(str(kind), spec)
    for model in _models(kind, request_spec):
        caller.require_model(parse_ref(model).name)
    await asyncio.to_thread(check_refs, request.app.state.registry, kind, request_spec)
    queue = queue_of(request)
    job = await asyncio.to_thread(queue.submit, kind, request_spec, priority=priority, owner=caller.key_id)
    return FastJSON(describe(job), status_code=202, headers={"Location": f"/v1/training/jobs/{job.id}"})


@router.get("/v1/training/jobs/{job_id}")
async def get_job(job_id: str, request: Request, caller: Principal = Depends(require("manage_models"))) -> Response:
    """A job's status, progress, result (the registered version and its test metrics) or error."""
    return FastJSON(describe(await _job(request, job_id, caller)))


@router.post("/v1/training/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request, caller: Principal = Depends(require("manage_models"))) -> Response:
    """Cancel: a queued job ends now, a running one at its next step (nothing is registered)."""
    await _job(request, job_id, caller)
    job = await asyncio.to_thread(queue_of(request).cancel, job_id)
    return FastJSON(describe(job))


@router.get("/v1/training/jobs/{job_id}/logs")
async def job_logs(
    job_id: str,
    request: Request,
    after: int = Query(0, ge=0, description="only the lines numbered above this"),
    caller: Principal = Depends(require("manage_models")),
) -> Response:
    """The job's log lines numbered above `after` (at most 1,000); ``next`` is the `after` of the next call."""
    await _job(request, job_id, caller)
    lines = await asyncio.to_thread(queue_of(request).logs, job_id, after)
    body = {"id": job_id, "lines": [{"seq": seq, "line": line} for seq, line in lines]}
    return FastJSON(body | {"next": lines[-1][0] if lines else after})


async def _job(request: Request, job_id: str, caller: Principal) -> Job:
    job = await asyncio.to_thread(queue_of(request).get, job_id) if len(job_id) <= 64 else None
    if job is None or job.kind not in WORK_KINDS or (job.owner != caller.key_id and caller.role != "admin"):
        raise JobNotFound(f"no job {job_id!r}")
    return job


def _priority(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > MAX_PRIORITY:
        raise Unprocessable(f"priority: an integer from -{MAX_PRIORITY} to {MAX_PRIORITY}", code="invalid_job_spec")
    return value


def _models(kind: str, spec: dict[str, Any]) -> list[str]:
    """The model names the caller's key must be allowed to use for this job."""
    return [spec["name"], spec["base"]] if kind == "training" else [spec["model"]]


# -- a worker inside the server (training.run_in_server) ------------------------------------------
def start_worker(app: FastAPI) -> None:
    """With ``training.run_in_server``, run a job worker in a thread of this server."""
    settings: Settings = app.state.settings
    if not settings.training.run_in_server:
        return
    from ..training.worker import Worker

    worker = Worker(settings, WorkQueue(app.state.registry.catalog.engine, lease_s=settings.jobs.lease_s))
    thread = threading.Thread(target=worker.run, name="moorage-training-worker", daemon=True)
    app.state.training_worker = (worker, thread)
    thread.start()


async def stop_worker(app: FastAPI) -> None:
    """Stop the server's worker: its running job stops at its next step and goes back to the queue."""
    started = getattr(app.state, "training_worker", None)
    if started is not None:
        worker, thread = started
        worker.stopping.set()
        await asyncio.to_thread(thread.join)
