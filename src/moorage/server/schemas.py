"""Request bodies: OpenAI-compatible shapes and moorage's own predict request.

The OpenAI bodies list what moorage implements; `unsupported_fields` names what a request sends
beyond that. OpenAI fields moorage does not implement are accepted only at their neutral value
(e.g. ``frequency_penalty: 0``), harmless metadata (`user`, `metadata`) is accepted, and anything
else answers 400 ``unsupported_parameter`` naming the field unless ``serve.ignore_unsupported``
lists it: nothing that would change the meaning of a request is silently dropped. Every field that
is read is validated, and a wrong one answers 422 with the field named.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..batching.contract import MAX_STOP, ToolCall
from ..errors import BadRequest

NonEmptyText = Annotated[str, Field(min_length=1)]

# OpenAI fields moorage does not implement, with the values that mean "not used": a request may
# send these values (many clients always do), any other value is refused.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "store": (None, False),
    "service_tier": (None, "auto", "default"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "guided_grammar": (None,),
}
# Fields that describe a request without changing its answer.
HARMLESS = frozenset({"prompt_cache_key", "safety_identifier"})


class _Body(BaseModel):
    # extra fields are kept so that `unsupported_fields` can name them; the schema says they are refused
    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})


def unsupported(param: str, what: str = "this server does not implement this parameter") -> BadRequest:
    """The 400 `unsupported_parameter` of every OpenAI-compatible route, naming the field at fault."""
    return BadRequest(
        f"{param}: {what} (remove it, or list it in serve.ignore_unsupported to have it ignored)",
        code="unsupported_parameter",
        param=param,
    )


def unsupported_fields(body: BaseModel) -> list[str]:
    """The fields of `body` this server does not implement, in the order the request sent them."""
    extra = body.model_extra or {}
    return [name for name, value in extra.items() if name not in HARMLESS and value not in NEUTRAL.get(name, ())]


class EmbeddingsRequest(_Body):
    model: str
    input: NonEmptyText | list[NonEmptyText]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("response", min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``text`` (no constraint), ``json_object`` (any JSON object) or ``json_schema`` (the output
    validates against `json_schema.schema`), enforced while decoding."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM's extension: a JSON Schema")
    guided_regex: str | None = Field(None, description="vLLM's extension: the output matches this regex")
    guided_choice: list[NonEmptyText] | None = Field(
        None, min_length=1, description="vLLM's extension: the output is one of these strings"
    )

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"give at most {MAX_STOP} non-empty stop strings")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5, description="each token's logprob and its k best alternatives")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one prompt")
        return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant turn's calls")
    tool_call_id: str | None = Field(None, description="a tool turn: the call it answers")
    refusal: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema of the arguments object")
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class _FunctionRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: FunctionName


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: _FunctionRef


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="with logprobs: the k best alternatives")
    tools: list[ToolDefinition] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class PredictRequest(BaseModel):
    """moorage's own API: texts for embed/classify; prompts or chat messages for generate."""

    model_config = ConfigDict(extra="ignore")

    inputs: list[str | dict]
    parameters: dict = Field(default_factory=dict)
    timeout_s: float | None = Field(None, gt=0, le=600)
