"""The training pipeline end to end with a tiny random BERT on a toy two-topic dataset: lineage,
testing through the runtime, gated promotion (audited), bad bases, cancel and undo, and serving
the result over /v1/classify and the predict route."""

from __future__ import annotations

import asyncio
import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from moorage.config import Settings, load_settings  # noqa: E402
from moorage.errors import BadRequest, ModelNotFound  # noqa: E402
from moorage.registry import Registry  # noqa: E402
from moorage.security.audit import AuditLog  # noqa: E402
from moorage.training.datasets import Datasets  # noqa: E402
from moorage.training.pipeline import evaluate_version, run_training  # noqa: E402
from moorage.training.promotion import promote  # noqa: E402
from moorage.training.publish import package_versions  # noqa: E402
from moorage.training.trainer import TrainingCancelled, TrainSpec  # noqa: E402

from tests.support import tiny_bert, tiny_llama  # noqa: E402

TOPICS = {
    "sport": "goal match team coach league player score stadium referee season cup final".split(),
    "tech": "software chip computer network server code laptop startup browser robot cloud data".split(),
}
# A learning rate this small leaves the new head as initialised: the "worse" model.
GOOD = {"epochs": 4, "learning_rate": 5e-3, "batch_size": 8, "max_length": 32}
UNTRAINED = {"epochs": 1, "learning_rate": 1e-9, "batch_size": 8, "max_length": 32}


def toy_rows(per_topic: int = 30, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [
        {"text": " ".join(rng.sample(words, 6)), "label": topic}
        for topic, words in TOPICS.items()
        for _ in range(per_topic)
    ]


def make_settings(home: Path) -> Settings:
    return load_settings(
        environ={"MOORAGE_HOME": str(home), "MOORAGE_USER": "tester", "MOORAGE_SECURITY__AUTH": "false"}
    )


@dataclass
class World:
    settings: Settings
    tmp: Path
    base_ref: str
    dataset_ref: str

    def spec(self, name: str, **overrides) -> TrainSpec:
        fields = {"task": "classify", "base": self.base_ref, "dataset": self.dataset_ref, "name": name, **GOOD}
        return TrainSpec(**{**fields, **overrides})

    def train(self, spec: TrainSpec, work: str, **kwargs):
        return run_training(self.settings, spec, self.tmp / "work" / work, user="cli:tester", **kwargs)


def make_world(tmp: Path) -> World:
    settings = make_settings(tmp / "home")
    registry = Registry.from_settings(settings)
    try:
        base = registry.register(tiny_bert(tmp / "bert"), "tiny-bert", "embed", alias="production")
    finally:
        registry.close()
    data = tmp / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in toy_rows()))
    dataset = Datasets.from_settings(settings).add("toy", str(data))
    return World(settings, tmp, base.ref, dataset.ref)


def copy_world(world: World, tmp: Path) -> World:
    """A copy of `world` in `tmp` (its catalog, artifacts and datasets): what a test changes there
    leaves the original as it was."""
    shutil.copytree(world.settings.home, tmp / "home")
    return World(make_settings(tmp / "home"), tmp, world.base_ref, world.dataset_ref)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> World:
    """The base model (tiny BERT, embed) and the toy dataset, nothing trained."""
    return make_world(tmp_path_factory.mktemp("pristine"))


@pytest.fixture
def world(pristine, tmp_path) -> World:
    return copy_world(pristine, tmp_path)


@pytest.fixture(scope="module")
def trained(pristine, tmp_path_factory):
    """Two trained versions of `topics`: 1 barely trained, 2 trained (each the challenger when it
    was registered). Tests read it, or change a copy of it."""
    world = copy_world(pristine, tmp_path_factory.mktemp("trained"))
    untrained = world.train(world.spec("topics", **UNTRAINED), "untrained")
    good = world.train(world.spec("topics"), "good")
    return world, untrained, good


def test_the_registered_version_names_its_base_data_splits_and_every_hyperparameter(trained):
    world, _, result = trained
    registry = Registry.from_settings(world.settings)
    datasets = Datasets.from_settings(world.settings)
    try:
        info = registry.resolve("topics:2")
        base = registry.resolve(world.base_ref)
    finally:
        registry.close()
    dataset = datasets.get(world.dataset_ref)
    lineage = info.manifest.lineage
    assert info.aliases == ("challenger",) and result.version.ref == "topics:2"
    assert (lineage.parent, lineage.parent_manifest_sha256) == (base.ref, base.manifest_sha256)
    assert lineage.dataset == dataset.lineage()
    assert lineage.dataset["splits"] == {name: s.digest for name, s in dataset.splits.items()}
    assert lineage.dataset_sha256 == dataset.digest and lineage.label_map == dataset.label_map
    spec = world.spec("topics")
    assert lineage.hyperparameters["spec"] == spec.model_dump(mode="json")
    assert lineage.hyperparameters["trainer"] == result.outcome.hyperparameters
    assert lineage.hyperparameters["trainer"]["learning_rate"] == spec.learning_rate
    assert lineage.validation == result.outcome.history and lineage.validation
    assert lineage.packages == package_versions() and {"torch", "transformers", "moorage"} <= set(lineage.packages)
    assert lineage.code_version
    # which data made this model, and which models came from this dataset
    shown = CliRunner().invoke(_cli(), ["models", "show", "topics:2"], env=_env(world.settings))
    assert shown.exit_code == 0, shown.output
    assert (
        f"parent:  {base.ref}" in shown.output
        and f"dataset: {dataset.ref} (sha256 {dataset.digest[:12]}" in shown.output
    )
    assert ("topics", 2, "trained") in datasets.uses("toy") and ("topics", 1, "trained") in datasets.uses("toy")


def test_test_metrics_are_computed_through_the_runtime_on_the_test_split(trained):
    world, _, result = trained
    info = result.version
    metrics = info.manifest.metrics
    dataset = Datasets.from_settings(world.settings).get(world.dataset_ref)
    test_rows = dataset.splits["test"].rows
    assert metrics["evaluated_on"] == {
        "dataset": dataset.ref,
        "dataset_sha256": dataset.digest,
        "split": "test",
        "split_sha256": dataset.splits["test"].digest,
        "rows": test_rows,
    }
    assert sum(sum(row) for row in metrics["confusion_matrix"]) == test_rows
    assert metrics["labels"] == sorted(TOPICS)
    # the registered version, loaded by the runtime as a server loads it, scores the same
    again = evaluate_version(world.settings, info.ref, world.dataset_ref)
    assert {k: again[k] for k in ("accuracy", "macro_f1", "confusion_matrix")} == {
        k: metrics[k] for k in ("accuracy", "macro_f1", "confusion_matrix")
    }
    assert result.test_metrics == metrics


def test_promotion_accepts_a_better_challenger_refuses_a_worse_one_and_audits_both(trained, tmp_path):
    world, untrained, good = trained
    bad_value, good_value = untrained.test_metrics["accuracy"], good.test_metrics["accuracy"]
    assert good_value > bad_value, "the trained model should beat the untrained one on the toy topics"
    settings = copy_world(world, tmp_path).settings  # its aliases move; the module's stay as they were
    registry = Registry.from_settings(settings)
    try:
        registry.set_alias("topics", "challenger", 1, "the untrained one first")
        first = promote(settings, "topics", user="cli:tester")
        assert first.accepted and first.production is None and first.challenger_value == bad_value
        registry.set_alias("topics", "challenger", 2, "the trained one")
        better = promote(settings, "topics", user="cli:tester")
        assert (better.accepted, better.challenger_value, better.production_value) == (True, good_value, bad_value)
        assert registry.resolve("topics@production").version == 2
        registry.set_alias("topics", "challenger", 1, "the untrained one again")
        result = CliRunner().invoke(_cli(), ["models", "promote", "topics"], env=_env(settings))
        assert result.exit_code == 1, result.output
        assert "not promoted" in result.output and f"{bad_value:.4f}" in result.output
        assert registry.resolve("topics@production").version == 2
        moves = [e for e in registry.history("topics", "production")]
        assert [e.to_version for e in moves] == [1, 2]
        assert f"{good_value:.4f}" in moves[-1].reason and f"{bad_value:.4f}" in moves[-1].reason
        audit = AuditLog(registry.catalog)
        rows = audit.rows(action="promote")
        assert [(r["version"], r["detail"]["accepted"]) for r in rows] == [(1, True), (2, True), (1, False)]
        refused = rows[-1]["detail"]
        assert (refused["challenger_value"], refused["production_value"]) == (bad_value, good_value)
        assert rows[-1]["key_id"] == "cli:tester"
        assert audit.verify()[1] == []
    finally:
        registry.close()


def test_production_tested_elsewhere_is_evaluated_on_the_challengers_split(trained, tmp_path):
    """A production version registered by hand has no test metric: the gate tests it now, on the
    challenger's split, through the runtime (the same weights score the same)."""
    world, untrained, good = trained
    settings = copy_world(world, tmp_path).settings
    registry = Registry.from_settings(settings)
    try:
        folder = registry.local_path(registry.resolve("topics:1"))
        by_hand = registry.register(folder, "topics", "classify", alias="production")
        decision = promote(settings, "topics", user="cli:tester")
        assert decision.production == by_hand.ref
        assert decision.production_value == untrained.test_metrics["accuracy"]
        assert decision.accepted == (good.test_metrics["accuracy"] >= untrained.test_metrics["accuracy"])
    finally:
        registry.close()


def test_an_unknown_base_and_a_wrong_task_base_are_one_line_errors_with_nothing_registered(world, tmp_path):
    registry = Registry.from_settings(world.settings)
    try:
        registry.register(tiny_llama(tmp_path / "llama"), "tiny-llama", "generate")
        with pytest.raises(ModelNotFound) as unknown:
            world.train(world.spec("topics", base="no-such-model"), "unknown")
        with pytest.raises(BadRequest) as wrong:
            world.train(world.spec("topics", base="tiny-llama"), "wrong")
        with pytest.raises(BadRequest) as kind:
            world.train(world.spec("lm", task="generate", base="tiny-llama"), "kind")
        assert (unknown.value.status, unknown.value.code) == (404, "model_not_found")
        assert (wrong.value.code, kind.value.code) == ("wrong_base_task", "wrong_dataset_kind")
        for error in (unknown.value, wrong.value, kind.value):
            assert "\n" not in error.message
        assert {m.name for m in registry.list_models()} == {"tiny-bert", "tiny-llama"}
        assert not (world.tmp / "work").exists()  # refused before any training started
    finally:
        registry.close()


def test_a_cancelled_run_and_a_failed_dataset_record_leave_nothing_registered(trained, tmp_path, monkeypatch):
    world = copy_world(trained[0], tmp_path)
    uses = Datasets.from_settings(world.settings).uses("toy")
    with pytest.raises(TrainingCancelled):
        world.train(world.spec("topics", **UNTRAINED), "cancelled", should_stop=lambda: True)

    def broken(*args, **kwargs):
        raise RuntimeError("the catalog went away")

    # a finished run's work dir, moved: its training is not repeated, and it is a run of its own
    shutil.copytree(trained[0].tmp / "work" / "untrained", world.tmp / "work" / "undone")
    monkeypatch.setattr(Datasets, "record_use", broken)
    with pytest.raises(RuntimeError):
        world.train(world.spec("topics", **UNTRAINED), "undone")
    registry = Registry.from_settings(world.settings)
    try:
        assert [v.version for v in registry.list_versions("topics")] == [1, 2]
        assert registry.resolve("topics@challenger").version == 2  # back where it was
        assert [(e.action, e.to_version) for e in registry.history("topics", "challenger")][-2:] == [
            ("set", 3),
            ("set", 2),
        ]
    finally:
        registry.close()
    assert Datasets.from_settings(world.settings).uses("toy") == uses


def _cli():
    from moorage.cli.main import app

    return app


def _env(settings: Settings) -> dict[str, str | None]:
    return {"MOORAGE_HOME": str(settings.home), "MOORAGE_USER": "tester", "MOORAGE_CONFIG": None}


def test_the_trained_classifier_answers_classify_and_predict_and_promotes_over_http(trained, tmp_path, serving):
    world, untrained, good = trained
    copy = copy_world(world, tmp_path)
    registry = Registry.from_settings(copy.settings)
    texts = [" ".join(words[:6]) for words in TOPICS.values()]

    async def main():
        async with serving(copy.settings, registry, ("topics@challenger", "tiny-bert")) as (app, c):
            answer = await c.post("/v1/classify", json={"model": "topics@challenger", "input": texts})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert (body["model"], body["version"]) == ("topics", 2) and body["usage"]["prompt_tokens"] > 0
            predicted = await c.post("/v1/models/topics@challenger/predict", json={"inputs": texts})
            assert [o["label"] for o in predicted.json()["outputs"]] == [d["label"] for d in body["data"]]
            for i, item in enumerate(body["data"]):
                assert item["index"] == i and set(item["scores"]) == set(TOPICS)
                assert item["label"] == max(item["scores"], key=item["scores"].get)
                assert abs(sum(item["scores"].values()) - 1) < 1e-5
            one = await c.post("/v1/classify", json={"model": "topics@challenger", "input": texts[0]})
            assert [d["label"] for d in one.json()["data"]] == [body["data"][0]["label"]]
            refusals = {
                "empty": await c.post("/v1/classify", json={"model": "topics@challenger", "input": []}),
                "extra": await c.post("/v1/classify", json={"model": "topics@challenger", "input": "x", "k": 1}),
                "unknown": await c.post("/v1/classify", json={"model": "nope", "input": "x"}),
                "embed": await c.post("/v1/classify", json={"model": "tiny-bert", "input": "x"}),
            }
            codes = {k: (r.status_code, r.json()["error"]["code"]) for k, r in refusals.items()}
            assert codes["empty"] == (400, "empty_input") and codes["extra"][0] == 422
            assert codes["unknown"][0] == 404 and codes["embed"] == (400, "wrong_task")

            accepted = await c.post("/v1/models/topics/promote", json={})
            assert accepted.status_code == 200, accepted.text
            assert accepted.json()["accepted"] and accepted.json()["challenger"] == "topics:2"
            await asyncio.to_thread(registry.set_alias, "topics", "challenger", 1, "the untrained one")
            refused = await c.post("/v1/models/topics/promote", json={"from": "challenger", "to": "production"})
            assert (refused.status_code, refused.json()["error"]["code"]) == (409, "promotion_refused")
            assert f"{untrained.test_metrics['accuracy']:.4f}" in refused.json()["error"]["message"]
            assert f"{good.test_metrics['accuracy']:.4f}" in refused.json()["error"]["message"]

    try:
        asyncio.run(main())
        assert registry.resolve("topics@production").version == 2
        audit = AuditLog(registry.catalog)
        assert [r["detail"]["accepted"] for r in audit.rows(action="promote")] == [True, False]
        assert {r["action"] for r in audit.rows(model="topics")} >= {"classify", "predict", "promote_model"}
        assert audit.verify()[1] == []
    finally:
        registry.close()


def test_a_run_started_again_in_its_work_dir_finds_the_version_it_registered(trained):
    """A job whose process died after registering runs again: the same version, not a second one."""
    world, _, good = trained
    again = world.train(world.spec("topics"), "good")
    registry = Registry.from_settings(world.settings)
    try:
        assert again.version.ref == good.version.ref == "topics:2"
        assert [v.version for v in registry.list_versions("topics")] == [1, 2]
    finally:
        registry.close()


def test_a_lora_adapter_on_a_causal_lm_is_a_child_version_tested_on_its_loss(world, tmp_path):
    rng = random.Random(0)
    rows = []
    for i in range(20):
        topic = rng.choice(sorted(TOPICS))
        question = " ".join(rng.sample(TOPICS[topic], 4))
        rows.append(
            {"messages": [{"role": "user", "content": f"{question} {i}"}, {"role": "assistant", "content": topic}]}
        )
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = Datasets.from_settings(world.settings).add("chat", str(data), label=None, messages="messages")
    registry = Registry.from_settings(world.settings)
    try:
        base = registry.register(tiny_llama(tmp_path / "llama"), "tiny-llama", "generate")
        spec = TrainSpec(
            task="generate", method="lora", base=base.ref, dataset=chat.ref, name="chatty", epochs=1, batch_size=4,
            max_length=32, early_stopping_patience=None,
        )  # fmt: skip
        result = world.train(spec, "lora")
        info = result.version
        assert (info.task, info.manifest.lineage.parent, info.aliases) == ("generate", base.ref, ("challenger",))
        assert "lora" in info.manifest.lineage.hyperparameters["trainer"]
        metrics = info.manifest.metrics
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
        assert metrics["evaluated_on"]["split_sha256"] == chat.splits["test"].digest
        again = evaluate_version(world.settings, info.ref, chat.ref)
        assert again["loss"] == metrics["loss"]
    finally:
        registry.close()


def test_classify_needs_the_invoke_right_on_the_model_and_promote_the_operator_role(trained, tmp_path, serving):
    from moorage.security.keys import KeyStore

    world = copy_world(trained[0], tmp_path)
    settings = load_settings(environ={"MOORAGE_HOME": str(world.settings.home), "MOORAGE_USER": "tester"})
    registry = Registry.from_settings(settings)
    store = KeyStore(registry.catalog)
    keys = {
        "invoker": store.create("invoker", models=["topics"])[1],
        "other": store.create("invoker", models=["other*"])[1],
        "operator": store.create("operator", models=["topics"])[1],
    }

    async def main():
        async with serving(settings, registry, ("topics@challenger",)) as (_, c):

            async def post(path: str, key: str, body: dict) -> tuple[int, str]:
                r = await c.post(path, json=body, headers={"Authorization": f"Bearer {keys[key]}"})
                return r.status_code, r.json().get("error", {}).get("code", "")

            texts = {"model": "topics@challenger", "input": ["goal match team"]}
            assert (await post("/v1/classify", "invoker", texts))[0] == 200
            assert await post("/v1/classify", "other", texts) == (403, "model_not_allowed")
            assert (await c.post("/v1/classify", json=texts)).status_code == 401
            assert (await post("/v1/models/topics/promote", "invoker", {}))[0] == 403
            assert (await post("/v1/models/topics/promote", "operator", {}))[0] == 200

    try:
        asyncio.run(main())
        assert registry.resolve("topics@production").version == 2
    finally:
        registry.close()


GATE_CASES = [  # metric, min_delta, challenger's value, production's value, accepted
    ("accuracy", 0.0, 0.90, 0.90, True),  # a tie passes: at least production's
    ("accuracy", 0.02, 0.91, 0.90, False),  # not better by the margin
    ("accuracy", -0.05, 0.86, 0.90, True),  # a negative margin is a tolerance
    ("loss", 0.0, 0.40, 0.50, True),  # lower wins for a loss
    ("loss", 0.0, 0.60, 0.50, False),
]


def test_the_gate_compares_test_metrics_recorded_on_the_same_split(tmp_path, fake_model):
    base = make_settings(tmp_path / "home")
    split = {"dataset": "d:1", "dataset_sha256": "a" * 64, "split": "test", "split_sha256": "b" * 64, "rows": 10}
    registry = Registry.from_settings(base)
    try:
        for i, (metric, min_delta, challenger, production, accepted) in enumerate(GATE_CASES):
            gate = base.training.model_copy(update={"promotion_metric": metric, "promotion_min_delta": min_delta})
            settings = base.model_copy(update={"training": gate})
            name = f"m{i}"
            for value, alias in ((production, "production"), (challenger, "challenger")):
                folder = fake_model("classify", seed=int(value * 100))
                registry.register(folder, name, "classify", alias=alias, metrics={metric: value, "evaluated_on": split})
            decision = promote(settings, name, user="cli:tester")
            values = (decision.accepted, decision.challenger_value, decision.production_value)
            assert values == (accepted, challenger, production), GATE_CASES[i]
            assert registry.resolve(f"{name}@production").version == (2 if accepted else 1)
            forced = promote(settings, name, user="cli:tester", force=True)
            assert forced.accepted and registry.resolve(f"{name}@production").version == 2
            assert ("forced by cli:tester" in forced.reason) == (not accepted)
    finally:
        registry.close()


def test_a_challenger_without_a_test_metric_is_refused_with_a_one_line_error(tmp_path, fake_model, monkeypatch, capsys):
    from moorage.cli.main import main

    settings = make_settings(tmp_path / "home")
    registry = Registry.from_settings(settings)
    try:
        registry.register(fake_model("classify"), "m", "classify", alias="challenger")
        with pytest.raises(BadRequest) as missing:
            promote(settings, "m", user="cli:tester")
        with pytest.raises(ModelNotFound) as unknown:
            promote(settings, "m", from_alias="nope", user="cli:tester")
        assert missing.value.code == "no_test_metric" and unknown.value.code == "alias_not_found"
        for name, value in _env(settings).items():
            monkeypatch.setenv(name, value) if value is not None else monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr("sys.argv", ["moorage", "models", "promote", "m"])
        monkeypatch.setattr("faulthandler.enable", lambda: None)  # captured stderr has no file descriptor
        with pytest.raises(SystemExit) as exited:
            main()
        err = capsys.readouterr().err
        assert exited.value.code == 2 and "no test 'accuracy'" in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert registry.resolve("m:1").aliases == ("challenger",)
    finally:
        registry.close()
