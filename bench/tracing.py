"""Tracing overhead: what one inference call pays for tracing, off (the default) and on.

    python bench/tracing.py [--calls 20000] [--e2e-calls 2000]

(a) the hook alone, per call: off, `tracing.begin()` answering None (all a call does then); on,
    `begin` and the recording of a finished generation call (one request span with the GenAI
    attributes and its four children: queue wait, batch, prefill, decode), exported by the
    production batch processor to an exporter that drops the spans (no network in the figure).
(b) a whole call through `InferenceService.infer` on the fake generation model (4 new tokens), one
    at a time, off and on: the share of a (very cheap) call that tracing costs.
Off, nothing of the OpenTelemetry SDK is imported; the header says so, and names the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
import timeit
from pathlib import Path


def cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _Drop:
    """A span exporter that drops what it gets (the figure measures moorage, not a network)."""

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _turn_on() -> None:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from moorage.observability import tracing

    tracing._install("bench", 1.0, BatchSpanProcessor(_Drop()))


def hook_cost(calls: int) -> tuple[float, float, int]:
    """(µs per call off, µs per call on, SDK modules imported while off) of the tracing hook of one
    generation call."""
    from moorage.batching.contract import Result, Task, Timings
    from moorage.batching.service import Call, _record
    from moorage.observability import tracing
    from moorage.runtime import GenerateInput, GenerationParams

    class ServedVersion:  # what _record reads of a served version
        name, version, task = "smollm", 3, Task.GENERATE

    sv = ServedVersion()
    item = GenerateInput(messages=({"role": "user", "content": "hi"},), params=GenerationParams(max_new_tokens=16))
    call = Call(Task.GENERATE, [item])
    now = time.perf_counter()
    result = Result(
        "text", 12, 16, "length", timings=Timings(now, now + 1e-3, now + 1e-3, now + 2e-2, now + 2e-2, 4, now + 5e-3)
    )

    def off() -> None:
        if tracing.begin() is not None:
            raise RuntimeError("tracing is on")

    def on() -> None:
        trace = tracing.begin()
        assert trace is not None
        _record(trace, sv, call, [result])  # type: ignore[arg-type]

    tracing.shutdown()
    t_off = min(timeit.repeat(off, number=calls, repeat=5)) / calls
    sdk_while_off = sum(m.startswith("opentelemetry.sdk") for m in sys.modules)
    _turn_on()
    t_on = min(timeit.repeat(on, number=max(1, calls // 10), repeat=5)) / max(1, calls // 10)
    tracing.shutdown()
    return t_off * 1e6, t_on * 1e6, sdk_while_off


def e2e_cost(calls: int) -> tuple[float, float]:
    """(µs per call off, on) of sequential InferenceService.infer calls on the fake generation model."""
    from moorage.batching import InferenceService, ModelPool
    from moorage.batching.settings import serving_pool_config
    from moorage.config import load_settings
    from moorage.observability import tracing
    from moorage.registry import Registry
    from moorage.runtime import Runtime, make_fake_model

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(environ={"MOORAGE_HOME": f"{tmp}/home", "MOORAGE_USER": "bench"})
        registry = Registry.from_settings(settings)
        registry.register(make_fake_model(f"{tmp}/src", "generate"), "gen", "generate")

        async def main() -> tuple[float, float]:
            pool = ModelPool(registry, Runtime(registry, settings.runtime), ["gen"], serving_pool_config(settings))
            await pool.start()
            service = InferenceService(pool)
            inputs = [{"messages": [{"role": "user", "content": "hi"}]}]
            params = {"max_new_tokens": 4}

            async def rounds() -> float:
                best = float("inf")
                for _ in range(3):
                    started = time.perf_counter()
                    for _ in range(calls):
                        await service.infer("gen", inputs, params)
                    best = min(best, (time.perf_counter() - started) / calls)
                return best * 1e6

            try:
                await rounds()  # warm-up
                off = await rounds()
                _turn_on()
                on = await rounds()
                tracing.shutdown()
                return off, on
            finally:
                await pool.stop()

        try:
            return asyncio.run(main())
        finally:
            registry.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--e2e-calls", type=int, default=2000)
    args = parser.parse_args()
    print(f"CPU: {cpu()} ({os.cpu_count()} logical cores), Python {platform.python_version()}")
    t_off, t_on, sdk_while_off = hook_cost(args.calls)
    print("(a) the tracing hook of one generation call (request span + 4 children):")
    print(f"    off {t_off * 1000:8.1f} ns/call   on {t_on:8.1f} µs/call   ({t_on / t_off:,.0f}x)")
    e_off, e_on = e2e_cost(args.e2e_calls)
    print(f"(b) InferenceService.infer, fake generation model, 4 tokens, {args.e2e_calls} sequential calls:")
    print(f"    off {e_off:8.1f} µs/call   on {e_on:8.1f} µs/call   (+{e_on - e_off:.1f} µs, {e_on / e_off - 1:+.1%})")
    sdk_after = sum(m.startswith("opentelemetry.sdk") for m in sys.modules)
    print(f"opentelemetry.sdk modules imported: {sdk_while_off} while off, {sdk_after} once turned on")


if __name__ == "__main__":
    main()
