import pytest

from moorage.errors import Conflict, IntegrityError
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
