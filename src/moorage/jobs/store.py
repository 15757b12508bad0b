"""Job rows in the catalog database (table ``jobs``, migration 0003).

Every server replica that shares a catalog shares its jobs, so whichever replica receives a job's
queue message finds its row. A job moves ``queued -> running -> succeeded | failed``:

- `JobStore.start` is at-least-once: it moves a queued *or running* job to running and counts the
  attempt. A running job is started again when its message is redelivered after a runner died, so
  ``attempts`` counts every start, concurrent ones included (the increment is one SQL statement).
- `JobStore.finish` is exactly-once: only the first finish of a job stores its status, result or
  error; any later one (a redelivered message whose first run did finish, a racing replica)
  changes nothing and returns None.

Both tell an unknown job id apart from a finished job: unknown raises `JobNotFound`, finished
returns None. The store works on the catalog's engine (``registry.catalog.engine``), SQLite or
PostgreSQL; its transitions are single conditional UPDATEs, so they need no lock beyond the row's.
A job's error is only ever a stable code and a message written for the caller (`JobError`), never
the text of an internal exception.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
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


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def is_finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED)


UNFINISHED = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)

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
            return cls(exc.code, exc.message)
        return cls("internal_error", "the job failed")

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


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

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

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
        )


def new_job_id() -> str:
    """A fresh job id: ``job-`` and 32 hex digits."""
    return JOB_ID_PREFIX + uuid.uuid4().hex


class JobStore:
    """The jobs table of a catalog. Methods block (SQL round trips): call them from async code in a
    thread (``await asyncio.to_thread(store.start, job_id)``). A catalog that cannot be reached
    raises `CatalogUnavailable` (HTTP 503): transient, the caller may retry."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(
        self,
        model: str,
        request: Mapping[str, Any],
        *,
        callback_url: str | None = None,
        owner: str | None = None,
        job_id: str | None = None,
    ) -> Job:
        """Insert a queued job and return it. `request` is the JSON-ready request the runner will
        execute; `job_id` defaults to `new_job_id()`. Commit the row before publishing the job's
        message, so that whichever replica receives the message finds the row."""
        row = {
            "id": job_id or new_job_id(),
            "model": model,
            "status": JobStatus.QUEUED.value,
            "request": dict(request),
            "result": None,
            "error": None,
            "callback_url": callback_url,
            "callback_status": None,
            "attempts": 0,
            "created_at": utcnow(),
            "started_at": None,
            "finished_at": None,
            "owner": owner,
        }
        with self._transaction() as conn:
            conn.execute(jobs_table.insert(), row)
        return Job.from_row(row)

    def get(self, job_id: str) -> Job | None:
        """The job, or None if there is no such id."""
        with self._transaction() as conn:
            row = conn.execute(sa.select(jobs_table).where(jobs_table.c.id == job_id)).mappings().first()
        return Job.from_row(row) if row else None

    def start(self, job_id: str) -> Job | None:
        """Mark the job running for one more attempt and return it (``attempts`` counts this one).

        A queued job and a running one (redelivered after its runner died, or raced by another
        replica) both start; a finished job does not: None, the caller acknowledges its message and
        runs nothing. An unknown id raises `JobNotFound`: the row may be in another catalog or not
        yet visible, so the caller retries the message (and the broker dead-letters it in the end)
        instead of acknowledging it as done.
        """
        change = {"status": JobStatus.RUNNING.value, "attempts": jobs_table.c.attempts + 1, "started_at": utcnow()}
        return self._transition(job_id, change)

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        result: Mapping[str, Any] | None = None,
        error: JobError | None = None,
    ) -> Job | None:
        """Store the outcome of a queued or running job, once, and return the finished job.

        `status` is `JobStatus.SUCCEEDED` with a JSON-ready `result`, or `JobStatus.FAILED` with an
        `error` (see `JobError.from_exception`). Only the first finish counts: if the job is already
        finished, nothing changes and the answer is None (do not call its callback again). An
        unknown id raises `JobNotFound`.
        """
        if status == JobStatus.SUCCEEDED and error is not None:
            raise ValueError("a succeeded job has a result, not an error")
        if status == JobStatus.FAILED and error is None:
            raise ValueError("a failed job needs a JobError (code and message)")
        if not status.is_finished:
            raise ValueError(f"finish takes succeeded or failed, not {status.value!r}")
        change = {
            "status": status.value,
            "result": dict(result) if result is not None else None,
            "error": error.as_dict() if error else None,
            "finished_at": utcnow(),
        }
        return self._transition(job_id, change)

    def set_callback_status(self, job_id: str, callback_status: str) -> None:
        """Record what became of the job's callback (e.g. ``delivered: HTTP 200``); cut to 200 chars.
        An unknown id raises `JobNotFound`."""
        with self._transaction() as conn:
            done = conn.execute(
                jobs_table.update()
                .where(jobs_table.c.id == job_id)
                .values(callback_status=callback_status[:MAX_CALLBACK_STATUS])
            )
        if done.rowcount == 0:
            raise JobNotFound(f"no job {job_id!r}")

    def _transition(self, job_id: str, change: Mapping[str, Any]) -> Job | None:
        """Apply `change` to an unfinished job in one conditional UPDATE: the WHERE clause is
        re-checked under the row's write lock, so of two racing finishes only the first matches."""
        update = (
            jobs_table.update()
            .where(jobs_table.c.id == job_id, jobs_table.c.status.in_(UNFINISHED))
            .values(**change)
            .returning(*jobs_table.c)
        )
        with self._transaction() as conn:
            row = conn.execute(update).mappings().first()
            if row is not None:
                return Job.from_row(row)
            exists = conn.execute(sa.select(jobs_table.c.id).where(jobs_table.c.id == job_id)).first()
        if exists is None:
            raise JobNotFound(f"no job {job_id!r}")
        return None

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except OperationalError as exc:
            safe = self.engine.url.render_as_string(hide_password=True)
            log.warning("catalog %s failed: %s", safe, exc.orig)
            raise CatalogUnavailable("the catalog database cannot be reached; retry shortly") from None
