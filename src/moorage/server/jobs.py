"""Async inference over HTTP: ``POST /v1/jobs`` enqueues a predict request, ``GET /v1/jobs/{id}``
answers its status and result, an optional callback URL is called when it ends.

A job is a row in a SQL table (status, request, result) and a message on a durable queue (the
embedded SQLite queue by default, any broker URL via ``stream.jobs_url``). A runner inside the
server takes jobs from the queue, runs them through the same engine as ``/v1/models/{m}/predict``,
stores the result, then acknowledges the message: a server that dies mid-job runs it again after
the queue's visibility timeout, and one that finds a finished job on redelivery only acknowledges.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
import uuid
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from fastapi import APIRouter, Request
from pydantic import Field, field_validator
from starlette.responses import Response

from ..batching import InferenceService
from ..config import Settings
from ..errors import MoorageError, NotFound
from ..refs import parse_ref
from ..streams.brokers import Broker, open_broker
from .common import FastJSON, check_count, pool_of, service_of
from .schemas import PredictRequest
from .security import Guard, authorize_model, policy_for, principal

log = logging.getLogger("moorage.jobs")
router = APIRouter(tags=["jobs"])
JOB_ID_PREFIX = "job-"


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


class JobStore:
    """Jobs in a SQL table (SQLite file in the home folder by default)."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url, pool_pre_ping=True)
        meta = sa.MetaData()
        self.jobs = sa.Table(
            "jobs",
            meta,
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("model", sa.String(200), nullable=False),
            sa.Column("status", sa.String(16), nullable=False),  # queued, running, succeeded, failed
            sa.Column("request", sa.JSON, nullable=False),
            sa.Column("result", sa.JSON),
            sa.Column("error", sa.JSON),
            sa.Column("callback_url", sa.String(2000)),
            sa.Column("callback_status", sa.String(200)),
            sa.Column("attempts", sa.Integer, nullable=False, default=0),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("started_at", sa.Float),
            sa.Column("finished_at", sa.Float),
            sa.Column("owner", sa.String(64)),  # the API key id that created it: only it (or an admin) reads it
        )
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", lambda conn, _: conn.execute("PRAGMA journal_mode=WAL"))
        meta.create_all(self.engine)
        if "owner" not in {c["name"] for c in sa.inspect(self.engine).get_columns("jobs")}:  # a jobs.db from 0.3
            with self.engine.begin() as conn:
                conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN owner VARCHAR(64)"))

    def create(self, job_id: str, body: JobRequest, owner: str | None = None) -> dict:
        row = {
            "id": job_id,
            "model": body.model,
            "status": "queued",
            "request": body.model_dump(exclude={"model", "callback_url"}),
            "callback_url": body.callback_url,
            "attempts": 0,
            "created_at": time.time(),
            "owner": owner,
        }
        with self.engine.begin() as conn:
            conn.execute(self.jobs.insert(), row)
        return row

    def get(self, job_id: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(self.jobs).where(self.jobs.c.id == job_id)).mappings().first()
        return dict(row) if row else None

    def update(self, job_id: str, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.jobs.update().where(self.jobs.c.id == job_id).values(**values))

    def close(self) -> None:
        self.engine.dispose()


def public(job: dict) -> dict:
    keys = ("id", "model", "status", "result", "error", "created_at", "started_at", "finished_at", "callback_status")
    return {k: job.get(k) for k in keys}


@router.post("/v1/jobs", status_code=202)
async def create_job(body: JobRequest, request: Request) -> Response:
    """Enqueue a predict request; answers its id at once (202). Poll GET /v1/jobs/{id}."""
    settings: Settings = request.app.state.settings
    check_count(len(body.inputs), settings.serve.max_inputs, "inputs")
    policy = authorize_model(request, body.model)
    sv = pool_of(request).lookup(body.model)  # 404/400 now, not later in the job
    service_of(request).prepare(sv.task, body.inputs, body.parameters, policy=policy)  # a refused input: 4xx now
    runner: JobRunner = request.app.state.jobs
    job_id = JOB_ID_PREFIX + uuid.uuid4().hex
    job = await asyncio.to_thread(runner.store.create, job_id, body, principal(request).key_id)
    await runner.enqueue(job_id)
    return FastJSON(public(job), status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> Response:
    """A job's status (queued, running, succeeded, failed) and, once it ended, its result or error."""
    runner: JobRunner = request.app.state.jobs
    job = await asyncio.to_thread(runner.store.get, job_id) if len(job_id) <= 64 else None
    caller = principal(request)
    if job is None or (job.get("owner") not in (None, caller.key_id) and caller.role != "admin"):
        raise NotFound(f"no job {job_id!r}", code="job_not_found")
    return FastJSON(public(job))


class JobRunner:
    """Takes jobs from the queue and runs them, `concurrency` at a time."""

    def __init__(
        self, settings: Settings, service: InferenceService, guard: Guard | None = None, concurrency: int = 8
    ) -> None:
        home = settings.home
        self.settings = settings
        self.guard = guard
        self.service = service
        self.pool = service.pool
        self.store = JobStore(f"sqlite:///{home / 'jobs.db'}")
        self.queue_url = settings.stream.jobs_url or f"sqlite:///{home / 'jobs.db'}?topic=jobs&visibility_timeout=900"
        self.concurrency = concurrency
        self._broker: Broker | None = None
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._slots = asyncio.Semaphore(concurrency)

    async def start(self) -> None:
        home = self.settings.home
        home.mkdir(parents=True, exist_ok=True)
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
        await asyncio.to_thread(self.store.close)

    async def enqueue(self, job_id: str) -> None:
        await self._broker.publish([json.dumps({"id": job_id}).encode()])

    async def _loop(self) -> None:
        while True:
            try:
                await self.pool_ready()
                await self._slots.acquire()
                messages = await self._broker.receive(1, 1.0)
                if not messages:
                    self._slots.release()
                    continue
                task = asyncio.get_running_loop().create_task(self._run(messages[0]))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the queue is briefly unreachable: keep the server up
                log.warning("job queue: %s", exc)
                await asyncio.sleep(1.0)

    async def pool_ready(self) -> None:
        while not self.pool.is_ready:
            await asyncio.sleep(0.2)

    async def _run(self, message) -> None:
        try:
            job_id = json.loads(message.body)["id"]
            job = await asyncio.to_thread(self.store.get, job_id)
            if job is None or job["status"] in ("succeeded", "failed"):  # a replay of a finished job
                await self._broker.ack([message])
                return
            await asyncio.to_thread(
                self.store.update, job_id, status="running", started_at=time.time(), attempts=job["attempts"] + 1
            )
            update = await self._execute(job)
            await asyncio.to_thread(self.store.update, job_id, finished_at=time.time(), **update)
            await self._broker.ack([message])  # after the result is stored
            if job["callback_url"]:
                status = await asyncio.to_thread(self._callback, job["callback_url"], public(self.store.get(job_id)))
                await asyncio.to_thread(self.store.update, job_id, callback_status=status)
        except Exception:
            log.exception("job message %s could not be handled; it will be delivered again", message.broker_id)
        finally:
            self._slots.release()

    async def _execute(self, job: dict) -> dict:
        try:
            body = PredictRequest(**job["request"])
            policy = policy_for(self.guard, parse_ref(job["model"]).name) if self.guard else None
            outcome = await self.service.infer(
                job["model"], body.inputs, body.parameters, policy=policy, timeout_s=body.timeout_s
            )
            return {"status": "succeeded", "result": _jsonable(outcome.encode())}
        except MoorageError as exc:
            return {"status": "failed", "error": {"code": exc.code, "message": exc.message}}
        except Exception as exc:
            log.error("job %s failed", job["id"], exc_info=exc)
            return {"status": "failed", "error": {"code": "internal_error", "message": "the job failed"}}

    @staticmethod
    def _callback(url: str, job: dict, attempts: int = 3) -> str:
        """POST the finished job as JSON to its callback URL (a few tries); returns what happened."""
        data = json.dumps(job).encode()
        last = ""
        for attempt in range(attempts):
            req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - http(s) checked at POST
                    return f"delivered: HTTP {resp.status}"
            except Exception as exc:
                last = f"failed: {type(exc).__name__}: {exc}"[:200]
                time.sleep(0.5 * 2**attempt)
        return last


def _jsonable(value: Any) -> Any:
    import orjson

    return orjson.loads(orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY))
