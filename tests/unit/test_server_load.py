"""Hot swaps under steady load and 10x overload, on the in-process app with fake models."""

from __future__ import annotations

import asyncio
from asyncio import run

from moorage.runtime import make_fake_model

from tests.support import eventually

SEEN_AFTER_SWAP = 3  # each client stops once it has been answered by the new version this often
MAX_REQUESTS = 5000  # per client: a bound, so that a swap that never happens fails instead of hanging


def test_alias_moved_under_steady_load_fails_nothing_and_switches_versions(settings, registry, tmp_path, serving):
    registry.register(make_fake_model(tmp_path / "v1", "embed", seed=1, delay_ms=5), "emb", "embed", alias="production")
    registry.register(make_fake_model(tmp_path / "v2", "embed", seed=2, delay_ms=5), "emb", "embed")
    registry.register(
        make_fake_model(tmp_path / "g1", "generate", seed=1, delay_ms=10), "gen", "generate", alias="production"
    )
    registry.register(make_fake_model(tmp_path / "g2", "generate", seed=2, delay_ms=10), "gen", "generate")

    async def main():
        async with serving(settings, registry, ["emb@production", "gen@production"], poll_interval_s=0.1) as (app, c):
            seen: list[list[tuple[int, int]]] = [[] for _ in range(8)]
            streaming = asyncio.Event()

            async def client(i: int) -> None:
                while sum(v == 2 for _, v in seen[i]) < SEEN_AFTER_SWAP and len(seen[i]) < MAX_REQUESTS:
                    r = await c.post("/v1/models/emb@production/predict", json={"inputs": [f"text {i}"]})
                    seen[i].append((r.status_code, r.json().get("version")))

            async def long_stream():  # a generation in flight across the swap
                body = {"model": "gen@production", "prompt": "go", "max_tokens": 60, "stream": True}
                lines = []
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            lines.append(line)
                            streaming.set()
                return r.status_code, lines

            async def move():  # once every client was answered by version 1 and the stream has begun
                await eventually(lambda: streaming.is_set() and all(len(client) >= 3 for client in seen))
                await asyncio.to_thread(registry.set_alias, "emb", "production", 2, "rollout")
                await asyncio.to_thread(registry.set_alias, "gen", "production", 2, "rollout")
                reload = await c.post("/admin/reload")  # the watcher may have been first; both are fine
                return reload.status_code

            results = await asyncio.gather(*(client(i) for i in range(8)), long_stream(), move())
            after = await c.post(
                "/v1/models/gen@production/predict", json={"inputs": ["x"], "parameters": {"max_new_tokens": 2}}
            )
            cache_keys = app.state.pool.runtime.cache.keys()
            return seen, results[8], results[9], after.json()["version"], cache_keys

    seen, (stream_status, stream_lines), reload_status, gen_version, cache_keys = run(main())
    statuses = [s for client in seen for s, _ in client]
    assert statuses and set(statuses) == {200}, "a request failed during the swap"
    for client in seen:  # each client switches once, from 1 to 2, and never goes back
        versions = [v for _, v in client]
        assert versions == sorted(versions) and versions[-1] == 2
    assert any(v == 1 for client in seen for _, v in client)
    assert stream_status == 200 and len(stream_lines) >= 60  # finished on the version it started on
    assert reload_status == 200 and gen_version == 2
    assert ("emb", 1) not in cache_keys and ("gen", 1) not in cache_keys  # drained, then unloaded


def test_ten_times_overload_gets_only_200_and_429_then_recovers(settings, registry, tmp_path, serving):
    registry.register(make_fake_model(tmp_path / "m", "embed", delay_ms=20), "emb", "embed")
    registry.register(make_fake_model(tmp_path / "g", "generate", delay_ms=5), "gen", "generate")

    async def main():
        async with serving(
            settings, registry, ["emb", "gen"], max_batch_size=4, max_queue=16, max_num_seqs=2, max_waiting_seqs=4
        ) as (app, c):
            engine = app.state.pool.lookup("emb").engine
            depths = []

            async def sample():
                while True:
                    depths.append(engine.queue_depth)
                    await asyncio.sleep(0.005)

            sampler = asyncio.ensure_future(sample())
            burst = [c.post("/v1/embeddings", json={"model": "emb", "input": f"t{i}"}) for i in range(200)]
            burst += [
                c.post("/v1/completions", json={"model": "gen", "prompt": "p", "max_tokens": 8}) for _ in range(60)
            ]
            responses = await asyncio.gather(*burst)
            sampler.cancel()
            recovered = await c.post("/v1/embeddings", json={"model": "emb", "input": "after"})
            recovered_gen = await c.post("/v1/completions", json={"model": "gen", "prompt": "p", "max_tokens": 2})
            return responses, depths, recovered, recovered_gen

    responses, depths, recovered, recovered_gen = run(main())
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429}, set(statuses)
    rejected = [r for r in responses if r.status_code == 429]
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded" for r in rejected)
    assert max(depths) <= 16  # the queue, and so memory, stays bounded
    assert recovered.status_code == 200 and recovered_gen.status_code == 200
    assert statuses.count(200) >= 20
