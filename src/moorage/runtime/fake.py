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
from .base import (
    Classification,
    GenerateInput,
    GenerationParams,
    NewSequence,
    StepGenerator,
    TaskHandler,
    TokenLogprob,
    TopLogprob,
)

VOCAB = ("the", "model", "serves", "tokens", "fast", "and", "safe", "moorage", "batch", "ready")


def make_fake_model(
    folder: str | Path,
    task: str,
    *,
    dim: int = 8,
    labels: tuple[str, ...] = ("negative", "positive"),
    seed: int = 0,
    delay_ms: float = 0.0,
    crash_after_steps: int | None = None,
    load_delay_ms: float = 0.0,
    load_fails: bool = False,
) -> Path:
    """Write a fake model folder for `task` ('embed', 'classify' or 'generate').

    `crash_after_steps` (generate): the decode step after that many ends the engine thread, as a
    broken device or a native crash would; for testing that nothing waits forever on a dead engine.
    `load_delay_ms`: loading takes this long (a cold start of a large model); `load_fails`: then it
    fails (a broken file, memory exhausted)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    config = {
        "task": task,
        "dim": dim,
        "vocab_size": 1024,
        "labels": list(labels),
        "delay_ms": delay_ms,
        "crash_after_steps": crash_after_steps,
        "load_delay_ms": load_delay_ms,
        "load_fails": load_fails,
    }
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
        time.sleep(float(self.config.get("load_delay_ms", 0.0)) / 1000)  # stands in for reading large weights
        if self.config.get("load_fails"):
            raise RuntimeError("the fake model fails to load, as its fake.json asks")
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


class FakeGenerator(_FakeBase, StepGenerator):
    """Words from a ten-word vocabulary, chosen from the prompt's embedding; no end-of-sequence token.
    Logprobs are those of its scores' softmax; it enforces no constraint (422, as the base says)."""

    num_steps = 0  # decode steps taken, over every batch

    def encode_prompt(self, item: GenerateInput) -> list[int]:
        text = item.prompt if item.prompt is not None else " ".join(m["content"] for m in item.messages or ())
        return [_token_id(t, self.embedding.shape[0]) for t in text.lower().split()] or [0]

    def decode_tokens(self, token_ids: list[int]) -> str:
        return " ".join(VOCAB[i] for i in token_ids)

    def new_batch(self) -> _FakeDecodeBatch:
        return _FakeDecodeBatch(self)


class _FakeDecodeBatch:
    def __init__(self, model: FakeGenerator) -> None:
        self.model = model
        self.seq_ids: list[int] = []
        self.rows: dict[int, tuple[np.ndarray, GenerationParams, np.random.Generator]] = {}
        self.steps: dict[int, int] = {}
        self.logprobs: list[TokenLogprob | None] = []

    def add(self, seqs: list[NewSequence]) -> list[int]:
        self.model._work(len(seqs))
        for seq in seqs:
            vec = self.model.embedding[seq.prompt_ids].mean(axis=0)
            vec = vec / (np.linalg.norm(vec) or 1.0)
            self.rows[seq.seq_id] = (vec, seq.params, np.random.default_rng(seq.params.seed))
            self.steps[seq.seq_id] = 0
            self.seq_ids.append(seq.seq_id)
        return self._tokens([s.seq_id for s in seqs])

    def step(self) -> list[int]:
        self.model._work(len(self.seq_ids))
        self.model.num_steps += 1
        crash_after = self.model.config.get("crash_after_steps")
        if crash_after is not None and self.model.num_steps > crash_after:
            raise SystemExit("the fake model ends its engine thread")
        return self._tokens(self.seq_ids)

    def _tokens(self, seq_ids: list[int]) -> list[int]:
        chosen = [self._next(seq_id) for seq_id in seq_ids]
        self.logprobs = [lp for _, lp in chosen]
        return [token for token, _ in chosen]

    def remove(self, seq_ids: set[int]) -> None:
        self.seq_ids = [s for s in self.seq_ids if s not in seq_ids]
        for seq_id in seq_ids:
            self.rows.pop(seq_id, None)

    def _next(self, seq_id: int) -> tuple[int, TokenLogprob | None]:
        vec, params, rng = self.rows[seq_id]
        step = self.steps[seq_id]
        self.steps[seq_id] = step + 1
        scores = (vec + 0.1 * step) @ self.model.head[:, : len(VOCAB)]
        scores = scores + np.roll(scores, step)
        if params.temperature <= 0:
            token = int(np.argmax(scores))
        else:
            probs = np.exp((scores - scores.max()) / params.temperature)
            token = int(rng.choice(len(VOCAB), p=probs / probs.sum()))
        return token, None if params.logprobs is None else _logprob(scores, token, params.logprobs)


def _logprob(scores: np.ndarray, token: int, k: int) -> TokenLogprob:
    """The token's logprob under the softmax of the scores (before temperature), and the k best."""
    logprobs = scores - scores.max() - np.log(np.exp(scores - scores.max()).sum())
    best = np.argsort(-logprobs, kind="stable")[:k]
    top = tuple(TopLogprob(int(t), VOCAB[t], float(logprobs[t])) for t in best)
    return TokenLogprob(token, VOCAB[token], float(logprobs[token]), top)


if __name__ == "__main__":  # python -m moorage.runtime.fake DIR TASK: a model folder for trying things
    import sys

    if len(sys.argv) != 3 or sys.argv[2] not in ("embed", "classify", "generate"):
        sys.exit("usage: python -m moorage.runtime.fake DIR embed|classify|generate")
    print(make_fake_model(sys.argv[1], sys.argv[2]))
