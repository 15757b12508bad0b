"""Two server replicas sharing one jobs queue and one PostgreSQL catalog: every job submitted to either
runs exactly once and ends succeeded or failed with a code; none stays queued; neither takes the
other's jobs, and the jobs of a third that died are reclaimed, each by one of them."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack

import pytest

from moorage.config import load_settings
from moorage.registry import Registry

pytestmark = pytest.mark.anyio
NUM_JOBS = 100


def _replicas(tmp_path, pg_url, **extra: str) -> list:
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
            **extra,
        }
        replicas.append((load_settings(environ=env), None))
    return replicas


async def test_two_replicas_run_each_of_100_jobs_exactly_once(tmp_path, pg_url, fake_model, serving):
    replicas = _replicas(tmp_path, pg_url)
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


async def test_the_jobs_of_a_dead_replica_are_reclaimed_by_the_live_ones(tmp_path, pg_url, fake_model, serving):
    """A third replica died holding 30 jobs (leases expired, its queue messages lost with it): the two
    live replicas reclaim each once between them and run it; none is started by both."""
    from moorage.jobs import JobStatus, JobStore

    replicas = _replicas(tmp_path, pg_url, MOORAGE_JOBS__LEASE_S="1")
    first = Registry.from_settings(replicas[0][0])
    first.register(fake_model("embed"), "emb", "embed")
    store = JobStore(first.catalog.engine)
    ids = [store.create("emb", {"inputs": [f"left {i}"]}).id for i in range(30)]
    for job_id in ids:
        store.start(job_id, "dead-replica")
    store.expire("dead-replica")
    async with AsyncExitStack() as stack:
        for settings, _ in replicas:
            registry = Registry.from_settings(settings)
            stack.callback(registry.close)
            await stack.enter_async_context(serving(settings, registry, refs=("emb",)))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(store.get(job_id).is_finished for job_id in ids):
            await asyncio.sleep(0.1)
    jobs = [store.get(job_id) for job_id in ids]
    first.close()
    assert [j.status for j in jobs] == [JobStatus.SUCCEEDED] * len(ids)
    assert [j.attempts for j in jobs] == [2] * len(ids)  # the dead replica's start, then one reclaimer's
    assert all(j.runner_id not in (None, "dead-replica") for j in jobs)  # finished by a live replica
