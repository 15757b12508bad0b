"""``onnx``: an embed or classify model exported to one ONNX graph (float32), checked against torch.

The folder it writes is what `moorage.runtime.onnx` loads: ``model.onnx``, ``onnx.json`` (task,
precision, inputs, output, token limit, normalisation), the parent's ``config.json`` and tokenizer
files. An embedding graph holds the parent's whole sentence-transformers pipeline (transformer,
pooling over the attention mask, normalisation when the parent normalises), so the handler only
tokenises and runs it; a classifier graph returns the logits.

The export uses torch.onnx's TorchScript exporter (``dynamo=False``, the default here: no
torch.export tracing, which is slower and needs more packages) or, with ``exporter=dynamo``, the
torch.export one. Before the folder is handed on, ONNX Runtime runs the graph on a few texts (one
alone, then a padded batch of different lengths) and its outputs must be within ``tolerance`` of
torch's: the largest difference is recorded with the parameters."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import BadRequest, require
from ...runtime.hf import pruned_heads_kwargs, pruned_heads_quiet, restore_pruned_heads, transformer_folder
from .methods import BuildContext, BuildResult

MODEL_FILE = "model.onnx"
META_FILE = "onnx.json"
OPSET = 17  # LayerNormalization is one op from 17 on; ONNX Runtime's int8 kernels cover it
EXPORTERS = ("torchscript", "dynamo")
TOLERANCE = 1e-3  # float32 graph against torch on the same inputs: differences are ~1e-7 in practice
# What a tokenizer may be saved as (copied as the parent has them; absent ones are skipped).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
CHECK_TEXTS = (
    "A short sentence.",
    "The model is checked against torch on a batch of texts of different lengths, padded to the longest.",
    "Compression keeps quality",
    "ONNX Runtime runs the exported graph; its outputs must match the parent's within the tolerance.",
)


@dataclass
class Exported:
    """What `export` wrote: the graph's interface and how closely it matches torch."""

    task: str
    inputs: list[str]
    output: str
    max_length: int
    normalize: bool
    max_abs_diff: float
    exporter: str
    opset: int


class OnnxExport:
    """``onnx``: the parent as a float32 ONNX graph (parameters: ``opset``, ``exporter``, ``tolerance``)."""

    name = "onnx"
    tasks = ("embed", "classify")

    def build(self, ctx: BuildContext) -> BuildResult:
        options = export_options(ctx.params)
        ctx.report(0, 2, "exporting to ONNX")
        done = export(ctx.parent.task, ctx.parent_dir, ctx.out_dir, **options)
        ctx.report(2, 2, "exported")
        return BuildResult("fp32", {**options, "max_abs_diff": done.max_abs_diff})


def export_options(params: dict[str, Any]) -> dict[str, Any]:
    """The export's parameters with their defaults; an unknown or bad one is a 400 naming it."""
    opset, exporter = int(params.get("opset", OPSET)), str(params.get("exporter", EXPORTERS[0]))
    if exporter not in EXPORTERS:
        raise BadRequest(f"exporter: one of {', '.join(EXPORTERS)}, not {exporter!r}", code="invalid_param")
    if not 14 <= opset <= 21:
        raise BadRequest(f"opset: 14 to 21, not {opset}", code="invalid_param")
    options: dict[str, Any] = {
        "opset": opset,
        "exporter": exporter,
        "tolerance": float(params.get("tolerance", TOLERANCE)),
    }
    return options


def export(
    task: str,
    parent_dir: Path,
    out_dir: Path,
    *,
    opset: int = OPSET,
    exporter: str = "torchscript",
    tolerance=TOLERANCE,
) -> Exported:
    """Write the ONNX folder of the model in `parent_dir` (a `task` model) into `out_dir`; raise
    `ExportMismatch` when ONNX Runtime's outputs differ from torch's by more than `tolerance`."""
    from ...runtime.onnx import require_onnxruntime

    require_onnxruntime()
    require("onnx", "onnx")
    torch = require("torch", "ml")
    out_dir.mkdir(parents=True, exist_ok=True)
    if task == "embed":
        graph, tokenizer, source, max_length, normalize = _embedder(parent_dir)
        output = "embeddings"
    elif task == "classify":
        graph, tokenizer, source, max_length = _classifier(parent_dir)
        output, normalize = "logits", False
    else:
        raise BadRequest(
            f"only embed and classify models are exported to ONNX, not {task} models", code="unsupported_method"
        )
    inputs = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]
    sample = tokenizer(list(CHECK_TEXTS[:2]), padding=True, return_tensors="pt")
    with torch.inference_mode(), warnings.catch_warnings():
        # the TorchScript exporter warns that it is the old one, and the tracer that shapes become constants
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            tuple(sample[n] for n in inputs),
            str(out_dir / MODEL_FILE),
            input_names=inputs,
            output_names=[output],
            opset_version=opset,
            do_constant_folding=True,
            **_dynamic(torch, exporter, inputs, output),
        )
    _copy_model_files(source, out_dir)
    meta = {
        "task": task,
        "precision": "fp32",
        "inputs": inputs,
        "output": output,
        "max_length": max_length,
        "normalize": normalize,
        "quantization": None,
    }
    write_meta(out_dir, meta)
    diff = max_difference(graph, tokenizer, out_dir / MODEL_FILE, inputs, max_length)
    if diff > tolerance:
        raise ExportMismatch(
            f"the ONNX export differs from torch by {diff:.3g} (more than the tolerance {tolerance:g}): not registered"
        )
    return Exported(task, inputs, output, max_length, normalize, diff, exporter, opset)


def _dynamic(torch, exporter: str, inputs: list[str], output: str) -> dict[str, Any]:
    """Batch and sequence axes left free: the TorchScript exporter names them per graph input and
    output, torch.export per argument of the traced function (one tuple: it takes *tensors)."""
    if exporter == "torchscript":
        axes = {**{n: {0: "batch", 1: "sequence"} for n in inputs}, output: {0: "batch"}}
        return {"dynamo": False, "dynamic_axes": axes}
    dim = torch.export.Dim
    shapes = tuple({0: dim("batch", min=1, max=1024), 1: dim("sequence", min=1, max=4096)} for _ in inputs)
    return {"dynamo": True, "dynamic_shapes": (shapes,), "optimize": True}


class ExportMismatch(BadRequest):
    code = "export_mismatch"


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_meta(folder: Path) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    return meta


def max_difference(graph, tokenizer, model_path: Path, inputs: list[str], max_length: int) -> float:
    """The largest absolute difference between torch's and ONNX Runtime's outputs, on one text alone
    and on a padded batch of texts of different lengths."""
    import numpy as np

    from ...runtime.onnx import require_onnxruntime

    ort = require_onnxruntime()
    torch = require("torch", "ml")
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for texts in (list(CHECK_TEXTS[:1]), list(CHECK_TEXTS)):
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            expected = graph(*(enc[n] for n in inputs)).float().numpy()
        got = session.run(None, {n: enc[n].numpy().astype(np.int64) for n in inputs})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


# ---- the graphs ----------------------------------------------------------------------------------
def _embedder(parent_dir: Path):
    """The parent's sentence-transformers pipeline as a module of token tensors, its tokenizer, the
    folder its transformer's config and tokenizer files are in, its token limit and whether it normalises."""
    torch = require("torch", "ml")
    st = require("sentence_transformers", "ml")
    weights = transformer_folder(parent_dir)
    with pruned_heads_quiet(weights):  # a pruned parent loads its cut projections as the runtime does
        model = st.SentenceTransformer(
            str(parent_dir),
            device="cpu",
            local_files_only=True,
            model_kwargs={"use_safetensors": True, **pruned_heads_kwargs(weights)},
        )
    restore_pruned_heads(model[0].auto_model, weights)
    model.eval()
    normalize = any(type(m).__name__ == "Normalize" for m in model)

    class Embed(torch.nn.Module):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            features = dict(zip(names, tensors))
            return self.model(features)["sentence_embedding"]

    tokenizer = model.tokenizer
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]
    return Embed().eval(), tokenizer, transformer_folder(parent_dir), int(model.max_seq_length or 512), normalize


def _classifier(parent_dir: Path):
    torch = require("torch", "ml")
    tf = require("transformers", "ml")
    tokenizer = tf.AutoTokenizer.from_pretrained(str(parent_dir), local_files_only=True)
    with pruned_heads_quiet(parent_dir):
        model = tf.AutoModelForSequenceClassification.from_pretrained(
            str(parent_dir),
            local_files_only=True,
            use_safetensors=True,
            dtype=torch.float32,
            **pruned_heads_kwargs(parent_dir),
        )
    restore_pruned_heads(model, parent_dir)
    model.eval()
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]

    class Logits(torch.nn.Module):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            return self.model(**dict(zip(names, tensors))).logits

    limit = getattr(model.config, "max_position_embeddings", None) or 512
    max_length = min(int(tokenizer.model_max_length or limit), int(limit))
    return Logits().eval(), tokenizer, parent_dir, max_length


def _copy_model_files(source: Path, out_dir: Path) -> None:
    for name in ("config.json", *TOKENIZER_FILES):
        if (source / name).is_file():
            shutil.copyfile(source / name, out_dir / name)
