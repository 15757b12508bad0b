"""Jobs over the stream worker: a codec that turns a job message into the job's work, a sink that
stores each outcome in the job's row and then calls its callback, the jobs queue as the worker sees
it, and the leases that let another runner take over what a dead one left.

A job message is ``{"id": JOB_ID}``; the job itself (model, inputs, parameters, callback) is a row
in the catalog (`moorage.jobs.JobStore`), so every replica sharing the catalog can run any job:

- a job this catalog does not know is handed back to the broker (``job_not_found``), and after
  ``max_deliveries`` dead-lettered: never acknowledged as done;
- a finished job (a redelivered message) is acknowledged and nothing runs, and so is a job that a
  live lease of another runner holds (a duplicate message: that runner finishes it, or its lease
  is reclaimed);
- what the model or the policy refuses ends the job ``failed`` with the error's code and message;
  other errors are retried, then handed back, and a job delivered too often fails ``job_abandoned``;
- a result is stored once (`JobStore.finish` keeps only the first) and only that first finish calls
  back. The finish marks the callback pending in the same UPDATE, before the message is
  acknowledged, so a crash between the two costs no callback: the job's lease expires and whoever
  reclaims it delivers the callback (at least once, ``Idempotency-Key: JOB_ID``).

Leases (`Leases`): every job whose message this runner receives is started and leased to it in its
row, one catalog transaction for the batch (`JobQueue.receive`), renewed while the runner works on
it or calls it back, and released when its message goes back to the broker (the job is ``queued``
again, not ``running``). `Leases.tend`, run every ``lease_s / 4`` by the job runner, renews them
and reclaims the expired leases of runners that died: an unfinished job gets a new queue message, a
pending callback is delivered here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from ..batching import Outcome, Result
from ..config import JobSettings
from ..errors import MoorageError
from ..jobs import CALLBACK_PENDING, Job, JobError, JobNotFound, JobStatus, JobStore
from ..security.policy import Policy
from .brokers import Broker, DeadLetter, Message, ReplyHandler, ReplyInbox
from .sinks import Row, Sink
from .worker import GiveBack, Poison, Request, Skip, Work

log = logging.getLogger("moorage.jobs")


def job_id_of(message: Message) -> str:
    try:
        body = orjson.loads(message.body)
        return str(body["id"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise Poison('invalid_message: a job message is {"id": JOB_ID}') from None


def job_message(job_id: str) -> bytes:
    return orjson.dumps({"id": job_id})


def _job_ids(messages: Sequence[Message]) -> list[str]:
    ids = []
    for m in messages:
        try:
            ids.append(job_id_of(m))
        except Poison:  # not a job message: no row to lease
            continue
    return ids


class Leases:
    """The jobs one runner (`runner_id`) holds: those whose messages it works on (`working`) and the
    finished ones whose callbacks it delivers (`calling`). Only these are renewed, so a job the
    runner lost track of (a worker that failed) is not held forever: its lease expires."""

    def __init__(self, store: JobStore, runner_id: str) -> None:
        self.store = store
        self.runner_id = runner_id
        self.working: set[str] = set()
        self.calling: set[str] = set()
        self.received: dict[str, Job] = {}  # started as their batch was received, not decoded yet

    def settled(self, job_ids: Sequence[str]) -> None:
        """This runner's work on these jobs' messages is over (acknowledged, handed back, dead-lettered)."""
        self.working.difference_update(job_ids)
        for job_id in job_ids:
            self.received.pop(job_id, None)

    def forget(self) -> None:
        """A worker that failed: what it held comes back through the broker."""
        self.working.clear()
        self.received.clear()

    async def renew(self) -> None:
        await asyncio.to_thread(self.store.renew, self.working | self.calling, self.runner_id)

    async def tend(
        self,
        publish: Callable[[str], Awaitable[None]],
        call_back: Callable[[Job], None],
        gone: Callable[[str], Awaitable[None]] | None = None,
    ) -> int:
        """Renew this runner's leases, then reclaim every expired one: `publish(job_id)` (awaitable)
        queues an unfinished job again, `call_back(job)` delivers a pending callback, and `gone(runner_id)`
        (awaitable, once per runner) is told of each other runner whose leases it took. Answers how
        many jobs it reclaimed. Another runner reclaiming the same job first is not an error."""
        store = self.store
        await self.renew()
        dead: set[str] = set()
        num_reclaimed, taken_this_round = 0, True
        while taken_this_round:  # rounds of up to 100, until one finds nothing left to take
            taken_this_round = False
            for job in await asyncio.to_thread(store.expired):
                taken = await asyncio.to_thread(store.reclaim, job, self.runner_id)
                if taken is None:  # another runner was first, or the holder renewed meanwhile
                    continue
                num_reclaimed, taken_this_round = num_reclaimed + 1, True
                if job.runner_id is not None and job.runner_id != self.runner_id:
                    dead.add(job.runner_id)
                if taken.is_finished:
                    call_back(taken)
                else:  # the dead runner's message stays hidden until its broker lease ends: a new one
                    await self._publish(taken.id, publish)
        if gone is not None:  # e.g. its queue messages are delivered again now, not when they time out
            for runner_id in sorted(dead):
                await gone(runner_id)
        return num_reclaimed

    async def _publish(self, job_id: str, publish: Callable[[str], Awaitable[None]]) -> None:
        try:
            await publish(job_id)
        except BaseException:
            # The job is queued with no message this runner published: lease it without renewing it,
            # so that it expires again and the next round (here or on another runner) publishes anew.
            await asyncio.to_thread(self.store.claim, [job_id], self.runner_id)
            raise


class JobCodec:
    """Job messages: the work is in the job's catalog row; the row written is the job's outcome."""

    def __init__(
        self,
        store: JobStore,
        policy_for: Callable[[str], Policy | None],
        sink: JobSink,
    ) -> None:
        self.store = store
        self.policy_for = policy_for
        self.sink = sink  # calls back the jobs this codec fails itself (abandoned ones)
        self.leases = sink.leases

    async def decode(self, message: Message) -> Work:
        job_id = job_id_of(message)
        # started with the rest of its batch when it was received (`JobQueue.receive`); otherwise
        # (unknown, finished, another runner's, or a second message of the job) its own start tells
        job = self.leases.received.pop(job_id, None)
        try:
            if job is None:
                job = await asyncio.to_thread(self.store.start, job_id, self.leases.runner_id)
        except JobNotFound:  # another catalog's job, or a row not visible yet
            raise GiveBack(f"job_not_found: no job {job_id!r} in this catalog") from None
        if job is None:  # a replay of a finished job, or a duplicate of one another runner holds
            raise Skip()
        self.leases.working.add(job.id)
        request = job.request
        return Work(
            id=job.id,
            model=job.model,
            inputs=list(request.get("inputs") or []),
            parameters=request.get("parameters") or None,
            policy=self.policy_for(job.model),
            timeout_s=request.get("timeout_s"),
            context=job,
            traceparent=job.traceparent,
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
            job = await asyncio.to_thread(
                self.store.finish, job_id, JobStatus.FAILED, None, error, self.leases.runner_id
            )
        except JobNotFound:
            return
        if job is not None:
            self.sink.call_back(job, just_finished=True)


class JobSink(Sink):
    """Stores each outcome in its job's row (first finish only), then delivers the callbacks of the
    jobs it finished, in the background (bounded retries; `close` waits for them)."""

    def __init__(self, store: JobStore, settings: JobSettings, leases: Leases) -> None:
        self.store = store
        self.settings = settings
        self.leases = leases
        self._callbacks: set[asyncio.Task] = set()
        self._http: Any = None  # one client for every delivery: making one costs ~16 ms of the loop's CPU

    def _client(self) -> Any:
        import httpx

        from ..jobs.callbacks import USER_AGENT

        if self._http is None or self._http.is_closed:
            self._http = httpx.AsyncClient(
                follow_redirects=False,
                trust_env=False,
                headers={"User-Agent": USER_AGENT},
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=20),
            )
        return self._http

    async def write(self, rows: Sequence[Row]) -> None:
        """Finish the rows' jobs in one catalog transaction (all or none), then call back the jobs it
        finished (one already finished or removed meanwhile is left alone)."""
        outcomes = [
            (
                row["id"],
                JobStatus(row["status"]),
                row.get("result"),
                JobError(**row["error"]) if row.get("error") else None,
            )
            for row in rows
        ]
        for job in await asyncio.to_thread(self.store.finish_many, outcomes, self.leases.runner_id):
            self.call_back(job, just_finished=True)

    def call_back(self, job: Job, just_finished: bool = False) -> None:
        """Deliver a finished job's pending callback (leased to this runner), in the background.
        `just_finished`: `job` is what this runner's finish returned, which counted the delivery."""
        if job.callback_url and job.callback_status == CALLBACK_PENDING:
            self.leases.calling.add(job.id)
            task = asyncio.ensure_future(self._call_back(job, just_finished))
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)

    async def _call_back(self, job: Job, just_finished: bool) -> None:
        from ..jobs.callbacks import deliver, idempotency_headers  # the serve extra (httpx, tenacity)

        assert job.callback_url is not None
        settings, leases = self.settings, self.leases
        try:
            delivery: int | None = job.callback_attempts
            if not just_finished:  # reclaimed: count this delivery, unless another runner took it over
                delivery = await asyncio.to_thread(self.store.begin_callback, job.id, leases.runner_id)
            if delivery is None:  # another runner took the callback over (this one was too slow)
                return
            status = await deliver(
                job.callback_url,
                job.public(),
                allow=settings.callback_allow,
                retries=settings.callback_retries,
                timeout_s=settings.callback_timeout_s,
                client=self._client(),
                headers=idempotency_headers(job.id, delivery),
            )
            await asyncio.to_thread(self.store.set_callback_status, job.id, status)
        except Exception:  # still pending: once the lease expires a runner delivers it again
            log.exception("the callback of %s stays pending", job.id)
        finally:
            leases.calling.discard(job.id)

    async def close(self) -> None:
        while self._callbacks:  # including any a reclaim started meanwhile
            await asyncio.gather(*self._callbacks, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()


class JobQueue(Broker):
    """The jobs queue as the stream worker sees it: `inner`'s messages, with each job's lease kept in
    step with its message. A received batch's jobs are started and leased to this runner at once, in
    one catalog transaction (so a crash with a batch received leaves every job of it reclaimable); a
    message handed back to the broker puts its job back to ``queued``; an acknowledged or dead-lettered
    message ends the runner's work on its job (a pending callback stays leased until it is delivered)."""

    def __init__(self, inner: Broker, leases: Leases) -> None:
        super().__init__(inner.url)
        # class attributes of each backend; metrics and request/reply go by the real broker's
        setattr(self, "scheme", inner.scheme)  # noqa: B010
        setattr(self, "supports_reply", inner.supports_reply)  # noqa: B010
        self.inner = inner
        self.leases = leases

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def publish(self, bodies: Sequence[bytes], topic: str | None = None, headers: dict | None = None) -> None:
        await self.inner.publish(bodies, topic, headers)

    async def receive(self, max_messages: int, timeout_s: float) -> list[Message]:
        """The next messages, their jobs started and leased to this runner in one catalog transaction
        (`JobStore.start_many`; `JobCodec.decode` then reads each job from `Leases.received`)."""
        messages = await self.inner.receive(max_messages, timeout_s)
        ids = _job_ids(messages)
        if ids:
            leases = self.leases
            try:
                started = await asyncio.to_thread(leases.store.start_many, ids, leases.runner_id)
            except Exception as exc:  # each job's start tries again (and hands its message back if it fails)
                log.warning("could not start the jobs just received: %s", exc)
            else:
                leases.working.update(started)
                leases.received.update(started)
        return messages

    async def ack(self, messages: Sequence[Message]) -> None:
        await self.inner.ack(messages)
        self.leases.settled(_job_ids(messages))

    async def extend(self, messages: Sequence[Message]) -> None:
        await self.inner.extend(messages)

    async def retry(self, messages: Sequence[Message], reason: str, delay_s: float = 1.0) -> None:
        ids = _job_ids(messages)
        leases = self.leases
        try:
            await asyncio.to_thread(leases.store.release, ids, leases.runner_id)
        except Exception as exc:  # the rows stay running until their leases expire and are reclaimed
            log.warning("could not put %d handed-back jobs back to queued: %s", len(ids), exc)
        leases.settled(ids)
        await self.inner.retry(messages, reason, delay_s)

    async def dead_letter(self, entries: Sequence[tuple[Message, str]]) -> None:
        await self.inner.dead_letter(entries)
        self.leases.settled(_job_ids([m for m, _ in entries]))

    def is_stale(self, message: Message) -> bool:
        is_stale = getattr(self.inner, "is_stale", None)  # the real broker's, where it has one
        return bool(is_stale(message)) if is_stale is not None else False

    async def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        return await self.inner.dead_letters(limit)

    async def lag(self) -> int | None:
        return await self.inner.lag()

    async def reply(self, message: Message, body: bytes) -> None:
        await self.inner.reply(message, body)

    async def open_replies(self, on_reply: ReplyHandler) -> ReplyInbox:
        return await self.inner.open_replies(on_reply)
