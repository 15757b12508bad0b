"""POST /v1/jobs + GET /v1/jobs/{id}: the same results as a direct predict, durable, with callbacks;
the leases of a dead runner reclaimed, a live runner's left alone."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import sqlalchemy as sa

from moorage.config import load_settings
from moorage.jobs import Job, JobStatus, JobStore
from moorage.registry import Registry
from moorage.streams import open_broker
from moorage.streams.jobs import Leases

from tests.support import eventually

pytestmark = pytest.mark.anyio


def _settings(home, **env) -> object:
    base = {"MOORAGE_HOME": str(home), "MOORAGE_USER": "tester", "MOORAGE_SECURITY__AUTH": "false"}
    return load_settings(environ=base | {f"MOORAGE_{k.upper()}": v for k, v in env.items()})


@pytest.fixture
def settings(home):
    """This module's callback receiver listens on 127.0.0.1, which the egress policy refuses unless allowed."""
    return _settings(home, jobs__callback_allow='["127.0.0.1"]')


@pytest.fixture
def models(registry, fake_model):
    registry.register(fake_model("embed"), "emb", "embed", alias="production")
    registry.register(fake_model("generate"), "gen", "generate")
    return registry


class Received(list):
    def __init__(self) -> None:
        super().__init__()
        self.headers: list[dict] = []


@pytest.fixture
def callback_server():
    """A local HTTP endpoint that records the JSON bodies POSTed to it (and their headers, in
    ``received.headers``)."""
    received = Received()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.headers.append(dict(self.headers))
            received.append(body)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


async def wait_job(client, job_id: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        if job["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return job
        await asyncio.sleep(0.05)


async def test_a_job_gives_the_same_outputs_as_predict_and_calls_back(settings, models, serving, callback_server):
    hook, received = callback_server
    async with serving(settings, models, refs=("emb@production", "gen")) as (_, c):
        direct = (await c.post("/v1/models/emb@production/predict", json={"inputs": ["a", "b"]})).json()
        r = await c.post("/v1/jobs", json={"model": "emb@production", "inputs": ["a", "b"], "callback_url": hook})
        assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
        assert r.json()["status"] == "queued"
        job = await wait_job(c, r.json()["id"])
        assert job["status"] == "succeeded", job
        assert job["result"]["outputs"] == direct["outputs"]
        assert job["result"]["version"] == 1 and job["started_at"] <= job["finished_at"]
        gen = await c.post("/v1/jobs", json={"model": "gen", "inputs": ["hi"], "parameters": {"max_new_tokens": 5}})
        gen_job = await wait_job(c, gen.json()["id"])
        assert gen_job["result"]["outputs"][0]["completion_tokens"] == 5
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert received and received[0]["id"] == job["id"] and received[0]["status"] == "succeeded"
        assert (await wait_job(c, job["id"]))["callback_status"] == "delivered: HTTP 204"


async def test_job_errors_are_precise(settings, models, serving):
    limits = settings.security.limits.model_copy(
        update={"max_tokens": 10**7}
    )  # a too-long generation reaches the model
    settings = settings.model_copy(update={"security": settings.security.model_copy(update={"limits": limits})})
    async with serving(settings, models, refs=("emb@production", "gen")) as (_, c):
        r = await c.post("/v1/jobs", json={"model": "nope", "inputs": ["a"]})
        assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found")
        r = await c.post("/v1/jobs", json={"model": "emb", "inputs": []})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "empty_input")
        r = await c.post("/v1/jobs", json={"model": "emb", "inputs": ["a"], "callback_url": "file:///etc/passwd"})
        assert r.status_code == 422
        r = await c.get("/v1/jobs/job-doesnotexist")
        assert (r.status_code, r.json()["error"]["code"]) == (404, "job_not_found")
        r = await c.post("/v1/jobs", json={"model": "gen", "inputs": ["hi"], "parameters": {"max_new_tokens": 10**8}})
        assert (r.status_code, r.json()["error"]["code"]) == (422, "max_tokens_too_large")
        # accepted, then fails in the model: the job says why, with the same code a predict would give
        r = await c.post("/v1/jobs", json={"model": "gen", "inputs": ["hi"], "parameters": {"max_new_tokens": 10**6}})
        job = await wait_job(c, r.json()["id"])
        assert job["status"] == "failed" and job["error"]["code"] == "context_length_exceeded"


async def test_a_job_left_in_the_queue_by_a_dead_server_runs_on_the_next(settings, models, serving):
    """What a server that accepted a job and died before running it leaves behind: the job row in the
    catalog and its queue message. The next server runs it."""
    job = JobStore(models.catalog.engine).create("emb", {"inputs": ["kept"]}, job_id="job-left-behind")
    queue_url = f"sqlite:///{settings.home / 'jobs-queue.db'}?topic=jobs"
    async with open_broker(queue_url) as queue:
        await queue.publish([json.dumps({"id": job.id}).encode()])
    async with serving(settings, models, refs=("emb@production",)) as (_, c):
        done = await wait_job(c, "job-left-behind")
    assert done["status"] == "succeeded" and len(done["result"]["outputs"]) == 1


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://10.0.0.1/hook", "http://169.254.169.254/latest"])
async def test_a_callback_to_an_internal_address_is_refused_by_default(url, home, models, serving):
    settings = _settings(home)  # no jobs.callback_allow
    async with serving(settings, models, refs=("emb@production",)) as (_, c):
        r = await c.post("/v1/jobs", json={"model": "emb", "inputs": ["a"], "callback_url": url})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "callback_not_allowed")


async def test_a_job_unknown_to_this_catalog_is_retried_then_dead_lettered_never_acked(tmp_path, fake_model, serving):
    """Two replicas sharing one queue but not one catalog (a misconfiguration): the replica that
    does not know a job gives its message back; it is never acknowledged as done."""
    queue_url = f"sqlite:///{tmp_path / 'shared-queue.db'}?topic=jobs&max_deliveries=3&visibility_timeout=60"
    settings = _settings(tmp_path / "b", stream__jobs_url=queue_url)
    registry = Registry.from_settings(settings)
    registry.register(fake_model("embed"), "emb", "embed")
    async with open_broker(queue_url) as queue:
        await queue.publish([json.dumps({"id": "job-from-another-catalog"}).encode()])
        async with serving(settings, registry, refs=("emb",)):
            deadline = time.monotonic() + 60
            while not await queue.dead_letters() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        (dead,) = await queue.dead_letters()
    registry.close()
    assert dead.reason.startswith("max_deliveries") and "job_not_found" in dead.reason


def _lease_settings(home, **env):
    return _settings(home, jobs__callback_allow='["127.0.0.1"]', jobs__lease_s="1", **env)


async def test_a_dead_runners_jobs_are_reclaimed_at_start_up(home, models, serving, callback_server):
    """What a server SIGKILLed mid-run leaves: a running job and a finished job whose callback it had
    begun, both leased to it, their messages still hidden in the queue. The next server reclaims
    both: the job runs again, the callback arrives with the job's id as its idempotency key."""
    hook, received = callback_server
    store = JobStore(models.catalog.engine)
    running = store.create("emb", {"inputs": ["left running"]}, callback_url=hook)
    uncalled = store.create("emb", {"inputs": ["finished"]}, callback_url=hook)
    store.start(running.id, "dead-runner")
    store.start(uncalled.id, "dead-runner")
    # its finish counted a first delivery, then it died before the callback was recorded
    store.finish(uncalled.id, JobStatus.SUCCEEDED, {"outputs": ["stored once"]}, runner_id="dead-runner")
    store.expire("dead-runner")  # as if lease_s had passed; no queue message exists for either job
    async with serving(_lease_settings(home), models, refs=("emb@production",)) as (_, c):
        await eventually(lambda: len(received) == 2, what="both callbacks")
        done = await wait_job(c, running.id)
        called = await wait_job(c, uncalled.id)
    assert done["status"] == "succeeded" and len(done["result"]["outputs"]) == 1
    assert store.get(running.id).attempts == 2  # the dead runner's start and this one
    assert called["result"] == {"outputs": ["stored once"]}  # delivered, not run again
    by_id = {body["id"]: headers for body, headers in zip(received, received.headers)}
    assert by_id[uncalled.id]["Idempotency-Key"] == uncalled.id
    assert by_id[uncalled.id]["Moorage-Callback-Delivery"] == "2"
    assert by_id[running.id]["Idempotency-Key"] == running.id
    for job_id in (running.id, uncalled.id):
        job = store.get(job_id)
        assert job.callback_status == "delivered: HTTP 204" and job.lease_expires_at is None


async def test_a_live_runners_job_is_not_taken_until_its_lease_expires(home, models, serving):
    """A duplicate message of a job that another, live, runner holds is acknowledged and runs nothing
    here; once that runner stops renewing, this server reclaims the job and runs it."""
    settings = _lease_settings(home)
    store = JobStore(models.catalog.engine, lease_s=3600)  # the other runner's lease: live
    job = store.create("emb", {"inputs": ["held"]})
    store.start(job.id, "live-runner")
    queue_url = f"sqlite:///{settings.home / 'jobs-queue.db'}?topic=jobs"
    async with open_broker(queue_url) as queue:
        await queue.publish([json.dumps({"id": job.id}).encode()])
        async with serving(settings, models, refs=("emb@production",)) as (_, c):
            lag = [None]

            async def consumed() -> None:
                while lag[0] != 0:
                    lag[0] = await queue.lag()
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(consumed(), timeout=30)  # the duplicate was acknowledged
            held = store.get(job.id)
            assert (held.status, held.runner_id, held.attempts) == (JobStatus.RUNNING, "live-runner", 1)
            store.expire("live-runner")  # it died
            done = await wait_job(c, job.id)
    assert done["status"] == "succeeded" and store.get(job.id).attempts == 2


async def test_a_job_handed_back_to_the_queue_is_queued_not_running(home, models, serving):
    """A job for a model this server does not serve goes back to the broker (another replica may
    serve it): its row says queued again, and no runner holds it."""
    queue_url = f"sqlite:///{home / 'handback-queue.db'}?topic=jobs&max_deliveries=1000"
    settings = _lease_settings(home, stream__jobs_url=queue_url)
    store = JobStore(models.catalog.engine)
    job = store.create("gen", {"inputs": ["hi"]})  # gen is registered, not served here
    async with open_broker(queue_url) as queue:
        await queue.publish([json.dumps({"id": job.id}).encode()])
        async with serving(settings, models, refs=("emb@production",)):

            def handed_back() -> bool:
                row = store.get(job.id)
                return row.attempts >= 1 and row.status == JobStatus.QUEUED

            await eventually(handed_back, what="the job handed back and queued")
    row = store.get(job.id)
    assert row.runner_id is None and row.lease_expires_at is None


class _Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def test_tend_renews_its_own_leases_and_reclaims_only_expired_ones(models):
    clock = _Clock()
    store = JobStore(models.catalog.engine, lease_s=10, clock=clock)
    mine, dead, called = (
        store.create("emb", {"inputs": [str(i)]}, callback_url="https://h.example/x") for i in range(3)
    )
    leases = Leases(store, "r1")
    store.start(mine.id, "r1")
    leases.working.add(mine.id)
    store.start(dead.id, "dead")
    store.start(called.id, "dead")
    store.finish(called.id, JobStatus.SUCCEEDED, {"outputs": [1]}, runner_id="dead")
    published: list[str] = []
    calls: list[Job] = []

    async def publish(job_id: str) -> None:
        published.append(job_id)

    clock.now += timedelta(seconds=9)
    assert await leases.tend(publish, calls.append) == 0  # nothing has expired yet; r1 renews its own
    clock.now += timedelta(seconds=9)  # the dead runner's leases ran out, r1's did not
    assert await leases.tend(publish, calls.append) == 2
    assert published == [dead.id] and [j.id for j in calls] == [called.id]
    assert store.get(dead.id).status == JobStatus.QUEUED and store.get(mine.id).runner_id == "r1"
    assert calls[0].runner_id == "r1" and calls[0].result == {"outputs": [1]}
    assert await leases.tend(publish, calls.append) == 0  # each taken once


async def test_a_reclaimed_job_whose_message_could_not_be_published_is_reclaimed_again(models):
    clock = _Clock()
    store = JobStore(models.catalog.engine, lease_s=10, clock=clock)
    job = store.create("emb", {"inputs": ["a"]})
    store.start(job.id, "dead")
    store.expire("dead")
    leases = Leases(store, "r1")

    async def broker_down(job_id: str) -> None:
        raise ConnectionError("the queue is down")

    with pytest.raises(ConnectionError):
        await leases.tend(broker_down, lambda job: None)
    held = store.get(job.id)
    assert held.runner_id == "r1" and held.lease_expires_at is not None and job.id not in leases.working
    published: list[str] = []

    async def publish(job_id: str) -> None:
        published.append(job_id)

    assert await leases.tend(publish, lambda job: None) == 0  # not renewed, not expired yet
    clock.now += timedelta(seconds=11)
    assert await leases.tend(publish, lambda job: None) == 1 and published == [job.id]


async def test_a_received_batch_costs_one_catalog_transaction_to_start_and_one_to_finish(models, tmp_path):
    """On a SQLite catalog every transaction takes the write lock that the runner's callbacks, lease
    renewals and other replicas wait for: a batch's starts and finishes are one transaction each, not
    one per job. A message whose job did not start with its batch (finished already) is skipped."""
    from moorage.config import JobSettings
    from moorage.streams.jobs import JobCodec, JobQueue, JobSink, job_message
    from moorage.streams.worker import Skip

    store = JobStore(models.catalog.engine)
    jobs = [store.create("emb", {"inputs": [str(i)]}) for i in range(8)]
    store.finish(jobs[-1].id, JobStatus.SUCCEEDED, result={"outputs": []})  # its message is a replay
    leases = Leases(store, "r1")
    sink = JobSink(store, JobSettings(), leases)
    codec = JobCodec(store, lambda model: None, sink)
    queue = JobQueue(open_broker(f"sqlite:///{tmp_path / 'q.db'}?topic=jobs"), leases)
    await queue.connect()
    try:
        await queue.publish([job_message(j.id) for j in jobs])
        begun: list[int] = []
        sa.event.listen(store.engine, "begin", lambda conn: begun.append(1))
        messages = await queue.receive(8, 1.0)
        assert len(messages) == 8 and len(begun) == 1
        works = [await codec.decode(m) for m in messages[:-1]]
        with pytest.raises(Skip):
            await codec.decode(messages[-1])
        assert len(begun) == 2  # the finished one's own start tells it apart
        assert [w.id for w in works] == [j.id for j in jobs[:-1]] and leases.working == {w.id for w in works}
        await sink.write([{"id": w.id, "status": "succeeded", "result": {"outputs": [w.id]}} for w in works])
        assert len(begun) == 3
        assert all(w.context.status == JobStatus.RUNNING and w.context.attempts == 1 for w in works)
        await queue.ack(messages)
        assert leases.working == set() and leases.received == {}
        assert all(store.get(w.id).result == {"outputs": [w.id]} for w in works)
    finally:
        await sink.close()
        await queue.close()


async def test_the_queue_messages_of_a_runner_found_dead_are_delivered_again_at_once(models, tmp_path):
    """A runner killed between receiving a batch and leasing its jobs in the catalog leaves jobs that
    no job lease marks as held: only its queue leases do. The SQLite queue names the consumer in each
    lease, so a runner found dead (its lock file free, or its job leases expired) has its messages
    delivered again now, not when their visibility timeout ends."""
    url = f"sqlite:///{tmp_path / 'q.db'}?topic=jobs&visibility_timeout=600"
    dead, alive, other = (open_broker(f"{url}&consumer={name}") for name in ("dead-1", "alive-2", "dead-10"))
    for broker in (dead, alive, other):
        await broker.connect()
    try:
        await dead.publish([b'{"id": "job-a"}', b'{"id": "job-b"}', b'{"id": "job-c"}'])
        held = await dead.receive(2, 0.1)
        held_by_other = await other.receive(1, 0.1)
        assert len(held) == 2 and len(held_by_other) == 1
        assert await alive.receive(8, 0.1) == []  # hidden for the visibility timeout
        assert await alive.release_consumer("dead-1") == 2  # not dead-10's, whose name starts alike
        again = await alive.receive(8, 0.1)
        assert sorted(m.body for m in again) == sorted(m.body for m in held) and {m.attempts for m in again} == {2}
        await dead.ack(held)  # the dead runner's handles settle nothing any more
        await alive.ack(again)
        assert await alive.lag() == 1
    finally:
        for broker in (dead, alive, other):
            await broker.close()


async def test_tend_names_each_runner_whose_expired_leases_it_took(models):
    clock = _Clock()
    store = JobStore(models.catalog.engine, lease_s=10, clock=clock)
    mine, a, b = (store.create("emb", {"inputs": [str(i)]}) for i in range(3))
    store.start(mine.id, "r1")
    store.start(a.id, "dead-1")
    store.start(b.id, "dead-1")
    leases = Leases(store, "r1")  # r1 lost track of its own job: its lease expires too
    gone: list[str] = []

    async def publish(job_id: str) -> None:
        pass

    async def on_gone(runner_id: str) -> None:
        gone.append(runner_id)

    clock.now += timedelta(seconds=11)
    assert await leases.tend(publish, lambda job: None, on_gone) == 3
    assert gone == ["dead-1"]  # once, and never this runner itself
