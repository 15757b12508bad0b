"""The batching engine on fake models: policy (pure functions) and the asyncio/thread machinery."""

from __future__ import annotations

import asyncio

import pytest

from moorage.batching import BatchConfig, DynamicBatcher, GenerationConfig, GenerationEngine, next_batch
from moorage.batching.dynamic import Pending
from moorage.batching.generation import Scheduler
from moorage.config import RuntimeSettings
from moorage.errors import BadRequest, DeadlineExceeded, Overloaded
from moorage.runtime import GenerateInput, GenerationParams, make_fake_model
from moorage.runtime.fake import FakeEmbedder, FakeGenerator

from tests.support import eventually


def _pending(size: int, enqueued: float) -> Pending:
    return Pending(item=size, size=size, future=None, enqueued=enqueued, deadline=enqueued + 10)


# -- next_batch: pure policy -----------------------------------------------------------------
def test_next_batch_waits_for_a_full_batch_or_the_oldest_input_to_age():
    queue = [_pending(5, 0.0), _pending(6, 0.001)]
    batch, wait = next_batch(queue, now=0.002, max_batch_size=4, max_wait_s=0.010)
    assert batch == [] and wait == pytest.approx(0.008)
    batch, _ = next_batch(queue, now=0.011, max_batch_size=4, max_wait_s=0.010)
    assert batch == queue
    full = [_pending(i, 0.0) for i in range(4)]
    assert next_batch(full, now=0.0, max_batch_size=4, max_wait_s=1.0)[0] == full
    assert next_batch([], now=0.0, max_batch_size=4, max_wait_s=1.0) == ([], float("inf"))


def test_next_batch_keeps_the_oldest_and_groups_inputs_of_similar_length():
    sizes = [50, 3, 400, 52, 2, 48, 410, 55, 1, 51]
    queue = [_pending(s, i * 0.001) for i, s in enumerate(sizes)]
    batch, _ = next_batch(queue, now=1.0, max_batch_size=4, max_wait_s=0.0)
    assert queue[0] in batch
    assert sorted(p.size for p in batch) == [48, 50, 51, 52]


# -- Scheduler: pure policy ------------------------------------------------------------------
class Seq:
    def __init__(self, num_prompt_tokens: int) -> None:
        self.num_prompt_tokens = num_prompt_tokens


def test_scheduler_limits_running_sequences_and_prefill_tokens():
    sched = Scheduler(max_num_seqs=3, max_prefill_tokens=100)
    seqs = [Seq(n) for n in (60, 30, 20, 10, 500)]
    sched.waiting.extend(seqs)
    assert sched.schedule() == seqs[:2]  # 60 + 30 fit; + 20 would pass the token budget
    assert sched.schedule() == seqs[2:3]  # one row left
    sched.finish({seqs[0], seqs[1], seqs[2]})
    assert sched.schedule() == seqs[3:4]  # 10, then 500 alone would pass the budget in this step
    assert sched.schedule() == seqs[4:5]  # a long prompt alone is always admitted
    assert not sched.waiting and len(sched.running) == 2


# -- DynamicBatcher ----------------------------------------------------------------------------
class CountingEmbedder(FakeEmbedder):
    """The fake embedder, recording batch sizes; fails a batch holding "boom"."""

    def __init__(self, folder, delay_ms: float = 0.0):
        super().__init__()
        self.load(make_fake_model(folder, "embed", delay_ms=delay_ms), None, RuntimeSettings())
        self.batches: list[list[str]] = []

    def predict(self, batch):
        self.batches.append(list(batch))
        if "boom" in batch:
            raise RuntimeError("model failed")
        return super().predict(batch)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_inputs_are_batched_and_match_unbatched_results(tmp_path):
    handler = CountingEmbedder(tmp_path / "m", delay_ms=20)
    texts = [f"text number {i}" for i in range(40)]

    async def main():
        batcher = DynamicBatcher(handler, BatchConfig(max_batch_size=16, max_wait_ms=5))
        batcher.start()
        outs = await asyncio.gather(*(batcher.submit(t) for t in texts))
        await batcher.stop()
        return outs

    outs = run(main())
    assert max(len(b) for b in handler.batches) > 1
    assert sum(len(b) for b in handler.batches) == len(texts)
    for text, out in zip(texts, outs):
        assert (out.output == handler._embed(text)).all() and out.prompt_tokens == 3


def test_a_full_queue_answers_overloaded_and_a_failed_batch_fails_only_its_own(tmp_path):
    handler = CountingEmbedder(tmp_path / "m", delay_ms=50)

    async def main():
        batcher = DynamicBatcher(handler, BatchConfig(max_batch_size=2, max_wait_ms=0, max_queue=4))
        batcher.start()
        first = [batcher.submit("boom"), batcher.submit("ok one")]
        while batcher.queue_depth:  # that batch is taken; now fill the queue
            await asyncio.sleep(0)
        queued = [batcher.submit(f"t{i}") for i in range(4)]
        with pytest.raises(Overloaded) as over:
            batcher.submit("one too many")
        results = await asyncio.gather(*first, *queued, return_exceptions=True)
        await batcher.stop()
        return over.value, results

    over, results = run(main())
    assert over.status == 429 and over.retry_after >= 1
    assert isinstance(results[0], RuntimeError) and isinstance(results[1], RuntimeError)  # one batch
    assert all(not isinstance(r, BaseException) for r in results[2:])


def test_deadline_passes_while_queued_gives_504_and_cancelled_inputs_are_never_computed(tmp_path):
    handler = CountingEmbedder(tmp_path / "m", delay_ms=100)

    async def main():
        batcher = DynamicBatcher(handler, BatchConfig(max_batch_size=1, max_wait_ms=0))
        batcher.start()
        busy = batcher.submit("first")
        while batcher.queue_depth:
            await asyncio.sleep(0)
        late = batcher.submit("too late", timeout_s=0.05)
        gone = batcher.submit("client went away")
        gone.cancel()
        with pytest.raises(DeadlineExceeded):
            await late
        await busy
        await batcher.stop()

    run(main())
    computed = [t for b in handler.batches for t in b]
    assert "client went away" not in computed and "too late" not in computed


# -- GenerationEngine --------------------------------------------------------------------------
@pytest.fixture
def generator(tmp_path):
    def make(delay_ms: float = 0.0) -> FakeGenerator:
        handler = FakeGenerator()
        handler.load(make_fake_model(tmp_path / f"g{delay_ms}", "generate", delay_ms=delay_ms), None, RuntimeSettings())
        return handler

    return make


def _item(prompt: str, n: int = 6, **params) -> GenerateInput:
    return GenerateInput(prompt=prompt, params=GenerationParams(max_new_tokens=n, **params))


def test_streamed_tokens_add_up_to_the_same_generations_as_a_static_batch(generator):
    handler = generator(delay_ms=2)
    items = [_item(f"prompt {i} words", n=3 + i) for i in range(6)] + [_item("stop here", n=12, stop=("ready",))]

    async def main():
        engine = GenerationEngine(handler, GenerationConfig(max_num_seqs=4))
        engine.start()

        async def one(item):
            texts, result = [], None
            async for event in engine.stream(item):
                texts.append(event.text)
                result = event.result or result
            return "".join(texts), result

        outs = await asyncio.gather(*(one(i) for i in items))
        await engine.stop()
        return outs

    outs = run(main())
    expected = handler.predict(items)
    assert [(r.output, r.finish_reason, r.prompt_tokens, r.completion_tokens) for _, r in outs] == [
        (g.text, g.finish_reason, g.prompt_tokens, g.completion_tokens) for g in expected
    ]
    assert [t for t, _ in outs] == [g.text for g in expected]  # the streamed deltas add up to the text
    assert "ready" not in outs[-1][0]


def test_new_sequences_join_between_steps_and_cancel_frees_the_row(generator):
    handler = generator(delay_ms=5)

    async def main():
        engine = GenerationEngine(handler, GenerationConfig(max_num_seqs=2))
        engine.start()
        long_stream = engine.stream(_item("a long one", n=200))
        await anext(long_stream)
        short = await engine.submit(_item("short", n=3))  # joins while the long one runs
        after_short = await anext(long_stream)  # the long one still produces after the short one ended
        long_was_running = after_short.result is None and after_short.error is None
        await long_stream.aclose()  # the client goes away
        await eventually(lambda: not engine.scheduler.running)
        await engine.stop()
        return short, long_was_running

    short, long_was_running = run(main())
    assert short.output == handler.predict([_item("short", n=3)])[0].text
    assert long_was_running  # it did not wait for the 200-token sequence to end


def test_generation_overload_and_context_limits(generator):
    handler = generator(delay_ms=20)
    handler.max_context = 50

    async def main():
        engine = GenerationEngine(handler, GenerationConfig(max_num_seqs=1, max_waiting=2))
        engine.start()
        with pytest.raises(BadRequest) as too_long:
            await engine.submit(_item("a b c", n=49))
        runs = engine.stream(_item("runs", n=40))
        await anext(runs)  # it holds the only row now
        seqs = [engine.submit(_item(f"waits {i}", n=5)) for i in range(2)]
        with pytest.raises(Overloaded):
            engine.submit(_item("one too many", n=5))
        for s in seqs:
            s.cancel()
        await runs.aclose()
        await engine.stop()
        return too_long.value

    err = run(main())
    assert err.code == "context_length_exceeded" and err.status == 400


def test_every_waiting_sequence_is_answered_when_the_model_fails(generator):
    handler = generator()

    def broken(*a, **k):
        raise RuntimeError("kernel died")

    async def main():
        engine = GenerationEngine(handler, GenerationConfig())
        engine._batch.add = broken
        engine.start()
        results = await asyncio.gather(*(engine.submit(_item(f"p{i}")) for i in range(3)), return_exceptions=True)
        await engine.stop()
        return results

    results = run(main())
    assert all(isinstance(r, RuntimeError) for r in results)


def test_wait_all_gives_up_on_an_engine_that_shows_no_progress():
    """A hung engine (futures that never resolve, no step finished) must not hang a stream worker:
    past the deadline plus the grace its futures are cancelled; a progressing engine is waited for."""
    from types import SimpleNamespace

    from moorage.batching import InferenceService

    async def main():
        loop = asyncio.get_running_loop()
        hung = SimpleNamespace(engine=SimpleNamespace(config=SimpleNamespace(timeout_s=0.01), last_step_at=None))
        futures = [loop.create_future() for _ in range(3)]
        service = InferenceService(pool=None, grace_s=0.01)  # type: ignore[arg-type]
        await service.wait_all([(hung, futures, None)])  # type: ignore[list-item]
        return futures

    futures = run(main())
    assert all(f.cancelled() for f in futures)


def _gauge(name: str, labels: tuple[str, str]) -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, {"model": labels[0], "version": labels[1]})


def test_the_running_and_waiting_gauges_read_zero_once_every_client_went_away(generator):
    """The gauges follow every change of rows, not only steps that had rows: after the last streaming
    client disconnects and the waiting ones cancel, nothing runs and the gauges say so."""
    handler = generator(delay_ms=2)
    labels = ("gauge-test", "1")
    running, waiting = ("moorage_running_sequences", labels), ("moorage_queue_depth", labels)

    async def main():
        engine = GenerationEngine(handler, GenerationConfig(max_num_seqs=3), labels=labels)
        engine.start()
        streams = [engine.stream(_item(f"long {i}", n=500)) for i in range(3)]
        for s in streams:
            await anext(s)  # each holds a row now
        queued = [engine.submit(_item(f"waits {i}", n=5)) for i in range(2)]
        await eventually(lambda: (_gauge(*running), _gauge(*waiting)) == (3, 2), what="3 running, 2 waiting")
        for s in streams:
            await s.aclose()  # the streaming clients disconnect
        for f in queued:
            f.cancel()
        await eventually(lambda: engine.scheduler.is_idle, what="no sequence left")
        await eventually(lambda: (_gauge(*running), _gauge(*waiting)) == (0, 0), timeout_s=5, what="gauges at 0")
        await engine.stop()

    run(main())


def test_the_running_gauge_reads_zero_after_a_failed_step_fails_its_sequences(generator):
    handler = generator()
    labels = ("gauge-failure-test", "1")
    running = ("moorage_running_sequences", labels)

    async def main():
        engine = GenerationEngine(handler, GenerationConfig(max_num_seqs=4), labels=labels)
        step = engine._batch.step
        release = asyncio.Event()
        loop = asyncio.get_running_loop()

        def fails_once_every_row_runs():  # the decode steps wait until the test has seen 3 rows running
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(30)
            raise RuntimeError("kernel failed")

        engine._batch.step = fails_once_every_row_runs
        engine.start()
        futures = [engine.submit(_item(f"p{i}", n=50)) for i in range(3)]
        await eventually(lambda: _gauge(*running) == 3, what="3 running")
        release.set()
        results = await asyncio.gather(*futures, return_exceptions=True)
        await eventually(lambda: _gauge(*running) == 0, timeout_s=5, what="running gauge at 0")
        engine._batch.step = step
        await engine.stop()
        return results

    assert all(isinstance(r, RuntimeError) for r in run(main()))
