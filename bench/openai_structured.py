"""Structured outputs through the OpenAI edge, with the official openai client, on demo SmolLM2.

    python bench/openai_structured.py [--prompts 50] [--concurrency 32] [--max-tokens 96] [--no-plain]

A proof rather than a speed test, too long for the test suite on small CPUs: `--prompts` varied
prompts, each with one of several strict JSON Schemas (`response_format: json_schema`), streamed
with `--concurrency` requests in flight at once (sampling at temperature 0.8, a seed per prompt);
every output is parsed and validated against its schema (an output cut by max_tokens is unfinished
JSON: the count of invalid outputs that did finish is what would show a constraint bug). Then
`json_object` outputs must parse as objects, and vLLM's `guided_choice` (through `extra_body`) may
only ever return a listed choice.
It prints how many of each passed, the finish reasons, and the constrained tokens/s beside the same
prompts unconstrained, measured side by side in this run. The header names the CPU, its matmul ISA,
torch, its threads and the dtype; `other load` is the share of the CPU that other processes took
meanwhile. The server is this process's own uvicorn on 127.0.0.1, stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import jsonschema
from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpuload import OtherLoad  # noqa: E402
from serving import machine  # noqa: E402

from moorage.config import load_settings  # noqa: E402
from moorage.demo import assets  # noqa: E402
from moorage.demo.run import ensure_registered  # noqa: E402
from moorage.registry import Registry  # noqa: E402

SUBJECTS = (
    "a teacher",
    "a pilot",
    "a chef",
    "a painter",
    "a farmer",
    "a nurse",
    "a poet",
    "a sailor",
    "a baker",
    "a judge",
)
TASKS = (
    ("Describe {s} as a person record.", "person"),
    ("Invent a book written by {s}.", "book"),
    ("Plan one day of a trip for {s}.", "trip"),
    ("Rate how stressful the job of {s} is.", "rating"),
    ("List the tools used by {s}.", "tools"),
)
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "job": {"type": "string", "maxLength": 30},
            "married": {"type": "boolean"},
        },
        "required": ["name", "age", "job", "married"],
        "additionalProperties": False,
    },
    "book": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 40},
            "genre": {"enum": ["novel", "memoir", "poetry", "guide"]},
            "pages": {"type": "integer", "minimum": 10, "maximum": 2000},
        },
        "required": ["title", "genre", "pages"],
        "additionalProperties": False,
    },
    "trip": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 25},
            "stops": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3},
        },
        "required": ["city", "stops"],
        "additionalProperties": False,
    },
    "rating": {
        "type": "object",
        "properties": {
            "score": {"type": "integer", "minimum": 1, "maximum": 10},
            "why": {"type": "string", "maxLength": 40},
        },
        "required": ["score", "why"],
        "additionalProperties": False,
    },
    "tools": {
        "type": "object",
        "properties": {"tools": {"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 4}},
        "required": ["tools"],
        "additionalProperties": False,
    },
}
CHOICES = ["positive", "negative", "neutral"]


def prompts(count: int) -> list[tuple[str, str]]:
    """`count` distinct (prompt, schema name) pairs: every task over every subject, in turn."""
    pairs = [(task.format(s=subject), schema) for subject in SUBJECTS for task, schema in TASKS]
    return pairs[:count]


def serve(model_cache: Path, home: Path):
    import uvicorn

    from moorage.server import create_app

    environ = {"MOORAGE_HOME": str(home), "MOORAGE_SECURITY__AUTH": "false", "MOORAGE_SERVE__REQUEST_TIMEOUT_S": "600"}
    config = load_settings(environ=environ)
    registry = Registry.from_settings(config)
    ensure_registered(
        registry, "smollm2", "generate", assets.SMOLLM2_PACKAGE, lambda: assets.smollm2_folder(model_cache)
    )
    app = create_app(config, ["smollm2@production"], registry=registry)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not (server.started and server.servers):
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    while httpx.get(f"{url}/readyz").status_code != 200:
        time.sleep(0.2)
    return server, thread, registry, url, config


async def stream_one(client: AsyncOpenAI, gate: asyncio.Semaphore, **kwargs) -> tuple[str, str | None, int]:
    async with gate:
        text, finish, tokens = "", None, 0
        stream = await client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return text, finish, tokens


def valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


async def schema_round(client, pairs, concurrency: int, max_tokens: int, constrained: bool) -> dict:
    gate = asyncio.Semaphore(concurrency)
    calls = []
    for seed, (prompt, name) in enumerate(pairs):
        extra = {}
        if constrained:
            spec = {"name": name, "schema": SCHEMAS[name], "strict": True}
            extra = {"response_format": {"type": "json_schema", "json_schema": spec}}
        messages = [{"role": "user", "content": prompt + " Answer in JSON."}]
        calls.append(
            stream_one(
                client,
                gate,
                model="smollm2",
                messages=messages,
                max_tokens=max_tokens,
                temperature=0.8,
                seed=seed,
                **extra,
            )
        )
    started = time.perf_counter()
    outputs = await asyncio.gather(*calls)
    seconds = time.perf_counter() - started
    tokens = sum(t for _, _, t in outputs)
    ok = sum(valid(text, SCHEMAS[name]) for (text, _, _), (_, name) in zip(outputs, pairs))
    return {
        "valid": ok,
        "of": len(pairs),
        "finish": dict(Counter(f for _, f, _ in outputs)),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        # an output cut by max_tokens is unfinished JSON; one that stopped and is invalid would be a bug
        "invalid_stopped": sum(
            f == "stop" and not valid(text, SCHEMAS[name]) for (text, f, _), (_, name) in zip(outputs, pairs)
        ),
        "failed": [text for (text, _, _), (_, name) in zip(outputs, pairs) if not valid(text, SCHEMAS[name])][:3],
    }


def is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


async def other_formats(client, count: int, concurrency: int, max_tokens: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    subjects = [SUBJECTS[i % len(SUBJECTS)] for i in range(count)]
    objects = [
        stream_one(
            client,
            gate,
            model="smollm2",
            messages=[{"role": "user", "content": f"Give facts about {s} as JSON."}],
            response_format={"type": "json_object"},
            max_tokens=max_tokens,  # any object: no schema bounds its length, so some are cut
            temperature=0.8,
            seed=i,
        )
        for i, s in enumerate(subjects)
    ]
    choices = [
        client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": f"Is the life of {s} happy? Sentiment:"}],
            extra_body={"guided_choice": CHOICES},
            max_tokens=8,
            temperature=1.0,
            seed=i,
        )
        for i, s in enumerate(subjects)
    ]
    object_outputs = await asyncio.gather(*objects)
    choice_outputs = await asyncio.gather(*choices)
    parsed = [is_object(text) for text, _, _ in object_outputs]
    return {
        "json_object_parsed": sum(parsed),
        "json_object_invalid_stopped": sum(f == "stop" and not ok for (_, f, _), ok in zip(object_outputs, parsed)),
        "json_object_finish": dict(Counter(f for _, f, _ in object_outputs)),
        "guided_choice_listed": sum(r.choices[0].message.content in CHOICES for r in choice_outputs),
        "guided_choice_seen": dict(Counter(r.choices[0].message.content for r in choice_outputs)),
        "of": count,
    }


async def main_async(url: str, args) -> dict:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=900)
    pairs = prompts(args.prompts)
    plain: dict = {"tokens_per_s": float("nan"), "valid": "-", "of": len(pairs)}
    plain_load = None
    if not args.no_plain:
        with OtherLoad([]) as plain_load:
            plain = await schema_round(client, pairs, args.concurrency, args.max_tokens, constrained=False)
    with OtherLoad([]) as constrained_load:
        constrained = await schema_round(client, pairs, args.concurrency, args.max_tokens, constrained=True)
    c = constrained  # printed at once: the other formats take a while more
    print(f"json_schema: {c['valid']}/{c['of']} valid, finish {c['finish']}, failed {c['failed']}", flush=True)
    with OtherLoad([]) as other_load:
        other = await other_formats(client, args.others, args.concurrency, args.max_tokens)
    plain["other_cpu_share"] = None if plain_load is None else plain_load.share
    constrained["other_cpu_share"] = constrained_load.share
    other["other_cpu_share"] = other_load.share
    return {"plain": plain, "json_schema": constrained, "others": other}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=32)
    # enough for the longest object the schemas allow: a cut output is unfinished JSON, not a wrong one
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--no-plain", action="store_true", help="skip the unconstrained round (no tokens/s ratio)")
    parser.add_argument("--others", type=int, default=16, help="json_object and guided_choice requests each")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".moorage" / "cache", help="converted demo models")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        server, thread, registry, url, config = serve(args.cache, Path(home))
        try:
            print(json.dumps({"machine": machine(config.runtime.dtype, config)}))
            results = asyncio.run(main_async(url, args))
        finally:
            server.should_exit = True
            thread.join(30)
            registry.close()
    report(results, args.concurrency)


def _load(r: dict) -> str:
    return "" if r.get("other_cpu_share") is None else f"  [other load {100 * r['other_cpu_share']:.0f} %]"


def report(results: dict, concurrency: int) -> None:
    js, plain, other = results["json_schema"], results["plain"], results["others"]
    ratio = js["tokens_per_s"] / plain["tokens_per_s"]
    lines = [
        f"json_schema strict, {concurrency} concurrent streams: {js['valid']}/{js['of']} valid, "
        f"finish {js['finish']}, invalid although finished: {js['invalid_stopped']}{_load(js)}",
        f"  tokens/s constrained {js['tokens_per_s']:.1f} vs unconstrained {plain['tokens_per_s']:.1f} "
        f"(same prompts): ratio {ratio:.2f}{_load(plain)}",
        f"  unconstrained outputs that happened to validate: {plain['valid']}/{plain['of']}",
        f"json_object: {other['json_object_parsed']}/{other['of']} parse as objects, "
        f"finish {other['json_object_finish']}, unparsable although finished: {other['json_object_invalid_stopped']}",
        f"guided_choice: {other['guided_choice_listed']}/{other['of']} listed, seen {other['guided_choice_seen']}"
        + _load(other),
        *(f"  invalid: {text[:200]}" for text in js["failed"]),
        json.dumps(results, default=str),
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
