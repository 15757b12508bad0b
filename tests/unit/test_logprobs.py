"""Logprobs from the step that samples: the model's own distribution, the chosen token and its k best
alternatives, only for rows that ask; streamed per event and whole in the result."""

from __future__ import annotations

import asyncio
import math

import pytest

from moorage.batching.contract import Task, encode_result
from moorage.batching.generation import GenerationConfig, GenerationEngine
from moorage.config import RuntimeSettings
from moorage.runtime.base import Constraint, GenerateInput, GenerationParams

from tests.support import tiny_llama

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def handler(tmp_path_factory):
    import torch

    from moorage.runtime.hf import CausalGenerator

    threads = torch.get_num_threads()
    folder = tiny_llama(tmp_path_factory.mktemp("lm") / "lm", tokenizer="smollm2")
    model = CausalGenerator()
    # one thread: a model this small gains nothing from two, and loses much when the CPUs are busy
    model.load(folder, None, RuntimeSettings(dtype="float32", num_threads=1))
    yield model
    torch.set_num_threads(threads)


def _check_shape(logprobs, k: int) -> None:
    for lp in logprobs:
        assert len(lp.top) == k
        values = [t.logprob for t in lp.top]
        assert values == sorted(values, reverse=True)
        assert all(v <= 0 for v in values) and lp.logprob <= 0
        if k:
            assert lp.logprob <= lp.top[0].logprob + 1e-6  # nothing beats the best alternative


def test_greedy_tokens_are_the_most_likely_and_top_k_has_k(handler):
    items = [GenerateInput(prompt=p, params=GenerationParams(max_new_tokens=10, logprobs=2)) for p in ("a b", "c")]
    for g in handler.predict(items):
        assert g.logprobs is not None and len(g.logprobs) == g.completion_tokens
        _check_shape(g.logprobs, 2)
        for lp in g.logprobs:  # greedy: the chosen token is the best alternative, with its logprob
            assert lp.top[0].token_id == lp.token_id
            assert lp.logprob == pytest.approx(lp.top[0].logprob)


def test_logprobs_are_the_models_distribution_at_that_step(handler):
    """Recomputed with one forward over prompt + generated tokens: the same log-softmax values."""
    prompt = "check these values"
    (g,) = handler.predict([GenerateInput(prompt=prompt, params=GenerationParams(max_new_tokens=6, logprobs=0))])
    ids = handler.encode_prompt(GenerateInput(prompt=prompt))
    chosen = [lp.token_id for lp in g.logprobs]
    with torch.inference_mode():
        logits = handler.model(torch.tensor([ids + chosen])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[len(ids) - 1 : -1].gather(1, torch.tensor(chosen)[:, None])[:, 0]
    assert [lp.logprob for lp in g.logprobs] == pytest.approx(expected.tolist(), abs=1e-4)
    assert all(lp.top == () for lp in g.logprobs)  # logprobs=0: the chosen token's only


def test_only_rows_that_ask_get_logprobs_and_sampled_and_constrained_rows_report_the_raw_model(handler):
    rows = [
        GenerateInput(prompt="plain", params=GenerationParams(max_new_tokens=5)),
        GenerateInput(prompt="sampled", params=GenerationParams(max_new_tokens=5, temperature=1.0, seed=1, logprobs=3)),
        GenerateInput(
            prompt="choice",
            params=GenerationParams(max_new_tokens=8, constraint=Constraint("choice", '["green", "blue"]'), logprobs=1),
        ),
    ]
    plain, sampled, constrained = handler.predict(rows)
    assert plain.logprobs is None
    _check_shape(sampled.logprobs, 3)
    _check_shape(constrained.logprobs, 1)
    # the grammar's mask is not in the reported distribution: the best token may be one it refused
    assert all(math.isfinite(lp.logprob) for lp in constrained.logprobs)
    assert "".join(lp.token for lp in constrained.logprobs) == constrained.text


def test_streamed_logprobs_per_event_add_up_to_the_results(handler):
    items = [
        GenerateInput(prompt=f"stream {i}", params=GenerationParams(max_new_tokens=12, logprobs=2, stop=("zz",)))
        for i in range(3)
    ]

    async def main():
        engine = GenerationEngine(handler, GenerationConfig(max_num_seqs=4))
        engine.start()

        async def one(item):
            events = [event async for event in engine.stream(item)]
            return events

        try:
            return await asyncio.gather(*(one(i) for i in items))
        finally:
            await engine.stop()

    for events in asyncio.run(main()):
        result = events[-1].result
        streamed = tuple(lp for event in events for lp in event.logprobs)
        assert streamed == result.logprobs and len(streamed) == result.completion_tokens
        encoded = encode_result(Task.GENERATE, result)["logprobs"]
        assert [e["token_id"] for e in encoded] == [lp.token_id for lp in streamed]
        assert [len(e["top"]) for e in encoded] == [2] * len(streamed)


def test_the_fake_model_reports_logprobs_the_same_way(fake_model, registry, settings):
    from moorage.runtime import Runtime

    registry.register(fake_model("generate"), "fake", "generate")
    handler = Runtime(registry, settings.runtime).get("fake").handler
    (g,) = handler.predict([GenerateInput(prompt="the model", params=GenerationParams(max_new_tokens=4, logprobs=2))])
    assert len(g.logprobs) == 4
    _check_shape(g.logprobs, 2)
    assert all(lp.top[0].token_id == lp.token_id for lp in g.logprobs)


def test_logprobs_are_refused_where_an_output_filter_applies():
    """Token logprobs would show, token by token, what an output filter withholds or masks."""
    from moorage.batching import InferenceService, Task
    from moorage.config import FilterSettings, SecuritySettings
    from moorage.errors import BadRequest
    from moorage.security.policy import Policy

    security = SecuritySettings(filters={"gen": FilterSettings(mask_email=True)})
    service = InferenceService(pool=None)  # type: ignore[arg-type]  (prepare validates; no model needed)
    with pytest.raises(BadRequest) as err:
        service.prepare(Task.GENERATE, ["hi"], {"logprobs": 2}, policy=Policy.for_model(security, "gen"))
    assert (err.value.code, err.value.param) == ("logprobs_unavailable", "logprobs")
    unfiltered = Policy.for_model(security, "other")  # no filter on this model: logprobs are fine
    (item,) = service.prepare(Task.GENERATE, ["hi"], {"logprobs": 2}, policy=unfiltered).items
    assert item.params.logprobs == 2
