"""``POST /v1/classify``: texts in, each text's label and per-class scores out.

The same path as the predict route: the caller's key and model rights, the model's policy (size
limits, content filters), the dynamic batcher through `InferenceService`, usage charged to the key
and the audit row the security edge writes for every call."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from ..batching import Task
from ..batching.contract import encode_result
from .common import FastJSON, check_count, mark, service_of, unless_disconnected
from .schemas import NonEmptyText
from .security import authorize_model, usage

router = APIRouter(tags=["inference"])


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="a classify model: NAME, NAME@ALIAS or NAME:VERSION")
    input: NonEmptyText | list[NonEmptyText] = Field(description="one text or a list of texts")
    timeout_s: float | None = Field(None, gt=0, le=600)


@router.post("/v1/classify")
async def classify(body: ClassifyRequest, request: Request) -> Response:
    """Each text's label, its score and the scores of every class, in the order of `input`."""
    texts = [body.input] if isinstance(body.input, str) else body.input
    check_count(len(texts), request.app.state.settings.serve.max_inputs, "input")
    policy = authorize_model(request, body.model)
    service = service_of(request)
    async with service.hold(body.model, Task.CLASSIFY) as sv:
        mark(request, sv)
        call = service.prepare(sv.task, texts, policy=policy, field="input")
        results = await unless_disconnected(request, service.run(sv, call, body.timeout_s))
    tokens = sum(r.prompt_tokens for r in results)
    usage(request, tokens)
    data = [{"index": i, **encode_result(Task.CLASSIFY, r)} for i, r in enumerate(results)]
    return FastJSON(
        {
            "object": "list",
            "model": sv.name,
            "version": sv.version,
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )
