"""Training jobs end to end with a tiny random BERT on a toy two-topic dataset: submitted over HTTP
(validated, authorised, 404 for unknown refs), run by the server's own worker and cancelled
mid-run (nothing registered); run by a `moorage jobs worker` subprocess that is SIGKILLed at a step
its progress showed, then restarted: the job resumes from its checkpoint and publishes one
version. And the work queue on PostgreSQL: priorities, one winner among racing workers, a dead
worker's job reclaimed, cancel and logs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("transformers")

from moorage.config import Settings, load_settings  # noqa: E402
from moorage.db.catalog import Catalog  # noqa: E402
from moorage.jobs import JobStatus  # noqa: E402
from moorage.jobs.queue import WorkQueue  # noqa: E402
from moorage.registry import Registry  # noqa: E402
from moorage.training.datasets import Datasets  # noqa: E402

from tests.support import tiny_bert, wait_until  # noqa: E402

TOPICS = {
    "sport": "goal match team coach league player score stadium referee season cup final".split(),
    "tech": "software chip computer network server code laptop startup browser robot cloud data".split(),
}
# 60 rows: 6 steps an epoch at batch 8, a checkpoint at each epoch's end (24 steps); no early stop
SPEC = {"epochs": 4, "learning_rate": 5e-3, "batch_size": 8, "max_length": 32, "early_stopping_patience": None}


def environ(home: Path, **extra: str) -> dict[str, str]:
    return {"MOORAGE_HOME": str(home), "MOORAGE_USER": "tester", "MOORAGE_SECURITY__AUTH": "false", **extra}


@dataclass
class World:
    home: Path
    base: str
    dataset: str

    def settings(self, **extra: str) -> Settings:
        return load_settings(environ=environ(self.home, **extra))

    def spec(self, name: str) -> dict:
        return {"task": "classify", "base": self.base, "dataset": self.dataset, "name": name, **SPEC}


@pytest.fixture(scope="module")
def world_template(tmp_path_factory) -> World:
    import random

    tmp = tmp_path_factory.mktemp("training-world")
    settings = load_settings(environ=environ(tmp / "home"))
    registry = Registry.from_settings(settings)
    try:
        base = registry.register(tiny_bert(tmp / "bert"), "tiny-bert", "embed", alias="production")
    finally:
        registry.close()
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.sample(w, 6)), "label": t} for t, w in TOPICS.items() for _ in range(30)]
    (tmp / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = Datasets.from_settings(settings).add("toy", str(tmp / "toy.jsonl"))
    return World(tmp / "home", base.ref, dataset.ref)


@pytest.fixture
def world(world_template, tmp_path) -> World:
    """A copy of the template's home (catalog, artifacts, datasets) for this test alone."""
    shutil.copytree(world_template.home, tmp_path / "home")
    return World(tmp_path / "home", world_template.base, world_template.dataset)


def versions_of(settings: Settings, name: str) -> list[int]:
    registry = Registry.from_settings(settings)
    try:
        return (
            [v.version for v in registry.list_versions(name)]
            if name in {m.name for m in registry.list_models()}
            else []
        )
    finally:
        registry.close()


# -- over HTTP, run by the server's own worker ------------------------------------------------------
@pytest.mark.anyio
async def test_http_validates_runs_and_cancels_a_training_job(world, serving):
    settings = world.settings(MOORAGE_TRAINING__RUN_IN_SERVER="true")
    registry = Registry.from_settings(settings)
    try:
        async with serving(settings, registry, refs=(world.base,)) as (app, client):
            bad = await client.post("/v1/training/jobs", json=world.spec("news") | {"epochs": "many"})
            assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_job_spec"
            assert "epochs" in bad.json()["error"]["message"]
            extra = await client.post("/v1/training/jobs", json=world.spec("news") | {"dropout": 0.1})
            assert extra.status_code == 422 and "dropout" in extra.json()["error"]["message"]
            unknown = await client.post("/v1/training/jobs", json=world.spec("news") | {"base": "nope@production"})
            assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
            kind = await client.post("/v1/training/jobs", json={"kind": "painting"})
            assert kind.status_code == 400 and kind.json()["error"]["code"] == "unknown_job_kind"

            created = await client.post("/v1/training/jobs", json=world.spec("news") | {"priority": 3})
            assert created.status_code == 202, created.text
            job = created.json()
            assert created.headers["location"] == f"/v1/training/jobs/{job['id']}" and job["priority"] == 3
            url = f"/v1/training/jobs/{job['id']}"
            queue = WorkQueue(registry.catalog.engine)
            # the server's worker has claimed it and reported two steps
            await apoll(lambda: ((queue.get(job["id"]).progress or {}).get("step") or 0) >= 2, 300, "two steps")
            running = (await client.get(url)).json()
            assert running["status"] == "running" and running["progress"]["phase"] in ("training", "evaluating")
            scraped = (await client.get("/metrics")).text
            assert 'moorage_training_total_steps{kind="training",model="news"} 24.0' in scraped
            assert 'moorage_training_jobs_running{kind="training"} 1.0' in scraped
            cancelled = await client.post(f"{url}/cancel")
            assert cancelled.status_code == 200 and cancelled.json()["cancel_requested"]
            await apoll(lambda: queue.get(job["id"]).is_finished, 120, "the job to stop")
            ended = (await client.get(url)).json()
            scraped = (await client.get("/metrics")).text
            assert 'moorage_training_jobs_total{kind="training",status="cancelled"} 1.0' in scraped
            assert 'moorage_training_step{kind="training",model="news"}' not in scraped  # it no longer runs
            assert ended["status"] == "cancelled" and ended["result"] is None
            assert ended["progress"]["total_steps"] == 24 and ended["progress"]["step"] < 24
            logs = (await client.get(f"{url}/logs")).json()
            lines = [entry["line"] for entry in logs["lines"]]
            assert lines[-1].startswith("cancelled") and logs["next"] == logs["lines"][-1]["seq"]
            assert (await client.get(f"{url}/logs", params={"after": logs["next"]})).json()["lines"] == []
            assert (await client.get("/v1/training/jobs/job-unknown")).status_code == 404
    finally:
        registry.close()
    assert versions_of(settings, "news") == []  # nothing half-registered


# -- a worker subprocess killed mid-training, then restarted ------------------------------------------
def poll(condition, timeout_s: float, what: str) -> None:
    """`wait_until`, looking every 0.1 s: each look is a catalog read, and the worker shares the cores."""

    def looked() -> bool:
        time.sleep(0.1)
        return condition()

    wait_until(looked, timeout_s=timeout_s, what=what)


async def apoll(condition, timeout_s: float, what: str) -> None:
    """`eventually`, looking every 0.1 s."""

    async def looked() -> bool:
        await asyncio.sleep(0.1)
        return condition()

    deadline = time.monotonic() + timeout_s
    while not await looked():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")


def start_worker(world: World, log: Path) -> subprocess.Popen:
    env = os.environ | environ(world.home, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "moorage", "jobs", "worker", "--poll", "0.1"]
    return subprocess.Popen(command, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def test_a_killed_worker_s_training_job_resumes_from_its_checkpoint(world, tmp_path):
    from moorage.training.worker import Worker

    settings = world.settings()
    catalog = Catalog(settings.catalog_url)
    queue = WorkQueue(catalog.engine, lease_s=settings.jobs.lease_s)
    log = tmp_path / "worker.log"
    job = queue.submit("training", world.spec("news"), owner="tester")

    def step() -> int:
        return (queue.get(job.id).progress or {}).get("step") or 0

    first = start_worker(world, log)
    try:  # past the first epoch's checkpoint (step 6), well before the last of 24 steps
        poll(lambda: step() >= 8 or first.poll() is not None, 300, "the job to pass its first checkpoint")
        assert first.poll() is None, log.read_text()
        killed_at = step()
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        first.kill()
    assert queue.get(job.id).status == JobStatus.RUNNING and killed_at < 24  # left behind mid-run
    # restarted on the same home (in this process: the same Worker.run as `moorage jobs worker`, one
    # import of the training stack fewer): the dead runner's lock file is free, so its lease ends at once
    restarted = Worker(settings, queue, poll_s=0.1)
    thread = threading.Thread(target=restarted.run, daemon=True)
    thread.start()
    try:
        poll(lambda: queue.get(job.id).is_finished, 300, "the resumed job to finish")
    finally:
        restarted.stopping.set()
        thread.join(timeout=60)
    ended = queue.get(job.id)
    assert ended.status == JobStatus.SUCCEEDED, (ended.error, log.read_text())
    assert ended.attempts == 2 and ended.result["resumed_from_step"] is not None
    assert 6 <= ended.result["resumed_from_step"] <= killed_at
    assert ended.result["ref"] == "news:1" and versions_of(settings, "news") == [1]
    lines = [line for _, line in queue.logs(job.id)]
    assert sum(line.startswith("attempt ") for line in lines) == 2
    assert any(line.startswith("resumed from the checkpoint of step") for line in lines)
    catalog.dispose()


# -- the queue on PostgreSQL --------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def test_the_work_queue_on_postgresql(pg_url):
    catalog = Catalog(pg_url)
    clock = Clock()
    queue = WorkQueue(catalog.engine, lease_s=20.0, clock=clock)
    try:
        ids = []
        for name, priority in [("low", 0), ("high-1", 5), ("high-2", 5)]:
            clock.now += timedelta(seconds=1)
            ids.append(queue.submit("training", {"name": name}, priority=priority).id)
        barrier = threading.Barrier(6)

        def race(n: int):
            barrier.wait()
            return queue.next(["training"], f"w{n}")

        with ThreadPoolExecutor(6) as pool:
            won = [job for job in pool.map(race, range(6)) if job is not None]
        assert sorted(job.model for job in won) == ["high-1", "high-2", "low"]  # each job to one worker
        assert len({job.runner_id for job in won}) == 3
        first = next(job for job in won if job.model == "high-1")
        clock.now += timedelta(seconds=21)  # its worker died: the lease ran out
        resumed = queue.next(["training"], "alive")
        assert resumed is not None and resumed.attempts == 2
        assert queue.cancel(ids[0]).status == JobStatus.CANCELLED  # its lease ran out too
        assert queue.cancel(resumed.id).cancel_requested and queue.get(resumed.id).status == JobStatus.RUNNING
        assert [queue.log(first.id, f"line {n}") for n in range(2)] == [1, 2]
        assert queue.logs(first.id, after=1) == [(2, "line 1")]
    finally:
        catalog.dispose()


# -- the command line, and a batch job ----------------------------------------------------------------
def cli(world: World, *args: str):
    from typer.testing import CliRunner

    from moorage.cli.main import app

    env = {"MOORAGE_HOME": str(world.home), "MOORAGE_USER": "tester", "MOORAGE_CONFIG": None}
    return CliRunner().invoke(app, list(args), env=env)


def test_moorage_train_runs_in_the_foreground_or_queues_and_jobs_commands_follow(world):
    from moorage.errors import MoorageError

    base = ["train", "classify", "--base", world.base, "--dataset", world.dataset]
    refused = cli(world, *base, "--name", "cli", "--set", "epochs=many")
    assert isinstance(refused.exception, MoorageError) and refused.exception.code == "invalid_job_spec"
    assert "epochs" in refused.exception.message
    unknown = cli(world, "train", "classify", "--base", "nope", "--dataset", world.dataset, "--name", "cli")
    assert isinstance(unknown.exception, MoorageError) and unknown.exception.code == "model_not_found"
    assert json.loads(cli(world, "jobs", "list", "--json").stdout) == []  # nothing queued by either

    hyper = ["--epochs", "1", "--batch-size", "8", "--max-length", "32", "--learning-rate", "5e-3"]
    ran = cli(world, *base, "--name", "cli", *hyper)
    assert ran.exit_code == 0, ran.output
    assert "registered cli:1 as cli@challenger" in ran.stdout and "accuracy" in ran.stdout
    assert versions_of(world.settings(), "cli") == [1]

    queued = cli(world, *base, "--name", "later", *hyper, "--queue", "--priority", "2")
    assert queued.exit_code == 0 and "queued job-" in queued.stdout
    listed = json.loads(cli(world, "jobs", "list", "--json").stdout)
    assert [(j["model"], j["status"], j["priority"]) for j in listed] == [
        ("later", "queued", 2),
        ("cli", "succeeded", 0),
    ]
    later, done = listed[0]["id"], listed[1]["id"]
    shown = json.loads(cli(world, "jobs", "show", done).stdout)
    assert shown["result"]["ref"] == "cli:1" and shown["progress"]["phase"] == "publishing"
    assert "succeeded" in cli(world, "jobs", "logs", done).stdout
    assert "cancelled" in cli(world, "jobs", "cancel", later).stdout
    assert json.loads(cli(world, "jobs", "show", later).stdout)["status"] == "cancelled"
    missing = cli(world, "jobs", "show", "job-unknown")
    assert isinstance(missing.exception, MoorageError) and missing.exception.code == "job_not_found"


def test_a_batch_job_runs_a_model_over_a_split_through_the_service(world):
    from moorage.training.worker import Worker

    settings = world.settings()
    catalog = Catalog(settings.catalog_url)
    queue = WorkQueue(catalog.engine, lease_s=settings.jobs.lease_s)
    worker = Worker(settings, queue)
    spec = {"model": world.base, "dataset": world.dataset, "split": "test", "batch_size": 4}
    job = queue.submit("batch", spec, held_by=worker.runner_id)
    ended = worker.run_foreground(job.id)
    catalog.dispose()
    assert ended.status == JobStatus.SUCCEEDED, ended.error
    test_rows = Datasets.from_settings(settings).get(world.dataset).splits["test"].rows
    assert ended.result["rows"] == test_rows and ended.result["errors"] == 0 and ended.result["model"] == "tiny-bert:1"
    rows = [json.loads(line) for line in Path(ended.result["path"]).read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(test_rows))
    assert all(len(row["result"]["embedding"]) == 32 and row["error"] is None for row in rows)
    assert not list(Path(ended.result["path"]).parent.glob(".*partial"))
