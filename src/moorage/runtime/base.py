"""The task-handler contract and the values that cross it.

A handler is loaded once from a verified local folder, then called on batches. It never sees a
request, a socket or a queue: ``preprocess`` (tokenise) -> ``predict`` (compute) -> ``postprocess``
(decode), so a batcher can overlap the first stage of one batch with the second of another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

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

    def token_counts(self, features: Any, inputs: list[Any]) -> list[int]:
        """Tokens per input (for usage counts), from the tokenizer's attention mask when there is one."""
        try:
            return [int(n) for n in features["attention_mask"].sum(-1).tolist()]
        except (TypeError, KeyError, IndexError, AttributeError):
            return [len(str(i).split()) for i in inputs]

    def __call__(self, inputs: list[Any]) -> list[Any]:
        return self.postprocess(self.predict(self.preprocess(inputs)))


@dataclass(frozen=True)
class NewSequence:
    """A sequence joining a running decode batch: its prompt tokens and sampling parameters."""

    seq_id: int
    prompt_ids: list[int]
    params: GenerationParams


class DecodeBatch(Protocol):
    """The running sequences of a continuous batch and their KV cache, one row per sequence.

    `add` prefills new sequences and returns the first token of each; `step` decodes one token for
    every running sequence, in the order of `seq_ids`; `remove` drops finished or cancelled rows.
    """

    seq_ids: list[int]

    def add(self, seqs: list[NewSequence]) -> list[int]: ...

    def step(self) -> list[int]: ...

    def remove(self, seq_ids: set[int]) -> None: ...


class StepGenerator(TaskHandler):
    """A generate handler a continuous batcher can drive one decode step at a time."""

    task = "generate"
    eos_token_ids: frozenset[int] = frozenset()
    max_context: int = 2048

    def encode_prompt(self, item: GenerateInput) -> list[int]:
        raise NotImplementedError

    def decode_tokens(self, token_ids: list[int]) -> str:
        raise NotImplementedError

    def new_batch(self) -> DecodeBatch:
        raise NotImplementedError

    def predict(self, batch: list[Any]) -> list[Generation]:
        """Whole generations through the step API: the same loop the continuous batcher streams."""
        items = as_generate_inputs(batch)
        decode = self.new_batch()
        seqs = [NewSequence(i, self.encode_prompt(item), item.params) for i, item in enumerate(items)]
        streams = {s.seq_id: TextStream(self, s.params, len(s.prompt_ids)) for s in seqs}
        step_tokens = decode.add(seqs)
        while True:
            finished = set()
            for seq_id, token in zip(list(decode.seq_ids), step_tokens):
                streams[seq_id].push(token)
                if streams[seq_id].result is not None:
                    finished.add(seq_id)
            decode.remove(finished)
            if not decode.seq_ids:
                return [streams[i].result for i in range(len(items))]
            step_tokens = decode.step()


class TextStream:
    """Incremental detokenisation of one sequence, with stop strings and end of sequence.

    `push(token)` returns the text that became safe to show: never half a UTF-8 character and never
    the start of what may become a stop string. `result` is set once the sequence is finished.
    """

    def __init__(self, generator: StepGenerator, params: GenerationParams, prompt_tokens: int) -> None:
        self.generator = generator
        self.params = params
        self.prompt_tokens = prompt_tokens
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0
        self.result: Generation | None = None
        self._holdback = max((len(s) for s in params.stop), default=1) - 1

    def push(self, token: int) -> str:
        if token in self.generator.eos_token_ids:
            return self._finish("stop")
        self.tokens.append(token)
        self.text = self.generator.decode_tokens(self.tokens)
        if self.params.stop:
            self.text, stopped = truncate_at_stop(self.text, self.params.stop)
            if stopped:
                return self._finish("stop")
        if len(self.tokens) >= self.params.max_new_tokens:
            return self._finish("length")
        if self.text.endswith("\ufffd"):  # a multi-byte character split across tokens
            return ""
        return self._emit(len(self.text) - self._holdback)

    def finish(self, reason: str) -> str:
        """End the sequence early (cancelled, context full)."""
        return self._finish(reason)

    def _finish(self, reason: str) -> str:
        self.result = Generation(self.text, reason, self.prompt_tokens, len(self.tokens))
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : end], end
        return delta


def as_generate_inputs(inputs: list[Any]) -> list[GenerateInput]:
    return [i if isinstance(i, GenerateInput) else GenerateInput(prompt=str(i)) for i in inputs]


def truncate_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Cut `text` at the earliest stop string; say whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)
