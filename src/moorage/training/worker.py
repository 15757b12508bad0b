"""The worker that runs queued training, evaluation and batch jobs (``moorage jobs worker``).

Its loop: take a host slot, claim the next job (`WorkQueue.next`: highest priority, then oldest, or
a running job whose worker died), run it in a thread, and meanwhile every ``jobs.lease_s / 4``
renew its lease and poll whether it was cancelled. A job's progress reports go to its row (what
``GET /v1/training/jobs/{id}`` shows), to Prometheus and, at each validation, to its log.

- **Host slots.** ``training.max_concurrent`` jobs run at once on one host, whichever processes run
  them (workers, ``moorage train`` in the foreground): each holds a kernel file lock on one of
  ``HOME/slots/slot-N.lock`` while its job runs. The kernel drops the lock when the process ends,
  however it ends, so a dead worker never keeps a slot.
- **Cancel.** A cancel request is handed to the job's `should_stop` (a trainer stops within one
  step, keeping its checkpoints); the job ends ``cancelled``, with nothing registered.
- **Stop.** A worker asked to stop (SIGTERM, Ctrl-C) stops its jobs the same way, then hands them
  back to the queue: they are queued again and resume from their checkpoints on the next claim.
- **Crash.** A worker that dies stops renewing its leases; another worker takes its jobs once the
  leases expire (``jobs.lease_s``), or at once when it starts on the same home folder and finds the
  dead runner's lock file free (`moorage.jobs.liveness`). They resume from their checkpoints.
- **Lease lost.** A worker that finds it no longer holds a job's lease (another took it over after
  a long stall) stops that job and records nothing: its new worker finishes it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ..config import Settings
from ..jobs.liveness import RunnerLock
from ..jobs.queue import WORK_KINDS, WorkQueue
from ..jobs.store import Job, JobError, JobStatus, new_runner_id
from ..observability import metrics
from .jobs import HANDLERS, JobContext, JobHandler, json_ready, work_dir_of
from .trainer import Progress

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no host limit, each process runs its own
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("moorage.training")

MAX_ATTEMPTS = 5  # a job that keeps killing its workers (memory, say) fails instead of looping forever
PROGRESS_EVERY_S = 0.5  # at most this often a progress report is written to the job's row


class HostSlots:
    """``max_concurrent`` kernel file locks in `folder`: one per job running on this host."""

    def __init__(self, folder: Path, max_concurrent: int) -> None:
        self.folder = folder
        self.max_concurrent = max_concurrent

    def try_acquire(self) -> IO[str] | None:
        """A free slot, locked (close the file to free it), or None when all are taken."""
        if fcntl is None:
            return open(self.folder / "no-locks", "a")  # noqa: SIM115 - the caller closes it
        self.folder.mkdir(parents=True, exist_ok=True)
        for index in range(self.max_concurrent):
            file = (self.folder / f"slot-{index}.lock").open("a")
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                file.close()
                continue
            return file
        return None

    @contextmanager
    def hold(
        self, stop: threading.Event, poll_s: float = 0.5, on_wait: Callable[[], None] | None = None
    ) -> Iterator[bool]:
        """Wait for a free slot (until `stop`) and hold it for the block: yields False if stopped first.
        `on_wait` is called once if every slot is taken at first."""
        slot = self.try_acquire()
        if slot is None and on_wait is not None:
            on_wait()
        while slot is None and not stop.wait(poll_s):
            slot = self.try_acquire()
        try:
            yield slot is not None
        finally:
            if slot is not None:
                slot.close()


class _Running:
    """One job as its worker runs it: the flags its `should_stop` reads, its progress reports."""

    def __init__(self, worker: Worker, job: Job) -> None:
        self.worker = worker
        self.job = job
        self.cancelled = threading.Event()
        self.lease_lost = threading.Event()
        self.done = threading.Event()
        self.last_progress: dict[str, Any] | None = None
        self._written_at = 0.0
        self._last_metrics: dict[str, float] = {}
        self._phase = ""

    def should_stop(self) -> bool:
        """Asked by the job at every step: a cancel is read from the row each time (a primary-key
        lookup), so a job stops at the first step after its cancel was committed."""
        if not self.cancelled.is_set():
            try:
                if self.worker.queue.cancel_requested(self.job.id):
                    self.cancelled.set()
            except Exception as exc:  # the catalog is down: go on, the next step asks again
                log.warning("job %s: could not read whether it was cancelled: %s", self.job.id, exc)
        return self.cancelled.is_set() or self.lease_lost.is_set() or self.worker.stopping.is_set()

    def progress(self, report: Progress) -> None:
        record = json_ready(dataclasses.asdict(report))  # numpy numbers as plain ones: the row is JSON
        self.last_progress = record
        _observe(self.job, report)
        if self.worker.on_progress is not None:
            self.worker.on_progress(self.job, record)
        now = time.monotonic()
        changed = report.metrics != self._last_metrics or report.phase != self._phase
        if changed or now - self._written_at >= PROGRESS_EVERY_S:
            self._written_at = now
            self.worker.queue.set_progress(self.job.id, record)
        if changed:
            self._last_metrics, self._phase = dict(report.metrics), report.phase
            shown = ", ".join(f"{k} {v:.4g}" for k, v in report.metrics.items() if isinstance(v, int | float))
            loss = f", loss {report.loss:.4g}" if report.loss is not None else ""
            self.log(f"{report.phase}: step {report.step}/{report.total_steps}{loss}{'; ' + shown if shown else ''}")

    def log(self, line: str) -> None:
        try:
            self.worker.queue.log(self.job.id, line)
        except Exception as exc:  # a log line is not worth failing the job for
            log.warning("job %s: could not store a log line: %s", self.job.id, exc)

    def tend(self) -> None:
        """Renew the lease until the job is done (a thread of its own)."""
        queue = self.worker.queue
        interval = queue.lease_s / 4
        while not self.done.wait(interval):
            try:
                if queue.renew([self.job.id], self.worker.runner_id) == 0:
                    log.warning("job %s: its lease was taken over; stopping it", self.job.id)
                    self.lease_lost.set()
            except Exception as exc:  # the catalog is down: the next round tries again
                log.warning("job %s: could not renew its lease: %s", self.job.id, exc)


def _observe(job: Job, report: Progress) -> None:
    labels = (job.kind, job.model)
    metrics.TRAINING_STEP.labels(*labels).set(report.step)
    metrics.TRAINING_TOTAL_STEPS.labels(*labels).set(report.total_steps)
    if report.loss is not None:
        metrics.TRAINING_LOSS.labels(*labels).set(report.loss)
    for name, value in report.metrics.items():
        if isinstance(value, int | float):
            metrics.TRAINING_METRIC.labels(*labels, name).set(value)


def _forget(job: Job, reported: dict[str, Any] | None) -> None:
    """A job that ended has no current step: its series go (the counter of ended jobs stays)."""
    labels = (job.kind, job.model)
    for gauge in (metrics.TRAINING_STEP, metrics.TRAINING_TOTAL_STEPS, metrics.TRAINING_LOSS):
        try:
            gauge.remove(*labels)
        except KeyError:
            pass
    for name in (reported or {}).get("metrics", {}):
        try:
            metrics.TRAINING_METRIC.remove(*labels, name)
        except KeyError:
            pass


class Worker:
    """Runs the jobs of `kinds` from the queue of `settings`' catalog. `handlers` maps a kind to what
    runs it (default: `moorage.training.jobs.HANDLERS`)."""

    def __init__(
        self,
        settings: Settings,
        queue: WorkQueue,
        *,
        kinds: Collection[str] = WORK_KINDS,
        handlers: Mapping[str, JobHandler] = HANDLERS,
        poll_s: float = 1.0,
        on_progress: Callable[[Job, dict[str, Any]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.kinds = tuple(kinds)
        self.handlers = dict(handlers)
        self.poll_s = poll_s
        self.on_progress = on_progress
        self.runner_id = new_runner_id()
        self.slots = HostSlots(settings.home / "slots", settings.training.max_concurrent)
        self.stopping = threading.Event()
        self._running: dict[str, _Running] = {}
        self._lock = RunnerLock(settings.home / "runners", self.runner_id)

    # -- the loop ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Lock this runner's file and end the leases of runners of this home that are gone, so their
        running jobs are claimable at once."""
        try:
            self._lock.acquire()
            for runner_id in self._lock.dead_runners():
                num_leases = self.queue.expire(runner_id)
                log.warning("job runner %s has stopped; its %d job leases end now", runner_id, num_leases)
        except Exception as exc:  # their leases still expire on their own
            log.warning("could not check which job runners of this home are alive: %s", exc)

    def close(self) -> None:
        self._lock.release()

    def run(self, stop: threading.Event | None = None) -> None:
        """Claim and run jobs until `stop` (or `self.stopping`) is set; `max_concurrent` at most."""
        if stop is not None:
            threading.Thread(target=self._stop_on, args=(stop,), daemon=True).start()
        self.start()
        try:
            threads = [
                threading.Thread(target=self._loop, name=f"moorage-worker-{n}", daemon=True)
                for n in range(self.settings.training.max_concurrent)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            self.close()

    def _stop_on(self, stop: threading.Event) -> None:
        stop.wait()
        self.stopping.set()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                ran = self.run_next()
            except Exception as exc:  # the catalog is down: try again after a pause
                log.warning("could not claim a job: %s", exc)
                ran = False
            if not ran:
                self.stopping.wait(self.poll_s)

    def run_next(self) -> bool:
        """Take a free host slot, claim the next job and run it to its end; False if there was no
        slot or no job."""
        slot = self.slots.try_acquire()
        if slot is None:
            return False
        try:
            job = self.queue.next(self.kinds, self.runner_id)
            if job is None:
                return False
            self.run_job(job)
            return True
        finally:
            slot.close()

    def run_foreground(self, job_id: str, on_wait: Callable[[], None] | None = None) -> Job:
        """Run one job of the queue in this process (a host slot first, waiting for one; `on_wait` is
        called if it must wait): `moorage train` without ``--queue``. Answers the job as it ended (or
        as it is, if it cannot be taken)."""
        with self.slots.hold(self.stopping, on_wait=on_wait) as held:
            job = self.queue.take(job_id, self.runner_id) if held else None
            if job is None:
                current = self.queue.get(job_id)
                if current is None:
                    raise RuntimeError(f"job {job_id} vanished")
                return current
            return self.run_job(job)

    # -- one job ----------------------------------------------------------------------------------
    def run_job(self, job: Job) -> Job:
        """Run a started job to its end: finished (succeeded, failed, cancelled) or handed back."""
        running = _Running(self, job)
        self._running[job.id] = running
        try:
            return self._run(running)
        finally:
            self._running.pop(job.id, None)

    def cancel(self, job_id: str) -> None:
        """Cancel a job of the queue; one this worker runs stops at its next step without waiting for
        the row to be read (Ctrl-C in `moorage train`)."""
        running = self._running.get(job_id)
        if running is not None:
            running.cancelled.set()
        self.queue.cancel(job_id)

    def _run(self, running: _Running) -> Job:
        job = running.job
        handler = self.handlers.get(job.kind)
        if handler is None or job.attempts > MAX_ATTEMPTS:
            return self._fail_early(job, handler is None)
        running.log(f"attempt {job.attempts} on {self.runner_id}")
        if job.cancel_requested:
            running.cancelled.set()
        metrics.TRAINING_JOBS_RUNNING.labels(job.kind).inc()
        tender = threading.Thread(target=running.tend, name=f"moorage-lease-{job.id}", daemon=True)
        tender.start()
        try:
            outcome = self._execute(running, handler)
        finally:
            running.done.set()
            metrics.TRAINING_JOBS_RUNNING.labels(job.kind).dec()
            _forget(job, running.last_progress)
        return self._record(running, *outcome)

    def _fail_early(self, job: Job, unknown_kind: bool) -> Job:
        if unknown_kind:
            error = JobError("unknown_job_kind", f"no handler for jobs of kind {job.kind!r}")
        else:
            error = JobError("too_many_attempts", f"the job was started {MAX_ATTEMPTS} times without finishing")
        return self.queue.finish(job.id, JobStatus.FAILED, error=error) or job

    def _execute(self, running: _Running, handler: JobHandler) -> tuple[dict[str, Any] | None, BaseException | None]:
        job = running.job
        context = JobContext(
            settings=self.settings,
            job=job,
            work_dir=work_dir_of(self.settings, job.id),
            progress=running.progress,
            should_stop=running.should_stop,
            log=running.log,
        )
        try:
            return handler(context), None
        except Exception as exc:
            return None, exc

    def _record(self, running: _Running, result: dict[str, Any] | None, exc: BaseException | None) -> Job:
        """Store how the job ended, once; or hand it back (worker stopping), or leave it (lease lost)."""
        job, queue = running.job, self.queue
        if running.last_progress is not None:
            queue.set_progress(job.id, running.last_progress)
        if running.lease_lost.is_set():
            return queue.get(job.id) or job
        if exc is None:
            running.log("succeeded")
            ended = queue.finish(job.id, JobStatus.SUCCEEDED, result or {})
        elif running.cancelled.is_set():
            running.log("cancelled; its checkpoints are kept")
            ended = queue.finish(job.id, JobStatus.CANCELLED, error=JobError("job_cancelled", "the job was cancelled"))
        elif self.stopping.is_set():
            running.log("handed back to the queue: the worker is stopping")
            queue.store.release([job.id], self.runner_id)
            return queue.get(job.id) or job
        else:
            error = JobError.from_exception(exc)
            if error.code == "internal_error":
                log.error("job %s failed", job.id, exc_info=exc)
            running.log(f"failed: {error.code}: {error.message}")
            ended = queue.finish(job.id, JobStatus.FAILED, error=error)
        ended = ended or queue.get(job.id) or job
        metrics.TRAINING_JOBS.labels(job.kind, ended.status.value).inc()
        return ended
