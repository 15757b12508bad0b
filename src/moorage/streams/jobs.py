"""Jobs over the stream worker: a codec that turns a job message into the job's work, and a sink that
stores each outcome in the job's row and then calls its callback.

A job message is ``{"id": JOB_ID}``; the job itself (model, inputs, parameters, callback) is a row
in the catalog (`moorage.jobs.JobStore`), so every replica sharing the catalog can run any job:

- a job this catalog does not know is handed back to the broker (``job_not_found``), and after
  ``max_deliveries`` dead-lettered: never acknowledged as done;
- a finished job (a redelivered message) is acknowledged and nothing runs;
- what the model or the policy refuses ends the job ``failed`` with the error's code and message;
  other errors are retried, then handed back, and a job delivered too often fails ``job_abandoned``;
- a result is stored once (`JobStore.finish` keeps only the first) and only that first finish calls
  back, after the row is written.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import orjson

from ..batching import Outcome, Result
from ..config import JobSettings
from ..errors import MoorageError
from ..jobs import Job, JobError, JobNotFound, JobStatus, JobStore
from ..security.policy import Policy
from .brokers import Message
from .sinks import Row, Sink
from .worker import GiveBack, Poison, Request, Skip, Work

log = logging.getLogger("moorage.jobs")


def job_id_of(message: Message) -> str:
    try:
        body = orjson.loads(message.body)
        return str(body["id"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise Poison('invalid_message: a job message is {"id": JOB_ID}') from None


class JobCodec:
    """Job messages: the work is in the job's catalog row; the row written is the job's outcome."""

    def __init__(
        self, store: JobStore, policy_for: Callable[[str], Policy | None], sink: JobSink | None = None
    ) -> None:
        self.store = store
        self.policy_for = policy_for
        self.sink = sink  # calls back the jobs this codec fails itself (abandoned ones)

    async def decode(self, message: Message) -> Work:
        job_id = job_id_of(message)
        try:
            job = await asyncio.to_thread(self.store.start, job_id)
        except JobNotFound:  # another catalog's job, or a row not visible yet
            raise GiveBack(f"job_not_found: no job {job_id!r} in this catalog") from None
        if job is None:  # a replay of a finished job
            raise Skip()
        request = job.request
        return Work(
            id=job.id,
            model=job.model,
            inputs=list(request.get("inputs") or []),
            parameters=request.get("parameters") or None,
            policy=self.policy_for(job.model),
            timeout_s=request.get("timeout_s"),
            context=job,
        )

    def row(self, req: Request, results: list[Result]) -> Row:
        sv = req.sv
        assert sv is not None
        outcome = Outcome(sv.name, sv.version, sv.task, results).encode()
        result = orjson.loads(orjson.dumps(outcome, option=orjson.OPT_SERIALIZE_NUMPY))  # JSON for the row
        return {"id": req.work.id, "status": JobStatus.SUCCEEDED.value, "result": result}

    def rejected(self, req: Request, exc: MoorageError) -> Row | None:
        return {"id": req.work.id, "status": JobStatus.FAILED.value, "error": JobError.from_exception(exc).as_dict()}

    async def abandon(self, message: Message, reason: str) -> None:
        try:
            job_id = job_id_of(message)
        except Poison:
            return
        error = JobError("job_abandoned", "the job could not be run; it was delivered too many times")
        try:
            job = await asyncio.to_thread(self.store.finish, job_id, JobStatus.FAILED, None, error)
        except JobNotFound:
            return
        if job is not None and self.sink is not None:
            self.sink.call_back(job)


class JobSink(Sink):
    """Stores each outcome in its job's row (first finish only), then delivers the callbacks of the
    jobs it finished, in the background (bounded retries; `close` waits for them)."""

    def __init__(self, store: JobStore, settings: JobSettings) -> None:
        self.store = store
        self.settings = settings
        self._callbacks: set[asyncio.Task] = set()

    async def write(self, rows: Sequence[Row]) -> None:
        """Finish each row's job; a job this write finished is called back at once, so a later row
        that fails (the write is then retried) cannot cost it its callback."""
        for row in rows:
            status = JobStatus(row["status"])
            error = JobError(**row["error"]) if row.get("error") else None
            try:
                job = await asyncio.to_thread(self.store.finish, row["id"], status, row.get("result"), error)
            except JobNotFound:  # removed meanwhile: nothing to record
                continue
            if job is not None:
                self.call_back(job)

    def call_back(self, job: Job) -> None:
        """Deliver a finished job to its callback URL, if it has one, in the background."""
        if job.callback_url:
            task = asyncio.ensure_future(self._call_back(job))
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)

    async def _call_back(self, job: Job) -> None:
        from ..jobs.callbacks import deliver  # the serve extra (httpx, tenacity)

        assert job.callback_url is not None
        settings = self.settings
        status = await deliver(
            job.callback_url,
            job.public(),
            allow=settings.callback_allow,
            retries=settings.callback_retries,
            timeout_s=settings.callback_timeout_s,
        )
        try:
            await asyncio.to_thread(self.store.set_callback_status, job.id, status)
        except Exception:  # the row stays without a callback status; the job itself is finished
            log.exception("could not record the callback status of %s", job.id)

    async def close(self) -> None:
        if self._callbacks:
            await asyncio.gather(*self._callbacks, return_exceptions=True)
