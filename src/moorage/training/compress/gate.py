"""The quality gates a derived version must pass to be registered (``compression.*`` settings).

Each gate is one measure of the report against its threshold: embeddings, the mean and the lowest
cosine to the parent's; classifiers, the test accuracy lost; language models, the perplexity's rise;
every task, the speed-up at batch 32 in-process."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ...config import CompressionSettings


@dataclass(frozen=True)
class Gate:
    name: str
    value: float
    threshold: float
    passed: bool
    rule: str  # ">=" or "<="

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.name} {self.value:.4g} (needs {self.rule} {self.threshold:g})"


def check(task: str, report: dict[str, Any], settings: CompressionSettings) -> list[Gate]:
    """The gates of `task` measured on `report`, in the order they are reported."""
    quality, gates = report["quality"], []
    if task == "embed":
        gates += [
            _at_least("mean_cosine", quality["mean_cosine"], settings.min_mean_cosine),
            _at_least("min_cosine", quality["min_cosine"], settings.min_min_cosine),
        ]
    elif task == "classify":
        gates.append(_at_most("accuracy_loss", quality["accuracy_loss"], settings.max_accuracy_loss))
    elif task == "generate":
        gates.append(_at_most("perplexity_ratio", quality["perplexity_ratio"], settings.max_perplexity_ratio))
    gates.append(_at_least("speedup_batch_32", report["speed"]["speedup"]["batch_32"], settings.min_speedup))
    return gates


def failing(gates: list[Gate]) -> list[Gate]:
    return [g for g in gates if not g.passed]


def reason(gates: list[Gate]) -> str:
    """One line: every failing measure with its value and threshold (empty when all pass)."""
    return "; ".join(g.describe() for g in failing(gates))


def _at_least(name: str, value: float, threshold: float) -> Gate:
    return Gate(name, float(value), float(threshold), float(value) >= threshold, ">=")


def _at_most(name: str, value: float, threshold: float) -> Gate:
    return Gate(name, float(value), float(threshold), float(value) <= threshold, "<=")
