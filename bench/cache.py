"""Response cache benchmark: a repeated greedy chat request on SmolLM2, computed (miss) beside
answered from the cache (hit), side by side in one run of the app in-process.

    python bench/cache.py [--home DIR] [--prompts 2] [--repeats 2] [--max-tokens 16]

Each of `--prompts` distinct greedy chat requests is sent once (a miss: the model decodes
`--max-tokens` tokens), then `--repeats` times more (hits); then one seeded request twice (miss,
hit) and one sampled request twice (skipped both times: never cached), both of 4 tokens. The latency is measured by
the client around each HTTP request (the in-process app through httpx's ASGI transport, so no
socket), and the cache counters are read from the app's metrics. The header names the CPU, its
ISA flags, torch, its threads and the dtype (see bench/serving.py). Bounded: about
prompts x (repeats + 1) + 4 requests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import ISA_FLAGS, machine  # noqa: E402

from moorage.config import load_settings  # noqa: E402
from moorage.demo import assets  # noqa: E402
from moorage.demo.run import DEMO_MODELS, ensure_registered  # noqa: E402
from moorage.registry import Registry  # noqa: E402

TOPICS = ("the ocean", "a city at night", "mountains", "coffee", "trains", "the moon", "libraries", "rain")


def _counter(result: str) -> float:
    from prometheus_client import REGISTRY

    labels = {"model": "smollm2", "result": result}
    return REGISTRY.get_sample_value("moorage_response_cache_requests_total", labels) or 0.0


async def run(settings, registry, args) -> dict:
    import httpx
    from asgi_lifespan import LifespanManager

    from moorage.server import create_app

    app = create_app(settings, ["smollm2@production"], registry=registry)
    async with LifespanManager(app) as manager:
        await app.state.loading
        transport = httpx.ASGITransport(manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://moorage", timeout=300) as client:

            async def chat(topic: str, max_tokens: int = args.max_tokens, **sampling) -> tuple[float, str]:
                body = {
                    "model": "smollm2",
                    "messages": [{"role": "user", "content": f"Write two sentences about {topic}."}],
                    "max_tokens": max_tokens,
                    **sampling,
                }
                started = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=body)
                elapsed = time.perf_counter() - started
                r.raise_for_status()
                print(f"  {topic!r} {sampling}: {elapsed * 1000:.1f} ms", file=sys.stderr, flush=True)
                return elapsed * 1000, r.json()["choices"][0]["message"]["content"]

            await chat("warming up", 2, temperature=0)  # the first call pays one-off costs
            before = {k: _counter(k) for k in ("hit", "miss", "skip")}
            miss, hit, same = [], [], True
            for topic in TOPICS[: args.prompts]:
                ms, text = await chat(topic, temperature=0)
                miss.append(ms)
                for _ in range(args.repeats):
                    ms, again = await chat(topic, temperature=0)
                    hit.append(ms)
                    same &= again == text
            # what is cached (seeded) and what never is (sampled), on short answers
            seeded = [await chat("bees", 4, temperature=0.8, seed=42) for _ in range(2)]
            sampled = [await chat("bees", 4, temperature=0.8) for _ in range(2)]
            counts = {k: _counter(k) - v for k, v in before.items()}
    return {"miss": miss, "hit": hit, "same": same, "seeded": seeded, "sampled": sampled, "counts": counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=os.path.expanduser("~/.moorage"))
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    args.prompts = max(1, min(args.prompts, len(TOPICS)))
    env = {
        "MOORAGE_HOME": args.home,
        "MOORAGE_SECURITY__AUTH": "false",
        "MOORAGE_SECURITY__AUDIT": "false",
        "MOORAGE_CACHE__ENABLED": "true",
        "MOORAGE_SERVE__POLL_INTERVAL_S": "0",
    }
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = load_settings(environ=env)
    registry = Registry.from_settings(settings)
    name, task, package = next(m for m in DEMO_MODELS if m[0] == "smollm2")
    ensure_registered(registry, name, task, package, lambda: assets.smollm2_folder(settings.cache_dir))

    import torch

    from moorage.runtime.hf import resolve_dtype

    dtype = str(resolve_dtype(torch, settings.runtime)).removeprefix("torch.")
    m = machine(dtype, settings)
    print(f"cpu: {m['cpu']} ({m['cpus']} cpus), isa: {' '.join(m['isa']) or 'none of ' + ', '.join(ISA_FLAGS)}")
    print(f"torch {m['torch']}, {m['torch_threads']} threads; dtype {dtype} (runtime.dtype={settings.runtime.dtype})")
    print(f"smollm2@production, greedy chat, max_tokens {args.max_tokens}, in-process app, memory cache")

    r = asyncio.run(run(settings, registry, args))
    miss, hit = statistics.median(r["miss"]), statistics.median(r["hit"])
    print(f"miss (computed):  median {miss:9.2f} ms over {len(r['miss'])} requests")
    print(f"hit  (cached):    median {hit:9.2f} ms over {len(r['hit'])} requests   same text: {r['same']}")
    print(f"miss / hit: {miss / hit:,.0f}x")
    (seeded_miss, seeded_text), (seeded_hit, seeded_again) = r["seeded"]
    print(f"seeded (temperature 0.8, seed 42, 4 tokens): {seeded_miss:.2f} ms then {seeded_hit:.2f} ms, "
          f"same text: {seeded_text == seeded_again}")  # fmt: skip
    (sampled_first, _), (sampled_second, _) = r["sampled"]
    print(f"sampled without a seed (4 tokens): {sampled_first:.2f} ms then {sampled_second:.2f} ms (never cached)")
    counts = r["counts"]
    print(f"moorage_response_cache_requests_total: hit {counts['hit']:.0f}, miss {counts['miss']:.0f}, "
          f"skip {counts['skip']:.0f}")  # fmt: skip
    registry.close()


if __name__ == "__main__":
    main()
