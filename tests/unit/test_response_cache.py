"""The response cache on the inference service: what is looked up (deterministic inputs only), what a
hit returns (the computed answer, its token counts, screened by today's policy), what ends an entry
(an alias move, the LRU bound, a TTL) and what the metrics say."""

from __future__ import annotations

from asyncio import run

import numpy as np
import pytest
from prometheus_client import REGISTRY

from moorage.batching import InferenceService, ModelPool, PoolConfig, Result
from moorage.batching.cache import MemoryBackend, ResponseCache, decode_entry, encode_entry
from moorage.config import FilterSettings, SecuritySettings
from moorage.runtime import Runtime
from moorage.runtime.base import Classification, TokenLogprob, TopLogprob
from moorage.security.policy import Policy

PROMPT = [{"messages": [{"role": "user", "content": "tell me about the batch"}]}]


@pytest.fixture
def models(registry, fake_model):
    registry.register(fake_model("embed"), "emb", "embed")
    registry.register(fake_model("generate"), "gen", "generate", alias="production")
    return registry


def _counter(model: str, result: str) -> float:
    return REGISTRY.get_sample_value("moorage_response_cache_requests_total", {"model": model, "result": result}) or 0.0


def _gauge(name: str, model: str) -> float:
    return REGISTRY.get_sample_value(name, {"model": model}) or 0.0


class Counts:
    """The cache counters of one model, as moved since this object was made."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.start = {r: _counter(model, r) for r in ("hit", "miss", "skip")}

    def __call__(self) -> dict[str, float]:
        return {r: _counter(self.model, r) - v for r, v in self.start.items()}


def serve(registry, settings, body, *, max_entries: int = 100, clock=None, refs=("emb", "gen@production")):
    """Run `body(service, backend)` against a pool of `refs` with an in-memory cache."""

    async def main():
        pool = ModelPool(registry, Runtime(registry, settings.runtime), list(refs), PoolConfig(poll_interval_s=0))
        backend = MemoryBackend(max_entries, ttl_s=60.0, **({"clock": clock} if clock else {}))
        service = InferenceService(pool, default_max_tokens=6, cache=ResponseCache(backend))
        await pool.start()
        try:
            return await body(service, backend)
        finally:
            await pool.stop()
            await service.close()

    return run(main())


def _steps(service: InferenceService) -> int:
    return service.pool.lookup("gen").loaded.handler.num_steps


def test_a_repeated_greedy_generation_is_answered_by_the_cache_with_its_token_counts(models, settings):
    counts = Counts("gen")

    async def body(service, _):
        first = await service.infer("gen", PROMPT, {"temperature": 0})
        steps = _steps(service)
        second = await service.infer("gen", PROMPT, {"temperature": 0})
        return first.results[0], second.results[0], steps, _steps(service)

    first, second, steps_before, steps_after = serve(models, settings, body)
    assert not first.cached and second.cached
    assert second.output == first.output and second.finish_reason == first.finish_reason == "length"
    # usage and rate limits read these: a hit counts the tokens of the answer it stands for
    assert (second.prompt_tokens, second.completion_tokens) == (first.prompt_tokens, first.completion_tokens)
    assert second.total_tokens == first.total_tokens > 0
    assert steps_after == steps_before  # the model did not decode a token for the hit
    assert counts() == {"hit": 1, "miss": 1, "skip": 0}


def test_a_seeded_sample_is_cached_per_seed_and_an_unseeded_one_never(models, settings):
    counts = Counts("gen")

    async def body(service, _):
        seeded = [await service.infer("gen", PROMPT, {"temperature": 1.0, "seed": 7}) for _ in range(2)]
        other_seed = await service.infer("gen", PROMPT, {"temperature": 1.0, "seed": 8})
        steps = _steps(service)
        sampled = [await service.infer("gen", PROMPT, {"temperature": 1.0}) for _ in range(2)]
        return seeded, other_seed, sampled, _steps(service) - steps

    seeded, other_seed, sampled, sampled_steps = serve(models, settings, body)
    assert [o.results[0].cached for o in seeded] == [False, True]
    assert seeded[1].results[0].output == seeded[0].results[0].output
    assert not other_seed.results[0].cached
    assert [o.results[0].cached for o in sampled] == [False, False]
    assert sampled_steps > 0  # both sampled requests were decoded by the model
    assert counts() == {"hit": 1, "miss": 2, "skip": 2}


def test_the_key_covers_the_parameters(models, settings):
    async def body(service, _):
        await service.infer("gen", PROMPT, {"temperature": 0})
        changed = [
            await service.infer("gen", PROMPT, {"temperature": 0, "max_new_tokens": 3}),
            await service.infer("gen", PROMPT, {"temperature": 0, "stop": ["zzz"]}),
            await service.infer("gen", [{"messages": [{"role": "user", "content": "another"}]}], {"temperature": 0}),
            await service.infer("gen", ["tell me about the batch"], {"temperature": 0}),  # a prompt, not messages
        ]
        return [o.results[0].cached for o in changed]

    assert serve(models, settings, body) == [False, False, False, False]


def test_embeddings_are_cached_bit_for_bit(models, settings):
    counts = Counts("emb")

    async def body(service, _):
        first = await service.infer("emb", ["a text to embed", "another"])
        second = await service.infer("emb", ["another", "a text to embed"])
        return first.results, second.results

    first, second = serve(models, settings, body)
    assert [r.cached for r in second] == [True, True]
    assert second[1].output.dtype == first[0].output.dtype == np.float32
    assert np.array_equal(second[1].output, first[0].output) and np.array_equal(second[0].output, first[1].output)
    assert second[0].prompt_tokens == first[1].prompt_tokens
    assert counts() == {"hit": 2, "miss": 2, "skip": 0}


def test_moving_the_alias_misses_and_drops_the_old_versions_entries(models, settings, fake_model):
    models.register(fake_model("generate", seed=1), "gen", "generate")  # version 2, not aliased yet

    async def body(service, backend):
        before = await service.infer("gen", PROMPT, {"temperature": 0})
        held = backend.versions()
        models.set_alias("gen", "production", 2)
        await service.pool.reload()
        after = await service.infer("gen", PROMPT, {"temperature": 0})
        again = await service.infer("gen", PROMPT, {"temperature": 0})
        return before, held, after, again, backend.versions()

    before, held, after, again, left = serve(models, settings, body, refs=("gen@production",))
    assert held == {("gen", 1)}
    assert (before.version, after.version) == (1, 2)
    assert not after.results[0].cached and again.results[0].cached
    assert after.results[0].output != before.results[0].output  # other weights: version 1's answer was not served
    assert left == {("gen", 2)}


def test_the_memory_backend_keeps_the_most_recently_used_entries_and_expires_old_ones(models, settings):
    now = [0.0]

    async def body(service, backend):
        prompts = [[{"messages": [{"role": "user", "content": f"question {i}"}]}] for i in range(3)]
        for p in prompts[:2]:
            await service.infer("gen", p, {"temperature": 0})
        await service.infer("gen", prompts[0], {"temperature": 0})  # 0 is now the most recently used
        await service.infer("gen", prompts[2], {"temperature": 0})  # evicts 1
        entries = len(backend), _gauge("moorage_response_cache_entries", "gen")
        order = [prompts[2], prompts[0], prompts[1]]
        hits = [(await service.infer("gen", p, {"temperature": 0})).results[0].cached for p in order]
        now[0] += 61.0  # past the TTL
        expired = (await service.infer("gen", prompts[0], {"temperature": 0})).results[0].cached
        return entries, hits, expired

    (entries, gauge), hits, expired = serve(models, settings, body, max_entries=2, clock=lambda: now[0])
    assert entries == 2 and gauge == 2
    assert hits == [True, True, False]  # 1 was the least recently used when 2 came
    assert expired is False


def test_the_bytes_gauge_follows_the_entries(models, settings):
    async def body(service, backend):
        await service.infer("gen", PROMPT, {"temperature": 0})
        held = _gauge("moorage_response_cache_bytes", "gen")
        await backend.close()
        return held, _gauge("moorage_response_cache_bytes", "gen")

    held, after = serve(models, settings, body)
    assert held > 0 and after == 0


def test_a_streamed_hit_is_one_event_with_the_whole_text_and_its_result(models, settings):
    async def collect(service, params):
        async with service.hold("gen") as sv:
            call = service.prepare(sv.task, PROMPT, params)
            return [event async for _, event in service.stream(sv, call)]

    async def body(service, _):
        return await collect(service, {"temperature": 0}), await collect(service, {"temperature": 0})

    computed, cached = serve(models, settings, body)
    assert len(computed) > 1 and not computed[-1].result.cached
    (event,) = cached
    assert event.result is not None and event.result.cached
    assert event.text == "".join(e.text for e in computed) == computed[-1].result.output == event.result.output


def test_a_hit_passes_the_output_policy_in_force_when_it_is_served(models, settings):
    async def body(service, _):
        plain = await service.infer("gen", PROMPT, {"temperature": 0})
        word = plain.results[0].output.split()[0]
        security = SecuritySettings(filters={"gen": FilterSettings(output_deny=[word])})
        policy = Policy.for_model(security, "gen")
        screened = await service.infer("gen", PROMPT, {"temperature": 0}, policy=policy)
        unscreened = await service.infer("gen", PROMPT, {"temperature": 0})
        return plain.results[0], screened.results[0], unscreened.results[0]

    plain, screened, unscreened = serve(models, settings, body)
    assert (
        screened.cached and screened.filtered and screened.output == "" and screened.finish_reason == "content_filter"
    )
    assert unscreened.cached and not unscreened.filtered and unscreened.output == plain.output  # stored unscreened


def test_an_input_the_policy_refuses_is_refused_before_the_cache(models, settings):
    from moorage.errors import ContentBlocked

    counts = Counts("gen")

    async def body(service, _):
        await service.infer("gen", PROMPT, {"temperature": 0})
        security = SecuritySettings(filters={"gen": FilterSettings(input_deny=["batch"])})
        with pytest.raises(ContentBlocked):
            await service.infer("gen", PROMPT, {"temperature": 0}, policy=Policy.for_model(security, "gen"))

    serve(models, settings, body)
    assert counts() == {"hit": 0, "miss": 1, "skip": 0}


def test_a_model_not_named_in_the_settings_is_not_cached(models, settings):
    async def main():
        pool = ModelPool(registry=models, runtime=Runtime(models, settings.runtime), refs=["emb", "gen"],
                         config=PoolConfig(poll_interval_s=0))  # fmt: skip
        cache = ResponseCache(MemoryBackend(10, 60.0), models=["emb"])
        service = InferenceService(pool, cache=cache)
        await pool.start()
        try:
            gen = [await service.infer("gen", PROMPT, {"temperature": 0, "max_new_tokens": 2}) for _ in range(2)]
            emb = [await service.infer("emb", ["text"]) for _ in range(2)]
            return [o.results[0].cached for o in gen + emb]
        finally:
            await pool.stop()
            await service.close()

    assert run(main()) == [False, False, False, True]


def test_entries_round_trip_every_kind_of_output():
    logprobs = (TokenLogprob(5, "the", -0.25, (TopLogprob(5, "the", -0.25), TopLogprob(9, "a", -1.5))),)
    results = [
        Result("some text", 3, 2, "stop", logprobs=logprobs),
        Result(Classification("positive", 0.75, {"positive": 0.75, "negative": 0.25}), 4),
        Result(np.arange(6, dtype=np.float32).reshape(2, 3) / 7, 2),
    ]
    for result in results:
        back = decode_entry(encode_entry(result))
        assert back.cached and back.timings is None
        if isinstance(result.output, np.ndarray):
            assert back.output.dtype == result.output.dtype and np.array_equal(back.output, result.output)
            back = Result(result.output, back.prompt_tokens, cached=True)
        assert back == Result(**{**result.__dict__, "cached": True})


def test_settings_build_the_cache_they_describe(settings):
    assert ResponseCache.from_settings(settings.cache) is None  # off by default
    cache = ResponseCache.from_settings(settings.cache.model_copy(update={"enabled": True, "max_entries": 3}))
    assert cache is not None and isinstance(cache.backend, MemoryBackend) and cache.backend.max_entries == 3
    assert cache.applies("anything")


def test_every_route_of_the_app_gets_the_cache_of_the_settings(models, settings, serving):
    settings = settings.model_copy(update={"cache": settings.cache.model_copy(update={"enabled": True})})
    counts = Counts("gen")
    chat = {"model": "gen", "messages": PROMPT[0]["messages"], "max_tokens": 5, "temperature": 0}
    predict = {"inputs": ["tell me about the batch"], "parameters": {"max_new_tokens": 5, "seed": 3}}

    async def main():
        async with serving(settings, models, ["gen@production"]) as (_, c):
            chats = [(await c.post("/v1/chat/completions", json=chat)).json() for _ in range(2)]
            predicts = [(await c.post("/v1/models/gen/predict", json=predict)).json() for _ in range(2)]
            streamed = [await _streamed_text(c, {**chat, "stream": True}) for _ in range(2)]
            return chats, predicts, streamed

    chats, predicts, streamed = run(main())
    assert chats[1]["choices"][0]["message"]["content"] == chats[0]["choices"][0]["message"]["content"]
    assert streamed == [chats[0]["choices"][0]["message"]["content"]] * 2  # the first streamed one was a hit too
    assert chats[1]["usage"] == chats[0]["usage"] and chats[0]["usage"]["completion_tokens"] == 5
    assert predicts[1]["outputs"] == predicts[0]["outputs"]
    assert counts() == {"hit": 4, "miss": 2, "skip": 0}


async def _streamed_text(client, body: dict) -> str:
    """The text of a streamed chat completion, from its server-sent events."""
    import json

    text = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                text += [c["delta"].get("content") or "" for c in choices]
    return "".join(text)
