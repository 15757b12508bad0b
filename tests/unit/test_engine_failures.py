"""Nothing hangs: a dying engine fails everything that waits on it with 503, /readyz turns 503, and a
model failure in the middle of a stream ends the SSE with an error event and [DONE]."""

from __future__ import annotations

import asyncio
import threading

import orjson
import pytest

from moorage.batching import DynamicBatcher, GenerationEngine

from tests.support import eventually

pytestmark = pytest.mark.anyio
WAITING = 20


def _completion(i: int) -> dict:
    return {"model": "gen", "prompt": f"prompt number {i}", "max_tokens": 40}


@pytest.mark.parametrize("how", ["thread_exits", "step_and_recovery_raise"])
async def test_a_dying_generation_engine_answers_every_waiting_request_503(
    how, settings, registry, fake_model, serving
):
    registry.register(fake_model("generate"), "gen", "generate")
    async with serving(settings, registry, refs=("gen",), max_num_seqs=4, exit_on_engine_failure=False) as (app, c):
        engine = app.state.pool.lookup("gen").engine
        assert isinstance(engine, GenerationEngine)
        entered, release = threading.Event(), threading.Event()

        def broken_step():
            entered.set()
            release.wait(30)  # the engine thread holds here while every request arrives
            if how == "thread_exits":
                raise SystemExit("the engine thread ends")
            raise RuntimeError("device lost")

        def broken_new_batch():
            raise RuntimeError("device lost")

        engine._batch.step = broken_step
        engine.handler.new_batch = broken_new_batch  # recovery fails too: the engine cannot go on
        calls = [asyncio.ensure_future(c.post("/v1/completions", json=_completion(i))) for i in range(WAITING)]
        await eventually(lambda: entered.is_set() and engine.queue_depth + len(engine.scheduler.running) == WAITING)
        release.set()
        responses = await asyncio.wait_for(asyncio.gather(*calls), settings.serve.request_timeout_s)
        ready = await c.get("/readyz")
        after = await c.post("/v1/completions", json=_completion(99))

    assert [r.status_code for r in responses] == [503] * WAITING
    assert {r.json()["error"]["code"] for r in responses} == {"engine_failed"}
    assert "device lost" not in responses[0].text and "Traceback" not in responses[0].text
    assert (ready.status_code, ready.json()["error"]["code"]) == (503, "engine_failed")
    assert (after.status_code, after.json()["error"]["code"]) == (503, "engine_failed")


async def test_a_dying_batcher_loop_answers_every_waiting_request_503(settings, registry, fake_model, serving):
    registry.register(fake_model("embed"), "emb", "embed")
    async with serving(
        settings, registry, refs=("emb",), max_batch_size=64, max_wait_ms=60_000, exit_on_engine_failure=False
    ) as (app, c):
        batcher = app.state.pool.lookup("emb").engine
        assert isinstance(batcher, DynamicBatcher)
        sweep = batcher._sweep

        def broken_sweep(now):  # a bug in the loop itself once every request waits in the queue
            if batcher.queue_depth >= WAITING:
                raise RuntimeError("batching bug")
            sweep(now)

        batcher._sweep = broken_sweep
        calls = [
            asyncio.ensure_future(c.post("/v1/embeddings", json={"model": "emb", "input": f"text {i}"}))
            for i in range(WAITING)
        ]
        responses = await asyncio.wait_for(asyncio.gather(*calls), settings.serve.request_timeout_s)
        ready = await c.get("/readyz")

    assert [r.status_code for r in responses] == [503] * WAITING
    assert {r.json()["error"]["code"] for r in responses} == {"engine_failed"}
    assert (ready.status_code, ready.json()["error"]["code"]) == (503, "engine_failed")


async def test_a_model_failure_mid_stream_ends_with_an_error_event_and_done(settings, registry, fake_model, serving):
    registry.register(fake_model("generate"), "gen", "generate")
    async with serving(settings, registry, refs=("gen",), exit_on_engine_failure=False) as (app, c):
        engine = app.state.pool.lookup("gen").engine
        step = engine._batch.step
        steps = 0

        def fails_on_third_step():
            nonlocal steps
            steps += 1
            if steps == 3:
                raise RuntimeError("kernel failed")
            return step()

        engine._batch.step = fails_on_third_step
        body = {"model": "gen", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "stream": True}
        async with c.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        ready = await c.get("/readyz")

    events = [orjson.loads(line[6:]) for line in lines[:-1]]
    assert response.status_code == 200 and lines[-1] == "data: [DONE]"
    assert any(e.get("choices") and e["choices"][0]["delta"].get("content") for e in events)  # tokens came first
    assert events[-1]["error"]["code"] == "internal_error" and "kernel" not in lines[-2]
    assert ready.status_code == 200  # one failed step fails its sequences, not the engine
