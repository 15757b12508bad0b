"""Job rows on a real PostgreSQL catalog shared by two replicas (two engines, many threads): no start
is lost, of racing finishes exactly one stores its outcome, of racing runners exactly one holds a
job, and an expired lease is reclaimed by exactly one of the runners that race for it."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from moorage.db import Catalog
from moorage.jobs import CALLBACK_PENDING, Job, JobError, JobNotFound, JobStatus, JobStore


@pytest.fixture
def stores(pg_url):
    catalogs = [Catalog(pg_url), Catalog(pg_url)]  # as if two server replicas
    yield [JobStore(c.engine) for c in catalogs]
    for c in catalogs:
        c.dispose()


def test_racing_starts_count_every_attempt_and_one_finish_wins(stores):
    job = stores[0].create("emb@production", {"inputs": ["a"]}, owner="k1")
    num_threads = 16
    barrier = threading.Barrier(num_threads)

    def start(i: int) -> Job | None:
        barrier.wait()
        return stores[i % 2].start(job.id, "r1")  # one runner's redelivered messages

    def finish(i: int) -> Job | None:
        barrier.wait()
        if i % 2:
            return stores[1].finish(job.id, JobStatus.FAILED, error=JobError("internal_error", "the job failed"))
        return stores[0].finish(job.id, JobStatus.SUCCEEDED, result={"by": i})

    with ThreadPoolExecutor(num_threads) as pool:
        started = list(pool.map(start, range(num_threads)))
        finished = list(pool.map(finish, range(num_threads)))
    assert all(s is not None and s.status == JobStatus.RUNNING for s in started)
    assert sorted(s.attempts for s in started if s) == list(range(1, num_threads + 1))  # no lost increment
    winners = [f for f in finished if f is not None]
    assert len(winners) == 1
    stored = stores[1].get(job.id)
    assert stored == winners[0]
    assert stored.created_at.tzinfo is not None and stored.finished_at >= stored.started_at
    assert stores[0].start(job.id, "r1") is None


def test_two_replicas_taking_the_same_jobs_finish_each_exactly_once(stores):
    """Every job is delivered to both replicas (a redelivery storm): each still ends once, and each is
    started by one replica only (the other sees its live lease)."""
    ids = [stores[0].create("emb", {"inputs": [str(i)]}).id for i in range(40)]
    started: list[list[str]] = [[], []]

    def run(replica: int) -> list[str]:
        won = []
        for job_id in ids:
            if stores[replica].start(job_id, f"replica-{replica}") is None:
                continue
            started[replica].append(job_id)
            if stores[replica].finish(job_id, JobStatus.SUCCEEDED, result={"replica": replica}) is not None:
                won.append(job_id)
        return won

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, (0, 1)))
    assert sorted(results[0] + results[1]) == sorted(ids)
    assert sorted(started[0] + started[1]) == sorted(ids)  # no job started twice
    for replica, won in enumerate(results):
        for job_id in won:
            job = stores[1 - replica].get(job_id)
            assert job.status == JobStatus.SUCCEEDED and job.result == {"replica": replica}


def test_racing_runners_starting_the_same_batch_take_each_job_once_and_finish_it_once(stores):
    """Two replicas receive the same batch (a duplicate delivery): each job is started by exactly one
    of the racing runners, and of their batch finishes only the first of each job counts."""
    ids = [stores[0].create("emb", {"inputs": [str(i)]}).id for i in range(20)]
    barrier = threading.Barrier(8)

    def start(i: int) -> dict[str, Job]:
        barrier.wait()
        return stores[i % 2].start_many(ids, f"r{i}")

    with ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(start, range(8)))
    assert sorted(job_id for b in batches for job_id in b) == sorted(ids)
    outcomes = [(job_id, JobStatus.SUCCEEDED, {"by": 0}, None) for job_id in ids]
    assert len(stores[0].finish_many(outcomes, runner_id="r0")) == len(ids)
    assert stores[1].finish_many([(ids[0], JobStatus.SUCCEEDED, {"by": 1}, None)], runner_id="r1") == []
    assert stores[1].get(ids[0]).result == {"by": 0}


def test_an_unknown_job_is_not_a_finished_one_on_postgres(stores):
    with pytest.raises(JobNotFound):
        stores[0].start("job-from-another-catalog", "r1")
    with pytest.raises(JobNotFound):
        stores[1].finish("job-from-another-catalog", JobStatus.SUCCEEDED, result={})


def test_racing_runners_reclaim_an_expired_lease_once(pg_url):
    """A runner died holding a running job and a pending callback; eight runners see the leases
    expire at once: one of them takes each."""
    catalogs = [Catalog(pg_url), Catalog(pg_url)]
    stores = [JobStore(c.engine, lease_s=1.0) for c in catalogs]
    running = stores[0].create("emb", {"inputs": ["a"]})
    called = stores[0].create("emb", {"inputs": ["b"]}, callback_url="https://hooks.example/x")
    stores[0].start(running.id, "dead")
    stores[0].start(called.id, "dead")
    assert stores[0].finish(called.id, JobStatus.SUCCEEDED, result={}, runner_id="dead").callback_status == (
        CALLBACK_PENDING
    )
    stores[0].expire("dead")  # as if lease_s had passed
    expired = stores[1].expired()
    assert {j.id for j in expired} == {running.id, called.id}
    barrier = threading.Barrier(8)

    def reclaim(i: int) -> list[Job]:
        barrier.wait()
        return [t for j in expired if (t := stores[i % 2].reclaim(j, f"r{i}")) is not None]

    with ThreadPoolExecutor(8) as pool:
        taken = [t for ts in pool.map(reclaim, range(8)) for t in ts]
    assert sorted(t.id for t in taken) == sorted([running.id, called.id])
    assert stores[0].get(running.id).status == JobStatus.QUEUED
    (callback,) = [t for t in taken if t.id == called.id]
    assert stores[1].begin_callback(called.id, callback.runner_id) == 2  # the dead runner's finish counted one
    for c in catalogs:
        c.dispose()
