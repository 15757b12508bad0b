"""prune-heads: the pruned folder loads through the runtime's torch handlers and computes exactly what
its parent computes with the same heads masked; the config names the removed heads; bad input refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moorage.config import RuntimeSettings
from moorage.errors import BadRequest
from moorage.registry import Registry
from moorage.registry.manifest import Manifest, detect_framework
from moorage.runtime.loader import handler_for
from moorage.training.compress.methods import BuildContext, method
from moorage.training.datasets import Datasets

from tests.support import tiny_bert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LABELS = ("politics", "sport", "tech")  # sorted: the order of a dataset's label map
TEXTS = [f"the {label} story number {i} about {word}" for label in LABELS for i, word in enumerate("abcdefghijklmnop")]
RUNTIME = RuntimeSettings(dtype="float32", num_threads=1)


def wide_bert(folder: Path, seed: int = 0) -> Path:
    """tiny_bert's sentence-transformers folder with a 2-layer, 4-head encoder in it (32 wide)."""
    tiny_bert(folder, seed)
    config = transformers.BertConfig.from_pretrained(str(folder))
    config.num_hidden_layers, config.num_attention_heads = 2, 4
    torch.manual_seed(seed)
    transformers.BertModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def classifier(folder: Path) -> Path:
    wide_bert(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(folder), num_labels=3, id2label=dict(enumerate(LABELS)), label2id={k: i for i, k in enumerate(LABELS)}
    )
    for name in ("modules.json", "sentence_bert_config.json"):
        (folder / name).unlink()
    shutil.rmtree(folder / "1_Pooling")
    shutil.rmtree(folder / "2_Normalize")
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def reg(tmp_path, settings):
    """A registry with a small labelled dataset named like the demo's (the texts a method learns on)."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": t, "label": t.split()[1]}) + "\n" for t in TEXTS))
    datasets = Datasets.from_settings(settings)
    datasets.add("bbc-news", rows)
    datasets.close()
    registry = Registry.from_settings(settings)
    yield registry
    registry.close()


def build(settings, registry, folder: Path, task: str, name: str, **params):
    parent = registry.register(folder, f"parent-{task}", task)
    out = folder.parent / f"{name}-out"
    ctx = BuildContext(parent=parent, parent_dir=folder, out_dir=out, params=params, settings=settings)
    return method(name).build(ctx), out


def load(folder: Path, task: str):
    framework = detect_framework(folder, task)
    handler = handler_for(task, framework)
    handler.load(folder, Manifest(name="c", version=0, task=task, framework=framework, files=[]), RUNTIME)
    return handler


def embeddings(handler, texts):
    import numpy

    return torch.from_numpy(numpy.stack(handler(texts)))


def mask_heads(encoder, pruned: dict[str, list[int]]):
    """Zero the removed heads' outputs in the full model (before the output projection)."""
    handles = []
    for layer, heads in pruned.items():
        attention = encoder.encoder.layer[int(layer)].attention
        size = attention.self.attention_head_size
        gate = torch.ones(attention.self.all_head_size)
        for h in heads:
            gate[h * size : (h + 1) * size] = 0
        handles.append(attention.output.dense.register_forward_pre_hook(lambda m, a, g=gate: (a[0] * g,)))
    return handles


def test_pruned_embedder_loads_and_equals_its_parent_with_those_heads_masked(tmp_path, settings, reg):
    parent = wide_bert(tmp_path / "parent")
    result, out = build(settings, reg, parent, "embed", "prune-heads", heads_per_layer=2, num_texts=16)

    config = json.loads((out / "config.json").read_text())
    assert config["num_attention_heads"] == 4  # the parent's: the head size comes from it
    assert {k: len(v) for k, v in config["pruned_heads"].items()} == {"0": 2, "1": 2}
    assert result.parameters["pruned_heads"] == config["pruned_heads"]
    assert result.parameters["heads_per_layer"] == 2 and result.parameters["scoring"] == "output-norm"
    assert (out / "model.safetensors").stat().st_size < (parent / "model.safetensors").stat().st_size

    pruned = load(out, "embed")
    layer = pruned.model[0].auto_model.encoder.layer[0].attention
    assert layer.self.query.weight.shape == (16, 32) and layer.output.dense.weight.shape == (32, 16)
    got = embeddings(pruned, TEXTS[:6])

    reference = load(parent, "embed")
    for handle in mask_heads(reference.model[0].auto_model, config["pruned_heads"]):
        assert handle is not None
    expected = embeddings(reference, TEXTS[:6])
    assert torch.allclose(got, expected, atol=1e-5)
    unmasked = embeddings(load(parent, "embed"), TEXTS[:6])
    assert not torch.allclose(got, unmasked, atol=1e-3)  # the heads removed did count


def test_a_pruned_embedder_exports_to_onnx_with_its_cut_projections(tmp_path, settings, reg):
    pytest.importorskip("onnxruntime")
    parent = wide_bert(tmp_path / "parent")
    _, pruned = build(settings, reg, parent, "embed", "prune-heads", heads_per_layer=2, num_texts=16)
    derived = reg.register(pruned, "parent-embed", "embed")  # the pruned version, as the pipeline registers it
    out = tmp_path / "onnx-out"
    ctx = BuildContext(parent=derived, parent_dir=pruned, out_dir=out, params={}, settings=settings)
    method("onnx").build(ctx)  # checks the graph against the torch model it came from

    onnx_embeddings = embeddings(load(out, "embed"), TEXTS[:6])
    torch_embeddings = embeddings(load(pruned, "embed"), TEXTS[:6])
    assert torch.allclose(onnx_embeddings, torch_embeddings, atol=1e-4)


def test_pruned_classifier_equals_masked_parent_and_recovers_on_its_dataset(tmp_path, settings, reg):
    parent = classifier(tmp_path / "parent")
    result, out = build(settings, reg, parent, "classify", "prune-heads", fraction=0.5, num_texts=16)
    pruned_heads = json.loads((out / "config.json").read_text())["pruned_heads"]
    got = [c.scores for c in load(out, "classify")(TEXTS[:5])]
    reference = load(parent, "classify")
    mask_heads(reference.model.base_model, pruned_heads)
    expected = [c.scores for c in reference(TEXTS[:5])]
    for row, want in zip(got, expected):
        assert row == pytest.approx(want, abs=1e-5)

    recovered, out2 = build(
        settings, reg, parent, "classify", "prune-heads", fraction=0.5, num_texts=16, recovery=1, batch_size=8
    )
    assert recovered.parameters["recovery_result"]["validation"]  # evaluated on the validation split
    assert json.loads((out2 / "config.json").read_text())["pruned_heads"] == pruned_heads  # same scores, same heads
    assert len(load(out2, "classify")(TEXTS[:3])) == 3


def test_ablation_scoring_masks_each_head_once_and_prunes_the_least_missed(tmp_path, settings, reg):
    parent = wide_bert(tmp_path / "parent")
    result, out = build(settings, reg, parent, "embed", "prune-heads", heads_per_layer=3, scoring="ablation")
    scores = result.parameters["head_scores"]
    assert len(scores) == 2 and all(len(row) == 4 and min(row) >= 0 for row in scores)
    for layer, heads in result.parameters["pruned_heads"].items():
        row = scores[int(layer)]
        assert heads == [row.index(min(row))]  # the head whose masking moved the embeddings least
    assert len(load(out, "embed")(TEXTS[:2])) == 2


def test_a_pruned_embedder_recovers_by_distillation_onto_its_parent(tmp_path, settings, reg):
    parent = wide_bert(tmp_path / "parent")
    result, out = build(
        settings, reg, parent, "embed", "prune-heads", heads_per_layer=1, recovery=2, batch_size=8, learning_rate=1e-3
    )
    losses = result.parameters["recovery_result"]["losses"]
    assert len(losses) == result.parameters["recovery_result"]["steps"] > 2
    assert sum(losses[-2:]) < sum(losses[:2])
    assert len(load(out, "embed")(TEXTS[:2])[0]) == 32


def test_refusals(tmp_path, settings, reg):
    parent = wide_bert(tmp_path / "parent")
    with pytest.raises(BadRequest) as caught:
        build(settings, reg, parent, "embed", "prune-heads", heads_per_layer=4)
    assert caught.value.code == "invalid_parameters"
    with pytest.raises(BadRequest) as caught:
        build(settings, reg, parent, "embed", "prune-heads", heads=2)
    assert caught.value.code == "invalid_parameters" and "heads_per_layer" in caught.value.message
    with pytest.raises(BadRequest) as caught:
        build(settings, reg, parent, "embed", "prune-heads", heads_per_layer=2, fraction=0.5)
    assert caught.value.code == "invalid_parameters"


def test_a_generation_model_is_not_pruned(tmp_path, settings, reg):
    from tests.support import tiny_llama

    folder = tiny_llama(tmp_path / "lm")
    with pytest.raises(BadRequest) as caught:
        build(settings, reg, folder, "generate", "prune-heads")
    assert caught.value.code == "unsupported_method"
