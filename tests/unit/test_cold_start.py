"""A server whose models are still loading: requests wait for them up to serve.cold_start_hold_s (at
most serve.cold_start_queue at once), then get 503 model_loading with Retry-After; a failed load
answers every held request at once. SIGTERM: /readyz 503 shutting_down while requests are served."""

from __future__ import annotations

import asyncio
import signal
import threading
from contextlib import asynccontextmanager

import httpx
import pytest
from asgi_lifespan import LifespanManager

from moorage.server import create_app

from tests.support import eventually

pytestmark = pytest.mark.anyio
EMBED = {"model": "emb", "input": "a b"}


@asynccontextmanager
async def loading(settings, registry, **serve_settings):
    """The app in-process with its model's load held until the yielded `release` event is set."""
    settings = settings.model_copy(update={"serve": settings.serve.model_copy(update=serve_settings)})
    app = create_app(settings, ["emb"], registry=registry)
    pool = app.state.pool
    release, load = threading.Event(), pool.runtime.load

    def gated(info, progress=None):
        release.wait(60)
        return load(info, progress)

    pool.runtime.load = gated
    try:
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://moorage") as client:
                yield app, client, release
                release.set()
    finally:
        release.set()


def _code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


async def test_held_requests_are_served_once_the_models_load_and_the_queue_is_bounded(settings, registry, fake_model):
    registry.register(fake_model("embed"), "emb", "embed")
    async with loading(settings, registry, cold_start_hold_s=60, cold_start_queue=3) as (app, c, release):
        assert (await c.get("/healthz")).status_code == 200
        ready = await c.get("/readyz")
        assert (ready.status_code, _code(ready)) == (503, "model_loading")
        held = [asyncio.ensure_future(c.post("/v1/embeddings", json=EMBED)) for _ in range(3)]
        await eventually(lambda: app.state.pool.num_held == 3, what="three requests held")
        beyond = await c.post("/v1/embeddings", json=EMBED)  # the hold is full: answered at once
        release.set()
        answered = await asyncio.gather(*held)
        assert (await c.get("/readyz")).status_code == 200
    assert [r.status_code for r in answered] == [200] * 3
    assert all(len(r.json()["data"][0]["embedding"]) == 8 for r in answered)
    assert (beyond.status_code, _code(beyond), beyond.headers["retry-after"]) == (503, "model_loading", "5")
    assert "cold_start_queue" in beyond.json()["error"]["message"]


async def test_without_a_hold_or_once_it_runs_out_a_request_gets_503_with_retry_after(settings, registry, fake_model):
    registry.register(fake_model("embed"), "emb", "embed")
    async with loading(settings, registry, cold_start_hold_s=0) as (_, c, _release):
        at_once = await c.post("/v1/embeddings", json=EMBED)
        streamed = await c.post("/v1/completions", json={"model": "emb", "prompt": "x", "stream": True})
    async with loading(settings, registry, cold_start_hold_s=0.05, cold_start_queue=8) as (_, c, _release):
        ran_out = await c.post("/v1/embeddings", json=EMBED)  # the load is held until the test ends
    for response in (at_once, streamed, ran_out):
        assert (response.status_code, _code(response)) == (503, "model_loading")
        assert response.headers["retry-after"] == "5"
        assert response.json()["error"]["type"] == "server_error"
    assert "serve.cold_start_hold_s" in ran_out.json()["error"]["message"]


async def test_a_failed_load_answers_the_held_requests_at_once_with_its_code(settings, registry, fake_model):
    registry.register(fake_model("embed", load_fails=True), "emb", "embed")
    async with loading(settings, registry, cold_start_hold_s=60, cold_start_queue=8) as (app, c, release):
        held = [asyncio.ensure_future(c.post("/v1/embeddings", json=EMBED)) for _ in range(4)]
        await eventually(lambda: app.state.pool.num_held == 4, what="four requests held")
        release.set()
        answered = await asyncio.gather(*held)
        later = await c.post("/v1/embeddings", json=EMBED)
        ready = await c.get("/readyz")
    for response in [*answered, later, ready]:
        assert (response.status_code, _code(response)) == (503, "model_load_failed")
        assert "fake.json" not in response.text  # the cause is in the server's log, not in the answer
    assert "retry-after" not in later.headers  # it will not load by itself: no point in asking again


async def test_sigterm_turns_readyz_503_while_requests_are_still_served(settings, registry, fake_model, serving):
    """The drain delay holds the server's stop; a second signal stops it at once."""
    registry.register(fake_model("embed"), "emb", "embed")
    async with serving(settings, registry, refs=("emb",), drain_delay_s=600) as (app, c):
        stopped: list[int] = []
        drain = app.state.drain
        drain.begin(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
        ready = await c.get("/readyz")
        served = await c.post("/v1/embeddings", json=EMBED)
        assert stopped == []  # the delay holds the stop
        drain.begin(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
        assert stopped == [signal.SIGTERM]
    assert (ready.status_code, _code(ready)) == (503, "shutting_down")
    assert served.status_code == 200


async def test_sigint_or_a_dead_engine_stops_without_the_delay(settings, registry, fake_model, serving):
    registry.register(fake_model("embed"), "emb", "embed")
    async with serving(settings, registry, refs=("emb",), drain_delay_s=600) as (app, _):
        stopped: list[int] = []
        app.state.drain.begin(signal.SIGINT, lambda signum, frame: stopped.append(signum))
        assert stopped == [signal.SIGINT]
        app.state.pool.engine_failure = "emb:1: RuntimeError"  # as an engine's failure listener sets it
        app.state.drain.shutting_down = False
        app.state.drain.begin(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
        assert stopped == [signal.SIGINT, signal.SIGTERM]


async def test_a_load_past_its_budget_is_logged(settings, registry, fake_model, caplog):
    """What a startup probe will do about it is said where the operator looks: the server's log."""
    registry.register(fake_model("embed"), "emb", "embed")
    async with loading(settings, registry, load_budget_s=0.01) as (app, c, release):
        await eventually(lambda: "serve.load_budget_s" in caplog.text, what="the budget's log line")
        release.set()
        await app.state.loading
        assert (await c.post("/v1/embeddings", json=EMBED)).status_code == 200
    assert "still loading after 0.01 s" in caplog.text
