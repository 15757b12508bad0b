import json
import re

import pytest

from moorage.errors import BadRequest, Conflict, IntegrityError, InvalidArtifact, UnsafeArtifact
from moorage.registry import Registry, export_model, import_models


def test_export_import_keeps_everything(registry, fake_model, tmp_path, registry_snapshot):
    for seed in (1, 2, 3):
        registry.register(fake_model(seed=seed), "x", "embed", tags={"seed": str(seed)})
    registry.set_alias("x", "production", 1)
    registry.set_alias("x", "production", 3)
    registry.set_alias("x", "staging", 2)
    registry.rollback("x", "production", "bad release")
    export_model(registry, "x", str(tmp_path / "export"))

    target = Registry(f"sqlite:///{tmp_path}/other.db", str(tmp_path / "other-store"), user="importer")
    assert import_models(target, str(tmp_path / "export")) == ["x"]
    assert registry_snapshot(target, "x") == registry_snapshot(registry, "x")
    assert all(target.verify(f"x:{v}") == [] for v in (1, 2, 3))
    with pytest.raises(Conflict, match="already exists"):
        import_models(target, str(tmp_path / "export" / "x"))
    target.close()


def test_corrupt_export_is_refused_and_leaves_nothing(registry, fake_model, tmp_path):
    registry.register(fake_model(), "x", "embed")
    export_model(registry, "x", str(tmp_path / "export"))
    weights = tmp_path / "export" / "x" / "1" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    target = Registry(f"sqlite:///{tmp_path}/other.db", str(tmp_path / "other-store"))
    with pytest.raises(IntegrityError, match="weights.safetensors"):
        import_models(target, str(tmp_path / "export"))
    assert target.list_models() == []
    target.close()


def _doctor(export, change) -> None:
    doc = json.loads((export / "export.json").read_text())
    change(doc)
    (export / "export.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        (lambda d: d.pop("versions"), BadRequest, "is not a moorage export (KeyError"),
        (lambda d: d["versions"][0].update(manifest={"name": "x"}), BadRequest, "is not a moorage export"),
        (lambda d: d["versions"][0]["manifest"].update(name="y"), InvalidArtifact, "carries the manifest of y:1"),
        (
            lambda d: d["versions"][0]["manifest"]["files"][0].update(path="/etc/cron.d/x"),
            InvalidArtifact,
            "is an absolute path",
        ),
        (
            lambda d: d["versions"][0]["manifest"]["files"][0].update(path="training.pt"),
            UnsafeArtifact,
            "training.pt",
        ),
    ],
    ids=["no_versions", "bad_manifest", "manifest_of_another_model", "absolute_path", "pickle"],
)
def test_a_doctored_export_document_is_refused_before_anything_is_written(
    registry, fake_model, tmp_path, change, error, words
):
    registry.register(fake_model(), "x", "embed")
    export_model(registry, "x", str(tmp_path / "export"))
    _doctor(tmp_path / "export" / "x", change)
    target = Registry(f"sqlite:///{tmp_path}/other.db", str(tmp_path / "other-store"))
    with pytest.raises(error, match=re.escape(words)) as info:
        import_models(target, str(tmp_path / "export"))
    assert "\n" not in info.value.message
    assert target.list_models() == [] and not (tmp_path / "other-store").exists()
    target.close()
