"""In-process structured-output run for bench/serving.py: streams through the generation engine,
with the time the decode batch spent in the grammar masks counted apart from the model forward."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from moorage.batching.generation import GenerationConfig, GenerationEngine
from moorage.runtime.base import GenerateInput

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "category": {"type": "string", "enum": ["nature", "place", "food", "object", "idea", "other"]},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "category", "rating", "tags"],
    "additionalProperties": False,
}


def valid(text: str) -> bool:
    """`text` is JSON that follows SCHEMA (jsonschema when installed, else the keys and enum)."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    try:
        import jsonschema
    except ImportError:
        return isinstance(value, dict) and set(value) == set(SCHEMA["required"])
    return jsonschema.Draft202012Validator(SCHEMA).is_valid(value)


def structured_run(handler: Any, items: list[GenerateInput]) -> dict:
    """All `items` streamed at once through an engine (after one warm-up sequence)."""
    engine = GenerationEngine(handler, GenerationConfig(max_num_seqs=len(items)))
    mask_s = [0.0]

    def timed(masked):
        def run(*args, **kwargs):
            started = time.perf_counter()
            out = masked(*args, **kwargs)
            mask_s[0] += time.perf_counter() - started
            return out

        return run

    async def consume(item: GenerateInput):
        async for event in engine.stream(item):
            if event.result is not None:
                return event.result
        raise RuntimeError("a stream ended without a result")

    async def run() -> tuple[list, float]:
        engine.start()
        try:
            await consume(items[0])  # warm-up (the first constrained request builds the tokenizer's tables)
            batch = engine._batch
            batch._masked = timed(batch._masked)
            batch.forward_seconds, batch.num_forwards = 0.0, 0
            started = time.perf_counter()
            outs = await asyncio.gather(*(consume(i) for i in items))
            return outs, time.perf_counter() - started
        finally:
            await engine.stop()

    outs, elapsed = asyncio.run(run())
    batch = engine._batch
    tokens = sum(r.completion_tokens for r in outs)
    forwards = max(1, batch.num_forwards)
    return {
        "sequences": len(items),
        "tokens": tokens,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 1),
        "finished_stop": sum(r.finish_reason == "stop" for r in outs),
        "valid": sum(valid(r.output) for r in outs),
        "step_ms_mean": round(1000 * elapsed / forwards, 2),
        "forward_ms_mean": round(1000 * batch.forward_seconds / forwards, 2),
        "mask_ms_mean": round(1000 * mask_s[0] / forwards, 2),
        "rows_per_step": round(tokens / forwards, 1),
    }
