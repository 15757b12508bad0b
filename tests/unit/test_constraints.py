"""Structured outputs enforced while decoding: a tiny random Llama on SmolLM2's real tokenizer.

Random weights would never write JSON, a listed choice or a matching string on their own, so every
valid output here is the grammar's doing. Rows of one batch mix constraints, greedy and sampling."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from moorage.batching.contract import Task, encode_result
from moorage.batching.generation import GenerationConfig, GenerationEngine
from moorage.batching.service import InferenceService
from moorage.config import RuntimeSettings
from moorage.errors import Unprocessable
from moorage.runtime.base import Constraint, GenerateInput, GenerationParams

from tests.support import tiny_llama

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "mood": {"type": "string", "enum": ["happy", "sad", "calm"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
        "pet": {"type": "boolean"},
    },
    "required": ["name", "mood", "age", "tags", "pet"],
    "additionalProperties": False,
}
CHOICES = ["red", "green", "blue sky", "naïve"]
REGEX = r"[a-z]{3}-[0-9]{2,4}"


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("lm") / "lm", tokenizer="smollm2")


@pytest.fixture(scope="module")
def handler(lm_folder):
    import torch

    from moorage.runtime.hf import CausalGenerator

    threads = torch.get_num_threads()
    model = CausalGenerator()
    # one thread: a model this small gains nothing from two, and loses much when the CPUs are busy
    model.load(lm_folder, None, RuntimeSettings(dtype="float32", num_threads=1))
    yield model
    torch.set_num_threads(threads)


def _items(constraint: Constraint, n: int, max_new_tokens: int = 80, **extra) -> list[GenerateInput]:
    """Greedy and sampled rows (seeded) over different prompts."""
    return [
        GenerateInput(
            prompt=f"request {i}: describe item {i * 7}",
            params=GenerationParams(
                max_new_tokens=max_new_tokens,
                constraint=constraint,
                temperature=0.0 if i % 2 == 0 else 1.0,
                seed=i,
                **extra,
            ),
        )
        for i in range(n)
    ]


def test_a_strict_json_schema_with_bounded_fields_is_always_valid_and_finishes(handler):
    schema = Constraint("json_schema", json.dumps(SCHEMA))
    outs = handler.predict(_items(schema, 8))
    for g in outs:
        assert g.finish_reason == "stop", g  # bounded sizes: the grammar completes within the budget
        jsonschema.validate(json.loads(g.text), SCHEMA)
    assert len({g.text for g in outs}) > 1  # the rows really decoded apart


def test_json_object_outputs_that_end_parse_as_objects(handler):
    """Any JSON object: nothing bounds it, so a random model may run out of tokens in a long string;
    every output that ended is an object, and one cut short is still an object's beginning."""
    outs = handler.predict(_items(Constraint("json_object"), 8, max_new_tokens=40))
    ended = [g for g in outs if g.finish_reason == "stop"]
    assert ended, [g.text for g in outs]
    for g in ended:
        assert isinstance(json.loads(g.text), dict)
    for g in outs:
        assert g.text.startswith("{")
        assert g.finish_reason == "stop" or g.completion_tokens == 40


def test_choice_returns_only_a_listed_choice(handler):
    outs = handler.predict(_items(Constraint("choice", json.dumps(CHOICES)), 8))
    assert all(g.text in CHOICES and g.finish_reason == "stop" for g in outs), [g.text for g in outs]


def test_regex_matches_in_full(handler):
    outs = handler.predict(_items(Constraint("regex", REGEX), 8))
    for g in outs:
        assert re.fullmatch(REGEX, g.text) and g.finish_reason == "stop", g


def test_one_batch_mixes_constrained_plain_greedy_and_sampled_rows(handler):
    """Each row its own constraint in one decode batch; a plain greedy row decodes as it does alone."""
    plain = GenerateInput(prompt="plain row", params=GenerationParams(max_new_tokens=12))
    sampled = GenerateInput(prompt="sampled row", params=GenerationParams(max_new_tokens=12, temperature=1.0, seed=3))
    mixed = [
        plain,
        *_items(Constraint("json_schema", json.dumps(SCHEMA)), 2),
        sampled,
        *_items(Constraint("choice", json.dumps(CHOICES)), 2),
        *_items(Constraint("regex", REGEX), 2),
    ]
    outs = handler.predict(mixed)
    (alone,) = handler.predict([plain])
    assert outs[0].text == alone.text and outs[0].completion_tokens == 12
    assert outs[3].completion_tokens == 12
    for g in outs[1:3]:
        jsonschema.validate(json.loads(g.text), SCHEMA)
    assert all(g.text in CHOICES for g in outs[4:6])
    assert all(re.fullmatch(REGEX, g.text) for g in outs[6:8])


def test_stop_strings_still_apply_under_a_constraint(handler):
    params = GenerationParams(max_new_tokens=20, stop=(" sky",), constraint=Constraint("choice", '["blue sky"]'))
    (out,) = handler.predict([GenerateInput(prompt="colour?", params=params)])
    assert (out.text, out.finish_reason) == ("blue", "stop")


def test_compiled_grammars_are_cached_per_constraint_and_bounded(handler):
    grammars = handler.grammars()
    first = grammars.compile(Constraint("regex", "[0-9]{1,3}"))
    assert grammars.compile(Constraint("regex", "[0-9]{1,3}")) is first
    for i in range(grammars.max_size + 3):
        grammars.compile(Constraint("regex", f"x{i}[a-z]?"))
    assert len(grammars) == grammars.max_size
    assert grammars.compile(Constraint("regex", "[0-9]{1,3}")) is not first  # evicted, compiled again


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"guided_regex": "[a-z"}, "parameters.guided_regex"),
        ({"guided_json": {"type": "no-such-type"}}, "parameters.guided_json"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
            "parameters.response_format.json_schema.schema",
        ),
        ({"guided_choice": []}, "parameters.guided_choice"),
        ({"guided_regex": "a+", "guided_choice": ["a"]}, "parameters: give at most one of"),
    ],
)
def test_a_constraint_the_library_cannot_compile_is_a_422_naming_its_field(parameters, field):
    service = InferenceService(pool=None)  # type: ignore[arg-type]  (prepare validates; no model needed)
    with pytest.raises(Unprocessable) as err:
        service.prepare(Task.GENERATE, ["hi"], parameters)
    assert err.value.code == "invalid_parameters"
    assert str(err.value).startswith(field), str(err.value)


def test_the_parameters_map_to_the_engines_constraint():
    service = InferenceService(pool=None)  # type: ignore[arg-type]
    cases = {
        "json_object": {"response_format": {"type": "json_object"}},
        "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}},
        "regex": {"guided_regex": REGEX},
        "choice": {"guided_choice": CHOICES},
    }
    for kind, parameters in cases.items():
        (item,) = service.prepare(Task.GENERATE, ["hi"], parameters).items
        assert item.params.constraint.kind == kind
    (item,) = service.prepare(Task.GENERATE, ["hi"], {"guided_json": json.dumps(SCHEMA)}).items
    assert json.loads(item.params.constraint.spec) == SCHEMA
    (item,) = service.prepare(Task.GENERATE, ["hi"], {"response_format": {"type": "text"}}).items
    assert item.params.constraint is None


def test_in_the_engine_a_bad_constraint_fails_only_its_sequence_and_json_is_encoded(handler):
    """Compiled on the engine thread before admission: a constraint that cannot be compiled (here one
    that skipped the parameters' validation) is a 422 for its own request while the others run."""
    good = _items(Constraint("json_schema", json.dumps(SCHEMA)), 3)
    bad = GenerateInput(prompt="x", params=GenerationParams(constraint=Constraint("regex", "(unclosed")))

    async def main():
        engine = GenerationEngine(handler, GenerationConfig(max_num_seqs=8))
        engine.start()
        try:
            return await asyncio.gather(*(engine.submit(i) for i in [good[0], bad, *good[1:]]), return_exceptions=True)
        finally:
            await engine.stop()

    results = asyncio.run(main())
    assert isinstance(results[1], Unprocessable) and results[1].code == "invalid_parameters"
    for result in results[:1] + results[2:]:
        encoded = encode_result(Task.GENERATE, result)
        assert encoded["json"] == json.loads(result.output)
        jsonschema.validate(encoded["json"], SCHEMA)


def test_a_model_that_cannot_enforce_constraints_refuses_them(fake_model, registry, settings):
    from moorage.runtime import Runtime

    registry.register(fake_model("generate"), "fake", "generate")
    handler = Runtime(registry, settings.runtime).get("fake").handler
    with pytest.raises(Unprocessable):
        handler.predict(_items(Constraint("json_object"), 1))


def test_http_predict_takes_the_same_constraints_and_answers_the_parsed_json(serving, settings, registry, lm_folder):
    registry.register(lm_folder, "lm", "generate")
    schema = {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}}

    async def main():
        async with serving(settings, registry, refs=("lm",)) as (_, client):
            inputs = ["one", {"messages": [{"role": "user", "content": "two"}]}]
            body = {"inputs": inputs, "parameters": {"max_new_tokens": 80, **schema}}
            structured = await client.post("/v1/models/lm/predict", json=body)
            body = {"inputs": ["pick"], "parameters": {"guided_choice": CHOICES, "logprobs": 1}}
            choice = await client.post("/v1/models/lm/predict", json=body)
            bad = await client.post(
                "/v1/models/lm/predict", json={"inputs": ["x"], "parameters": {"guided_regex": "("}}
            )
            return structured, choice, bad

    structured, choice, bad = asyncio.run(main())
    assert structured.status_code == 200, structured.text
    for out in structured.json()["outputs"]:
        assert out["json"] == json.loads(out["text"])
        jsonschema.validate(out["json"], SCHEMA)
    (out,) = choice.json()["outputs"]
    assert out["text"] in CHOICES and "json" not in out
    assert len(out["logprobs"]) == out["completion_tokens"] and all(len(t["top"]) == 1 for t in out["logprobs"])
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_parameters"
    assert "guided_regex" in bad.json()["error"]["message"]
