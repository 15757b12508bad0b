"""Helpers the routes share: fast JSON, the inference service, client-disconnect handling."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
from fastapi import Request
from starlette.responses import Response

from ..batching import InferenceService, ModelPool, ServedVersion
from ..errors import BadRequest, PayloadTooLarge

T = TypeVar("T")


class FastJSON(Response):
    """orjson, numpy arrays included (embedding vectors are float32 arrays)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def pool_of(request: Request) -> ModelPool:
    return request.app.state.pool


def service_of(request: Request) -> InferenceService:
    return request.app.state.service


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


def check_count(n: int, limit: int, what: str) -> None:
    if n == 0:
        raise BadRequest(f"{what} is empty: give at least one", code="empty_input")
    if n > limit:
        raise PayloadTooLarge(f"{what} holds {n} items; the limit is {limit} per request", code="too_many_inputs")
