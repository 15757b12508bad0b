"""``distill``: a shallower embedding model trained to give its parent's sentence embeddings.

The student is the parent with layers dropped, each kept layer and the embeddings initialised from
the teacher, so training starts close to the parent. It keeps the first and the last layer and
others evenly between (6 -> 3: layers 0, 3 and 5). Measured on all-MiniLM-L6-v2 before any
training, mean cosine of the student's embeddings to the teacher's on 96 BBC News articles: 0.64
for layers 0, 3, 5; 0.29 for every other layer (0, 2, 4, DistilBERT's choice); 0.57 for the top
three. Trained on BBC News' train split (16 texts a step, lr 1e-4, 128 tokens), measured on 192
articles of its validation split: layers 0, 3, 5 after 60 steps mean cosine 0.862 (min 0.692,
nearest-neighbour agreement 58 %, loss 0.39 -> 0.15) at 1.78x the parent's sentences/s at batch 32;
layers 0, 2, 4 after 93 steps only 0.62. A distilled MiniLM needs far more steps to near the gate. It then learns
the teacher's own sentence embeddings (its pooling and normalisation included) on texts of a
dataset: the cosine (or MSE) between the two is the loss, through transformers' `Trainer`, seeded,
for a bounded number of steps. The result is a sentence-transformers folder like the parent's
(tokenizer, pooling, normalisation; only the transformer's config and weights differ), which the
runtime's embed handler serves unchanged.

The texts and the training loop are shared with `prune` (its recovery fine-tune of an embedding
model is the same distillation, onto the unpruned parent).
"""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...errors import BadRequest, require
from ...runtime.hf import pruned_heads_kwargs, restore_pruned_heads, transformer_folder
from .methods import BuildContext, BuildResult, check_task

if TYPE_CHECKING:
    from ...registry import VersionInfo

P = TypeVar("P", bound=BaseModel)

DEFAULT_DATASET = "bbc-news"  # what `moorage demo` registers
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


class DistillParams(BaseModel):
    """What `distill` takes (every field is recorded with the derived version)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: int | None = Field(None, ge=1, description="student layers (default: half the parent's, rounded up)")
    dataset: str | None = Field(None, description="dataset ref whose texts it learns on (default: the demo's bbc-news)")
    split: str = "train"
    max_texts: int = Field(2000, ge=1)
    epochs: float = Field(1, gt=0, description="passes over the texts (max_steps bounds them)")
    max_steps: int = Field(300, ge=1, description="optimizer steps at most")
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    max_length: int = Field(128, ge=8, description="tokens per text (cut to the parent's max_seq_length)")
    loss: Literal["cosine", "mse"] = "cosine"
    seed: int = 0


class Distill:
    name = "distill"
    tasks: tuple[str, ...] = ("embed",)
    learns_from_data = True  # `moorage compress --dataset D` is its default `dataset` parameter

    def build(self, ctx: BuildContext) -> BuildResult:
        check_task(self, ctx.parent.task, ctx.parent.ref)
        params = parse_params(DistillParams, ctx.params, self.name)
        torch, st = require("torch", "training"), require("sentence_transformers", "training")
        require("transformers", "training").set_seed(params.seed)
        teacher = load_sentence_model(ctx.parent_dir)
        layers = encoder_layers(teacher[0].auto_model, self.name)
        num_layers = params.layers or (len(layers) + 1) // 2
        if num_layers >= len(layers):
            raise BadRequest(
                f"distill: layers={num_layers}, the parent has {len(layers)}; a student has fewer",
                code="invalid_parameters",
            )
        kept = spread(len(layers), num_layers)
        # no more texts than the steps can see (the teacher embeds every one of them first)
        limit = min(params.max_texts, params.max_steps * params.batch_size)
        texts, source = dataset_texts(ctx, params.dataset, params.split, limit, params.seed)
        max_length = fit_max_length(teacher, params.max_length)
        ctx.report(0, params.max_steps, "teacher embeddings")
        targets = teacher_embeddings(teacher, texts, max_length)
        student = load_sentence_model(ctx.parent_dir)
        drop_layers(student[0].auto_model, kept, torch)
        losses = train_on_embeddings(
            student, texts, targets, max_length, params.model_dump(), progress=ctx.report, st=st
        )
        write_sentence_folder(student, ctx.parent_dir, ctx.out_dir)
        parameters = {
            **params.model_dump(),
            "layers": num_layers,
            "parent_layers": len(layers),
            "kept_layers": kept,
            "max_length": max_length,
            "texts": source,
            "steps": len(losses),
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
        }
        notes = [f"{len(layers)} -> {num_layers} layers (kept {kept}), {len(losses)} steps on {source['rows']} texts"]
        return BuildResult(precision="fp32", parameters=parameters, notes=notes)


def spread(num_layers: int, num_kept: int) -> list[int]:
    """`num_kept` of `num_layers` layer indexes: the first, the last and the rest evenly between."""
    if num_kept == 1:
        return [0]
    return [int(i * (num_layers - 1) / (num_kept - 1) + 0.5) for i in range(num_kept)]


# ---- shared with prune ---------------------------------------------------------------------------
def parse_params(model: type[P], params: dict[str, Any], method: str) -> P:
    """The method's parameters, checked: an unknown or bad one is a one-line 400 ``invalid_parameters``."""
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "parameters"
        known = ", ".join(model.model_fields)
        raise BadRequest(
            f"{method}: parameter {where}: {first['msg']} (it takes {known})", code="invalid_parameters"
        ) from None


def dataset_texts(
    ctx: BuildContext, dataset: str | None, split: str, limit: int, seed: int
) -> tuple[list[str], dict[str, Any]]:
    """Up to `limit` texts (a seeded sample) of a split: of `dataset`, else of the dataset the parent
    was trained on when its lineage names one, else of the BBC News dataset `moorage demo` registers."""
    ref = dataset or _lineage_dataset(ctx.parent) or DEFAULT_DATASET
    from ..datasets import DatasetNotFound, Datasets

    datasets = Datasets.from_settings(ctx.settings)
    try:
        try:
            data = datasets.get(ref)
        except DatasetNotFound:
            if dataset is not None or ref != DEFAULT_DATASET:
                raise
            raise BadRequest(
                f"no dataset to learn on: pass dataset=NAME (a registered dataset), or register {DEFAULT_DATASET!r} "
                "with moorage demo",
                code="dataset_not_found",
            ) from None
        examples = datasets.examples(data, split)  # 400 unknown_split
    finally:
        datasets.close()
    texts = [e.text for e in examples if e.text]
    if not texts:
        raise BadRequest(f"split {split!r} of dataset {data.ref} has no texts", code="empty_split")
    if len(texts) > limit:  # a seeded sample, not the first rows of a sorted split
        texts = random.Random(seed).sample(texts, limit)
    return texts, {"dataset": data.ref, "digest": data.splits[split].digest, "split": split, "rows": len(texts)}


def _lineage_dataset(parent: VersionInfo) -> str | None:
    recorded = parent.manifest.lineage.dataset or {}
    if recorded.get("name") and recorded.get("version"):
        return f"{recorded['name']}:{recorded['version']}"
    return None


def load_sentence_model(folder: Path) -> Any:
    """The parent's sentence-transformers pipeline in float32 on the CPU (training runs there), loaded
    as the runtime loads it (a parent pruned before comes with its pruned heads)."""
    st = require("sentence_transformers", "training")
    if not (folder / "modules.json").is_file():
        raise BadRequest(
            "the parent is not a sentence-transformers folder (no modules.json)", code="unsupported_method"
        )
    weights = transformer_folder(folder)
    kwargs = {"use_safetensors": True, **pruned_heads_kwargs(weights)}
    model = st.SentenceTransformer(str(folder), device="cpu", local_files_only=True, model_kwargs=kwargs)
    restore_pruned_heads(model[0].auto_model, weights)
    return model.float()


def encoder_layers(model: Any, method: str) -> Any:
    """The transformer layers of a BERT-like encoder (BERT, MiniLM, RoBERTa, XLM-R, ELECTRA ...)."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if layers is None or not len(layers) or not hasattr(layers[0], "attention"):
        raise BadRequest(
            f"{method}: {type(model).__name__} is not a BERT-like encoder (encoder.layer[i].attention)",
            code="unsupported_method",
        )
    return layers


def drop_layers(model: Any, kept: Sequence[int], torch: Any) -> None:
    """Keep only these layers of the encoder (the config says how many are left)."""
    layers = model.encoder.layer
    model.encoder.layer = torch.nn.ModuleList([layers[i] for i in kept])
    model.config.num_hidden_layers = len(kept)
    pruned = getattr(model.config, "pruned_heads", None)
    if pruned:  # a pruned parent: the kept layers' pruned heads, renumbered
        renumbered = {str(new): pruned[str(old)] for new, old in enumerate(kept) if pruned.get(str(old))}
        model.config.pruned_heads = renumbered


def fit_max_length(model: Any, wanted: int) -> int:
    limit = getattr(model, "max_seq_length", None)
    return min(wanted, int(limit)) if isinstance(limit, int) and limit > 0 else wanted


def teacher_embeddings(model: Any, texts: Sequence[str], max_length: int) -> Any:
    """The teacher's sentence embeddings of every text (float32, as it serves them)."""
    torch = require("torch", "training")
    saved, model.max_seq_length = model.max_seq_length, max_length
    try:
        model.eval()
        with torch.inference_mode():
            out = model.encode(list(texts), batch_size=32, convert_to_tensor=True, show_progress_bar=False)
        return out.float().clone()
    finally:
        model.max_seq_length = saved


def train_on_embeddings(
    student: Any,
    texts: Sequence[str],
    targets: Any,
    max_length: int,
    params: dict[str, Any],
    *,
    progress: Callable[[int, int, str], None] | None = None,
    st: Any = None,
) -> list[float]:
    """Train `student` (a SentenceTransformer) so that its embeddings of `texts` match `targets`, with
    transformers' `Trainer`: `epochs` over the texts, `max_steps` at most, seeded. Returns the loss of every
    step."""
    tf, torch = require("transformers", "training"), require("torch", "training")
    tokenizer = student.tokenizer
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    rows = [{**{k: encoded[k][i] for k in encoded}, "target": targets[i]} for i in range(len(texts))]
    batches = -(-len(rows) // int(params["batch_size"]))
    steps = max(1, min(int(params["max_steps"]), math.ceil(float(params.get("epochs", 1)) * batches)))
    use_mse = params.get("loss") == "mse"

    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        padded = tokenizer.pad([{k: v for k, v in r.items() if k != "target"} for r in batch], return_tensors="pt")
        return {**padded, "target": torch.stack([r["target"] for r in batch])}

    base: Any = tf.Trainer

    class EmbeddingTrainer(base):
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kw: Any) -> Any:
            target = inputs.pop("target")
            out = model(dict(inputs))["sentence_embedding"]
            if use_mse:
                loss = torch.nn.functional.mse_loss(out, target) * out.shape[-1]  # per dimension summed
            else:
                loss = (1 - torch.nn.functional.cosine_similarity(out, target, dim=-1)).mean()
            return (loss, out) if return_outputs else loss

    losses: list[float] = []
    callback_base: Any = tf.TrainerCallback

    class Losses(callback_base):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                if progress is not None:
                    progress(state.global_step, state.max_steps, "training")

    import tempfile

    with tempfile.TemporaryDirectory(prefix="moorage-distill-") as work:
        args = tf.TrainingArguments(
            output_dir=work,
            use_cpu=True,
            seed=int(params["seed"]),
            data_seed=int(params["seed"]),
            max_steps=steps,
            per_device_train_batch_size=int(params["batch_size"]),
            learning_rate=float(params["learning_rate"]),
            warmup_steps=0.1,
            lr_scheduler_type="linear",
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="steps",
            logging_steps=1,
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,  # the model is a SentenceTransformer: its forward takes one dict
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
        )
        trainer = EmbeddingTrainer(model=student, args=args, train_dataset=rows, data_collator=collate)
        trainer.remove_callback(tf.PrinterCallback)
        trainer.add_callback(Losses())
        trainer.train()
    student.eval()
    return losses


def write_sentence_folder(model: Any, parent_dir: Path, out_dir: Path) -> None:
    """The parent's folder with the transformer's config and weights replaced by `model`'s: the
    tokenizer, pooling and normalisation stay the parent's."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(parent_dir, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("moorage.json", ".*"))
    target = transformer_folder(out_dir)
    for path in target.iterdir():
        if path.is_file() and path.name.endswith(WEIGHT_SUFFIXES):
            path.unlink()
    model[0].auto_model.save_pretrained(target, safe_serialization=True)
