"""Job rows on a real PostgreSQL catalog shared by two replicas (two engines, many threads): no start
is lost, and of racing finishes exactly one stores its outcome."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from moorage.db import Catalog
from moorage.jobs import Job, JobError, JobNotFound, JobStatus, JobStore


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
        return stores[i % 2].start(job.id)

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
    assert stores[0].start(job.id) is None


def test_two_replicas_taking_the_same_jobs_finish_each_exactly_once(stores):
    """Every job is delivered to both replicas (a redelivery storm): each still ends once."""
    ids = [stores[0].create("emb", {"inputs": [str(i)]}).id for i in range(40)]

    def run(replica: int) -> list[str]:
        won = []
        for job_id in ids:
            if stores[replica].start(job_id) is None:
                continue
            if stores[replica].finish(job_id, JobStatus.SUCCEEDED, result={"replica": replica}) is not None:
                won.append(job_id)
        return won

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, (0, 1)))
    assert sorted(results[0] + results[1]) == sorted(ids)
    for replica, won in enumerate(results):
        for job_id in won:
            job = stores[1 - replica].get(job_id)
            assert job.status == JobStatus.SUCCEEDED and job.result == {"replica": replica}


def test_an_unknown_job_is_not_a_finished_one_on_postgres(stores):
    with pytest.raises(JobNotFound):
        stores[0].start("job-from-another-catalog")
    with pytest.raises(JobNotFound):
        stores[1].finish("job-from-another-catalog", JobStatus.SUCCEEDED, result={})
