"""The real (transformers) handlers on tiny random models: classify labels and batched generation."""

import json

import pytest

from moorage.demo.assets import minilm_folder
from moorage.runtime import GenerateInput, GenerationParams, Runtime

from tests.support import tiny_llama

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


def _tokenizer_files(folder):
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_folder()), local_files_only=True)
    tok.save_pretrained(folder)
    return tok


@pytest.fixture
def tiny_classifier(tmp_path):
    folder = tmp_path / "cls"
    tok = _tokenizer_files(folder)
    config = transformers.BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        id2label={0: "business", 1: "sport", 2: "tech"},
        label2id={"business": 0, "sport": 1, "tech": 2},
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def tiny_lm(tmp_path):
    return tiny_llama(tmp_path / "lm")


def test_classifier_reports_labels_from_config(registry, settings, tiny_classifier):
    assert json.loads((tiny_classifier / "config.json").read_text())["architectures"] == [
        "BertForSequenceClassification"
    ]
    registry.register(tiny_classifier, "news", "classify")
    out = Runtime(registry, settings.runtime).predict("news", ["stocks fell", "a goal in extra time", "new chip"])
    assert len(out) == 3
    for c in out:
        assert set(c.scores) == {"business", "sport", "tech"}
        assert c.label == max(c.scores, key=c.scores.get)
        assert sum(c.scores.values()) == pytest.approx(1.0, abs=1e-5)


def test_generator_batches_mixed_params_and_counts_tokens(registry, settings, tiny_lm):
    registry.register(tiny_lm, "lm", "generate")
    model = Runtime(registry, settings.runtime).get("lm")
    short, long_ = GenerationParams(max_new_tokens=3), GenerationParams(max_new_tokens=6)
    inputs = [
        GenerateInput(prompt="hello there", params=short),
        GenerateInput(prompt="a much longer prompt with more words", params=long_),
        GenerateInput(messages=({"role": "user", "content": "hi"},), params=short),
    ]
    outs = model.predict(inputs)
    assert [o.completion_tokens <= p.params.max_new_tokens for o, p in zip(outs, inputs)] == [True] * 3
    assert outs[0].prompt_tokens < outs[1].prompt_tokens
    assert {o.finish_reason for o in outs} <= {"stop", "length"}
    # greedy decoding is deterministic and independent of what else is in the batch
    (alone,) = model.predict([inputs[1]])
    assert alone.text == outs[1].text


def test_sequences_joining_a_running_batch_decode_as_if_alone(registry, settings, tiny_lm):
    """Continuous batching: a sequence that joins mid-flight (cache merge, left padding, row removal)
    produces the same greedy tokens as when it runs alone; the step API matches `generate`."""
    from moorage.runtime.base import NewSequence

    registry.register(tiny_lm, "lm", "generate")
    handler = Runtime(registry, settings.runtime).get("lm").handler
    params = GenerationParams(max_new_tokens=8)
    prompts = [
        handler.encode_prompt(GenerateInput(prompt=p)) for p in ("hello there", "a much longer prompt here", "x")
    ]

    def alone(ids):
        batch = handler.new_batch()
        out = batch.add([NewSequence(0, ids, params)])
        while len(out) < 8:
            out += batch.step()
        return out

    expected = [alone(p) for p in prompts]
    batch = handler.new_batch()
    got = {0: batch.add([NewSequence(0, prompts[0], params)])}
    got[0] += batch.step()
    got[1] = batch.add([NewSequence(1, prompts[1], params)])  # joins after two tokens of seq 0
    for _ in range(2):
        for seq_id, tok in zip(batch.seq_ids, batch.step()):
            got[seq_id].append(tok)
    got[2] = batch.add([NewSequence(2, prompts[2], params)])
    while any(len(v) < 8 for v in got.values()):
        finished = {s for s in batch.seq_ids if len(got[s]) >= 8}
        batch.remove(finished)  # rows leave; the rest keep decoding correctly
        for seq_id, tok in zip(batch.seq_ids, batch.step()):
            got[seq_id].append(tok)
    assert [got[i][:8] for i in range(3)] == expected
    items = [GenerateInput(prompt=p, params=params) for p in ("hello there", "a much longer prompt here")]
    assert [g.text for g in handler.generate_static(items)] == [g.text for g in handler.predict(items)]


@pytest.fixture
def settings(settings):
    """float32 here: these tests compare token-exact outputs across batch shapes."""
    return settings.model_copy(update={"runtime": settings.runtime.model_copy(update={"dtype": "float32"})})


def test_long_outputs_match_generate_as_the_cache_grows_and_rows_leave(registry, settings, tiny_lm):
    """Past the cache's free columns the decode batch makes room again; rows that leave early (a
    short max_tokens) shrink it; greedy texts stay those of transformers' `generate`."""
    registry.register(tiny_lm, "lm", "generate")
    handler = Runtime(registry, settings.runtime).get("lm").handler
    long_, short = GenerationParams(max_new_tokens=150), GenerationParams(max_new_tokens=5)
    prompts = ("hello there", "a much longer prompt with more words", "x")
    expected = [handler.generate_static([GenerateInput(prompt=p, params=long_)])[0] for p in prompts]
    mixed = [GenerateInput(prompt=p, params=long_) for p in prompts] + [GenerateInput(prompt="y z", params=short)]
    got = handler.predict(mixed)
    assert [g.text for g in got[:3]] == [e.text for e in expected]
    assert [g.completion_tokens for g in got[:3]] == [e.completion_tokens for e in expected]
    assert got[3].completion_tokens <= 5
    assert max(e.completion_tokens for e in expected) > 100  # past the first free columns


def test_one_token_attention_matches_sdpa():
    from moorage.runtime.decoding import decode_attention

    torch.manual_seed(0)
    rows, heads, kv_heads, length, dim = 4, 6, 2, 37, 16
    query = torch.randn(rows, heads, 1, dim)
    key, value = torch.randn(rows, kv_heads, length, dim), torch.randn(rows, kv_heads, length, dim)
    mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)
    mask[1, ..., :5] = False  # left padding
    mask[2, ..., 30:] = False  # free columns
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(3, dim=1), value.repeat_interleave(3, dim=1), attn_mask=mask
    ).transpose(1, 2)
    out, _ = decode_attention(query, key, value, mask, None)
    assert torch.allclose(out, expected, atol=1e-5)
    out, _ = decode_attention(query, key, value, None, 0.5)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(3, dim=1), value.repeat_interleave(3, dim=1), scale=0.5
    ).transpose(1, 2)
    assert torch.allclose(out, expected, atol=1e-5)


def test_models_on_another_attention_function_decode_the_same(registry, settings, tiny_lm):
    """Eager attention builds its own masks: the decode batch hands it the used cache columns only."""
    registry.register(tiny_lm, "lm", "generate")
    handler = Runtime(registry, settings.runtime).get("lm").handler
    items = [GenerateInput(prompt=p, params=GenerationParams(max_new_tokens=80)) for p in ("hello there", "x y")]
    handler.model.config._attn_implementation = "eager"
    try:
        expected = [g.text for g in handler.generate_static(items)]
        assert not handler.new_batch().whole
        assert [g.text for g in handler.predict(items)] == expected
    finally:
        handler.model.config._attn_implementation = "moorage_decode"


def test_whole_cache_buffers_with_free_columns_decode_the_same(registry, settings, tiny_lm):
    """bf16/fp16 models attend over the whole cache buffers, free columns masked: in float32 that
    path gives the tokens of the used-columns path, across joins, leaves and growth."""
    from moorage.runtime.base import NewSequence

    registry.register(tiny_lm, "lm", "generate")
    handler = Runtime(registry, settings.runtime).get("lm").handler
    params = GenerationParams(max_new_tokens=90)
    prompts = [handler.encode_prompt(GenerateInput(prompt=p)) for p in ("hello there", "a longer prompt here", "x")]

    def run(whole: bool) -> dict[int, list[int]]:
        batch = handler.new_batch()
        batch.whole = whole
        got = {0: batch.add([NewSequence(0, prompts[0], params)])}
        for step in range(89):
            if step == 3:
                got[1] = batch.add([NewSequence(1, prompts[1], params)])
            elif step == 5:
                got[2] = batch.add([NewSequence(2, prompts[2], GenerationParams(max_new_tokens=10))])
            else:
                finished = {s for s in batch.seq_ids if len(got[s]) >= (10 if s == 2 else 90)}
                batch.remove(finished)
                if not batch.seq_ids:
                    break
                for seq_id, tok in zip(batch.seq_ids, batch.step()):
                    got[seq_id].append(tok)
        return got

    assert run(whole=True) == run(whole=False)
