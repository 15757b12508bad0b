"""The compression pipeline with a tiny random BERT: the ONNX export matches torch, an int8 version is
registered with its lineage and every parameter, a gate that fails registers nothing and names the
failing measure, --force registers and audits, an unsupported method is one line, the CLI end to end,
and the compress job through the job queue."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

from moorage.config import Settings, load_settings  # noqa: E402
from moorage.errors import BadRequest  # noqa: E402
from moorage.jobs.queue import WorkQueue  # noqa: E402
from moorage.jobs.store import JobStatus  # noqa: E402
from moorage.registry import Registry  # noqa: E402
from moorage.runtime import Runtime  # noqa: E402
from moorage.security.audit import AuditLog  # noqa: E402
from moorage.training.compress.export import export, read_meta  # noqa: E402
from moorage.training.compress.pipeline import compress  # noqa: E402
from moorage.training.compress.quantize import choose_reduce_range, compact, cpu_flags, int8_options  # noqa: E402
from moorage.training.datasets import Datasets  # noqa: E402
from moorage.training.jobs import validate_spec  # noqa: E402
from moorage.training.worker import Worker  # noqa: E402

from tests.support import run_cli, tiny_bert  # noqa: E402

WORDS = "goal match team coach league player software chip computer network server code laptop cloud".split()
# The tiny random model is no faster than its parent in any reliable way, and its int8 cosine is what
# a 32-wide random encoder gives: the tests pin gates they can reason about, one at a time.
LENIENT = {"MOORAGE_COMPRESSION__MIN_SPEEDUP": "0.001", "MOORAGE_COMPRESSION__MIN_MEAN_COSINE": "0.5"}
LENIENT |= {"MOORAGE_RUNTIME__DTYPE": "float32"}  # the parent as served is the parent measured: loaded once
LENIENT |= {"MOORAGE_COMPRESSION__MIN_MIN_COSINE": "0.0", "MOORAGE_COMPRESSION__MAX_ACCURACY_LOSS": "1.0"}
UNREACHABLE = {**LENIENT, "MOORAGE_COMPRESSION__MIN_MEAN_COSINE": "1.0"}  # no int8 model is exactly its parent


def texts(count: int = 24, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.sample(WORDS, rng.randint(2, 8))) for _ in range(count)]


def make_settings(home: Path, **env: str) -> Settings:
    base = {"MOORAGE_HOME": str(home), "MOORAGE_USER": "tester", "MOORAGE_SECURITY__AUTH": "false"}
    return load_settings(environ={**base, **env})


def tiny_classifier(folder: Path) -> Path:
    """The tiny BERT with a random two-label head (sport, tech)."""
    import transformers

    bert = tiny_bert(folder / "bert")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(bert), num_labels=2, id2label={0: "sport", 1: "tech"}, label2id={"sport": 0, "tech": 1}
    )
    out = folder / "classifier"
    model.save_pretrained(out, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(str(bert)).save_pretrained(out)
    return out


@dataclass
class World:
    home: Path
    tmp: Path

    def settings(self, **env: str) -> Settings:
        return make_settings(self.home, **{**LENIENT, **env})


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> World:
    """tiny:1 (embed), tiny-cls:1 (classify) and the dataset toy (classify: sport, tech)."""
    tmp = tmp_path_factory.mktemp("compress")
    settings = make_settings(tmp / "home")
    registry = Registry.from_settings(settings)
    try:
        registry.register(tiny_bert(tmp / "bert"), "tiny", "embed", alias="production")
        registry.register(tiny_classifier(tmp / "cls"), "tiny-cls", "classify", alias="production")
    finally:
        registry.close()
    rows = [{"text": t, "label": "sport" if i % 2 else "tech"} for i, t in enumerate(texts(60, seed=1))]
    (tmp / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Datasets.from_settings(settings).add("toy", str(tmp / "toy.jsonl"))
    return World(tmp / "home", tmp)


@pytest.fixture
def world(pristine, tmp_path) -> World:
    shutil.copytree(pristine.home, tmp_path / "home")
    return World(tmp_path / "home", tmp_path)


def test_the_onnx_export_matches_torch_and_is_served_by_the_onnx_handler(pristine, tmp_path):
    import numpy as np

    from moorage.registry.manifest import Manifest
    from moorage.runtime.hf import SentenceEmbedder
    from moorage.runtime.onnx import OnnxEmbedder

    settings = make_settings(tmp_path / "home", MOORAGE_RUNTIME__DTYPE="float32")  # not bf16, where it is native
    done = export("embed", pristine.tmp / "bert", tmp_path / "onnx")
    assert done.max_abs_diff < 1e-4 and done.exporter == "torchscript"
    meta = read_meta(tmp_path / "onnx")
    assert meta["task"] == "embed" and meta["normalize"] is True and meta["max_length"] == 128
    assert meta["inputs"][:2] == ["input_ids", "attention_mask"] and meta["output"] == "embeddings"
    torch_handler, onnx_handler = SentenceEmbedder(), OnnxEmbedder()
    manifest = Manifest(name="t", version=1, task="embed", framework="x", files=[])
    torch_handler.load(pristine.tmp / "bert", manifest, settings.runtime)
    onnx_handler.load(tmp_path / "onnx", manifest, settings.runtime)
    sample = texts(5)
    expected, got = np.stack(torch_handler(sample)), np.stack(onnx_handler(sample))
    assert got.shape == expected.shape == (5, 32)
    assert np.abs(got - expected).max() < 1e-4

    done = export("classify", pristine.tmp / "cls" / "classifier", tmp_path / "onnx-cls")
    assert done.max_abs_diff < 1e-4 and read_meta(tmp_path / "onnx-cls")["output"] == "logits"


def test_compacting_the_int8_graph_keeps_its_int8_weights_and_its_outputs(pristine, tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoTokenizer

    export("embed", pristine.tmp / "bert", tmp_path / "onnx")
    quantized = tmp_path / "int8.onnx"
    quantize_dynamic(tmp_path / "onnx" / "model.onnx", quantized, per_channel=True, weight_type=QuantType.QInt8)
    enc = AutoTokenizer.from_pretrained(str(pristine.tmp / "bert"))(texts(6), padding=True, return_tensors="np")

    def run(path: Path):  # unoptimised: ONNX Runtime's fusions differ by graph, and with them the rounding
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return session.run(None, {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()})[0]

    def mean_cosine(a, b) -> float:
        return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())

    def int8_bytes(graph) -> int:
        return sum(t.ByteSize() for t in graph.initializer if t.data_type == onnx.TensorProto.INT8)

    expected, original = run(quantized), onnx.load(str(quantized)).graph
    fp32 = run(tmp_path / "onnx" / "model.onnx")
    for float16 in (False, True):
        path = tmp_path / f"compact-{float16}.onnx"
        shutil.copyfile(quantized, path)
        assert compact(path, float16=float16) == quantized.stat().st_size - path.stat().st_size > 0
        graph = onnx.load(str(path)).graph
        assert not graph.value_info and all(len(n.input) == 3 for n in graph.node if n.op_type == "MatMulInteger")
        assert int8_bytes(graph) < int8_bytes(original)  # only the all-zero zero points went
        weights = {t.name for t in original.initializer if t.data_type == onnx.TensorProto.INT8}
        assert {n for n in weights if not n.endswith("zero_point")} <= {t.name for t in graph.initializer}
        halves = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
        assert bool(halves) is float16 and len([n for n in graph.node if n.op_type == "Cast"]) >= len(halves)
        got = run(path)
        if not float16:  # lossless
            assert np.array_equal(got, expected)
        else:  # float16 biases and scales: as close to float32 as the int8 graph was (activations re-quantised)
            assert mean_cosine(got, fp32) > mean_cosine(expected, fp32) - 0.005
    with pytest.raises(BadRequest) as caught:
        int8_options({"float_storage": "bfloat16"})
    assert caught.value.code == "invalid_param" and "float16, float32" in caught.value.message


def test_int8_registers_a_new_version_with_its_lineage_parameters_gates_and_report(world):
    settings = world.settings()
    outcome = compress(settings, "tiny", "onnx-int8", texts=texts(), user="cli:tester")
    assert outcome.registered is not None and outcome.registered.ref == "tiny:2"
    registry = Registry.from_settings(settings)
    try:
        info, parent = registry.resolve("tiny:2"), registry.resolve("tiny:1")
        assert info.framework == "onnx" and info.aliases == ()  # no alias unless asked
        assert registry.resolve("tiny").version == 1  # production stays on the parent
        params = info.manifest.params
        assert params["precision"] == "int8"
        compression = params["compression"]
        assert (compression["method"], compression["parent"], compression["forced"]) == ("onnx-int8", "tiny:1", False)
        used = compression["parameters"]
        assert used["per_channel"] is True and used["weight_type"] == "qint8"
        assert used["float_storage"] == "float16" and used["compacted_bytes"] > 0
        assert used["reduce_range"] == choose_reduce_range(cpu_flags()) and used["cpu_flags"] == cpu_flags()
        assert set(compression["gates"]) == {"mean_cosine", "min_cosine", "speedup_batch_32"}
        assert all(g["passed"] for g in compression["gates"].values())
        report = compression["report"]
        assert report["held_out"]["rows"] == 24 and 0.5 < report["quality"]["mean_cosine"] <= 1.0 + 1e-9
        assert set(report["speed"]["texts_per_s"]["derived"]) == {"batch_1", "batch_32"}
        footprint = report["footprint"]
        assert footprint["derived"]["framework"] == "onnx"
        assert footprint["parent"]["framework"] == "sentence-transformers" and report["parent"] == "tiny:1"
        assert report["size_ratio"] < 0.5  # int8 weights: about a quarter of float32's
        lineage = info.manifest.lineage
        assert (lineage.parent, lineage.parent_manifest_sha256) == ("tiny:1", parent.manifest_sha256)
        assert lineage.hyperparameters["compression"]["parameters"] == used and "onnxruntime" in lineage.packages
        served = Runtime(registry, settings.runtime).get("tiny:2")  # through the registry's checksums
        vectors = served.predict(texts(3))
        assert len(vectors) == 3 and len(vectors[0]) == 32
    finally:
        registry.close()


def test_force_registers_past_the_gate_and_says_so_in_the_manifest_and_the_audit_log(world):
    settings = world.settings(**UNREACHABLE)
    outcome = compress(settings, "tiny", "onnx", force=True, alias="fast", texts=texts(), user="cli:tester")
    assert outcome.registered is not None and outcome.forced and "forced by cli:tester" in outcome.reason
    registry = Registry.from_settings(settings)
    try:
        info = registry.resolve("tiny@fast")
        compression = info.manifest.params["compression"]
        assert compression["forced"] is True and compression["gates"]["mean_cosine"]["passed"] is False
        assert info.manifest.params["precision"] == "fp32"
        rows = AuditLog(registry.catalog).rows(action="compress")
        assert [(r["version"], r["key_id"], r["detail"]["forced"]) for r in rows] == [(2, "cli:tester", True)]
        assert AuditLog(registry.catalog).verify()[1] == []
    finally:
        registry.close()


def test_a_classifier_is_compared_on_its_test_split_per_class(world):
    settings = world.settings()
    registry = Registry.from_settings(settings)
    try:  # as training registers it: its lineage names the dataset and the test split
        data = Datasets.from_registry(registry).get("toy")
        lineage = {"dataset": data.lineage(), "hyperparameters": {"spec": {"test_split": "test"}}}
        folder = registry.local_path(registry.resolve("tiny-cls:1"))
        registry.register(folder, "tiny-cls", "classify", lineage=lineage)
    finally:
        registry.close()
    outcome = compress(settings, "tiny-cls:2", "onnx-int8", user="cli:tester")
    quality = outcome.report["quality"]
    assert set(quality["per_class"]) == {"sport", "tech"}
    assert quality["accuracy_delta"] == pytest.approx(quality["derived_accuracy"] - quality["parent_accuracy"])
    assert [g.name for g in outcome.gates] == ["accuracy_loss", "speedup_batch_32"]
    assert outcome.report["held_out"]["split"] == "test" and outcome.report["held_out"]["dataset"] == "toy:1"
    assert outcome.registered is not None and outcome.registered.manifest.lineage.dataset == data.lineage()
    metrics = outcome.registered.manifest.metrics  # as training records them: promotion can compare it
    assert metrics["evaluated_on"]["dataset"] == "toy:1" and "accuracy" in metrics


def test_a_method_the_task_does_not_support_and_an_unknown_one_are_one_line_errors(world, fake_model):
    settings = world.settings()
    registry = Registry.from_settings(settings)
    try:
        registry.register(fake_model("generate"), "chat", "generate")
    finally:
        registry.close()
    with pytest.raises(BadRequest) as caught:
        compress(settings, "chat", "onnx-int8", texts=texts())
    assert caught.value.code == "unsupported_method" and "\n" not in caught.value.message
    assert "embed and classify" in caught.value.message
    with pytest.raises(BadRequest) as caught:
        compress(settings, "tiny", "zip", texts=texts())
    assert caught.value.code == "unknown_method" and "onnx-int8" in caught.value.message
    compress(settings, "tiny", "onnx", texts=texts())  # tiny:2, an ONNX graph: no weights to start from
    with pytest.raises(BadRequest) as caught:
        compress(settings, "tiny:2", "onnx-int8", texts=texts())
    assert caught.value.code == "unsupported_method" and "compress its parent tiny:1 instead" in caught.value.message


@pytest.fixture
def moorage(monkeypatch, capsys):
    """Run the CLI as a user would: (exit status, stdout, stderr)."""

    def run(home: Path, *args: str, **env: str) -> tuple[int, str, str]:
        return run_cli(
            monkeypatch, capsys, *args, env={"MOORAGE_HOME": str(home), "MOORAGE_USER": "tester", **LENIENT, **env}
        )

    return run


def test_the_cli_registers_refuses_and_rejects_with_its_exit_codes(world, moorage):
    held_out = world.tmp / "texts.txt"
    held_out.write_text("\n".join(texts()))
    code, out, err = moorage(world.home, "compress", "tiny", "--method", "onnx-int8", "--texts", str(held_out))
    assert code == 0, err
    assert "mean cosine" in out and "texts/s, batch 32" in out and "registered tiny:2 (onnx-int8 of tiny:1)" in out

    # a gate the model cannot pass: nothing registered, the failing measure named, the report kept
    args = ("compress", "tiny:1", "-m", "onnx-int8", "--param", "per_channel=false", "--texts", str(held_out))
    code, out, err = moorage(world.home, *args, **UNREACHABLE)
    assert code == 1 and "refused:" in err and "not registered" in err
    refusal = err.split("refused:", 1)[1]
    assert "mean_cosine" in refusal and "needs >= 1" in refusal and "min_cosine" not in refusal
    kept = sorted((world.home / "compression-reports").iterdir())
    assert len(kept) == 1 and kept[0].name.startswith("tiny-1-onnx-int8-") and str(kept[0]) in " ".join(err.split())
    body = json.loads(kept[0].read_text())
    assert body["registered"] is False and body["parameters"]["per_channel"] is False
    assert [g["name"] for g in body["gates"] if not g["passed"]] == ["mean_cosine"]
    assert not list((world.home / "compress-work").iterdir())  # the derived folder went with it

    # bad input: one line, exit status 2
    texts_option = ("--texts", str(held_out))
    code, _, err = moorage(world.home, "compress", "tiny", "-m", "onnx-int8", "-p", "per_channel=maybe", *texts_option)
    assert code == 2 and err.count("\n") == 1 and "per_channel: true or false" in err
    code, _, err = moorage(world.home, "compress", "tiny", "-m", "onnx", "--param", "opset")
    assert code == 2 and err.count("\n") == 1 and "KEY=VALUE" in err
    code, _, err = moorage(world.home, "compress", "tiny", "-m", "onnx")  # no dataset registered, no texts
    assert code == 2 and err.count("\n") == 1 and "--texts FILE" in err
    registry = Registry.from_settings(make_settings(world.home))
    try:
        assert [v.version for v in registry.list_versions("tiny")] == [1, 2]
        audited = AuditLog(registry.catalog).rows(action="compress")
        assert [(r["detail"]["registered"], r["detail"]["forced"]) for r in audited] == [
            ("tiny:2", False),
            (None, False),
        ]
    finally:
        registry.close()


def test_a_compress_job_runs_through_the_queue(world):
    settings = world.settings()
    registry = Registry.from_settings(settings)
    try:
        queue = WorkQueue(registry.catalog.engine, lease_s=settings.jobs.lease_s)
        request = validate_spec("compress", {"model": "tiny-cls", "method": "onnx-int8", "dataset": "toy"})
        job = queue.submit("compress", request, owner="cli:tester")
        worker = Worker(settings, queue, kinds=["compress"])
        assert worker.run_next()
        done = queue.get(job.id)
        assert done is not None and done.status == JobStatus.SUCCEEDED, done.error
        assert done.result["ref"] == "tiny-cls:2" and done.result["method"] == "onnx-int8"
        assert registry.resolve("tiny-cls:2").manifest.params["compression"]["parent"] == "tiny-cls:1"
        lines = [line for _, line in queue.logs(job.id)]
        assert any("compressing tiny-cls with onnx-int8" in line for line in lines)

        # a job whose model a gate refuses fails with the one-line reason, nothing registered
        strict = world.settings(MOORAGE_COMPRESSION__MAX_ACCURACY_LOSS="0", MOORAGE_COMPRESSION__MIN_SPEEDUP="1000")
        refused = queue.submit("compress", request, owner="cli:tester")
        assert Worker(strict, queue, kinds=["compress"]).run_next()
        ended = queue.get(refused.id)
        assert ended is not None and ended.status == JobStatus.FAILED and ended.error is not None
        assert ended.error.code == "compression_refused" and "speedup_batch_32" in ended.error.message
        assert [v.version for v in registry.list_versions("tiny-cls")] == [1, 2]
    finally:
        registry.close()


def test_a_cancelled_compression_registers_nothing(world):
    from moorage.training.compress.pipeline import CompressionCancelled

    settings = world.settings()
    with pytest.raises(CompressionCancelled):
        compress(settings, "tiny", "onnx", texts=texts(), should_stop=lambda: True)
    registry = Registry.from_settings(settings)
    try:
        assert [v.version for v in registry.list_versions("tiny")] == [1]
    finally:
        registry.close()


def test_a_language_model_is_compared_on_perplexity_token_agreement_and_generated_tokens(tmp_path):
    from moorage.training.compress.report import HeldOut, measure

    from tests.support import tiny_llama

    folder = tiny_llama(tmp_path / "llama")
    settings = make_settings(tmp_path / "home", MOORAGE_RUNTIME__DTYPE="float32")
    held_out = HeldOut(texts(4), source={"source": "texts"})
    report = measure("generate", folder, folder, held_out, settings.runtime, speed_batches={1: 1, 2: 1})
    quality = report["quality"]
    assert quality["perplexity_ratio"] == pytest.approx(1.0) and quality["greedy_token_agreement"] == 1.0
    assert quality["tokens"] > 0 and quality["parent_perplexity"] == pytest.approx(quality["derived_perplexity"])
    rates = report["speed"]["tokens_per_s"]
    assert set(rates["parent"]) == set(rates["derived"]) == {"batch_1", "batch_2"}
    assert all(value > 0 for value in rates["derived"].values())
