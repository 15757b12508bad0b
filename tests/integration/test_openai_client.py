"""The official openai client against a real server (uvicorn on 127.0.0.1) serving SmolLM2:
structured outputs, guided choice, logprobs, a tool-calling round trip, and honest refusal.

Every generation request of a phase is sent at once, so the engine decodes them together (one
batch of steps instead of one per request). The proof over 50 varied prompts under 32 concurrent
streams is bench/structured_outputs.py (too long for the suite on small CPUs).
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from openai import AsyncOpenAI

from moorage.config import load_settings
from moorage.demo import assets
from moorage.demo.run import ensure_registered
from moorage.registry import Registry
from moorage.server.tools import ToolPlan

from tests.support import serve_in_thread

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]
RESULT = '{"sky": "sunny", "celsius": 21}'
SCHEMAS = {
    "Describe a fictional person.": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "employed": {"type": "boolean"},
        },
        "required": ["name", "age", "employed"],
        "additionalProperties": False,
    },
    "Recommend a book.": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 40},
            "genre": {"enum": ["fiction", "science", "history", "poetry"]},
        },
        "required": ["title", "genre"],
        "additionalProperties": False,
    },
    "List three colours.": {
        "type": "object",
        "properties": {
            "colours": {"type": "array", "items": {"enum": ["red", "green", "blue", "yellow"]}, "maxItems": 3}
        },
        "required": ["colours"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_folder):
    from moorage.server import create_app

    tmp = tmp_path_factory.mktemp("openai-client")
    environ = {
        "MOORAGE_HOME": str(tmp / "home"),
        "MOORAGE_SECURITY__AUTH": "false",
        "MOORAGE_SERVE__REQUEST_TIMEOUT_S": "600",  # a busy CI machine is slow, not wrong
    }
    config = load_settings(environ=environ)
    registry = Registry.from_settings(config)
    ensure_registered(registry, "smollm2", "generate", assets.SMOLLM2_PACKAGE, lambda: smollm2_folder)
    app = create_app(config, ["smollm2@production"], registry=registry)
    with serve_in_thread(app, ready_s=300) as url:  # a busy CI machine loads SmolLM2 slowly
        yield f"{url}/v1", smollm2_folder
    registry.close()


async def _stream(client: AsyncOpenAI, **kwargs) -> tuple[str, dict[int, dict], str | None, list]:
    """A streamed chat answer put back together: content, tool calls by index, finish reason, logprobs."""
    content, calls, finish, logprobs = "", {}, None, []
    async for chunk in await client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = entry["id"] or call.id
                entry["name"] += (call.function.name or "") if call.function else ""
                entry["arguments"] += (call.function.arguments or "") if call.function else ""
            if choice.logprobs is not None:
                logprobs += choice.logprobs.content or []
            finish = choice.finish_reason or finish
    return content, calls, finish, logprobs


def _structured(client: AsyncOpenAI):
    schema_calls = [
        client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": prompt}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": True},
            },
            max_tokens=96,  # more than the longest object the schema allows: the model stops before
            temperature=0.7,
            seed=i,
        )
        for i, (prompt, schema) in enumerate(SCHEMAS.items())
    ]
    json_object = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        response_format={"type": "json_object"},
        max_tokens=32,
        temperature=0,
    )
    guided = [
        client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": f"Sentiment of: {text}"}],
            extra_body={"guided_choice": ["positive", "negative", "neutral"]},
            max_tokens=8,
            temperature=1.0,
            seed=3,
        )
        for text in ("I love this film!", "Terrible service.")
    ]
    return schema_calls, json_object, guided


def _logprob_calls(client: AsyncOpenAI):
    chat = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6}
    whole = client.chat.completions.create(**chat, temperature=0, logprobs=True, top_logprobs=2)
    streamed = _stream(client, **chat, temperature=0, logprobs=True, top_logprobs=2)
    completion = client.completions.create(
        model="smollm2", prompt="One, two, three,", max_tokens=5, temperature=0, logprobs=2
    )
    return whole, streamed, completion


def test_the_official_client_on_smollm2(served):
    base_url, folder = served

    async def main():
        # closed here: a client left open is closed by the garbage collector later, on whichever event
        # loop runs then, and fails the test that happens to be running
        async with AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
            return await _phases(client)

    async def _phases(client: AsyncOpenAI):
        schema_calls, json_object, guided = _structured(client)
        required = client.chat.completions.create(
            model="smollm2",
            messages=ASK_WEATHER,
            tools=[WEATHER],
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=64,
            temperature=0,
        )
        named = _stream(
            client,
            model="smollm2",
            messages=ASK_WEATHER,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=64,
            temperature=0,
        )
        phase = await asyncio.gather(*schema_calls, json_object, *guided, required, named, *_logprob_calls(client))
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model="smollm2", messages=ASK_WEATHER, max_tokens=4, presence_penalty=0.8
            )
        answers = await asyncio.gather(*_answers(client, phase[-5], phase[-4]))
        return phase, answers, refused.value

    phase, answers, refused = asyncio.run(main())
    n = len(SCHEMAS)
    for (prompt, schema), response in zip(SCHEMAS.items(), phase[:n]):
        jsonschema.validate(json.loads(response.choices[0].message.content), schema)  # raises when it does not
        assert response.choices[0].finish_reason == "stop", prompt
    assert isinstance(json.loads(phase[n].choices[0].message.content), dict)
    assert all(r.choices[0].message.content in ("positive", "negative", "neutral") for r in phase[n + 1 : n + 3])
    _check_calls(phase[-5], phase[-4])
    _check_logprobs(*phase[-3:])
    _check_answers(phase[-5], answers, folder)
    assert (refused.status_code, refused.code, refused.param) == (400, "unsupported_parameter", "presence_penalty")


def _check_calls(required, named) -> None:
    message = required.choices[0].message
    assert required.choices[0].finish_reason == "tool_calls" and message.content is None
    (call,) = message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    content, calls, finish, _ = named
    assert finish == "tool_calls" and content == ""
    (streamed,) = calls.values()
    assert streamed["id"].startswith("call_") and streamed["name"] == "get_weather"
    jsonschema.validate(json.loads(streamed["arguments"]), WEATHER["function"]["parameters"])


def _answers(client: AsyncOpenAI, required, named):
    """The tool's result sent back after each call; the model answers in words (tool_choice none)."""
    call = required.choices[0].message.tool_calls[0]
    _, calls, _, _ = named
    streamed = calls[0]
    assistant = {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]}
    result = {"role": "tool", "tool_call_id": call.id, "content": RESULT}
    streamed_call = {
        "id": streamed["id"],
        "type": "function",
        "function": {"name": "get_weather", "arguments": streamed["arguments"]},
    }
    streamed_history = [
        {"role": "assistant", "content": None, "tool_calls": [streamed_call]},
        {"role": "tool", "tool_call_id": streamed["id"], "content": RESULT},
    ]
    common = {"model": "smollm2", "tools": [WEATHER], "tool_choice": "none", "max_tokens": 12, "temperature": 0}
    return (
        client.chat.completions.create(messages=ASK_WEATHER + [assistant, result], **common),
        _stream(client, messages=ASK_WEATHER + streamed_history, **common),
    )


def _check_answers(required, answers, folder) -> None:
    from transformers import AutoTokenizer

    whole, (content, calls, finish, _) = answers
    assert whole.choices[0].message.tool_calls is None and whole.choices[0].message.content
    assert whole.choices[0].finish_reason in ("stop", "length")
    # the prompt is the conversation with the call and its result in the documented text format
    history = ASK_WEATHER + [
        {"role": "assistant", "content": "", "tool_calls": [required.choices[0].message.tool_calls[0].model_dump()]},
        {"role": "tool", "tool_call_id": required.choices[0].message.tool_calls[0].id, "content": RESULT},
    ]
    turns = ToolPlan.of([WEATHER], "none", True).render(history, template_takes_tools=False)["messages"]
    assert '"name": "get_weather"' in turns[-1]["content"] and '"sky": "sunny"' in turns[-1]["content"]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    prompt = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert whole.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert content and not calls and finish in ("stop", "length")


def _check_logprobs(whole, streamed, completion) -> None:
    choice = whole.choices[0]
    tokens = choice.logprobs.content
    assert len(tokens) == whole.usage.completion_tokens and "".join(t.token for t in tokens) == choice.message.content
    for t in tokens:  # greedy: the chosen token is a most likely one (bf16 logits can tie), its logprob the top one
        assert len(t.top_logprobs) == 2 and t.token in {alt.token for alt in t.top_logprobs if alt.logprob == t.logprob}
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob) and t.logprob >= t.top_logprobs[1].logprob
        assert t.bytes == list(t.token.encode()) and t.logprob <= 0
    _, _, _, streamed_logprobs = streamed
    assert [t.token for t in streamed_logprobs] == [t.token for t in tokens]
    lp = completion.choices[0].logprobs
    assert "".join(lp.tokens) == completion.choices[0].text and len(lp.tokens) == 5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert all(alts[tok] == max(alts.values()) for tok, alts in zip(lp.tokens, lp.top_logprobs))
