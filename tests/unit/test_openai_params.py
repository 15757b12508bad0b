"""The OpenAI routes' parameters: honest refusal of what the server does not implement, the mapping
onto the one parameter model, and the rendering of logprobs and tool calls (fake models)."""

from __future__ import annotations

import json
from asyncio import run

import openai
import orjson
import pytest
from openai import AsyncOpenAI

from moorage.batching import Result, TokenEvent
from moorage.errors import BadRequest
from moorage.runtime.base import TokenLogprob, TopLogprob
from moorage.server.openai import _Chunks, _full_response, _parameters, _Shape
from moorage.server.schemas import ChatCompletionRequest, CompletionRequest
from moorage.server.tools import ToolPlan

CHAT = {"model": "gen", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


@pytest.fixture
def models(registry, fake_model):
    registry.register(fake_model("embed"), "emb", "embed")
    registry.register(fake_model("generate"), "gen", "generate")
    return registry


def _post_all(settings, models, serving, requests, **serve_settings):
    async def main():
        async with serving(settings, models, refs=("emb", "gen"), **serve_settings) as (_, c):
            return [await c.post(path, json=body) for path, body in requests]

    return run(main())


REFUSED = [
    ("/v1/chat/completions", CHAT | {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("/v1/chat/completions", CHAT | {"presence_penalty": -1}, "presence_penalty"),
    ("/v1/chat/completions", CHAT | {"logit_bias": {"42": 5}}, "logit_bias"),
    ("/v1/chat/completions", CHAT | {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("/v1/chat/completions", CHAT | {"modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", CHAT | {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("/v1/chat/completions", CHAT | {"reasoning_effort": "low"}, "reasoning_effort"),
    ("/v1/chat/completions", CHAT | {"web_search_options": {}}, "web_search_options"),
    ("/v1/chat/completions", CHAT | {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", CHAT | {"store": True}, "store"),
    ("/v1/chat/completions", CHAT | {"service_tier": "flex"}, "service_tier"),
    ("/v1/chat/completions", CHAT | {"repetition_penalty": 1.2}, "repetition_penalty"),  # not OpenAI's either
    ("/v1/completions", {"model": "gen", "prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/completions", {"model": "gen", "prompt": "x", "suffix": "end"}, "suffix"),
    ("/v1/embeddings", {"model": "emb", "input": "x", "truncate": True}, "truncate"),
]


def test_unimplemented_parameters_are_refused_naming_them(settings, models, serving):
    responses = _post_all(settings, models, serving, [(path, body) for path, body, _ in REFUSED])
    for (path, _, param), r in zip(REFUSED, responses):
        assert r.status_code == 400, (path, param, r.text)
        error = r.json()["error"]
        assert (error["code"], error["param"], error["type"]) == (
            "unsupported_parameter",
            param,
            "invalid_request_error",
        )
        assert param in error["message"] and "serve.ignore_unsupported" in error["message"]


NEUTRAL = {
    "frequency_penalty": 0,
    "presence_penalty": 0.0,
    "logit_bias": {},
    "store": False,
    "service_tier": "auto",
    "modalities": ["text"],
    "user": "u-1",
    "metadata": {"team": "a"},
    "prompt_cache_key": "k",
    "parallel_tool_calls": True,
    "n": 1,
}


def test_neutral_values_and_metadata_are_accepted(settings, models, serving):
    chat, completion = _post_all(
        settings,
        models,
        serving,
        [
            ("/v1/chat/completions", CHAT | NEUTRAL),
            ("/v1/completions", {"model": "gen", "prompt": "x", "max_tokens": 2, "best_of": 1, "suffix": None}),
        ],
    )
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]
    assert completion.status_code == 200 and completion.json()["choices"][0]["text"]


def test_the_operator_may_list_parameters_to_ignore(settings, models, serving):
    (r,) = _post_all(
        settings,
        models,
        serving,
        [("/v1/chat/completions", CHAT | {"frequency_penalty": 0.5, "repetition_penalty": 1.1})],
        ignore_unsupported=["frequency_penalty", "repetition_penalty"],
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


BAD_TOOL = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}}},
}
CONTRADICTORY = [
    ("/v1/chat/completions", CHAT | {"top_logprobs": 2}, 400, "invalid_parameter", "top_logprobs"),
    (
        "/v1/completions",
        {"model": "gen", "prompt": "x", "echo": True, "logprobs": 1},
        400,
        "unsupported_parameter",
        "echo",
    ),
    ("/v1/chat/completions", CHAT | {"tool_choice": "required"}, 400, "invalid_tool_choice", "tool_choice"),
    (
        "/v1/chat/completions",
        CHAT | {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}},
        400,
        "invalid_tool_choice",
        "tool_choice",
    ),
    (
        "/v1/chat/completions",
        CHAT | {"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a+"},
        400,
        "invalid_parameter",
        "guided_regex",
    ),
    # what the grammar library cannot enforce is named as the request named it
    ("/v1/chat/completions", CHAT | {"guided_regex": "(("}, 422, "invalid_parameters", "guided_regex"),
    (
        "/v1/chat/completions",
        CHAT | {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
        422,
        "invalid_parameters",
        "response_format",
    ),
    (
        "/v1/chat/completions",
        CHAT | {"tools": [BAD_TOOL], "tool_choice": "required"},
        422,
        "invalid_parameters",
        "tools",
    ),
]


def test_contradictory_or_unenforceable_settings_are_refused_naming_the_field(settings, models, serving):
    responses = _post_all(settings, models, serving, [(path, body) for path, body, *_ in CONTRADICTORY])
    for (_, body, status, code, param), r in zip(CONTRADICTORY, responses):
        error = r.json()["error"]
        assert (r.status_code, error["code"], error["param"]) == (status, code, param), body
        assert error["message"].startswith(param)


def test_the_official_client_sees_a_bad_request_naming_the_parameter(settings, models, serving):
    async def main():
        async with serving(settings, models, refs=("emb", "gen")) as (_, c):
            client = AsyncOpenAI(base_url="http://moorage/v1", api_key="unused", http_client=c)
            with pytest.raises(openai.BadRequestError) as err:
                await client.chat.completions.create(
                    model="gen", messages=[{"role": "user", "content": "hi"}], max_tokens=2, frequency_penalty=1.0
                )
            return err.value

    exc = run(main())
    assert exc.code == "unsupported_parameter" and exc.param == "frequency_penalty"


def test_tools_in_auto_mode_reach_the_model_and_a_plain_answer_stays_content(settings, models, serving):
    history = [
        {"role": "user", "content": "weather in Paris"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    body = CHAT | {"messages": history, "tools": [WEATHER], "temperature": 0}
    plain, streamed = _post_all(
        settings, models, serving, [("/v1/chat/completions", body), ("/v1/chat/completions", body | {"stream": True})]
    )
    assert plain.status_code == 200, plain.text
    choice = plain.json()["choices"][0]
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]
    deltas = [orjson.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    text = "".join(d["choices"][0]["delta"].get("content") or "" for d in deltas if d["choices"])
    assert text == choice["message"]["content"]  # the fake model is deterministic: the same words


def test_the_schema_lists_what_is_supported(settings, models, serving):
    async def main():
        async with serving(settings, models, refs=("emb", "gen")) as (_, c):
            return (await c.get("/openapi.json")).json()

    schemas = run(main())["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]
    assert chat["additionalProperties"] is False
    assert {"tools", "tool_choice", "parallel_tool_calls", "logprobs", "top_logprobs", "response_format"} <= set(
        chat["properties"]
    )
    assert {"guided_json", "guided_regex", "guided_choice"} <= set(chat["properties"])
    assert "frequency_penalty" not in chat["properties"] and "logit_bias" not in chat["properties"]
    assert schemas["CompletionRequest"]["additionalProperties"] is False


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(**(CHAT | fields))


def test_structured_outputs_and_logprobs_map_onto_the_parameter_model():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    body = _chat(
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    )
    params = _parameters(body, 3, _Shape("chat.completion", [""], 1, 2))
    assert params["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "a", "schema": schema, "strict": True},
    }
    assert params["logprobs"] == 2 and params["max_new_tokens"] == 3
    assert "response_format" not in _parameters(_chat(response_format={"type": "text"}), 3, _Shape("x", [""], 1))
    guided = _parameters(_chat(guided_choice=["yes", "no"], guided_regex="y|n"), 3, _Shape("x", [""], 1))
    assert (guided["guided_choice"], guided["guided_regex"]) == (["yes", "no"], "y|n")
    assert "logprobs" not in guided
    completion = CompletionRequest(model="gen", prompt="x", logprobs=0, guided_json={"type": "object"})
    mapped = _parameters(completion, None, _Shape("text_completion", [""], 1, completion.logprobs))
    assert (mapped["logprobs"], mapped["guided_json"]) == (0, {"type": "object"})


def test_a_required_tool_choice_becomes_a_strict_json_schema_of_the_call():
    plan = ToolPlan.of([WEATHER], "required", False)
    params = _parameters(
        _chat(tools=[WEATHER], tool_choice="required"), 8, _Shape("chat.completion", [""], 1, None, plan)
    )
    rf = params["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
    assert rf["json_schema"]["schema"] == plan.call_schema()
    with pytest.raises(BadRequest) as err:
        _parameters(_chat(response_format={"type": "json_object"}), 8, _Shape("chat.completion", [""], 1, None, plan))
    assert err.value.param == "response_format"


def _lp(token: str, logprob: float, *alts: tuple[str, float]) -> TokenLogprob:
    return TokenLogprob(1, token, logprob, tuple(TopLogprob(2, t, p) for t, p in alts))


LOGPROBS = (_lp("Hé", -0.1, ("Hé", -0.1), ("Ho", -2.5), ("x", -9.0)), _lp("llo", -0.3, ("llo", -0.3), ("y", -3.0)))


def test_chat_logprobs_render_tokens_bytes_and_the_k_best():
    shape = _Shape("chat.completion", [""], 1, 2)
    result = Result("Héllo", 3, 2, "stop", logprobs=LOGPROBS)
    (choice,) = _full_response(shape, {"id": "x"}, [result])["choices"]
    first, second = choice["logprobs"]["content"]
    assert first["token"] == "Hé" and first["logprob"] == -0.1 and first["bytes"] == list("Hé".encode())
    assert [t["token"] for t in first["top_logprobs"]] == ["Hé", "Ho"]  # k = 2 of the three
    assert second["top_logprobs"][1] == {"token": "y", "logprob": -3.0, "bytes": [121]}
    unasked = _full_response(_Shape("chat.completion", [""], 1), {"id": "x"}, [result])["choices"][0]
    assert unasked["logprobs"] is None


def test_completion_logprobs_render_parallel_lists_and_offsets_streamed_or_not():
    shape = _Shape("text_completion", ["ab"], 1, 1)
    (choice,) = _full_response(shape, {"id": "x"}, [Result("Héllo", 3, 2, "stop", logprobs=LOGPROBS)])["choices"]
    assert choice["logprobs"] == {
        "tokens": ["Hé", "llo"],
        "token_logprobs": [-0.1, -0.3],
        "top_logprobs": [{"Hé": -0.1}, {"llo": -0.3}],
        "text_offset": [2, 4],
    }
    chunks = _Chunks(_Shape("text_completion", [""], 1, 1), {"id": "x"})
    parts = chunks.render(0, TokenEvent("Hé", logprobs=LOGPROBS[:1]))
    parts += chunks.render(0, TokenEvent("llo", Result("Héllo", 3, 2, "stop"), logprobs=LOGPROBS[1:]))
    streamed = [orjson.loads(p[6:])["choices"][0]["logprobs"] for p in parts]
    assert [s["text_offset"] for s in streamed if s] == [[0], [2]]
    assert [s["tokens"] for s in streamed if s] == [["Hé"], ["llo"]]


def _stream(shape: _Shape, events: list[TokenEvent]) -> list[dict]:
    chunks = _Chunks(shape, {"id": "x", "created": 0, "model": "gen"})
    parts = chunks.preamble() + [p for e in events for p in chunks.render(0, e)]
    return [orjson.loads(p[6:])["choices"][0] for p in parts]


def test_a_streamed_call_arrives_as_tool_call_deltas():
    plan = ToolPlan.of([WEATHER], "required", False)
    text = ['{"name": "get_weather", ', '"arguments": {"city": "Paris"}}']
    end = Result("".join(text), 5, 2, "stop")
    choices = _stream(_Shape("chat.completion", [""], 1, None, plan), [TokenEvent(text[0]), TokenEvent(text[1], end)])
    assert choices[0]["delta"] == {"role": "assistant", "content": ""}
    head, arguments, last = choices[1]["delta"], choices[2]["delta"], choices[3]
    (call,) = head["tool_calls"]
    assert call["index"] == 0 and call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": ""}
    assert json.loads(arguments["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert "id" not in arguments["tool_calls"][0]
    assert last["finish_reason"] == "tool_calls" and len(choices) == 4


def test_streamed_auto_output_that_is_an_answer_streams_as_it_comes():
    plan = ToolPlan.of([WEATHER], "auto", True)
    events = [TokenEvent("It"), TokenEvent(" is"), TokenEvent(" sunny", Result("It is sunny", 5, 3, "stop"))]
    choices = _stream(_Shape("chat.completion", [""], 1, None, plan), events)
    assert [c["delta"].get("content") for c in choices[1:-1]] == ["It", " is", " sunny"]  # nothing held back
    assert choices[-1]["finish_reason"] == "stop"
    held = _stream(
        _Shape("chat.completion", [""], 1, None, plan),
        [TokenEvent("{"), TokenEvent('"a": 1}', Result('{"a": 1}', 5, 2, "stop"))],
    )
    assert [c["delta"].get("content") for c in held[1:-1]] == ['{"a": 1}']  # JSON, but no call: content at the end
