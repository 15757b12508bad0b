"""Helpers the routes share: fast JSON, the pool, client-disconnect handling."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
from fastapi import Request
from starlette.responses import Response

from ..batching import GenerationEngine, ModelPool, ServedVersion
from ..errors import BadRequest, PayloadTooLarge

T = TypeVar("T")


class FastJSON(Response):
    """orjson, numpy arrays included (embedding vectors are float32 arrays)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def pool_of(request: Request) -> ModelPool:
    return request.app.state.pool


def mark(request: Request, sv: ServedVersion) -> None:
    """Name the model version this request is served by (the edge middleware counts it)."""
    request.state.labels = sv.labels


class ClientGone(Exception):
    pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it as soon as the client disconnects: a gone client costs no compute."""
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientGone()
    return task.result()


async def gather_or_cancel(*aws: Awaitable[Any]) -> list[Any]:
    """All results, or the first error, after which the other awaitables are cancelled."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()


async def complete_all(request: Request, engine: GenerationEngine, items: list, timeout_s: float | None = None):
    """Whole generations of `items` (one request); a disconnect cancels all of them."""
    return await unless_disconnected(request, gather_or_cancel(*(engine.complete(i, timeout_s) for i in items)))


def check_count(n: int, limit: int, what: str) -> None:
    if n == 0:
        raise BadRequest(f"{what} is empty: give at least one", code="empty_input")
    if n > limit:
        raise PayloadTooLarge(f"{what} holds {n} items; the limit is {limit} per request", code="too_many_inputs")
