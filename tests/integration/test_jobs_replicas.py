"""Two server replicas sharing one jobs queue and one PostgreSQL catalog: every job submitted to either
runs exactly once and ends succeeded or failed with a code; none stays queued."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack

import pytest

from moorage.config import load_settings
from moorage.registry import Registry

pytestmark = pytest.mark.anyio
NUM_JOBS = 100


async def test_two_replicas_run_each_of_100_jobs_exactly_once(tmp_path, pg_url, fake_model, serving):
    queue_url = f"sqlite:///{tmp_path / 'shared-queue.db'}?topic=jobs&visibility_timeout=120"
    catalog_url = pg_url.replace("postgresql://", "postgresql+psycopg://")
    replicas = []
    for name in ("a", "b"):
        env = {
            "MOORAGE_HOME": str(tmp_path / name),
            "MOORAGE_USER": "tester",
            "MOORAGE_SECURITY__AUTH": "false",
            "MOORAGE_REGISTRY__CATALOG_URL": catalog_url,
            "MOORAGE_REGISTRY__STORE_URL": str(tmp_path / "artifacts"),
            "MOORAGE_STREAM__JOBS_URL": queue_url,
        }
        replicas.append((load_settings(environ=env), None))
    first = Registry.from_settings(replicas[0][0])
    first.register(fake_model("embed"), "emb", "embed")
    first.register(fake_model("generate"), "gen", "generate")
    first.close()
    async with AsyncExitStack() as stack:
        clients = []
        for settings, _ in replicas:
            registry = Registry.from_settings(settings)
            stack.callback(registry.close)
            _, client = await stack.enter_async_context(serving(settings, registry, refs=("emb", "gen")))
            clients.append(client)
        bodies = [
            {"model": "emb", "inputs": [f"text {i}"]}
            if i % 3
            else {"model": "gen", "inputs": ["hi"], "parameters": {"max_new_tokens": 3 if i % 2 else 3000}}
            for i in range(NUM_JOBS)
        ]  # every sixth job asks for more tokens than the fake model's context: it fails with a code
        posted = await asyncio.gather(*(clients[i % 2].post("/v1/jobs", json=b) for i, b in enumerate(bodies)))
        assert {r.status_code for r in posted} == {202}
        ids = [r.json()["id"] for r in posted]
        deadline = time.monotonic() + 120
        jobs: list[dict] = []
        while time.monotonic() < deadline:
            jobs = [(await clients[i % 2].get(f"/v1/jobs/{job_id}")).json() for i, job_id in enumerate(ids)]
            if all(j["status"] in ("succeeded", "failed") for j in jobs):
                break
            await asyncio.sleep(0.1)

    statuses = [j["status"] for j in jobs]
    assert statuses.count("queued") == statuses.count("running") == 0
    failed = [j for j in jobs if j["status"] == "failed"]
    assert {j["error"]["code"] for j in failed} == {"context_length_exceeded"}
    assert len(failed) == len([i for i in range(NUM_JOBS) if i % 6 == 0])
    assert all(len(j["result"]["outputs"]) == 1 for j in jobs if j["status"] == "succeeded")
    catalog = Registry.from_settings(replicas[0][0])
    from moorage.jobs import JobStore

    store = JobStore(catalog.catalog.engine)
    attempts = [store.get(job_id).attempts for job_id in ids]
    catalog.close()
    assert attempts == [1] * NUM_JOBS  # each ran exactly once, on one replica or the other
