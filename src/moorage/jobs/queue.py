"""The work queue: training, evaluation and batch jobs, taken by workers straight from the jobs table.

Inference jobs travel as broker messages (``POST /v1/jobs``, `moorage.streams.jobs`); the heavier
kinds are few, long and must survive any restart, so the catalog row *is* the queue entry:

- `WorkQueue.submit` inserts a queued job with a priority. `next` gives a worker the unfinished job
  of its kinds with the highest priority, then the oldest, and starts it in one conditional UPDATE
  (the WHERE clause is re-checked under the row's write lock): of racing workers exactly one wins,
  the others try the next candidate.
- A started job is leased to its worker's runner id, like every job (`JobStore`): the worker renews
  the lease while it runs (`renew`). A worker that dies stops renewing; once the lease has expired the
  running job is claimable again and `next` hands it to another worker, which resumes it from its
  checkpoint (each kind knows where it keeps one). A worker that starts on the same home folder does
  not wait for that: the dead runner's lock file is free (`moorage.jobs.liveness`).
- `cancel` ends a queued job (or a running one whose worker is gone) at once; a running job only gets
  ``cancel_requested``, which its worker polls and hands to the job (a trainer stops within one
  step), then finishes it ``cancelled``.
- `set_progress` keeps the latest progress report in the row; `log` appends numbered lines to
  ``job_logs``.

This module knows kinds as strings, not what they do: `moorage.training.worker` runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError

from ..db import utcnow
from ..errors import BadRequest
from .store import DEFAULT_LEASE_S, Job, JobError, JobNotFound, JobStatus, JobStore, job_logs_table, jobs_table

JOB_KINDS = ("inference", "training", "evaluation", "batch", "compress")
WORK_KINDS = ("training", "evaluation", "batch", "compress")  # the kinds a worker takes from the table
MAX_LOG_LINE = 4000
_CANDIDATES = 8  # claimable rows read per attempt of `next`; racing workers each try them in order


class UnknownJobKind(BadRequest):
    code = "unknown_job_kind"


class WorkQueue:
    """The queue of non-inference jobs in a catalog (SQLite or PostgreSQL). Methods block (SQL
    round trips); a catalog that cannot be reached raises `CatalogUnavailable` (HTTP 503).

    `lease_s` is how long a worker's hold on a running job lasts without a renewal; `clock` gives
    the current UTC time (tests pass one they move)."""

    def __init__(
        self, engine: Engine, lease_s: float = DEFAULT_LEASE_S, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.store = JobStore(engine, lease_s=lease_s, clock=clock)
        self.engine = engine
        self.lease_s = lease_s
        self.clock = clock

    # -- submitting and reading -------------------------------------------------------------------
    def submit(
        self,
        kind: str,
        spec: Mapping[str, Any],
        *,
        priority: int = 0,
        owner: str | None = None,
        model: str | None = None,
        held_by: str | None = None,
    ) -> Job:
        """Queue a job of `kind` (one of `WORK_KINDS`) whose JSON-ready `spec` its worker executes.
        `model` is the model the job is about (default: the spec's ``name``, else its ``model``).
        `held_by`: a runner id that will start the job itself (`take`, e.g. a command that runs it in
        the foreground): the job is leased to it, so no worker takes it unless that lease expires."""
        if kind not in WORK_KINDS:
            raise UnknownJobKind(f"unknown job kind {kind!r}; one of {', '.join(WORK_KINDS)}")
        name = str(model or spec.get("name") or spec.get("model") or kind)
        return self.store.create(name, spec, owner=owner, kind=kind, priority=int(priority), held_by=held_by)

    def get(self, job_id: str) -> Job | None:
        """The job, or None if there is no such id."""
        return self.store.get(job_id)

    def jobs(
        self, kinds: Collection[str] = WORK_KINDS, statuses: Collection[str] | None = None, limit: int = 50
    ) -> list[Job]:
        """Jobs of `kinds` (and `statuses`, if given), newest first."""
        c = jobs_table.c
        query = sa.select(jobs_table).where(c.kind.in_(list(kinds)))
        if statuses:
            query = query.where(c.status.in_(list(statuses)))
        with self._transaction() as conn:
            rows = conn.execute(query.order_by(c.created_at.desc()).limit(limit)).mappings()
            return [Job.from_row(row) for row in rows]

    # -- workers ----------------------------------------------------------------------------------
    def _claimable(self, now: datetime, runner_id: str) -> sa.ColumnElement[bool]:
        """Queued and not held by another runner's live lease, or running under an expired lease (its
        worker died: the job resumes)."""
        c = jobs_table.c
        expired = sa.or_(c.lease_expires_at.is_(None), c.lease_expires_at <= now)
        queued = sa.and_(
            c.status == JobStatus.QUEUED.value, sa.or_(expired, c.runner_id.is_(None), c.runner_id == runner_id)
        )
        return sa.or_(queued, sa.and_(c.status == JobStatus.RUNNING.value, expired))

    def next(self, kinds: Collection[str], runner_id: str) -> Job | None:
        """Start the claimable job of `kinds` with the highest priority, then the oldest, leased to
        `runner_id`, and return it (``attempts`` counts this start); None when there is none. A job
        whose worker died (running, lease expired) is claimable again: its new worker resumes it."""
        c = jobs_table.c
        now = self.clock()
        candidates = (
            sa.select(c.id)
            .where(c.kind.in_(list(kinds)), self._claimable(now, runner_id))
            .order_by(c.priority.desc(), c.created_at, c.id)
            .limit(_CANDIDATES)
        )
        with self._transaction() as conn:
            job_ids = [row[0] for row in conn.execute(candidates)]
        for job_id in job_ids:
            job = self._start(job_id, runner_id, self._claimable(now, runner_id))
            if job is not None:
                return job
        return None

    def take(self, job_id: str, runner_id: str) -> Job | None:
        """Start this job for `runner_id` (the runner named in `submit`'s `held_by`, or any runner once
        the job is claimable); None if it is finished or another runner holds it. Unknown: `JobNotFound`."""
        job = self._start(job_id, runner_id, self._claimable(self.clock(), runner_id))
        if job is None and self.store.get(job_id) is None:
            raise JobNotFound(f"no job {job_id!r}")
        return job

    def _start(self, job_id: str, runner_id: str, claimable: sa.ColumnElement[bool]) -> Job | None:
        now = self.clock()
        c = jobs_table.c
        update = (
            jobs_table.update()
            .where(c.id == job_id, claimable)
            .values(
                status=JobStatus.RUNNING.value,
                attempts=c.attempts + 1,
                started_at=now,
                runner_id=runner_id,
                lease_expires_at=self.store.lease_end(now),
            )
            .returning(*jobs_table.c)
        )
        with self._transaction() as conn:
            row = conn.execute(update).mappings().first()
        return Job.from_row(row) if row else None

    def renew(self, job_ids: Collection[str], runner_id: str) -> int:
        """Extend this runner's leases of `job_ids`; answers how many it still holds."""
        return self.store.renew(job_ids, runner_id)

    def expire(self, runner_id: str) -> int:
        """End every lease `runner_id` holds now (it stopped, or its process is gone)."""
        return self.store.expire(runner_id)

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        result: Mapping[str, Any] | None = None,
        error: JobError | None = None,
    ) -> Job | None:
        """Store the job's outcome once (see `JobStore.finish`) and release its lease; None if it was
        already finished."""
        finished = self.store.finish(job_id, status, result, error)
        return self.store.get(job_id) if finished is not None else None

    # -- cancel, progress, logs -------------------------------------------------------------------
    def cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one (or a running one whose worker is gone) is ``cancelled`` now; a
        running one gets ``cancel_requested``, which its worker hands to the job. A finished job is
        answered as it is. Unknown: `JobNotFound`."""
        c = jobs_table.c
        now = self.clock()
        gone = sa.or_(c.lease_expires_at.is_(None), c.lease_expires_at <= now)
        at_once = sa.or_(c.status == JobStatus.QUEUED.value, sa.and_(c.status == JobStatus.RUNNING.value, gone))
        cancelled = {
            "status": JobStatus.CANCELLED.value,
            "cancel_requested": True,
            "finished_at": now,
            "lease_expires_at": None,
            "error": JobError("job_cancelled", "the job was cancelled").as_dict(),
        }
        with self._transaction() as conn:
            done = conn.execute(jobs_table.update().where(c.id == job_id, at_once).values(**cancelled))
            if done.rowcount == 0:
                running = (c.id == job_id, c.status == JobStatus.RUNNING.value)
                conn.execute(jobs_table.update().where(*running).values(cancel_requested=True))
        job = self.store.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r}")
        return job

    def cancel_requested(self, job_id: str) -> bool:
        """Whether the job has been asked to stop (or no longer exists)."""
        with self._transaction() as conn:
            row = conn.execute(sa.select(jobs_table.c.cancel_requested).where(jobs_table.c.id == job_id)).first()
        return row is None or bool(row[0])

    def set_progress(self, job_id: str, progress: Mapping[str, Any]) -> None:
        """Keep `progress` (JSON-ready) as the job's latest progress report."""
        with self._transaction() as conn:
            conn.execute(jobs_table.update().where(jobs_table.c.id == job_id).values(progress=dict(progress)))

    def log(self, job_id: str, line: str) -> int:
        """Append one line (cut to 4,000 characters) to the job's log; answers its number (1, 2, ...)."""
        line = line[:MAX_LOG_LINE]
        for _ in range(5):  # two writers racing for the same number: the loser takes the next
            try:
                return self._append(job_id, line)
            except IntegrityError:
                continue
        return self._append(job_id, line)

    def _append(self, job_id: str, line: str) -> int:
        logs = job_logs_table.c
        with self._transaction() as conn:
            last = conn.execute(sa.select(sa.func.max(logs.seq)).where(logs.job_id == job_id)).scalar()
            seq = int(last or 0) + 1
            conn.execute(job_logs_table.insert().values(job_id=job_id, seq=seq, at=self.clock(), line=line))
        return seq

    def logs(self, job_id: str, after: int = 0, limit: int = 1000) -> list[tuple[int, str]]:
        """The job's log lines numbered above `after`, in order: ``(seq, line)``."""
        logs = job_logs_table.c
        query = (
            sa.select(logs.seq, logs.line)
            .where(logs.job_id == job_id, logs.seq > after)
            .order_by(logs.seq)
            .limit(limit)
        )
        with self._transaction() as conn:
            return [(int(seq), str(line)) for seq, line in conn.execute(query)]

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        with self.store.transaction() as conn:
            yield conn
