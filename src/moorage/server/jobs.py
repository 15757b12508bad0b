"""Async inference over HTTP: ``POST /v1/jobs`` enqueues a predict request, ``GET /v1/jobs/{id}``
answers its status and result, an optional callback URL is called when it ends.

A job is a row in the catalog (``jobs`` table: every replica that shares the catalog shares the
jobs) and a message on a durable queue (the embedded SQLite queue by default, any broker URL via
``stream.jobs_url``). A runner inside each server takes job messages off the queue with the broker
contract of the stream workers, runs each through the same `InferenceService` as
``/v1/models/{m}/predict``, stores the result exactly once, then acknowledges the message:

- a server that dies mid-job: its message comes back after the queue's visibility timeout and the
  job runs again (at least once; only the first finish is stored, and only it calls back);
- a message whose job is finished: acknowledged, nothing runs;
- a message whose job id is not in this catalog (a replica on another catalog, a row not yet
  visible): retried, and after ``max_deliveries`` dead-lettered with ``job_not_found``; never
  acknowledged as done.

Callbacks go through the egress policy (`security.egress`): loopback, private, link-local and
metadata addresses are refused unless ``jobs.callback_allow`` names them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import urlsplit

import orjson
from fastapi import APIRouter, Request
from pydantic import Field, field_validator
from starlette.responses import Response

from ..batching import InferenceService
from ..config import Settings
from ..db import Catalog
from ..errors import MoorageError, NotFound
from ..jobs import JobError, JobNotFound, JobStatus, JobStore, new_job_id
from ..jobs.callbacks import deliver
from ..refs import parse_ref
from ..security.egress import check_callback_url
from ..streams.brokers import Broker, Message, open_broker
from .common import FastJSON, check_count, pool_of, service_of
from .schemas import PredictRequest
from .security import Guard, authorize_model, policy_for, principal

log = logging.getLogger("moorage.jobs")
router = APIRouter(tags=["jobs"])


class JobRequest(PredictRequest):
    model: str = Field(min_length=1, max_length=200)
    callback_url: str | None = Field(None, max_length=2000)

    @field_validator("callback_url")
    @classmethod
    def _http_only(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError("callback_url must be an http:// or https:// URL")
        return value


@router.post("/v1/jobs", status_code=202)
async def create_job(body: JobRequest, request: Request) -> Response:
    """Enqueue a predict request; answers its id at once (202). Poll GET /v1/jobs/{id}."""
    settings: Settings = request.app.state.settings
    check_count(len(body.inputs), settings.serve.max_inputs, "inputs")
    policy = authorize_model(request, body.model)
    sv = pool_of(request).lookup(body.model)  # 404/400 now, not later in the job
    service_of(request).prepare(sv.task, body.inputs, body.parameters, policy=policy)  # a refused input: 4xx now
    if body.callback_url:  # a refused callback: 400 now, not a silent failure later
        await asyncio.to_thread(check_callback_url, body.callback_url, settings.jobs.callback_allow)
    runner: JobRunner = request.app.state.jobs
    job = await asyncio.to_thread(
        runner.store.create,
        body.model,
        body.model_dump(mode="json", exclude={"model", "callback_url"}),
        callback_url=body.callback_url,
        owner=principal(request).key_id,
        job_id=new_job_id(),
    )
    await runner.enqueue(job.id)
    return FastJSON(job.public(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> Response:
    """A job's status (queued, running, succeeded, failed) and, once it ended, its result or error."""
    runner: JobRunner = request.app.state.jobs
    job = await asyncio.to_thread(runner.store.get, job_id) if len(job_id) <= 64 else None
    caller = principal(request)
    if job is None or (job.owner not in (None, caller.key_id) and caller.role != "admin"):
        raise NotFound(f"no job {job_id!r}", code="job_not_found")
    return FastJSON(job.public())


class _Transient(Exception):
    """The job did not run now (the model is overloaded or not ready): retry its message."""


class JobRunner:
    """Takes job messages from the queue and runs them, `concurrency` at a time."""

    def __init__(
        self,
        settings: Settings,
        service: InferenceService,
        catalog: Catalog,
        guard: Guard | None = None,
        concurrency: int = 8,
    ) -> None:
        self.settings = settings
        self.guard = guard
        self.service = service
        self.store = JobStore(catalog.engine)
        self.queue_url = settings.stream.jobs_url or (
            f"sqlite:///{settings.home / 'jobs-queue.db'}?topic=jobs&visibility_timeout=900"
        )
        self.concurrency = concurrency
        self._broker: Broker | None = None
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._slots = asyncio.Semaphore(concurrency)

    async def start(self) -> None:
        self.settings.home.mkdir(parents=True, exist_ok=True)
        self._broker = open_broker(self.queue_url)
        await self._broker.connect()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="moorage-jobs")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._running:  # jobs already started finish; the queue still holds the rest
            await asyncio.gather(*self._running, return_exceptions=True)
        if self._broker is not None:
            await self._broker.close()

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            raise RuntimeError("the job runner is not started")
        return self._broker

    async def enqueue(self, job_id: str) -> None:
        await self.broker.publish([json.dumps({"id": job_id}).encode()])

    async def _loop(self) -> None:
        while True:
            try:
                await self.service.pool.ready.wait()
                await self._slots.acquire()
                messages = await self.broker.receive(1, 1.0)
                if not messages:
                    self._slots.release()
                    continue
                task = asyncio.get_running_loop().create_task(self._run(messages[0]))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the queue is briefly unreachable: keep the server up
                self._slots.release()
                log.warning("job queue: %s", exc)
                await asyncio.sleep(1.0)

    async def _run(self, message: Message) -> None:
        try:
            await self._handle(message)
        except Exception:  # the catalog or the queue failed: the message comes back and runs again
            log.exception("job message %s could not be handled; it will be delivered again", message.broker_id)
        finally:
            self._slots.release()

    async def _handle(self, message: Message) -> None:
        broker = self.broker
        try:
            job_id = str(orjson.loads(message.body)["id"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            await broker.dead_letter([(message, 'invalid_message: a job message is {"id": JOB_ID}')])
            return
        if message.attempts > broker.max_deliveries:
            await self._abandon(message, job_id)
            return
        try:
            job = await asyncio.to_thread(self.store.start, job_id)
        except JobNotFound:  # another catalog's job, or a row not visible yet: never acked as done
            await broker.retry([message], f"job_not_found: no job {job_id!r} in this catalog")
            return
        if job is None:  # a replay of a finished job
            await broker.ack([message])
            return
        try:
            status, result, error = await self._execute(job.model, job.request)
        except _Transient as exc:  # overloaded, or this process is not ready: another try will do
            await broker.retry([message], str(exc))
            return
        finished = await asyncio.to_thread(self.store.finish, job_id, status, result, error)
        await broker.ack([message])  # after the result is stored
        if finished is not None and finished.callback_url:
            await self._call_back(finished.id, finished.callback_url, finished.public())

    async def _execute(self, model: str, request: dict[str, Any]) -> tuple[JobStatus, dict | None, JobError | None]:
        try:
            body = PredictRequest(**request)
            policy = policy_for(self.guard, parse_ref(model).name) if self.guard else None
            outcome = await self.service.infer(
                model, body.inputs, body.parameters, policy=policy, timeout_s=body.timeout_s
            )
            result = orjson.loads(orjson.dumps(outcome.encode(), option=orjson.OPT_SERIALIZE_NUMPY))
            return JobStatus.SUCCEEDED, result, None
        except MoorageError as exc:
            if exc.status in (429, 503):
                raise _Transient(f"{exc.code}: {exc.message}") from None
            return JobStatus.FAILED, None, JobError.from_exception(exc)
        except Exception as exc:
            if not isinstance(exc, MoorageError):
                log.error("a job on %s failed", model, exc_info=exc)
            return JobStatus.FAILED, None, JobError.from_exception(exc)

    async def _abandon(self, message: Message, job_id: str) -> None:
        """Delivered too often without an outcome: dead-letter it, and fail its job (if this catalog
        knows it) so that it does not stay queued."""
        reason = f"max_deliveries: delivered {message.attempts} times"
        if message.last_error:
            reason += f"; last error: {message.last_error}"
        await self.broker.dead_letter([(message, reason)])
        error = JobError("job_abandoned", "the job could not be run; it was delivered too many times")
        try:
            await asyncio.to_thread(self.store.finish, job_id, JobStatus.FAILED, None, error)
        except JobNotFound:
            pass

    async def _call_back(self, job_id: str, url: str, payload: dict) -> None:
        jobs = self.settings.jobs
        status = await deliver(
            url, payload, allow=jobs.callback_allow, retries=jobs.callback_retries, timeout_s=jobs.callback_timeout_s
        )
        await asyncio.to_thread(self.store.set_callback_status, job_id, status)
