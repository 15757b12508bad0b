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


async def test_a_stream_worker_whose_engine_dies_stops_and_hands_its_messages_back(settings, registry, tmp_path):
    """A dead engine must not turn the whole topic into dead letters: the worker stops receiving, hands
    back what it holds, and ends with engine_failed so that its supervisor restarts it."""
    from moorage.errors import EngineFailed
    from moorage.runtime import make_fake_model
    from moorage.streams import open_broker
    from moorage.streams.runner import StreamJob, run_stream

    registry.register(make_fake_model(tmp_path / "g", "generate", crash_after_steps=2), "gen", "generate")
    url = f"sqlite:///{tmp_path}/q.db?topic=in&visibility_timeout=60"
    async with open_broker(url) as queue:
        await queue.publish([orjson.dumps({"id": f"m{i}", "text": "go on"}) for i in range(5)])
        job = StreamJob(url, f"jsonl://{tmp_path}/out", "gen")
        with pytest.raises(EngineFailed):
            await asyncio.wait_for(run_stream(settings, job, asyncio.Event(), registry=registry), 60)
        assert await queue.dead_letters() == []
    assert not list((tmp_path / "out").glob("*.jsonl"))  # nothing half-written


async def test_generation_parameters_that_would_break_a_decode_step_are_refused_or_made_safe(
    settings, registry, fake_model, serving
):
    registry.register(fake_model("generate"), "gen", "generate")
    async with serving(settings, registry, refs=("gen",), exit_on_engine_failure=False) as (_, c):
        huge_seed = {"model": "gen", "prompt": "x", "max_tokens": 3, "temperature": 1, "seed": 2**64}
        r = await c.post("/v1/completions", json=huge_seed)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_parameters")
        tiny = {"model": "gen", "prompt": "x", "max_tokens": 3, "temperature": 1e-45}  # sampled as greedy
        greedy = {"model": "gen", "prompt": "x", "max_tokens": 3, "temperature": 0}
        assert (await c.post("/v1/completions", json=tiny)).json()["choices"] == (
            await c.post("/v1/completions", json=greedy)
        ).json()["choices"]
        too_many = {"inputs": ["x"] * 300, "parameters": {"max_new_tokens": 2}}  # over max_waiting_seqs (256)
        r = await c.post("/v1/models/gen/predict", json=too_many)
        assert (r.status_code, r.json()["error"]["code"]) == (413, "too_many_inputs")
        assert (await c.get("/readyz")).status_code == 200
