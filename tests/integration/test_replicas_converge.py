"""Several replicas, one truth: two `moorage serve` replicas and two `moorage stream run` workers on
127.0.0.1, each with its own home folder, sharing only real services: the catalog and the jobs on
PostgreSQL, the artifacts on an S3-protocol store (moto's server), the rate-limit buckets and the
job and stream queues on Redis, and the config center on the catalog.

Under steady load (requests to both replicas, messages through both workers) an alias moves from
version 1 to version 2 and a release lowers ``serve.max_batch_size`` and sets a rate limit. Every
replica and worker follows both (the version each response names, /readyz, the workers' swap
counter, the center's "4 of 4 instances" status), no request fails, no message is lost, and a limit
of K requests a minute allows exactly K over both replicas together."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import count

import httpx
import pytest

from moorage.config import load_settings
from moorage.configcenter.releases import ConfigCenter
from moorage.registry import Registry
from moorage.security.keys import KeyStore

from tests.services.fleet import Fleet, dead_letter_reasons, metric, predict, publish, ready
from tests.services.servers import free_port
from tests.support import wait_until

NUM_MESSAGES = 60  # half published under the load before the alias moves, half once both workers followed it
BEFORE = [f"m{i}" for i in range(NUM_MESSAGES // 2)]
AFTER = [f"n{i}" for i in range(NUM_MESSAGES // 2)]
NUM_JOBS = 8
MAX_REQUESTS = 3000  # bound of the steady load; it stops TAIL requests after everything converged
TAIL = 40
LIMIT = 6  # requests a minute for a key without its own limit, once the release is applied
RELEASE = {
    "serve": {"max_batch_size": 4},
    "stream": {"batch_size": 8},
    "security": {"limits": {"requests_per_minute": LIMIT}},
}
SERVERS, WORKERS = ("serve-a", "serve-b"), ("stream-a", "stream-b")


@pytest.fixture
def shared_env(pg_url, s3_store, redis_base) -> dict:
    """The settings every process shares: only the services, nothing on a local disk."""
    store_url, options = s3_store
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MOORAGE_")}
    return inherited | {
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MOORAGE_USER": "tester",
        "MOORAGE_SECURITY__AUTH": "true",
        "MOORAGE_SECURITY__LIMITS__REDIS_URL": redis_base,
        "MOORAGE_REGISTRY__CATALOG_URL": pg_url.replace("postgresql://", "postgresql+psycopg://"),
        "MOORAGE_REGISTRY__STORE_URL": store_url,
        "MOORAGE_REGISTRY__STORAGE_OPTIONS": json.dumps(options),
        "MOORAGE_STREAM__JOBS_URL": f"{redis_base}?topic=jobs-{uuid.uuid4().hex[:8]}&group=servers",
        "MOORAGE_SERVE__POLL_INTERVAL_S": "0.2",  # aliases re-resolved five times a second
    }


def _served_version(url: str) -> int | None:
    try:
        response = httpx.get(url + "/readyz", timeout=2)
    except httpx.HTTPError:
        return None
    return response.json()["models"].get("emb@production") if response.status_code == 200 else None


def _sink_rows(pg_url: str) -> dict[str, int]:
    import psycopg

    with psycopg.connect(pg_url) as conn:
        try:
            return dict(conn.execute("SELECT id, version FROM results").fetchall())
        except psycopg.errors.UndefinedTable:  # the sink has not created its table yet
            return {}


class SteadyLoad:
    """Requests spread over the replicas by a few threads until `stop()`, at most MAX_REQUESTS.
    Each records the replica, whether that replica had been seen serving version 2 when it was
    sent (`moved`), its status and the version that answered."""

    def __init__(self, urls: list[str], key: str) -> None:
        self.urls, self.key = urls, key
        self.moved = [threading.Event() for _ in urls]
        self.results: list[tuple[int, bool, int, int | None]] = []
        self._numbers: Iterator[int] = count()
        self._stop_at = MAX_REQUESTS
        self._lock = threading.Lock()
        self.done = threading.Condition(self._lock)

    def run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while (i := next(self._numbers)) < self._stop_at:
                replica = i % len(self.urls)
                moved = self.moved[replica].is_set()
                response = predict(client, self.urls[replica], self.key, f"steady request {i}")
                version = response.json().get("version") if response.status_code == 200 else None
                with self._lock:
                    self.results.append((replica, moved, response.status_code, version))
                    self.done.notify_all()

    def wait_for(self, num_results: int) -> None:
        with self._lock:
            if not self.done.wait_for(lambda: len(self.results) >= num_results, timeout=120):
                raise AssertionError(f"{num_results} load requests not answered within 120 s")

    def stop_after(self, more: int) -> None:
        with self._lock:
            self._stop_at = min(self._stop_at, len(self.results) + more)


def test_two_replicas_and_two_workers_converge_on_an_alias_and_a_release_under_load(
    shared_env, pg_url, fake_model, tmp_path
):
    settings = load_settings(environ=shared_env | {"MOORAGE_HOME": str(tmp_path / "admin")})
    registry = Registry.from_settings(settings)
    registry.register(fake_model("embed", seed=1, delay_ms=2), "emb", "embed", alias="production")
    registry.register(fake_model("embed", seed=2, delay_ms=2), "emb", "embed")
    keys = KeyStore(registry.catalog)
    load_key = keys.create("invoker", name="load", requests_per_minute=1_000_000)[1]  # its own limit: never 429
    probe_key = keys.create("invoker", name="probe")[1]  # the limit of the release
    center = ConfigCenter.from_settings(settings, registry=registry)
    redis = shared_env["MOORAGE_SECURITY__LIMITS__REDIS_URL"]
    source = f"{redis}?topic=in-{uuid.uuid4().hex[:8]}&group=workers"
    sink = f"sql+{shared_env['MOORAGE_REGISTRY__CATALOG_URL']}?table=results"

    fleet = Fleet(shared_env, tmp_path)
    urls, metrics_urls = [], []
    try:
        for name in SERVERS:
            port = free_port()
            fleet.start(name, "serve", "--port", str(port), "--model", "emb@production",
                        env={"MOORAGE_HOME": str(tmp_path / name)})  # fmt: skip
            urls.append(f"http://127.0.0.1:{port}")
        for name in WORKERS:
            port = free_port()
            fleet.start(name, "stream", "run", "--source", source, "--model", "emb@production", "--sink", sink,
                        "--metrics-port", str(port), env={"MOORAGE_HOME": str(tmp_path / name)})  # fmt: skip
            metrics_urls.append(f"http://127.0.0.1:{port}")
        wait_until(lambda: all(map(ready, urls)) or bool(fleet.exited()), 120, "both replicas ready")
        assert not fleet.exited(), fleet.logs()
        wait_until(lambda: center.status()["live"] == 4, 60, "four instances reporting", interval_s=0.1)
        assert [_served_version(u) for u in urls] == [1, 1]

        load = SteadyLoad(urls, load_key)
        with ThreadPoolExecutor(4) as pool:
            running = [pool.submit(load.run) for _ in range(4)]
            try:
                publish(source, [{"id": i, "text": f"story {i}"} for i in BEFORE])  # the workers' share of the load
                load.wait_for(60)  # the load flows on version 1 ...
                moved_at = time.monotonic()
                registry.set_alias("emb", "production", 2, "replicas converge")  # ... when the alias moves
                for replica, url in enumerate(urls):
                    wait_until(lambda u=url: _served_version(u) == 2, 60, f"{url} on version 2", interval_s=0.05)
                    load.moved[replica].set()
                followed_s, published_at = time.monotonic() - moved_at, time.monotonic()
                center.edit_draft("global", RELEASE, author="replicas-test")
                release = center.publish("global", author="replicas-test", comment="smaller batches, a shared limit")
                wait_until(lambda: center.status()["current"] == 4, 60, "every instance applying", interval_s=0.1)
                status = center.status()
                applied_s = time.monotonic() - published_at
            finally:
                load.stop_after(TAIL)  # a last stretch of load on the new version and the new release
            for future in running:
                future.result()

        with httpx.Client(timeout=60) as client:
            # a limit of LIMIT a minute, in Redis: both replicas together admit exactly LIMIT
            limited = [predict(client, urls[i % 2], probe_key, f"probe {i}").status_code for i in range(2 * LIMIT)]
            auth = {"Authorization": f"Bearer {load_key}"}
            jobs = [
                client.post(f"{urls[i % 2]}/v1/jobs", json={"model": "emb", "inputs": [f"job {i}"]}, headers=auth)
                for i in range(NUM_JOBS)
            ]
            assert [j.status_code for j in jobs] == [202] * NUM_JOBS, [j.text for j in jobs]

            def job_states() -> list[dict]:  # each read from the replica that did not take it
                return [client.get(f"{urls[(i + 1) % 2]}/v1/jobs/{j.json()['id']}", headers=auth).json()
                        for i, j in enumerate(jobs)]  # fmt: skip

            wait_until(lambda: all(j["status"] in ("succeeded", "failed") for j in job_states()), 60,
                       "the jobs", interval_s=0.1)  # fmt: skip
            finished = job_states()

        wait_until(lambda: all(metric(m, "moorage_model_swaps_total", model="emb") >= 1 for m in metrics_urls),
                   60, "both workers following the alias", interval_s=0.1)  # fmt: skip
        publish(source, [{"id": i, "text": f"story {i}"} for i in AFTER])
        wait_until(lambda: len(_sink_rows(pg_url)) == NUM_MESSAGES, 60, "every message in the sink", interval_s=0.1)
        rows = _sink_rows(pg_url)
        dead = dead_letter_reasons(source)
        processed = sum(metric(m, "moorage_stream_messages_total", outcome="processed") for m in metrics_urls)
        assert not fleet.exited(), fleet.logs()
    finally:
        fleet.stop()
        center.close()
        registry.close()

    print(f"\n{len(load.results)} load requests; both replicas on the moved alias {followed_s:.2f} s after the move, "
          f"release {release.number} applied by 4 of 4 {applied_s:.2f} s after it was published")  # fmt: skip
    statuses = [s for _, _, s, _ in load.results]
    assert statuses == [200] * len(load.results), f"{len(statuses) - statuses.count(200)} load requests failed"
    versions = {(moved, v) for _, moved, _, v in load.results}
    assert (False, 1) in versions and (True, 2) in versions  # the move happened under load
    assert (True, 1) not in versions  # once seen on version 2, a replica never answers version 1 again
    applied = [i for i in status["instances"] if i["revision"] >= release.number and i["status"] == "applied"]
    assert len(applied) == 4 and status["summary"].startswith("4 of 4 instances on revision"), status
    assert sorted(i["group"].split(":")[0] for i in applied) == ["servers", "servers", "stream", "stream"]
    assert sorted(limited).count(200) == LIMIT and limited.count(429) == LIMIT, limited
    assert [(j["status"], j["result"]["version"]) for j in finished] == [("succeeded", 2)] * NUM_JOBS, finished
    assert sorted(rows) == sorted(BEFORE + AFTER)
    assert {rows[i] for i in AFTER} == {2}  # published after both workers moved
    assert processed >= NUM_MESSAGES and dead == []
    assert not any((tmp_path / name / "artifacts").exists() for name in SERVERS + WORKERS)  # all from S3
