"""Probes, metrics, the served-model list and the admin reload."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from starlette.responses import PlainTextResponse, Response

from ..observability import metrics
from .common import FastJSON, pool_of
from .errors import error_body
from .security import principal, require

router = APIRouter()
STARTED = int(time.time())


@router.get("/healthz", tags=["health"])
async def healthz() -> dict:
    """Alive: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"])
async def readyz(request: Request) -> Response:
    """Ready only when every served model is loaded, every engine is alive and the server is not
    shutting down (503 from SIGTERM on, while it still serves for ``serve.drain_delay_s``)."""
    pool = pool_of(request)
    if pool.is_ready and not request.app.state.drain.shutting_down:
        models = {k: sv.version for k, sv in pool.served().items()}
        return FastJSON({"status": "ready", "models": models})
    dead = pool.dead_engine()
    if request.app.state.drain.shutting_down:
        message, code = "not ready: the server is shutting down", "shutting_down"
    elif dead:
        message, code = f"not ready: an engine stopped ({dead})", "engine_failed"
    elif pool.load_failure is not None:
        message, code = f"not ready: {pool.load_failure.client_message}", pool.load_failure.code
    else:
        message, code = "not ready: models are loading", "model_loading"
    return FastJSON(error_body(message, "server_error", code), status_code=503)


@router.get("/metrics", tags=["health"], response_class=PlainTextResponse)
async def prometheus_metrics() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/models", tags=["models"])
async def list_models(request: Request) -> Response:
    """The served models this key may call."""
    caller = principal(request)
    data = [
        {
            "id": key,
            "object": "model",
            "created": int(sv.info.created_at.timestamp()) if sv.info.created_at else STARTED,
            "owned_by": "moorage",
            "task": sv.task,
            "version": sv.version,
            "framework": sv.info.framework,
            "precision": sv.loaded.handler.precision or None,
        }
        for key, sv in pool_of(request).served().items()
        if caller.may_use(sv.name)
    ]
    return FastJSON({"object": "list", "data": data})


@router.post("/admin/reload", tags=["admin"], dependencies=[Depends(require("manage_models"))])
async def reload(request: Request) -> Response:
    """Re-resolve every served alias now; swap the ones that moved (no request fails)."""
    changes = await pool_of(request).reload()
    return FastJSON({"changes": changes})
