"""The evaluation report of a derived model against its parent, in one run.

Both folders are loaded by the runtime's handler for their framework (what serves them once
registered), one after the other, and measured the same way:
- quality: embeddings, the cosine of each held-out text's embedding to the parent's (mean, min) and
  the share of texts whose nearest other text is the same under both; classifiers, accuracy and
  macro-F1 of both on the test split and their differences, overall and per class; language models,
  the perplexity of both on held-out texts and the share of greedy tokens that agree;
- speed: texts/s at batch 1 and 32 (tokenising included, a fixed number of batches after one
  warm-up batch), load time, file size and the process's resident memory added by loading.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config import RuntimeSettings
from ...errors import require
from ...registry.manifest import Manifest, detect_framework, list_model_files
from ...runtime.base import TaskHandler
from ...runtime.loader import handler_for
from ..evaluation import classification_metrics

SPEED_BATCHES = {1: 32, 32: 4}  # batch size -> batches timed (after one warm-up batch)
GENERATE_BATCHES = {1: 2, 32: 1}  # language models: greedy generations of GENERATED_TOKENS each
GENERATED_TOKENS = 16
LM_TEXTS, LM_TOKENS = 64, 256  # perplexity and token agreement: on this many texts, this many tokens each
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx_data", ".data")


@dataclass
class HeldOut:
    """What the two models are compared on: texts (embed, generate) or labelled rows (classify)."""

    texts: list[str]
    labels: list[str] | None = None  # classify: the true label of each text
    label_names: list[str] | None = None  # classify: every label, in class-id order
    source: dict[str, Any] | None = None  # which dataset, split and digest (or which file)


@dataclass
class Loaded:
    handler: TaskHandler
    framework: str
    load_seconds: float
    rss_delta_bytes: int


Step = Callable[[str], None]


def load(folder: Path, task: str, settings: RuntimeSettings, name: str) -> Loaded:
    """Load `folder` with the handler the registry would pick for it, timing it and the memory it took."""
    framework = detect_framework(folder, task)
    handler = handler_for(task, framework)
    gc.collect()
    before = resident_bytes()
    started = time.perf_counter()
    handler.load(folder, Manifest(name=name, version=0, task=task, framework=framework, files=[]), settings)
    elapsed = time.perf_counter() - started
    return Loaded(handler, framework, elapsed, max(0, resident_bytes() - before))


def measure(
    task: str,
    parent_dir: Path,
    derived_dir: Path,
    held_out: HeldOut,
    settings: RuntimeSettings,
    *,
    speed_batches: dict[int, int] | None = None,
    step: Step | None = None,
) -> dict[str, Any]:
    """The whole report (JSON-ready) of `derived_dir` against `parent_dir`."""
    say = step or (lambda what: None)
    _preload(task)
    say("loading the parent")
    reference = settings.model_copy(update={"dtype": "float32"})
    parent = load(parent_dir, task, reference, "parent")
    say("loading the derived model")
    derived = load(derived_dir, task, settings, "derived")
    say("measuring quality")
    quality = compare_quality(task, parent.handler, derived.handler, held_out)
    served_dtype = served_precision(settings)
    if served_dtype != "fp32":  # the parent is served in another precision: its speed is measured as served
        del parent
        gc.collect()
        say(f"loading the parent as served ({served_dtype})")
        parent = load(parent_dir, task, settings, "parent")
    speed: dict[str, Any] = {}
    batches = speed_batches or (GENERATE_BATCHES if task == "generate" else SPEED_BATCHES)
    measure_speed = generation_throughput if task == "generate" else throughput
    for role, loaded in (("parent", parent), ("derived", derived)):
        say(f"measuring the {role}'s speed")
        speed[role] = measure_speed(loaded.handler, held_out.texts, batches)
    speedups = {f"batch_{b}": _ratio(speed["derived"][f"batch_{b}"], speed["parent"][f"batch_{b}"]) for b in batches}
    return {
        "task": task,
        "held_out": {"rows": len(held_out.texts), **(held_out.source or {})},
        "quality": quality,
        "speed": {"texts_per_s" if task != "generate" else "tokens_per_s": speed, "speedup": speedups},
        "footprint": {"parent": _footprint(parent, parent_dir), "derived": _footprint(derived, derived_dir)},
        "size_ratio": _ratio(weights_bytes(derived_dir), weights_bytes(parent_dir)),
        "runtime": {"num_threads": settings.num_threads, "device": settings.device, "dtype": settings.dtype},
        "quality_reference": "the parent in float32",
        "speed_reference": f"the parent as served ({served_dtype})",
    }


# ---- quality ---------------------------------------------------------------------------------------
def compare_quality(task: str, parent: TaskHandler, derived: TaskHandler, held_out: HeldOut) -> dict[str, Any]:
    if task == "embed":
        return embedding_quality(run_all(parent, held_out.texts), run_all(derived, held_out.texts))
    if task == "classify":
        if held_out.labels is None or held_out.label_names is None:
            raise TypeError("a classifier is compared on labelled rows")
        return classifier_quality(
            [c.label for c in run_all(parent, held_out.texts)],
            [c.label for c in run_all(derived, held_out.texts)],
            held_out.labels,
            held_out.label_names,
        )
    return language_model_quality(parent, derived, held_out.texts)


def embedding_quality(parent: Sequence[Any], derived: Sequence[Any]) -> dict[str, Any]:
    """Cosine of each derived embedding to the parent's (mean, min) and top-1 nearest-neighbour agreement."""
    np = require("numpy", "ml")
    a = _unit(np.asarray(parent, dtype=np.float64))
    b = _unit(np.asarray(derived, dtype=np.float64))
    cosines = (a * b).sum(axis=1)
    agreement = 1.0
    if len(a) > 1:
        agreement = float((_nearest(a) == _nearest(b)).mean())
    return {
        "mean_cosine": float(cosines.mean()),
        "min_cosine": float(cosines.min()),
        "nn_agreement": agreement,
        "rows": len(a),
    }


def classifier_quality(
    parent: Sequence[str], derived: Sequence[str], truth: Sequence[str], labels: Sequence[str]
) -> dict[str, Any]:
    """Both models' test metrics and the derived one's differences, overall and per class."""
    before = classification_metrics(truth, parent, labels)
    after = classification_metrics(truth, derived, labels)
    per_class = {
        label: {
            "parent_f1": before["per_class"][label]["f1"],
            "derived_f1": after["per_class"][label]["f1"],
            "f1_delta": after["per_class"][label]["f1"] - before["per_class"][label]["f1"],
            "parent_recall": before["per_class"][label]["recall"],
            "derived_recall": after["per_class"][label]["recall"],
            "support": after["per_class"][label]["support"],
        }
        for label in labels
    }
    return {
        "parent_accuracy": before["accuracy"],
        "derived_accuracy": after["accuracy"],
        "accuracy_delta": after["accuracy"] - before["accuracy"],
        "accuracy_loss": max(0.0, before["accuracy"] - after["accuracy"]),
        "parent_macro_f1": before["macro_f1"],
        "derived_macro_f1": after["macro_f1"],
        "macro_f1_delta": after["macro_f1"] - before["macro_f1"],
        "agreement": sum(p == d for p, d in zip(parent, derived)) / max(1, len(parent)),
        "per_class": per_class,
        "derived_metrics": after,
    }


def language_model_quality(parent: TaskHandler, derived: TaskHandler, texts: Sequence[str]) -> dict[str, Any]:
    """Perplexity of both on the texts and greedy-token agreement: the share of the parent's greedy
    next tokens (at every position of every text) the derived model also ranks first."""
    torch = require("torch", "ml")
    total = {"parent": 0.0, "derived": 0.0}
    agree = count = 0
    for text in texts[:LM_TEXTS]:
        ids = parent.tokenizer(text, return_tensors="pt")["input_ids"][:, :LM_TOKENS]  # type: ignore[attr-defined]
        if ids.shape[1] < 2:
            continue
        with torch.inference_mode():
            logits = {
                role: h.model(input_ids=ids.to(h.model.device)).logits[0, :-1].float().cpu()  # type: ignore[attr-defined]
                for role, h in (("parent", parent), ("derived", derived))
            }
        target = ids[0, 1:]
        for role, values in logits.items():
            total[role] += float(torch.nn.functional.cross_entropy(values, target, reduction="sum"))
        agree += int((logits["parent"].argmax(-1) == logits["derived"].argmax(-1)).sum())
        count += int(target.numel())
    if count == 0:
        raise TypeError("no held-out text has two tokens to score")
    import math

    perplexity = {role: math.exp(min(700.0, value / count)) for role, value in total.items()}
    return {
        "parent_perplexity": perplexity["parent"],
        "derived_perplexity": perplexity["derived"],
        "perplexity_delta": perplexity["derived"] - perplexity["parent"],
        "perplexity_ratio": perplexity["derived"] / perplexity["parent"],
        "greedy_token_agreement": agree / count,
        "tokens": count,
    }


def run_all(handler: TaskHandler, texts: Sequence[str], batch_size: int = 32) -> list[Any]:
    out: list[Any] = []
    for start in range(0, len(texts), batch_size):
        out += handler(list(texts[start : start + batch_size]))
    return out


# ---- speed and footprint ----------------------------------------------------------------------------
def throughput(handler: TaskHandler, texts: Sequence[str], batches: dict[int, int]) -> dict[str, float]:
    """Texts per second at each batch size over a fixed number of batches (one warm-up batch first)."""
    out = {}
    for size, count in batches.items():
        chunks = [[texts[(i * size + j) % len(texts)] for j in range(size)] for i in range(count + 1)]
        handler(chunks[0])
        started = time.perf_counter()
        for chunk in chunks[1:]:
            handler(chunk)
        out[f"batch_{size}"] = size * count / (time.perf_counter() - started)
    return out


def generation_throughput(handler: TaskHandler, texts: Sequence[str], batches: dict[int, int]) -> dict[str, float]:
    """Generated tokens per second at each batch size (greedy, `GENERATED_TOKENS` new tokens from the
    first words of held-out texts), through the same step loop the server's engine runs."""
    from ...runtime.base import GenerateInput, GenerationParams

    params = GenerationParams(max_new_tokens=GENERATED_TOKENS)
    prompts = [" ".join(t.split()[:24]) or "Hello" for t in texts]
    out = {}
    for size, count in batches.items():
        chunks = [
            [GenerateInput(prompt=prompts[(i * size + j) % len(prompts)], params=params) for j in range(size)]
            for i in range(count + 1)
        ]
        handler(chunks[0])
        tokens, started = 0, time.perf_counter()
        for chunk in chunks[1:]:
            tokens += sum(g.completion_tokens for g in handler(chunk))
        out[f"batch_{size}"] = tokens / (time.perf_counter() - started)
    return out


def weights_bytes(folder: Path) -> int:
    """Bytes of the weight files (safetensors, ONNX graphs and their external data)."""
    return sum((folder / p).stat().st_size for p in list_model_files(folder) if p.name.endswith(WEIGHT_SUFFIXES))


def folder_bytes(folder: Path) -> int:
    return sum((folder / p).stat().st_size for p in list_model_files(folder))


def resident_bytes() -> int:
    """This process's resident memory (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


def _footprint(loaded: Loaded, folder: Path) -> dict[str, Any]:
    return {
        "framework": loaded.framework,
        "precision": getattr(loaded.handler, "precision", None) or _torch_precision(loaded.handler),
        "load_s": loaded.load_seconds,
        "rss_delta_bytes": loaded.rss_delta_bytes,
        "memory_bytes": int(getattr(loaded.handler, "memory_bytes", 0) or 0),
        "weights_bytes": weights_bytes(folder),
        "folder_bytes": folder_bytes(folder),
    }


def served_precision(settings: RuntimeSettings) -> str:
    """The precision torch serves the parent in under `settings` (``auto``: bf16 where it is native)."""
    from ...runtime.hf import resolve_dtype

    dtype = resolve_dtype(require("torch", "ml"), settings)
    return _PRECISIONS.get(str(dtype), str(dtype))


_PRECISIONS = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def _torch_precision(handler: TaskHandler) -> str | None:
    model = getattr(handler, "model", None)
    dtype = getattr(model, "dtype", None)
    return _PRECISIONS.get(str(dtype), str(dtype) if dtype is not None else None)


def _preload(task: str) -> None:
    """Import both frameworks' libraries before anything is measured: the first load would pay for them."""
    require("torch", "ml")
    if task != "generate":
        require("transformers", "ml")
        try:
            require("onnxruntime", "onnx")
        except Exception:  # not installed: an ONNX model cannot be loaded anyway, and says why
            pass


def _unit(x):
    np = require("numpy", "ml")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1, norms)


def _nearest(x):
    np = require("numpy", "ml")
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return sims.argmax(axis=1)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")
