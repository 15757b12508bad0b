"""Tool calling over the OpenAI chat route: prompts, the call schema, and parsing calls back.

`ToolPlan` is one request's tool settings. ``tool_choice: none`` shows the model no tools and
parses nothing; ``auto`` shows the tools and turns output that is a call into ``tool_calls``;
``required`` or a named function constrains the output to the JSON Schema of a call (an array of
calls with ``parallel_tool_calls``, one call otherwise), so the answer is always a valid call.

A model whose chat template has a tool format (the template reads ``tools``) gets the tools and the
conversation's calls through it. Any other model gets the tools in a system message, in this
format (Hermes' format, which many models were trained on)::

    <tools>
    {"type": "function", "function": {"name": ..., "description": ..., "parameters": ...}}
    </tools>
    ... call a function with <tool_call>{"name": ..., "arguments": {...}}</tool_call> ...

and its earlier calls as ``<tool_call>`` text, tool results as a user turn of
``<tool_response>`` blocks. Output is parsed in these formats, each named: ``hermes``
(``<tool_call>`` blocks: Hermes, Qwen 2.5 and 3, and the format above), ``mistral`` (``[TOOL_CALLS]``
and a JSON array) and ``json`` (the whole output one call or an array of calls, with
``arguments`` or Llama 3's ``parameters``; what a constrained call produces).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadRequest

SYSTEM_PROMPT = """You have access to functions. Their definitions, one per line:
<tools>
{tools}
</tools>
{how}"""
HOW_AUTO = (
    "When a function would help answer, call it: reply with only a JSON object with the function's name and "
    'arguments inside <tool_call></tool_call> tags, like <tool_call>{"name": "NAME", "arguments": {...}}</tool_call>. '
    "Otherwise answer the user directly."
)
HOW_CALL = (
    'Reply with only a JSON object naming the function to call and its arguments: {"name": "NAME", "arguments": {...}}.'
)
HOW_CALLS = 'Reply with only a JSON array of the calls to make: [{"name": "NAME", "arguments": {...}}, ...].'

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ParsedCalls:
    """Output read as tool calls: OpenAI's `tool_calls` objects, the text around them, the format."""

    calls: list[dict[str, Any]]
    content: str | None
    format: str


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request asks of tools. `mode`: "none", "auto" or "call" (the output must be a call)."""

    tools: tuple[dict[str, Any], ...] = ()
    mode: str = "none"
    named: str | None = None  # tool_choice naming one function
    parallel: bool = True
    names: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of(cls, tools: list[dict[str, Any]] | None, choice: str | dict | None, parallel: bool) -> ToolPlan:
        """The plan for a request's `tools`, `tool_choice` and `parallel_tool_calls` (validated shapes)."""
        tools = tools or []
        names = frozenset(t["function"]["name"] for t in tools)
        if len(names) < len(tools):
            raise BadRequest("tools: two functions have the same name", code="invalid_tools", param="tools")
        if choice is None:
            choice = "auto" if tools else "none"
        if choice != "none" and not tools:
            raise BadRequest("tool_choice: the request has no tools", code="invalid_tool_choice", param="tool_choice")
        if isinstance(choice, dict):
            name = choice["function"]["name"]
            if name not in names:
                raise BadRequest(
                    f"tool_choice: no tool is named {name!r}", code="invalid_tool_choice", param="tool_choice"
                )
            return cls(tuple(tools), "call", name, parallel=False, names=names)
        mode = "call" if choice == "required" else choice
        return cls(tuple(tools) if mode != "none" else (), mode, None, parallel, names)

    @property
    def shown(self) -> tuple[dict[str, Any], ...]:
        """The tools the prompt shows (a named choice shows only that function)."""
        if self.named is not None:
            return tuple(t for t in self.tools if t["function"]["name"] == self.named)
        return self.tools

    def call_schema(self) -> dict[str, Any] | None:
        """The JSON Schema a constrained answer follows (None unless the output must be a call)."""
        if self.mode != "call":
            return None
        options = [_call_schema(t["function"]) for t in self.shown]
        one = options[0] if len(options) == 1 else {"anyOf": options}
        if not self.parallel:
            return one
        return {"type": "array", "items": one, "minItems": 1}

    def render(self, messages: list[dict[str, Any]], template_takes_tools: bool) -> dict[str, Any]:
        """One generation input (`messages`, and `tools` for a template with a tool format)."""
        if template_takes_tools:
            return {"messages": messages, "tools": list(self.shown)} if self.shown else {"messages": messages}
        turns = _as_text_turns(messages)
        if self.shown:
            how = HOW_AUTO if self.mode == "auto" else HOW_CALLS if self.parallel else HOW_CALL
            lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in self.shown)
            system = SYSTEM_PROMPT.format(tools=lines, how=how)
            if turns[0]["role"] in ("system", "developer"):
                turns[0] = {**turns[0], "content": turns[0]["content"] + "\n\n" + system}
            else:
                turns.insert(0, {"role": "system", "content": system})
        return {"messages": turns}

    def parse(self, text: str) -> ParsedCalls | None:
        """The output as tool calls, or None when it is an answer (or no call was asked for)."""
        if self.mode == "none":
            return None
        for name, parser in PARSERS:
            found = parser(text)
            if found is None:
                continue
            raw, content = found
            calls = [_openai_call(c) for c in raw]
            if calls and all(c is not None and c["function"]["name"] in self.names for c in calls):
                return ParsedCalls([c for c in calls if c is not None], content, name)
        return None


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": function.get("parameters") or _ANY_OBJECT},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _as_text_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template without a tool format: calls as <tool_call> text, and each run of tool
    results as one user turn of <tool_response> blocks (templates that alternate roles accept it)."""
    ids: dict[str, str] = {}  # tool_call_id -> function name
    turns: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "tool":
            name = ids.get(m.get("tool_call_id") or "", "")
            result = json.dumps({"name": name, "content": _json(m["content"]) or m["content"]}, ensure_ascii=False)
            block = f"<tool_response>\n{result}\n</tool_response>"
            if turns and turns[-1].get("tool_results"):
                turns[-1]["content"] += "\n" + block
            else:
                turns.append({"role": "user", "content": block, "tool_results": True})
            continue
        calls = m.get("tool_calls") or []
        for call in calls:
            ids[call["id"]] = call["function"]["name"]
        text = "".join(f"<tool_call>\n{_call_text(c)}\n</tool_call>" for c in calls)
        turns.append({"role": m["role"], "content": (m["content"] + "\n" + text).strip() if text else m["content"]})
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def _call_text(call: dict[str, Any]) -> str:
    try:
        arguments = json.loads(call["function"]["arguments"])
    except ValueError:
        arguments = call["function"]["arguments"]
    return json.dumps({"name": call["function"]["name"], "arguments": arguments}, ensure_ascii=False)


def _openai_call(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        return None
    arguments = raw.get("arguments", raw.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": raw["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def _json(text: str) -> Any:
    fenced = _FENCE.match(text.strip())
    try:
        return json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return None


def _hermes(text: str) -> tuple[list[Any], str | None] | None:
    if "<tool_call>" not in text:
        return None
    calls = [_json(body) for body in _TOOL_CALL.findall(text)]
    content = text[: text.index("<tool_call>")].strip() or None
    return calls, content


def _mistral(text: str) -> tuple[list[Any], str | None] | None:
    head, marker, rest = text.partition("[TOOL_CALLS]")
    if not marker:
        return None
    calls = _json(rest)
    return (calls if isinstance(calls, list) else [calls]), head.strip() or None


def _whole_json(text: str) -> tuple[list[Any], str | None] | None:
    value = _json(text)
    if isinstance(value, dict):
        return [value], None
    if isinstance(value, list):
        return value, None
    return None


PARSERS = (("hermes", _hermes), ("mistral", _mistral), ("json", _whole_json))


def output_might_be_call(text: str) -> bool:
    """Whether streamed output so far may still become a tool call (so it is held back, not streamed)."""
    start = text.lstrip()
    if not start:
        return True
    return any(m.startswith(start[: len(m)]) for m in ("<tool_call>", "[TOOL_CALLS]", "```")) or start[0] in "{["
