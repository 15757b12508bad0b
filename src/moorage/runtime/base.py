"""The task-handler contract and the values that cross it.

A handler is loaded once from a verified local folder, then called on batches. It never sees a
request, a socket or a queue: ``preprocess`` (tokenise) -> ``predict`` (compute) -> ``postprocess``
(decode), so a batcher can overlap the first stage of one batch with the second of another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..config import RuntimeSettings
from ..registry.manifest import Manifest


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class GenerateInput:
    """A raw prompt, or chat messages that the tokenizer's chat template turns into one."""

    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    params: GenerationParams = field(default_factory=GenerationParams)


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Classification:
    label: str
    score: float
    scores: dict[str, float]


class TaskHandler:
    task: ClassVar[str]

    def __init__(self) -> None:
        self.memory_bytes = 0

    def load(self, folder: Path, manifest: Manifest, settings: RuntimeSettings) -> None:
        raise NotImplementedError

    def preprocess(self, inputs: list[Any]) -> Any:
        return inputs

    def predict(self, batch: Any) -> list[Any]:
        raise NotImplementedError

    def postprocess(self, outputs: list[Any]) -> list[Any]:
        return outputs

    def __call__(self, inputs: list[Any]) -> list[Any]:
        return self.postprocess(self.predict(self.preprocess(inputs)))


def as_generate_inputs(inputs: list[Any]) -> list[GenerateInput]:
    return [i if isinstance(i, GenerateInput) else GenerateInput(prompt=str(i)) for i in inputs]


def truncate_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Cut `text` at the earliest stop string; say whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)
