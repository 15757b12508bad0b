"""OpenAI-compatible endpoints: embeddings, completions, chat completions (streaming with SSE)."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import numpy as np
import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from ..batching import GenerationEngine, TokenEvent
from ..errors import BadRequest, MoorageError
from ..runtime import GenerateInput, GenerationParams
from ..security.filters import StreamFilter
from ..security.policy import Policy
from .common import FastJSON, check_count, complete_all, mark, pool_of, unless_disconnected
from .errors import error_body
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingsRequest, _Sampling
from .security import authorize_model, usage

router = APIRouter(tags=["openai"])


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingsRequest, request: Request) -> Response:
    texts = [body.input] if isinstance(body.input, str) else body.input
    check_count(len(texts), request.app.state.settings.serve.max_inputs, "input")
    texts = authorize_model(request, body.model).texts(texts)
    async with pool_of(request).use(body.model, task="embed") as sv:
        mark(request, sv)
        results = await unless_disconnected(request, sv.engine.run(texts))
    data = [
        {"object": "embedding", "index": i, "embedding": _vector(r.value, body.dimensions, body.encoding_format)}
        for i, r in enumerate(results)
    ]
    tokens = sum(r.tokens for r in results)
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
    prompts = policy.texts(prompts, "prompt")
    params = _params(body, body.max_tokens, request, policy)
    items = [GenerateInput(prompt=p, params=params[j]) for p in prompts for j in range(body.n)]
    echo = [prompts[i // body.n] if body.echo else "" for i in range(len(items))]
    return await _generate(request, body, items, "text_completion", "cmpl", echo, policy)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    policy = authorize_model(request, body.model)
    contents = policy.texts([m.text() for m in body.messages], "messages")
    messages = tuple({"role": m.role, "content": c} for m, c in zip(body.messages, contents))
    params = _params(body, body.max_completion_tokens or body.max_tokens, request, policy)
    items = [GenerateInput(messages=messages, params=params[j]) for j in range(body.n)]
    return await _generate(request, body, items, "chat.completion", "chatcmpl", [""] * len(items), policy)


def _params(body: _Sampling, max_tokens: int | None, request: Request, policy: Policy) -> list[GenerationParams]:
    """One parameter set per choice: with a seed and n > 1, choice j samples with seed + j."""
    policy.max_tokens(max_tokens)
    default = request.app.state.settings.serve.default_max_tokens
    return [
        GenerationParams(
            max_new_tokens=max_tokens or default,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=tuple(body.stop),
            seed=None if body.seed is None else body.seed + j,
        )
        for j in range(body.n)
    ]


async def _generate(request, body, items, kind, prefix, echo, policy: Policy) -> Response:
    pool = pool_of(request)
    sv = pool.acquire(body.model, task="generate")
    mark(request, sv)
    meta = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body.model}
    if not body.stream:
        try:
            results = await complete_all(request, sv.engine, items)
        finally:
            pool.release(sv)
        response = _full_response(kind, meta, results, echo, body.n, policy)
        usage(request, response["usage"]["total_tokens"])
        return FastJSON(response)
    events = _events(sv.engine, items)
    try:
        first = await anext(events)  # errors before the first token keep their HTTP status
    except BaseException:
        await events.aclose()
        pool.release(sv)
        raise

    async def close() -> None:
        await events.aclose()
        pool.release(sv)

    chunks = _chunks(_Chunks(kind, meta, body.n, policy), first, events, echo, body.include_usage, request)
    return _SSE(chunks, close)


def _full_response(kind: str, meta: dict, results, echo: list[str], n: int, policy: Policy) -> dict:
    choices = []
    for i, g in enumerate(results):
        text, withheld = policy.output(g.text)
        choice = {"index": i, "finish_reason": "content_filter" if withheld else g.finish_reason, "logprobs": None}
        if kind == "chat.completion":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = echo[i] + text
        choices.append(choice)
    prompt_tokens = _prompt_usage(results, n)
    completion_tokens = sum(g.completion_tokens for g in results)
    usage = _usage(prompt_tokens, completion_tokens)
    return {**meta, "object": kind, "choices": choices, "usage": usage}


def _prompt_usage(results, n: int) -> int:
    """Each prompt counts once, as OpenAI counts it, however many choices (n) it has."""
    return sum(g.prompt_tokens for g in results[::n])


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _events(engine: GenerationEngine, items: list[GenerateInput]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(choice index, event) of every sequence, interleaved as tokens arrive."""
    if len(items) == 1:
        async with aclosing(engine.generate(items[0])) as events:
            async for event in events:
                yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, item: GenerateInput) -> None:
        try:
            async with aclosing(engine.generate(item)) as events:
                async for event in events:
                    queue.put_nowait((index, event, None))
        except Exception as exc:
            queue.put_nowait((index, None, exc))

    tasks = [asyncio.ensure_future(pump(i, item)) for i, item in enumerate(items)]
    try:
        remaining = len(items)
        while remaining:
            index, event, exc = await queue.get()
            if exc is not None:
                raise exc
            remaining -= event.result is not None
            yield index, event
    finally:
        for t in tasks:
            t.cancel()


class _Chunks:
    """Renders token events as OpenAI stream chunks (chat deltas or completion texts)."""

    def __init__(self, kind: str, meta: dict, n: int, policy: Policy) -> None:
        self.is_chat = kind == "chat.completion"
        self.meta = {**meta, "object": "chat.completion.chunk" if self.is_chat else "text_completion"}
        self.n = n
        self.results: dict[int, object] = {}
        self.policy = policy
        self.filters: dict[int, StreamFilter | None] = {}

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
        if index not in self.filters:
            self.filters[index] = self.policy.stream()
        gate, text, finish = self.filters[index], event.text, None
        if gate is not None:
            text = gate.push(text) if text else ""
        if event.result is not None:
            self.results[index] = event.result
            finish = event.result.finish_reason
            if gate is not None:
                text += gate.finish()
                finish = "content_filter" if gate.blocked else finish
        out = [self.chunk(index, text, None)] if text else []
        if finish is not None:
            out.append(self.chunk(index, None, finish))
        return out

    def usage(self) -> dict:
        ordered = [self.results[i] for i in sorted(self.results)]
        return _usage(_prompt_usage(ordered, self.n), sum(g.completion_tokens for g in ordered))


async def _chunks(out: _Chunks, first, events, echo, include_usage, request) -> AsyncIterator[bytes]:
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
    except MoorageError as exc:  # after the headers: the error travels as an event
        yield _sse(error_body(exc.message, exc.type, exc.code))
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
