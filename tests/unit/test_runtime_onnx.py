"""The ONNX Runtime handlers on tiny exported models: the same outputs as the torch handlers on the
same weights, the ONNX structure check at register, verify and load, encrypted versions, and the
one-line error of a missing onnxruntime."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest

from moorage.config import load_settings
from moorage.errors import BadRequest, IntegrityError, InvalidArtifact, MissingDependency, ModelLoadFailed
from moorage.registry import Registry, crypto
from moorage.registry.manifest import detect_framework
from moorage.runtime import Runtime

from tests.support import tiny_onnx_folder

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

TEXTS = [
    "stocks fell sharply on Monday",
    "a late goal in extra time",
    "x",
    "the new chip is faster " * 40,  # past max_length: both frameworks truncate at 128 tokens
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{task: (torch folder, onnx folder)}, exported once for the module."""
    root = tmp_path_factory.mktemp("onnx")
    return {task: tiny_onnx_folder(root, task) for task in ("embed", "classify")}


@pytest.fixture
def fp32(settings):
    """float32 torch runtime: the comparison is to the exported fp32 graph, not to bf16."""
    return settings.runtime.model_copy(update={"dtype": "float32", "num_threads": 1})


def _cli(settings, *args: str):
    from typer.testing import CliRunner

    from moorage.cli.main import app

    env = {"MOORAGE_HOME": str(settings.home), "MOORAGE_USER": "tester", "MOORAGE_CONFIG": None, "COLUMNS": "200"}
    return CliRunner().invoke(app, list(args), env=env)


def _cosines(a, b) -> list[float]:
    return [float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(a, b)]


def test_onnx_embeddings_match_the_torch_handler_on_the_same_weights(registry, fp32, exported):
    torch_dir, onnx_dir = exported["embed"]
    parent = registry.register(torch_dir, "emb", "embed")
    derived = registry.register(onnx_dir, "emb", "embed")
    assert (parent.framework, derived.framework) == ("sentence-transformers", "onnx")
    runtime = Runtime(registry, fp32)
    theirs, ours = runtime.load(parent), runtime.load(derived)
    expected, got = theirs.predict(TEXTS), ours.predict(TEXTS)
    assert [(type(v), v.dtype, v.shape) for v in got] == [(type(v), v.dtype, v.shape) for v in expected]
    assert min(_cosines(expected, got)) > 0.9999
    assert np.allclose([np.linalg.norm(v) for v in got], 1.0, atol=1e-5)  # normalised inside the graph
    assert (ours.handler.precision, ours.handler.framework, theirs.handler.precision) == ("fp32", "onnx", "fp32")
    assert ours.handler.memory_bytes >= (onnx_dir / "model.onnx").stat().st_size
    features = ours.handler.preprocess(TEXTS)  # usage counts read the same attention mask
    assert ours.handler.token_counts(features, TEXTS) == theirs.handler.token_counts(
        theirs.handler.preprocess(TEXTS), TEXTS
    )


def test_onnx_classifier_matches_the_torch_handler_on_the_same_weights(registry, fp32, exported):
    torch_dir, onnx_dir = exported["classify"]
    parent = registry.register(torch_dir, "news", "classify")
    derived = registry.register(onnx_dir, "news", "classify")
    assert derived.framework == "onnx"
    runtime = Runtime(registry, fp32)
    expected, got = runtime.load(parent).predict(TEXTS), runtime.load(derived).predict(TEXTS)
    assert [c.label for c in got] == [c.label for c in expected]
    for e, g in zip(expected, got):
        assert list(g.scores) == ["business", "sport", "tech"] == list(e.scores)
        assert g.scores == pytest.approx(e.scores, abs=1e-5)
        assert g.score == max(g.scores.values())


def test_an_onnx_folder_for_another_task_or_without_its_graph_is_refused(exported, tmp_path):
    with pytest.raises(BadRequest) as err:
        detect_framework(exported["embed"][1], "classify")
    assert err.value.code == "wrong_task" and "onnx.json" in str(err.value)
    folder = tmp_path / "no-graph"
    shutil.copytree(exported["embed"][1], folder)
    (folder / "model.onnx").unlink()
    with pytest.raises(BadRequest, match="has an onnx.json but no model.onnx"):
        detect_framework(folder, "embed")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_register_refuses_a_malformed_model_onnx_and_stores_nothing(registry, exported, tmp_path, damage):
    folder = tmp_path / "bad"
    shutil.copytree(exported["embed"][1], folder)
    model = folder / "model.onnx"
    data = model.read_bytes()
    model.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x8f\xff" * 4096, "empty": b""}[damage])
    with pytest.raises(InvalidArtifact) as err:
        registry.register(folder, "emb", "embed")
    message = str(err.value)
    assert "model.onnx" in message and "not a valid ONNX model" in message and "\n" not in message
    assert registry.list_models() == []


def test_a_corrupted_stored_onnx_file_fails_verify_and_load_with_one_line(registry, settings, exported):
    info = registry.register(exported["embed"][1], "emb", "embed")
    stored = registry.local_path(info) / "model.onnx"
    data = bytearray(stored.read_bytes())
    stored.write_bytes(bytes(data[: len(data) - 1000]))  # truncated in place
    problems = registry.verify(info.ref)
    assert len(problems) == 1 and problems[0].startswith("model.onnx: checksum mismatch")
    with pytest.raises(IntegrityError) as err:
        Runtime(registry, settings.runtime).load(info)
    assert "model.onnx" in str(err.value) and "\n" not in str(err.value)


def test_a_malformed_onnx_file_that_slipped_past_registration_fails_verify_and_load(
    registry, settings, exported, tmp_path, monkeypatch
):
    """A version stored before ONNX files were checked at registration: its checksums match, so verify
    and the loader must read the structure itself."""
    folder = tmp_path / "old"
    shutil.copytree(exported["embed"][1], folder)
    (folder / "model.onnx").write_bytes(b"\x08\x08" + b"\x3a\xff\x7f" + b"\x00" * 64)  # ir 8, a graph that runs out
    monkeypatch.setattr("moorage.registry.service.check_folder_files", lambda folder, files: None)
    info = registry.register(folder, "emb", "embed")
    monkeypatch.undo()
    (problem,) = registry.verify(info.ref)
    assert problem == "model.onnx: not a valid ONNX file (the file: field graph of 16383 bytes runs past its end at 69)"
    shown = _cli(settings, "models", "verify", info.ref)
    assert shown.exit_code == 1 and f"{info.ref} FAILED verification" in shown.output and problem in shown.output
    with pytest.raises(ModelLoadFailed) as err:
        Runtime(registry, settings.runtime).load(info)
    assert str(err.value).startswith(f"cannot load {info.ref}: model.onnx is not a valid ONNX file")
    assert "\n" not in str(err.value)


def test_a_graph_onnx_runtime_refuses_is_a_one_line_load_failure(registry, settings, exported, tmp_path):
    """Well-formed protobuf, but not a model ONNX Runtime can run (an operator that does not exist)."""
    import onnx

    folder = tmp_path / "odd"
    shutil.copytree(exported["embed"][1], folder)
    model = onnx.load(str(folder / "model.onnx"))
    model.graph.node[0].op_type = "NoSuchOperator"
    onnx.save(model, str(folder / "model.onnx"))
    info = registry.register(folder, "emb", "embed")
    with pytest.raises(ModelLoadFailed) as err:
        Runtime(registry, settings.runtime).load(info)
    assert "its onnx handler failed" in str(err.value) and "\n" not in str(err.value)


def test_an_encrypted_onnx_version_loads_from_memory(tmp_path, exported, fp32):
    home = tmp_path / "enc"
    env = {
        "MOORAGE_HOME": str(home),
        "MOORAGE_USER": "tester",
        "MOORAGE_SECURITY__ENCRYPT_ARTIFACTS": "true",
        "MOORAGE_SECURITY__MASTER_KEY": crypto.generate_master_key(),
    }
    registry = Registry.from_settings(load_settings(environ=env))
    try:
        info = registry.register(exported["embed"][1], "emb", "embed")
        assert info.manifest.encryption is not None
        stored = (registry.local_path(info) / "model.onnx").read_bytes()
        assert stored[:64] != (exported["embed"][1] / "model.onnx").read_bytes()[:64]  # ciphertext at rest
        assert registry.verify(info.ref) == []
        plain = registry.register(exported["embed"][1], "emb", "embed", encrypt=False)
        runtime = Runtime(registry, fp32)
        got, expected = runtime.load(info).predict(TEXTS[:2]), runtime.load(plain).predict(TEXTS[:2])
        assert min(_cosines(got, expected)) > 0.99999
    finally:
        registry.close()


def test_a_missing_onnxruntime_is_one_line_naming_the_extra(registry, settings, exported, monkeypatch):
    from moorage.runtime.onnx import require_onnxruntime

    info = registry.register(exported["classify"][1], "news", "classify")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(MissingDependency) as err:
        require_onnxruntime()
    assert str(err.value) == "'onnxruntime' is not installed; install it with: pip install 'moorage[onnx]'"
    with pytest.raises(MissingDependency) as err:
        Runtime(registry, settings.runtime).load(info)
    assert "pip install 'moorage[onnx]'" in str(err.value) and "\n" not in str(err.value)


def test_models_show_prints_framework_precision_and_the_compression_gates(registry, settings, exported):
    compression = {
        "method": "onnx-int8",
        "parameters": {"per_channel": True, "reduce_range": True},
        "parent": "emb:1",
        "forced": False,
        "gates": {
            "mean_cosine": {"value": 0.99251, "threshold": 0.99, "passed": True},
            "speedup_b32": {"value": 1.1, "threshold": 1.2, "passed": False},
        },
        "report": {"quality": {"mean_cosine": 0.99251}},
    }
    registry.register(exported["embed"][0], "emb", "embed")
    registry.register(exported["embed"][1], "emb", "embed", params={"precision": "int8", "compression": compression})
    derived, parent = _cli(settings, "models", "show", "emb:2"), _cli(settings, "models", "show", "emb:1")
    assert derived.exit_code == 0, derived.output
    lines = derived.output.splitlines()
    assert "framework: onnx" in lines and "precision: int8" in lines
    assert "compression: onnx-int8 from emb:1" in lines
    assert "  per_channel=True, reduce_range=True" in lines
    rows = {line.split()[1]: line.split()[2:] for line in lines if "mean_cosine" in line or "speedup_b32" in line}
    assert rows["mean_cosine"][:4] == ["│", "0.9925", "│", "0.99"] and "yes" in rows["mean_cosine"]
    assert rows["speedup_b32"][:4] == ["│", "1.1", "│", "1.2"] and "no" in rows["speedup_b32"]
    assert "framework: sentence-transformers" in parent.output.splitlines()
    assert "compression:" not in parent.output


def test_sessions_take_threads_from_the_runtime_settings_and_cuda_only_where_it_exists(settings, caplog):
    import onnxruntime as ort

    from moorage.runtime.onnx import providers, session_options

    options = session_options(ort, settings.runtime.model_copy(update={"num_threads": 3}))
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(ort, settings.runtime).intra_op_num_threads == len(os.sched_getaffinity(0))

    class WithCuda:
        @staticmethod
        def get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    assert providers(WithCuda, "cuda:1") == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert providers(WithCuda, "cpu") == ["CPUExecutionProvider"]
    cpu_only = "CUDAExecutionProvider" not in ort.get_available_providers()
    if cpu_only:  # this onnxruntime has no CUDA: the model runs on the CPU, and the log says so
        assert providers(ort, "cuda") == ["CPUExecutionProvider"]
        assert "no CUDA provider" in caplog.text


def test_an_int8_quantised_version_loads_and_says_so(registry, fp32, exported, tmp_path):
    """What `moorage compress --method onnx-int8` writes: ONNX Runtime's dynamic per-channel int8
    graph (com.microsoft operators) in the same folder layout, onnx.json saying int8."""
    import json

    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_dir = exported["embed"][1]
    folder = tmp_path / "int8"
    shutil.copytree(fp32_dir, folder)
    quantize_dynamic(
        str(fp32_dir / "model.onnx"), str(folder / "model.onnx"), per_channel=True, weight_type=QuantType.QInt8
    )
    meta = json.loads((folder / "onnx.json").read_text())
    (folder / "onnx.json").write_text(json.dumps({**meta, "precision": "int8", "quantization": {"per_channel": True}}))
    full, quantised = registry.register(fp32_dir, "emb", "embed"), registry.register(folder, "emb", "embed")
    assert quantised.manifest.size_bytes < full.manifest.size_bytes
    runtime = Runtime(registry, fp32)
    loaded = runtime.load(quantised)
    assert loaded.handler.precision == "int8"
    assert min(_cosines(runtime.load(full).predict(TEXTS), loaded.predict(TEXTS))) > 0.999  # 0.99996 measured
