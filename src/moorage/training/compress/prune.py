"""``prune-heads``: structured attention-head pruning of a BERT-like encoder (embed or classify).

Scoring (``scoring``), on held-out texts (the dataset's validation split), with no labels, so that
embedding and classification models are scored the same way:
- ``output-norm`` (default, one forward pass): each head's mean output norm, ``||ctx_h @ W_O[:, h]^T||``,
  its contribution to the attention block's output, averaged over the real tokens;
- ``ablation`` (one forward pass per head): how far the model's output (sentence embedding or logits)
  moves, as mean 1 - cosine to the parent's, when that head alone is masked: the measure the
  compression gate reads, at the cost of layers x heads passes.

The `heads_per_layer` best heads of each layer are kept (or all but `fraction` of them), the others
removed: their rows of Q, K and V and their columns of the output projection
are cut out, which computes exactly what the full model computes with those heads masked to zero.

The folder keeps the parent's layout and config, with the removed heads in config.json's
``pruned_heads``; the runtime's torch handlers load it (`moorage.runtime.hf.restore_pruned_heads`).

Measured on all-MiniLM-L6-v2 (6 layers x 12 heads), 192 BBC News validation articles at 128
tokens, against the parent (torch fp32, 1 thread, a shared 2-core AVX-512/AMX VM):

    9 heads a layer, output-norm            mean cosine 0.934, min 0.864, nearest neighbour 75 %, 1.09x
    9 heads a layer, ablation (16 texts)    mean cosine 0.934, min 0.876, nearest neighbour 80 %, 1.19x
    6 heads a layer, output-norm            mean cosine 0.809, min 0.619, nearest neighbour 55 %, 1.37x
    9 heads, output-norm, 60 recovery steps mean cosine 0.967, min 0.909, nearest neighbour 79 %

(speed-ups at batch 32, noisy on that machine). Removed heads cost an embedding model more than the
gate's 0.99 allows unless a longer recovery brings it back.

`recovery` epochs of fine-tuning may follow, with transformers' `Trainer`: a classifier on its
lineage dataset's labels (moorage.training.trainer's arguments and evaluation, the best validation
checkpoint kept), an embedding model distilled onto its unpruned parent's embeddings (`distill`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ...errors import BadRequest, require
from ...runtime.hf import cut_heads, pruned_heads_kwargs, restore_pruned_heads
from .distill import (
    dataset_texts,
    encoder_layers,
    fit_max_length,
    load_sentence_model,
    parse_params,
    teacher_embeddings,
    train_on_embeddings,
    write_sentence_folder,
)
from .methods import BuildContext, BuildResult, check_task


class PruneParams(BaseModel):
    """What `prune-heads` takes (every field is recorded with the derived version)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    heads_per_layer: int | None = Field(None, ge=1, description="heads kept in every layer")
    fraction: float | None = Field(None, gt=0, lt=1, description="share of each layer's heads removed (default 0.25)")
    dataset: str | None = Field(None, description="dataset ref (default: the parent's lineage dataset, else bbc-news)")
    score_split: str = "validation"
    scoring: Literal["output-norm", "ablation"] = "output-norm"
    num_texts: int = Field(64, ge=1, description="held-out texts the heads are scored on")
    max_length: int = Field(128, ge=8)
    batch_size: int = Field(16, ge=1)
    recovery: float = Field(0, ge=0, description="epochs of recovery fine-tuning (0: none)")
    recovery_split: str = "train"
    max_steps: int = Field(300, ge=1, description="recovery steps at most")
    max_texts: int = Field(2000, ge=1, description="recovery texts at most (embed)")
    learning_rate: float = Field(5e-5, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _one_size(self) -> PruneParams:
        if self.heads_per_layer is not None and self.fraction is not None:
            raise ValueError("give heads_per_layer or fraction, not both")
        return self


class PruneHeads:
    name = "prune-heads"
    tasks: tuple[str, ...] = ("embed", "classify")
    learns_from_data = True  # `moorage compress --dataset D` is its default `dataset` parameter

    def build(self, ctx: BuildContext) -> BuildResult:
        check_task(self, ctx.parent.task, ctx.parent.ref)
        params = parse_params(PruneParams, ctx.params, self.name)
        require("transformers", "training").set_seed(params.seed)
        embed = ctx.parent.task == "embed"
        model, tokenizer, encoder = _load(ctx.parent_dir, embed)
        layers = encoder_layers(encoder, self.name)
        num_heads = int(layers[0].attention.self.num_attention_heads)
        keep = _kept_per_layer(params, num_heads)
        max_length = fit_max_length(model, params.max_length) if embed else params.max_length
        texts, scored_on = dataset_texts(ctx, params.dataset, params.score_split, params.num_texts, params.seed)
        ctx.report(0, 3, "scoring heads")
        if params.scoring == "ablation":
            scores = ablation_scores(model, encoder, tokenizer, texts, max_length, params.batch_size, embed)
        else:
            scores = head_scores(encoder, tokenizer, texts, max_length, params.batch_size)
        pruned = {
            layer: sorted(sorted(range(len(row)), key=lambda h: (-row[h], h))[keep:])
            for layer, row in enumerate(scores)
        }
        prune(encoder, pruned)
        ctx.report(1, 3, "recovering")
        recovery = _recover(ctx, params, model, tokenizer, max_length, embed) if params.recovery > 0 else {}
        ctx.report(2, 3, "writing")
        if embed:
            write_sentence_folder(model, ctx.parent_dir, ctx.out_dir)
        else:
            ctx.out_dir.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(ctx.out_dir, safe_serialization=True)
            tokenizer.save_pretrained(ctx.out_dir)
        ctx.report(3, 3, "done")
        parameters = {
            **params.model_dump(),
            "heads_per_layer": keep,
            "parent_heads_per_layer": num_heads,
            "fraction": 1 - keep / num_heads,
            "pruned_heads": {str(k): v for k, v in pruned.items()},
            "head_scores": [[round(s, 6) for s in row] for row in scores],
            "scored_on": scored_on,
            "max_length": max_length,
            "recovery_result": recovery,
        }
        notes = [f"{num_heads} -> {keep} heads in each of {len(layers)} layers (scored by {params.scoring})"]
        return BuildResult(precision="fp32", parameters=parameters, notes=notes)


def _kept_per_layer(params: PruneParams, num_heads: int) -> int:
    if params.heads_per_layer is not None:
        keep = params.heads_per_layer
    else:
        keep = num_heads - round(num_heads * (params.fraction if params.fraction is not None else 0.25))
    if not 1 <= keep < num_heads:
        raise BadRequest(
            f"prune-heads: keeping {keep} of {num_heads} heads per layer prunes nothing or everything; "
            f"keep 1 to {num_heads - 1}",
            code="invalid_parameters",
        )
    return keep


def _load(folder: Path, embed: bool) -> tuple[Any, Any, Any]:
    """(the model as it is written back, its tokenizer, its encoder) in float32 on the CPU."""
    if embed:
        model = load_sentence_model(folder)
        return model, model.tokenizer, model[0].auto_model
    tf = require("transformers", "training")
    tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = tf.AutoModelForSequenceClassification.from_pretrained(
        str(folder), local_files_only=True, use_safetensors=True, **pruned_heads_kwargs(folder)
    )
    restore_pruned_heads(model, folder)
    return model.float(), tokenizer, model.base_model


def head_scores(encoder: Any, tokenizer: Any, texts: list[str], max_length: int, batch_size: int) -> list[list[float]]:
    """Per layer, per head: the mean L2 norm of the head's share of the attention output projection
    over the real tokens of `texts`."""
    torch = require("torch", "training")
    layers = encoder.encoder.layer
    totals = [torch.zeros(int(layer.attention.self.num_attention_heads), dtype=torch.float64) for layer in layers]
    state: dict[str, Any] = {"mask": None, "tokens": 0}

    def hook(index: int, dense: Any, size: int):
        def run(module: Any, args: tuple[Any, ...]) -> None:
            context = args[0].float()  # (batch, seq, heads * size): the heads' outputs, concatenated
            weight = dense.weight.float()
            mask = state["mask"]
            for head in range(totals[index].numel()):
                cols = slice(head * size, (head + 1) * size)
                norms = (context[..., cols] @ weight[:, cols].T).norm(dim=-1)
                totals[index][head] += float((norms * mask).sum())

        return run

    handles = [
        layer.attention.output.dense.register_forward_pre_hook(
            hook(i, layer.attention.output.dense, int(layer.attention.self.attention_head_size))
        )
        for i, layer in enumerate(layers)
    ]
    encoder.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(
                    texts[start : start + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
                state["mask"] = batch["attention_mask"].float()
                state["tokens"] += int(batch["attention_mask"].sum())
                encoder(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return [(t / max(1, state["tokens"])).tolist() for t in totals]


def ablation_scores(
    model: Any, encoder: Any, tokenizer: Any, texts: list[str], max_length: int, batch_size: int, embed: bool
) -> list[list[float]]:
    """Per layer, per head: mean 1 - cosine between the model's outputs with that head masked and
    without, over `texts`."""
    torch = require("torch", "training")
    layers = encoder.encoder.layer
    gates = [torch.ones(int(layer.attention.self.all_head_size)) for layer in layers]
    handles = [
        layer.attention.output.dense.register_forward_pre_hook(lambda m, args, g=gate: (args[0] * g.to(args[0]),))
        for layer, gate in zip(layers, gates)
    ]
    batches = [
        dict(
            tokenizer(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
        )
        for i in range(0, len(texts), batch_size)
    ]

    def outputs() -> Any:
        run = (lambda b: model(dict(b))["sentence_embedding"]) if embed else (lambda b: model(**b).logits)
        return torch.cat([run(b).float() for b in batches])

    model.eval()
    scores: list[list[float]] = []
    try:
        with torch.inference_mode():
            reference = outputs()
            for layer, gate in zip(layers, gates):
                size = int(layer.attention.self.attention_head_size)
                row = []
                for head in range(int(layer.attention.self.num_attention_heads)):
                    gate[head * size : (head + 1) * size] = 0
                    moved = 1 - torch.nn.functional.cosine_similarity(outputs(), reference, dim=-1)
                    gate[head * size : (head + 1) * size] = 1
                    row.append(float(moved.mean()))
                scores.append(row)
    finally:
        for handle in handles:
            handle.remove()
    return scores


def prune(encoder: Any, pruned: dict[int, list[int]]) -> None:
    """Remove these heads (numbered as the layers have them now) from the encoder's layers, and record
    them in its config as heads of the original layer (a parent pruned before has fewer already)."""
    torch = require("torch", "training")
    config = encoder.config
    recorded = {int(k): list(v) for k, v in (getattr(config, "pruned_heads", None) or {}).items()}
    for layer, heads in pruned.items():
        if not heads:
            continue
        cut_heads(encoder.encoder.layer[layer].attention, heads, torch)
        before = recorded.get(layer, [])
        original = [h for h in range(int(config.num_attention_heads)) if h not in before]
        recorded[layer] = sorted(before + [original[h] for h in heads])
    config.pruned_heads = {str(k): v for k, v in sorted(recorded.items())}


def _recover(
    ctx: BuildContext, params: PruneParams, model: Any, tokenizer: Any, max_length: int, embed: bool
) -> dict[str, Any]:
    if embed:  # distilled onto the unpruned parent's embeddings
        teacher = load_sentence_model(ctx.parent_dir)
        limit = min(params.max_texts, params.max_steps * params.batch_size)  # no more than the steps see
        texts, source = dataset_texts(ctx, params.dataset, params.recovery_split, limit, params.seed)
        targets = teacher_embeddings(teacher, texts, max_length)
        del teacher
        loop = {**params.model_dump(), "epochs": params.recovery, "loss": "cosine"}
        losses = train_on_embeddings(model, texts, targets, max_length, loop, progress=ctx.report)
        return {"loss": "cosine to the parent's embeddings", "texts": source, "steps": len(losses), "losses": losses}
    return _recover_classifier(ctx, params, model, tokenizer, max_length)


def _recover_classifier(
    ctx: BuildContext, params: PruneParams, model: Any, tokenizer: Any, max_length: int
) -> dict[str, Any]:
    """A short fine-tune on the labels of the parent's dataset, with the trainer's arguments (the best
    validation checkpoint is kept)."""
    from .. import encoding, trainer
    from ..datasets import Datasets
    from .distill import DEFAULT_DATASET, _lineage_dataset

    ref = params.dataset or _lineage_dataset(ctx.parent) or DEFAULT_DATASET
    datasets = Datasets.from_settings(ctx.settings)
    try:
        data = datasets.get(ref)
        train_rows = datasets.examples(data, params.recovery_split)
        validation_rows = datasets.examples(data, params.score_split)
    finally:
        datasets.close()
    if dict(model.config.label2id) != dict(data.label_map):
        raise BadRequest(
            f"prune-heads: dataset {data.ref} has other labels than {ctx.parent.ref}", code="label_unknown"
        )
    spec = trainer.TrainSpec(
        task="classify",
        base=ctx.parent.ref,
        dataset=data.ref,
        name=ctx.parent.name,
        epochs=params.recovery,
        learning_rate=params.learning_rate,
        batch_size=params.batch_size,
        max_length=max_length,
        seed=params.seed,
        early_stopping_patience=None,
    )
    with tempfile.TemporaryDirectory(prefix="moorage-prune-") as work:
        fit = trainer._make_trainer(
            model=model,
            args=trainer._training_arguments(spec, Path(work)),
            train_dataset=encoding.encode("classify", tokenizer, train_rows, data.label_map, max_length),
            eval_dataset=encoding.encode("classify", tokenizer, validation_rows, data.label_map, max_length),
            processing_class=tokenizer,
            data_collator=encoding.collator("classify", tokenizer),
            compute_metrics=trainer._classify_metrics(model.config.id2label),
        )
        fit.remove_callback(require("transformers", "training").PrinterCallback)
        fit.train()
        history = [e for e in fit.state.log_history if "eval_accuracy" in e]
    model.eval()
    return {
        "dataset": data.ref,
        "epochs": params.recovery,
        "validation": [{"step": e["step"], "accuracy": e["eval_accuracy"]} for e in history],
    }
