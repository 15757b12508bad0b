"""The request/result contract every edge shares: tasks, generation parameters, inputs, results.

HTTP predict, the OpenAI routes, jobs and stream messages all describe one call the same way: a
model reference, a list of inputs (texts; for generation prompts or chat messages), one set of
`GenerationParameters` with the same limits everywhere, and a deadline. Both engines answer each
input with a `Result`, and `encode_result` is the one place a result becomes JSON or a sink row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import Unprocessable
from ..runtime.base import Classification, GenerateInput, GenerationParams, TokenLogprob

MAX_STOP = 4  # stop strings per request, as OpenAI allows
MIN_SAMPLING_TEMPERATURE = 1e-3  # below this, sampling is greedy (dividing logits by ~0 overflows)
MAX_SEED = 2**63 - 1  # what a torch generator takes


class Task(StrEnum):
    EMBED = "embed"
    CLASSIFY = "classify"
    GENERATE = "generate"


class FinishReason(StrEnum):
    STOP = "stop"  # end of sequence or a stop string
    LENGTH = "length"  # max_new_tokens reached
    CONTENT_FILTER = "content_filter"  # the model's output filter withheld the text


@dataclass(frozen=True, slots=True)
class Timings:
    """When an input passed each stage of its engine (``time.perf_counter()`` seconds): queued,
    taken into a batch or a running row (`started`), the model working on it, and answered.
    Generation also notes its first token. Tracing turns these into child spans after the fact, so
    the engines' loops carry no tracing code."""

    queued: float
    started: float
    model_started: float
    model_finished: float
    finished: float
    batch_size: int
    first_token: float | None = None


@dataclass(frozen=True)
class Result:
    """One input's answer from either engine.

    `output` is an embedding vector (embed), a `Classification` (classify) or the generated text
    (generate). Token counts feed usage and rate limits; `finish_reason` is set for generation.
    """

    output: Any
    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str | None = None
    filtered: bool = False  # the content filter withheld this output
    timings: Timings | None = field(default=None, compare=False, repr=False)
    logprobs: tuple[TokenLogprob, ...] | None = None  # generation, when the parameters asked for them
    cached: bool = False  # answered from the response cache (its token counts are the computed ones)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class GenerationParameters(BaseModel):
    """Sampling parameters of a generation request: the same fields and limits over HTTP predict,
    jobs and stream messages (the OpenAI routes map their own field names onto it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int | None = Field(None, ge=1, description="tokens to generate; default: the server's")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    stop: list[str] = Field(default_factory=list, description=f"at most {MAX_STOP} non-empty stop strings")
    seed: int | None = Field(None, ge=0, le=MAX_SEED - 64, description="makes sampling repeatable")

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value: Any) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP or any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"give at most {MAX_STOP} non-empty stop strings")
        return stops

    def runtime(self, default_max_tokens: int, seed_offset: int = 0) -> GenerationParams:
        """The engine's parameters; with a seed, choice `seed_offset` samples with seed + offset."""
        return GenerationParams(
            max_new_tokens=self.max_new_tokens or default_max_tokens,
            temperature=self.temperature if self.temperature >= MIN_SAMPLING_TEMPERATURE else 0.0,
            top_p=self.top_p,
            stop=tuple(self.stop),
            seed=None if self.seed is None else self.seed + seed_offset,
        )


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    arguments: str  # a JSON object as text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatTurn(BaseModel):
    """One chat message. An assistant turn that called tools has `tool_calls` (its content may be
    null: it becomes empty text); a `tool` turn answers the call named by `tool_call_id`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _no_content(cls, value: Any) -> Any:
        return "" if value is None else value


class PromptInput(BaseModel):
    """One generation input: a raw prompt, or chat messages (exactly one of them), and the tools
    (function definitions, OpenAI's shape) the chat template shows the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str | None = None
    messages: list[ChatTurn] | None = Field(None, min_length=1)
    tools: list[dict[str, Any]] | None = None


def parse_parameters(task: Task, parameters: dict | GenerationParameters | None) -> GenerationParameters | None:
    """Validated generation parameters (None for tasks that take none); 422 `invalid_parameters`."""
    if isinstance(parameters, GenerationParameters):
        return parameters
    if task != Task.GENERATE:
        if parameters:
            raise Unprocessable(f"parameters: a {task} model takes none", code="invalid_parameters")
        return None
    if parameters is not None and not isinstance(parameters, dict):
        raise Unprocessable("parameters: an object is needed", code="invalid_parameters")
    try:
        return GenerationParameters(**(parameters or {}))
    except ValidationError as exc:
        raise Unprocessable(f"parameters.{first_error(exc)}", code="invalid_parameters") from None


def parse_inputs(
    task: Task, inputs: list[Any], params: GenerationParameters | None, default_max_tokens: int, field: str = "inputs"
) -> list[Any]:
    """Engine items for `inputs`: texts for embed/classify, `GenerateInput`s for generate.

    422 `invalid_input` names the first bad input."""
    if task != Task.GENERATE:
        for i, item in enumerate(inputs):
            if not isinstance(item, str) or not item:
                raise Unprocessable(f"{field}.{i}: a non-empty string is needed for this model", code="invalid_input")
        return list(inputs)
    runtime_params = (params or GenerationParameters()).runtime(default_max_tokens)
    items = []
    for i, raw in enumerate(inputs):
        try:
            parsed = PromptInput(prompt=raw) if isinstance(raw, str) else PromptInput(**raw)
        except (ValidationError, TypeError) as exc:
            raise Unprocessable(f"{field}.{i}.{first_error(exc)}", code="invalid_input") from None
        if (parsed.prompt is None) == (parsed.messages is None):
            raise Unprocessable(f"{field}.{i}: give a prompt or messages", code="invalid_input")
        messages = None if parsed.messages is None else tuple(m.model_dump(exclude_none=True) for m in parsed.messages)
        tools = tuple(parsed.tools) if parsed.tools else None
        items.append(GenerateInput(prompt=parsed.prompt, messages=messages, params=runtime_params, tools=tools))
    return items


def first_error(exc: Exception) -> str:
    """`field.path: what is wrong` of the first validation error."""
    if isinstance(exc, ValidationError) and exc.errors():
        err = exc.errors()[0]
        return f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}"
    return f"value: {exc}"


def encode_result(task: Task | str, result: Result) -> dict[str, Any]:
    """The one JSON/row shape of a result: HTTP predict outputs, job results and stream rows."""
    if task == Task.EMBED:
        return {"embedding": result.output, "tokens": result.prompt_tokens}
    if task == Task.CLASSIFY:
        value: Classification = result.output
        return {
            "label": value.label,
            "score": float(value.score),
            "scores": value.scores,
            "tokens": result.prompt_tokens,
        }
    out = {
        "text": result.output,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "tokens": result.total_tokens,
    }
    return out | {"filtered": True} if result.filtered else out
