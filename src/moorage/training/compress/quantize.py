"""``onnx-int8``: the ONNX export (`export`) with its weights quantised to int8 by ONNX Runtime's
dynamic quantisation (activations are quantised at run time, per batch).

Per-channel weights (one scale per output channel) are the default: per-tensor scales lose too much
on sentence embeddings (on MiniLM, a mean cosine of ~0.96 to float32 against ~0.99 per channel).
``reduce_range`` (7-bit weights) is chosen from the CPU's instruction set, as ONNX Runtime's
documentation advises: on x86 CPUs with AVX2 but no VNNI, the int8 kernels' 16-bit intermediate sums
can saturate, and 7-bit weights avoid it; with AVX512-VNNI, AVX-VNNI or AMX they do not saturate and
full 8-bit weights keep more precision. The flags read and the choice are recorded with the version.

The quantised graph is then compacted (`compact`): what ONNX Runtime rebuilds at load (shape
annotations, node names, all-zero weight zero points, long intermediate tensor names) is dropped, and
the float32 tensors left beside the int8 weights (biases, LayerNorm weights, per-channel scales) are
stored as float16 and cast back to float32 when the session loads (``float_storage``, default
float16). On all-MiniLM-L6-v2 the file goes from 25.3 % to 25.0 % of the float32 parent's
safetensors (the int8 weights alone are 24.8 %) at the same mean cosine to the parent (0.9933 on 60
BBC sentences, Xeon with AMX, both before and after)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ...errors import BadRequest, require
from .export import MODEL_FILE, export, export_options, read_meta, write_meta
from .methods import BuildContext, BuildResult

# The flags that decide which int8 kernels ONNX Runtime runs on x86.
ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
WEIGHT_TYPES = ("qint8", "quint8")
FLOAT_STORAGES = ("float16", "float32")
FLOAT16_MAX = 65504.0
_QUANT_TYPES = {"qint8": "QInt8", "quint8": "QUInt8"}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The flags of `ISA_FLAGS` this CPU has (none where /proc/cpuinfo is not there to read)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            found = set(value.split())
            return [f for f in ISA_FLAGS if f in found]
    return []


def choose_reduce_range(flags: list[str]) -> bool:
    """7-bit weights on AVX2 without VNNI (or AMX); full 8-bit weights everywhere else."""
    return "avx2" in flags and not any(f in flags for f in VNNI_FLAGS)


class OnnxInt8:
    """``onnx-int8`` (parameters: ``per_channel`` (default true), ``reduce_range`` (auto: from the CPU),
    ``weight_type`` (qint8), ``op_types`` (ONNX Runtime's default set), ``float_storage`` (float16: how
    the float32 weights left beside the int8 ones are stored, see `compact`), and those of ``onnx``)."""

    name = "onnx-int8"
    tasks = ("embed", "classify")

    def build(self, ctx: BuildContext) -> BuildResult:
        from ...runtime.onnx import require_onnxruntime

        require_onnxruntime()
        quantization = require("onnxruntime.quantization", "onnx")

        options = export_options(ctx.params)
        params = int8_options(ctx.params)
        fp32 = ctx.out_dir.parent / f"{ctx.out_dir.name}.fp32"
        ctx.report(0, 3, "exporting to ONNX")
        done = export(ctx.parent.task, ctx.parent_dir, fp32, **options)
        ctx.report(1, 3, "quantising to int8")
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        with _without_preprocess_hint():
            quantization.quantize_dynamic(
                fp32 / MODEL_FILE,
                ctx.out_dir / MODEL_FILE,
                op_types_to_quantize=params["op_types"],
                per_channel=params["per_channel"],
                reduce_range=params["reduce_range"],
                weight_type=getattr(quantization.QuantType, _QUANT_TYPES[params["weight_type"]]),
            )
        saved = compact(ctx.out_dir / MODEL_FILE, float16=params["float_storage"] == "float16")
        for path in fp32.iterdir():  # config, tokenizer, onnx.json: as exported
            if path.name != MODEL_FILE:
                (ctx.out_dir / path.name).write_bytes(path.read_bytes())
        _remove(fp32)
        meta = read_meta(ctx.out_dir)
        meta["precision"] = "int8"
        meta["quantization"] = {"method": "dynamic", **params}
        write_meta(ctx.out_dir, meta)
        ctx.report(3, 3, "quantised")
        notes = []
        if not params["per_channel"]:
            notes.append("per-tensor weights: expect lower quality than per-channel")
        parameters = {**options, **params, "max_abs_diff_fp32_export": done.max_abs_diff, "compacted_bytes": saved}
        return BuildResult("int8", parameters, notes)


def int8_options(params: dict[str, Any]) -> dict[str, Any]:
    """The quantisation parameters with their defaults, and the CPU flags ``reduce_range`` was chosen from."""
    registry = require("onnxruntime.quantization.registry", "onnx")
    flags = cpu_flags()
    reduce_range = params.get("reduce_range", "auto")
    chosen_by = "cpu" if reduce_range in ("auto", None) else "user"
    weight_type = str(params.get("weight_type", "qint8")).lower()
    if weight_type not in WEIGHT_TYPES:
        raise BadRequest(f"weight_type: one of {', '.join(WEIGHT_TYPES)}, not {weight_type!r}", code="invalid_param")
    float_storage = str(params.get("float_storage", "float16")).lower()
    if float_storage not in FLOAT_STORAGES:
        raise BadRequest(
            f"float_storage: one of {', '.join(FLOAT_STORAGES)}, not {float_storage!r}", code="invalid_param"
        )
    op_types = params.get("op_types")
    if isinstance(op_types, str):
        op_types = [t.strip() for t in op_types.split(",") if t.strip()]
    return {
        "per_channel": as_bool(params.get("per_channel", True), "per_channel"),
        "reduce_range": choose_reduce_range(flags) if chosen_by == "cpu" else as_bool(reduce_range, "reduce_range"),
        "reduce_range_chosen_by": chosen_by,
        "cpu_flags": flags,
        "weight_type": weight_type,
        "op_types": sorted(op_types or registry.IntegerOpsRegistry),
        "float_storage": float_storage,
    }


def compact(model_path: Path, *, float16: bool = True) -> int:
    """Rewrite the quantised graph at `model_path` smaller, its int8 weights untouched; the bytes saved.

    Lossless: shape annotations (``value_info``), node names and doc strings are dropped (ONNX Runtime
    infers and names what it needs at load), so are all-zero weight zero points of ``MatMulInteger``
    (an absent zero point is zero; symmetric qint8 weights always have one), and intermediate tensors
    get short names (the graph's inputs, outputs and weights keep theirs). With `float16`, each float32
    weight of more than one value that float16 holds (biases, LayerNorm weights, per-channel scales) is
    stored as float16 behind a ``Cast`` to float32, which ONNX Runtime's constant folding turns back
    into a float32 weight when the session loads: the graph's arithmetic stays float32.

    Without ONNX Runtime's graph optimisations the lossless rewrite gives the same outputs bit for bit;
    with them, a rewritten graph is fused differently and its activations quantised with other
    rounding, which moves outputs within int8's own noise (MiniLM, 60 BBC sentences, mean cosine to
    float32: 0.9934 before, 0.9934 lossless, 0.9935 with float16 storage)."""
    onnx = require("onnx", "onnx")
    model = onnx.load(str(model_path))
    graph = model.graph
    before = model.ByteSize()
    del graph.value_info[:]
    graph.doc_string = ""
    for node in graph.node:
        node.name, node.doc_string = "", ""
    _drop_zero_points(onnx, graph)
    if not any(a.type in (a.GRAPH, a.GRAPHS) for n in graph.node for a in n.attribute):  # no subgraphs to follow
        _short_names(graph)
    if float16:
        _float16_weights(onnx, graph)
    onnx.save(model, str(model_path))
    return before - model.ByteSize()


def _drop_zero_points(onnx, graph) -> None:
    weights = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "MatMulInteger" and len(node.input) == 4 and node.input[3] in weights:
            if not onnx.numpy_helper.to_array(weights[node.input[3]]).any():
                del node.input[3]
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _short_names(graph) -> None:
    keep = {v.name for v in (*graph.input, *graph.output)} | {t.name for t in graph.initializer} | {""}
    renamed: dict[str, str] = {}
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name not in keep:
                node.output[i] = renamed.setdefault(name, f"t{len(renamed):x}")
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)


def _float16_weights(onnx, graph) -> None:
    import numpy as np

    numpy_helper, float32 = onnx.numpy_helper, onnx.TensorProto.FLOAT
    graph_inputs = {v.name for v in graph.input}
    casts = []
    for weight in graph.initializer:
        if weight.data_type != float32 or weight.name in graph_inputs:
            continue
        values = numpy_helper.to_array(weight)
        if values.size < 2 or not np.all(np.abs(values) <= FLOAT16_MAX):
            continue
        name = weight.name
        weight.CopyFrom(numpy_helper.from_array(values.astype(np.float16), f"{name}.float16"))
        casts.append(onnx.helper.make_node("Cast", [weight.name], [name], to=float32))
    nodes = [*casts, *graph.node]  # a Cast before every node that reads its output
    del graph.node[:]
    graph.node.extend(nodes)


def as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise BadRequest(f"{name}: true or false, not {value!r}", code="invalid_param")


def _remove(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def _without_preprocess_hint() -> Iterator[None]:
    """ONNX Runtime logs to the root logger, at every call, that a graph could be pre-processed first;
    for these graphs (already constant-folded by the export) it changes nothing measurable."""

    def keep(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
