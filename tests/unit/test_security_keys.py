"""The API key cache: bounded LRUs of known and unknown ids, stale rows during a catalog outage, and
503 bodies that name no infrastructure. The catalog is a real SQLite file; an outage is injected at
the catalog's session (tests/faults/test_catalog_outage.py stops a real PostgreSQL)."""

from __future__ import annotations

import json
import secrets
import socket
import threading
from contextlib import contextmanager

import pytest
from sqlalchemy import event

from moorage.db import Catalog, CatalogUnavailable
from moorage.errors import MissingDependency, Unauthorized
from moorage.security.keycache import KeyCache, Lru
from moorage.security.keys import KeyStore
from moorage.server.errors import error_response

from tests.services.servers import free_port


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _random_token() -> str:
    return f"moor_{secrets.token_hex(6)}_{secrets.token_urlsafe(24)}"


@pytest.fixture
def catalog(tmp_path):
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    yield catalog
    catalog.dispose()


@pytest.fixture
def key_reads(catalog):
    """How many statements have read the api_keys table so far."""
    reads = [0]

    def count(conn, cursor, statement, *args) -> None:
        reads[0] += statement.lstrip().upper().startswith("SELECT") and "api_keys" in statement

    event.listen(catalog.engine, "before_cursor_execute", count)
    return lambda: reads[0]


class Outage:
    """Make the catalog's sessions fail as an unreachable database does, and count the attempts."""

    def __init__(self, catalog: Catalog, monkeypatch) -> None:
        self.catalog, self.monkeypatch, self.num_attempts = catalog, monkeypatch, 0

    def start(self) -> None:
        @contextmanager
        def unreachable():
            self.num_attempts += 1
            raise CatalogUnavailable()
            yield  # pragma: no cover - a generator, never reached

        self.monkeypatch.setattr(self.catalog, "session", unreachable)

    def end(self) -> None:
        self.monkeypatch.undo()


def test_lru_forgets_the_least_recently_used():
    lru: Lru[str, int] = Lru(3)
    for i, key in enumerate("abc"):
        lru.put(key, i)
    assert lru.get("a") == 0  # a is now the most recent
    lru.put("d", 3)
    assert "b" not in lru and len(lru) == 3 and lru.get("c") == 2
    lru.put("a", 9)
    lru.put("e", 4)
    assert [k for k in "acde" if k in lru] == ["a", "c", "e"]  # get("c") and put("a") left d the oldest
    with pytest.raises(ValueError):
        Lru(0)


def test_unknown_ids_evict_only_unknown_ids():
    cache: KeyCache[str] = KeyCache(fresh_s=5, stale_s=60, max_known=2, max_unknown=3)
    cache.remember("k1", "row1", at=0)
    cache.remember("k2", "row2", at=0)
    for i in range(1000):
        cache.remember(f"random{i}", None, at=0)
    assert cache.sizes() == (2, 3)
    assert cache.fresh("k1", 1) == (True, "row1") and cache.fresh("k2", 1) == (True, "row2")
    assert cache.fresh("random999", 1) == (True, None)  # the latest unknown ids are remembered
    assert cache.fresh("random0", 1) == (False, None)  # the oldest were forgotten: read again
    assert cache.fresh("k1", 5) == (False, None) and cache.stale("k1", 59) == (59, "row1")
    assert cache.stale("k1", 60) is None and cache.stale("random999", 1) is None  # unknown: never stale


def test_an_answer_older_than_the_cached_one_is_dropped():
    cache: KeyCache[str] = KeyCache(fresh_s=5, stale_s=60)
    cache.remember("k", "revoked row", at=10)  # revoked in this process
    cache.remember("k", "valid row", at=9)  # a read that began before the revocation, answered after
    assert cache.fresh("k", 11) == (True, "revoked row")
    cache.remember("k", None, at=12)  # deleted: it moves to the unknown ids
    assert cache.fresh("k", 13) == (True, None) and cache.stale("k", 13) is None


def test_a_flood_of_random_ids_does_not_evict_a_valid_key(catalog, key_reads):
    store = KeyStore(catalog, cache_s=3600, max_cached=100)
    _, valid = store.create("invoker")
    assert store.authenticate(valid).role == "invoker" and key_reads() == 1
    flood = [_random_token() for _ in range(300)]
    for token in flood:
        with pytest.raises(Unauthorized):
            store.authenticate(token)
    assert key_reads() == 301
    assert store.authenticate(valid).role == "invoker" and not store.needs_lookup(valid)
    with pytest.raises(Unauthorized):
        store.authenticate(flood[-1])  # one of the 100 latest unknown ids: no read either
    assert key_reads() == 301
    with pytest.raises(Unauthorized):
        store.authenticate(flood[0])  # forgotten: read again
    assert key_reads() == 302


def test_known_keys_outlive_an_outage_for_key_stale_s(catalog, monkeypatch):
    clock = Clock()
    store = KeyStore(catalog, cache_s=5, stale_s=60, retry_s=1, clock=clock)
    elsewhere = KeyStore(catalog)  # another process: its changes reach `store` only through the catalog
    _, valid = store.create("invoker")
    revoked_info, revoked = store.create("invoker")
    later_info, revoked_later = store.create("invoker")
    _, never_seen = store.create("invoker")
    assert store.authenticate(valid).role == store.authenticate(revoked_later).role == "invoker"
    store.revoke(revoked_info.id)
    elsewhere.revoke(later_info.id)
    outage = Outage(catalog, monkeypatch)
    outage.start()

    clock.now += 10  # every cached row is past key_cache_s
    assert store.needs_lookup(valid)
    assert store.authenticate(valid).key_id  # the catalog refused the read: the last row answers
    assert outage.num_attempts == 1 and not store.needs_lookup(valid)  # no new attempt for retry_s
    for _ in range(100):
        store.authenticate(valid)
    assert outage.num_attempts == 1
    with pytest.raises(Unauthorized, match="revoked"):
        store.authenticate(revoked)  # revoked here before the outage: stays refused
    with pytest.raises(Unauthorized, match="not valid"):
        store.authenticate(valid[:-4] + ("AAAA" if not valid.endswith("AAAA") else "BBBB"))
    for token in (never_seen, _random_token()):  # unknown here: maybe created meanwhile, so 503, not 401
        with pytest.raises(CatalogUnavailable):
            store.authenticate(token)
    assert store.authenticate(revoked_later).key_id == later_info.id  # revoked elsewhere: not yet visible

    clock.now += 1
    store.authenticate(valid)
    assert outage.num_attempts == 2  # asked again after retry_s
    clock.now += 48.5  # 59.5 s since the row was read
    store.authenticate(valid)
    clock.now += 1
    with pytest.raises(CatalogUnavailable):
        store.authenticate(valid)  # older than key_stale_s: no longer trusted

    outage.end()
    clock.now += 1
    assert store.authenticate(valid).role == "invoker"  # read afresh
    with pytest.raises(Unauthorized, match="revoked"):
        store.authenticate(revoked_later)
    assert store.authenticate(never_seen).role == "invoker"


def test_while_one_call_reads_a_key_the_others_use_its_last_row(catalog, key_reads):
    clock = Clock()
    store = KeyStore(catalog, cache_s=5, stale_s=60, clock=clock)
    _, valid = store.create("invoker")
    store.authenticate(valid)
    clock.now += 10
    entered, release = threading.Event(), threading.Event()
    read = store._read

    def slow_read(key_id: str):  # a catalog that takes its time to answer
        entered.set()
        release.wait(30)
        return read(key_id)

    store._read = slow_read  # type: ignore[method-assign]
    reader = threading.Thread(target=store.authenticate, args=(valid,))
    reader.start()
    try:
        assert entered.wait(30)
        assert not store.needs_lookup(valid)
        assert store.authenticate(valid).role == "invoker" and key_reads() == 1  # no second read
    finally:
        release.set()
        reader.join(30)
    assert key_reads() == 2 and not store.needs_lookup(valid)  # the row read is fresh


def test_a_catalog_that_never_answers_fails_instead_of_hanging():
    """A host that accepts the connection and then says nothing (a hung server, a half-open
    firewall): without a connect timeout the driver waits forever."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"postgresql://moorage@127.0.0.1:{silent.getsockname()[1]}/moorage"
        outcome: list[BaseException] = []

        def open_catalog() -> None:
            try:
                Catalog(url)
            except BaseException as exc:
                outcome.append(exc)

        opener = threading.Thread(target=open_catalog, daemon=True)
        opener.start()
        opener.join(60)  # only turns a hang into a failure
        assert outcome and isinstance(outcome[0], CatalogUnavailable), "opening the catalog hung"


def test_stale_rows_can_be_switched_off(catalog, monkeypatch):
    clock = Clock()
    store = KeyStore(catalog, cache_s=5, stale_s=0, clock=clock)
    _, valid = store.create("invoker")
    store.authenticate(valid)
    Outage(catalog, monkeypatch).start()
    assert store.authenticate(valid).role == "invoker"  # still fresh
    clock.now += 5
    with pytest.raises(CatalogUnavailable):
        store.authenticate(valid)


def test_catalog_errors_name_no_infrastructure_to_clients():
    port = free_port()  # nothing listens there
    with pytest.raises(CatalogUnavailable) as caught:
        Catalog(f"postgresql://secretuser:hunter2pass@127.0.0.1:{port}/secretdb")
    exc = caught.value
    assert str(port) in exc.message and "secretdb" in exc.message  # the command line says what failed
    assert "hunter2pass" not in exc.message
    body = json.loads(error_response(exc).body)
    assert body["error"] == {
        "message": "the catalog database cannot be reached; retry shortly",
        "type": "server_error",
        "code": "catalog_unavailable",
        "param": None,
    }
    with pytest.raises(MissingDependency) as no_driver:
        Catalog("mysql+nosuchdriver://secretuser:hunter2pass@db.internal/secretdb")
    assert "hunter2pass" not in no_driver.value.message and "***" in no_driver.value.message
