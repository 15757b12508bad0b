"""A release applied under steady load: two `moorage serve` processes and one `moorage stream run`
worker on one catalog, a few hundred requests and messages flowing, and a release that changes
``serve.max_batch_size``, a rate limit and a content filter. No request fails but the ones the new
values refuse, every instance reports the release applied, and the new values show in behaviour."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx

from moorage.config import load_settings
from moorage.configcenter.releases import ConfigCenter
from moorage.registry import Registry
from moorage.security.keys import KeyStore

from tests.e2e.conftest import free_port
from tests.services.fleet import Fleet
from tests.services.fleet import dead_letter_reasons as _dead_letters
from tests.services.fleet import predict as _predict
from tests.services.fleet import publish as _publish
from tests.services.fleet import ready as _ready
from tests.support import wait_until

NUM_REQUESTS = 300  # HTTP requests of the steady load, spread over both servers
NUM_MESSAGES = 120  # stream messages, half before the release and half once it is applied
RELEASE = {
    "serve": {"max_batch_size": 4},
    "stream": {"batch_size": 8},
    "security": {"limits": {"requests_per_minute": 5}, "filters": {"emb": {"input_deny": ["forbidden"]}}},
}


def _rows(db: Path) -> int:
    try:
        return sqlite3.connect(db).execute("SELECT count(*) FROM r").fetchone()[0] if db.exists() else 0
    except sqlite3.OperationalError:  # the sink has not created its table yet
        return 0


def test_a_release_is_applied_by_every_instance_under_steady_load_without_failing_a_request(
    cli_env, fake_model, tmp_path
):
    env = cli_env | {"MOORAGE_SECURITY__AUTH": "true"}
    settings = load_settings(environ={k: v for k, v in env.items() if k.startswith("MOORAGE_")})
    registry = Registry.from_settings(settings)
    registry.register(fake_model("embed", delay_ms=2), "emb", "embed", alias="production")
    keys = KeyStore(registry.catalog)
    load_key = keys.create("invoker", name="load", requests_per_minute=1_000_000)[1]  # its own limit: never 429
    probe_key = keys.create("invoker", name="probe")[1]  # the server's limit, whatever the release makes it
    center = ConfigCenter.from_settings(settings, registry=registry)
    queue, db = f"sqlite:///{tmp_path}/queue.db?topic=in", tmp_path / "out.db"
    _publish(queue, [{"id": f"m{i}", "text": f"story {i}"} for i in range(NUM_MESSAGES // 2)])

    fleet = Fleet(env, tmp_path)
    try:
        urls = []
        for name in ("serve-a", "serve-b"):
            port = free_port()
            fleet.start(name, "serve", "--port", str(port), "--model", "emb@production")
            urls.append(f"http://127.0.0.1:{port}")
        fleet.start("stream", "stream", "run", "--source", queue, "--model", "emb@production",
                    "--sink", f"sql+sqlite:///{db}?table=r")  # fmt: skip
        wait_until(lambda: all(map(_ready, urls)) or any(p.poll() is not None for p, _ in fleet.procs), 120)
        assert all(p.poll() is None for p, _ in fleet.procs), fleet.logs()
        wait_until(lambda: center.status()["live"] == 3, 60, "three instances reporting")
        groups = sorted(i["group"] for i in center.status()["instances"])
        assert groups[:2] == ["servers", "servers"] and groups[2].startswith("stream"), groups

        with httpx.Client(timeout=60) as client:
            before = [
                _predict(client, url, probe_key, "a forbidden word").status_code for url in urls for _ in range(6)
            ]
            assert before == [200] * 12  # no rate limit and no filter yet

            started, done, lock = threading.Event(), [0], threading.Lock()

            def one(i: int) -> int:
                status = _predict(client, urls[i % 2], load_key, f"steady request {i}").status_code
                with lock:
                    done[0] += 1
                    if done[0] >= NUM_REQUESTS // 3:
                        started.set()
                return status

            with ThreadPoolExecutor(6) as pool:
                load = pool.map(one, range(NUM_REQUESTS))
                started.wait(120)  # a third of the load is through: publish in the middle of it
                center.edit_draft("global", RELEASE, author="e2e")
                release = center.publish("global", author="e2e", comment="smaller batches, a limit, a filter")
                wait_until(lambda: center.status()["current"] == 3, 60, "every instance applying the release")
                status = center.status()
                statuses = list(load)

            forbidden = [_predict(client, url, load_key, "a forbidden word") for url in urls]
            limited = [[_predict(client, url, probe_key, "hello").status_code for _ in range(7)] for url in urls]
            retry_after = _predict(client, urls[0], probe_key, "hello").headers.get("retry-after")

        _publish(queue, [{"id": f"n{i}", "text": f"story {i}"} for i in range(NUM_MESSAGES // 2)])
        _publish(queue, [{"id": "denied", "text": "a forbidden story"}])
        wait_until(lambda: _rows(db) == NUM_MESSAGES and _dead_letters(queue), 60, "the stream worker's messages")
        dead = _dead_letters(queue)
    finally:
        fleet.stop()
        center.close()
        registry.close()

    applied = [i for i in status["instances"] if i["revision"] >= status["revision"] and i["status"] == "applied"]
    assert len(applied) == 3, status
    published_at = datetime.fromisoformat(release.created_at)
    lag = max(datetime.fromisoformat(i["at"]) for i in applied) - published_at
    print(f"\nrelease {release.number} reported applied by {len(applied)} instances "
          f"{lag.total_seconds():.2f} s after it was published (from their reports)")  # fmt: skip
    assert statuses == [200] * NUM_REQUESTS  # not one request of the steady load failed
    assert [(r.status_code, r.json()["error"]["code"]) for r in forbidden] == [(400, "content_blocked")] * 2
    for statuses_of_one in limited:  # each server enforces the new 5 per minute on a key without its own
        assert statuses_of_one[:5] == [200] * 5 and statuses_of_one[5:] == [429, 429]
    assert retry_after is not None and float(retry_after) > 0
    assert dead == ["content_blocked"]  # the stream worker refuses the word too, and nothing else
