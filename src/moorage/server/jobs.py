"""Async inference over HTTP: ``POST /v1/jobs`` enqueues a predict request, ``GET /v1/jobs/{id}``
answers its status and result, an optional callback URL is called when it ends.

A job is a row in the catalog (``jobs`` table: every replica that shares the catalog shares the
jobs) and a message on a durable queue (the embedded SQLite queue by default, any broker URL via
``stream.jobs_url``). The runner inside each server is a stream worker over that queue with a jobs
codec and sink (`moorage.streams.jobs`): it runs each job through the same `InferenceService` as
``/v1/models/{m}/predict``, stores the result once, then acknowledges the message. Each runner has
its own id and leases the jobs it holds in their rows, renewing them every ``jobs.lease_s / 4``. A
server that dies mid-job stops renewing: once its leases expire (``jobs.lease_s``), any runner
(the restarted server, or another replica on the same catalog) puts its unfinished jobs back on
the queue and delivers the callbacks it left pending. A server restarted on the same home folder
does not wait for that: the dead runner's lock file is free (`moorage.jobs.liveness`), so it ends
that runner's leases at start-up, and on the embedded SQLite queue (whose leases name the runner)
delivers that runner's messages again at once, with them any batch it died receiving. The job
runs again; only the first finish is stored and calls back, at least once, with
``Idempotency-Key: JOB_ID``. A live replica's jobs are
never taken: its leases do not expire. A message whose job this catalog does not know is handed
back and finally dead-lettered with ``job_not_found``, never acknowledged as done.

Callbacks go through the egress policy (`security.egress`): loopback, private, link-local and
metadata addresses are refused unless ``jobs.callback_allow`` names them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from pydantic import Field, field_validator
from starlette.responses import Response

from ..batching import InferenceService
from ..config import Settings
from ..db import Catalog
from ..errors import NotFound
from ..jobs import JobError, JobStatus, JobStore, new_job_id, new_runner_id
from ..jobs.liveness import RunnerLock
from ..observability import semconv, tracing
from ..refs import parse_ref
from ..security.egress import check_callback_url
from ..streams.brokers import Broker, open_broker
from ..streams.jobs import JobCodec, JobQueue, JobSink, Leases, job_message
from ..streams.runner import worker_config
from ..streams.worker import StreamWorker
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
    job_id = new_job_id()
    # traced: a span for the creation, which the job's run (on whichever server) continues
    attributes = {semconv.REQUEST_MODEL: sv.name, semconv.JOB_ID: job_id}
    traceparent = tracing.link_point(f"create_job {sv.name}", attributes)
    job = await asyncio.to_thread(
        runner.store.create,
        body.model,
        body.model_dump(mode="json", exclude={"model", "callback_url"}),
        callback_url=body.callback_url,
        owner=principal(request).key_id,
        job_id=job_id,
        traceparent=traceparent,
    )
    try:
        await runner.enqueue(job.id)
    except Exception:  # the queue is down: the row must not wait for a message that was never sent
        await asyncio.to_thread(
            runner.store.finish,
            job.id,
            JobStatus.FAILED,
            None,
            JobError("enqueue_failed", "the job could not be queued; submit it again"),
        )
        raise
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


class JobRunner:
    """A stream worker over the jobs queue: `JobCodec` reads each job's row, the inference service
    runs it, `JobSink` stores the outcome and calls back. `concurrency` jobs per received batch."""

    def __init__(
        self,
        settings: Settings,
        service: InferenceService,
        catalog: Catalog,
        guard: Guard | None = None,
        concurrency: int = 8,
    ) -> None:
        self.settings = settings
        self.service = service
        self.store = JobStore(catalog.engine, lease_s=settings.jobs.lease_s)
        self.leases = Leases(self.store, new_runner_id())
        # The worker renews the broker leases of the messages it works on (WorkerConfig.lease_heartbeat_s),
        # and the job leases keep a duplicate delivery from running a job twice: a short visibility
        # timeout only brings a dead server's messages back sooner. The queue names this runner as the
        # consumer holding each message, so that the messages of a runner found dead are released at
        # once (`_release_messages_of`): a runner killed between receiving a batch and leasing its
        # jobs in the catalog leaves jobs that no job lease marks as held, which only that would free.
        self.queue_url = settings.stream.jobs_url or (
            f"sqlite:///{settings.home / 'jobs-queue.db'}?topic=jobs&visibility_timeout=60"
            f"&consumer={self.leases.runner_id}"
        )
        self.config = replace(worker_config(settings), batch_size=concurrency, receive_timeout_s=1.0)
        self._lock = RunnerLock(settings.home / "runners", self.leases.runner_id)
        self._broker: Broker | None = None
        self._sink = JobSink(self.store, settings.jobs, self.leases)
        self.codec = JobCodec(
            self.store, lambda model: policy_for(guard, parse_ref(model).name) if guard else None, self._sink
        )
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._leases_task: asyncio.Task | None = None

    async def start(self) -> None:
        self.settings.home.mkdir(parents=True, exist_ok=True)
        self._broker = JobQueue(open_broker(self.queue_url), self.leases)
        await self._broker.connect()
        await self._end_leases_of_dead_runners()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="moorage-jobs")
        self._leases_task = loop.create_task(self._tend_leases(), name="moorage-job-leases")

    async def _end_leases_of_dead_runners(self) -> None:
        """A runner that shared this home and is gone (its lock file is free) holds nothing: end its
        leases now, so that a restarted server reclaims its jobs at once, not lease_s later."""
        try:
            await asyncio.to_thread(self._lock.acquire)
            for runner_id in await asyncio.to_thread(self._lock.dead_runners):
                num_leases = await asyncio.to_thread(self.store.expire, runner_id)
                log.warning("job runner %s has stopped; its %d job leases end now", runner_id, num_leases)
                await self._release_messages_of(runner_id)
        except Exception as exc:  # its leases still expire on their own
            log.warning("could not check which job runners of this home are alive: %s", exc)

    async def _release_messages_of(self, runner_id: str) -> None:
        """The queue messages a dead runner holds are delivered again now, not once its visibility
        timeout ends (where the queue can tell its consumers apart: the embedded SQLite queue)."""
        release = getattr(self.broker.inner, "release_consumer", None) if isinstance(self.broker, JobQueue) else None
        if release is None:
            return
        try:
            if num_messages := await release(runner_id):
                log.warning("job runner %s has stopped; its %d queue messages are delivered again", runner_id,
                            num_messages)  # fmt: skip
        except Exception as exc:  # they come back when their visibility timeout ends
            log.warning("could not release the queue messages of job runner %s: %s", runner_id, exc)

    async def _tend_leases(self) -> None:
        """Renew this runner's leases and reclaim expired ones, at start-up and every lease_s / 4, until
        `stop` cancels it once the worker and the callbacks have finished: while it stops, the runner
        keeps its leases and takes no new work."""
        interval = self.settings.jobs.lease_s / 4
        while True:
            try:
                if self._stop.is_set():
                    await self.leases.renew()
                elif reclaimed := await self.leases.tend(self.enqueue, self._sink.call_back, self._release_messages_of):
                    log.warning("reclaimed %d jobs whose runner stopped renewing its leases", reclaimed)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the catalog or the queue is down: the next round tries again
                log.warning("could not renew or reclaim job leases: %s", exc)
            await asyncio.sleep(interval)

    async def _run(self) -> None:
        """The worker, restarted (with a pause) if it ever fails: jobs must not silently stop running."""
        await self.service.pool.ready.wait()  # jobs wait for the models, they do not fail for them
        while not self._stop.is_set():
            worker = StreamWorker(self.broker, self._sink, self.service, "", self.config, codec=self.codec)
            try:
                await worker.run(self._stop)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the job runner failed; restarting it")
                # what the failed worker held comes back through the broker; renewing it would keep
                # other runners from it, so let those leases run out
                self.leases.forget()
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=1.0)
                except TimeoutError:
                    pass

    async def stop(self) -> None:
        """Jobs already received finish and are stored; the queue keeps the rest for the next server."""
        self._stop.set()
        if self._task is not None:
            if not self.service.pool.ready.is_set():
                self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=self.settings.serve.graceful_timeout_s)
            if not done:  # e.g. the queue is unreachable and the worker keeps retrying it
                log.warning("the job runner did not stop in time; its unacknowledged jobs will be delivered again")
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        await self._sink.close()
        if self._leases_task is not None:
            self._leases_task.cancel()
            await asyncio.gather(self._leases_task, return_exceptions=True)
        try:  # what is left (a worker that did not stop in time) is another runner's at once
            await asyncio.to_thread(self.store.expire, self.leases.runner_id)
        except Exception as exc:
            log.warning("could not end this runner's job leases; they expire in %.0f s: %s", self.store.lease_s, exc)
        self._lock.release()
        if self._broker is not None:
            await self._broker.close()

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            raise RuntimeError("the job runner is not started")
        return self._broker

    async def enqueue(self, job_id: str) -> None:
        await self.broker.publish([job_message(job_id)])
