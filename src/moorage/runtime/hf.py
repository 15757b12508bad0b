"""Task handlers for real models: sentence-transformers and transformers (extra ``[ml]``).

Weights are only ever read from safetensors (``use_safetensors=True``): the registry refuses
pickle files at registration and the loader refuses them again before this module runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import RuntimeSettings
from ..errors import require
from ..registry.manifest import Manifest
from .base import (
    Classification,
    GenerateInput,
    Generation,
    GenerationParams,
    TaskHandler,
    as_generate_inputs,
    truncate_at_stop,
)


def _torch(settings: RuntimeSettings):
    torch = require("torch", "ml")
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    return torch


def _param_bytes(module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


class SentenceEmbedder(TaskHandler):
    """sentence-transformers folders keep their pooling and normalisation modules."""

    task = "embed"

    def load(self, folder: Path, manifest: Manifest, settings: RuntimeSettings) -> None:
        _torch(settings)
        st = require("sentence_transformers", "ml")
        self.model = st.SentenceTransformer(
            str(folder),
            device=settings.device,
            local_files_only=True,
            model_kwargs={"use_safetensors": True},
        )
        self.model.eval()
        self.memory_bytes = _param_bytes(self.model)

    def preprocess(self, inputs: list[str]) -> Any:
        texts = [str(t) for t in inputs]
        prepare = getattr(self.model, "preprocess", None) or self.model.tokenize  # ST >= 6 : older
        return prepare(texts)

    def predict(self, batch: Any) -> list[Any]:
        torch = require("torch", "ml")
        features = {k: v.to(self.model.device) if hasattr(v, "to") else v for k, v in batch.items()}
        with torch.inference_mode():
            out = self.model.forward(features)["sentence_embedding"]
        return list(out.float().cpu().numpy())


class SequenceClassifier(TaskHandler):
    task = "classify"

    def load(self, folder: Path, manifest: Manifest, settings: RuntimeSettings) -> None:
        _torch(settings)
        tf = require("transformers", "ml")
        self.tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = (
            tf.AutoModelForSequenceClassification.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True
            )
            .to(settings.device)
            .eval()
        )
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.memory_bytes = _param_bytes(self.model)

    def preprocess(self, inputs: list[str]) -> Any:
        return self.tokenizer([str(t) for t in inputs], padding=True, truncation=True, return_tensors="pt")

    def predict(self, batch: Any) -> list[Classification]:
        torch = require("torch", "ml")
        with torch.inference_mode():
            logits = self.model(**{k: v.to(self.model.device) for k, v in batch.items()}).logits
        probs = torch.softmax(logits.float(), dim=-1).cpu().tolist()
        out = []
        for row in probs:
            best = max(range(len(row)), key=row.__getitem__)
            out.append(Classification(self.labels[best], row[best], dict(zip(self.labels, row))))
        return out


class CausalGenerator(TaskHandler):
    """Static batched `generate`; the server's continuous batcher drives the model step by step."""

    task = "generate"

    def load(self, folder: Path, manifest: Manifest, settings: RuntimeSettings) -> None:
        self.torch = _torch(settings)
        tf = require("transformers", "ml")
        self.tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = (
            tf.AutoModelForCausalLM.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True, dtype=self.torch.float32
            )
            .to(settings.device)
            .eval()
        )
        self.memory_bytes = _param_bytes(self.model)

    def render(self, item: GenerateInput) -> str:
        """The prompt text: chat messages go through the tokenizer's chat template when it has one."""
        if item.messages is None:
            return item.prompt or ""
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                [dict(m) for m in item.messages], add_generation_prompt=True, tokenize=False
            )
        return "\n".join(f"{m['role']}: {m['content']}" for m in item.messages) + "\nassistant:"

    def predict(self, batch: list[Any]) -> list[Generation]:
        items = as_generate_inputs(batch)
        results: dict[int, Generation] = {}
        groups: dict[GenerationParams, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.params, []).append(i)
        for params, indices in groups.items():
            prompts = [self.render(items[i]) for i in indices]
            for i, gen in zip(indices, self._generate(prompts, params)):
                results[i] = gen
        return [results[i] for i in range(len(items))]

    def _generate(self, prompts: list[str], params: GenerationParams) -> list[Generation]:
        torch = self.torch
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        # only what a decoder takes: BERT-style tokenizers add token_type_ids that generate() refuses
        enc = {k: enc[k].to(self.model.device) for k in ("input_ids", "attention_mask")}
        if params.seed is not None:
            torch.manual_seed(params.seed)
        sampling = params.temperature > 0
        kwargs = {"do_sample": sampling}
        if sampling:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        with torch.inference_mode():
            out = self.model.generate(
                **enc,
                max_new_tokens=params.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                **kwargs,
            )
        prompt_len = enc["input_ids"].shape[1]
        eos = self.tokenizer.eos_token_id
        results = []
        for row, mask in zip(out[:, prompt_len:].tolist(), enc["attention_mask"].sum(dim=1).tolist()):
            ended = eos in row
            tokens = row[: row.index(eos)] if ended else row
            text, stopped = truncate_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), params.stop)
            if stopped:
                tokens = self.tokenizer.encode(text, add_special_tokens=False)
            results.append(Generation(text, "stop" if ended or stopped else "length", int(mask), len(tokens)))
        return results
