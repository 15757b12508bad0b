"""The request/result contract every edge shares: tasks, generation parameters, inputs, results.

HTTP predict, the OpenAI routes, jobs and stream messages all describe one call the same way: a
model reference, a list of inputs (texts; for generation prompts or chat messages), one set of
`GenerationParameters` with the same limits everywhere, and a deadline. Both engines answer each
input with a `Result`, and `encode_result` is the one place a result becomes JSON or a sink row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import MissingDependency, Unprocessable
from ..runtime import constraints
from ..runtime.base import Classification, Constraint, GenerateInput, GenerationParams, TokenLogprob

MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows
MAX_CHOICES = 256  # guided_choice strings
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
    is_json: bool = False  # generation under a JSON constraint: the text is JSON once complete

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _compilable(constraint: Constraint) -> Constraint:
    """The constraint, once the grammar library took it (ValueError naming what is wrong otherwise).
    Without the library installed no model here can enforce it: the engine answers for it then."""
    try:
        constraints.check(constraint)
    except MissingDependency:
        pass
    return constraint


def _schema_text(schema: Any) -> str:
    """A JSON Schema as compact JSON text (its key order kept: properties are generated in it)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise ValueError("a JSON Schema (an object, or its JSON text) is needed") from None
    if not isinstance(schema, dict):
        raise ValueError("a JSON Schema (an object, or its JSON text) is needed")
    text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    try:
        _compilable(Constraint("json_schema", text))
    except ValueError as exc:
        raise ValueError(f"not a JSON Schema this server can enforce: {exc}") from None
    return text


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`; the schema is always enforced (as with `strict: true`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field("response", min_length=1, max_length=64)
    description: str | None = None
    schema_: str = Field("{}", alias="schema", description="the JSON Schema the output follows")
    strict: bool | None = None

    @field_validator("schema_", mode="before")
    @classmethod
    def _schema(cls, value: Any) -> str:
        return _schema_text(value)


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON that follows a schema."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is needed with type json_schema, and only then")
        return self


CONSTRAINT_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice")


class GenerationParameters(BaseModel):
    """Sampling parameters of a generation request: the same fields and limits over HTTP predict,
    jobs and stream messages (the OpenAI routes map their own field names onto it).

    At most one constraint on the text: `response_format` (OpenAI's shape) or vLLM's guided decoding
    fields, `guided_json` (a JSON Schema), `guided_regex` or `guided_choice`. Each is compiled
    while the parameters are validated, so one the grammar library refuses is a 422 that names it.
    `logprobs`: each generated token's logprob and that many best alternatives."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int | None = Field(None, ge=1, description="tokens to generate; default: the server's")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    stop: list[str] = Field(default_factory=list, description=f"at most {MAX_STOP} non-empty stop strings")
    seed: int | None = Field(None, ge=0, le=MAX_SEED - 64, description="makes sampling repeatable")
    response_format: ResponseFormat | None = None
    guided_json: str | None = Field(None, description="a JSON Schema the output follows")
    guided_regex: str | None = Field(None, min_length=1, description="a regular expression the output matches")
    guided_choice: list[str] | None = Field(
        None, min_length=1, max_length=MAX_CHOICES, description="the output is one of these strings"
    )
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="alternatives per token with logprobs")

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value: Any) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP or any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"give at most {MAX_STOP} non-empty stop strings")
        return stops

    @field_validator("guided_json", mode="before")
    @classmethod
    def _guided_json(cls, value: Any) -> str | None:
        return None if value is None else _schema_text(value)

    @field_validator("guided_regex")
    @classmethod
    def _guided_regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                _compilable(Constraint("regex", value))
            except ValueError as exc:
                raise ValueError(f"not a regular expression this server can enforce: {exc}") from None
        return value

    @field_validator("guided_choice")
    @classmethod
    def _guided_choice(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not c for c in value):
            raise ValueError("give non-empty strings")
        return value

    @model_validator(mode="after")
    def _one_constraint(self) -> GenerationParameters:
        given = [name for name in CONSTRAINT_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise Unprocessable(
                f"parameters: give at most one of {', '.join(CONSTRAINT_FIELDS)} (got {', '.join(given)})",
                code="invalid_parameters",
            )
        return self

    def constraint(self) -> Constraint | None:
        """What the text must match, if anything."""
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            return Constraint("json_object")
        if fmt is not None and fmt.json_schema is not None:
            return Constraint("json_schema", fmt.json_schema.schema_)
        if self.guided_json is not None:
            return Constraint("json_schema", self.guided_json)
        if self.guided_regex is not None:
            return Constraint("regex", self.guided_regex)
        if self.guided_choice is not None:
            return Constraint("choice", json.dumps(self.guided_choice, ensure_ascii=False))
        return None

    def runtime(self, default_max_tokens: int, seed_offset: int = 0) -> GenerationParams:
        """The engine's parameters; with a seed, choice `seed_offset` samples with seed + offset."""
        return GenerationParams(
            max_new_tokens=self.max_new_tokens or default_max_tokens,
            temperature=self.temperature if self.temperature >= MIN_SAMPLING_TEMPERATURE else 0.0,
            top_p=self.top_p,
            stop=tuple(self.stop),
            seed=None if self.seed is None else self.seed + seed_offset,
            constraint=self.constraint(),
            logprobs=self.logprobs,
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
    if result.logprobs is not None:
        out["logprobs"] = [encode_logprob(lp) for lp in result.logprobs]
    if result.is_json and not result.filtered:
        try:
            out["json"] = json.loads(result.output)
        except ValueError:  # cut by max_new_tokens (finish_reason "length") or by a stop string
            pass
    return out | {"filtered": True} if result.filtered else out


def encode_logprob(lp: TokenLogprob) -> dict[str, Any]:
    """One token's logprobs as JSON: its id, text and logprob, and the best alternatives (`top`)."""
    return {
        "token": lp.token,
        "token_id": lp.token_id,
        "logprob": lp.logprob,
        "top": [{"token": t.token, "token_id": t.token_id, "logprob": t.logprob} for t in lp.top],
    }
