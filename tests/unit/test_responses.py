"""POST /v1/responses (OpenAI's Responses API) in-process on fake generate models."""

from __future__ import annotations

import asyncio
import json
from asyncio import run
from typing import Annotated, Literal

import orjson
import pytest
from openai import AsyncOpenAI
from openai.types.responses import Response as OpenAIResponse
from pydantic import BaseModel, Field

from moorage.batching import Result
from moorage.config import load_settings
from moorage.registry import Registry
from moorage.security.keys import KeyStore
from moorage.server.responses import ResponseObject, status_of

from tests.support import eventually, tiny_llama

EVENT_ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
CLOSING = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


@pytest.fixture
def models(registry, fake_model):
    registry.register(fake_model("generate"), "gen", "generate")
    registry.register(fake_model("generate", seed=1, delay_ms=5), "slow", "generate")
    registry.register(fake_model("embed"), "emb", "embed")
    return registry


def _serve(serving, settings, models, **kw):
    return serving(settings, models, ["gen", "slow", "emb"], **kw)


def _events(text: str) -> list[tuple[str, dict]]:
    """(event name, payload) of each server-sent event, checking that both name it the same."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        payload = json.loads(lines["data"])
        assert payload["type"] == lines["event"]
        out.append((lines["event"], payload))
    return out


def test_text_input_answers_a_response_object_the_official_types_accept(settings, models, serving):
    async def main():
        async with _serve(serving, settings, models) as (_, c):
            r = await c.post("/v1/responses", json={"model": "gen", "input": "hello there", "max_output_tokens": 5})
            predict = await c.post(
                "/v1/models/gen/predict",
                json={
                    "inputs": [{"messages": [{"role": "user", "content": "hello there"}]}],
                    "parameters": {"max_new_tokens": 5, "temperature": 1.0},
                },
            )
            return r, predict, (await c.get("/openapi.json")).json()

    r, predict, openapi = run(main())
    assert r.status_code == 200, r.text
    body = r.json()
    parsed = OpenAIResponse.model_validate(body)  # every field the official client requires is there
    ResponseObject.model_validate(body)  # and the schema /openapi.json documents
    documented = openapi["paths"]["/v1/responses"]["post"]
    assert documented["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ResponsesRequest")
    assert set(documented["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert parsed.id.startswith("resp_") and parsed.object == "response"
    assert parsed.output[0].id.startswith("msg_") and parsed.output[0].role == "assistant"
    assert body["store"] is False and body["metadata"] == {}
    # the fake model never ends a sequence: 5 tokens are max_output_tokens reached
    assert (parsed.status, parsed.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    assert parsed.output[0].status == "incomplete"
    expected = predict.json()["outputs"][0]
    assert len(parsed.output_text.split()) == 5
    assert parsed.usage.input_tokens == expected["prompt_tokens"] == 2  # fake tokens: words
    assert parsed.usage.output_tokens == 5
    assert parsed.usage.total_tokens == parsed.usage.input_tokens + parsed.usage.output_tokens


def test_messages_and_instructions_reach_the_model_as_one_chat(settings, models, serving):
    """Input messages (string or input_text parts, an earlier output passed back) and instructions
    are the same chat as the predict route's messages: same prompt tokens, same greedy text."""
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is up"},
        {"role": "assistant", "content": "all fine"},
        {"role": "user", "content": "and now"},
    ]
    items = [
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "what "}, {"type": "input_text", "text": "is up"}],
        },
        {
            "type": "message",
            "id": "msg_earlier",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "all fine", "annotations": []}],
        },
        {"role": "user", "content": "and now"},
    ]

    async def main():
        async with _serve(serving, settings, models) as (_, c):
            r = await c.post(
                "/v1/responses",
                json={
                    "model": "gen",
                    "instructions": "be brief",
                    "input": items,
                    "max_output_tokens": 4,
                    "temperature": 0,
                },
            )
            predict = await c.post(
                "/v1/models/gen/predict", json={"inputs": [{"messages": messages}], "parameters": {"max_new_tokens": 4}}
            )
            return r, predict

    r, predict = run(main())
    assert r.status_code == 200, r.text
    expected = predict.json()["outputs"][0]
    body = r.json()
    assert body["instructions"] == "be brief"
    assert body["output"][0]["content"][0]["text"] == expected["text"]
    assert body["usage"]["input_tokens"] == expected["prompt_tokens"] == 9  # fake tokens: the words of all four


def test_streamed_events_come_in_the_documented_order_and_the_deltas_make_the_text(settings, models, serving):
    async def main():
        async with _serve(serving, settings, models) as (_, c):
            body = {"model": "gen", "input": "count for me", "max_output_tokens": 6, "temperature": 0}
            streamed = await c.post("/v1/responses", json={**body, "stream": True})
            whole = await c.post("/v1/responses", json=body)
            return streamed, whole

    streamed, whole = run(main())
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = _events(streamed.text)
    names = [name for name, _ in events]
    deltas = [p for name, p in events if name == "response.output_text.delta"]
    assert names == EVENT_ORDER + ["response.output_text.delta"] * len(deltas) + CLOSING + ["response.incomplete"]
    assert [p["sequence_number"] for _, p in events] == list(range(len(events)))
    assert len(deltas) > 1
    text = "".join(d["delta"] for d in deltas)
    payloads = dict(events)
    assert payloads["response.output_text.done"]["text"] == text
    assert payloads["response.content_part.done"]["part"]["text"] == text
    final = payloads["response.incomplete"]["response"]
    ResponseObject.model_validate(final)
    assert payloads["response.created"]["response"]["status"] == "in_progress"
    assert final["id"] == payloads["response.created"]["response"]["id"]
    assert final["output"][0]["content"][0]["text"] == text
    assert text == whole.json()["output"][0]["content"][0]["text"]  # greedy: streaming changes nothing
    assert final["usage"] == whole.json()["usage"]
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    ids = {p.get("item_id") for _, p in events if "item_id" in p}
    assert ids == {final["output"][0]["id"]}


def test_logprobs_of_each_output_token_streamed_and_not(settings, models, serving):
    body = {"model": "gen", "input": "weigh these words", "max_output_tokens": 5, "temperature": 0}
    asked = {**body, "include": ["message.output_text.logprobs"], "top_logprobs": 2}

    async def main():
        async with _serve(serving, settings, models) as (_, c):
            plain = await c.post("/v1/responses", json=body)
            whole = await c.post("/v1/responses", json=asked)
            streamed = await c.post("/v1/responses", json={**asked, "stream": True})
            return plain.json(), whole.json(), _events(streamed.text)

    plain, whole, events = run(main())
    assert plain["output"][0]["content"][0]["logprobs"] == []
    part = whole["output"][0]["content"][0]
    logprobs = part["logprobs"]
    assert len(logprobs) == whole["usage"]["output_tokens"] == 5
    for lp in logprobs:
        assert lp["logprob"] <= 0 and len(lp["top_logprobs"]) == 2
        assert lp["bytes"] == list(lp["token"].encode())
        assert (lp["top_logprobs"][0]["token"], lp["top_logprobs"][0]["logprob"]) == (
            lp["token"],
            lp["logprob"],
        )  # greedy
    assert [lp["token"] for lp in logprobs] == part["text"].split()  # the fake's tokens are its words
    deltas = [lp for name, p in events if name == "response.output_text.delta" for lp in p["logprobs"]]
    assert deltas == logprobs
    assert dict(events)["response.output_text.done"]["logprobs"] == logprobs
    assert whole["top_logprobs"] == 2


def test_a_finished_generation_is_completed_and_a_cut_one_incomplete():
    def result(reason):
        return Result("text", prompt_tokens=2, completion_tokens=3, finish_reason=reason)

    assert status_of(result("stop")) == ("completed", None)
    assert status_of(result("length")) == ("incomplete", {"reason": "max_output_tokens"})
    assert status_of(result("content_filter")) == ("incomplete", {"reason": "content_filter"})


TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "the weather in a city",
    "parameters": {  # bounded: a random model under the call's schema finishes the call
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
BAD_REQUESTS = [  # (fields over {"model": "gen", "input": "hi"}, status, code, param)
    ({"store": True}, 400, "unsupported_parameter", "store"),
    ({"previous_response_id": "resp_123"}, 400, "unsupported_parameter", "previous_response_id"),
    ({"tools": [{"type": "web_search", "name": "web"}]}, 400, "unsupported_parameter", "tools.0.type"),
    ({"tool_choice": {"type": "file_search"}}, 400, "unsupported_parameter", "tool_choice"),
    ({"tool_choice": "required"}, 400, "invalid_tool_choice", "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, 400, "invalid_tool_choice", "tool_choice"),
    ({"tools": [TOOL, TOOL]}, 400, "invalid_tools", "tools"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, 422, "invalid_input", "input.0.call_id"),
    ({"reasoning": {"effort": "high"}}, 400, "unsupported_parameter", "reasoning"),
    ({"truncation": "auto"}, 400, "unsupported_parameter", "truncation"),
    ({"include": ["reasoning.encrypted_content"]}, 400, "unsupported_parameter", "include"),
    ({"top_logprobs": 21}, 422, "invalid_input", "top_logprobs"),
    ({"presence_penalty": 0.5}, 400, "unsupported_parameter", "presence_penalty"),
    ({"made_up_field": 1}, 400, "unsupported_parameter", "made_up_field"),
    ({"text": {"verbosity": "high"}}, 400, "unsupported_parameter", "text.verbosity"),
    ({"text": {"format": {"type": "xml"}}}, 422, "invalid_input", "text.format.type"),
    (
        {"input": [{"type": "reasoning", "summary": []}]},
        400,
        "unsupported_parameter",
        "input.0.type",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
        400,
        "unsupported_parameter",
        "input.0.content.0.type",
    ),
    ({"input": [{"role": "user"}]}, 422, "invalid_input", "input.0"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
        422,
        "invalid_input",
        "input.0.content.0.text",
    ),
    ({"input": [{"role": "tool", "content": "x"}]}, 422, "invalid_input", None),
    ({"input": []}, 422, "invalid_input", "input"),
    ({"max_output_tokens": 0}, 422, "invalid_input", "max_output_tokens"),
    ({"temperature": 3}, 422, "invalid_input", "temperature"),
    ({"metadata": {"k": "v" * 513}}, 422, "invalid_input", None),
    ({"model": "emb"}, 400, "wrong_task", None),
    ({"model": "nope"}, 404, "model_not_found", None),
]


NEUTRAL = {
    "tools": [],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "truncation": "disabled",
    "background": False,
    "include": [],
    "reasoning": None,
    "store": False,
    "text": {"format": {"type": "text"}},
    "user": "someone",
    "metadata": {"team": "search"},
}


def test_bad_or_unsupported_fields_get_a_precise_4xx_naming_them(settings, models, serving):
    """One app for every case (starting one per case would cost a second each); the same fields at
    their neutral values are accepted."""

    async def main():
        async with _serve(serving, settings, models, ignore_unsupported=["frequency_penalty"]) as (app, c):
            answers = [
                await c.post("/v1/responses", json={"model": "gen", "input": "hi", **b}) for b, *_ in BAD_REQUESTS
            ]
            neutral = await c.post(
                "/v1/responses",
                json={"model": "gen", "input": "hi", "max_output_tokens": 2, **NEUTRAL, "frequency_penalty": 1},
            )
            return answers, neutral, app.state.pool.lookup("gen").active

    answers, neutral, active = run(main())
    # unimplemented fields at their neutral values ask for nothing; the operator let frequency_penalty through
    assert neutral.status_code == 200, neutral.text
    assert neutral.json()["metadata"] == {"team": "search"} and neutral.json()["user"] == "someone"
    for (body, status, code, param), r in zip(BAD_REQUESTS, answers, strict=True):
        err = r.json()["error"]
        assert (r.status_code, err["code"]) == (status, code), (body, r.text)
        assert err["message"] and err["type"] == "invalid_request_error"
        if param is not None:
            assert err["param"] == param, (body, err)
    assert active == 0  # a refused request holds no version


def test_a_client_gone_mid_stream_releases_the_version_and_stops_its_generation(settings, models, serving):
    """The client reads a few events and disconnects: the held version is released and the
    sequence leaves the engine long before its 2000 tokens."""

    async def main():
        async with _serve(serving, settings, models) as (app, _):
            sv = app.state.pool.lookup("slow")
            body = orjson.dumps({"model": "slow", "input": "go on", "max_output_tokens": 2000, "stream": True})
            gone, sent = asyncio.Event(), []
            requested = False

            async def receive():
                nonlocal requested
                if not requested:
                    requested = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message):
                if message["type"] == "http.response.body" and message.get("body"):
                    sent.append(message["body"])
                    if len(sent) >= 6:  # the opening events and a delta or two
                        gone.set()

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/v1/responses",
                "raw_path": b"/v1/responses",
                "query_string": b"",
                "headers": [(b"content-type", b"application/json"), (b"host", b"moorage")],
                "client": ("127.0.0.1", 5000),
                "server": ("moorage", 80),
            }
            await app(scope, receive, send)
            await eventually(lambda: sv.active == 0, what="the version released")
            await eventually(lambda: sv.engine.scheduler.is_idle, what="the sequence gone from the engine")
            return b"".join(sent).decode()

    text = run(main())
    assert "response.created" in text and "response.output_text.delta" in text
    assert "response.incomplete" not in text and "response.completed" not in text


def test_an_engine_failing_mid_stream_ends_it_with_an_error_event_and_response_failed(
    settings, registry, fake_model, serving
):
    registry.register(fake_model("generate", seed=2, crash_after_steps=3), "crash", "generate")
    body = {"model": "crash", "input": "go on", "max_output_tokens": 50, "stream": True}

    async def main():
        async with serving(settings, registry, ["crash"], exit_on_engine_failure=False) as (app, c):
            sv = app.state.pool.lookup("crash")  # a pool with a dead engine serves nothing more
            return await c.post("/v1/responses", json=body), sv

    r, sv = run(main())
    events = _events(r.text)
    names = [name for name, _ in events]
    assert names[:4] == EVENT_ORDER and "response.output_text.delta" in names
    assert names[-2:] == ["error", "response.failed"]
    error, failed = events[-2][1], events[-1][1]["response"]
    assert error["code"] == failed["error"]["code"] == "engine_failed" and error["message"]
    assert failed["status"] == "failed"
    assert [p["sequence_number"] for _, p in events] == list(range(len(events)))
    assert sv.active == 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_response_charges_its_tokens_to_the_callers_key(tmp_path, fake_model, serving, stream):
    """A key allowed 3 tokens a minute spends 2 + 4 on one response: its next call is refused
    (429), another key's is not."""
    settings = load_settings(environ={"MOORAGE_HOME": str(tmp_path / "home"), "MOORAGE_SECURITY__AUDIT": "false"})
    registry = Registry.from_settings(settings)
    registry.register(fake_model("generate"), "gen", "generate")
    store = KeyStore(registry.catalog)
    spender, other = store.create("invoker", tokens_per_minute=3)[1], store.create("invoker")[1]
    body = {"model": "gen", "input": "two words", "max_output_tokens": 4, "stream": stream}

    async def main():
        async with serving(settings, registry, ["gen"]) as (_, c):
            first = await c.post("/v1/responses", json=body, headers={"Authorization": f"Bearer {spender}"})
            again = {"model": "gen", "input": "again", "max_output_tokens": 1}
            refused = await c.post("/v1/responses", json=again, headers={"Authorization": f"Bearer {spender}"})
            admitted = await c.post("/v1/responses", json=again, headers={"Authorization": f"Bearer {other}"})
            return first, refused, admitted

    first, refused, admitted = run(main())
    registry.close()
    final = _events(first.text)[-1][1]["response"] if stream else first.json()
    assert final["usage"]["total_tokens"] == 6
    assert (refused.status_code, refused.json()["error"]["code"]) == (429, "rate_limited")
    assert "tokens per minute" in refused.json()["error"]["message"]
    assert admitted.status_code == 200


class Pet(BaseModel):  # every field bounded: a grammar-following random model finishes the object
    name: Annotated[str, Field(max_length=8)]
    mood: Literal["happy", "sad", "calm"]
    age: Annotated[int, Field(ge=0, le=120)]
    pet: bool


def test_structured_outputs_and_function_calls_are_enforced_on_a_real_tokenizer(registry, settings, serving, tmp_path):
    """A tiny random Llama on SmolLM2's tokenizer writes no JSON on its own: a parsed, complete
    object or a valid function call is the constraint's doing. The official client's text_format
    sends the schema; a finished stream ends with response.completed; a named or required
    tool_choice answers function_call items, streamed as their arguments; the call and its output
    sent back are a conversation the model continues."""
    pytest.importorskip("xgrammar")
    registry.register(tiny_llama(tmp_path / "lm", tokenizer="smollm2"), "lm", "generate")
    body = {"model": "lm", "input": "describe a pet", "max_output_tokens": 80, "temperature": 0}
    tools = {"model": "lm", "input": "weather in Paris?", "max_output_tokens": 60, "temperature": 0, "tools": [TOOL]}

    async def main():
        async with serving(settings, registry, ["lm"]) as (_, c):
            client = AsyncOpenAI(base_url="http://moorage/v1", api_key="unused", http_client=c)
            async with client.responses.stream(**body, text_format=Pet) as stream:
                names = [event.type async for event in stream]
                final = await stream.get_final_response()
            bad_format = {"type": "json_schema", "name": "pet", "schema": {"type": "no-such-type"}}
            bad = await c.post("/v1/responses", json={**body, "text": {"format": bad_format}})
            bad_tool = {**TOOL, "parameters": {"type": "no-such-type"}}
            bad_call = await c.post("/v1/responses", json={**tools, "tools": [bad_tool], "tool_choice": "required"})
            named = await client.responses.create(**tools, tool_choice={"type": "function", "name": "get_weather"})
            call = named.output[0]
            result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "clear"}'}
            conversation = [{"role": "user", "content": "weather in Paris?"}, call, result]
            round_trip = {**tools, "input": conversation, "max_output_tokens": 4, "tool_choice": "none"}
            answer = await client.responses.create(**round_trip)
            asked = await client.responses.create(**{**round_trip, "input": conversation[:1]})
            streamed = await c.post("/v1/responses", json={**tools, "tool_choice": "required", "stream": True})
            return names, final, (bad, bad_call), named, (answer, asked), _events(streamed.text)

    names, final, (bad, bad_call), named, (answer, asked), events = run(main())
    assert names[:4] == EVENT_ORDER and names[-4:] == [*CLOSING, "response.completed"]
    assert final.status == "completed" and final.incomplete_details is None
    assert final.output[0].status == "completed"
    assert isinstance(final.output_parsed, Pet)
    assert final.text.format.type == "json_schema" and final.text.format.name == "Pet"
    err = bad.json()["error"]
    assert (bad.status_code, err["code"], err["param"]) == (422, "invalid_parameters", "text.format.schema")
    err = bad_call.json()["error"]  # a function whose parameters the grammar library cannot enforce
    assert (bad_call.status_code, err["code"], err["param"]) == (422, "invalid_parameters", "tools")

    (call,) = named.output
    assert (call.type, call.name, call.status) == ("function_call", "get_weather", "completed")
    assert isinstance(json.loads(call.arguments)["city"], str) and call.call_id.startswith("call_")
    assert answer.output[0].type == "message"  # tool_choice none: an answer, not a call
    # the call and its result reach the model as turns of the conversation
    assert answer.usage.input_tokens > asked.usage.input_tokens

    assert [n for n, _ in events][:2] == ["response.created", "response.in_progress"]
    assert [n for n, _ in events][-1] == "response.completed"
    items = dict(events)["response.completed"]["response"]["output"]
    assert items and all(item["type"] == "function_call" and item["name"] == "get_weather" for item in items)
    args = [p for n, p in events if n == "response.function_call_arguments.done"]
    assert [a["arguments"] for a in args] == [item["arguments"] for item in items]
    assert [p["delta"] for n, p in events if n == "response.function_call_arguments.delta"] == [
        a["arguments"] for a in args
    ]
