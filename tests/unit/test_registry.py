import io
import json
import struct

import numpy as np
import pytest

from moorage.errors import BadRequest, Conflict, InvalidArtifact, ModelNotFound, UnsafeArtifact
from moorage.registry import Registry
from moorage.registry.artifacts import check_stored_name, name_problem, safetensors_problem


def test_register_alias_rollback_history(registry, fake_model):
    """The issue's walkthrough: v1, v2, alias to 1 then 2, rollback -> 1, three history rows."""
    v1 = registry.register(fake_model(seed=1), "x", "embed")
    v2 = registry.register(fake_model(seed=2), "x", "embed")
    assert (v1.version, v2.version) == (1, 2)
    registry.set_alias("x", "production", 1, "first")
    registry.set_alias("x", "production", 2, "better")
    event = registry.rollback("x", "production", "regression")
    assert (event.from_version, event.to_version) == (2, 1)
    assert registry.resolve("x@production").version == 1
    rows = registry.history("x")
    assert [(r.action, r.from_version, r.to_version, r.reason) for r in rows] == [
        ("set", None, 1, "first"),
        ("set", 1, 2, "better"),
        ("rollback", 2, 1, "regression"),
    ]
    assert {r.actor for r in rows} == {"tester"}


def test_rollback_is_undo_and_stops_at_the_first_target(registry, fake_model):
    for seed in range(3):
        registry.register(fake_model(seed=seed), "x", "embed")
    for v in (1, 2, 3):
        registry.set_alias("x", "production", v)
    assert registry.rollback("x", "production").to_version == 2
    assert registry.rollback("x", "production").to_version == 1
    with pytest.raises(Conflict, match="no earlier target"):
        registry.rollback("x", "production")


def test_bare_name_means_production_else_latest(registry, fake_model):
    registry.register(fake_model(seed=1), "x", "embed")
    registry.register(fake_model(seed=2), "x", "embed")
    assert registry.resolve("x").version == 2
    registry.set_alias("x", "production", 1)
    assert registry.resolve("x").version == 1
    assert registry.resolve("x:2").version == 2
    with pytest.raises(ModelNotFound, match="no alias 'staging'"):
        registry.resolve("x@staging")
    with pytest.raises(ModelNotFound, match="no version 9"):
        registry.resolve("x:9")
    with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
        registry.resolve("nope")


def test_manifest_records_files_params_metrics_lineage(registry, fake_model, home):
    info = registry.register(
        fake_model(),
        "x",
        "embed",
        params={"lr": 0.001},
        metrics={"f1": 0.9},
        lineage={"parent": "base:3", "dataset_sha256": "ab" * 32, "code_version": "deadbeef"},
        description="test",
        alias="staging",
    )
    m = info.manifest
    assert {f.path for f in m.files} == {"fake.json", "weights.safetensors"}
    assert all(len(f.sha256) == 64 and f.size > 0 for f in m.files)
    assert (m.params, m.metrics, m.lineage.parent, m.created_by) == ({"lr": 0.001}, {"f1": 0.9}, "base:3", "tester")
    on_disk = json.loads((home / "artifacts" / "x" / "1" / "moorage.json").read_text())
    assert on_disk["lineage"]["code_version"] == "deadbeef"
    assert info.aliases == ("staging",)
    assert registry.verify("x:1") == []


def test_verify_names_tampered_missing_and_extra_files(registry, fake_model, home):
    registry.register(fake_model(), "x", "embed")
    folder = home / "artifacts" / "x" / "1"
    data = bytearray((folder / "weights.safetensors").read_bytes())
    data[-1] ^= 0x01
    (folder / "weights.safetensors").write_bytes(bytes(data))
    (folder / "fake.json").unlink()
    (folder / "evil.py").write_text("print('hi')")
    problems = registry.verify("x")
    assert any(p.startswith("weights.safetensors: checksum mismatch") for p in problems)
    assert "fake.json: missing" in problems
    assert "evil.py: not in the manifest" in problems


def test_delete_refused_while_aliased(registry, fake_model, home):
    registry.register(fake_model(seed=1), "x", "embed")
    registry.register(fake_model(seed=2), "x", "embed", alias="production")
    with pytest.raises(Conflict) as info:
        registry.delete_version("x", 2)
    assert info.value.code == "alias_in_use"
    registry.delete_version("x", 1)
    assert not (home / "artifacts" / "x" / "1").exists()
    assert [v.version for v in registry.list_versions("x")] == [2]
    assert registry.register(fake_model(seed=3), "x", "embed").version == 3  # numbers are never reused


def test_versions_are_immutable_and_numbered(registry, fake_model):
    src = fake_model()
    registry.register(src, "x", "embed")
    (src / "fake.json").write_text('{"task": "embed", "dim": 8, "vocab_size": 1024, "labels": []}')
    registry.register(src, "x", "embed")
    assert registry.verify("x:1") == []  # the first copy did not change with its source
    assert registry.resolve("x:1").manifest.files != registry.resolve("x:2").manifest.files


@pytest.mark.parametrize(("task", "code"), [("generate", "wrong_task"), ("summarize", "bad_request")])
def test_wrong_task_is_refused(registry, fake_model, task, code):
    with pytest.raises(BadRequest) as info:
        registry.register(fake_model("embed"), "x", task)
    assert info.value.code == code


def test_model_keeps_one_task(registry, fake_model):
    registry.register(fake_model("embed"), "x", "embed")
    with pytest.raises(Conflict, match="holds 'embed' models"):
        registry.register(fake_model("classify"), "x", "classify")


def test_missing_folder_bad_name_and_pickle(registry, fake_model, tmp_path):
    with pytest.raises(BadRequest, match="does not exist"):
        registry.register(tmp_path / "nope", "x", "embed")
    with pytest.raises(BadRequest, match="invalid model name"):
        registry.register(fake_model(), "../x", "embed")
    src = fake_model()
    (src / "training_args.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(UnsafeArtifact, match="training_args.bin"):
        registry.register(src, "x", "embed")
    assert registry.list_models() == []


def test_hf_folder_task_detection(registry, tmp_path):
    folder = tmp_path / "lm"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (folder / "model.safetensors").write_bytes(b"\x02" + b"\x00" * 7 + b"{}")  # a valid file holding no tensor
    with pytest.raises(BadRequest, match="architecture LlamaForCausalLM says 'generate'"):
        registry.register(folder, "lm", "classify")
    assert registry.register(folder, "lm", "generate").framework == "transformers"


def test_tags_on_models_and_versions(registry, fake_model):
    registry.register(fake_model(), "x", "embed", alias="production")
    assert registry.tag("x", {"team": "search"}) == {"team": "search"}
    assert registry.tag("x@production", {"approved": "yes"}) == {"approved": "yes"}
    assert registry.tag("x:1", {}, remove=["approved"]) == {}
    assert registry.list_models()[0].tags == {"team": "search"}


def test_failed_upload_leaves_no_version(registry, fake_model, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    registry.register(fake_model(), "y", "embed")
    monkeypatch.setattr(registry.store, "write_manifest", boom)
    with pytest.raises(OSError):
        registry.register(fake_model(), "x", "embed")
    assert [m.name for m in registry.list_models()] == ["y"]  # not even the row x's registration created
    with pytest.raises(OSError):
        registry.register(fake_model(seed=1), "y", "embed")
    assert [v.version for v in registry.list_versions("y")] == [1]


def test_remove_alias_is_recorded(registry, fake_model):
    registry.register(fake_model(), "x", "embed", alias="production")
    registry.remove_alias("x", "production", "retired")
    assert registry.history("x")[-1].action == "remove"
    with pytest.raises(ModelNotFound):
        registry.resolve("x@production")


def test_catalog_survives_reopen(settings, fake_model):
    reg = Registry.from_settings(settings)
    reg.register(fake_model(), "x", "embed", alias="production")
    reg.close()
    again = Registry.from_settings(settings)
    assert again.resolve("x").aliases == ("production",)
    again.close()


# ---- safetensors headers and member names ------------------------------------------------------
def _st(header, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _t(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_a_header_safetensors_writes_passes():
    from safetensors.numpy import save

    data = save(
        {
            "w": np.zeros((3, 4), np.float16),
            "mask": np.ones(5, bool),
            "ids": np.arange(3, dtype=np.uint64),
            "empty": np.zeros((0, 7), np.float32),
            "scalar": np.array(1.5, np.float64),
        },
        metadata={"format": "pt"},
    )
    assert safetensors_problem(io.BytesIO(data), len(data)) is None
    assert safetensors_problem(io.BytesIO(_st({})), 10) is None  # no tensor at all


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x01\x00", "shorter than the 8-byte header length"),
        (struct.pack("<Q", 2**60) + b"{}", "over the 100000000-byte limit"),
        (struct.pack("<Q", 64) + b"{}", "runs past the end"),
        (_st(b"\xff\xfe{}"), "not JSON"),
        (_st(b"[1, 2]"), "not a JSON object"),
        (_st(b'{"a": 1, "a": 2}'), "names 'a' twice"),
        (_st({"__metadata__": {"n": 1}}), "__metadata__ must map strings to strings"),
        (_st({"a": _t("F33", [1], 0, 4)}, b"\0" * 4), "unknown dtype 'F33'"),
        (_st({"a": _t("F32", [True], 0, 4)}, b"\0" * 4), "shape must be a list of non-negative integers"),
        (_st({"a": _t("F32", [-1], 0, 4)}, b"\0" * 4), "shape must be a list of non-negative integers"),
        (_st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4), "data_offsets must be"),
        (_st({"a": _t("F32", [1], 4, 0)}, b"\0" * 4), "end 0 is before begin 4"),
        (_st({"a": _t("F32", [2], 0, 4)}, b"\0" * 4), "needs 8 bytes, data_offsets span 4"),
        (_st({"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 2, 6)}, b"\0" * 6), "overlaps"),
        (_st({"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 8, 12)}, b"\0" * 12), "a gap before tensor 'b'"),
        (_st({"a": _t("F32", [4], 0, 16)}, b"\0" * 8), "past the 8-byte data buffer"),
        (_st({"a": _t("F32", [1], 0, 4)}, b"\0" * 8), "cover 4 of the 8 data bytes"),
    ],
)
def test_malformed_headers_are_named_and_safetensors_refuses_them_too(data, problem):
    from safetensors import SafetensorError
    from safetensors.numpy import load

    found = safetensors_problem(io.BytesIO(data), len(data))
    assert found is not None and problem in found, found
    with pytest.raises(SafetensorError):  # the reference implementation agrees: nothing refused here loads
        load(data)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("/etc/passwd", "an absolute path"),
        ("\\\\server\\share", "an absolute path"),
        ("C:/weights", "an absolute path"),
        ("../up", "a '..' component"),
        ("sub/../../up", "a '..' component"),
        ("sub\\..\\up", "a '..' component"),
        ("bad\x00name", "NUL"),
        ("", "empty"),
    ],
)
def test_unsafe_names(name, problem):
    found = name_problem(name)
    assert found is not None and problem in found
    with pytest.raises(InvalidArtifact):
        check_stored_name(name, "x:1")


def test_safe_names():
    for name in ("weights.safetensors", "1_Pooling/config.json", "./fake.json", "a..b/c"):
        assert name_problem(name) is None
    check_stored_name("1_Pooling/config.json", "x:1")
    with pytest.raises(InvalidArtifact, match="is not a normalised path"):
        check_stored_name("./fake.json", "x:1")
