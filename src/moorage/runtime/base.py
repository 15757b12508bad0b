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
from ..errors import Unprocessable
from ..registry.manifest import Manifest
from .detokenize import Detokenizer, WindowDetokenizer


@dataclass(frozen=True)
class Constraint:
    """What a generation's text must match, enforced while decoding (each row its own).

    `kind` is "json_object" (any JSON object; `spec` empty), "json_schema" (`spec`: the schema as
    canonical JSON text), "regex" (`spec`: the pattern) or "choice" (`spec`: a JSON array of the
    allowed strings). Hashable, so compiled grammars are cached per constraint."""

    kind: str
    spec: str = ""


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    constraint: Constraint | None = None
    logprobs: int | None = None  # None: none; k >= 0: each chosen token's logprob and its k best alternatives


@dataclass(frozen=True)
class GenerateInput:
    """A raw prompt, or chat messages that the tokenizer's chat template turns into one; `tools`
    (function definitions, OpenAI's shape) go to the chat template with them."""

    prompt: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    tools: tuple[dict[str, Any], ...] | None = None


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str  # the token's own text (may be part of a character)
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model, from the step that chose it, and the
    most likely alternatives at that step (best first)."""

    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None  # when the parameters asked for them


@dataclass(frozen=True)
class Classification:
    label: str
    score: float
    scores: dict[str, float]


class TaskHandler:
    task: ClassVar[str]
    precision = ""  # the numeric format it computes in once loaded ("fp32", "bf16", "int8" ...), for /v1/models

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
    `logprobs` holds, per row of the last `add` or `step`, the returned token's logprobs (None for
    rows whose parameters did not ask for them).
    """

    seq_ids: list[int]
    logprobs: list[TokenLogprob | None]

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

    def new_detokenizer(self) -> Detokenizer:
        """A detokeniser for one sequence; the generic one decodes short windows with `decode_tokens`."""
        return WindowDetokenizer(self.decode_tokens)

    def new_batch(self) -> DecodeBatch:
        raise NotImplementedError

    def compile_constraint(self, constraint: Constraint) -> None:
        """Get a constraint ready for this model's decode batches (compiled once, then cached); 422
        `invalid_parameters` when it cannot be. The engine calls it before a sequence is admitted."""
        raise Unprocessable(
            "parameters: this model cannot enforce a response format or guided decoding", code="invalid_parameters"
        )

    def predict(self, batch: list[Any]) -> list[Generation]:
        """Whole generations through the step API: the same loop the continuous batcher streams."""
        items = as_generate_inputs(batch)
        decode = self.new_batch()
        for item in items:
            if item.params.constraint is not None:
                self.compile_constraint(item.params.constraint)
        seqs = [NewSequence(i, self.encode_prompt(item), item.params) for i, item in enumerate(items)]
        streams = {s.seq_id: TextStream(self, s.params, len(s.prompt_ids)) for s in seqs}
        step_tokens = decode.add(seqs)
        while True:
            finished = set()
            for seq_id, token, logprob in zip(list(decode.seq_ids), step_tokens, decode.logprobs):
                streams[seq_id].push(token, logprob)
                if streams[seq_id].result is not None:
                    finished.add(seq_id)
            decode.remove(finished)
            if not decode.seq_ids:
                return [g for g in (streams[i].result for i in range(len(items))) if g is not None]
            step_tokens = decode.step()


class TextStream:
    """Incremental detokenisation of one sequence, with stop strings and end of sequence.

    `push(token)` returns the text that became safe to show: never half a UTF-8 character and never
    the start of what may become a stop string. `result` is set once the sequence is finished. The
    work per token does not grow with the length of the sequence: the generator's detokeniser
    decodes a short window, and stop strings are looked for only where a new one could end (the
    text held back, at most the longest stop string less one character, and the new text).

    With `params.logprobs` set, `push` takes each token's logprobs too: `take_logprobs()` answers
    those pushed since it was last called (the engine sends them with the next event) and the
    result carries them all, one per completion token (an end-of-sequence token has none).
    """

    def __init__(self, generator: StepGenerator, params: GenerationParams, prompt_tokens: int) -> None:
        self.generator = generator
        self.params = params
        self.prompt_tokens = prompt_tokens
        self.num_tokens = 0
        self.result: Generation | None = None
        self._detokenizer = generator.new_detokenizer()
        self._stop = tuple(s for s in params.stop if s)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self._shown: list[str] = []  # the chunks push returned
        self._held = ""  # decoded text not shown yet: it may be the start of a stop string
        self._logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self._taken = 0  # logprobs handed out by take_logprobs

    @property
    def text(self) -> str:
        """All the text so far (shown and held back)."""
        return "".join(self._shown) + self._held

    def push(self, token: int, logprob: TokenLogprob | None = None) -> str:
        if token in self.generator.eos_token_ids:
            return self._finish("stop")
        self.num_tokens += 1
        if self._logprobs is not None and logprob is not None:
            self._logprobs.append(logprob)
        if self._take(self._detokenizer.push(token)):
            return self._finish("stop", flush=False)
        if self.num_tokens >= self.params.max_new_tokens:
            return self._finish("length")
        return self._show(len(self._held) - self._holdback)

    def take_logprobs(self) -> tuple[TokenLogprob, ...]:
        """The logprobs pushed since the last call."""
        if not self._logprobs:
            return ()
        new = tuple(self._logprobs[self._taken :])
        self._taken = len(self._logprobs)
        return new

    def finish(self, reason: str) -> str:
        """End the sequence early (cancelled, context full)."""
        return self._finish(reason)

    def _take(self, new: str) -> bool:
        """Add decoded text; cut it at a stop string that ends in it and say whether one did."""
        if not new:
            return False
        self._held += new
        if not self._stop:
            return False
        self._held, stopped = truncate_at_stop(self._held, self._stop)
        return stopped

    def _finish(self, reason: str, flush: bool = True) -> str:
        if flush and self._take(self._detokenizer.flush()):
            reason = "stop"
        delta = self._show(len(self._held))
        logprobs = None if self._logprobs is None else tuple(self._logprobs)
        self.result = Generation("".join(self._shown), reason, self.prompt_tokens, self.num_tokens, logprobs)
        return delta

    def _show(self, end: int) -> str:
        if end <= 0:
            return ""
        delta, self._held = self._held[:end], self._held[end:]
        self._shown.append(delta)
        return delta


def as_generate_inputs(inputs: list[Any]) -> list[GenerateInput]:
    return [i if isinstance(i, GenerateInput) else GenerateInput(prompt=str(i)) for i in inputs]


def truncate_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Cut `text` at the earliest stop string; say whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)
