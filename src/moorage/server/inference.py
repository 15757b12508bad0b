"""moorage's own task-typed API: ``POST /v1/models/{ref}/predict``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from ..batching import ServedVersion
from ..config import ServeSettings
from ..errors import Unprocessable
from ..runtime import GenerateInput, GenerationParams
from ..security.policy import Policy
from .common import FastJSON, check_count, gather_or_cancel, mark, pool_of, unless_disconnected
from .schemas import PredictRequest
from .security import authorize_model, usage

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
    policy = authorize_model(request, model)
    async with pool_of(request).use(model) as sv:
        mark(request, sv)
        outputs = await predict_outputs(
            sv, body, settings, lambda work: unless_disconnected(request, work), policy=policy
        )
    usage(request, sum(o.get("tokens", 0) + o.get("prompt_tokens", 0) + o.get("completion_tokens", 0) for o in outputs))
    return FastJSON({"model": sv.name, "version": sv.version, "task": sv.task, "outputs": outputs})


async def predict_outputs(
    sv: ServedVersion, body: PredictRequest, settings: ServeSettings, guard=None, policy: Policy | None = None
) -> list[dict]:
    """The outputs of one predict request on a held version; `guard` wraps the wait (e.g. to cancel
    it when the client disconnects), `policy` applies limits and content filters. Shared by the HTTP
    route and /v1/jobs."""
    guard = guard or (lambda work: work)
    if sv.task == "generate":
        items = generate_inputs(body, settings.default_max_tokens, policy)
        results = await guard(gather_or_cancel(*(sv.engine.complete(i, body.timeout_s) for i in items)))
        outputs = []
        for g in results:
            text, withheld = policy.output(g.text) if policy else (g.text, False)
            out = {
                "text": text,
                "finish_reason": "content_filter" if withheld else g.finish_reason,
                "prompt_tokens": g.prompt_tokens,
                "completion_tokens": g.completion_tokens,
            }
            outputs.append(out | {"filtered": True} if withheld else out)
        return outputs
    texts = _texts(body)
    if policy:
        texts = policy.texts(texts, "inputs")
    results = await guard(sv.engine.run(texts, body.timeout_s))
    return [_encode(sv.task, r.value, r.tokens) for r in results]


def _texts(body: PredictRequest) -> list[str]:
    for i, item in enumerate(body.inputs):
        if not isinstance(item, str) or not item:
            raise Unprocessable(f"inputs.{i}: a non-empty string is needed for this model", code="invalid_input")
    if body.parameters:
        raise Unprocessable("parameters: this model takes none", code="invalid_input")
    return list(body.inputs)


def generate_inputs(body: PredictRequest, default_max_tokens: int, policy: Policy | None) -> list[GenerateInput]:
    try:
        p = GenerateParameters(**body.parameters)
        items = [GenerateItem(prompt=i) if isinstance(i, str) else GenerateItem(**i) for i in body.inputs]
    except (ValidationError, TypeError) as exc:
        raise Unprocessable(f"invalid generation input: {_first_error(exc)}", code="invalid_input") from None
    if policy:
        policy.max_tokens(p.max_new_tokens)
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
        prompt, messages = item.prompt, tuple(item.messages) if item.messages is not None else None
        if policy and prompt is not None:
            prompt = policy.texts([prompt], f"inputs.{i}")[0]
        if policy and messages is not None:
            messages = tuple(_filtered_message(policy, m, f"inputs.{i}.messages.{j}") for j, m in enumerate(messages))
        out.append(GenerateInput(prompt=prompt, messages=messages, params=params))
    return out


def _filtered_message(policy: Policy, message: dict[str, str], where: str) -> dict[str, str]:
    if "content" not in message:
        return message
    return {**message, "content": policy.texts([message["content"]], where)[0]}


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError) and exc.errors():
        err = exc.errors()[0]
        return f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
    return str(exc)


def _encode(task: str, value, tokens: int) -> dict:
    if task == "embed":
        return {"embedding": value, "tokens": tokens}
    return {"label": value.label, "score": value.score, "scores": value.scores, "tokens": tokens}
