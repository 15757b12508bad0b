"""The config center's conformance suite: the same behaviour on the catalog (SQLite) and on a real etcd.

Drafts validated on save, publish, approval by another key, rollback to any release, gray releases
(labels, sticky percentage; promote, abandon), what each instance runs, waiting on the revision,
instance reports, concurrent writers, and an audit row for every action.
"""

from __future__ import annotations

import shutil
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from moorage.config import load_settings
from moorage.configcenter.releases import ConfigCenter, Instance, bucket, checksum
from moorage.configcenter.schema import InvalidConfig
from moorage.errors import Conflict, Forbidden
from moorage.registry import Registry
from moorage.security.audit import AuditLog

BACKENDS = ["catalog", "etcd"]
SERVER = Instance("server-1", "servers", {"zone": "a"})


def _settings(home, backend: str, etcd_url: str | None, **config: str):
    env = {"MOORAGE_HOME": str(home), "MOORAGE_USER": "tester", "MOORAGE_CONFIG__BACKEND": backend}
    if backend == "etcd":
        env |= {"MOORAGE_CONFIG__ETCD_URL": etcd_url or ""}
    return load_settings(environ=env | {f"MOORAGE_CONFIG__{k.upper()}": v for k, v in config.items()})


@pytest.fixture(scope="module")
def template_home(tmp_path_factory):
    """A catalog at the newest schema with model emb (v1 production, v2): each test copies it, so no test
    pays for the migrations and the registrations."""
    from moorage.runtime import make_fake_model

    root = tmp_path_factory.mktemp("config-center")
    registry = Registry.from_settings(_settings(root / "home", "catalog", None))
    registry.register(make_fake_model(root / "v1", "embed"), "emb", "embed", alias="production")
    registry.register(make_fake_model(root / "v2", "embed", seed=1), "emb", "embed")
    registry.close()
    return root / "home"


@pytest.fixture(params=BACKENDS)
def make_center(request, tmp_path, template_home):
    """Factory: a ConfigCenter on the parametrized backend; each call is another process's worth (its own
    backend client and waiters) on the same store."""
    etcd_url = request.getfixturevalue("etcd_url") if request.param == "etcd" else None
    shutil.copytree(template_home, tmp_path / "home")
    prefix = f"/t/{uuid.uuid4().hex}/"
    opened: list[ConfigCenter] = []
    registries: list[Registry] = []

    def make(**config: str) -> ConfigCenter:
        settings = _settings(tmp_path / "home", request.param, etcd_url, ETCD_PREFIX=prefix, **config)
        if not registries:
            registries.append(Registry.from_settings(settings))
        center = ConfigCenter.from_settings(settings, registry=registries[0])
        opened.append(center)
        return center

    yield make
    for center in opened:
        center.close()
    for registry in registries:
        registry.close()


def _publish(center: ConfigCenter, scope: str, values: dict, author: str = "alice", **kwargs):
    center.edit_draft(scope, values, author=author)
    return center.publish(scope, author=author, **kwargs)


INVALID = [
    ({"routing": {"emb": {"split": [{"target": "production", "weight": 60}, {"target": "2", "weight": 30}]}}},
     "/routing/emb/split"),
    ({"routing": {"emb": {"split": [{"target": "production", "weight": 90}, {"target": "canary", "weight": 10}]}}},
     "/routing/emb/split/1/target"),
    ({"security": {"filters": {"emb": {"input_deny": ["ok", "re:(unclosed"]}}}}, "/security/filters/emb/input_deny/1"),
    ({"serve": {"max_batch_size": 0}}, "/serve/max_batch_size"),
    ({"stream": {"batch_size": "many"}}, "/stream/batch_size"),
    ({"serve": {"max_batch_sise": 8}}, "/serve/max_batch_sise"),
    ({"security": {"master_key": "x"}}, "/security/master_key"),
]  # fmt: skip


def test_an_invalid_draft_is_refused_naming_the_field_and_nothing_changes(make_center):
    center = make_center()
    _publish(center, "global", {"serve": {"max_batch_size": 16}})
    before = (center.revision(), center.history(), center.draft("global"))
    for values, pointer in INVALID:
        with pytest.raises(InvalidConfig) as caught:
            center.edit_draft("global", values, author="alice")
        assert caught.value.status == 422 and caught.value.code == "invalid_config"
        assert [e["pointer"] for e in caught.value.errors] == [pointer], values
    assert (center.revision(), center.history(), center.draft("global")) == before


def test_draft_diff_publish_and_what_an_instance_runs(make_center):
    center = make_center()
    assert center.draft("global") == {} and center.effective(SERVER).values == {}
    center.edit_draft("global", {"serve": {"max_batch_size": 8, "port": 9000}}, author="alice")
    changes = {c.pointer: (c.old, c.new, c.restart) for c in center.diff("global")}
    assert changes == {"/serve/max_batch_size": (None, 8, False), "/serve/port": (None, 9000, True)}
    first = center.publish("global", author="alice", comment="smaller batches")
    assert (first.number, first.state, first.comment, first.author) == (1, "published", "smaller batches", "alice")
    assert first.checksum == checksum(first.values) and center.diff("global") == []
    with pytest.raises(Conflict):  # an unchanged draft is not a release
        center.publish("global", author="alice")

    _publish(center, "group:servers", {"serve": {"max_batch_size": 4}})
    _publish(center, "group:stream:orders", {"stream": {"batch_size": 16}})
    _publish(center, "model:emb", {"security": {"filters": {"emb": {"input_deny": ["secret"]}}}})
    server, worker = center.effective(SERVER), center.effective(Instance("w-1", "stream:orders"))
    assert server.values == {
        "serve": {"max_batch_size": 4, "port": 9000},
        "security": {"filters": {"emb": {"input_deny": ["secret"]}}},
    }
    assert server.releases == (1, 2, 4) and worker.releases == (1, 3, 4)
    assert worker.values["stream"] == {"batch_size": 16} and worker.values["serve"]["max_batch_size"] == 8
    assert server.revision == worker.revision == center.revision() and server.checksum == checksum(server.values)
    with pytest.raises(InvalidConfig) as caught:  # a model scope holds only its own routing and filters
        center.edit_draft("model:emb", {"serve": {"max_batch_size": 2}}, author="alice")
    assert caught.value.errors[0]["pointer"] == "/serve/max_batch_size"


def test_rollback_from_5_to_1_is_release_6_equal_to_1(make_center):
    center = make_center()
    for size in (1, 2, 3, 4, 5):
        _publish(center, "global", {"serve": {"max_batch_size": size}, "log_level": "INFO"})
    sixth = center.rollback("global", 1, author="bob")
    first = center.release(1)
    assert (sixth.number, sixth.rolled_back_to, sixth.state) == (6, 1, "published")
    assert sixth.values == first.values and sixth.checksum == first.checksum
    assert center.effective(SERVER).values == first.values and center.effective(SERVER).releases == (6,)
    assert center.draft("global") == first.values and center.diff("global") == []
    assert [r.number for r in center.history("global")] == [6, 5, 4, 3, 2, 1]


def test_with_approval_required_a_release_waits_for_another_key(make_center):
    center = make_center(require_approval="true")
    pending = _publish(center, "global", {"serve": {"max_wait_ms": 1.0}})
    assert pending.state == "pending_approval" and center.effective(SERVER).values == {}
    with pytest.raises(Forbidden) as refused:
        center.approve(pending.number, approver="alice")
    assert refused.value.status == 403 and refused.value.code == "self_approval"
    assert center.release(pending.number).state == "pending_approval"
    approved = center.approve(pending.number, approver="bob")
    assert (approved.state, approved.approved_by) == ("published", "bob")
    assert center.effective(SERVER).values == {"serve": {"max_wait_ms": 1.0}}
    with pytest.raises(Conflict):
        center.approve(pending.number, approver="carol")
    rolled = center.rollback("global", pending.number, author="alice")  # a rollback is a release like any other
    assert rolled.state == "pending_approval"


def test_gray_by_label_then_promote(make_center):
    center = make_center()
    _publish(center, "group:servers", {"serve": {"max_batch_size": 32}})
    other = Instance("server-2", "servers", {"zone": "b"})
    gray = _publish(center, "group:servers", {"serve": {"max_batch_size": 8}}, gray={"labels": {"zone": "a"}})
    assert gray.state == "gray" and gray.gray == {"labels": {"zone": "a"}}
    assert center.effective(SERVER).values["serve"]["max_batch_size"] == 8
    assert center.effective(other).values["serve"]["max_batch_size"] == 32
    with pytest.raises(Conflict):  # one gray release per scope at a time
        _publish(center, "group:servers", {"serve": {"max_batch_size": 9}}, gray={"labels": {"zone": "b"}})
    main = center.promote(gray.number, author="bob")
    assert main.state == "published" and main.values == gray.values and main.number > gray.number
    assert (center.release(gray.number).state, center.release(gray.number).promoted_to) == ("promoted", main.number)
    assert center.effective(other).values["serve"]["max_batch_size"] == 8


def test_gray_by_sticky_percent_then_abandon(make_center):
    center = make_center()
    _publish(center, "global", {"serve": {"max_batch_size": 32}})
    fleet = [Instance(f"server-{i}", "servers") for i in range(40)]
    center.edit_draft("global", {"serve": {"max_batch_size": 8}}, author="alice")
    gray = center.publish("global", author="alice", gray={"percent": 30})
    covered = {i.id for i in fleet if center.effective(i).values["serve"]["max_batch_size"] == 8}
    assert covered == {i.id for i in fleet if bucket("global", i.id) < 3000} and 0 < len(covered) < len(fleet)
    abandoned = center.abandon(gray.number, author="alice")
    assert abandoned.state == "abandoned"
    assert all(center.effective(i).values["serve"]["max_batch_size"] == 32 for i in fleet[:5])
    wider = center.publish("global", author="alice", gray={"percent": 50})  # a bucket in at 30 % stays in at 50 %
    assert covered <= {i.id for i in fleet if center.effective(i).values["serve"]["max_batch_size"] == 8}
    center.abandon(wider.number, author="alice")
    by_request = center.publish("global", author="alice", gray={"percent": 10, "by": "request", "key": "header:X-User"})
    effective = center.effective(SERVER)  # by request: every instance gets the share to apply per request
    assert effective.values["serve"]["max_batch_size"] == 32
    assert effective.request_gray == (
        {"number": by_request.number, "scope": "global", "percent": 10, "key": "header:X-User",
         "values": {"serve": {"max_batch_size": 8}}},
    )  # fmt: skip
    with pytest.raises(InvalidConfig) as caught:
        center.publish("global", author="alice", gray={"percent": 130})
    assert caught.value.errors[0]["pointer"] == "/gray/percent"


def test_wait_wakes_on_a_release_from_another_center(make_center):
    center, other = make_center(), make_center()  # two processes' worth: each its own backend and waiters
    start = center.revision()
    assert center.wait(start, 0.05) == start  # nothing new: the hold ends with the same revision
    woke: list[int] = []
    waiters = [threading.Thread(target=lambda: woke.append(center.wait(start, 60))) for _ in range(5)]
    for t in waiters:
        t.start()
    release = _publish(other, "global", {"serve": {"max_wait_ms": 2.0}})
    for t in waiters:
        t.join(60)
    assert len(woke) == 5 and all(r > start for r in woke) and all(r == other.revision() for r in woke)
    assert center.effective(SERVER).releases == (release.number,)


def test_concurrent_publishers_get_distinct_numbers(make_center):
    centers = [make_center() for _ in range(4)]
    numbers: list[int] = []
    errors: list[BaseException] = []

    def publish(i: int) -> None:
        try:
            numbers.append(_publish(centers[i], f"group:g{i}", {"serve": {"max_batch_size": i + 1}}).number)
        except BaseException as exc:  # a failure must fail the test, not vanish with the thread
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and sorted(numbers) == [1, 2, 3, 4]
    assert sorted(r.number for r in centers[0].history()) == [1, 2, 3, 4]


def test_reports_and_status(make_center):
    center = make_center()
    _publish(center, "global", {"serve": {"max_batch_size": 8}})
    revision = center.revision()
    center.report(SERVER, revision, "applied")
    center.report(Instance("server-2", "servers"), revision - 1, "applied")
    center.report(Instance("w-1", "stream:orders"), revision, "rejected", "max_batch_size: engine refused")
    silent = {"instance_id": "old", "group": "servers", "labels": {}, "revision": 0, "status": "applied",
              "reason": "", "at": datetime.now(UTC) - timedelta(hours=1)}  # fmt: skip
    center.backend.put_report(silent)
    status = center.status()
    assert (status["revision"], status["live"], status["current"], status["rejected"], status["gone"]) == (
        revision, 3, 1, 1, 1,
    )  # fmt: skip
    assert status["summary"] == f"1 of 3 instances on revision {revision}, 1 rejected (1 gone: no report for 90 s)"
    rejected = next(i for i in status["instances"] if i["status"] == "rejected")
    assert rejected["reason"] == "max_batch_size: engine refused" and rejected["group"] == "stream:orders"
    center.report(SERVER, revision, "applied")  # a report again is a heartbeat, not a second instance
    assert center.status()["live"] == 3


def test_every_action_is_an_audit_row_and_the_chain_verifies(make_center):
    center = make_center(require_approval="true")
    pending = _publish(center, "global", {"serve": {"max_batch_size": 8}})
    center.approve(pending.number, approver="bob")
    center.edit_draft("global", {"serve": {"max_batch_size": 4}}, author="alice")
    gray = center.publish("global", author="alice", gray={"labels": {"zone": "a"}})
    center.approve(gray.number, approver="bob")
    center.promote(gray.number, author="bob")
    center.rollback("global", 1, author="alice")
    center.abandon(center.history()[0].number, author="alice")
    audit = AuditLog(center.registry.catalog)
    rows = audit.rows()
    assert [(r["action"], r["key_id"]) for r in rows] == [
        ("config.edit", "alice"), ("config.publish", "alice"), ("config.approve", "bob"), ("config.edit", "alice"),
        ("config.publish", "alice"), ("config.approve", "bob"), ("config.promote", "bob"),
        ("config.rollback", "alice"), ("config.abandon", "alice"),
    ]  # fmt: skip
    assert rows[1]["detail"]["release"] == 1 and rows[1]["detail"]["checksum"] == center.release(1).checksum
    assert audit.verify() == (len(rows), [])


def test_an_unreachable_etcd_is_a_503_that_names_it(tmp_path):
    from moorage.configcenter.backends import BackendUnavailable

    from tests.integration.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    center = ConfigCenter.from_settings(_settings(tmp_path / "home", "etcd", url))
    try:
        with pytest.raises(BackendUnavailable) as caught:
            center.edit_draft("global", {"serve": {"max_batch_size": 8}}, author="alice")
    finally:
        center.close()
    assert caught.value.status == 503 and url in caught.value.message and "is it running?" in caught.value.message
    assert url not in caught.value.client_message  # a network client is not told where the store is


def test_the_catalog_backend_on_postgresql(tmp_path, pg_url):
    """What differs from SQLite: row locks (FOR UPDATE) order the writers, the poll is a plain SELECT."""
    env = {"MOORAGE_HOME": str(tmp_path / "home"), "MOORAGE_REGISTRY__CATALOG_URL": pg_url}
    centers = [ConfigCenter.from_settings(load_settings(environ=env)) for _ in range(4)]
    try:
        start = centers[0].revision()
        woke: list[int] = []
        waiter = threading.Thread(target=lambda: woke.append(centers[0].wait(start, 60)))
        waiter.start()
        numbers: list[int] = []

        def publish(i: int) -> None:
            numbers.append(_publish(centers[i], f"group:g{i}", {"log_level": "DEBUG"}).number)

        publishers = [threading.Thread(target=publish, args=(i,)) for i in range(1, 4)]
        for t in publishers:
            t.start()
        for t in (*publishers, waiter):
            t.join(60)
        assert sorted(numbers) == [1, 2, 3] and woke and woke[0] > start
        back = centers[0].rollback("group:g1", centers[0].history("group:g1")[0].number, author="bob")
        assert centers[0].effective(Instance("x", "g1")).releases == (back.number,) and back.number == 4
        assert AuditLog(centers[0].registry.catalog).verify()[1] == []
    finally:
        for center in centers:
            center.close()
