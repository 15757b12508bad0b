"""Fake models, one per task, for tests and docs: real files, checksums and loading, no torch.

A fake model folder holds ``fake.json`` (task, sizes, labels) and ``weights.safetensors``. Outputs
depend on the input text and on the weights, deterministically, so a changed weight file would
change results (and is refused before that by its checksum).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from ..config import RuntimeSettings
from ..registry.manifest import Manifest
from .base import Classification, Generation, TaskHandler, as_generate_inputs, truncate_at_stop

VOCAB = ("the", "model", "serves", "tokens", "fast", "and", "safe", "moorage", "batch", "ready")


def make_fake_model(
    folder: str | Path,
    task: str,
    *,
    dim: int = 8,
    labels: tuple[str, ...] = ("negative", "positive"),
    seed: int = 0,
    delay_ms: float = 0.0,
) -> Path:
    """Write a fake model folder for `task` ('embed', 'classify' or 'generate')."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    config = {"task": task, "dim": dim, "vocab_size": 1024, "labels": list(labels), "delay_ms": delay_ms}
    (folder / "fake.json").write_text(json.dumps(config, indent=2))
    save_file(
        {
            "embedding": rng.standard_normal((1024, dim)).astype(np.float32),
            "head": rng.standard_normal((dim, max(len(labels), len(VOCAB)))).astype(np.float32),
        },
        str(folder / "weights.safetensors"),
    )
    return folder


def _token_id(token: str, vocab_size: int) -> int:
    return int.from_bytes(hashlib.sha256(token.encode()).digest()[:4], "little") % vocab_size


class _FakeBase(TaskHandler):
    def load(self, folder: Path, manifest: Manifest, settings: RuntimeSettings) -> None:
        from safetensors.numpy import load_file

        self.config = json.loads((folder / "fake.json").read_text())
        weights = load_file(str(folder / "weights.safetensors"))
        self.embedding, self.head = weights["embedding"], weights["head"]
        self.memory_bytes = self.embedding.nbytes + self.head.nbytes
        self.delay_s = float(self.config.get("delay_ms", 0.0)) / 1000

    def _embed(self, text: str) -> np.ndarray:
        ids = [_token_id(t, self.embedding.shape[0]) for t in text.lower().split()] or [0]
        vec = self.embedding[ids].mean(axis=0)
        return vec / (np.linalg.norm(vec) or 1.0)

    def _work(self, batch_size: int) -> None:
        if self.delay_s:  # stands in for compute time, to exercise batching
            time.sleep(self.delay_s * (1 + 0.1 * batch_size))


class FakeEmbedder(_FakeBase):
    task = "embed"

    def predict(self, batch: list[str]) -> list[np.ndarray]:
        self._work(len(batch))
        return [self._embed(str(t)).astype(np.float32) for t in batch]


class FakeClassifier(_FakeBase):
    task = "classify"

    def predict(self, batch: list[str]) -> list[Classification]:
        self._work(len(batch))
        labels = self.config["labels"]
        out = []
        for text in batch:
            logits = self._embed(str(text)) @ self.head[:, : len(labels)]
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            best = int(probs.argmax())
            out.append(Classification(labels[best], float(probs[best]), dict(zip(labels, map(float, probs)))))
        return out


class FakeGenerator(_FakeBase):
    task = "generate"

    def predict(self, batch) -> list[Generation]:
        self._work(len(batch))
        out = []
        for item in as_generate_inputs(batch):
            prompt = item.prompt if item.prompt is not None else " ".join(m["content"] for m in item.messages or ())
            vec = self._embed(prompt)
            words = []
            for step in range(item.params.max_new_tokens):
                scores = (vec + 0.1 * step) @ self.head[:, : len(VOCAB)]
                words.append(VOCAB[int(np.argmax(scores + np.roll(scores, step)))])
            text, stopped = truncate_at_stop(" ".join(words), item.params.stop)
            out.append(
                Generation(
                    text=text,
                    finish_reason="stop" if stopped else "length",
                    prompt_tokens=len(prompt.split()),
                    completion_tokens=len(text.split()) if stopped else item.params.max_new_tokens,
                )
            )
        return out


if __name__ == "__main__":  # python -m moorage.runtime.fake DIR TASK: a model folder for trying things
    import sys

    if len(sys.argv) != 3 or sys.argv[2] not in ("embed", "classify", "generate"):
        sys.exit("usage: python -m moorage.runtime.fake DIR embed|classify|generate")
    print(make_fake_model(sys.argv[1], sys.argv[2]))
