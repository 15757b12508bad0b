"""The trainer on tiny random models: a classifier learns a separable toy set and stops early, only the
best checkpoint is kept (as a clean safetensors folder), a run killed at a random step resumes to the
same weights, a cancel stops within a step, and LoRA on chat data yields a merged model and its adapter."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from moorage.errors import Conflict
from moorage.registry.manifest import UNSAFE_SUFFIXES
from moorage.runtime import Runtime
from moorage.training.datasets import Example
from moorage.training.evaluation import classification_metrics, language_model_metrics
from moorage.training.trainer import Progress, TrainingCancelled, TrainSpec, train

from tests.support import smollm2_tokenizer_folder, tiny_bert, tiny_llama

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

LABELS = {"cold": 0, "warm": 1}
WORDS = {"warm": "sunny bright summer happy glad", "cold": "rain storm winter sad dark"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("bert"))


def toy(n: int, seed: int) -> list[Example]:
    """Texts made of one label's words (shuffled, with a number): separable by any bag of words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ("warm", "cold")[i % 2]
        words = rng.sample(WORDS[label].split(), 3)
        rows.append(Example(text=f"{' '.join(words)} {rng.randrange(1000)}", label=label))
    return rows


def classify(**fields) -> TrainSpec:
    values = {"task": "classify", "base": "tiny@production", "dataset": "toy:1", "name": "toy", "batch_size": 8}
    return TrainSpec(**{**values, **fields})


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_classifier_learns_stops_early_and_keeps_only_the_best(bert, tmp_path, registry, settings):
    events: list[Progress] = []
    spec = classify(epochs=30, learning_rate=3e-3, eval_steps=4, early_stopping_patience=2)
    outcome = train(spec, bert, toy(48, 1), toy(16, 2), LABELS, tmp_path / "work", progress=events.append)

    accuracies = [h["accuracy"] for h in outcome.history]
    assert outcome.metric == "accuracy" and outcome.best_metric == max(accuracies) > 0.5  # above chance
    best = next(i for i, h in enumerate(outcome.history) if h["accuracy"] == outcome.best_metric)
    assert outcome.history[best]["step"] == outcome.best_step
    assert len(outcome.history) - 1 - best == 2  # stopped `patience` evaluations after the best
    for evaluation in outcome.history:  # every metric of each validation pass, per class too
        assert sum(map(sum, evaluation["confusion_matrix"])) == 16 and set(evaluation["per_class"]) == set(LABELS)
    assert events[-1].step < events[-1].total_steps  # early: before the 30 epochs ran out

    # the best model alone, as a folder the registry takes and the runtime's classify handler serves
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["best", "outcome.json", "training.json"]
    files = [p.name for p in outcome.best_dir.rglob("*")]
    assert "model.safetensors" in files and not [f for f in files if f.endswith(UNSAFE_SUFFIXES)]
    registry.register(outcome.best_dir, "toy", "classify")
    validation = toy(16, 2)
    served = Runtime(registry, settings.runtime).predict("toy", [e.text for e in validation])
    assert all(set(c.scores) == set(LABELS) for c in served)
    assert sum(c.label == e.label for c, e in zip(served, validation)) > len(validation) / 2
    assert outcome.hyperparameters["learning_rate"] == 3e-3 and outcome.hyperparameters["seed"] == 0

    # progress: every step in order, the last validation metrics once there are some, an ETA
    steps = [e.step for e in events if e.phase == "training"]
    assert steps == sorted(steps) and set(range(1, events[-1].step + 1)) <= set(steps)
    assert events[-1].metrics["accuracy"] == outcome.history[-1]["accuracy"]
    assert all(e.loss is not None for e in events[1:]) and events[-1].eta_s is not None
    assert any(e.phase == "evaluating" for e in events)

    # killed after an evaluation that did not improve, and resumed: early stopping's patience count is
    # restored with the checkpoint, so it stops where the whole run stopped (not one patience later)
    kill_at = outcome.history[best + 1]["step"] + 1

    def kill(event: Progress) -> None:
        if event.step == kill_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(spec, bert, toy(48, 1), toy(16, 2), LABELS, tmp_path / "killed", progress=kill)
    resumed = train(spec, bert, toy(48, 1), toy(16, 2), LABELS, tmp_path / "killed")
    assert resumed.resumed_from_step == kill_at - 1
    assert resumed.history == outcome.history and resumed.best_step == outcome.best_step

    # started again on the finished work dir: the same outcome, nothing trained again
    again = train(spec, bert, toy(48, 1), toy(16, 2), LABELS, tmp_path / "work", progress=events.append)
    assert again == outcome


RESUMABLE = {"epochs": 2, "learning_rate": 3e-3, "eval_steps": 3, "metric": "loss", "early_stopping_patience": None}
TOTAL_STEPS = 10  # 40 rows / 8 a batch * 2 epochs; checkpoints at steps 3, 6, 9 and 10


@pytest.fixture(scope="module")
def uninterrupted(bert, tmp_path_factory):
    """The run a resumed one must end like."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(classify(**RESUMABLE), bert, *resumable_data(), tmp_path_factory.mktemp("whole"))
    finally:
        torch.set_num_threads(threads)


def resumable_data():
    return toy(40, 3), toy(8, 4), LABELS


def assert_same_end(resumed, whole, why) -> None:
    assert resumed.best_step == whole.best_step and resumed.history == whole.history, why
    a, b = weights(whole.best_dir), weights(resumed.best_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a), why


def test_killed_at_a_random_step_resumes_to_the_same_weights(bert, uninterrupted, tmp_path):
    kill_at = random.randrange(4, TOTAL_STEPS + 1)  # past the first checkpoint, up to the last step

    class Killed(Exception):
        pass

    def kill(event: Progress) -> None:
        if event.step == kill_at:
            raise Killed

    with pytest.raises(Killed):
        train(classify(**RESUMABLE), bert, *resumable_data(), tmp_path, progress=kill)
    resumed = train(classify(**RESUMABLE), bert, *resumable_data(), tmp_path)

    assert resumed.resumed_from_step is not None and 3 <= resumed.resumed_from_step <= kill_at, kill_at
    assert_same_end(resumed, uninterrupted, f"killed at step {kill_at}")


def test_a_checkpoint_half_written_by_a_kill_is_passed_over(bert, uninterrupted, tmp_path):
    """A kill during a checkpoint's save leaves it without its trainer state (written last): the
    resume takes the one before, and still ends where an uninterrupted run ends."""
    seen: list[int] = []
    with pytest.raises(TrainingCancelled):
        train(
            classify(**RESUMABLE),
            bert,
            *resumable_data(),
            tmp_path,
            progress=lambda e: seen.append(e.step),
            should_stop=lambda: 5 in seen,
        )
    half = tmp_path / "checkpoints" / "checkpoint-6"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 64)
    (half / "trainer_state.json").write_text('{"global_st')
    resumed = train(classify(**RESUMABLE), bert, *resumable_data(), tmp_path)
    assert resumed.resumed_from_step == 3
    assert_same_end(resumed, uninterrupted, "resumed past a half-written checkpoint")


def test_a_cancel_stops_within_one_step_and_keeps_the_checkpoints(bert, tmp_path):
    seen: list[int] = []
    spec = classify(epochs=3, eval_steps=2)  # max_length 256: past the tiny BERT's 128 positions
    long_text = Example(text=" ".join(["sunny"] * 300), label="warm")  # cut to the model's positions
    data = ([*toy(31, 5), long_text], toy(8, 6), LABELS)
    with pytest.raises(TrainingCancelled) as cancelled:
        train(spec, bert, *data, tmp_path, progress=lambda e: seen.append(e.step), should_stop=lambda: 3 in seen)
    assert cancelled.value.code == "training_cancelled"
    assert max(seen) == 3  # asked after step 3: no fourth step
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert not (tmp_path / "best").exists()

    # the work dir belongs to this training: another spec is refused before anything runs
    with pytest.raises(Conflict):
        train(classify(epochs=3, eval_steps=2, seed=1), bert, *data, tmp_path)

    # resumed, and cancelled while it evaluates step 4: that evaluation stops too, and saves nothing
    events: list[Progress] = []

    def evaluating_step_4() -> bool:
        return any(e.phase == "evaluating" and e.step == 4 for e in events)

    with pytest.raises(TrainingCancelled):
        train(spec, bert, *data, tmp_path, progress=events.append, should_stop=evaluating_step_4)
    assert max(e.step for e in events) == 4 and events[-1].phase == "evaluating"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-2"]


CHAT = [
    (
        {"role": "user", "content": "what is the weather like"},
        {"role": "assistant", "content": "sunny and warm today"},
    ),
    (
        {"role": "system", "content": "answer briefly"},
        {"role": "user", "content": "name a cold season"},
        {"role": "assistant", "content": "winter"},
    ),
]


def chat(n: int) -> list[Example]:
    rows = []
    for i in range(n):
        messages = CHAT[i % len(CHAT)]
        rows.append(Example(text="\n".join(m["content"] for m in messages), messages=messages))
    return rows


def test_lora_on_chat_data_gives_a_merged_model_and_its_adapter(tmp_path):
    base = tiny_llama(tmp_path / "base")
    spec = TrainSpec(
        task="generate",
        base="tiny@production",
        dataset="chat:1",
        name="tiny-chat",
        method="lora",
        epochs=2,
        batch_size=4,
        learning_rate=5e-2,
        lora_dropout=0.0,
    )
    outcome = train(spec, base, chat(8), chat(4), {}, tmp_path / "work")

    assert outcome.metric == "loss" and outcome.best_metric == min(h["loss"] for h in outcome.history)
    for h in outcome.history:
        assert h["perplexity"] == pytest.approx(math.exp(h["loss"]))
    assert outcome.adapter_dir == outcome.best_dir / "adapter"
    assert (outcome.adapter_dir / "adapter_model.safetensors").is_file()
    assert json.loads((outcome.adapter_dir / "adapter_config.json").read_text())["r"] == spec.lora_r
    files = [p.name for p in outcome.best_dir.rglob("*")]
    assert not [f for f in files if f.endswith(UNSAFE_SUFFIXES)]

    before, after = weights(base), weights(outcome.best_dir)
    assert before.keys() == after.keys()  # merged: a plain model, no lora_ tensors
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed)
    assert outcome.hyperparameters["lora"]["r"] == spec.lora_r


@pytest.mark.parametrize("tokenizer", ["minilm", "smollm2"])
def test_chat_loss_is_on_the_assistant_turns(tokenizer):
    """With a chat template (SmolLM2's) or without one (the plain role: content rendering)."""
    import transformers

    from moorage.demo.assets import minilm_folder
    from moorage.training.encoding import NOT_LEARNED, encode_generate

    folder = smollm2_tokenizer_folder() if tokenizer == "smollm2" else minilm_folder()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    (row,) = encode_generate(tok, [chat(2)[1]], max_length=256)
    learned = tok.decode([t for t in row["labels"] if t != NOT_LEARNED], skip_special_tokens=True)
    assert learned.strip().lower() == "winter"
    assert len(row["labels"]) == len(row["input_ids"])


def test_full_fine_tune_on_plain_text(tmp_path):
    base = tiny_llama(tmp_path / "base")
    texts = [Example(text=f"the weather is {w} today") for w in ("sunny", "cold", "warm", "grey", "wet", "dry")]
    spec = TrainSpec(task="generate", base="b", dataset="text:1", name="n", epochs=1, batch_size=2, learning_rate=1e-2)
    outcome = train(spec, base, texts, texts[:2], {}, tmp_path / "work")
    assert outcome.adapter_dir is None and outcome.history[-1]["step"] == 3
    before, after = weights(base), weights(outcome.best_dir)
    assert before.keys() == after.keys()
    assert sum(not torch.equal(before[name], after[name]) for name in before) > len(before) / 2  # all layers train


def test_a_base_whose_weights_do_not_fit_is_refused(bert, tmp_path):
    """Weights missing from the base would be initialised at random: refused, not trained from noise."""
    import shutil

    from safetensors.torch import save_file

    from moorage.errors import BadRequest

    partial = shutil.copytree(bert, tmp_path / "partial")
    save_file({k: v for k, v in weights(bert).items() if ".encoder." not in f".{k}"}, partial / "model.safetensors")
    with pytest.raises(BadRequest) as refused:
        train(classify(), partial, toy(8, 1), toy(4, 2), LABELS, tmp_path / "work")
    assert refused.value.code == "base_weights_missing" and "encoder" in refused.value.message
    assert not (tmp_path / "work" / "checkpoints").exists()


def test_spec_fits_the_task():
    with pytest.raises(ValueError, match="lora"):
        classify(method="lora")
    with pytest.raises(ValueError, match="accuracy, macro_f1, loss"):
        classify(metric="f1")
    with pytest.raises(ValueError, match="perplexity"):
        TrainSpec(task="generate", base="b", dataset="d", name="n", metric="accuracy")


def test_classification_metrics():
    truth = ["a", "a", "b", "c", "c", "c"]
    predicted = ["a", "b", "b", "c", "c", "a"]
    metrics = classification_metrics(truth, predicted, ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]  # rows: true, columns: predicted
    assert metrics["per_class"]["c"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": 0.8, "support": 3}
    f1s = [metrics["per_class"][label]["f1"] for label in "abc"]
    assert metrics["macro_f1"] == pytest.approx(sum(f1s) / 3)
    assert language_model_metrics(2.0) == {"loss": 2.0, "perplexity": pytest.approx(math.exp(2.0))}
