"""The config center over HTTP: invalid drafts are 422 naming each field as a JSON pointer (and change
nothing), the draft -> diff -> publish -> history -> rollback path, approval by another key, roles."""

from __future__ import annotations

import pytest

from moorage.config import load_settings
from moorage.registry import Registry
from moorage.security.audit import AuditLog
from moorage.security.keys import KeyStore

pytestmark = pytest.mark.anyio

SPLIT_90 = [{"target": "production", "weight": 60}, {"target": "2", "weight": 30}]
SPLIT_UNKNOWN = [{"target": "production", "weight": 90}, {"target": "canary", "weight": 10}]
BAD_REGEX = {"output_deny": ["re:[a-"]}
INVALID = [
    ("weight sum 90", {"routing": {"emb": {"split": SPLIT_90}}}, "/routing/emb/split"),
    ("unknown alias", {"routing": {"emb": {"split": SPLIT_UNKNOWN}}}, "/routing/emb/split/1/target"),
    ("bad regex", {"security": {"filters": {"emb": BAD_REGEX}}}, "/security/filters/emb/output_deny/0"),
    ("batch size 0", {"serve": {"max_batch_size": 0}}, "/serve/max_batch_size"),
    ("a string for an int", {"serve": {"max_queue": "lots"}}, "/serve/max_queue"),
]  # fmt: skip


@pytest.fixture
def center_app(tmp_path, fake_model, serving):
    """The app with auth on, model emb (v1 production, v2) and keys by role; yields (client, keys, registry)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def start(**config: str):
        env = {"MOORAGE_HOME": str(tmp_path / "home"), "MOORAGE_USER": "tester"}
        settings = load_settings(environ=env | {f"MOORAGE_CONFIG__{k.upper()}": v for k, v in config.items()})
        registry = Registry.from_settings(settings)
        registry.register(fake_model("embed"), "emb", "embed", alias="production")
        registry.register(fake_model("embed", seed=1), "emb", "embed")
        store = KeyStore(registry.catalog)
        keys = {role: {"Authorization": f"Bearer {store.create(role)[1]}"} for role in ("admin", "operator", "invoker")}
        try:
            async with serving(settings, registry, refs=("emb@production",)) as (_, client):
                yield client, keys, registry
        finally:
            registry.close()

    return start


async def test_invalid_drafts_are_422_with_json_pointers_and_nothing_is_published(center_app):
    async with center_app() as (c, keys, _):
        op = keys["operator"]
        saved = {"serve": {"max_batch_size": 16}}
        assert (await c.put("/v1/config/drafts/global", json={"values": saved}, headers=op)).status_code == 200
        for what, values, pointer in INVALID:
            r = await c.put("/v1/config/drafts/global", json={"values": values}, headers=op)
            assert r.status_code == 422, what
            error = r.json()["error"]
            assert error["code"] == "invalid_config" and error["param"] == pointer, what
            assert [e["pointer"] for e in error["errors"]] == [pointer] and error["errors"][0]["message"], what
        assert (await c.get("/v1/config/drafts/global", headers=op)).json()["values"] == saved
        assert (await c.get("/v1/config/releases", headers=op)).json()["data"] == []
        several = {"serve": {"max_batch_size": 0, "max_wait_ms": -1}, "stream": {"batch_size": "x"}}
        r = await c.put("/v1/config/drafts/global", json={"values": several}, headers=op)
        assert {e["pointer"] for e in r.json()["error"]["errors"]} == {
            "/serve/max_batch_size", "/serve/max_wait_ms", "/stream/batch_size"
        }  # fmt: skip


async def test_draft_diff_publish_history_rollback_and_status(center_app):
    async with center_app() as (c, keys, registry):
        op = keys["operator"]
        values = {"serve": {"max_batch_size": 8, "port": 9001}, "log_level": "debug"}
        await c.put("/v1/config/drafts/global", json={"values": values}, headers=op)
        diff = (await c.get("/v1/config/drafts/global/diff", headers=op)).json()
        assert diff["restart"] is True
        assert {ch["pointer"]: ch["restart"] for ch in diff["changes"]} == {
            "/log_level": False, "/serve/max_batch_size": False, "/serve/port": True
        }  # fmt: skip
        first = await c.post("/v1/config/releases", json={"scope": "global", "comment": "first"}, headers=op)
        assert first.status_code == 201 and first.json()["number"] == 1 and first.json()["state"] == "published"
        again = await c.post("/v1/config/releases", json={"scope": "global"}, headers=op)
        assert again.status_code == 409 and again.json()["error"]["code"] == "no_changes"
        await c.put("/v1/config/drafts/global", json={"values": {"serve": {"max_batch_size": 4}}}, headers=op)
        await c.post("/v1/config/releases", json={"scope": "global"}, headers=op)
        back = await c.post("/v1/config/rollback", json={"scope": "global", "to": 1}, headers=op)
        assert back.status_code == 201 and back.json()["number"] == 3 and back.json()["values"] == values
        history = (await c.get("/v1/config/releases", params={"scope": "global"}, headers=op)).json()["data"]
        assert [(r["number"], r["rolled_back_to"]) for r in history] == [(3, 1), (2, None), (1, None)]
        status = (await c.get("/v1/config/status", headers=op)).json()
        assert status["revision"] == 3 and "instances on revision 3" in status["summary"]
        bad_scope = await c.get("/v1/config/drafts/everything", headers=op)
        assert bad_scope.status_code == 400 and bad_scope.json()["error"]["code"] == "invalid_scope"
        assert (await c.post("/v1/config/releases/99/approve", headers=op)).status_code == 404
    actions = [r["action"] for r in AuditLog(registry.catalog).rows() if r["action"].startswith("config.")]
    assert actions == ["config.edit", "config.publish", "config.edit", "config.publish", "config.rollback"]


async def test_the_author_cannot_approve_and_an_invoker_cannot_touch_config(center_app):
    async with center_app(require_approval="true") as (c, keys, _):
        op, admin, invoker = keys["operator"], keys["admin"], keys["invoker"]
        await c.put("/v1/config/drafts/global", json={"values": {"serve": {"max_wait_ms": 1}}}, headers=op)
        pending = (await c.post("/v1/config/releases", json={"scope": "global"}, headers=op)).json()
        assert pending["state"] == "pending_approval"
        own = await c.post(f"/v1/config/releases/{pending['number']}/approve", headers=op)
        assert own.status_code == 403 and own.json()["error"]["code"] == "self_approval"
        approved = await c.post(f"/v1/config/releases/{pending['number']}/approve", headers=admin)
        assert approved.status_code == 200 and approved.json()["state"] == "published"
        for method, path in [("GET", "/v1/config/drafts/global"), ("GET", "/v1/config/releases"),
                             ("POST", "/v1/config/releases/1/abandon"), ("GET", "/v1/config/status")]:  # fmt: skip
            r = await c.request(method, path, headers=invoker)
            assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied", path
