"""The response cache's Redis backend against a real Redis: one cache shared by two servers, entries
that expire, and an outage that costs the cache but never a request."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis
from prometheus_client import REGISTRY

from moorage.batching import InferenceService, ModelPool, PoolConfig
from moorage.batching.cache import RedisBackend, ResponseCache
from moorage.runtime import Runtime

from tests.services.restartable import redis_service

PROMPT = [{"messages": [{"role": "user", "content": "tell me about the batch"}]}]
GREEDY = {"temperature": 0, "max_new_tokens": 4}


@pytest.fixture
def models(registry, fake_model):
    registry.register(fake_model("generate"), "gen", "generate", alias="production")
    return registry


@pytest.fixture
def redis_server():
    with redis_service() as service:
        yield service


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Server:
    """One serving process's pool and service, with the Redis cache at `url`."""

    def __init__(self, registry, settings, url: str) -> None:
        runtime = Runtime(registry, settings.runtime)
        self.pool = ModelPool(registry, runtime, ["gen@production"], PoolConfig(poll_interval_s=0))
        backend = RedisBackend(url, ttl_s=60.0, retry_after_s=0.0)
        self.service = InferenceService(self.pool, cache=ResponseCache(backend))

    async def __aenter__(self) -> InferenceService:
        await self.pool.start()
        return self.service

    async def __aexit__(self, *exc) -> None:
        await self.pool.stop()
        await self.service.close()


def test_two_servers_share_one_cache_and_entries_expire(models, settings, redis_server):
    async def main():
        async with Server(models, settings, redis_server.url) as one, Server(models, settings, redis_server.url) as two:
            computed = await one.infer("gen", PROMPT, GREEDY)
            shared = await two.infer("gen", PROMPT, GREEDY)
            return computed.results[0], shared.results[0]

    computed, shared = asyncio.run(main())
    assert not computed.cached and shared.cached
    assert (shared.output, shared.total_tokens) == (computed.output, computed.total_tokens)
    client = redis.Redis.from_url(redis_server.url)
    (key,) = client.keys("moorage:response:*")
    assert key.decode().startswith("moorage:response:gen:1:")  # an operator can find a version's entries
    assert 0 < client.pttl(key) <= 60_000
    client.close()


def test_an_entry_that_does_not_decode_is_a_miss_and_is_replaced(models, settings, redis_server):
    client = redis.Redis.from_url(redis_server.url)

    async def main():
        async with Server(models, settings, redis_server.url) as service:
            first = await service.infer("gen", PROMPT, GREEDY)
            (key,) = client.keys("moorage:response:*")
            client.set(key, b"not an entry")
            again = await service.infer("gen", PROMPT, GREEDY)
            third = await service.infer("gen", PROMPT, GREEDY)
            return first.results[0], again.results[0], third.results[0]

    first, again, third = asyncio.run(main())
    client.close()
    assert not again.cached and again.output == first.output
    assert third.cached and third.output == first.output


def test_requests_succeed_while_redis_is_down_and_the_cache_works_again_once_it_is_back(
    models, settings, redis_server, caplog
):
    errors = {"backend": "redis"}

    async def main():
        async with Server(models, settings, redis_server.url) as service:
            await service.infer("gen", PROMPT, GREEDY)
            redis_server.stop()
            failures_before = _sample("moorage_response_cache_errors_total", errors)
            with caplog.at_level(logging.WARNING, logger="moorage.batching.cache"):
                during = [await service.infer("gen", PROMPT, GREEDY) for _ in range(3)]
                streamed = await _stream(service)
            failures = _sample("moorage_response_cache_errors_total", errors) - failures_before
            redis_server.start()  # back, on the same port
            after = [await service.infer("gen", PROMPT, GREEDY) for _ in range(2)]
            return during, streamed, failures, after

    during, streamed, failures, after = asyncio.run(main())
    assert [o.results[0].cached for o in during] == [False, False, False]
    assert len({o.results[0].output for o in during}) == 1 and during[0].results[0].finish_reason == "length"
    assert streamed.finish_reason == "length" and not streamed.cached
    assert failures >= 4  # each lookup and store that failed is counted
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "Redis" in r.getMessage()]
    assert len(warnings) == 1  # one line per outage, not one per request
    assert after[-1].results[0].cached


async def _stream(service: InferenceService):
    async with service.hold("gen@production") as sv:
        call = service.prepare(sv.task, PROMPT, GREEDY)
        events = [event async for _, event in service.stream(sv, call)]
    assert events[-1].result is not None
    return events[-1].result
