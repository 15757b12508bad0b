"""Rate limits shared through a real Redis: two server processes' worth of apps, one budget per key."""

from __future__ import annotations

import logging
import uuid

import pytest

from moorage.config import load_settings
from moorage.registry import Registry
from moorage.security.keys import KeyStore

from tests.services.servers import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def limited(tmp_path, fake_model, redis_base):
    def make(redis_url: str):
        env = {
            "MOORAGE_HOME": str(tmp_path / "home"),
            "MOORAGE_SECURITY__AUDIT_FLUSH_MS": "0",
            "MOORAGE_SECURITY__LIMITS__REDIS_URL": redis_url,
        }
        return load_settings(environ=env)

    registry = Registry.from_settings(make(redis_base))
    registry.register(fake_model("embed"), "emb", "embed", alias="production")
    yield make, registry
    registry.close()


async def test_workers_share_one_budget_per_key(limited, serving, redis_base):
    make, registry = limited
    settings = make(redis_base)
    store = KeyStore(registry.catalog)
    rpm_key = store.create("invoker", requests_per_minute=4)[1]
    tpm_key = store.create("invoker", tokens_per_minute=10)[1]
    body = {"model": "emb", "input": "hi"}
    async with (
        serving(settings, registry, refs=("emb@production",)) as (_, one),
        serving(settings, registry, refs=("emb@production",)) as (_, two),
    ):
        h = {"Authorization": f"Bearer {rpm_key}"}
        codes = [(await c.post("/v1/embeddings", json=body, headers=h)).status_code for c in (one, two) * 3]
        assert codes == [200, 200, 200, 200, 429, 429], "4 requests per minute in all, not 4 per worker"
        r = await one.post("/v1/embeddings", json=body, headers=h)
        assert r.json()["error"]["code"] == "rate_limited" and 1 <= int(r.headers["retry-after"]) <= 16

        h = {"Authorization": f"Bearer {tpm_key}"}
        long = {"model": "emb", "input": " ".join(["word"] * 12)}  # 12 tokens: the budget is spent on worker one
        assert (await one.post("/v1/embeddings", json=long, headers=h)).status_code == 200
        r = await two.post("/v1/embeddings", json=body, headers=h)
        assert r.status_code == 429 and "tokens per minute" in r.json()["error"]["message"]

        other = {"Authorization": f"Bearer {store.create('invoker', requests_per_minute=4)[1]}"}
        assert (await two.post("/v1/embeddings", json=body, headers=other)).status_code == 200


async def test_an_unreachable_redis_lets_requests_through_and_warns(limited, serving, caplog):
    make, registry = limited
    settings = make(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    key = KeyStore(registry.catalog).create("invoker", requests_per_minute=1)[1]
    h = {"Authorization": f"Bearer {key}"}
    caplog.set_level(logging.WARNING, "moorage.security")
    async with serving(settings, registry, refs=("emb@production",)) as (_, c):
        for _ in range(3):
            r = await c.post("/v1/embeddings", json={"model": "emb", "input": str(uuid.uuid4())}, headers=h)
            assert r.status_code == 200
    assert sum("rate limits not enforced: Redis unreachable" in m for m in caplog.messages) == 1
