"""The PostgreSQL catalog stopped while a server serves a loaded model.

Known keys keep working from the row the catalog last returned (for `security.key_stale_s`), though
their cache (`security.key_cache_s`) expires many times over during the outage; unknown ids are
refused with a generic 503; a key whose row says revoked stays refused; no 503 body names the
database's driver, user, host or port; once the catalog answers again a key revoked elsewhere is
refused. And a flood of random key ids cannot push a valid key out of the cache.

The outage is measured in failed catalog reads, not seconds: the key store asks the catalog again
only every `retry_s` (1 s), so NUM_FAILED_READS failed reads mean the catalog was down for at least
that many seconds less one, with the cache expiring every KEY_CACHE_S all along.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from contextlib import contextmanager

import pytest
from sqlalchemy import event

from moorage.config import load_settings
from moorage.db import CatalogUnavailable
from moorage.errors import Unauthorized
from moorage.registry import Registry
from moorage.security.audit import AuditLog
from moorage.security.keys import KeyStore

from tests.services.restartable import postgres_service

pytestmark = pytest.mark.anyio

KEY_CACHE_S = 0.2  # far shorter than the outage: every known key is served stale, not from a fresh row
NUM_FAILED_READS = 6  # the outage lasts until the catalog has refused this many reads (>= 5 s)
MIN_CALLS = 150
NUM_RANDOM_IDS = 20_000


def _random_token() -> str:
    return f"moor_{secrets.token_hex(6)}_{secrets.token_urlsafe(24)}"


def _leaks(text: str, url: str) -> list[str]:
    """The parts of the catalog URL (and driver names) that a client body must never carry."""
    port = url.rsplit(":", 1)[1].split("/")[0]
    words = ["127.0.0.1", "localhost", "moorage@", port, "psycopg", "postgresql", "postgres", "sqlalchemy"]
    return [w for w in words if w in text.lower()]


class CountingReads:
    """Wraps the catalog of the server's key store: every key read, and how many the catalog refused."""

    def __init__(self, keys: KeyStore) -> None:
        self.num_reads = self.num_failed = 0
        catalog = keys.catalog
        counter = self

        class Counted:
            def __getattr__(self, name: str):
                return getattr(catalog, name)

            @contextmanager
            def session(self):
                counter.num_reads += 1
                try:
                    with catalog.session() as s:
                        yield s
                except CatalogUnavailable:
                    counter.num_failed += 1
                    raise

        keys.catalog = Counted()  # type: ignore[assignment]


@pytest.fixture
def catalog():
    with postgres_service() as pg:
        yield pg


async def test_known_keys_keep_serving_through_a_catalog_outage(catalog, tmp_path, fake_model, serving):
    environ = {
        "MOORAGE_HOME": str(tmp_path / "home"),
        "MOORAGE_USER": "tester",
        "MOORAGE_REGISTRY__CATALOG_URL": catalog.url,
        "MOORAGE_SECURITY__KEY_CACHE_S": str(KEY_CACHE_S),
    }
    settings = load_settings(environ=environ)
    registry = Registry.from_settings(settings)
    registry.register(fake_model("embed"), "emb", "embed")
    elsewhere = KeyStore(registry.catalog)  # as if another server process or the CLI
    known = [elsewhere.create("invoker", name=f"client-{i}")[1] for i in range(3)]
    admin = elsewhere.create("admin")[1]
    revoked_info, revoked = elsewhere.create("invoker")
    elsewhere.revoke(revoked_info.id)
    revoked_later_info, revoked_later = elsewhere.create("invoker")
    body = {"model": "emb", "input": "hello"}

    def bearer(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async with serving(settings, registry, refs=("emb",)) as (app, c):
        for key in [*known, admin, revoked_later]:
            assert (await c.post("/v1/embeddings", json=body, headers=bearer(key))).status_code == 200
        assert (await c.post("/v1/embeddings", json=body, headers=bearer(revoked))).status_code == 401
        elsewhere.revoke(revoked_later_info.id)  # the server still holds the row it read as valid
        reads = CountingReads(app.state.guard.keys)

        catalog.stop()
        statuses: Counter[int] = Counter()
        refused_unknown: Counter[int] = Counter()
        bodies_503: list[str] = []

        async def call(key: str) -> None:
            r = await c.post("/v1/embeddings", json=body, headers=bearer(key))
            (statuses if key in known else refused_unknown)[r.status_code] += 1
            if r.status_code == 503:
                bodies_503.append(r.text)

        # rounds of one call per known key until the outage is long enough; then unknown ids
        for _ in range(100_000):
            if reads.num_failed >= NUM_FAILED_READS and statuses.total() >= MIN_CALLS:
                break
            await asyncio.gather(*map(call, known))
        else:
            raise AssertionError(f"the catalog refused only {reads.num_failed} reads in 100,000 rounds")
        for _ in range(50):
            await call(_random_token())

        # still during the outage: other paths that need the catalog, and the keys the server knows
        forged = known[0][:-4] + ("AAAA" if not known[0].endswith("AAAA") else "BBBB")
        during = {
            "forged": await c.post("/v1/embeddings", json=body, headers=bearer(forged)),
            "revoked": await c.post("/v1/embeddings", json=body, headers=bearer(revoked)),
            "revoked_later": await c.post("/v1/embeddings", json=body, headers=bearer(revoked_later)),
            "registry": await c.get("/v1/registry/models", headers=bearer(admin)),
            "keys": await c.get("/admin/keys", headers=bearer(admin)),
            "readyz": await c.get("/readyz"),
        }
        bodies_503 += [r.text for r in during.values() if r.status_code == 503]
        outage = (statuses.total(), reads.num_reads, reads.num_failed)

        catalog.start()

        async def refused_again() -> bool:
            r = await c.post("/v1/embeddings", json=body, headers=bearer(revoked_later))
            return r.status_code == 401 and r.json()["error"]["code"] == "revoked_api_key"

        for _ in range(10_000):  # bounded: each try is one call; the key store retries the catalog every 1 s
            if await refused_again():
                break
        else:
            raise AssertionError("the revoked key was never refused after the catalog came back")
        after = [(await c.post("/v1/embeddings", json=body, headers=bearer(k))).status_code for k in known]
        unknown_after = await c.post("/v1/embeddings", json=body, headers=bearer(_random_token()))

    print(
        f"\noutage: {outage[0]} calls with known keys, {statuses.total() - statuses[200]} failed; "
        f"{refused_unknown.total()} calls with unknown keys, answered {dict(refused_unknown)}; "
        f"key reads during the outage: {outage[1]} ({outage[2]} refused by the catalog)"
    )
    assert statuses == Counter({200: statuses.total()}), statuses
    assert outage[2] >= NUM_FAILED_READS and statuses.total() >= MIN_CALLS
    assert set(refused_unknown) == {503}, refused_unknown
    for leak in bodies_503:
        assert _leaks(leak, catalog.url) == [], leak
        assert '"code":"catalog_unavailable"' in leak
    assert during["forged"].status_code == 401
    assert during["revoked"].json()["error"]["code"] == "revoked_api_key"
    assert during["revoked_later"].status_code == 200  # bounded staleness: the last row it verified
    assert during["registry"].status_code == during["keys"].status_code == 503
    assert during["readyz"].status_code == 200  # the model is loaded: this server can serve
    assert after == [200] * len(known) and unknown_after.status_code == 401
    # the calls of the outage were audited once the catalog came back (the writer keeps them queued)
    audited = AuditLog(registry.catalog).rows(action="embeddings")
    assert sum(1 for r in audited if r["status"] == 200) >= outage[0]
    registry.close()


def test_random_key_ids_cannot_evict_a_valid_key(catalog, tmp_path):
    registry = Registry(catalog.url, str(tmp_path / "store"))
    keys = KeyStore(registry.catalog, cache_s=3600)  # long enough that only an eviction forces a read
    _, valid = keys.create("invoker")
    num_reads = 0

    def count(conn, cursor, statement, *args) -> None:
        nonlocal num_reads
        num_reads += statement.lstrip().upper().startswith("SELECT") and "api_keys" in statement

    event.listen(registry.catalog.engine, "before_cursor_execute", count)
    assert keys.authenticate(valid).role == "invoker" and num_reads == 1
    flood = [_random_token() for _ in range(NUM_RANDOM_IDS)]
    for token in flood:
        with pytest.raises(Unauthorized):
            keys.authenticate(token)
    assert num_reads == 1 + NUM_RANDOM_IDS  # each new id is read once
    assert keys.authenticate(valid).role == "invoker"
    assert num_reads == 1 + NUM_RANDOM_IDS, "the valid key was evicted by the flood"
    with pytest.raises(Unauthorized):
        keys.authenticate(flood[-1])  # a recent unknown id is answered from the cache too
    assert num_reads == 1 + NUM_RANDOM_IDS
    print(f"\n{NUM_RANDOM_IDS} random ids: {num_reads - 1} reads; then the valid key: 0 reads")
    registry.close()
