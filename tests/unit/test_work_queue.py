"""The work queue of training, evaluation and batch jobs (SQLite here; the PostgreSQL run is in
tests/integration/test_training_jobs.py) and the worker that runs them, with job handlers of the
test's own that block on events: priorities, one winner among racing workers, a dead worker's job
reclaimed, cancel (queued: at once; running: at the next step), logs, host slots, a stopping worker
handing its job back."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from moorage.config import Settings
from moorage.db.catalog import Catalog
from moorage.errors import MoorageError
from moorage.jobs import JobNotFound, JobStatus, JobStore
from moorage.jobs.queue import UnknownJobKind, WorkQueue
from moorage.training.jobs import JobContext
from moorage.training.trainer import Progress, TrainingCancelled
from moorage.training.worker import HostSlots, Worker

from tests.support import wait_until

LEASE_S = 20.0


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def catalog(tmp_path):
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    yield catalog
    catalog.dispose()


@pytest.fixture
def queue(catalog, clock) -> WorkQueue:
    return WorkQueue(catalog.engine, lease_s=LEASE_S, clock=clock)


def submit(queue: WorkQueue, clock: Clock, name: str, priority: int = 0, kind: str = "training"):
    clock.advance(1)  # created one after the other
    return queue.submit(kind, {"name": name}, priority=priority)


def test_higher_priority_first_then_the_oldest(queue, clock):
    low = submit(queue, clock, "low", priority=0)
    first_high = submit(queue, clock, "high-1", priority=5)
    second_high = submit(queue, clock, "high-2", priority=5)
    order = [queue.next(["training"], "w1") for _ in range(3)]
    assert [job.id for job in order] == [first_high.id, second_high.id, low.id]
    assert all(job.status == JobStatus.RUNNING and job.attempts == 1 and job.runner_id == "w1" for job in order)
    assert queue.next(["training"], "w1") is None


def test_a_worker_takes_only_its_kinds_and_never_an_inference_job(queue, clock, catalog):
    JobStore(catalog.engine).create("emb@production", {"inputs": ["a"]})
    evaluation = submit(queue, clock, "m", kind="evaluation")
    assert queue.next(["training"], "w1") is None
    assert queue.next(["training", "evaluation"], "w1").id == evaluation.id
    assert queue.next(["training", "evaluation", "batch"], "w1") is None
    with pytest.raises(UnknownJobKind):
        queue.submit("inference", {"name": "m"})


def test_of_racing_workers_exactly_one_starts_a_job(queue, clock):
    job = submit(queue, clock, "m")
    barrier = threading.Barrier(8)

    def race(n: int):
        barrier.wait()
        return queue.next(["training"], f"w{n}")

    with ThreadPoolExecutor(8) as pool:
        won = [j for j in pool.map(race, range(8)) if j is not None]
    assert [j.id for j in won] == [job.id]
    assert queue.get(job.id).attempts == 1


def test_a_dead_workers_job_is_claimed_again_once_its_lease_expires(queue, clock):
    job = submit(queue, clock, "m")
    assert queue.next(["training"], "dead").id == job.id
    clock.advance(LEASE_S - 1)
    assert queue.next(["training"], "alive") is None  # the lease still holds
    clock.advance(2)
    resumed = queue.next(["training"], "alive")
    assert resumed.id == job.id and resumed.attempts == 2 and resumed.runner_id == "alive"
    assert queue.renew([job.id], "dead") == 0 and queue.renew([job.id], "alive") == 1


def test_a_job_held_by_its_submitter_is_left_to_it(queue, clock):
    job = queue.submit("training", {"name": "m"}, held_by="cli")
    assert queue.next(["training"], "worker") is None
    assert queue.take(job.id, "cli").status == JobStatus.RUNNING
    with pytest.raises(JobNotFound):
        queue.take("job-unknown", "cli")


def test_a_held_job_whose_submitter_died_goes_to_a_worker(queue, clock):
    job = queue.submit("training", {"name": "m"}, held_by="cli")
    clock.advance(LEASE_S + 1)
    assert queue.next(["training"], "worker").id == job.id


def test_cancel_ends_a_queued_job_at_once_and_flags_a_running_one(queue, clock):
    queued, running = submit(queue, clock, "a"), submit(queue, clock, "b", priority=1)
    assert queue.next(["training"], "w1").id == running.id
    assert queue.cancel(queued.id).status == JobStatus.CANCELLED
    assert queue.next(["training"], "w1") is None  # a cancelled job never starts
    flagged = queue.cancel(running.id)
    assert flagged.status == JobStatus.RUNNING and flagged.cancel_requested and queue.cancel_requested(running.id)
    assert not queue.cancel_requested(submit(queue, clock, "c").id)
    finished = queue.finish(running.id, JobStatus.CANCELLED)
    assert finished.is_finished and queue.cancel(running.id).status == JobStatus.CANCELLED
    with pytest.raises(JobNotFound):
        queue.cancel("job-unknown")


def test_cancel_of_a_running_job_whose_worker_is_gone_ends_it(queue, clock):
    job = submit(queue, clock, "m")
    queue.next(["training"], "dead")
    clock.advance(LEASE_S + 1)
    assert queue.cancel(job.id).status == JobStatus.CANCELLED


def test_log_lines_are_numbered_and_read_from_a_point(queue, clock):
    job = submit(queue, clock, "m")
    assert [queue.log(job.id, f"line {n}") for n in range(3)] == [1, 2, 3]
    assert queue.logs(job.id) == [(1, "line 0"), (2, "line 1"), (3, "line 2")]
    assert queue.logs(job.id, after=2) == [(3, "line 2")]
    assert queue.logs(submit(queue, clock, "other").id) == []


def test_progress_is_kept_in_the_row(queue, clock):
    job = submit(queue, clock, "m")
    queue.set_progress(job.id, {"step": 3, "total_steps": 10})
    assert queue.get(job.id).progress == {"step": 3, "total_steps": 10}


def test_a_host_slot_is_held_until_it_is_closed(tmp_path):
    slots = HostSlots(tmp_path / "slots", max_concurrent=2)
    first, second = slots.try_acquire(), slots.try_acquire()
    assert first is not None and second is not None and slots.try_acquire() is None
    first.close()
    third = slots.try_acquire()
    assert third is not None
    second.close()
    third.close()


def test_waiting_for_a_slot_is_said_once_and_ends_with_the_stop(tmp_path):
    slots = HostSlots(tmp_path / "slots", max_concurrent=1)
    taken = slots.try_acquire()
    stop, waits = threading.Event(), []
    stop.set()
    with slots.hold(stop, on_wait=lambda: waits.append(1)) as held:
        assert not held and waits == [1]
    taken.close()
    with slots.hold(threading.Event(), on_wait=lambda: waits.append(2)) as held:
        assert held and waits == [1]


# -- the worker, with handlers that block on the test's events ---------------------------------------
class Steps:
    """A handler that runs `steps` steps, each released by the test, asking should_stop at each."""

    def __init__(self, steps: int = 1000) -> None:
        self.steps = steps
        self.release = threading.Semaphore(0)
        self.started: list[str] = []
        self.done_steps: dict[str, int] = {}
        self.entered = threading.Event()

    def __call__(self, ctx: JobContext) -> dict:
        self.started.append(ctx.job.model)
        self.entered.set()
        for step in range(1, self.steps + 1):
            self.release.acquire()
            if ctx.should_stop():
                raise TrainingCancelled(f"stopped at step {step}")
            self.done_steps[ctx.job.id] = step
            ctx.progress(Progress("training", step, self.steps, step / self.steps, 1.0 / step, {}, None))
        return {"steps": self.steps}


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home")


@pytest.fixture
def worker_of(settings, queue):
    started: list[tuple[Worker, threading.Thread]] = []

    def start(handler) -> Worker:
        worker = Worker(settings, queue, handlers={"training": handler}, poll_s=0.05)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        started.append((worker, thread))
        return worker

    yield start
    for worker, thread in started:
        worker.stopping.set()
        thread.join(timeout=30)


def test_jobs_queued_behind_a_running_one_run_in_priority_order(queue, clock, worker_of):
    handler = Steps(steps=1)
    first = submit(queue, clock, "first")
    worker_of(handler)
    wait_until(lambda: handler.started == ["first"], what="the first job to start")
    low = submit(queue, clock, "low", priority=0)
    high = submit(queue, clock, "high", priority=9)
    for _ in range(3):
        handler.release.release()
    wait_until(lambda: queue.get(low.id).is_finished, what="every job to finish")
    assert handler.started == ["first", "high", "low"]
    assert [queue.get(j.id).status for j in (first, high, low)] == [JobStatus.SUCCEEDED] * 3
    assert queue.get(high.id).result == {"steps": 1}
    assert queue.get(high.id).finished_at <= queue.get(low.id).started_at


def test_a_cancelled_job_stops_at_its_next_step(queue, clock, worker_of):
    handler = Steps()
    job = submit(queue, clock, "m")
    worker_of(handler)
    handler.release.release()
    handler.release.release()
    wait_until(lambda: handler.done_steps.get(job.id) == 2, what="two steps")
    queue.cancel(job.id)
    handler.release.release()
    wait_until(lambda: queue.get(job.id).is_finished, what="the job to end")
    ended = queue.get(job.id)
    assert ended.status == JobStatus.CANCELLED and handler.done_steps[job.id] == 2
    assert ended.progress["step"] == 2 and ended.error.code == "job_cancelled"
    lines = [line for _, line in queue.logs(job.id)]
    assert lines[0].startswith("attempt 1 on ") and lines[-1].startswith("cancelled")


def test_a_failing_job_keeps_its_error_code_and_the_worker_goes_on(queue, clock, worker_of):
    def fail(ctx: JobContext) -> dict:
        if ctx.job.model == "bad":
            raise MoorageError("the base model is of the wrong task", code="wrong_base_task")
        raise RuntimeError("a bug, with internal details")

    bad, buggy = submit(queue, clock, "bad", priority=1), submit(queue, clock, "buggy")
    worker_of(fail)
    wait_until(lambda: queue.get(buggy.id).is_finished, what="both jobs to end")
    assert queue.get(bad.id).error.code == "wrong_base_task"
    assert queue.get(buggy.id).error.as_dict() == {"code": "internal_error", "message": "the job failed"}


def test_a_stopping_worker_hands_its_job_back_to_the_queue(queue, clock, worker_of):
    handler = Steps()
    job = submit(queue, clock, "m")
    worker = worker_of(handler)
    handler.release.release()
    wait_until(lambda: handler.done_steps.get(job.id) == 1, what="one step")
    worker.stopping.set()
    handler.release.release()
    wait_until(lambda: queue.get(job.id).status == JobStatus.QUEUED, what="the job to be queued again")
    assert queue.get(job.id).runner_id is None and queue.get(job.id).attempts == 1
