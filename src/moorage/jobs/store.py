"""Job rows in the catalog database (table ``jobs``, migrations 0003, 0004 and 0006).

Every server replica that shares a catalog shares its jobs, so whichever replica receives a job's
queue message finds its row. A job moves ``queued -> running -> succeeded | failed``:

- A runner (one per server process, named by a `new_runner_id`) *leases* the jobs it works on: the
  row names the runner and when its lease ends (``lease_s`` after the last renewal). `claim` and
  `start` take a job only if no live lease of another runner holds it, so a duplicate message of a
  job that a live replica is running changes nothing. The runner renews its leases (`renew`) while
  it works; a runner that died stops renewing, and once its leases have expired any runner takes
  those jobs back (`expired`, `reclaim`): an unfinished job goes back to ``queued`` for a new queue
  message, a finished job whose callback was not delivered gets a new deliverer.
- `JobStore.start` is at-least-once: it moves a queued job, or a running job whose lease is this
  runner's or has expired, to running and counts the attempt.
- `JobStore.finish` is exactly-once: only the first finish of a job stores its status, result or
  error; any later one (a redelivered message whose first run did finish, a racing replica)
  changes nothing and returns None. When the job has a callback URL, the same UPDATE marks its
  callback ``pending`` and leases it to the finishing runner, so a callback that a crash kept from
  being delivered is delivered by whoever reclaims the lease: callbacks are at-least-once, each
  delivery counted in ``callback_attempts`` (`begin_callback`).

Each job has a ``kind``: ``inference`` jobs (``POST /v1/jobs``) travel as broker messages and are
the only ones this store's `expired` hands back to the inference runners; the other kinds
(training, evaluation, batch) are taken straight from the table by workers (`moorage.jobs.queue`),
highest ``priority`` first. A job can also end ``cancelled``.

Both tell an unknown job id apart from a finished job: unknown raises `JobNotFound`, finished
returns None. The store works on the catalog's engine (``registry.catalog.engine``), SQLite or
PostgreSQL; its transitions are single conditional UPDATEs, so they need no lock beyond the row's.
Lease times are the runners' clocks (UTC): replicas' clocks must agree to well within ``lease_s``.
A job's error is only ever a stable code and a message written for the caller (`JobError`), never
the text of an internal exception.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import OperationalError

from ..db import Base, CatalogUnavailable, as_utc, utcnow
from ..errors import MoorageError, NotFound

log = logging.getLogger("moorage.catalog")

JOB_ID_PREFIX = "job-"
MAX_CALLBACK_STATUS = 200
CALLBACK_PENDING = "pending"  # finished, callback not delivered yet (a runner holds its lease)
DEFAULT_LEASE_S = 20.0


TRACEPARENT_KEY = "traceparent"  # in a job's request column: the trace of the request that created it


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


UNFINISHED = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
INFERENCE = "inference"  # the kind of the jobs that POST /v1/jobs creates and broker messages carry

jobs_table = sa.Table(
    "jobs",
    Base.metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("request", sa.JSON, nullable=False),
    sa.Column("result", sa.JSON, nullable=True),
    sa.Column("error", sa.JSON, nullable=True),  # {"code": ..., "message": ...} only
    sa.Column("callback_url", sa.String(2000), nullable=True),
    sa.Column("callback_status", sa.String(MAX_CALLBACK_STATUS), nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),  # of the latest attempt
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("owner", sa.String(64), nullable=True),  # the API key id that created it
    sa.Column("runner_id", sa.String(64), nullable=True),  # the runner holding (or last holding) it
    sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True, index=True),  # None: not held
    sa.Column("callback_attempts", sa.Integer, nullable=False, default=0),
    sa.Column("kind", sa.String(32), nullable=False, default=INFERENCE, server_default=INFERENCE),
    sa.Column("priority", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column("progress", sa.JSON, nullable=True),  # the latest progress report of a running job
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False, server_default=sa.false()),
    sa.Index("ix_jobs_queue", "kind", "status", "priority", "created_at"),
)

# What the inference runners' UPDATEs read back: not a work job's progress report or cancel flag
# (the work queue reads those with `get`). With them in RETURNING, a restarted server's runner was
# seen to stall on its last batch of reclaimed jobs (tests/faults/test_job_crash.py), every time.
_RETURNED = [c for c in jobs_table.c if c.name not in ("progress", "cancel_requested")]

job_logs_table = sa.Table(
    "job_logs",
    Base.metadata,
    sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),  # 1, 2, ... per job
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("line", sa.Text, nullable=False),
)


class JobNotFound(NotFound):
    """No job with this id in the catalog (HTTP 404)."""

    code = "job_not_found"


@dataclass(frozen=True)
class JobError:
    """Why a job failed, as its caller reads it: a stable code and a message, nothing internal."""

    code: str
    message: str

    @classmethod
    def from_exception(cls, exc: BaseException) -> JobError:
        """A `MoorageError` keeps its code and message; anything else is an opaque internal error
        (log its traceback where it is caught: it never reaches the job row)."""
        if isinstance(exc, MoorageError):
            return cls(exc.code, exc.client_message)
        return cls("internal_error", "the job failed")

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


Outcome = tuple[str, JobStatus, Mapping[str, Any] | None, JobError | None]
"""What `JobStore.finish_many` stores for one job: its id, status, result and error."""


@dataclass(frozen=True)
class Job:
    """One job row. Times are timezone-aware UTC datetimes."""

    id: str
    model: str
    status: JobStatus
    request: dict[str, Any]
    result: dict[str, Any] | None
    error: JobError | None
    callback_url: str | None
    callback_status: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    owner: str | None
    runner_id: str | None = None
    lease_expires_at: datetime | None = None
    callback_attempts: int = 0
    kind: str = INFERENCE
    priority: int = 0
    progress: dict[str, Any] | None = None
    cancel_requested: bool = False

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def traceparent(self) -> str | None:
        """The W3C traceparent of the request that created the job, if it was traced: the job's run
        continues that trace, on whichever server runs it. Kept in the request column (a key the
        predict request has no field for), so no migration was needed."""
        value = self.request.get(TRACEPARENT_KEY)
        return value if isinstance(value, str) else None

    def public(self) -> dict[str, Any]:
        """What the job's caller sees, in ``GET /v1/jobs/{id}`` and in the callback's body (JSON-ready;
        times in seconds since the epoch). Never the request, the owner or the callback URL."""
        return {
            "id": self.id,
            "model": self.model,
            "status": self.status.value,
            "result": self.result,
            "error": self.error.as_dict() if self.error else None,
            "created_at": self.created_at.timestamp(),
            "started_at": self.started_at.timestamp() if self.started_at else None,
            "finished_at": self.finished_at.timestamp() if self.finished_at else None,
            "callback_status": self.callback_status,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any] | sa.RowMapping) -> Job:
        error = row["error"]
        return cls(
            id=row["id"],
            model=row["model"],
            status=JobStatus(row["status"]),
            request=row["request"],
            result=row["result"],
            error=JobError(str(error.get("code")), str(error.get("message"))) if error else None,
            callback_url=row["callback_url"],
            callback_status=row["callback_status"],
            attempts=row["attempts"],
            created_at=as_utc(row["created_at"]),
            started_at=as_utc(row["started_at"]) if row["started_at"] else None,
            finished_at=as_utc(row["finished_at"]) if row["finished_at"] else None,
            owner=row["owner"],
            runner_id=row["runner_id"],
            lease_expires_at=as_utc(row["lease_expires_at"]) if row["lease_expires_at"] else None,
            callback_attempts=row["callback_attempts"],
            kind=row.get("kind") or INFERENCE,
            priority=row.get("priority") or 0,
            progress=row.get("progress"),
            cancel_requested=bool(row.get("cancel_requested")),
        )


def new_job_id() -> str:
    """A fresh job id: ``job-`` and 32 hex digits."""
    return JOB_ID_PREFIX + uuid.uuid4().hex


def new_runner_id() -> str:
    """A fresh runner id for one server process: its host, its pid and 8 random hex digits (a pid
    is reused by a restarted container; the random part is not)."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class JobStore:
    """The jobs table of a catalog. Methods block (SQL round trips): call them from async code in a
    thread (``await asyncio.to_thread(store.start, job_id, runner_id)``). A catalog that cannot be
    reached raises `CatalogUnavailable` (HTTP 503): transient, the caller may retry.

    `lease_s` is how long a runner's hold on a job lasts without a renewal (``jobs.lease_s``);
    `clock` gives the current UTC time (tests pass one they move)."""

    def __init__(
        self, engine: Engine, lease_s: float = DEFAULT_LEASE_S, clock: Callable[[], datetime] = utcnow
    ) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.engine = engine
        self.lease_s = lease_s
        self.clock = clock

    def create(
        self,
        model: str,
        request: Mapping[str, Any],
        *,
        callback_url: str | None = None,
        owner: str | None = None,
        job_id: str | None = None,
        traceparent: str | None = None,
        kind: str = INFERENCE,
        priority: int = 0,
        held_by: str | None = None,
    ) -> Job:
        """Insert a queued job and return it. `request` is the JSON-ready request the runner will
        execute; `job_id` defaults to `new_job_id()`; `traceparent`: the trace its run continues.
        Commit the row before publishing the job's message, so that whichever replica receives the
        message finds the row. `kind` and `priority`: see `moorage.jobs.queue`; `held_by`: a runner
        id that leases the queued job from the start (it will start the job itself)."""
        request = dict(request) | ({TRACEPARENT_KEY: traceparent} if traceparent else {})
        now = self.clock()
        row = {
            "id": job_id or new_job_id(),
            "model": model,
            "status": JobStatus.QUEUED.value,
            "request": request,
            "result": None,
            "error": None,
            "callback_url": callback_url,
            "callback_status": None,
            "attempts": 0,
            "created_at": now,
            "started_at": None,
            "finished_at": None,
            "owner": owner,
            "runner_id": held_by,
            "lease_expires_at": self.lease_end(now) if held_by else None,
            "callback_attempts": 0,
            "kind": kind,
            "priority": priority,
        }
        with self.transaction() as conn:
            conn.execute(jobs_table.insert(), row)
        return Job.from_row(row)

    def get(self, job_id: str) -> Job | None:
        """The job, or None if there is no such id."""
        with self.transaction() as conn:
            row = conn.execute(sa.select(jobs_table).where(jobs_table.c.id == job_id)).mappings().first()
        return Job.from_row(row) if row else None

    # -- leases -----------------------------------------------------------------------------------
    def _takeable(self, runner_id: str, now: datetime) -> sa.ColumnElement[bool]:
        """No live lease of another runner holds the row."""
        c = jobs_table.c
        return sa.or_(
            c.runner_id.is_(None), c.runner_id == runner_id, c.lease_expires_at.is_(None), c.lease_expires_at <= now
        )

    def lease_end(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.lease_s)

    def claim(self, job_ids: Collection[str], runner_id: str) -> set[str]:
        """Lease the unfinished jobs among `job_ids` that no live lease of another runner holds,
        without starting them (a runner receiving a batch starts it with `start_many`, which leases
        it too). Answers the ids it leased; unknown, finished and held ones are left alone (`start`
        tells them apart)."""
        if not job_ids:
            return set()
        now = self.clock()
        c = jobs_table.c
        update = (
            jobs_table.update()
            .where(c.id.in_(list(job_ids)), c.status.in_(UNFINISHED), self._takeable(runner_id, now))
            .values(runner_id=runner_id, lease_expires_at=self.lease_end(now))
            .returning(c.id)
        )
        with self.transaction() as conn:
            return {row[0] for row in conn.execute(update)}

    def renew(self, job_ids: Collection[str], runner_id: str) -> int:
        """Extend this runner's leases of `job_ids` (the jobs it is still working on or calling back);
        a lease another runner took over or one already released is not renewed. Answers how many."""
        if not job_ids:
            return 0
        c = jobs_table.c
        update = (
            jobs_table.update()
            .where(c.id.in_(list(job_ids)), c.runner_id == runner_id, c.lease_expires_at.is_not(None))
            .values(lease_expires_at=self.lease_end(self.clock()))
        )
        with self.transaction() as conn:
            return conn.execute(update).rowcount

    def release(self, job_ids: Collection[str], runner_id: str) -> int:
        """This runner hands these unfinished jobs back to their queue (their messages go back to the
        broker): they are ``queued`` again and held by no one. Answers how many."""
        if not job_ids:
            return 0
        c = jobs_table.c
        update = (
            jobs_table.update()
            .where(c.id.in_(list(job_ids)), c.runner_id == runner_id, c.status.in_(UNFINISHED))
            .values(status=JobStatus.QUEUED.value, runner_id=None, lease_expires_at=None)
        )
        with self.transaction() as conn:
            return conn.execute(update).rowcount

    def expire(self, runner_id: str) -> int:
        """End every lease this runner holds now (a runner that stops lets other replicas reclaim at
        once what it leaves behind, instead of after ``lease_s``). Answers how many."""
        c = jobs_table.c
        update = (
            jobs_table.update()
            .where(c.runner_id == runner_id, c.lease_expires_at.is_not(None))
            .values(lease_expires_at=self.clock())
        )
        with self.transaction() as conn:
            return conn.execute(update).rowcount

    def expired(self, limit: int = 100) -> list[Job]:
        """Inference jobs whose lease has expired: unfinished ones and finished ones whose callback is
        pending, oldest lease first; `reclaim` each. (Workers reclaim the other kinds themselves, from
        the table: they have no broker message to publish again.)"""
        c = jobs_table.c
        reclaimable = sa.or_(c.status.in_(UNFINISHED), c.callback_status == CALLBACK_PENDING)
        query = (
            sa.select(jobs_table)
            .where(c.kind == INFERENCE, c.lease_expires_at <= self.clock(), reclaimable)
            .order_by(c.lease_expires_at)
            .limit(limit)
        )
        with self.transaction() as conn:
            return [Job.from_row(row) for row in conn.execute(query).mappings()]

    def reclaim(self, job: Job, runner_id: str) -> Job | None:
        """Take over `job`, one of `expired`, unless another runner did first (or its holder renewed
        the lease meanwhile): None. An unfinished job goes back to ``queued``, held by no one (the
        caller publishes a new message for it); a finished job with a pending callback is leased to
        `runner_id`, which delivers the callback."""
        c = jobs_table.c
        now = self.clock()
        still_expired = (c.id == job.id, c.lease_expires_at <= now)
        if job.is_finished:
            where = (*still_expired, c.callback_status == CALLBACK_PENDING)
            change: dict[str, Any] = {"runner_id": runner_id, "lease_expires_at": self.lease_end(now)}
        else:
            where = (*still_expired, c.status.in_(UNFINISHED))
            change = {"status": JobStatus.QUEUED.value, "runner_id": None, "lease_expires_at": None}
        update = jobs_table.update().where(*where).values(**change).returning(*_RETURNED)
        with self.transaction() as conn:
            row = conn.execute(update).mappings().first()
        if row is not None:
            log.info("job %s: reclaimed the expired lease of runner %s", job.id, job.runner_id)
        return Job.from_row(row) if row else None

    # -- transitions ------------------------------------------------------------------------------
    def start(self, job_id: str, runner_id: str) -> Job | None:
        """Mark the job running for one more attempt, leased to `runner_id`, and return it
        (``attempts`` counts this one).

        A queued job starts, and so does a running one whose lease is this runner's or has expired
        (its message was redelivered after its runner died). A finished job does not start, nor one
        that a live lease of another runner holds (a duplicate message: that runner runs it, and if
        it dies its lease is reclaimed): None, the caller acknowledges the message and runs nothing.
        An unknown id raises `JobNotFound`: the row may be in another catalog or not yet visible, so
        the caller retries the message (and the broker dead-letters it in the end) instead of
        acknowledging it as done.
        """
        now = self.clock()
        return self._transition(job_id, self._start_change(runner_id, now), self._takeable(runner_id, now))

    def start_many(self, job_ids: Collection[str], runner_id: str) -> dict[str, Job]:
        """`start` every job among `job_ids` that may start, in one transaction (the jobs of a batch
        the runner just received), and answer them by id. The ones left out (unknown, finished, held
        by a live lease of another runner) need their own `start`, which tells those cases apart.

        One UPDATE for the whole batch instead of one per job: on a SQLite catalog every transaction
        takes the database's write lock, and a restarted server's runner competes for it with its
        callbacks, its lease renewals, the other replicas and any reader."""
        if not job_ids:
            return {}
        now = self.clock()
        c = jobs_table.c
        update = (
            jobs_table.update()
            .where(c.id.in_(list(job_ids)), c.status.in_(UNFINISHED), self._takeable(runner_id, now))
            .values(**self._start_change(runner_id, now))
            .returning(*_RETURNED)
        )
        with self.transaction() as conn:
            return {row["id"]: Job.from_row(row) for row in conn.execute(update).mappings()}

    def _start_change(self, runner_id: str, now: datetime) -> dict[str, Any]:
        return {
            "status": JobStatus.RUNNING.value,
            "attempts": jobs_table.c.attempts + 1,
            "started_at": now,
            "runner_id": runner_id,
            "lease_expires_at": self.lease_end(now),
        }

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        result: Mapping[str, Any] | None = None,
        error: JobError | None = None,
        runner_id: str | None = None,
    ) -> Job | None:
        """Store the outcome of a queued or running job, once, and return the finished job.

        `status` is `JobStatus.SUCCEEDED` with a JSON-ready `result`, `JobStatus.FAILED` with an
        `error` (see `JobError.from_exception`), or `JobStatus.CANCELLED` (with or without either).
        Only the first finish counts: if the job is already finished, nothing changes and the answer
        is None (do not call its callback again). An unknown id raises `JobNotFound`.

        With a `runner_id`, a job that has a callback URL is left ``callback_status="pending"`` and
        leased to that runner, which then delivers it (`set_callback_status`): this UPDATE counts that
        first delivery in ``callback_attempts``, so it needs no `begin_callback`. A job without a
        callback URL is released. Without a `runner_id` (a job that never reached a runner) no
        callback is due.
        """
        return self._transition(job_id, self._finish_change(status, result, error, runner_id, self.clock()))

    def finish_many(self, outcomes: Sequence[Outcome], runner_id: str | None = None) -> list[Job]:
        """`finish` each of `outcomes` (job id, status, result, error) in one transaction, and answer
        the jobs this call finished, in order: one already finished or unknown is left out (a
        redelivered message, a job removed meanwhile). Either every outcome is stored or, if the
        catalog fails, none is."""
        now = self.clock()
        changes = [(job_id, self._finish_change(status, result, error, runner_id, now))
                   for job_id, status, result, error in outcomes]  # fmt: skip
        finished = []
        with self.transaction() as conn:
            for job_id, change in changes:
                row = conn.execute(self._transition_update(job_id, change)).mappings().first()
                if row is not None:
                    finished.append(Job.from_row(row))
        return finished

    def _finish_change(
        self,
        status: JobStatus,
        result: Mapping[str, Any] | None,
        error: JobError | None,
        runner_id: str | None,
        now: datetime,
    ) -> dict[str, Any]:
        if status == JobStatus.SUCCEEDED and error is not None:
            raise ValueError("a succeeded job has a result, not an error")
        if status == JobStatus.FAILED and error is None:
            raise ValueError("a failed job needs a JobError (code and message)")
        if not status.is_finished:
            raise ValueError(f"finish takes succeeded, failed or cancelled, not {status.value!r}")
        c = jobs_table.c
        has_callback = c.callback_url.is_not(None)
        change: dict[str, Any] = {
            "status": status.value,
            "result": dict(result) if result is not None else None,
            "error": error.as_dict() if error else None,
            "finished_at": now,
            "lease_expires_at": None,
        }
        if runner_id is not None:
            change["runner_id"] = runner_id
            change["callback_status"] = sa.case((has_callback, CALLBACK_PENDING), else_=None)
            change["lease_expires_at"] = sa.case((has_callback, self.lease_end(now)), else_=None)
            change["callback_attempts"] = sa.case((has_callback, c.callback_attempts + 1), else_=c.callback_attempts)
        return change

    def begin_callback(self, job_id: str, runner_id: str) -> int | None:
        """Count one more delivery of the job's pending callback by `runner_id`, which reclaimed it,
        and answer its number (the finish counted the first); None if the callback is not this
        runner's to deliver (another took its lease over, or it was delivered)."""
        c = jobs_table.c
        update = (
            jobs_table.update()
            .where(c.id == job_id, c.runner_id == runner_id, c.callback_status == CALLBACK_PENDING)
            .values(callback_attempts=c.callback_attempts + 1)
            .returning(c.callback_attempts)
        )
        with self.transaction() as conn:
            row = conn.execute(update).first()
        return int(row[0]) if row else None

    def set_callback_status(self, job_id: str, callback_status: str) -> None:
        """Record what became of the job's callback (e.g. ``delivered: HTTP 200``), cut to 200 chars,
        and release the job's lease: nothing is left to do for it. An unknown id raises
        `JobNotFound`."""
        with self.transaction() as conn:
            done = conn.execute(
                jobs_table.update()
                .where(jobs_table.c.id == job_id)
                .values(callback_status=callback_status[:MAX_CALLBACK_STATUS], lease_expires_at=None)
            )
        if done.rowcount == 0:
            raise JobNotFound(f"no job {job_id!r}")

    def _transition(self, job_id: str, change: Mapping[str, Any], *conditions: sa.ColumnElement[bool]) -> Job | None:
        """Apply `change` to an unfinished job in one conditional UPDATE: the WHERE clause is
        re-checked under the row's write lock, so of two racing finishes only the first matches."""
        with self.transaction() as conn:
            row = conn.execute(self._transition_update(job_id, change, *conditions)).mappings().first()
            if row is not None:
                return Job.from_row(row)
            exists = conn.execute(sa.select(jobs_table.c.id).where(jobs_table.c.id == job_id)).first()
        if exists is None:
            raise JobNotFound(f"no job {job_id!r}")
        return None

    def _transition_update(
        self, job_id: str, change: Mapping[str, Any], *conditions: sa.ColumnElement[bool]
    ) -> sa.Update:
        return (
            jobs_table.update()
            .where(jobs_table.c.id == job_id, jobs_table.c.status.in_(UNFINISHED), *conditions)
            .values(**change)
            .returning(*_RETURNED)
        )

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except OperationalError as exc:
            safe = self.engine.url.render_as_string(hide_password=True)
            log.warning("catalog %s failed: %s", safe, exc.orig)
            raise CatalogUnavailable("the catalog database cannot be reached; retry shortly") from None
