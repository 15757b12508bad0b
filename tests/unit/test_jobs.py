"""POST /v1/jobs + GET /v1/jobs/{id}: the same results as a direct predict, durable, with callbacks."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from moorage.config import load_settings
from moorage.jobs import JobStore
from moorage.registry import Registry
from moorage.streams import open_broker

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


@pytest.fixture
def callback_server():
    """A local HTTP endpoint that records the JSON bodies POSTed to it."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
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
