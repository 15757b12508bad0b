"""moorage's own task-typed API: ``POST /v1/models/{ref}/predict``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from .common import FastJSON, check_count, mark, service_of, unless_disconnected
from .schemas import PredictRequest
from .security import authorize_model, usage

router = APIRouter(tags=["inference"])


@router.post("/v1/models/{model}/predict")
async def predict(model: str, body: PredictRequest, request: Request) -> Response:
    """Texts in; embeddings, labels with scores, or generations out (by the model's task)."""
    check_count(len(body.inputs), request.app.state.settings.serve.max_inputs, "inputs")
    policy = authorize_model(request, model)
    service = service_of(request)
    async with service.hold(model) as sv:
        mark(request, sv)
        call = service.prepare(sv.task, body.inputs, body.parameters, policy=policy)
        results = await unless_disconnected(request, service.run(sv, call, body.timeout_s))
    outcome = service.outcome(sv, results)
    usage(request, outcome.total_tokens)
    return FastJSON(outcome.encode())
