"""OpenAI-compatible endpoints: embeddings, completions, chat completions (streaming with SSE)."""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from ..batching import Result, Task, TokenEvent
from ..errors import BadRequest, MoorageError
from ..security.policy import Policy
from .common import FastJSON, check_count, mark, service_of, unless_disconnected
from .errors import error_body
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingsRequest, _Sampling
from .security import authorize_model, usage

log = logging.getLogger("moorage.server")

router = APIRouter(tags=["openai"])


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingsRequest, request: Request) -> Response:
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


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    check_count(len(prompts), request.app.state.settings.serve.max_inputs, "prompt")
    policy = authorize_model(request, body.model)
    echo = [p if body.echo else "" for p in prompts for _ in range(body.n)]
    return await _generate(request, body, prompts, body.max_tokens, "text_completion", "cmpl", echo, policy, "prompt")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    policy = authorize_model(request, body.model)
    inputs = [{"messages": [{"role": m.role, "content": m.text()} for m in body.messages]}]
    max_tokens = body.max_completion_tokens or body.max_tokens
    return await _generate(
        request, body, inputs, max_tokens, "chat.completion", "chatcmpl", [""] * body.n, policy, "messages"
    )


def _parameters(body: _Sampling, max_tokens: int | None) -> dict[str, Any]:
    """OpenAI's sampling fields under the one parameter model's names (validated with its limits)."""
    return {
        "max_new_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stop": body.stop,
        "seed": body.seed,
    }


async def _generate(
    request, body: _Sampling, inputs: list, max_tokens, kind, prefix, echo, policy: Policy, field: str
) -> Response:
    service = service_of(request)
    sv = service.pool.acquire(body.model, task=Task.GENERATE)
    try:
        mark(request, sv)
        call = service.prepare(sv.task, inputs, _parameters(body, max_tokens), policy=policy, n=body.n, field=field)
    except BaseException:
        service.pool.release(sv)
        raise
    meta = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body.model}
    if not body.stream:
        try:
            results = await unless_disconnected(request, service.run(sv, call))
        finally:
            service.pool.release(sv)
        response = _full_response(kind, meta, results, echo, body.n)
        usage(request, response["usage"]["total_tokens"])
        return FastJSON(response)
    events = service.stream(sv, call)
    try:
        first = await anext(events)  # errors before the first token keep their HTTP status
    except BaseException:
        await events.aclose()
        service.pool.release(sv)
        raise

    async def close() -> None:
        await events.aclose()
        service.pool.release(sv)

    chunks = _chunks(_Chunks(kind, meta, body.n), first, events, echo, body.include_usage, request)
    return _SSE(chunks, close)


def _full_response(kind: str, meta: dict, results: list[Result], echo: list[str], n: int) -> dict:
    choices = []
    for i, r in enumerate(results):
        choice: dict[str, Any] = {"index": i, "finish_reason": r.finish_reason, "logprobs": None}
        if kind == "chat.completion":
            choice["message"] = {"role": "assistant", "content": r.output}
        else:
            choice["text"] = echo[i] + r.output
        choices.append(choice)
    completion_tokens = sum(r.completion_tokens for r in results)
    return {**meta, "object": kind, "choices": choices, "usage": _usage(_prompt_usage(results, n), completion_tokens)}


def _prompt_usage(results: list[Result], n: int) -> int:
    """Each prompt counts once, as OpenAI counts it, however many choices (n) it has."""
    return sum(r.prompt_tokens for r in results[::n])


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class _Chunks:
    """Renders token events as OpenAI stream chunks (chat deltas or completion texts)."""

    def __init__(self, kind: str, meta: dict, n: int) -> None:
        self.is_chat = kind == "chat.completion"
        self.meta = {**meta, "object": "chat.completion.chunk" if self.is_chat else "text_completion"}
        self.n = n
        self.results: dict[int, Result] = {}

    def chunk(self, index: int, text: str | None, finish: str | None) -> bytes:
        if self.is_chat:
            choice = {"index": index, "delta": {} if text is None else {"content": text}}
        else:
            choice = {"index": index, "text": text or ""}
        return _sse({**self.meta, "choices": [{**choice, "finish_reason": finish, "logprobs": None}]})

    def preamble(self, echo: list[str]) -> list[bytes]:
        if self.is_chat:
            role = {"delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            return [_sse({**self.meta, "choices": [{"index": i, **role}]}) for i in range(len(echo))]
        return [self.chunk(i, text, None) for i, text in enumerate(echo) if text]

    def render(self, index: int, event: TokenEvent) -> list[bytes]:
        out = [self.chunk(index, event.text, None)] if event.text else []
        if event.result is not None:
            self.results[index] = event.result
            out.append(self.chunk(index, None, event.result.finish_reason))
        return out

    def usage(self) -> dict:
        ordered = [self.results[i] for i in sorted(self.results)]
        return _usage(_prompt_usage(ordered, self.n), sum(r.completion_tokens for r in ordered))


async def _chunks(out: _Chunks, first, events, echo, include_usage, request) -> AsyncIterator[bytes]:
    """The SSE body. Once the headers are sent, any error travels as an error event, and the stream
    always ends with ``[DONE]``: a client never sees a cut stream."""
    try:
        for part in out.preamble(echo) + out.render(*first):
            yield part
        async for index, event in events:
            for part in out.render(index, event):
                yield part
        totals = out.usage()
        usage(request, totals["total_tokens"])
        if include_usage:
            yield _sse({**out.meta, "choices": [], "usage": totals})
    except MoorageError as exc:
        yield _sse(error_body(exc.client_message, exc.type, exc.code))
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
