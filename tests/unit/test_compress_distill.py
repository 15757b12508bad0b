"""distill: the student has fewer layers, initialised from the teacher's, its loss falls over a bounded,
seeded training on the teacher's embeddings, and it loads through the runtime's embed handler."""

from __future__ import annotations

import json

import pytest

from moorage.errors import BadRequest

from tests.unit.test_compress_prune import TEXTS, build, classifier, load, wide_bert
from tests.unit.test_compress_prune import embeddings as embeddings_of

torch = pytest.importorskip("torch")
pytest.importorskip("sentence_transformers")


@pytest.fixture
def reg(tmp_path, settings):
    from moorage.registry import Registry
    from moorage.training.datasets import Datasets

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": t, "label": t.split()[1]}) + "\n" for t in TEXTS))
    datasets = Datasets.from_settings(settings)
    datasets.add("texts", rows)
    datasets.close()
    registry = Registry.from_settings(settings)
    yield registry
    registry.close()


def test_the_student_has_half_the_layers_learns_the_teacher_and_serves(tmp_path, settings, reg):
    parent = wide_bert(tmp_path / "parent")
    result, out = build(
        settings, reg, parent, "embed", "distill", dataset="texts", epochs=4, batch_size=8, learning_rate=1e-3
    )
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    params = result.parameters
    assert params["layers"] == 1 and params["parent_layers"] == 2 and params["kept_layers"] == [0]
    assert params["texts"]["dataset"] == "texts:1" and params["steps"] > 4
    assert params["last_loss"] < params["first_loss"]
    student = load(out, "embed")
    assert len(student.model[0].auto_model.encoder.layer) == 1
    embeddings = embeddings_of(student, TEXTS[:3])
    assert embeddings.shape == (3, 32) and torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-4)


def test_refusals(tmp_path, settings, reg):
    parent = wide_bert(tmp_path / "parent")
    with pytest.raises(BadRequest) as caught:
        build(settings, reg, parent, "embed", "distill", dataset="texts", layers=2)
    assert caught.value.code == "invalid_parameters"
    with pytest.raises(BadRequest) as caught:  # no dataset named, and no bbc-news registered
        build(settings, reg, parent, "embed", "distill")
    assert caught.value.code == "dataset_not_found" and "dataset=NAME" in caught.value.message
    with pytest.raises(BadRequest) as caught:
        build(settings, reg, classifier(tmp_path / "classifier"), "classify", "distill")
    assert caught.value.code == "unsupported_method"
