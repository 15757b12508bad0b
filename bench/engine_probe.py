"""In-process measurements of the generation engine for bench/serving.py (no HTTP).

- `engine_overhead`: the engine's step time outside the model forward (scheduling, sampling,
  detokenisation, handing events to the event loop) as a share of the step, with streamed callers
  that read every event, as the OpenAI route does.
- `detokenize_cost`: CPU per token of one sequence's incremental detokenisation (TextStream with a
  stop string) for a short and a long output, from a synthetic token sequence (no model forward).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from moorage.batching.generation import GenerationConfig, GenerationEngine
from moorage.runtime.base import GenerateInput, GenerationParams, TextStream


def engine_overhead(handler: Any, items: list[GenerateInput]) -> dict:
    """Run `items` through an in-process engine (all submitted at once) and split its step time."""
    engine = GenerationEngine(handler, GenerationConfig(max_num_seqs=len(items)))
    steps: list[float] = []
    step = engine.step

    def timed_step() -> None:
        started = time.perf_counter()
        step()
        steps.append(time.perf_counter() - started)

    engine.step = timed_step  # type: ignore[method-assign]

    async def consume(item: GenerateInput) -> int:
        completion = 0
        async for event in engine.stream(item):
            if event.result is not None:
                completion = event.result.completion_tokens
        return completion

    async def run() -> tuple[int, float]:
        engine.start()
        try:
            await consume(items[0])  # warm-up
            steps.clear()
            batch = engine._batch
            batch.forward_seconds, batch.num_forwards = 0.0, 0
            started = time.perf_counter()
            tokens = sum(await asyncio.gather(*(consume(i) for i in items)))
            return tokens, time.perf_counter() - started
        finally:
            await engine.stop()

    tokens, elapsed = asyncio.run(run())
    batch = engine._batch
    step_s, forward_s = sum(steps), batch.forward_seconds
    return {
        "sequences": len(items),
        "tokens": tokens,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 1),
        "steps": len(steps),
        "step_ms_mean": round(1000 * step_s / max(1, len(steps)), 2),
        "forward_ms_mean": round(1000 * forward_s / max(1, batch.num_forwards), 2),
        "outside_forward_ms_mean": round(1000 * (step_s - forward_s) / max(1, len(steps)), 2),
        "overhead_share": round((step_s - forward_s) / step_s, 4) if step_s else None,
    }


def detokenize_cost(handler: Any, lengths: tuple[int, ...] = (256, 4096), repeats: int = 5) -> dict:
    """CPU seconds per token of TextStream (one stop string) over a synthetic token sequence.

    The sequence is the tokenizer's own encoding of varied text (multi-byte characters included),
    so the decoder sees realistic token boundaries; the final text is checked against decoding the
    whole sequence at once.
    """
    tokenizer = handler.tokenizer
    rng = random.Random(0)
    words = "the ocean city night café naïve 北京 mountains 🚀 coffee trains — moon library rain".split()
    text = " ".join(rng.choice(words) for _ in range(max(lengths) * 2))
    ids = [i for i in tokenizer(text, add_special_tokens=False)["input_ids"] if i not in handler.eos_token_ids]
    out: dict[str, Any] = {}
    for n in lengths:
        seq = ids[:n]
        params = GenerationParams(max_new_tokens=n, stop=("\n\n\n",))
        best = float("inf")
        for _ in range(repeats):
            started = time.process_time()
            stream = TextStream(handler, params, prompt_tokens=1)
            for token in seq:
                stream.push(token)
            best = min(best, (time.process_time() - started) / n)
        assert stream.result is not None and stream.result.text == tokenizer.decode(seq, skip_special_tokens=True)
        out[f"us_per_token_{n}"] = round(best * 1e6, 2)
    out["ratio_long_over_short"] = round(out[f"us_per_token_{max(lengths)}"] / out[f"us_per_token_{min(lengths)}"], 2)
    for n in (256, 1024):  # for comparison: decoding the whole sequence after every token, as before
        started = time.process_time()
        for end in range(1, n + 1):
            tokenizer.decode(ids[:end], skip_special_tokens=True)
        out[f"whole_decode_us_per_token_{n}"] = round((time.process_time() - started) / n * 1e6, 2)
    return out
