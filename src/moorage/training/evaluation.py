"""Metrics of a trained model on held-out data: scikit-learn's for classifiers, loss and perplexity
for language models. The trainer reports them on the validation split at every evaluation; the
pipeline reports the same ones on the test split, through the runtime."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..errors import require


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (rows: the
    true label, columns: the predicted one, both in the order of `labels`)."""
    metrics = require("sklearn.metrics", "training")
    labels = list(labels)
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    per_class = {
        label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for label, p, r, f, s in zip(labels, precision, recall, f1, support)
    }
    return {
        "accuracy": float(metrics.accuracy_score(y_true, y_pred)),
        "macro_f1": float(metrics.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": per_class,
        "confusion_matrix": metrics.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "labels": labels,
    }


def language_model_metrics(mean_loss: float) -> dict[str, float]:
    """The mean token cross-entropy and its perplexity (infinite when the loss overflows exp)."""
    try:
        perplexity = math.exp(mean_loss)
    except OverflowError:
        perplexity = math.inf
    return {"loss": float(mean_loss), "perplexity": perplexity}
