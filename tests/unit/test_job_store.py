"""Job rows in the catalog (SQLite here; tests/integration/test_job_store_postgres.py on PostgreSQL):
start is at-least-once and counts every attempt, finish is exactly-once, unknown ids are told apart
from finished jobs."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from moorage.db.catalog import Catalog, _alembic_config
from moorage.errors import ContentBlocked
from moorage.jobs import Job, JobError, JobNotFound, JobStatus, JobStore


@pytest.fixture
def catalog_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'catalog.db'}"


@pytest.fixture
def store(catalog_url):
    catalog = Catalog(catalog_url)
    yield JobStore(catalog.engine)
    catalog.dispose()


def test_a_created_job_is_queued_and_reads_back(store):
    job = store.create("emb@production", {"inputs": ["a", "b"]}, callback_url="https://hooks.example/x", owner="k1")
    assert job.id.startswith("job-") and job.status == JobStatus.QUEUED and job.attempts == 0
    assert store.get(job.id) == job
    assert store.get("job-unknown") is None
    public = job.public()
    assert public["status"] == "queued" and public["created_at"] == job.created_at.timestamp()
    assert not {"request", "owner", "callback_url"} & set(public)


def test_start_counts_every_attempt_and_skips_finished_jobs(store):
    job = store.create("emb", {"inputs": ["a"]}, job_id="job-1")
    first = store.start(job.id)
    assert first is not None and first.status == JobStatus.RUNNING and first.attempts == 1 and first.started_at
    again = store.start(job.id)  # redelivered after its runner died: at-least-once
    assert again is not None and again.attempts == 2 and again.started_at >= first.started_at
    assert store.finish(job.id, JobStatus.SUCCEEDED, result={"outputs": [1]}) is not None
    assert store.start(job.id) is None  # finished: the runner acks and runs nothing
    assert store.get(job.id).attempts == 2


def test_an_unknown_id_raises_instead_of_looking_finished(store):
    for call in (
        lambda: store.start("job-nope"),
        lambda: store.finish("job-nope", JobStatus.FAILED, error=JobError("x", "y")),
        lambda: store.set_callback_status("job-nope", "delivered: HTTP 200"),
    ):
        with pytest.raises(JobNotFound) as info:
            call()
        assert info.value.code == "job_not_found" and info.value.status == 404


def test_only_the_first_finish_counts(store):
    job = store.create("emb", {"inputs": ["a"]})
    store.start(job.id)
    done = store.finish(job.id, JobStatus.SUCCEEDED, result={"outputs": [[0.5]]})
    assert done is not None and done.status == JobStatus.SUCCEEDED and done.result == {"outputs": [[0.5]]}
    assert done.finished_at is not None and done.error is None
    assert store.finish(job.id, JobStatus.FAILED, error=JobError("internal_error", "the job failed")) is None
    assert store.finish(job.id, JobStatus.SUCCEEDED, result={"outputs": [[9.9]]}) is None
    assert store.get(job.id) == done


def test_a_queued_job_can_fail_without_starting(store):
    job = store.create("emb", {"inputs": ["a"]})
    failed = store.finish(job.id, JobStatus.FAILED, error=JobError("model_not_found", "no model 'emb'"))
    assert failed is not None and failed.attempts == 0 and failed.started_at is None
    assert failed.public()["error"] == {"code": "model_not_found", "message": "no model 'emb'"}


@pytest.mark.parametrize(
    ("status", "kwargs"),
    [
        (JobStatus.SUCCEEDED, {"error": JobError("a", "b")}),
        (JobStatus.FAILED, {"result": {"outputs": []}}),
        (JobStatus.RUNNING, {}),
        (JobStatus.QUEUED, {}),
    ],
)
def test_finish_refuses_an_outcome_that_does_not_fit_its_status(store, status, kwargs):
    job = store.create("emb", {"inputs": ["a"]})
    with pytest.raises(ValueError):
        store.finish(job.id, status, **kwargs)
    assert store.get(job.id).status == JobStatus.QUEUED


def test_a_job_error_is_a_code_and_a_message_never_internal_text():
    refused = JobError.from_exception(ContentBlocked("input 0 is blocked by a content filter"))
    assert refused == JobError("content_blocked", "input 0 is blocked by a content filter")
    internal = JobError.from_exception(RuntimeError("CUDA error at /srv/secret/path.py:12 password=hunter2"))
    assert internal.as_dict() == {"code": "internal_error", "message": "the job failed"}


def test_callback_status_is_recorded_and_bounded(store):
    job = store.create("emb", {"inputs": ["a"]}, callback_url="https://hooks.example/x")
    store.set_callback_status(job.id, "delivered: HTTP 204")
    assert store.get(job.id).callback_status == "delivered: HTTP 204"
    store.set_callback_status(job.id, "x" * 500)
    assert store.get(job.id).callback_status == "x" * 200


def test_racing_starts_and_finishes_from_two_catalogs(catalog_url):
    """Two engines (as two replicas) and eight threads: no start is lost, one finish wins."""
    catalogs = [Catalog(catalog_url), Catalog(catalog_url)]
    stores = [JobStore(c.engine) for c in catalogs]
    job = stores[0].create("emb", {"inputs": ["a"]})
    barrier = threading.Barrier(8)

    def start(i: int) -> Job | None:
        barrier.wait()
        return stores[i % 2].start(job.id)

    def finish(i: int) -> Job | None:
        barrier.wait()
        return stores[i % 2].finish(job.id, JobStatus.SUCCEEDED, result={"by": i})

    with ThreadPoolExecutor(8) as pool:
        started = list(pool.map(start, range(8)))
        finished = list(pool.map(finish, range(8)))
    assert sorted(s.attempts for s in started if s) == list(range(1, 9))
    winners = [f for f in finished if f is not None]
    assert len(winners) == 1
    assert stores[1].get(job.id).result == winners[0].result
    for c in catalogs:
        c.dispose()


def test_the_migration_adds_the_jobs_table_to_an_older_catalog_and_removes_it(tmp_path):
    from alembic import command

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    cfg = _alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
    assert "jobs" not in sa.inspect(engine).get_table_names()
    catalog = Catalog(f"sqlite:///{tmp_path / 'old.db'}")  # opening a catalog upgrades it to the head
    assert "jobs" in sa.inspect(catalog.engine).get_table_names()
    assert JobStore(catalog.engine).create("emb", {"inputs": []}).status == JobStatus.QUEUED
    catalog.dispose()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0002")
    assert "jobs" not in sa.inspect(engine).get_table_names()
    engine.dispose()
