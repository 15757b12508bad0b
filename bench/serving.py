"""Serving benchmark: moorage over HTTP beside the in-process limits and a naive service.

    python bench/serving.py [--home DIR] [--seconds 8] [--phases embed,generate,long,overhead,detok]
    python bench/serving.py --quick          # generation only: generate, overhead, detok

Embeddings (demo MiniLM, one sentence per request), phase `embed`:
  (a) raw in-process throughput at the best batch size (the limit)
  (b) moorage over HTTP at 1, 16 and 64 concurrent clients
  (c) a naive FastAPI service that runs one request at a time (bench/naive_server.py)
Generation (demo SmolLM2, greedy), phases `generate` (64 new tokens) and `long` (512):
  (d) sequential transformers `generate`, one prompt at a time (64 tokens only)
  (e) static batched `generate` of 32 prompts, in-process
  (f) moorage with 32 concurrent streaming clients over HTTP (time to first token too)
Engine, in-process (phase `overhead`): the step time outside the model forward at 32 streams.
Structured outputs, in-process (phase `structured`): 32 streams with a JSON Schema constraint beside
the same 32 prompts without one (greedy, up to 64 tokens): tokens/s of both and their ratio, the
time per step in the forward and in the grammar masks, rows per step (constrained rows that finish
early leave the batch emptier), and how many outputs validate against the schema.
Detokenisation (phase `detok`): CPU per token for a 4,096-token output beside a 256-token one.
The header names the CPU, the ISA flags that decide the kernels, torch, its threads and the
dtype: results differ between AVX2-only and bf16 machines. Each phase also prints the share of the
machine's CPU that other processes took meanwhile (a busy neighbour slows a phase, not moorage).
Everything runs in one process tree on 127.0.0.1, bounded in requests and time; (e) and (f) of one
length run back to back (at 64 tokens twice, the best round of each counting).
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
from cpuload import OtherLoad  # noqa: E402
from engine_probe import detokenize_cost, engine_overhead  # noqa: E402
from loadgen import encode_post, percentile, run_load, stream_sse  # noqa: E402
from structured import SCHEMA, structured_run  # noqa: E402

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


def prompts(max_new_tokens: int) -> list[GenerateInput]:
    params = GenerationParams(max_new_tokens=max_new_tokens)
    return [
        GenerateInput(messages=({"role": "user", "content": f"Write a short paragraph about {topic}."},), params=params)
        for topic in (TOPICS * 2)[:GEN_CLIENTS]
    ]


def _rate(tokens: int, seconds: float, **extra) -> dict:
    return {**extra, "tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def bench_sequential(handler, items: list[GenerateInput]) -> dict:
    """(d) one prompt at a time through transformers' `generate`."""
    started, tokens = time.perf_counter(), 0
    for item in items:
        tokens += handler.generate_static([item])[0].completion_tokens
    return _rate(tokens, time.perf_counter() - started, prompts=len(items))


def bench_static(handler, items: list[GenerateInput]) -> dict:
    """(e) one static batch through transformers' `generate`: every row runs until the longest ends."""
    started = time.perf_counter()
    results = handler.generate_static(items)
    return _rate(sum(r.completion_tokens for r in results), time.perf_counter() - started, prompts=len(items))


async def http_generate(port: int, model: str, items: list[GenerateInput], key: str = "") -> dict:
    """(f) one streaming chat request per client, all at once; tokens counted from `usage`."""

    def request(item: GenerateInput) -> bytes:
        body = {
            "model": model,
            "messages": list(item.messages or ()),
            "max_tokens": item.params.max_new_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return encode_post("127.0.0.1", port, "/v1/chat/completions", orjson.dumps(body), key)

    requests = [request(i) for i in items]
    warm = await stream_sse("127.0.0.1", port, requests[0])
    if warm.status != 200:
        raise SystemExit(f"(f) warm-up answered {warm.status}")
    started = time.perf_counter()
    streams = await asyncio.gather(*(stream_sse("127.0.0.1", port, r) for r in requests))
    elapsed = time.perf_counter() - started
    tokens = sum(s.usage["completion_tokens"] for s in streams if s.usage)
    ttfts = [s.ttft for s in streams if s.ttft is not None]
    return _rate(
        tokens,
        elapsed,
        clients=len(items),
        errors=[s.status for s in streams if s.status != 200],
        ttft_p50_ms=round(percentile(ttfts, 50) * 1000, 1),
        ttft_p99_ms=round(percentile(ttfts, 99) * 1000, 1),
    )


def _round(d: dict) -> dict:
    return {k: round(v, 1) for k, v in d.items()}


def start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def machine(dtype: str, settings) -> dict:
    """What the numbers depend on: the CPU and its matmul ISA, torch, its threads, the dtype."""
    import platform

    import torch

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    threads = settings.runtime.num_threads or torch.get_num_threads()
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "torch": torch.__version__,
        "torch_threads": threads,
        "dtype": dtype,
    }


PHASES = ("embed", "generate", "long", "overhead", "detok", "structured")
QUICK = ("generate", "overhead", "detok")
TARGETS = {
    "b64_over_a": 0.75,
    "b64_over_c": 3.0,
    "f_over_e": 1.0,
    "f_over_d": 8.0,
    "f512_over_e512": 1.0,
    "engine_overhead_share": 0.10,
    "detok_4096_over_256": 2.0,
    "structured_over_plain": 0.8,
}
AT_MOST = {"engine_overhead_share", "detok_4096_over_256"}


SERVER_PIDS: list[int] = []  # the servers this run started: their CPU time is ours, not a neighbour's


def measured(fn, *args):
    """`fn(*args)`'s result with the share of the machine's CPU that other processes took meanwhile."""
    with OtherLoad(SERVER_PIDS) as load:
        result = fn(*args)
    return {**result, "other_cpu_share": load.share}


def _other(r: dict) -> str:
    share = r.get("other_cpu_share")
    return "" if share is None else f"  [other load {100 * share:.0f} %]"


def run_embed(port: int, naive_port: int, runtime, key: str, seconds: float, results: dict) -> None:
    texts = sentences()
    print("embeddings (MiniLM, one sentence per request)", flush=True)
    raw = results["a_raw_in_process"] = measured(bench_raw_embed, runtime.get("minilm"), texts, seconds)
    print(
        f"  (a) raw in-process       {raw['throughput']:8.1f} sentences/s (batch {raw['best_batch_size']}){_other(raw)}"
    )
    for c in (1, 16, 64):
        r = results[f"b_moorage_http_c{c}"] = measured(http_embed, port, "minilm", texts, c, seconds, key)
        latency = f"p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms"
        print(f"  (b) moorage, {c:2d} clients  {r['throughput_rps']:8.1f} req/s  {latency}{_other(r)}")
    r = results["c_naive_http_c64"] = measured(http_embed, naive_port, "minilm", texts, 64, seconds)
    latency = f"p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms"
    print(f"  (c) naive FastAPI, 64     {r['throughput_rps']:8.1f} req/s  {latency}{_other(r)}")


def run_generate(port: int, handler, key: str, tokens: int, results: dict, sequential: int = 0, rounds: int = 1):
    """(e) then (f), back to back, `rounds` times; the best round of each counts (a neighbour's burst
    of work slows one round, not the machine)."""
    print(f"generation (SmolLM2, {tokens} new tokens, greedy, {GEN_CLIENTS} prompts)", flush=True)
    items = prompts(tokens)
    suffix = "" if tokens == GEN_TOKENS else str(tokens)
    if sequential:
        d = results["d_sequential_generate"] = measured(bench_sequential, handler, items[:sequential])
        print(f"  (d) sequential generate  {d['tokens_per_s']:8.1f} tokens/s{_other(d)}")
    best_e: dict | None = None
    best_f: dict | None = None
    for _ in range(rounds):
        e = measured(bench_static, handler, items)
        print(
            f"  (e) static batch of {len(items)}   {e['tokens_per_s']:8.1f} tokens/s  ({e['tokens']} tokens){_other(e)}"
        )
        f = measured(lambda: asyncio.run(http_generate(port, "smollm2", items, key)))
        ttft = f"TTFT p50 {f['ttft_p50_ms']} ms  p99 {f['ttft_p99_ms']} ms"
        line = f"{f['tokens_per_s']:8.1f} tokens/s  ({f['tokens']} tokens)  {ttft}{_other(f)}"
        print(f"  (f) moorage, {len(items)} streams {line}")
        if f["errors"]:
            print(f"      errors: {f['errors']}")
        best_e = e if best_e is None or e["tokens_per_s"] > best_e["tokens_per_s"] else best_e
        best_f = f if best_f is None or f["tokens_per_s"] > best_f["tokens_per_s"] else best_f
    assert best_e is not None and best_f is not None
    results[f"e{suffix}_static_batched_generate"] = best_e
    results[f"f{suffix}_moorage_stream_c{len(items)}"] = best_f
    ratio = best_f["tokens_per_s"] / best_e["tokens_per_s"]
    print(f"      f/e = {ratio:.3f}" + (f" (best of {rounds} rounds each)" if rounds > 1 else ""), flush=True)


def run_overhead(handler, results: dict) -> None:
    print(f"engine step, in-process ({GEN_CLIENTS} streams, {GEN_TOKENS * 2} new tokens)", flush=True)
    r = results["engine_overhead"] = measured(engine_overhead, handler, prompts(GEN_TOKENS * 2))
    print(
        f"  step {r['step_ms_mean']} ms, forward {r['forward_ms_mean']} ms, outside the forward"
        f" {r['outside_forward_ms_mean']} ms: {100 * r['overhead_share']:.1f} % of the step"
        f"  ({r['tokens_per_s']} tokens/s){_other(r)}"
    )


def run_detok(handler, results: dict) -> None:
    print("detokenisation (SmolLM2 tokenizer, synthetic tokens, one stop string)", flush=True)
    r = results["detokenize"] = measured(detokenize_cost, handler)
    print(
        f"  {r['us_per_token_256']} us/token at 256 tokens, {r['us_per_token_4096']} us/token at 4096:"
        f" ratio {r['ratio_long_over_short']}{_other(r)}"
    )
    print(
        f"  (decoding the whole sequence per token instead: {r['whole_decode_us_per_token_256']} us/token at 256,"
        f" {r['whole_decode_us_per_token_1024']} at 1024)"
    )


def structured_prompts(constrained: bool) -> list[GenerateInput]:
    from moorage.runtime.base import Constraint

    constraint = Constraint("json_schema", json.dumps(SCHEMA)) if constrained else None
    params = GenerationParams(max_new_tokens=GEN_TOKENS, constraint=constraint)
    ask = "Describe {} as JSON: a name, a category, a rating from 1 to 5 and up to three tags."
    content = [ask.format(topic) for topic in (TOPICS * 2)[:GEN_CLIENTS]]
    return [GenerateInput(messages=({"role": "user", "content": c},), params=params) for c in content]


def run_structured(handler, results: dict, rounds: int = 1) -> None:
    print(f"structured outputs, in-process ({GEN_CLIENTS} streams, up to {GEN_TOKENS} tokens, greedy)", flush=True)
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, constrained in (("plain", False), ("json_schema", True)):
            r = measured(structured_run, handler, structured_prompts(constrained))
            valid = f"  valid {r['valid']}/{r['sequences']}" if constrained else ""
            print(
                f"  {name:12s} {r['tokens_per_s']:8.1f} tokens/s  ({r['tokens']} tokens, {r['finished_stop']} stopped)"
                f"  step {r['step_ms_mean']} ms: forward {r['forward_ms_mean']} ms, masks {r['mask_ms_mean']} ms,"
                f" {r['rows_per_step']} rows/step"
                f"{valid}{_other(r)}"
            )
            if name not in best or r["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = r
    results["structured_plain"], results["structured_json_schema"] = best["plain"], best["json_schema"]
    ratio = best["json_schema"]["tokens_per_s"] / best["plain"]["tokens_per_s"]
    rounds_note = f" (best of {rounds} rounds each)" if rounds > 1 else ""
    print(f"      json_schema/plain = {ratio:.3f}{rounds_note}", flush=True)


def ratios(results: dict) -> dict:
    out = {}
    rate = lambda k, f="tokens_per_s": results[k][f] if k in results else None  # noqa: E731
    b64, a, c = rate("b_moorage_http_c64", "throughput_rps"), rate("a_raw_in_process", "throughput"), None
    c = rate("c_naive_http_c64", "throughput_rps")
    if b64 and a:
        out["b64_over_a"] = round(b64 / a, 3)
    if b64 and c:
        out["b64_over_c"] = round(b64 / c, 2)
    f, e, d = rate(f"f_moorage_stream_c{GEN_CLIENTS}"), rate("e_static_batched_generate"), rate("d_sequential_generate")
    if f and e:
        out["f_over_e"] = round(f / e, 3)
    if f and d:
        out["f_over_d"] = round(f / d, 2)
    f512, e512 = rate(f"f512_moorage_stream_c{GEN_CLIENTS}"), rate("e512_static_batched_generate")
    if f512 and e512:
        out["f512_over_e512"] = round(f512 / e512, 3)
    if "engine_overhead" in results:
        out["engine_overhead_share"] = results["engine_overhead"]["overhead_share"]
    if "detokenize" in results:
        out["detok_4096_over_256"] = results["detokenize"]["ratio_long_over_short"]
    if "structured_plain" in results:
        plain, constrained = results["structured_plain"], results["structured_json_schema"]
        out["structured_over_plain"] = round(constrained["tokens_per_s"] / plain["tokens_per_s"], 3)
    return out


class Servers:
    """The moorage and naive servers of one run; every one is stopped when the run ends."""

    def __init__(self, env: dict) -> None:
        self.env, self.procs = env, []
        self.port, self.naive_port = free_port(), free_port()

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in list(self.procs):
            self.retire(proc)

    def _start(self, cmd: list[str], port: int, path: str) -> subprocess.Popen:
        proc = start(cmd, self.env)
        self.procs.append(proc)
        SERVER_PIDS.append(proc.pid)
        wait_ready(port, path, proc)
        return proc

    def moorage(self, *names: str) -> subprocess.Popen:
        models = [arg for name in names for arg in ("-m", name)]
        return self._start(
            [sys.executable, "-m", "moorage", "serve", *models, "--port", str(self.port)], self.port, "/readyz"
        )

    def naive(self) -> subprocess.Popen:
        cmd = [sys.executable, str(Path(__file__).parent / "naive_server.py"), str(assets.minilm_folder())]
        return self._start([*cmd, str(self.naive_port)], self.naive_port, "/healthz")

    def retire(self, proc: subprocess.Popen) -> None:
        proc.terminate()
        proc.wait(timeout=60)
        self.procs.remove(proc)
        SERVER_PIDS.remove(proc.pid)


def run_phases(phases: tuple[str, ...], args, servers: Servers, runtime, key: str, results: dict) -> None:
    """A server per model by default: in one process, serving MiniLM next to SmolLM2 (with the
    sentence-transformers stack and the OpenMP and BLAS runtimes it loads) slows SmolLM2's decode
    steps; --one-server measures that setup."""
    embeds, generates = "embed" in phases, bool({"generate", "long"} & set(phases))
    port = servers.port
    server = None
    if args.one_server and (embeds or generates):
        server = servers.moorage(*(["minilm"] if embeds else []), *(["smollm2"] if generates else []))
    elif embeds:
        server = servers.moorage("minilm")
    if embeds:
        naive = servers.naive()
        run_embed(port, servers.naive_port, runtime, key, args.seconds, results)
        servers.retire(naive)
    if generates and not args.one_server:
        if server is not None:
            servers.retire(server)
        server = servers.moorage("smollm2")
    handler = runtime.get("smollm2").handler if set(phases) - {"embed"} else None
    if handler is not None:
        handler.generate_static(prompts(4)[:2])  # warm-up
    if "generate" in phases:
        run_generate(port, handler, key, GEN_TOKENS, results, sequential=6, rounds=2)
    if "long" in phases:
        run_generate(port, handler, key, GEN_TOKENS * 8, results)
    if "overhead" in phases:
        run_overhead(handler, results)
    if "detok" in phases:
        run_detok(handler, results)
    if "structured" in phases:
        run_structured(handler, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=os.environ.get("MOORAGE_HOME", str(Path.home() / ".moorage")))
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each embedding load phase")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serving.json"))
    parser.add_argument(
        "--one-server", action="store_true", help="serve both models from one server (default: a server per model)"
    )
    args = parser.parse_args()
    phases = QUICK if args.quick else tuple(p.strip() for p in args.phases.split(",") if p.strip())
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {', '.join(PHASES)}")
    env = {**os.environ, "MOORAGE_HOME": args.home, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    settings = load_settings(environ=env)
    registry = Registry.from_settings(settings)
    folders = {"minilm": assets.minilm_folder, "smollm2": lambda: assets.smollm2_folder(settings.cache_dir)}
    for name, task, package in DEMO_MODELS:
        ensure_registered(registry, name, task, package, folders[name])
    key = KeyStore(registry.catalog).create("invoker", name="bench")[1]

    import torch

    from moorage.runtime.hf import resolve_dtype

    dtype = str(resolve_dtype(torch, settings.runtime)).removeprefix("torch.")
    results: dict = {"machine": machine(dtype, settings), "phases": list(phases)}
    m = results["machine"]
    print(f"cpu: {m['cpu']} ({m['cpus']} cpus), isa: {' '.join(m['isa']) or 'none of ' + ', '.join(ISA_FLAGS)}")
    print(f"torch {m['torch']}, {m['torch_threads']} threads; dtype {dtype} (runtime.dtype={settings.runtime.dtype})")

    results["servers"] = "one server, both models" if args.one_server else "a server per model"
    print(f"servers: {results['servers']}")
    with Servers(env) as servers:
        run_phases(phases, args, servers, Runtime(registry, settings.runtime), key, results)

    results["ratios"] = ratios(results)
    results["targets"] = {k: v for k, v in TARGETS.items() if k in results["ratios"]}
    print("ratios (target):")
    for name, value in results["ratios"].items():
        target = TARGETS[name]
        ok = value <= target if name in AT_MOST else value >= target
        sign = ("<=" if ok else "> ") if name in AT_MOST else (">=" if ok else "< ")
        print(f"  {name:22s} {value:8.3f}  ({sign} {target})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
