"""OpenAI-compatible endpoints: embeddings, completions, chat completions (streaming with SSE).

A request field moorage does not implement answers 400 ``unsupported_parameter`` naming it (see
`schemas`); structured outputs (``response_format``, vLLM's ``guided_*``) and logprobs map onto the
one parameter model, and tools go through `tools.ToolPlan`.
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response, StreamingResponse

from ..batching import Result, Task, TokenEvent
from ..batching.pool import ServedVersion
from ..batching.service import Call
from ..errors import BadRequest, MoorageError, Unprocessable
from ..runtime.base import TokenLogprob
from ..security.policy import Policy
from .common import FastJSON, check_count, mark, service_of, unless_disconnected
from .errors import error_body
from .schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingsRequest,
    _Sampling,
    unsupported,
    unsupported_fields,
)
from .security import authorize_model, usage
from .tools import ToolPlan, output_might_be_call

log = logging.getLogger("moorage.server")

router = APIRouter(tags=["openai"])


def refuse_unsupported(body: BaseModel, request: Request) -> None:
    """400 `unsupported_parameter` for the first field this server does not implement (unless the
    operator lists it in serve.ignore_unsupported)."""
    ignored = set(request.app.state.settings.serve.ignore_unsupported)
    for name in unsupported_fields(body):
        if name not in ignored:
            raise unsupported(name)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingsRequest, request: Request) -> Response:
    refuse_unsupported(body, request)
    texts = [body.input] if isinstance(body.input, str) else body.input
    check_count(len(texts), request.app.state.settings.serve.max_inputs, "input")
    policy = authorize_model(request, body.model)
    service = service_of(request)
    async with service.hold(body.model, Task.EMBED) as sv:
        mark(request, sv)
        call = service.prepare(sv.task, texts, policy=policy, field="input")
        results = await unless_disconnected(request, service.run(sv, call))
    data = [
        {"object": "embedding", "index": i, "embedding": _vector(r.output, body.dimensions, body.encoding_format)}
        for i, r in enumerate(results)
    ]
    tokens = sum(r.prompt_tokens for r in results)
    usage(request, tokens)
    return FastJSON(
        {
            "object": "list",
            "data": data,
            "model": body.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def _vector(vec: np.ndarray, dimensions: int | None, encoding: str):
    if dimensions is not None:
        if dimensions > len(vec):
            raise BadRequest(f"dimensions={dimensions} is more than the model's {len(vec)}", code="invalid_dimensions")
        vec = vec[:dimensions]
        vec = vec / (np.linalg.norm(vec) or 1.0)
    if encoding == "base64":
        return base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()
    return vec


@dataclass
class _Shape:
    """How one generation request renders: chat or completion, echoed prompts, tools, logprobs."""

    kind: str  # "chat.completion" or "text_completion"
    echo: list[str]
    n: int
    logprobs: int | None = None  # alternatives per token; None: no logprobs asked
    plan: ToolPlan = field(default_factory=ToolPlan)

    @property
    def is_chat(self) -> bool:
        return self.kind == "chat.completion"


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    refuse_unsupported(body, request)
    if body.echo and body.logprobs is not None:
        raise BadRequest(
            "echo: logprobs of the prompt are not implemented; drop echo or logprobs",
            code="unsupported_parameter",
            param="echo",
        )
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    check_count(len(prompts), request.app.state.settings.serve.max_inputs, "prompt")
    policy = authorize_model(request, body.model)
    echo = [p if body.echo else "" for p in prompts for _ in range(body.n)]
    shape = _Shape("text_completion", echo, body.n, body.logprobs)
    params = _parameters(body, body.max_tokens, shape)
    return await _generate(request, body, lambda sv: list(prompts), params, shape, "cmpl", policy, "prompt")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    refuse_unsupported(body, request)
    if body.top_logprobs is not None and not body.logprobs:
        raise BadRequest("top_logprobs: set logprobs to true to use it", code="invalid_parameter", param="top_logprobs")
    policy = authorize_model(request, body.model)
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel) else body.tool_choice
    plan = ToolPlan.of(tools, choice, body.parallel_tool_calls)
    messages = [_turn(m) for m in body.messages]
    shape = _Shape("chat.completion", [""] * body.n, body.n, (body.top_logprobs or 0) if body.logprobs else None, plan)
    params = _parameters(body, body.max_completion_tokens or body.max_tokens, shape)

    def inputs(sv: ServedVersion) -> list:
        return [plan.render(messages, getattr(sv.loaded.handler, "takes_tools", False))]

    return await _generate(request, body, inputs, params, shape, "chatcmpl", policy, "messages")


def _turn(m: ChatMessage) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        turn["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.tool_call_id is not None:
        turn["tool_call_id"] = m.tool_call_id
    return turn


_CONSTRAINTS = ("response_format", "guided_json", "guided_regex", "guided_choice")


def _parameters(body: _Sampling, max_tokens: int | None, shape: _Shape) -> dict[str, Any]:
    """OpenAI's fields under the one parameter model's names (validated there, with its limits)."""
    params: dict[str, Any] = {
        "max_new_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stop": body.stop,
        "seed": body.seed,
    }
    if shape.logprobs is not None:
        params["logprobs"] = shape.logprobs
    if body.response_format is not None and body.response_format.type != "text":
        params["response_format"] = body.response_format.model_dump(by_alias=True, exclude_none=True)
    for name in _CONSTRAINTS[1:]:
        if getattr(body, name) is not None:
            params[name] = getattr(body, name)
    schema = shape.plan.call_schema()
    if schema is not None:
        taken = next((name for name in _CONSTRAINTS if name in params), None)
        if taken is not None:
            raise BadRequest(
                f"{taken}: a required or named tool_choice already constrains the output to a tool call",
                code="invalid_parameter",
                param=taken,
            )
        params["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "tool_calls", "schema": schema, "strict": True},
        }
    return params


async def _generate(
    request, body: _Sampling, inputs, params: dict, shape: _Shape, prefix: str, policy: Policy, field: str
) -> Response:
    service = service_of(request)
    sv = await service.pool.acquire_loaded(body.model, task=Task.GENERATE)  # a cold start holds it
    try:
        mark(request, sv)
        call = service.prepare(sv.task, inputs(sv), params, policy=policy, n=body.n, field=field)
    except Unprocessable as exc:
        service.pool.release(sv)
        raise _name_parameter(exc, shape) from None
    except BaseException:
        service.pool.release(sv)
        raise
    meta = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body.model}

    def whole(results: list[Result]) -> dict:
        response = _full_response(shape, meta, results)
        usage(request, response["usage"]["total_tokens"])
        return response

    def streamed(first, events) -> AsyncIterator[bytes]:
        return _chunks(_Chunks(shape, meta), first, events, body.include_usage, request)

    return await answer(request, sv, call, body.stream, whole, streamed)


async def answer(
    request: Request,
    sv: ServedVersion,
    call: Call,
    stream: bool,
    whole: Callable[[list[Result]], dict],
    streamed: Callable[[Any, AsyncIterator], AsyncIterator[bytes]],
) -> Response:
    """Run a prepared generation call and answer it: `whole(results)` as JSON, or `streamed(first event,
    the rest)` as server-sent events. The served version is released however it ends (answered,
    failed, or the client gone); errors before the first token keep their HTTP status."""
    service = service_of(request)
    if not stream:
        try:
            results = await unless_disconnected(request, service.run(sv, call))
        finally:
            service.pool.release(sv)
        return FastJSON(whole(results))
    events = service.stream(sv, call)
    try:
        first = await anext(events)
    except BaseException:
        await events.aclose()
        service.pool.release(sv)
        raise

    async def close() -> None:
        await events.aclose()
        service.pool.release(sv)

    return _SSE(streamed(first, events), close)


_OPENAI_NAMES = {"max_new_tokens": "max_tokens"}


def _name_parameter(exc: Unprocessable, shape: _Shape) -> Unprocessable:
    """A refused parameter under the name the request gave it (``error.param``), not the parameter
    model's: ``parameters.guided_regex: ...`` names `guided_regex`, a call schema names `tools`."""
    path, sep, reason = exc.message.partition(": ")
    if exc.code != "invalid_parameters" or not sep or not path.startswith("parameters.") or exc.param:
        return exc
    where = path.removeprefix("parameters.")
    name = where.split(".")[0]
    if name == "response_format" and shape.plan.mode == "call":
        return Unprocessable(
            f"tools: a function's parameters cannot be enforced ({reason})", code=exc.code, param="tools"
        )
    rest, name = where[len(name) :], _OPENAI_NAMES.get(name, name)
    return Unprocessable(f"{name}{rest}: {reason}", code=exc.code, param=name)


def _full_response(shape: _Shape, meta: dict, results: list[Result]) -> dict:
    choices = []
    for i, r in enumerate(results):
        choice: dict[str, Any] = {"index": i, "finish_reason": r.finish_reason}
        if shape.is_chat:
            choice["message"] = {"role": "assistant", "content": r.output, "refusal": None}
            parsed = shape.plan.parse(r.output)
            if parsed is not None:
                choice["message"] |= {"content": parsed.content, "tool_calls": parsed.calls}
                choice["finish_reason"] = "tool_calls"
            choice["logprobs"] = _chat_logprobs(r.logprobs or (), shape.logprobs)
        else:
            choice["text"] = shape.echo[i] + r.output
            choice["logprobs"] = _completion_logprobs(r.logprobs or (), shape.logprobs, len(shape.echo[i]))
        choices.append(choice)
    completion_tokens = sum(r.completion_tokens for r in results)
    return {
        **meta,
        "object": shape.kind,
        "choices": choices,
        "usage": _usage(_prompt_usage(results, shape.n), completion_tokens),
    }


def _chat_logprobs(tokens: tuple[TokenLogprob, ...] | list[TokenLogprob], k: int | None) -> dict | None:
    """OpenAI chat's `logprobs`: per token its text, logprob, UTF-8 bytes and the k best alternatives."""
    if k is None:
        return None
    content = [
        {
            **_token_entry(t.token, t.logprob),
            "top_logprobs": [_token_entry(alt.token, alt.logprob) for alt in t.top[:k]],
        }
        for t in tokens
    ]
    return {"content": content, "refusal": None}


def _token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _completion_logprobs(tokens, k: int | None, offset: int) -> dict | None:
    """OpenAI completions' `logprobs`: parallel lists; `text_offset` is each token's start in the text."""
    if k is None:
        return None
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{alt.token: alt.logprob for alt in t.top[:k]} for t in tokens],
        "text_offset": offsets,
    }


def _prompt_usage(results: list[Result], n: int) -> int:
    """Each prompt counts once, as OpenAI counts it, however many choices (n) it has."""
    return sum(r.prompt_tokens for r in results[::n])


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class _Choice:
    """One streamed choice: its text offset (completion logprobs) and output held back while it may
    still be a tool call."""

    offset: int = 0
    holding: bool = False
    held: str = ""
    held_logprobs: list[TokenLogprob] = field(default_factory=list)


class _Chunks:
    """Renders token events as OpenAI stream chunks (chat deltas or completion texts)."""

    def __init__(self, shape: _Shape, meta: dict) -> None:
        self.shape = shape
        self.is_chat = shape.is_chat
        self.meta = {**meta, "object": "chat.completion.chunk" if self.is_chat else "text_completion"}
        self.results: dict[int, Result] = {}
        holding = self.is_chat and shape.plan.mode != "none"
        self.choices = [_Choice(len(text), holding) for text in shape.echo]

    def chunk(self, index: int, delta: dict | str | None, finish: str | None, logprobs=()) -> bytes:
        if self.is_chat:
            choice: dict[str, Any] = {"index": index, "delta": delta or {}}
            choice["logprobs"] = _chat_logprobs(logprobs, self.shape.logprobs) if logprobs else None
        else:
            state = self.choices[index]
            choice = {"index": index, "text": delta or ""}
            choice["logprobs"] = _completion_logprobs(logprobs, self.shape.logprobs, state.offset) if logprobs else None
            state.offset += sum(len(t.token) for t in logprobs)
        return _sse({**self.meta, "choices": [{**choice, "finish_reason": finish}]})

    def content(self, index: int, text: str, logprobs=()) -> list[bytes]:
        if not text and not logprobs:
            return []
        return [self.chunk(index, {"content": text} if self.is_chat else text, None, logprobs)]

    def preamble(self) -> list[bytes]:
        if self.is_chat:
            role = {"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            return [_sse({**self.meta, "choices": [{"index": i, **role}]}) for i in range(len(self.shape.echo))]
        return [self.chunk(i, text, None) for i, text in enumerate(self.shape.echo) if text]

    def render(self, index: int, event: TokenEvent) -> list[bytes]:
        state = self.choices[index]
        if state.holding:
            state.held += event.text
            state.held_logprobs += event.logprobs
            out = [] if self.shape.plan.mode == "call" or output_might_be_call(state.held) else self.release(index)
        else:
            out = self.content(index, event.text, event.logprobs)
        if event.result is not None:
            self.results[index] = event.result
            out += self.finish(index, event.result.finish_reason)
        return out

    def release(self, index: int) -> list[bytes]:
        """The held output is an answer, not a call: stream it, and the rest as it comes."""
        state = self.choices[index]
        out = self.content(index, state.held, state.held_logprobs)
        state.holding, state.held, state.held_logprobs = False, "", []
        return out

    def finish(self, index: int, reason: str | None) -> list[bytes]:
        state = self.choices[index]
        parsed = self.shape.plan.parse(state.held) if state.holding else None
        if parsed is None:
            return self.release(index) + [self.chunk(index, None, reason)]
        out = [self.chunk(index, {"content": parsed.content}, None)] if parsed.content else []
        for i, call in enumerate(parsed.calls):
            head = {"index": i, "id": call["id"], "type": "function", "function": {**call["function"], "arguments": ""}}
            out.append(self.chunk(index, {"tool_calls": [head]}, None))
            arguments = {"index": i, "function": {"arguments": call["function"]["arguments"]}}
            out.append(self.chunk(index, {"tool_calls": [arguments]}, None, state.held_logprobs if i == 0 else ()))
        return out + [self.chunk(index, None, "tool_calls")]

    def usage(self) -> dict:
        ordered = [self.results[i] for i in sorted(self.results)]
        return _usage(_prompt_usage(ordered, self.shape.n), sum(r.completion_tokens for r in ordered))


async def _chunks(out: _Chunks, first, events, include_usage, request) -> AsyncIterator[bytes]:
    """The SSE body. Once the headers are sent, any error travels as an error event, and the stream
    always ends with ``[DONE]``: a client never sees a cut stream."""
    try:
        for part in out.preamble() + out.render(*first):
            yield part
        async for index, event in events:
            for part in out.render(index, event):
                yield part
        totals = out.usage()
        usage(request, totals["total_tokens"])
        if include_usage:
            yield _sse({**out.meta, "choices": [], "usage": totals})
    except MoorageError as exc:
        yield _sse(error_body(exc.client_message, exc.type, exc.code, exc.param))
    except Exception as exc:  # a bug or a model failure: logged with its traceback, answered opaquely
        log.error("stream %s failed", out.meta["id"], exc_info=exc)
        yield _sse(error_body("the server failed while generating this response", "server_error", "internal_error"))
    yield b"data: [DONE]\n\n"


def _sse(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class _SSE(StreamingResponse):
    """Server-sent events; `on_close` runs however the stream ends (done, error or disconnect)."""

    def __init__(self, chunks: AsyncIterator[bytes], on_close) -> None:
        super().__init__(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
