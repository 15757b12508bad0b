"""Task handlers over ONNX Runtime (extra ``[onnx]``): embed and classify models exported to ONNX.

A derived ONNX folder holds ``model.onnx`` (its graph takes int64 ``[batch, seq]`` token inputs),
``onnx.json`` (task, precision, the input names, the output name, the token limit), the parent's
``config.json`` and its tokenizer files. An embedding graph returns pooled (and, when the parent
normalises, L2-normalised) embeddings, so the handler only tokenises and runs it; a classifier
graph returns logits. Outputs have the types and shapes of the torch handlers in `hf.py`, so every
edge serves either framework unchanged.

Tokenisation (`preprocess`) and the session run (`predict`) are separate stages: the batcher
tokenises the next batch while ONNX Runtime, which releases the GIL, runs the current one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..config import RuntimeSettings
from ..errors import ModelLoadFailed, require
from ..registry.manifest import Manifest
from .base import Classification, TaskHandler

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
META_FILE = "onnx.json"


def require_onnxruntime():
    """onnxruntime, or a one-line error naming the pip command that installs it."""
    return require("onnxruntime", "onnx")


def session_options(ort, settings: RuntimeSettings):
    """Intra-op threads from the runtime settings (else every CPU this process may use), one
    inter-op thread (BERT-like graphs are one chain of ops: parallel branches gain nothing), every
    graph optimisation on, and worker threads that sleep instead of spinning between runs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.num_threads or len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads take the cores the batcher's tokeniser thread and the event loop need: MiniLM
    # at batch 32 on 2 shared cores ran at 100 sentences/s without spinning and 59 with it while the
    # next batch was tokenised, and 98 vs 69 with nothing else in the process.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def providers(ort, device: str) -> list[Any]:
    """CUDA first when runtime.device names a CUDA device and this onnxruntime build has it, else CPU."""
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" in ort.get_available_providers():
            device_id = int(device.partition(":")[2] or 0)
            return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        log.warning("runtime.device is %s but onnxruntime has no CUDA provider: ONNX models run on the CPU", device)
    return ["CPUExecutionProvider"]


class _OnnxHandler(TaskHandler):
    framework = "onnx"
    output = ""  # the graph output this task reads

    def load(self, folder: Path, manifest: Manifest, settings: RuntimeSettings) -> None:
        ort = require_onnxruntime()
        tf = require("transformers", "onnx")
        meta = _read_meta(folder, manifest)
        if meta.get("task") != self.task:
            raise ModelLoadFailed(f"cannot load {_ref(manifest)}: its {META_FILE} says task {meta.get('task')!r}")
        self.precision = str(meta.get("precision") or "fp32")
        self.max_length = int(meta.get("max_length") or 512)
        self.tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.session = ort.InferenceSession(
            str(folder / MODEL_FILE),
            sess_options=session_options(ort, settings),
            providers=providers(ort, settings.device),
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        self.output = str(meta.get("output") or self.output)
        if self.output not in outputs:
            raise ModelLoadFailed(
                f"cannot load {_ref(manifest)}: its graph has no output {self.output!r} (it has {', '.join(outputs)})"
            )
        self.memory_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(MODEL_FILE))

    def preprocess(self, inputs: list[str]) -> Any:
        enc = self.tokenizer(
            [str(t) for t in inputs], padding=True, truncation=True, max_length=self.max_length, return_tensors="np"
        )
        shape = enc["input_ids"].shape
        return {
            name: enc[name].astype(np.int64, copy=False) if name in enc else np.zeros(shape, dtype=np.int64)
            for name in self.input_names
        }

    def run(self, batch: dict[str, Any]) -> Any:
        # Plain run, not IO binding: on the CPU provider run() already reads the numpy inputs in place
        # and IO binding measured the same (MiniLM, 2 shared cores, batch 1: 21.5 vs 19.3 ms, batch 32:
        # 268 vs 258 ms, both within the noise of repeated rounds). A CUDA session is where it would pay.
        return self.session.run([self.output], batch)[0]


class OnnxEmbedder(_OnnxHandler):
    """Sentence embeddings: the graph pools (and normalises) itself; one float32 vector per input."""

    task = "embed"
    output = "embeddings"

    def predict(self, batch: Any) -> list[Any]:
        return list(self.run(batch).astype(np.float32, copy=False))


class OnnxClassifier(_OnnxHandler):
    """Sequence classification: softmax over the graph's logits, labels from config.json's id2label."""

    task = "classify"
    output = "logits"

    def load(self, folder: Path, manifest: Manifest, settings: RuntimeSettings) -> None:
        super().load(folder, manifest, settings)
        self.labels = _labels(folder)
        width = self.session.get_outputs()[[o.name for o in self.session.get_outputs()].index(self.output)].shape[-1]
        if isinstance(width, int) and width != len(self.labels):
            raise ModelLoadFailed(
                f"cannot load {_ref(manifest)}: its graph has {width} logits but config.json names "
                f"{len(self.labels)} labels"
            )

    def predict(self, batch: Any) -> list[Classification]:
        logits = self.run(batch).astype(np.float32, copy=False)
        exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs = (exp / exp.sum(axis=-1, keepdims=True)).tolist()
        out = []
        for row in probs:
            best = max(range(len(row)), key=row.__getitem__)
            out.append(Classification(self.labels[best], row[best], dict(zip(self.labels, row))))
        return out


def _read_meta(folder: Path, manifest: Manifest) -> dict[str, Any]:
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadFailed(
            f"cannot load {_ref(manifest)}: {META_FILE} is unreadable ({type(exc).__name__})"
        ) from None
    if not isinstance(meta, dict):
        raise ModelLoadFailed(f"cannot load {_ref(manifest)}: {META_FILE} must hold a JSON object")
    return meta


def _labels(folder: Path) -> list[str]:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    id2label = config.get("id2label") or {}
    num_labels = len(id2label) or int(config.get("num_labels", 2))
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_labels)]


def _ref(manifest: Manifest) -> str:
    return f"{manifest.name}:{manifest.version}"
