"""moorage's own task-typed API: ``POST /v1/models/{ref}/predict``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from ..batching import ServedVersion
from ..config import ServeSettings
from ..errors import Unprocessable
from ..runtime import GenerateInput, GenerationParams
from .common import FastJSON, check_count, gather_or_cancel, mark, pool_of, unless_disconnected
from .schemas import PredictRequest

router = APIRouter(tags=["inference"])


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=4)
    seed: int | None = None


class GenerateItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None


@router.post("/v1/models/{model}/predict")
async def predict(model: str, body: PredictRequest, request: Request) -> Response:
    """Texts in; embeddings, labels with scores, or generations out (by the model's task)."""
    settings = request.app.state.settings.serve
    check_count(len(body.inputs), settings.max_inputs, "inputs")
    async with pool_of(request).use(model) as sv:
        mark(request, sv)
        outputs = await predict_outputs(sv, body, settings, lambda work: unless_disconnected(request, work))
    return FastJSON({"model": sv.name, "version": sv.version, "task": sv.task, "outputs": outputs})


async def predict_outputs(sv: ServedVersion, body: PredictRequest, settings: ServeSettings, guard=None) -> list[dict]:
    """The outputs of one predict request on a held version; `guard` wraps the wait (e.g. to cancel
    it when the client disconnects). Shared by the HTTP route and /v1/jobs."""
    guard = guard or (lambda work: work)
    if sv.task == "generate":
        items = _generate_inputs(body, settings.default_max_tokens)
        results = await guard(gather_or_cancel(*(sv.engine.complete(i, body.timeout_s) for i in items)))
        return [
            {
                "text": g.text,
                "finish_reason": g.finish_reason,
                "prompt_tokens": g.prompt_tokens,
                "completion_tokens": g.completion_tokens,
            }
            for g in results
        ]
    texts = _texts(body)
    results = await guard(sv.engine.run(texts, body.timeout_s))
    return [_encode(sv.task, r.value, r.tokens) for r in results]


def _texts(body: PredictRequest) -> list[str]:
    for i, item in enumerate(body.inputs):
        if not isinstance(item, str) or not item:
            raise Unprocessable(f"inputs.{i}: a non-empty string is needed for this model", code="invalid_input")
    if body.parameters:
        raise Unprocessable("parameters: this model takes none", code="invalid_input")
    return list(body.inputs)


def _generate_inputs(body: PredictRequest, default_max_tokens: int) -> list[GenerateInput]:
    try:
        p = GenerateParameters(**body.parameters)
        items = [GenerateItem(prompt=i) if isinstance(i, str) else GenerateItem(**i) for i in body.inputs]
    except (ValidationError, TypeError) as exc:
        raise Unprocessable(f"invalid generation input: {_first_error(exc)}", code="invalid_input") from None
    params = GenerationParams(
        max_new_tokens=p.max_new_tokens or default_max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        stop=tuple(p.stop),
        seed=p.seed,
    )
    out = []
    for i, item in enumerate(items):
        if (item.prompt is None) == (item.messages is None):
            raise Unprocessable(f"inputs.{i}: give a prompt or messages", code="invalid_input")
        messages = tuple(item.messages) if item.messages is not None else None
        out.append(GenerateInput(prompt=item.prompt, messages=messages, params=params))
    return out


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError) and exc.errors():
        err = exc.errors()[0]
        return f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
    return str(exc)


def _encode(task: str, value, tokens: int) -> dict:
    if task == "embed":
        return {"embedding": value, "tokens": tokens}
    return {"label": value.label, "score": value.score, "scores": value.scores, "tokens": tokens}
