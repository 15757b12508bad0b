"""Config delivery over real HTTP: a subscriber long-polls a server on 127.0.0.1 for each release,
applies or refuses it and reports back; a connection cut mid-hold loses no revision; with the center
gone, a restarted process starts from its checksum-verified snapshot, and a tampered one is refused."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest
from pydantic import SecretStr

from moorage.config import load_settings
from moorage.configcenter.releases import ConfigCenter, Instance
from moorage.configcenter.subscriber import HttpSource, Subscriber
from moorage.registry import Registry
from moorage.security.keys import KeyStore
from moorage.server import create_app
from moorage.server.config_watch import Revisions
from moorage.streams.runner import StreamJob, run_stream

from tests.services.tcp_proxy import CuttableProxy
from tests.support import eventually, serve_in_thread

pytestmark = pytest.mark.anyio


@pytest.fixture
def center_settings(tmp_path):
    return load_settings(
        environ={
            "MOORAGE_HOME": str(tmp_path / "home"),
            "MOORAGE_USER": "tester",
            "MOORAGE_CONFIG__HOLD_S": "20",
        }
    )


def open_registry(settings, fake_model) -> tuple[Registry, str]:
    """The registry with a fake embedding model to serve, and an operator key (what a fleet's processes hold)."""
    registry = Registry.from_settings(settings)
    registry.register(fake_model("embed"), "emb", "embed")
    return registry, KeyStore(registry.catalog).create("operator", name="fleet")[1]


@pytest.fixture
def center_server(center_settings, fake_model):
    """A server on 127.0.0.1 that serves the config center; yields (url, key, center)."""
    registry, key = open_registry(center_settings, fake_model)
    center = ConfigCenter.from_settings(center_settings)
    try:
        with serve_in_thread(create_app(center_settings, ["emb"], registry=registry)) as url:
            yield url, key, center
    finally:
        center.close()
        registry.close()


class Applied:
    """An apply callback that records what it was given and refuses a max_batch_size it is told to."""

    def __init__(self, refuse: int | None = None) -> None:
        self.revisions: list[int] = []
        self.batch_sizes: list[int] = []
        self.refuse = refuse

    def __call__(self, settings, effective) -> None:
        if settings.serve.max_batch_size == self.refuse:
            raise ValueError(f"this process cannot run batches of {self.refuse}")
        self.revisions.append(effective.revision)
        self.batch_sizes.append(settings.serve.max_batch_size)


def publish(center: ConfigCenter, batch_size: int) -> int:
    center.edit_draft("global", {"serve": {"max_batch_size": batch_size}}, author="tester")
    center.publish("global", author="tester", comment=f"batches of {batch_size}")
    return center.revision()


def subscriber(settings, url: str, key: str, apply, name: str = "w1") -> Subscriber:
    instance = Instance(id=f"test-{name}", group="servers", labels={"zone": "a"})
    return Subscriber(settings, instance, apply, source=HttpSource(url, key))


def reports(center: ConfigCenter, instance_id: str) -> dict:
    return next(i for i in center.status()["instances"] if i["instance_id"] == instance_id)


async def test_each_release_reaches_the_subscriber_and_is_reported(center_settings, center_server):
    url, key, center = center_server
    applied = Applied()
    sub = subscriber(center_settings, url, key, applied)
    await sub.start()
    try:
        revisions = []
        for size in (3, 5, 9):
            revisions.append(await asyncio.to_thread(publish, center, size))
            await eventually(lambda: sub.revision == revisions[-1], what=f"revision {revisions[-1]}")
        assert applied.batch_sizes == [3, 5, 9] and applied.revisions == revisions
        await eventually(lambda: reports(center, "test-w1")["revision"] == revisions[-1], what="the last report")
        mine = reports(center, "test-w1")
        assert mine["status"] == "applied" and mine["labels"] == {"zone": "a"}
        assert sub.current is not None and sub.current.values == {"serve": {"max_batch_size": 9}}
    finally:
        await sub.stop()


async def test_a_cut_connection_misses_no_revision(center_settings, center_server):
    url, key, center = center_server
    port = int(url.rsplit(":", 1)[1])
    proxy = CuttableProxy("127.0.0.1", port)
    await proxy.start()
    applied = Applied()
    sub = subscriber(center_settings, proxy.url, key, applied)
    await sub.start()
    try:
        first = await asyncio.to_thread(publish, center, 4)
        await eventually(lambda: sub.revision == first, what="the first release")
        await eventually(lambda: proxy.open_connections == 1, what="a held long-poll")
        assert proxy.cut() >= 2  # both sides of the held long-poll
        second = await asyncio.to_thread(publish, center, 6)  # published while the subscriber is cut off
        accepted = proxy.accepted
        proxy.resume()
        await eventually(lambda: sub.revision == second, what="the release published during the cut")
        assert proxy.accepted > accepted  # it came over a new connection, asking from the last revision it had
        assert applied.batch_sizes == [4, 6] and applied.revisions == [first, second]
    finally:
        await sub.stop()
        await proxy.stop()


async def test_a_refused_release_is_reported_with_its_reason(center_settings, center_server):
    url, key, center = center_server
    applied = Applied(refuse=7)
    sub = subscriber(center_settings, url, key, applied, name="picky")
    await sub.start()
    try:
        refused = await asyncio.to_thread(publish, center, 7)
        await eventually(lambda: reports(center, "test-picky")["revision"] == refused, what="the refusal")
        mine = reports(center, "test-picky")
        assert mine["status"] == "rejected" and "cannot run batches of 7" in mine["reason"]
        status = center.status()
        assert status["rejected"] == 1 and "1 rejected" in status["summary"]
        assert applied.batch_sizes == [] and sub.current.values == {}  # the process kept its own settings
        fixed = await asyncio.to_thread(publish, center, 8)
        await eventually(lambda: reports(center, "test-picky")["revision"] == fixed, what="the next release")
        assert reports(center, "test-picky")["status"] == "applied" and applied.batch_sizes == [8]
    finally:
        await sub.stop()


async def test_the_watch_route(center_settings, center_server):
    url, key, center = center_server
    keys = Registry.from_settings(center_settings)
    invoker = KeyStore(keys.catalog).create("invoker")[1]
    keys.close()
    revision = await asyncio.to_thread(publish, center, 2)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}) as client:
        now = await client.get("/v1/config/watch", params={"instance": "probe", "after": -1})
        assert now.status_code == 200 and now.json()["revision"] == revision
        assert now.json()["values"] == {"serve": {"max_batch_size": 2}}
        held = await client.get("/v1/config/watch", params={"instance": "probe", "after": revision, "hold": 0.2})
        assert held.status_code == 304  # nothing newer within the hold
        bad = await client.get("/v1/config/watch", params={"instance": "probe", "labels": "[1]"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_labels"
        wrong = await client.post("/v1/config/reports", json={"instance": "probe", "revision": 1, "status": "done"})
        assert wrong.status_code == 422
        denied = await client.get(
            "/v1/config/watch", params={"instance": "probe"}, headers={"Authorization": f"Bearer {invoker}"}
        )
        assert denied.status_code == 403

        async def batch_size(instance: str, zone: str, after: int) -> int:
            params = {"instance": instance, "labels": json.dumps({"zone": zone}), "after": after}
            return (await client.get("/v1/config/watch", params=params)).json()["values"]["serve"]["max_batch_size"]

        # one instance after another of the same group: a gray release by label reaches only its targets
        center.edit_draft("global", {"serve": {"max_batch_size": 3}}, author="tester")
        gray = center.publish("global", author="tester", gray={"labels": {"zone": "a"}})
        assert [await batch_size(n, z, revision) for n, z in [("b1", "b"), ("a1", "a"), ("b2", "b")]] == [2, 3, 2]
        center.abandon(gray.number, author="tester")
        assert [await batch_size(n, z, revision) for n, z in [("a1", "a"), ("b1", "b")]] == [2, 2]


async def test_without_the_center_a_restarted_process_serves_its_snapshot(center_settings, fake_model, caplog):
    registry, key = open_registry(center_settings, fake_model)
    center = ConfigCenter.from_settings(center_settings)
    try:
        with serve_in_thread(create_app(center_settings, ["emb"], registry=registry)) as url:
            first = subscriber(center_settings, url, key, Applied(), name="before")
            await first.start()
            revision = await asyncio.to_thread(publish, center, 11)
            await eventually(lambda: first.revision == revision, what="the release")
            await first.stop()
        # the center is gone; the process starts again (a new instance, same snapshot folder)
        restarted = Applied()
        again = subscriber(center_settings, url, key, restarted, name="after")
        with caplog.at_level(logging.WARNING, logger="moorage.configcenter"):
            await again.start()
            await again.stop()
        assert restarted.batch_sizes == [11] and again.current is not None and again.current.revision == revision
        assert (
            "config center unreachable" in caplog.text
            and f"serving with snapshot of revision {revision}" in caplog.text
        )

        # a snapshot whose content was changed no longer matches its checksum: refused, not used
        path = again.snapshot.path
        data = json.loads(path.read_text())
        data["effective"]["values"]["serve"]["max_batch_size"] = 12
        path.write_text(json.dumps(data))
        caplog.clear()
        tampered = Applied()
        third = subscriber(center_settings, url, key, tampered, name="tampered")
        with caplog.at_level(logging.WARNING, logger="moorage.configcenter"):
            await third.start()
            await third.stop()
        assert tampered.batch_sizes == [] and third.current is None
        assert "snapshot" in caplog.text and "is refused: its sha256 does not match its content" in caplog.text
    finally:
        center.close()
        registry.close()


async def test_a_stream_worker_follows_its_group_over_http(center_settings, center_server, tmp_path):
    url, key, center = center_server
    config = center_settings.config.model_copy(update={"center_url": url, "api_key": SecretStr(key)})
    settings = center_settings.model_copy(update={"config": config})
    job = StreamJob(f"sqlite:///{tmp_path}/queue.db?topic=in", f"jsonl://{tmp_path}/out", "emb")
    stop = asyncio.Event()
    worker = asyncio.create_task(run_stream(settings, job, stop, follow_config=True))

    def worker_on(revision: int) -> bool:
        mine = [i for i in center.status()["instances"] if i["group"] == "stream:emb"]
        return len(mine) == 1 and mine[0]["revision"] == revision and mine[0]["status"] == "applied"

    try:
        await eventually(lambda: worker_on(0) or worker.done(), what="the worker's first report")
        assert not worker.done()
        center.edit_draft("group:stream:emb", {"stream": {"batch_size": 5}}, author="tester")
        center.publish("group:stream:emb", author="tester", comment="smaller stream batches")
        await eventually(lambda: worker_on(center.revision()), what="the worker on the group's release")
    finally:
        stop.set()
        await worker


async def test_a_stopping_server_ends_every_clients_hold(center_settings):
    """SIGTERM drains (uvicorn waits for requests in progress before it stops): a client's held long-poll
    ends at once, while the server's own subscriber keeps waiting rather than spinning."""
    center = ConfigCenter.from_settings(center_settings)
    revisions = Revisions(center)
    await revisions.start()
    try:
        after = revisions.revision
        client = asyncio.create_task(revisions.wait_past(after, 55, client=True))
        own = asyncio.create_task(revisions.wait_past(after, 55))
        await asyncio.sleep(0)  # they start waiting (started after the drain, they end the same way)
        revisions.drain()
        assert await client is False
        assert not own.done()
        assert await revisions.wait_past(after, 55, client=True) is False  # a new hold is answered at once
        own.cancel()
    finally:
        revisions.stop()
        center.close()
