"""``POST /v1/models/{name}/promote`` (operator): the gated promotion of `moorage models promote`.

An accepted promotion answers 200 with the decision; a refused one 409 ``promotion_refused`` whose
message names both metrics. Either way the decision is in the audit log (`training.promotion`)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from ..errors import Conflict
from ..refs import validate_name
from ..security.keys import Principal
from ..training.promotion import promote
from .common import FastJSON
from .security import require

router = APIRouter(tags=["registry"])


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_alias: str = Field("challenger", alias="from", max_length=32)
    to_alias: str = Field("production", alias="to", max_length=32)
    force: bool = Field(False, description="move the alias even when the challenger fails the gate (audited)")


@router.post("/v1/models/{name}/promote")
async def promote_model(
    name: str,
    request: Request,
    body: PromoteRequest | None = None,
    caller: Principal = Depends(require("manage_models")),
) -> Response:
    """Point `to` at the version `from` points at, if its test metric passes the gate."""
    validate_name(name)
    caller.require_model(name)
    body = body or PromoteRequest()
    decision = await asyncio.to_thread(
        promote,
        request.app.state.settings,
        name,
        from_alias=body.from_alias,
        to_alias=body.to_alias,
        user=f"key:{caller.key_id}",
        force=body.force,
    )
    request.state.audit_detail = {"accepted": decision.accepted, "challenger": decision.challenger}
    if not decision.accepted:
        raise Conflict(decision.reason, code="promotion_refused")
    return FastJSON(asdict(decision))
