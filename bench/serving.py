"""Serving benchmark: moorage over HTTP beside the in-process limits and a naive service.

    python bench/serving.py [--home DIR] [--seconds 8] [--out bench/results/serving.json]

Embeddings (demo MiniLM, one sentence per request):
  (a) raw in-process throughput at the best batch size (the limit)
  (b) moorage over HTTP at 1, 16 and 64 concurrent clients
  (c) a naive FastAPI service that runs one request at a time (bench/naive_server.py)
Generation (demo SmolLM2, 64 new tokens, greedy):
  (d) sequential transformers `generate`, one prompt at a time
  (e) static batched `generate` of 32 prompts, in-process
  (f) moorage with 32 concurrent streaming clients (time to first token too)
Everything runs in one process tree on 127.0.0.1, bounded in requests and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import encode_post, percentile, run_load  # noqa: E402

from moorage.config import load_settings  # noqa: E402
from moorage.demo import assets  # noqa: E402
from moorage.demo.run import DEMO_MODELS, ensure_registered  # noqa: E402
from moorage.registry import Registry  # noqa: E402
from moorage.runtime import GenerateInput, GenerationParams, Runtime  # noqa: E402
from moorage.security.keys import KeyStore  # noqa: E402

GEN_TOKENS = 64
GEN_CLIENTS = 32
TOPICS = (
    "the ocean",
    "a city at night",
    "mountains",
    "coffee",
    "trains",
    "the moon",
    "libraries",
    "rain",
    "bread",
    "music",
    "a river",
    "winter",
    "bees",
    "bridges",
    "clocks",
    "gardens",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, path: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server on port {port} exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server on port {port} not ready after {timeout}s")


def sentences(limit: int = 512) -> list[str]:
    rows = assets.bbc_news()
    out = []
    for row in rows:
        first = row["text"].strip().split(". ")[0].strip()
        if 20 < len(first) < 200:
            out.append(first)
        if len(out) == limit:
            break
    return out


def bench_raw_embed(model, texts: list[str], seconds: float) -> dict:
    """(a) the handler alone (tokenise + forward), at several batch sizes; the best is the limit."""
    by_size = {}
    for size in (16, 32, 64, 128):
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 4:
            batch = [texts[(done + i) % len(texts)] for i in range(size)]
            model.predict(batch)
            done += size
        by_size[size] = done / (time.perf_counter() - started)
    best = max(by_size, key=by_size.get)
    return {"best_batch_size": best, "throughput": round(by_size[best], 1), "by_batch_size": _round(by_size)}


def http_embed(port: int, model: str, texts: list[str], concurrency: int, seconds: float, key: str = "") -> dict:
    bodies = [orjson.dumps({"model": model, "input": t}) for t in texts]
    requests = [encode_post("127.0.0.1", port, "/v1/embeddings", b, key) for b in bodies]
    warm = asyncio.run(run_load("127.0.0.1", port, requests, concurrency, concurrency * 2, 5))
    assert warm.ok, f"warm-up failed: {warm.statuses}"
    result = asyncio.run(run_load("127.0.0.1", port, requests, concurrency, 10**9, seconds))
    return result.summary() | {"warmup_requests": sum(warm.statuses.values())}


def prompts() -> list[GenerateInput]:
    params = GenerationParams(max_new_tokens=GEN_TOKENS)
    return [
        GenerateInput(messages=({"role": "user", "content": f"Write a short paragraph about {topic}."},), params=params)
        for topic in (TOPICS * 2)[:GEN_CLIENTS]
    ]


def bench_generate_in_process(model, items: list[GenerateInput], sequential: int) -> tuple[dict, dict]:
    handler = model.handler
    handler.generate_static(items[:2])  # warm-up
    started, tokens = time.perf_counter(), 0
    for item in items[:sequential]:
        tokens += handler.generate_static([item])[0].completion_tokens
    seq_s = time.perf_counter() - started
    started = time.perf_counter()
    results = handler.generate_static(items)
    batch_s = time.perf_counter() - started
    batch_tokens = sum(r.completion_tokens for r in results)
    d = {"prompts": sequential, "tokens": tokens, "seconds": round(seq_s, 2), "tokens_per_s": round(tokens / seq_s, 1)}
    e = {
        "prompts": len(items),
        "tokens": batch_tokens,
        "seconds": round(batch_s, 2),
        "tokens_per_s": round(batch_tokens / batch_s, 1),
    }
    return d, e


async def http_generate(port: int, model: str, items: list[GenerateInput], key: str = "") -> dict:
    """(f) one streaming chat request per client, all at once; tokens counted from `usage`."""
    ttfts, tokens, errors = [], [], []

    async def client(http: httpx.AsyncClient, item: GenerateInput) -> None:
        body = {
            "model": model,
            "messages": list(item.messages),
            "max_tokens": GEN_TOKENS,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        started = time.perf_counter()
        first = None
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                errors.append(response.status_code)
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = orjson.loads(line[6:])
                if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - started
                if chunk.get("usage"):
                    tokens.append(chunk["usage"]["completion_tokens"])
        ttfts.append(first if first is not None else time.perf_counter() - started)

    limits = httpx.Limits(max_connections=len(items))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=300, limits=limits, headers=headers
    ) as http:
        await client(http, items[0])  # warm-up
        ttfts.clear(), tokens.clear()
        started = time.perf_counter()
        await asyncio.gather(*(client(http, item) for item in items))
        elapsed = time.perf_counter() - started
    return {
        "clients": len(items),
        "errors": errors,
        "tokens": sum(tokens),
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(sum(tokens) / elapsed, 1),
        "ttft_p50_ms": round(percentile(ttfts, 50) * 1000, 1),
        "ttft_p99_ms": round(percentile(ttfts, 99) * 1000, 1),
    }


def _round(d: dict) -> dict:
    return {k: round(v, 1) for k, v in d.items()}


def start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=os.environ.get("MOORAGE_HOME", str(Path.home() / ".moorage")))
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each load phase")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serving.json"))
    args = parser.parse_args()
    env = {**os.environ, "MOORAGE_HOME": args.home, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    settings = load_settings(environ=env)
    registry = Registry.from_settings(settings)
    folders = {"minilm": assets.minilm_folder, "smollm2": lambda: assets.smollm2_folder(settings.cache_dir)}
    for name, task, package in DEMO_MODELS:
        ensure_registered(registry, name, task, package, folders[name])
    texts = sentences()
    key = KeyStore(registry.catalog).create("invoker", name="bench")[1]

    port, naive_port = free_port(), free_port()
    server = start(
        [sys.executable, "-m", "moorage", "serve", "-m", "minilm", "-m", "smollm2", "--port", str(port)], env
    )
    naive = start(
        [sys.executable, str(Path(__file__).parent / "naive_server.py"), str(assets.minilm_folder()), str(naive_port)],
        env,
    )
    results: dict = {"machine": {"cpus": os.cpu_count()}}
    try:
        wait_ready(port, "/readyz", server)
        wait_ready(naive_port, "/healthz", naive)
        runtime = Runtime(registry, settings.runtime)
        import torch

        from moorage.runtime.hf import resolve_dtype

        dtype = str(resolve_dtype(torch, settings.runtime)).removeprefix("torch.")
        results["dtype"] = {"moorage": f"{dtype} (runtime.dtype={settings.runtime.dtype})", "naive": "float32"}
        print(f"moorage runtime dtype: {results['dtype']['moorage']}; the naive service: float32, as written")
        print("embeddings (MiniLM, one sentence per request)", flush=True)
        raw = bench_raw_embed(runtime.get("minilm"), texts, args.seconds)
        results["a_raw_in_process"] = raw
        print(f"  (a) raw in-process       {raw['throughput']:8.1f} sentences/s (batch {raw['best_batch_size']})")
        for c in (1, 16, 64):
            r = http_embed(port, "minilm", texts, c, args.seconds, key)
            results[f"b_moorage_http_c{c}"] = r
            latency = f"p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms"
            print(f"  (b) moorage, {c:2d} clients  {r['throughput_rps']:8.1f} req/s  {latency}")
        r = http_embed(naive_port, "minilm", texts, 64, args.seconds)
        results["c_naive_http_c64"] = r
        print(
            f"  (c) naive FastAPI, 64     {r['throughput_rps']:8.1f} req/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms"
        )
        naive.terminate()

        print(f"generation (SmolLM2, {GEN_TOKENS} new tokens, greedy)", flush=True)
        items = prompts()
        d, e = bench_generate_in_process(runtime.get("smollm2"), items, sequential=6)
        results["d_sequential_generate"], results["e_static_batched_generate"] = d, e
        print(f"  (d) sequential generate  {d['tokens_per_s']:8.1f} tokens/s")
        print(f"  (e) static batch of {len(items)}   {e['tokens_per_s']:8.1f} tokens/s")
        f = asyncio.run(http_generate(port, "smollm2", items, key))
        results["f_moorage_stream_c32"] = f
        ttft = f"TTFT p50 {f['ttft_p50_ms']} ms  p99 {f['ttft_p99_ms']} ms"
        print(f"  (f) moorage, {len(items)} streams {f['tokens_per_s']:8.1f} tokens/s  {ttft}")
    finally:
        for proc in (server, naive):
            proc.terminate()
            proc.wait(timeout=60)

    b64 = results["b_moorage_http_c64"]["throughput_rps"]
    ratios = {
        "b64_over_a": round(b64 / raw["throughput"], 3),
        "b64_over_c": round(b64 / results["c_naive_http_c64"]["throughput_rps"], 2),
        "f_over_e": round(f["tokens_per_s"] / e["tokens_per_s"], 3),
        "f_over_d": round(f["tokens_per_s"] / d["tokens_per_s"], 2),
    }
    results["ratios"] = ratios
    results["targets"] = {"b64_over_a": 0.75, "b64_over_c": 3.0, "f_over_e": 1.0, "f_over_d": 8.0}
    print("ratios (target):")
    for key, value in ratios.items():
        target = results["targets"][key]
        print(f"  {key:12s} {value:8.3f}  ({'>=' if value >= target else '< '} {target})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
