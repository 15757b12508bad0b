"""Hot settings put in force inside a process (`stage` / `reconfigure`): each object that holds them
takes new values for what comes next, finishes what it started with the old ones, and refuses a bad
release without changing anything."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from moorage.batching import BatchConfig, DynamicBatcher, GenerationConfig, GenerationEngine, InferenceService
from moorage.batching.hot import apply_hot
from moorage.batching.pool import ModelPool
from moorage.batching.settings import serving_pool_config, stream_pool_config
from moorage.config import FilterSettings, RuntimeSettings
from moorage.errors import ConfigError, ContentBlocked, Overloaded, RateLimited
from moorage.runtime import GenerateInput, GenerationParams, Runtime, make_fake_model
from moorage.runtime.fake import FakeEmbedder, FakeGenerator
from moorage.security.keys import Principal
from moorage.security.policy import Policy
from moorage.server.security import Guard, policy_for
from moorage.streams import open_broker, open_sink
from moorage.streams.runner import worker_config
from moorage.streams.worker import StreamWorker

from tests.support import eventually


def _with(settings, filters=None, **sections):
    """`settings` with some keys of its sections replaced (``_with(s, serve={"max_batch_size": 4})``) and
    the content filters by model name, if given."""
    update = {name: getattr(settings, name).model_copy(update=values) for name, values in sections.items()}
    if filters is not None:
        security = update.get("security", settings.security)
        update["security"] = security.model_copy(update={"filters": filters})
    return settings.model_copy(update=update)


class GatedEmbedder(FakeEmbedder):
    """The fake embedder, recording batch sizes; each batch waits for `gate` (so a test holds it)."""

    def __init__(self, folder):
        super().__init__()
        self.load(make_fake_model(folder, "embed"), None, RuntimeSettings())
        self.gate = threading.Event()
        self.computing = threading.Event()
        self.batches: list[int] = []

    def predict(self, batch):
        self.computing.set()
        self.gate.wait(30)
        self.batches.append(len(batch))
        return super().predict(batch)


# -- the engines ----------------------------------------------------------------------------------
def test_the_batcher_takes_new_sizes_for_the_next_batch_and_the_running_one_keeps_its_own(tmp_path):
    handler = GatedEmbedder(tmp_path / "m")

    async def main():
        batcher = DynamicBatcher(handler, BatchConfig(max_batch_size=2, max_wait_ms=0, max_queue=8))
        batcher.start()
        futures = [batcher.submit(f"text {i}") for i in range(8)]
        await eventually(handler.computing.is_set, what="the first batch computing")
        await eventually(lambda: batcher.queue_depth == 4, what="the second batch taken under the old size")
        batcher.reconfigure(BatchConfig(max_batch_size=4, max_wait_ms=0, max_queue=4))
        with pytest.raises(Overloaded):  # 4 still queued: the new bound refuses new inputs, not queued ones
            batcher.submit("one more")
        handler.gate.set()
        results = await asyncio.gather(*futures)
        await batcher.stop()
        return results

    results = asyncio.run(main())
    assert len(results) == 8  # nothing queued or running failed because of the swap
    assert handler.batches == [2, 2, 4]


def test_the_generation_engine_admits_more_rows_once_reconfigured(tmp_path):
    handler = FakeGenerator()
    handler.load(make_fake_model(tmp_path / "g", "generate", delay_ms=5), None, RuntimeSettings())
    item = GenerateInput(prompt="say", params=GenerationParams(max_new_tokens=40))

    async def main():
        engine = GenerationEngine(handler, GenerationConfig(max_num_seqs=1))
        engine.start()
        futures = [engine.submit(item) for _ in range(4)]
        await eventually(lambda: len(engine.scheduler.running) == 1 and engine.queue_depth == 3)
        engine.reconfigure(GenerationConfig(max_num_seqs=4, max_prefill_tokens=2048))
        await eventually(lambda: len(engine.scheduler.running) > 1, what="a second row admitted")
        results = await asyncio.gather(*futures)
        await engine.stop()
        return engine, results

    engine, results = asyncio.run(main())
    assert [r.completion_tokens for r in results] == [40] * 4
    assert (engine.scheduler.max_num_seqs, engine.scheduler.max_prefill_tokens) == (4, 2048)


def test_the_pool_reconfigures_every_served_engine_and_keeps_its_poll_interval(settings, registry, fake_model):
    registry.register(fake_model("embed"), "emb", "embed")
    registry.register(fake_model("generate"), "gen", "generate")

    async def main():
        pool = ModelPool(registry, Runtime(registry, settings.runtime), ["emb", "gen"], serving_pool_config(settings))
        await pool.start()
        try:
            new = _with(settings, serve={"max_batch_size": 3, "max_num_seqs": 5, "poll_interval_s": 0})
            InferenceService(pool).reconfigure(new)
            served = pool.served()
            return pool.config, served["emb"].engine.config, served["gen"].engine.config
        finally:
            await pool.stop()

    config, batch, generation = asyncio.run(main())
    assert batch.max_batch_size == 3 and generation.max_num_seqs == 5
    assert config.poll_interval_s == settings.serve.poll_interval_s  # read at start: a restart key


# -- the guard --------------------------------------------------------------------------------------
def test_the_guard_takes_new_rate_limits_and_filters_and_a_policy_given_out_keeps_its_own(settings, registry):
    guard = Guard(settings, registry)
    caller = Principal(key_id="k1", role="invoker")

    async def admitted(n: int) -> int:
        count = 0
        for _ in range(n):
            try:
                await guard.admit(caller)
            except RateLimited:
                break
            count += 1
        return count

    async def main():
        before = await admitted(20)
        old_policy = policy_for(guard, "emb")
        limits = settings.security.limits.model_copy(update={"requests_per_minute": 3})
        guard.reconfigure(
            _with(settings, {"emb": FilterSettings(input_deny=["forbidden"])}, security={"limits": limits})
        )
        after = await admitted(20)
        return before, after, old_policy, policy_for(guard, "emb")

    before, after, old_policy, new_policy = asyncio.run(main())
    assert before == 20 and after == 3
    assert old_policy.texts(["a forbidden word"]) == ["a forbidden word"]  # an in-flight request's policy
    with pytest.raises(ContentBlocked):
        new_policy.texts(["a forbidden word"])


def test_a_release_one_part_refuses_changes_no_part_and_the_log_level_follows(settings, registry, fake_model):
    registry.register(fake_model("embed"), "emb", "embed")
    guard = Guard(settings, registry)
    pool = ModelPool(registry, Runtime(registry, settings.runtime), ["emb"], serving_pool_config(settings))
    service = InferenceService(pool)
    bad = _with(settings, {"emb": FilterSettings(input_deny=["re:("])}, serve={"max_batch_size": 3})
    with pytest.raises(ConfigError, match="bad pattern"):
        apply_hot(bad, service.stage, guard.stage)  # the service is staged first and still not swapped
    assert pool.config.batch.max_batch_size == settings.serve.max_batch_size
    assert guard.filters.for_model("emb") is None

    moorage_log = logging.getLogger("moorage")
    level = moorage_log.level
    try:
        good = _with(settings, serve={"max_batch_size": 3}).model_copy(update={"log_level": "DEBUG"})
        apply_hot(good, service.stage, guard.stage)
        assert pool.config.batch.max_batch_size == 3 and moorage_log.level == logging.DEBUG
    finally:
        moorage_log.setLevel(level)


# -- the stream worker -------------------------------------------------------------------------------
def test_the_stream_worker_takes_new_batch_sizes_retries_and_filters_while_it_runs(
    settings, registry, fake_model, tmp_path
):
    registry.register(fake_model("embed"), "emb", "embed")
    url = f"sqlite:///{tmp_path}/q.db?topic=in&visibility_timeout=30"

    async def main():
        pool = ModelPool(registry, Runtime(registry, settings.runtime), ["emb"], stream_pool_config(settings))
        await pool.start()
        service = InferenceService(pool, settings.stream.default_max_tokens)
        policy = Policy.for_model(settings.security, "emb")
        async with open_broker(url) as source, open_sink(f"sql+sqlite:///{tmp_path}/out.db?table=r") as sink:
            worker = StreamWorker(source, sink, service, "emb", worker_config(settings), policy)
            stop = asyncio.Event()
            running = asyncio.create_task(worker.run(stop))
            await source.publish([b'{"id": "1", "text": "a forbidden word"}'])
            await eventually(lambda: worker.counts.processed == 1, what="the first message processed")
            denied = {"emb": FilterSettings(input_deny=["forbidden"])}
            worker.reconfigure(
                _with(
                    settings,
                    denied,
                    stream={"batch_size": 7, "model_retries": 1, "backoff_s": 0.05, "receive_timeout_s": 3.0},
                )
            )
            await source.publish([b'{"id": "2", "text": "a forbidden word"}', b'{"id": "3", "text": "fine"}'])
            await eventually(lambda: worker.counts.processed + worker.counts.dead_lettered == 3, what="all three")
            stop.set()
            counts = await running
            dead = await source.dead_letters()
        engine_config = pool.served()["emb"].engine.config
        await pool.stop()
        return worker.config, engine_config, counts, dead

    config, engine_config, counts, dead = asyncio.run(main())
    assert (config.batch_size, config.model_retries, config.backoff_s) == (7, 1, 0.05)
    started = settings.stream  # restart keys: the pipeline is sized at start, the receive timeout too
    assert (config.max_in_flight, config.receive_timeout_s) == (started.max_in_flight, started.receive_timeout_s)
    assert engine_config.max_batch_size == 7
    assert (counts.processed, counts.dead_lettered) == (2, 1)
    assert [d.reason.split(":")[0] for d in dead] == ["content_blocked"]
