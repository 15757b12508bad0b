"""Fine-tuning with transformers' `Trainer`: a classification head on an encoder (full fine-tune), or a
causal LM on chat or plain text (full fine-tune or a LoRA adapter, merged for serving).

Evaluation on the validation split at every epoch end (or every `eval_steps`), with a checkpoint at
each evaluation point, early stopping on the chosen metric, and only the best checkpoint kept at the
end as a clean `save_pretrained` folder (safetensors and the tokenizer, no optimizer or RNG state).
A job killed at any step and started again with the same work dir resumes from its last checkpoint
and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import BadRequest, Conflict, MoorageError, require
from . import encoding
from .evaluation import classification_metrics, language_model_metrics

if TYPE_CHECKING:
    from .datasets import Example


# The validation metrics each task reports (and the best checkpoint and early stopping can go by).
METRICS = {"classify": ("accuracy", "macro_f1", "loss"), "generate": ("loss", "perplexity")}


class TrainSpec(BaseModel):
    """What to train, on what, and how. Every field is a hyper-parameter recorded in the lineage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Literal["classify", "generate"]
    base: str = Field(description="registry ref of the base model, e.g. minilm@production")
    dataset: str = Field(description="dataset ref: NAME (latest) or NAME:VERSION")
    name: str = Field(description="model name the result is registered under")
    method: Literal["full", "lora"] = "full"
    epochs: float = Field(3, gt=0)
    learning_rate: float = Field(5e-5, gt=0)
    batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(256, ge=8)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
    ] = "linear"
    eval_steps: int | None = Field(None, ge=1, description="None: evaluate and checkpoint at each epoch end")
    metric: str | None = Field(None, description="best/early-stopping metric; default accuracy or loss")
    early_stopping_patience: int | None = Field(2, ge=1)
    seed: int = 0
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    train_split: str = "train"
    validation_split: str = "validation"
    test_split: str = "test"

    @model_validator(mode="after")
    def _fits_the_task(self) -> TrainSpec:
        if self.method == "lora" and self.task != "generate":
            raise ValueError("method 'lora' is for task 'generate'; a classifier is fine-tuned in full")
        if self.metric is not None and self.metric not in METRICS[self.task]:
            raise ValueError(f"metric {self.metric!r}: a {self.task} training reports {', '.join(METRICS[self.task])}")
        return self

    @property
    def best_metric(self) -> str:
        """The metric the best checkpoint and early stopping go by."""
        return self.metric or ("accuracy" if self.task == "classify" else "loss")

    @property
    def greater_is_better(self) -> bool:
        return self.best_metric not in ("loss", "perplexity")


@dataclass
class Progress:
    """One report of a running training, at least every logging step."""

    phase: str  # "training" | "evaluating" | "testing" | "publishing"
    step: int
    total_steps: int
    epoch: float
    loss: float | None
    metrics: dict[str, float] = field(default_factory=dict)  # the last validation metrics
    eta_s: float | None = None


@dataclass
class TrainOutcome:
    best_dir: Path  # a complete model folder the registry can register (merged for LoRA)
    adapter_dir: Path | None  # LoRA: the adapter alone (inside best_dir, as adapter/)
    metric: str
    best_metric: float
    best_step: int
    history: list[dict[str, Any]]  # every validation evaluation
    hyperparameters: dict[str, Any]  # every effective Trainer argument, nothing truncated
    resumed_from_step: int | None


class TrainingCancelled(MoorageError):
    """The training was asked to stop; its checkpoints are kept, so the same work dir resumes it."""

    status = 409
    code = "training_cancelled"
    type = "invalid_request_error"


CHECKPOINTS = "checkpoints"
BEST = "best"
ADAPTER = "adapter"
OUTCOME = "outcome.json"
FINGERPRINT = "training.json"


def train(
    spec: TrainSpec,
    base_dir: Path,
    train: Sequence[Example],
    validation: Sequence[Example],
    label_map: dict[str, int],
    work_dir: Path,
    *,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainOutcome:
    """Fine-tune the model in `base_dir` on `train`, evaluating on `validation`; checkpoints go to
    `work_dir`, and a work dir holding checkpoints of the same spec resumes from the last one.
    `should_stop` is asked at every step: True stops within that step (TrainingCancelled)."""
    tf = require("transformers", "training")
    _check_data(spec, train, validation, label_map)
    work_dir.mkdir(parents=True, exist_ok=True)
    _claim_work_dir(work_dir, _fingerprint(spec, base_dir, train, validation, label_map))
    if (work_dir / OUTCOME).is_file():  # finished before (the caller died after training): the same result
        shutil.rmtree(work_dir / CHECKPOINTS, ignore_errors=True)
        return _read_outcome(work_dir)
    if should_stop is not None and should_stop():
        raise TrainingCancelled("training cancelled before its first step")

    tf.set_seed(spec.seed)  # the new head's (or adapter's) initial weights come from the seed
    model, tokenizer = _load_model(spec, base_dir, label_map)
    max_length = _max_length(spec, model)
    args = _training_arguments(spec, work_dir / CHECKPOINTS)
    trainer = _make_trainer(
        model=model,
        args=args,
        train_dataset=encoding.encode(spec.task, tokenizer, train, label_map, max_length),
        eval_dataset=encoding.encode(spec.task, tokenizer, validation, label_map, max_length),
        processing_class=tokenizer,
        data_collator=encoding.collator(spec.task, tokenizer),
        compute_metrics=_classify_metrics(model.config.id2label) if spec.task == "classify" else None,
    )
    trainer.remove_callback(tf.PrinterCallback)  # progress goes to the caller, not to stdout
    if spec.early_stopping_patience is not None:
        trainer.add_callback(tf.EarlyStoppingCallback(early_stopping_patience=spec.early_stopping_patience))
    trainer.add_callback(_reporter(_Watch(progress, should_stop)))
    resume = _last_complete_checkpoint(work_dir / CHECKPOINTS)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return _finish(spec, trainer, tokenizer, work_dir, _checkpoint_step(resume) if resume else None)


def _check_data(
    spec: TrainSpec, train: Sequence[Example], validation: Sequence[Example], label_map: dict[str, int]
) -> None:
    if not train:
        raise BadRequest(f"the {spec.train_split!r} split is empty: nothing to train on", code="split_empty")
    if not validation:
        raise BadRequest(
            f"the {spec.validation_split!r} split is empty: the best checkpoint is chosen on it", code="split_empty"
        )
    if spec.task != "classify":
        return
    if len(label_map) < 2:
        raise BadRequest("a classifier needs at least two labels in the label map", code="single_class")
    unknown = sorted({e.label for e in (*train, *validation) if e.label not in label_map}, key=str)
    if unknown:
        raise BadRequest(f"labels not in the label map: {', '.join(map(str, unknown[:5]))}", code="label_unknown")


def _fingerprint(
    spec: TrainSpec, base_dir: Path, train: Sequence[Example], validation: Sequence[Example], label_map: dict[str, int]
) -> str:
    """What a resumed run must share with the run that wrote the checkpoints: the spec, the base model's
    weights and config (by size and name: hashing gigabytes at every start would be slow) and the data."""
    digest = hashlib.sha256(spec.model_dump_json().encode())
    for path in sorted(p for p in base_dir.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(base_dir)}:{path.stat().st_size}\n".encode())
    for split in (train, validation):
        for e in split:
            digest.update(json.dumps([e.text, e.label, e.messages], sort_keys=True).encode())
        digest.update(b"\x00")
    digest.update(json.dumps(label_map, sort_keys=True).encode())
    return digest.hexdigest()


def _claim_work_dir(work_dir: Path, fingerprint: str) -> None:
    marker = work_dir / FINGERPRINT
    if marker.is_file():
        if json.loads(marker.read_text()).get("fingerprint") != fingerprint:
            raise Conflict(
                f"{work_dir} holds checkpoints of another training (a different spec, base model or data); "
                "use a new work dir for this one",
                code="work_dir_conflict",
            )
        return
    _write_json(marker, {"fingerprint": fingerprint})


def _load_model(spec: TrainSpec, base_dir: Path, label_map: dict[str, int]) -> tuple[Any, Any]:
    tf = require("transformers", "training")
    tokenizer = tf.AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    if tokenizer.pad_token is None:  # decoder tokenizers often have none; batches need one
        tokenizer.pad_token = tokenizer.eos_token
    common = {"local_files_only": True, "use_safetensors": True, "pad_token_id": tokenizer.pad_token_id}
    if spec.task == "classify":
        id2label = {i: label for label, i in sorted(label_map.items(), key=lambda kv: kv[1])}
        model = _from_pretrained(
            tf.AutoModelForSequenceClassification,
            base_dir,
            num_labels=len(label_map),
            id2label=id2label,
            label2id=dict(label_map),
            **common,
        )
        return model, tokenizer
    model = _from_pretrained(tf.AutoModelForCausalLM, base_dir, **common)
    if spec.method == "lora":
        model = _with_lora(spec, model)
    return model, tokenizer


def _from_pretrained(auto: Any, base_dir: Path, **kwargs: Any) -> Any:
    """The model with the base's weights, or an error if some are not in the folder: transformers would
    initialise them at random and print a table, and the training would start from noise. Only a new
    classification head (outside the base model) may be missing, and the pooler some encoders ship without."""
    tf = require("transformers", "training")
    verbosity = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()  # the load report: checked below instead of printed
    try:
        model, info = auto.from_pretrained(str(base_dir), output_loading_info=True, **kwargs)
    finally:
        tf.logging.set_verbosity(verbosity)
    prefix = f"{model.base_model_prefix}."
    head_only = auto is tf.AutoModelForSequenceClassification
    missing = [k for k in info["missing_keys"] if not head_only or (k.startswith(prefix) and ".pooler." not in k)]
    if missing:
        raise BadRequest(
            f"the base model's weights do not fit a {type(model).__name__}: {len(missing)} missing "
            f"({', '.join(sorted(missing)[:3])}, ...)",
            code="base_weights_missing",
        )
    return model


def _with_lora(spec: TrainSpec, model: Any) -> Any:
    peft = require("peft", "training")
    config = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=list(spec.lora_target_modules),
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:  # e.g. target modules the model does not have
        raise BadRequest(f"LoRA: {exc}", code="invalid_lora") from None


def _max_length(spec: TrainSpec, model: Any) -> int:
    """`max_length` cut to the positions the model has (longer inputs would not run)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    return min(spec.max_length, positions) if isinstance(positions, int) else spec.max_length


def _classify_metrics(id2label: dict[int, str]) -> Callable[[Any], dict[str, Any]]:
    """Every classification metric of a validation pass (per class and the confusion matrix too: they
    go to the history; the best checkpoint and early stopping read one number of them)."""
    labels = [id2label[i] for i in range(len(id2label))]

    def compute(prediction: Any) -> dict[str, Any]:
        predicted = [labels[i] for i in prediction.predictions.argmax(axis=-1)]
        truth = [labels[i] for i in prediction.label_ids]
        return classification_metrics(truth, predicted, labels)

    return compute


def _training_arguments(spec: TrainSpec, output_dir: Path) -> Any:
    tf, torch = require("transformers", "training"), require("torch", "training")
    strategy = "steps" if spec.eval_steps else "epoch"
    return tf.TrainingArguments(
        output_dir=str(output_dir),
        use_cpu=not torch.cuda.is_available(),
        seed=spec.seed,
        # the data order of epoch e comes from (data_seed, e) alone: a resumed run sees the same batches (with
        # torch's RandomSampler the order comes from the global RNG, and a resume diverges from step one)
        data_seed=spec.seed,
        accelerator_config={"use_seedable_sampler": True},
        num_train_epochs=spec.epochs,
        learning_rate=spec.learning_rate,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        weight_decay=spec.weight_decay,
        warmup_steps=spec.warmup_ratio,  # below 1: a share of the training steps
        lr_scheduler_type=spec.lr_scheduler,
        # every evaluation point is a checkpoint: the best one can be kept, and a kill loses at most one interval
        eval_strategy=strategy,
        save_strategy=strategy,
        eval_steps=spec.eval_steps,
        save_steps=spec.eval_steps or 500,
        load_best_model_at_end=True,
        metric_for_best_model=spec.best_metric,
        greater_is_better=spec.greater_is_better,
        save_total_limit=1,  # the best checkpoint and the last one (to resume from), nothing else
        restore_callback_states_from_checkpoint=True,  # early stopping's patience count survives a resume
        label_names=["labels"],  # a PEFT model's forward does not name them
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )


def _make_trainer(**kwargs: Any) -> Any:
    """transformers' Trainer, whose evaluations of a language model also report perplexity (so it can be
    the best metric too)."""
    tf = require("transformers", "training")

    base: Any = tf.Trainer

    class Trainer(base):
        def evaluation_loop(self, *args: Any, **kw: Any) -> Any:
            output = super().evaluation_loop(*args, **kw)
            prefix = kw.get("metric_key_prefix", "eval")
            if self.compute_metrics is None and f"{prefix}_loss" in output.metrics:
                lm = language_model_metrics(output.metrics[f"{prefix}_loss"])
                output.metrics[f"{prefix}_perplexity"] = lm["perplexity"]
            return output

    return Trainer(**kwargs)


class _Watch:
    """What the progress callback keeps between steps: the last loss and validation metrics, and when
    this run began (the ETA counts only the steps this run made, not those a resume skipped)."""

    def __init__(self, progress: Callable[[Progress], None] | None, should_stop: Callable[[], bool] | None) -> None:
        self.progress, self.should_stop = progress, should_stop
        self.loss: float | None = None
        self.metrics: dict[str, float] = {}
        self.started: tuple[float, int] | None = None  # (monotonic time, global step)

    def report(self, phase: str, state: Any) -> None:
        if self.progress is None:
            return
        eta = None
        if self.started is not None and state.global_step > self.started[1]:
            per_step = (time.monotonic() - self.started[0]) / (state.global_step - self.started[1])
            eta = per_step * max(0, state.max_steps - state.global_step)
        epoch = float(state.epoch or 0)
        self.progress(Progress(phase, state.global_step, state.max_steps, epoch, self.loss, self.metrics, eta))

    def stop_if_asked(self, state: Any) -> None:
        if self.should_stop is not None and self.should_stop():
            raise TrainingCancelled(
                f"training cancelled at step {state.global_step} of {state.max_steps}; "
                "its checkpoints are kept and the same work dir resumes it"
            )


def _reporter(watch: _Watch) -> Any:
    """A Trainer callback that reports progress at every step and evaluation, and stops within a step
    when asked."""
    tf = require("transformers", "training")
    base: Any = tf.TrainerCallback

    class Reporter(base):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            watch.started = (time.monotonic(), state.global_step)
            watch.report("training", state)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            watch.stop_if_asked(state)

        def on_substep_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            watch.stop_if_asked(state)  # between the micro-batches of one step (gradient accumulation)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            watch.stop_if_asked(state)

        def on_prediction_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            watch.stop_if_asked(state)  # an evaluation can take as long as many steps

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if control.should_evaluate:
                watch.report("evaluating", state)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:  # the training loss, logged at every step (an evaluation's is eval_loss)
                watch.loss = float(logs["loss"])
                watch.report("evaluating" if control.should_evaluate else "training", state)

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kw: Any) -> None:
            watch.metrics = _strip_prefix(metrics or {})
            watch.report("training", state)

    return Reporter()


TIMINGS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


def _strip_prefix(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar validation metrics under their own names (eval_accuracy -> accuracy), timings left out."""
    return {
        k.removeprefix("eval_"): float(v)
        for k, v in metrics.items()
        if k.startswith("eval_") and k not in TIMINGS and isinstance(v, int | float)
    }


def _validation(entry: dict[str, Any]) -> dict[str, Any]:
    """One evaluation of the history: its step and epoch and every metric (per class ones too)."""
    metrics = {k.removeprefix("eval_"): v for k, v in entry.items() if k.startswith("eval_") and k not in TIMINGS}
    return {"step": int(entry["step"]), "epoch": entry.get("epoch"), **metrics}


def _last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose trainer state was written (it is written last, so a kill during a save
    leaves a checkpoint without it); incomplete ones are removed."""
    if not folder.is_dir():
        return None
    for checkpoint in sorted(folder.glob("checkpoint-*"), key=_checkpoint_step, reverse=True):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
        except (OSError, ValueError):
            shutil.rmtree(checkpoint, ignore_errors=True)
            continue
        return checkpoint
    return None


def _checkpoint_step(checkpoint: Path) -> int:
    suffix = checkpoint.name.rpartition("-")[2]
    return int(suffix) if suffix.isdigit() else -1


def _finish(spec: TrainSpec, trainer: Any, tokenizer: Any, work_dir: Path, resumed_from: int | None) -> TrainOutcome:
    """Save the best model (loaded back by the Trainer) as a clean folder, record the outcome, and drop
    the checkpoints: optimizer and RNG state are for resuming, never for the registry."""
    state = trainer.state
    staging = work_dir / ".best-staging"
    shutil.rmtree(staging, ignore_errors=True)
    model = trainer.model
    if spec.method == "lora":
        model.save_pretrained(staging / ADAPTER, safe_serialization=True)
        model = model.merge_and_unload()  # served merged: one plain model folder, no peft at load time
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(work_dir / BEST, ignore_errors=True)
    staging.rename(work_dir / BEST)
    history = [_validation(entry) for entry in state.log_history if "eval_loss" in entry]
    hyperparameters = _json_safe(trainer.args.to_dict())
    if spec.method == "lora":
        peft_config = trainer.model.peft_config["default"] if hasattr(trainer.model, "peft_config") else None
        hyperparameters["lora"] = _json_safe(peft_config.to_dict()) if peft_config is not None else {}
    outcome = TrainOutcome(
        best_dir=work_dir / BEST,
        adapter_dir=work_dir / BEST / ADAPTER if spec.method == "lora" else None,
        metric=spec.best_metric,
        best_metric=float(state.best_metric),
        best_step=int(state.best_global_step),
        history=history,
        hyperparameters=hyperparameters,
        resumed_from_step=resumed_from,
    )
    record = {**asdict(outcome), "best_dir": BEST, "adapter_dir": f"{BEST}/{ADAPTER}" if outcome.adapter_dir else None}
    _write_json(work_dir / OUTCOME, record)
    shutil.rmtree(work_dir / CHECKPOINTS, ignore_errors=True)
    return outcome


def _read_outcome(work_dir: Path) -> TrainOutcome:
    record = json.loads((work_dir / OUTCOME).read_text())
    record["best_dir"] = work_dir / record["best_dir"]
    record["adapter_dir"] = work_dir / record["adapter_dir"] if record["adapter_dir"] else None
    return TrainOutcome(**record)


def _json_safe(value: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(value, default=str))


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """Written whole or not at all (a kill mid-write leaves the old file or none)."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(value, indent=2))
    os.replace(staging, path)


def _encode_generate(
    spec: TrainSpec, tokenizer: Any, examples: Sequence[Example], label_map: dict[str, int] | None = None
) -> list[dict[str, list[int]]]:
    """The name the pipeline imported first: `encoding.encode_generate` with the spec's max_length."""
    return encoding.encode_generate(tokenizer, examples, spec.max_length)
