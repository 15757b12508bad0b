"""POST /v1/jobs + GET /v1/jobs/{id}: the same results as a direct predict, durable, with callbacks."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

pytestmark = pytest.mark.anyio


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
    settings.security.limits.max_tokens = 10**7  # let a too-long generation reach the model
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
    """What a server that accepted a job and died before running it leaves behind: the job row and
    its queue message. The next server runs it."""
    from moorage.server.jobs import JobRequest, JobRunner
    from moorage.streams import open_broker

    runner = JobRunner(settings, pool=None)
    runner.store.create("job-left-behind", JobRequest(model="emb", inputs=["kept"]))
    async with open_broker(runner.queue_url) as queue:
        await queue.publish([json.dumps({"id": "job-left-behind"}).encode()])
    runner.store.close()
    async with serving(settings, models, refs=("emb@production",)) as (_, c):
        job = await wait_job(c, "job-left-behind")
        assert job["status"] == "succeeded" and len(job["result"]["outputs"]) == 1
