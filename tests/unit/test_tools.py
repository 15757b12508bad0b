"""Tool calling's pure parts: the plan of a request, the call schema, prompts, and parsing calls."""

from __future__ import annotations

import json

import pytest

from moorage.errors import BadRequest
from moorage.server.tools import HOW_AUTO, HOW_CALL, ToolPlan, output_might_be_call

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}


def test_tool_choice_modes():
    assert ToolPlan.of(None, None, True).mode == "none"
    assert ToolPlan.of([WEATHER], None, True).mode == "auto"  # OpenAI's default with tools
    none = ToolPlan.of([WEATHER], "none", True)
    assert (none.mode, none.shown) == ("none", ())
    assert ToolPlan.of([WEATHER, TIME], "required", True).mode == "call"
    named = ToolPlan.of([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, True)
    assert (named.mode, named.named, named.parallel, named.shown) == ("call", "get_time", False, (TIME,))


@pytest.mark.parametrize(
    ("tools", "choice", "code"),
    [
        (None, "required", "invalid_tool_choice"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "invalid_tool_choice"),
        ([WEATHER, WEATHER], "auto", "invalid_tools"),
    ],
)
def test_bad_tool_settings_are_refused(tools, choice, code):
    with pytest.raises(BadRequest) as err:
        ToolPlan.of(tools, choice, True)
    assert err.value.code == code and err.value.param in ("tools", "tool_choice")


def test_call_schema_is_one_call_or_an_array_of_calls():
    one = ToolPlan.of([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, True).call_schema()
    assert one["properties"]["name"] == {"const": "get_weather"}
    assert one["properties"]["arguments"] == WEATHER["function"]["parameters"]
    assert one["required"] == ["name", "arguments"] and one["additionalProperties"] is False
    many = ToolPlan.of([WEATHER, TIME], "required", True).call_schema()
    assert many["type"] == "array" and many["minItems"] == 1
    assert [o["properties"]["name"]["const"] for o in many["items"]["anyOf"]] == ["get_weather", "get_time"]
    assert many["items"]["anyOf"][1]["properties"]["arguments"] == {"type": "object"}  # no parameters: any object
    single = ToolPlan.of([WEATHER, TIME], "required", False).call_schema()
    assert "anyOf" in single
    assert ToolPlan.of([WEATHER], "auto", True).call_schema() is None


ROUND_TRIP = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_1"},
]


def test_a_template_with_a_tool_format_gets_the_tools_and_the_messages_as_they_are():
    plan = ToolPlan.of([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}, True)
    assert plan.render(ROUND_TRIP, template_takes_tools=True) == {"messages": ROUND_TRIP, "tools": [WEATHER]}
    assert ToolPlan.of([WEATHER], "none", True).render(ROUND_TRIP, True) == {"messages": ROUND_TRIP}


def test_other_templates_get_the_tools_in_a_system_message_and_calls_and_results_as_text():
    turns = ToolPlan.of([WEATHER], "auto", True).render(ROUND_TRIP, template_takes_tools=False)["messages"]
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    assert all(set(t) == {"role", "content"} for t in turns)
    assert json.dumps(WEATHER) in turns[0]["content"] and HOW_AUTO in turns[0]["content"]
    call = turns[2]["content"].removeprefix("<tool_call>\n").removesuffix("\n</tool_call>")
    assert json.loads(call) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    response = turns[3]["content"].removeprefix("<tool_response>\n").removesuffix("\n</tool_response>")
    assert json.loads(response) == {"name": "get_weather", "content": "sunny, 21 C"}
    as_json = [*ROUND_TRIP[:2], {**ROUND_TRIP[2], "content": '{"sky": "sunny"}'}]
    block = ToolPlan.of([WEATHER], "auto", True).render(as_json, template_takes_tools=False)["messages"][-1]["content"]
    assert json.loads(block.split("\n")[1]) == {
        "name": "get_weather",
        "content": {"sky": "sunny"},
    }  # not JSON in a string


def test_the_system_prompt_joins_the_callers_own_and_says_how_to_answer():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    named = ToolPlan.of([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, True)
    turns = named.render(messages, template_takes_tools=False)["messages"]
    assert len(turns) == 2 and turns[0]["content"].startswith("Be brief.\n\n") and HOW_CALL in turns[0]["content"]
    # tool_choice none: no tools shown, but an earlier round trip is still rendered as text
    plain = ToolPlan.of([WEATHER], "none", True).render(ROUND_TRIP, template_takes_tools=False)["messages"]
    assert [t["role"] for t in plain] == ["user", "assistant", "user"] and "<tool_call>" in plain[1]["content"]


@pytest.mark.parametrize(
    ("text", "name", "content", "fmt"),
    [
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
            "get_weather",
            None,
            "hermes",
        ),
        (
            'Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}',
            "get_weather",
            "Checking.",
            "hermes",
        ),
        ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]', "get_weather", None, "mistral"),
        ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', "get_weather", None, "json"),
        ('[{"name": "get_weather", "arguments": {"city": "Oslo"}}]', "get_weather", None, "json"),
        ('```json\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}\n```', "get_weather", None, "json"),
    ],
)
def test_calls_are_parsed_in_each_format(text, name, content, fmt):
    parsed = ToolPlan.of([WEATHER], "auto", True).parse(text)
    assert parsed is not None and (parsed.format, parsed.content) == (fmt, content)
    (call,) = parsed.calls
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == name and json.loads(call["function"]["arguments"]) == {"city": "Oslo"}


@pytest.mark.parametrize(
    "text",
    [
        "It is sunny in Oslo.",
        '{"city": "Oslo"}',  # JSON, but not a call
        '{"name": "launch_rockets", "arguments": {}}',  # a function the request did not define
        '<tool_call>{"name": "get_weather", "arguments": {"city": ',  # cut off
        '{"name": "get_weather", "arguments": [1]}',
    ],
)
def test_output_that_is_not_a_call_of_a_defined_tool_stays_content(text):
    assert ToolPlan.of([WEATHER], "auto", True).parse(text) is None


def test_parallel_calls_get_distinct_ids_and_none_mode_parses_nothing():
    text = '[{"name": "get_weather", "arguments": {"city": "A"}}, {"name": "get_time", "arguments": {}}]'
    parsed = ToolPlan.of([WEATHER, TIME], "required", True).parse(text)
    assert parsed is not None and [c["function"]["name"] for c in parsed.calls] == ["get_weather", "get_time"]
    assert len({c["id"] for c in parsed.calls}) == 2
    assert ToolPlan.of([WEATHER], "none", True).parse(text) is None


@pytest.mark.parametrize(
    ("text", "held"),
    [("", True), ("  <tool_", True), ('{"na', True), ("[TOOL", True), ("```", True), ("Hello", False), ("<b>", False)],
)
def test_streamed_output_is_held_while_it_may_still_become_a_call(text, held):
    assert output_might_be_call(text) is held
