"""lm-int8: every linear layer of a causal LM stored as int8 with per-channel scales; the folder loads
through the runtime's generation handler with int8 layers and gives logits close to its parent's, both
on the int8 kernel's path (one row: a decode step) and the bf16 matmul over q (a prompt's prefill)."""

from __future__ import annotations

import json

import pytest

from moorage.config import RuntimeSettings
from moorage.errors import BadRequest

from tests.unit.test_compress_prune import build, wide_bert

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

RUNTIME = RuntimeSettings(dtype="bfloat16", num_threads=1)


@pytest.fixture
def reg(settings):
    from moorage.registry import Registry

    registry = Registry.from_settings(settings)
    yield registry
    registry.close()


def generator(folder):
    from moorage.registry.manifest import Manifest, detect_framework
    from moorage.runtime.loader import handler_for

    framework = detect_framework(folder, "generate")
    handler = handler_for("generate", framework)
    handler.load(folder, Manifest(name="g", version=0, task="generate", framework=framework, files=[]), RUNTIME)
    return handler


def test_int8_layers_load_and_stay_close_to_the_parent(tmp_path, settings, reg):
    from safetensors import safe_open

    from tests.support import tiny_llama

    parent = tiny_llama(tmp_path / "lm")
    result, out = build(settings, reg, parent, "generate", "lm-int8")
    assert result.precision == "int8"
    recorded = json.loads((out / "config.json").read_text())["moorage_int8"]
    assert "lm_head" in recorded["modules"] and "model.layers.0.mlp.down_proj" in recorded["modules"]
    assert result.parameters["num_int8_layers"] == len(recorded["modules"]) == 8  # q k v o, gate up down, head
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.int8
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").shape == (16,)
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32  # embeddings stay float

    derived, reference = generator(out), generator(parent)
    assert derived.precision == "int8" and type(derived.model.lm_head).__name__ == "Int8Linear"
    assert derived.memory_bytes < reference.memory_bytes
    prompt = derived.tokenizer("the market rose after the company said " * 3, return_tensors="pt")["input_ids"]
    assert prompt.shape[1] > 8  # more rows than the int8 kernel takes: the bf16 matmul over the int8 values
    for ids in (prompt, prompt[:, :1]):  # and one row: the int8 kernel
        with torch.inference_mode():
            got = derived.model(input_ids=ids).logits.float()
            want = reference.model(input_ids=ids).logits.float()
        assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > 0.999

    from moorage.runtime.base import GenerationParams, NewSequence

    batch = derived.new_batch()  # the generation engine's continuous batch decodes over the int8 layers
    tokens = batch.add([NewSequence(0, prompt[0].tolist(), GenerationParams(max_new_tokens=4))])
    tokens += batch.step() + batch.step()
    assert len(tokens) == 3 and all(0 <= t < derived.vocab_size for t in tokens)

    with pytest.raises(BadRequest) as caught:  # int8 twice
        build(settings, reg, out, "generate", "lm-int8")
    assert caught.value.code == "unsupported_method"


def test_refusals(tmp_path, settings, reg):
    with pytest.raises(BadRequest) as caught:
        build(settings, reg, wide_bert(tmp_path / "encoder"), "embed", "lm-int8")
    assert caught.value.code == "unsupported_method" and "generate" in caught.value.message
    from tests.support import tiny_llama

    with pytest.raises(BadRequest) as caught:
        build(settings, reg, tiny_llama(tmp_path / "lm"), "generate", "lm-int8", bits=4)
    assert caught.value.code == "invalid_parameters"
