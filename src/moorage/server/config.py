"""The config center over HTTP (operator and admin: ``manage_config``): drafts, diffs, releases,
approval, rollback, gray promote/abandon, history and status.

Every route calls the one `ConfigCenter` the CLI also uses. An invalid draft is a 422
``invalid_config`` whose ``error.errors`` names each bad field as a JSON pointer
(``{"pointer": "/serve/max_batch_size", "message": ...}``) and ``error.param`` the first; nothing is
saved or published. Delivery to instances (``/v1/config/watch``, ``/v1/config/reports``) lives in
`config_watch`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from ..configcenter.releases import ConfigCenter
from ..configcenter.schema import InvalidConfig
from ..security.keys import Principal
from .common import FastJSON
from .errors import error_body
from .security import require

PERMISSION = "manage_config"
MAX_SCOPE = 100
NUMBER = Path(ge=1, le=2**31 - 1, description="release number")


def invalid_config_response(exc: InvalidConfig) -> JSONResponse:
    """The 422 of an invalid draft: the usual error object, plus every bad field by JSON pointer."""
    body = error_body(exc.client_message, exc.type, exc.code, exc.param)
    body["error"]["errors"] = exc.errors
    return JSONResponse(body, status_code=exc.status)


class _ConfigRoute(APIRoute):
    """Renders `InvalidConfig` with its pointers (the app's handler knows one ``param`` only)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except InvalidConfig as exc:
                return invalid_config_response(exc)

        return route


router = APIRouter(prefix="/v1/config", route_class=_ConfigRoute, tags=["config"])


class DraftBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    values: dict[str, Any] = Field(description="the scope's settings, e.g. {'serve': {'max_batch_size': 16}}")


class PublishBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scope: str = Field(max_length=MAX_SCOPE)
    comment: str = Field("", max_length=2000)
    gray: dict[str, Any] | None = Field(
        None, description="{'labels': {...}} or {'percent': 30, 'by': 'instance'|'request', 'key': 'api_key'}"
    )


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scope: str = Field(max_length=MAX_SCOPE)
    to: int = Field(ge=1, le=2**31 - 1)
    comment: str = Field("", max_length=2000)


def _center(request: Request) -> ConfigCenter:
    return request.app.state.config_center


async def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


@router.get("/drafts/{scope}")
async def get_draft(request: Request, scope: str, caller: Principal = Depends(require(PERMISSION))) -> Response:
    """The scope's draft (the values of its newest release when nobody has edited it since)."""
    values = await _call(_center(request).draft, scope)
    return FastJSON({"scope": scope, "values": values})


@router.put("/drafts/{scope}")
async def put_draft(
    request: Request, scope: str, body: DraftBody, caller: Principal = Depends(require(PERMISSION))
) -> Response:
    """Replace the scope's draft, validated on save (422 ``invalid_config`` naming each bad field)."""
    values = await _call(_center(request).edit_draft, scope, body.values, author=caller.key_id)
    return FastJSON({"scope": scope, "values": values})


@router.get("/drafts/{scope}/diff")
async def get_diff(request: Request, scope: str, caller: Principal = Depends(require(PERMISSION))) -> Response:
    """Key-level changes of the draft against the scope's current release; restart keys flagged."""
    changes = await _call(_center(request).diff, scope)
    return FastJSON(
        {"scope": scope, "changes": [asdict(c) for c in changes], "restart": any(c.restart for c in changes)}
    )


@router.post("/releases", status_code=201)
async def publish(request: Request, body: PublishBody, caller: Principal = Depends(require(PERMISSION))) -> Response:
    """Publish the scope's draft as a numbered release (pending approval when approval is required)."""
    release = await _call(
        _center(request).publish, body.scope, author=caller.key_id, comment=body.comment, gray=body.gray
    )
    return FastJSON(asdict(release), status_code=201)


@router.get("/releases")
async def history(
    request: Request,
    scope: str | None = Query(None, max_length=MAX_SCOPE),
    caller: Principal = Depends(require(PERMISSION)),
) -> Response:
    """Releases, newest first."""
    releases = await _call(_center(request).history, scope)
    return FastJSON({"data": [asdict(r) for r in releases]})


@router.post("/releases/{number}/approve")
async def approve(request: Request, number: int = NUMBER, caller: Principal = Depends(require(PERMISSION))) -> Response:
    """Approve a pending release; its author's key is refused (403 ``self_approval``)."""
    release = await _call(_center(request).approve, number, approver=caller.key_id)
    return FastJSON(asdict(release))


@router.post("/releases/{number}/promote")
async def promote(request: Request, number: int = NUMBER, caller: Principal = Depends(require(PERMISSION))) -> Response:
    """Merge a gray release into the main line (a new release with its values)."""
    release = await _call(_center(request).promote, number, author=caller.key_id)
    return FastJSON(asdict(release))


@router.post("/releases/{number}/abandon")
async def abandon(request: Request, number: int = NUMBER, caller: Principal = Depends(require(PERMISSION))) -> Response:
    """Drop a gray (or pending) release."""
    release = await _call(_center(request).abandon, number, author=caller.key_id)
    return FastJSON(asdict(release))


@router.post("/rollback", status_code=201)
async def rollback(request: Request, body: RollbackBody, caller: Principal = Depends(require(PERMISSION))) -> Response:
    """A new release of the scope equal to release ``to``."""
    release = await _call(_center(request).rollback, body.scope, body.to, author=caller.key_id, comment=body.comment)
    return FastJSON(asdict(release), status_code=201)


@router.get("/status")
async def status(request: Request, caller: Principal = Depends(require(PERMISSION))) -> Response:
    """Which instances run which revision, which rejected it and why ("M of N instances on revision R")."""
    return FastJSON(await _call(_center(request).status))
