"""Fine-tuning with transformers' `Trainer`: a classification head on an encoder (full fine-tune), or a
causal LM on chat or plain text (full fine-tune or a LoRA adapter, merged for serving).

Evaluation on the validation split at every epoch end (or every `eval_steps`), with a checkpoint at
each evaluation point, early stopping on the chosen metric, and only the best checkpoint kept at the
end as a clean `save_pretrained` folder (safetensors and the tokenizer, no optimizer or RNG state).
A job killed at any step and started again with the same work dir resumes from its last checkpoint
and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import MoorageError

if TYPE_CHECKING:
    from .datasets import Example


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
    lr_scheduler: str = "linear"
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
    def _lora_generates(self) -> TrainSpec:
        if self.method == "lora" and self.task != "generate":
            raise ValueError("method 'lora' is for task 'generate'; a classifier is fine-tuned in full")
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
    raise NotImplementedError
