"""Config delivery over HTTP: ``GET /v1/config/watch`` (long-poll) and ``POST /v1/config/reports``.

A subscriber asks with the last revision it has seen (``after``); the server answers the Effective
config of the asking instance as soon as the center's revision passes it, or 304 when the hold ends
first (``config.hold_s``, 25 s by default: well under the 60 s idle timeout of common load
balancers, which cut longer holds). A client whose connection dropped asks again with the same
``after`` and misses nothing. Waiting holds no thread: every waiter awaits one asyncio event, set by
one poller task per process that waits on the center's revision."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
