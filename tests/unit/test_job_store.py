"""Job rows in the catalog (SQLite here; tests/integration/test_job_store_postgres.py on PostgreSQL):
start is at-least-once and counts every attempt, finish is exactly-once, unknown ids are told apart
from finished jobs, and a runner's leases keep other runners off its jobs until they expire, when
any runner reclaims them (a clock the test moves stands in for time passing)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from moorage.db.catalog import Catalog, _alembic_config
from moorage.errors import ContentBlocked
from moorage.jobs import CALLBACK_PENDING, Job, JobError, JobNotFound, JobStatus, JobStore

LEASE_S = 20.0


class Clock:
    """UTC time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def catalog_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'catalog.db'}"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(catalog_url, clock):
    catalog = Catalog(catalog_url)
    yield JobStore(catalog.engine, lease_s=LEASE_S, clock=clock)
    catalog.dispose()


def test_a_created_job_is_queued_and_reads_back(store):
    job = store.create("emb@production", {"inputs": ["a", "b"]}, callback_url="https://hooks.example/x", owner="k1")
    assert job.id.startswith("job-") and job.status == JobStatus.QUEUED and job.attempts == 0
    assert store.get(job.id) == job
    assert store.get("job-unknown") is None
    public = job.public()
    assert public["status"] == "queued" and public["created_at"] == job.created_at.timestamp()
    assert not {"request", "owner", "callback_url"} & set(public)


def test_start_counts_every_attempt_and_skips_finished_jobs(store, clock):
    job = store.create("emb", {"inputs": ["a"]}, job_id="job-1")
    first = store.start(job.id, "r1")
    assert first is not None and first.status == JobStatus.RUNNING and first.attempts == 1 and first.started_at
    assert first.runner_id == "r1" and first.lease_expires_at == clock.now + timedelta(seconds=LEASE_S)
    clock.advance(1)
    again = store.start(job.id, "r1")  # redelivered to the same runner: at-least-once
    assert again is not None and again.attempts == 2 and again.started_at > first.started_at
    assert store.finish(job.id, JobStatus.SUCCEEDED, result={"outputs": [1]}, runner_id="r1") is not None
    assert store.start(job.id, "r1") is None  # finished: the runner acks and runs nothing
    assert store.get(job.id).attempts == 2


def test_a_live_lease_keeps_other_runners_off_until_it_expires(store, clock):
    job = store.create("emb", {"inputs": ["a"]})
    assert store.start(job.id, "r1") is not None
    clock.advance(LEASE_S - 1)
    assert store.start(job.id, "r2") is None  # a duplicate message: r1 is alive and runs it
    assert store.claim([job.id], "r2") == set()
    assert store.expired() == []
    assert store.renew([job.id], "r1") == 1  # r1 still works on it
    clock.advance(LEASE_S - 1)
    assert store.start(job.id, "r2") is None and store.expired() == []
    clock.advance(2)  # r1 stopped renewing (it died): the lease has run out
    taken = store.start(job.id, "r2")
    assert taken is not None and taken.runner_id == "r2" and taken.attempts == 2
    assert store.renew([job.id], "r1") == 0  # r1's lease is gone; r2's is not r1's to renew


def test_claim_leases_received_jobs_that_are_free_and_skips_the_rest(store, clock):
    free, held, done = (store.create("emb", {"inputs": [str(i)]}) for i in range(3))
    store.start(held.id, "r1")
    store.finish(done.id, JobStatus.SUCCEEDED, result={})
    assert store.claim([free.id, held.id, done.id, "job-unknown"], "r2") == {free.id}
    claimed = store.get(free.id)
    assert claimed.status == JobStatus.QUEUED and claimed.runner_id == "r2" and claimed.attempts == 0
    assert store.claim([held.id], "r1") == {held.id}  # its own: renewed
    assert store.start(free.id, "r1") is None  # r2 received it first
    assert store.start(free.id, "r2").attempts == 1


def _transactions(store) -> list[int]:
    """A counter of the catalog transactions `store` begins from now on (one item each)."""
    begun: list[int] = []
    sa.event.listen(store.engine, "begin", lambda conn: begun.append(1))
    return begun


def test_a_received_batch_starts_in_one_transaction_and_leaves_the_rest_to_start(store, clock):
    free, mine, held, done = (store.create("emb", {"inputs": [str(i)]}) for i in range(4))
    store.start(mine.id, "r1")  # redelivered to the runner that holds it
    store.start(held.id, "r2")  # a live lease of another runner
    store.finish(done.id, JobStatus.SUCCEEDED, result={})
    begun = _transactions(store)
    started = store.start_many([free.id, mine.id, held.id, done.id, "job-unknown"], "r1")
    assert len(begun) == 1  # one write lock for the batch, not one per job
    assert set(started) == {free.id, mine.id}
    assert started[free.id] == store.get(free.id) and started[free.id].attempts == 1
    assert started[mine.id].attempts == 2 and started[mine.id].status == JobStatus.RUNNING
    assert started[free.id].runner_id == "r1" and started[free.id].lease_expires_at == clock.now + timedelta(
        seconds=LEASE_S
    )
    assert store.start(held.id, "r1") is None and store.start(done.id, "r1") is None  # each start tells why
    with pytest.raises(JobNotFound):
        store.start("job-unknown", "r1")
    assert store.start_many([], "r1") == {}


def test_a_written_batch_finishes_in_one_transaction_and_only_the_first_finish_counts(store):
    a, b, done = (store.create("emb", {"inputs": [str(i)]}, callback_url="https://hooks.example/x") for i in range(3))
    for job in (a, b, done):
        store.start(job.id, "r1")
    store.finish(done.id, JobStatus.SUCCEEDED, result={"first": True}, runner_id="r1")
    begun = _transactions(store)
    error = JobError("content_blocked", "refused")
    finished = store.finish_many(
        [
            (a.id, JobStatus.SUCCEEDED, {"outputs": [1]}, None),
            (done.id, JobStatus.SUCCEEDED, {"second": True}, None),  # a redelivered message's
            ("job-unknown", JobStatus.SUCCEEDED, {}, None),
            (b.id, JobStatus.FAILED, None, error),
        ],
        runner_id="r1",
    )
    assert len(begun) == 1
    assert [j.id for j in finished] == [a.id, b.id]  # in order, without the finished and the unknown
    assert finished[0].result == {"outputs": [1]} and finished[1].error == error
    assert all(j.callback_status == CALLBACK_PENDING and j.callback_attempts == 1 for j in finished)
    assert store.get(done.id).result == {"first": True}
    with pytest.raises(ValueError):  # refused before anything is written
        store.finish_many([(a.id, JobStatus.FAILED, None, None)])


def test_a_job_handed_back_is_queued_again_and_held_by_no_one(store):
    job = store.create("emb", {"inputs": ["a"]})
    store.start(job.id, "r1")
    assert store.release([job.id], "r2") == 0  # not r2's
    assert store.release([job.id], "r1") == 1
    back = store.get(job.id)
    assert (back.status, back.runner_id, back.lease_expires_at) == (JobStatus.QUEUED, None, None)
    assert store.start(job.id, "r2").attempts == 2  # whoever receives its message next runs it


def test_expired_leases_are_reclaimed_once_a_running_job_goes_back_to_the_queue(store, clock):
    running, claimed, other = (store.create("emb", {"inputs": [str(i)]}) for i in range(3))
    store.start(running.id, "dead")
    store.claim([claimed.id], "dead")  # received, not started yet, when the runner died
    store.start(other.id, "alive")
    clock.advance(LEASE_S / 2)
    store.renew([other.id], "alive")
    clock.advance(LEASE_S / 2)
    expired = store.expired()
    assert {j.id for j in expired} == {running.id, claimed.id}  # never the live runner's job
    first = store.reclaim(expired[0], "r2")
    assert first is not None and first.status == JobStatus.QUEUED and first.runner_id is None
    assert store.reclaim(expired[0], "r3") is None  # another runner was first: nothing to do twice
    assert [j.id for j in store.expired()] == [expired[1].id]
    store.renew([expired[1].id], "dead")  # a runner that was only slow and renews in time keeps its job
    assert store.reclaim(expired[1], "r2") is None and store.expired() == []


def test_a_finished_job_with_a_callback_stays_leased_until_the_callback_is_recorded(store, clock):
    job = store.create("emb", {"inputs": ["a"]}, callback_url="https://hooks.example/x")
    plain = store.create("emb", {"inputs": ["b"]})
    store.start(job.id, "r1")
    store.start(plain.id, "r1")
    done = store.finish(job.id, JobStatus.SUCCEEDED, result={"outputs": [1]}, runner_id="r1")
    assert done.callback_status == CALLBACK_PENDING and done.lease_expires_at is not None
    assert done.callback_attempts == 1  # the finish counts r1's delivery
    plain_done = store.finish(plain.id, JobStatus.SUCCEEDED, result={}, runner_id="r1")
    assert plain_done.lease_expires_at is None and plain_done.callback_attempts == 0
    assert store.begin_callback(job.id, "r2") is None  # not r2's to deliver
    clock.advance(LEASE_S + 1)  # r1 died while delivering it
    (expired,) = store.expired()
    taken = store.reclaim(expired, "r2")
    assert taken is not None and taken.status == JobStatus.SUCCEEDED and taken.runner_id == "r2"
    assert taken.result == done.result and taken.finished_at == done.finished_at  # the stored outcome, once
    assert store.begin_callback(job.id, "r1") is None  # r1 (if only slow) leaves it to r2
    assert store.begin_callback(job.id, "r2") == 2
    store.set_callback_status(job.id, "delivered: HTTP 204")
    delivered = store.get(job.id)
    assert delivered.lease_expires_at is None and delivered.callback_attempts == 2
    clock.advance(LEASE_S * 2)
    assert store.expired() == [] and store.begin_callback(job.id, "r2") is None


def test_a_stopping_runner_ends_its_leases_at_once(store):
    job = store.create("emb", {"inputs": ["a"]})
    store.start(job.id, "r1")
    assert store.expired() == []
    assert store.expire("r1") == 1
    assert [j.id for j in store.expired()] == [job.id]


def test_a_job_finished_without_a_runner_owes_no_callback(store):
    job = store.create("emb", {"inputs": ["a"]}, callback_url="https://hooks.example/x")
    failed = store.finish(job.id, JobStatus.FAILED, error=JobError("enqueue_failed", "submit it again"))
    assert failed.callback_status is None and failed.lease_expires_at is None


def test_an_unknown_id_raises_instead_of_looking_finished(store):
    for call in (
        lambda: store.start("job-nope", "r1"),
        lambda: store.finish("job-nope", JobStatus.FAILED, error=JobError("x", "y")),
        lambda: store.set_callback_status("job-nope", "delivered: HTTP 200"),
    ):
        with pytest.raises(JobNotFound) as info:
            call()
        assert info.value.code == "job_not_found" and info.value.status == 404


def test_only_the_first_finish_counts(store):
    job = store.create("emb", {"inputs": ["a"]})
    store.start(job.id, "r1")
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
    """Two engines (as two replicas) and eight threads of one runner: no start is lost, one finish wins."""
    catalogs = [Catalog(catalog_url), Catalog(catalog_url)]
    stores = [JobStore(c.engine) for c in catalogs]
    job = stores[0].create("emb", {"inputs": ["a"]})
    barrier = threading.Barrier(8)

    def start(i: int) -> Job | None:
        barrier.wait()
        return stores[i % 2].start(job.id, "r1")

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


def test_racing_runners_one_takes_the_job(catalog_url):
    """Eight runners start the same queued job at once (a redelivery storm): exactly one holds it."""
    catalogs = [Catalog(catalog_url), Catalog(catalog_url)]
    stores = [JobStore(c.engine) for c in catalogs]
    job = stores[0].create("emb", {"inputs": ["a"]})
    barrier = threading.Barrier(8)

    def start(i: int) -> Job | None:
        barrier.wait()
        return stores[i % 2].start(job.id, f"r{i}")

    with ThreadPoolExecutor(8) as pool:
        started = [s for s in pool.map(start, range(8)) if s is not None]
    assert len(started) == 1 and started[0].attempts == 1
    assert stores[1].get(job.id).runner_id == started[0].runner_id
    for c in catalogs:
        c.dispose()


def test_the_lease_migration_marks_what_an_older_server_left_as_reclaimable(tmp_path):
    from alembic import command

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    cfg = _alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
    old = {"model": "emb", "request": "{}", "attempts": 1, "created_at": "2026-12-01 10:00:00.000000"}
    rows = [
        {"id": "job-running", "status": "running", "callback_url": None, "callback_status": None},
        {"id": "job-queued", "status": "queued", "callback_url": None, "callback_status": None},
        {"id": "job-uncalled", "status": "succeeded", "callback_url": "https://h.example/x", "callback_status": None},
        {"id": "job-called", "status": "succeeded", "callback_url": "https://h.example/x", "callback_status": "ok"},
    ]
    with engine.begin() as conn:
        for row in rows:
            conn.execute(
                sa.text(
                    "INSERT INTO jobs (id, model, status, request, callback_url, callback_status, attempts, created_at)"
                    " VALUES (:id, :model, :status, :request, :callback_url, :callback_status, :attempts, :created_at)"
                ),
                old | row,
            )
    catalog = Catalog(f"sqlite:///{tmp_path / 'old.db'}")  # upgrades to the head
    store = JobStore(catalog.engine)
    assert {j.id for j in store.expired()} == {"job-running", "job-uncalled"}
    assert store.get("job-uncalled").callback_status == CALLBACK_PENDING
    assert store.get("job-called").callback_attempts == 0
    catalog.dispose()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0003")
    assert "lease_expires_at" not in {c["name"] for c in sa.inspect(engine).get_columns("jobs")}
    engine.dispose()


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


def test_a_runner_whose_process_died_is_told_from_a_live_one_by_its_lock_file(tmp_path):
    """The lock is the kernel's: held while the process lives, dropped when it is SIGKILLed."""
    import signal
    import subprocess
    import sys

    from moorage.jobs.liveness import RunnerLock

    folder = tmp_path / "runners"
    holder = (
        "import sys; from pathlib import Path; from moorage.jobs.liveness import RunnerLock; "
        f"lock = RunnerLock(Path({str(folder)!r}), sys.argv[1]); lock.acquire(); print('locked', flush=True); "
        "sys.stdin.read()"
    )
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", holder, name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for name in ("doomed", "alive")
    }
    try:
        for proc in procs.values():
            assert proc.stdout.readline() == "locked\n"
        me = RunnerLock(folder, "me")
        me.acquire()
        assert me.dead_runners() == []
        procs["doomed"].send_signal(signal.SIGKILL)
        procs["doomed"].wait(timeout=30)
        assert me.dead_runners() == ["doomed"]
        assert sorted(p.name for p in folder.iterdir()) == ["alive.lock", "me.lock"]  # its file is gone
        assert me.dead_runners() == []
        me.release()
        assert not (folder / "me.lock").exists()
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(timeout=30)
