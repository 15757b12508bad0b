"""OpenAI's Responses API, ``POST /v1/responses``, over the same engine as chat completions.

Text input or input messages (plus `instructions`) become one chat call through
`InferenceService`; the answer is a response object with one assistant message (or the function
calls it makes, with ``tools``: the chat route's `tools.ToolPlan`), or, with ``stream: true``, the
Responses API's typed server-sent events, numbered by `sequence_number`. `text.format` and logprobs
map onto the engine's constraints and logprobs.
Nothing is stored (``store`` defaults to false here), so ``store: true`` and
``previous_response_id`` are refused. Every field of the Responses API that moorage does not
implement answers 400 ``unsupported_parameter`` naming it, unless it holds its neutral value (e.g.
``tools: []``): nothing a client asks for is silently ignored.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator
from starlette.responses import Response

from ..batching import Result, Task, TokenEvent
from ..batching.contract import MAX_LOGPROBS, FinishReason, JsonSchemaFormat, ResponseFormat, first_error
from ..errors import BadRequest, MoorageError, Unprocessable
from ..runtime.base import TokenLogprob
from .common import mark, service_of
from .openai import _chat_logprobs, answer
from .schemas import unsupported
from .security import authorize_model, usage
from .tools import ToolPlan

log = logging.getLogger("moorage.server")

router = APIRouter(tags=["openai"])

LOGPROBS_INCLUDE = "message.output_text.logprobs"
MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


# ---- the request ---------------------------------------------------------------------------------
class ContentPart(BaseModel):
    """A part of a message's content: ``input_text`` (or ``output_text``, an earlier response's
    output passed back); other part types (images, files, audio) answer 400 unsupported_parameter."""

    model_config = ConfigDict(extra="ignore")

    type: str = Field(description="input_text or output_text")
    text: str | None = None


class InputItem(BaseModel):
    """An input item: a message (``type`` "message", the default), an earlier ``function_call`` or
    the ``function_call_output`` that answers it. Other item types (reasoning, item references)
    answer 400 unsupported_parameter."""

    model_config = ConfigDict(extra="ignore")  # an output item passed back carries its id and status

    type: str = Field("message", description="message, function_call or function_call_output")
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: str | list[ContentPart] | None = None
    call_id: str | None = Field(None, description="function_call, function_call_output")
    name: str | None = Field(None, description="function_call: the function")
    arguments: str | None = Field(None, description="function_call: its arguments, a JSON object as text")
    output: str | None = Field(None, description="function_call_output: the function's result")


class FunctionTool(BaseModel):
    """A function the model may call (the Responses API's flat shape). Other tool types (web search,
    file search, computer use ...) answer 400 unsupported_parameter."""

    model_config = ConfigDict(extra="ignore")

    type: str = Field(description="function")
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = Field(None, description="json_schema: the schema's name")
    json_schema: dict[str, Any] | None = Field(None, alias="schema", description="json_schema: the JSON Schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: TextFormat = Field(default_factory=TextFormat)
    verbosity: str | None = Field(None, description="only the neutral value, medium")


class ResponsesRequest(BaseModel):
    """The fields of ``POST /v1/responses`` that moorage implements. The Responses API's other fields
    are accepted only at their neutral value (null, ``tools: []``, ``background: false`` ...);
    anything else answers 400 unsupported_parameter with ``error.param`` naming the field."""

    model_config = ConfigDict(extra="allow")

    model: str
    input: str | list[InputItem] = Field(description="text, or input messages (at least one)")
    instructions: str | None = Field(None, description="a system message put before the input")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default 1")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="default 1")
    seed: int | None = Field(None, description="moorage's extension: makes sampling repeatable")
    stream: bool | None = False
    store: bool | None = Field(False, description="responses are not stored: only false")
    text: TextConfig | None = None
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=16)
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    include: list[str] | None = Field(None, description=f"only {LOGPROBS_INCLUDE!r}")
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = Field(
        None, description='auto (default with tools), none, required, or {"type": "function", "name": ...}'
    )
    parallel_tool_calls: bool | None = Field(None, description="default true")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="alternatives per output token")

    @property
    def logprobs(self) -> int | None:
        """How many alternatives each output token's logprobs carry; None: no logprobs asked for."""
        if LOGPROBS_INCLUDE in (self.include or ()) or self.top_logprobs is not None:
            return self.top_logprobs or 0
        return None

    @field_validator("input")
    @classmethod
    def _some_input(cls, value: str | list[InputItem]) -> str | list[InputItem]:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one input item")
        return value


# Fields the Responses API defines that moorage does not implement, with the values that ask for
# nothing (null always does). Any other field or value answers 400 unsupported_parameter.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "background": (False,),
    "max_tool_calls": (),
    "truncation": ("disabled",),
    "service_tier": ("auto", "default"),
    "reasoning": ({},),
    "stream_options": ({}, {"include_obfuscation": False}, {"include_obfuscation": True}),
    "prompt_cache_retention": ("in_memory",),
    "previous_response_id": (),
    "conversation": (),
    "prompt": (),
    "context_management": (),
    "moderation": (),
    "image": (),
    "access_programs": (),
    "background_options": (),
    "prompt_cache_options": (),
}


def refuse_unsupported(body: ResponsesRequest, ignored: frozenset[str] = frozenset()) -> None:
    """400 `unsupported_parameter` for the first field that asks for something moorage does not do
    (fields in `ignored`, the server's ``serve.ignore_unsupported``, are let through)."""
    if body.store:
        raise BadRequest(
            "store: true is not supported: responses are not stored here", code="unsupported_parameter", param="store"
        )
    if body.text is not None and body.text.verbosity not in (None, "medium"):
        raise unsupported("text.verbosity", "this server does not implement verbosity")
    for value in body.include or ():
        if value != LOGPROBS_INCLUDE:
            raise unsupported("include", f"this server does not implement include {value!r}")
    _refuse_tools(body)
    for name, value in (body.model_extra or {}).items():
        if value is None or name in ignored:
            continue
        if name not in _NEUTRAL:
            raise unsupported(name, "this server does not implement this parameter")
        if value not in _NEUTRAL[name]:
            raise unsupported(name, f"this server does not implement {_short(value)}, only its neutral value")
    for i, item in enumerate(body.input if isinstance(body.input, list) else ()):
        _refuse_item(i, item)


def _refuse_tools(body: ResponsesRequest) -> None:
    for i, tool in enumerate(body.tools or ()):
        if tool.type != "function":
            raise unsupported(f"tools.{i}.type", f"this server calls functions only, not {tool.type!r} tools")
    if isinstance(body.tool_choice, dict) and body.tool_choice.get("type") != "function":
        raise unsupported("tool_choice", "this server takes auto, none, required or a named function")


def _refuse_item(i: int, item: InputItem) -> None:
    if item.type not in ("message", "function_call", "function_call_output"):
        raise unsupported(f"input.{i}.type", f"this server does not implement input items of type {item.type!r}")
    for j, part in enumerate(item.content if isinstance(item.content, list) else ()):
        if part.type not in ("input_text", "output_text"):
            raise unsupported(f"input.{i}.content.{j}.type", f"this server takes text parts, not {part.type!r}")


def _short(value: Any) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= 40 else text[:37] + "..."


def messages_of(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The chat messages of a request: `instructions` as a system message, then the input; function
    calls join the assistant turn before them, as chat's `tool_calls`, and their outputs are tool turns."""
    messages: list[dict[str, Any]] = []
    if body.instructions is not None:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return [*messages, {"role": "user", "content": body.input}]
    for i, item in enumerate(body.input):
        turn = _turn(i, item)
        last = messages[-1] if messages else None
        if "tool_calls" in turn and last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).extend(turn["tool_calls"])
        else:
            messages.append(turn)
    return messages


def _turn(i: int, item: InputItem) -> dict[str, Any]:
    if item.type == "function_call":
        _require(i, item, "call_id", "name", "arguments")
        function = {"name": item.name, "arguments": item.arguments}
        return {"role": "assistant", "content": "", "tool_calls": [{"id": item.call_id, "function": function}]}
    if item.type == "function_call_output":
        _require(i, item, "call_id", "output")
        return {"role": "tool", "content": item.output, "tool_call_id": item.call_id}
    if item.role is None or item.content is None:
        raise Unprocessable(f"input.{i}: a message needs a role and content", param=f"input.{i}")
    if isinstance(item.content, str):
        return {"role": item.role, "content": item.content}
    for j, part in enumerate(item.content):
        if part.text is None:
            where = f"input.{i}.content.{j}.text"
            raise Unprocessable(f"{where}: a text part needs its text", param=where)
    return {"role": item.role, "content": "".join(part.text or "" for part in item.content)}


def _require(i: int, item: InputItem, *names: str) -> None:
    for name in names:
        if getattr(item, name) is None:
            raise Unprocessable(f"input.{i}.{name}: a {item.type} item needs it", param=f"input.{i}.{name}")


def plan_of(body: ResponsesRequest) -> ToolPlan:
    """The request's tools as the chat route's tool plan (its prompts, call schema and parsing)."""
    tools = [
        {"type": "function", "function": tool.model_dump(exclude_none=True, exclude={"type"})}
        for tool in body.tools or ()
    ]
    choice: str | dict[str, Any] | None = body.tool_choice
    if choice == "auto" and not tools:
        choice = None  # nothing to choose from: the same as no choice
    if isinstance(choice, dict):
        choice = {"type": "function", "function": {"name": str(choice.get("name", ""))}}
    parallel = True if body.parallel_tool_calls is None else body.parallel_tool_calls
    return ToolPlan.of(tools, choice, parallel)


def parameters_of(body: ResponsesRequest, plan: ToolPlan) -> dict[str, Any]:
    """The Responses API's sampling fields under the one parameter model's names; a required or named
    tool_choice constrains the output to the JSON Schema of a call."""
    params = {
        "max_new_tokens": body.max_output_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "seed": body.seed,
        "logprobs": body.logprobs,
    }
    response_format = _response_format(body.text.format) if body.text else None
    schema = plan.call_schema()
    if schema is not None and response_format is not None:
        raise BadRequest(
            "text.format: a required or named tool_choice already constrains the output to a function call",
            code="invalid_parameter",
            param="text.format",
        )
    if schema is not None:
        try:
            call = JsonSchemaFormat(name="tool_calls", schema=schema, strict=True)  # type: ignore[call-arg]
        except ValidationError as exc:  # a function's parameters that the grammar library cannot enforce
            raise Unprocessable(f"tools: {first_error(exc)}", code="invalid_parameters", param="tools") from None
        response_format = ResponseFormat(type="json_schema", json_schema=call)
    return params if response_format is None else params | {"response_format": response_format}


def _response_format(fmt: TextFormat) -> ResponseFormat | None:
    """`text.format` (the Responses API's flat shape) as the engine's response format, compiled
    now so that a schema it cannot enforce is a 422 naming its field under ``text.format``."""
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    if fmt.json_schema is None:
        raise Unprocessable(
            "text.format.schema: a JSON Schema is needed with type json_schema", param="text.format.schema"
        )
    try:
        schema = JsonSchemaFormat(**fmt.model_dump(by_alias=True, exclude_none=True, exclude={"type"}))
    except ValidationError as exc:
        where = ".".join(["text", "format", *map(str, exc.errors()[0]["loc"] if exc.errors() else ())])
        raise Unprocessable(f"text.format.{first_error(exc)}", code="invalid_parameters", param=where) from None
    return ResponseFormat(type="json_schema", json_schema=schema)


# ---- the response, as documented (the route renders it with orjson) -------------------------------
class OutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[Any]


class OutputMessage(BaseModel):
    type: Literal["message"]
    id: str = Field(description="msg_...")
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"]
    content: list[OutputText]


class FunctionCall(BaseModel):
    type: Literal["function_call"]
    id: str = Field(description="fc_...")
    call_id: str = Field(description="call_...: what a function_call_output answers")
    name: str
    arguments: str = Field(description="a JSON object as text")
    status: Literal["in_progress", "completed", "incomplete"]


class Usage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int] = Field(description="cached_tokens, cache_write_tokens: 0")
    output_tokens: int
    output_tokens_details: dict[str, int] = Field(description="reasoning_tokens: 0")
    total_tokens: int


class ResponseObject(BaseModel):
    """A response; streamed (``stream: true``) as ``text/event-stream``: response.created,
    response.in_progress, response.output_item.added, response.content_part.added,
    response.output_text.delta (one per piece of text), response.output_text.done,
    response.content_part.done, response.output_item.done, then response.completed or
    response.incomplete; a failure after the first event: an ``error`` event and response.failed."""

    id: str = Field(description="resp_...")
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: dict[str, Any] | None
    incomplete_details: dict[str, str] | None = Field(description='{"reason": "max_output_tokens" | "content_filter"}')
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputMessage | FunctionCall]
    parallel_tool_calls: bool
    previous_response_id: None
    reasoning: dict[str, Any]
    store: Literal[False]
    temperature: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[Any]
    top_p: float
    truncation: Literal["disabled"]
    usage: Usage | None
    user: str | None
    metadata: dict[str, str]
    top_logprobs: int | None


_DOCUMENTED: dict[int | str, dict[str, Any]] = {
    200: {
        "model": ResponseObject,
        "description": "the response, or with stream: true its server-sent events",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


# ---- the route -----------------------------------------------------------------------------------
@router.post("/v1/responses", response_model=None, responses=_DOCUMENTED)
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    """Create a model response (OpenAI's Responses API): text or messages in, an assistant message or
    function calls out; with ``stream: true`` the Responses API's server-sent events. Not stored."""
    refuse_unsupported(body, frozenset(request.app.state.settings.serve.ignore_unsupported))
    messages = messages_of(body)
    policy = authorize_model(request, body.model)
    plan = plan_of(body)
    parameters = parameters_of(body, plan)
    service = service_of(request)
    sv = await service.pool.acquire_loaded(body.model, task=Task.GENERATE)  # a cold start holds it
    try:
        mark(request, sv)
        inputs = [plan.render(messages, getattr(sv.loaded.handler, "takes_tools", False))]
        call = service.prepare(sv.task, inputs, parameters, policy=policy, field="input")
    except BaseException:
        service.pool.release(sv)
        raise
    out = _Rendering(body, plan)

    def whole(results: list[Result]) -> dict:
        (result,) = results
        usage(request, result.total_tokens)
        return out.response(result, result.output)

    return await answer(
        request, sv, call, bool(body.stream), whole, lambda first, events: _events(out, first[1], events, request)
    )


# ---- rendering -----------------------------------------------------------------------------------
def status_of(result: Result) -> tuple[str, dict[str, str] | None]:
    """(status, incomplete_details) of a finished generation."""
    if result.finish_reason == FinishReason.LENGTH:
        return "incomplete", {"reason": "max_output_tokens"}
    if result.finish_reason == FinishReason.CONTENT_FILTER:
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def usage_of(result: Result) -> dict[str, Any]:
    return {
        "input_tokens": result.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": result.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": result.total_tokens,
    }


class _Rendering:
    """One response's objects: the response itself in each state, its message and its text part."""

    def __init__(self, body: ResponsesRequest, plan: ToolPlan) -> None:
        self.body = body
        self.plan = plan
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())

    def response(
        self, result: Result | None, text: str, *, status: str | None = None, error: dict | None = None
    ) -> dict[str, Any]:
        """The response object: in progress (no result yet), failed (`error`), or finished."""
        body = self.body
        details = None
        if result is not None:
            status, details = status_of(result)
        fmt = body.text.format if body.text else TextFormat()
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": details,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": body.model,
            "output": []
            if result is None
            else self.output(result, text, "completed" if details is None else "incomplete"),
            "parallel_tool_calls": self.plan.parallel,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)},
            "tool_choice": body.tool_choice or ("auto" if body.tools else "none"),
            "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or ()],
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "truncation": "disabled",
            "usage": None if result is None else usage_of(result),
            "user": body.user,
            "metadata": body.metadata or {},
            "top_logprobs": body.top_logprobs,
        }

    def output(self, result: Result, text: str, status: str) -> list[dict[str, Any]]:
        """The output items: the message, or the function calls the text makes (and any text around them)."""
        parsed = self.plan.parse(text)
        if parsed is None:
            return [self.message(text, status, result)]
        message = [self.message(parsed.content, status)] if parsed.content else []
        return message + [self.function_call(call, "completed") for call in parsed.calls]

    @staticmethod
    def function_call(call: dict[str, Any], status: str, arguments: str | None = None) -> dict[str, Any]:
        function = call["function"]
        return {
            "type": "function_call",
            "id": "fc_" + call["id"].removeprefix("call_"),
            "call_id": call["id"],
            "name": function["name"],
            "arguments": function["arguments"] if arguments is None else arguments,
            "status": status,
        }

    def message(self, text: str | None, status: str, result: Result | None = None) -> dict[str, Any]:
        content = [] if text is None else [self.part(text, result.logprobs if result else None)]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    def part(self, text: str, logprobs: Sequence[TokenLogprob] | None = None) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": self.logprobs(logprobs)}

    def logprobs(self, tokens: Sequence[TokenLogprob] | None) -> list[dict[str, Any]]:
        """The tokens' logprobs in the Responses API's shape (chat's: token, logprob, bytes, top_logprobs)."""
        rendered = _chat_logprobs(list(tokens or ()), self.body.logprobs)
        return [] if rendered is None else rendered["content"]


class _Events:
    """The Responses API's server-sent events of one response, numbered in the order sent."""

    def __init__(self, out: _Rendering) -> None:
        self.out = out
        self.sequence_number = 0

    def event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def part_event(self, kind: str, **fields: Any) -> bytes:
        return self.event(kind, item_id=self.out.message_id, output_index=0, content_index=0, **fields)

    def opening(self) -> list[bytes]:
        started = self.out.response(None, "", status="in_progress")
        return [self.event("response.created", response=started), self.event("response.in_progress", response=started)]

    def message_opening(self) -> list[bytes]:
        return [
            self.event("response.output_item.added", output_index=0, item=self.out.message(None, "in_progress")),
            self.part_event("response.content_part.added", part=self.out.part("")),
        ]

    def delta(self, text: str, logprobs: Sequence[TokenLogprob]) -> bytes:
        return self.part_event("response.output_text.delta", delta=text, logprobs=self.out.logprobs(logprobs))

    def closing(self, result: Result, text: str, streamed: bool) -> list[bytes]:
        """The events of the finished output items (those of a message whose text was `streamed` only
        close it), then the finished response."""
        response = self.out.response(result, text)
        out: list[bytes] = []
        for index, item in enumerate(response["output"]):
            if item["type"] == "function_call":
                out += self.function_call(index, item)
                continue
            part = item["content"][0]
            if not streamed:
                out += [
                    *self.message_opening(),
                    self.part_event("response.output_text.delta", delta=part["text"], logprobs=part["logprobs"]),
                ]
            out += [
                self.part_event("response.output_text.done", text=part["text"], logprobs=part["logprobs"]),
                self.part_event("response.content_part.done", part=part),
                self.event("response.output_item.done", output_index=index, item=item),
            ]
        ending = "completed" if response["status"] == "completed" else "incomplete"
        return [*out, self.event(f"response.{ending}", response=response)]

    def function_call(self, index: int, item: dict[str, Any]) -> list[bytes]:
        where = {"item_id": item["id"], "output_index": index}
        arguments = item["arguments"]
        return [
            self.event(
                "response.output_item.added",
                output_index=index,
                item={**item, "status": "in_progress", "arguments": ""},
            ),
            self.event("response.function_call_arguments.delta", **where, delta=arguments),
            self.event("response.function_call_arguments.done", **where, name=item["name"], arguments=arguments),
            self.event("response.output_item.done", output_index=index, item=item),
        ]

    def failure(self, code: str, message: str, param: str | None = None) -> list[bytes]:
        failed = self.out.response(None, "", status="failed", error={"code": code, "message": message})
        return [
            self.event("error", code=code, message=message, param=param),
            self.event("response.failed", response=failed),
        ]


async def _events(out: _Rendering, first: TokenEvent, events, request: Request) -> AsyncIterator[bytes]:
    """The SSE body. Text streams as it comes, unless the output may be a function call (the request
    has tools): then the items are sent once the output is known. Once the headers are sent an error
    travels as an ``error`` event and ``response.failed``: a client never sees a cut stream."""
    sse = _Events(out)
    streamed = out.plan.mode == "none"
    texts: list[str] = []
    pending: list[TokenLogprob] = []  # of tokens whose text is still held back (a partial character)
    try:
        for part in sse.opening() + (sse.message_opening() if streamed else []):
            yield part
        event: TokenEvent | None = first
        while event is not None:
            pending.extend(event.logprobs)
            if event.text:
                texts.append(event.text)
                if streamed:
                    yield sse.delta(event.text, pending)
                    pending = []
            if event.result is not None:
                usage(request, event.result.total_tokens)
                for part in sse.closing(event.result, "".join(texts), streamed):
                    yield part
                return
            event = (await anext(events, (0, None)))[1]
        raise RuntimeError("the generation ended without a result")
    except MoorageError as exc:
        failure = sse.failure(exc.code, exc.client_message, exc.param)
    except Exception as exc:  # a bug or a model failure: logged with its traceback, answered opaquely
        log.error("response %s failed", out.id, exc_info=exc)
        failure = sse.failure("internal_error", "the server failed while generating this response")
    for part in failure:
        yield part
