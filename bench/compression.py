"""Compression benchmark: the demo MiniLM side by side with its compressed variants, in one run.

    python bench/compression.py            # ~512 BBC sentences, every variant, then HTTP (~10-20 min on 2 cores)
    python bench/compression.py --quick    # 64 sentences, fewer batches, tiny prune/distill budgets (~3 minutes)

In a temporary home (or --home), the demo's minilm@production and bbc-news dataset are registered, then:
  torch fp32 | torch bf16 (only where the CPU has native bf16: avx512_bf16 or amx_bf16) | ORT fp32 |
  ORT int8 per-tensor | ORT int8 per-channel (reduce_range as the CPU's ISA chooses it) | pruned heads
  and distilled (the prune-heads and distill methods, when they are installed; a note otherwise).
Each is built by its compression method into a folder, loaded by the runtime handler that would serve
it, and measured on the same ~30-token sentences (the first sentence of BBC articles): quality against
torch fp32 (mean and min cosine, top-1 nearest-neighbour agreement), texts/s at batch 1 and 32 (a fixed
number of batches after a warm-up one), load time, resident memory added by loading, weight size.

Then the pipeline itself: `moorage compress minilm@production --method onnx-int8` with the default gates
(registered only if they pass), and over HTTP (a `moorage serve` on 127.0.0.1 serving both the fp32
parent and the gated int8 version, bounded requests of 32 texts from 4 connections) texts/s of each,
and their ratio to the same model's in-process batch-32 throughput.

With --classifier REF (a classifier in --home, e.g. bench/training.py's bbc-minilm), that classifier
goes through the pipeline too: accuracy and macro-F1 against its parent on its own test split, per class.

Targets (issue 14): int8 mean cosine >= 0.99 at >= 1.5x the parent's in-process throughput at batch 32,
weights <= 25 % of fp32; over HTTP >= 0.75x its in-process throughput. The header prints the CPU, its ISA
flags, torch and its threads, and the dtype.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import encode_post, run_load  # noqa: E402
from serving import free_port, machine, sentences, wait_ready  # noqa: E402

from moorage.config import Settings, load_settings  # noqa: E402
from moorage.demo import assets  # noqa: E402
from moorage.demo.run import ensure_registered  # noqa: E402
from moorage.registry import Registry, VersionInfo  # noqa: E402
from moorage.training.compress.methods import METHODS, BuildContext, method  # noqa: E402
from moorage.training.compress.quantize import cpu_flags  # noqa: E402
from moorage.training.compress.report import embedding_quality, load, run_all, throughput, weights_bytes  # noqa: E402
from moorage.training.datasets import Datasets  # noqa: E402

BATCHES = {1: 64, 32: 16}  # batch size -> timed batches (after one warm-up batch)
QUICK_BATCHES = {1: 16, 32: 3}
HTTP_REQUESTS, QUICK_HTTP_REQUESTS = 64, 12  # requests of 32 texts, per served version
HTTP_CONNECTIONS = 4
# The structural methods are trained; with --quick they get a token budget (their quality is then
# not what they reach, only that they run), in full their own defaults.
QUICK_PARAMS = {
    "prune-heads": {"num_texts": 16},
    "distill": {"max_steps": 4, "max_texts": 64, "batch_size": 8},
}
TARGETS = {"int8_mean_cosine": 0.99, "int8_speedup_b32": 1.5, "int8_size_ratio": 0.25, "http_over_inprocess": 0.75}


def native_bf16() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return " avx512_bf16" in flags or " amx_bf16" in flags


def with_dtype(settings: Settings, dtype: str) -> Settings:
    return settings.model_copy(update={"runtime": settings.runtime.model_copy(update={"dtype": dtype})})


def prepare(settings: Settings) -> VersionInfo:
    """The demo MiniLM (minilm@production) and the BBC dataset, registered in this home."""
    registry = Registry.from_settings(settings)
    try:
        info, _ = ensure_registered(registry, "minilm", "embed", assets.MINILM_PACKAGE, assets.minilm_folder)
        path, _, _ = assets.write_bbc_news(settings.home / "datasets")
        Datasets.from_registry(registry).ensure("bbc-news", path, description="demo: BBC News")
        return info
    finally:
        registry.close()


def build(settings: Settings, parent: VersionInfo, name: str, params: dict[str, Any], out: Path) -> tuple[Path, dict]:
    """A variant's folder, made by its compression method (not registered)."""
    registry = Registry.from_settings(settings)
    try:
        parent_dir = registry.local_path(parent)
    finally:
        registry.close()
    started = time.perf_counter()
    result = method(name).build(BuildContext(parent, parent_dir, out, params, settings))
    return out, {"build_s": round(time.perf_counter() - started, 1), "parameters": result.parameters}


def measure_variant(
    label: str, folder: Path, settings: Settings, texts: list[str], reference: Any, batches: dict[int, int]
) -> tuple[dict, Any]:
    loaded = load(folder, "embed", settings.runtime, label)
    vectors = run_all(loaded.handler, texts)
    speed = throughput(loaded.handler, texts, batches)
    row = {
        "framework": loaded.framework,
        "load_s": round(loaded.load_seconds, 2),
        "rss_delta_mb": round(loaded.rss_delta_bytes / 1e6, 1),
        "weights_mb": round(weights_bytes(folder) / 1e6, 2),
        **{f"texts_per_s_b{size}": round(value, 1) for size, value in ((1, speed["batch_1"]), (32, speed["batch_32"]))},
    }
    if reference is not None:
        quality = embedding_quality(reference, vectors)
        row |= {k: round(quality[k], 4) for k in ("mean_cosine", "min_cosine", "nn_agreement")}
    del loaded
    gc.collect()
    return row, vectors


def side_by_side(settings: Settings, parent: VersionInfo, texts: list[str], work: Path, quick: bool) -> dict:
    batches = QUICK_BATCHES if quick else BATCHES
    registry = Registry.from_settings(settings)
    try:
        parent_dir = registry.local_path(parent)
    finally:
        registry.close()
    rows: dict[str, dict] = {}
    notes: list[str] = []
    fp32 = with_dtype(settings, "float32")
    print("measuring torch fp32 ...", flush=True)
    rows["torch fp32"], reference = measure_variant("torch-fp32", parent_dir, fp32, texts, None, batches)
    rows["torch fp32"] |= {"mean_cosine": 1.0, "min_cosine": 1.0, "nn_agreement": 1.0}
    if native_bf16():
        print("measuring torch bf16 ...", flush=True)
        bf16 = with_dtype(settings, "bfloat16")
        rows["torch bf16"], _ = measure_variant("torch-bf16", parent_dir, bf16, texts, reference, batches)
    else:
        notes.append("torch bf16: skipped, this CPU has no native bf16 (avx512_bf16 / amx_bf16)")
    variants = [
        ("ORT fp32", "onnx", {}),
        ("ORT int8 per-tensor", "onnx-int8", {"per_channel": False}),
        ("ORT int8 per-channel", "onnx-int8", {}),
        ("pruned heads", "prune-heads", QUICK_PARAMS["prune-heads"] if quick else {}),
        ("distilled", "distill", QUICK_PARAMS["distill"] if quick else {}),
    ]
    for label, name, params in variants:
        if not _importable(name):
            notes.append(f"{label}: skipped, method {name!r} is not installed")
            continue
        print(f"building {label} ({name} {params or ''}) ...", flush=True)
        try:
            folder, built = build(fp32, parent, name, params, work / label.replace(" ", "-"))
        except Exception as exc:  # one variant failing leaves the others to measure
            notes.append(f"{label}: {name} failed ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        print(f"measuring {label} ...", flush=True)
        rows[label], _ = measure_variant(label, folder, fp32, texts, reference, batches)
        rows[label] |= built
    base = rows["torch fp32"]
    for row in rows.values():
        row["speedup_b32"] = round(row["texts_per_s_b32"] / base["texts_per_s_b32"], 2)
        row["speedup_b1"] = round(row["texts_per_s_b1"] / base["texts_per_s_b1"], 2)
        row["size_ratio"] = round(row["weights_mb"] / base["weights_mb"], 4)
    return {"variants": rows, "notes": notes, "batches": {str(k): v for k, v in batches.items()}}


def _importable(name: str) -> bool:
    import importlib

    module = METHODS[name].split(":")[0]
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def gated(settings: Settings, texts: list[str]) -> dict:
    """The pipeline with the default gates: the int8 version is registered only if they pass."""
    from moorage.training.compress.pipeline import compress

    print("moorage compress minilm@production --method onnx-int8 (default gates) ...", flush=True)
    outcome = compress(settings, "minilm@production", "onnx-int8", texts=texts, user="bench")
    print(f"  {outcome.reason}")
    for g in outcome.gates:
        print(f"  gate {g.name:18s} {g.value:8.4f}  {g.rule} {g.threshold:g}  {'pass' if g.passed else 'FAIL'}")
    return {
        "registered": outcome.registered.ref if outcome.registered else None,
        "reason": outcome.reason,
        "gates": [g.as_dict() for g in outcome.gates],
        "speed": outcome.report["speed"],
        "quality": outcome.report["quality"],
        "size_ratio": outcome.report["size_ratio"],
    }


def classifier(settings: Settings, ref: str) -> dict:
    """A trained classifier (e.g. bench/training.py's bbc-minilm, kept with --home) through the pipeline
    with onnx-int8: accuracy and macro-F1 against its parent on its own registered test split, per class."""
    from moorage.training.compress.pipeline import compress

    print(f"moorage compress {ref} --method onnx-int8 (its lineage's test split) ...", flush=True)
    outcome = compress(settings, ref, "onnx-int8", user="bench")
    q = outcome.report["quality"]
    print(f"  {outcome.reason}")
    print(
        f"  accuracy {q['parent_accuracy']:.4f} -> {q['derived_accuracy']:.4f} ({100 * q['accuracy_delta']:+.2f} pts)"
    )
    print(
        f"  macro-F1 {q['parent_macro_f1']:.4f} -> {q['derived_macro_f1']:.4f} ({100 * q['macro_f1_delta']:+.2f} pts)"
    )
    for label, row in q["per_class"].items():
        print(f"    {label:16s} F1 {row['parent_f1']:.4f} -> {row['derived_f1']:.4f} (support {row['support']})")
    return {
        "registered": outcome.registered.ref if outcome.registered else None,
        "reason": outcome.reason,
        "gates": [g.as_dict() for g in outcome.gates],
        "quality": {k: v for k, v in q.items() if k != "derived_metrics"},
        "speed": outcome.report["speed"],
    }


def over_http(settings: Settings, refs: list[str], texts: list[str], requests: int) -> dict:
    """texts/s of each served version over HTTP: bounded requests of 32 texts, HTTP_CONNECTIONS at once."""
    port = free_port()
    env = {**os.environ, "MOORAGE_HOME": str(settings.home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env |= {"MOORAGE_SECURITY__AUTH": "false", "MOORAGE_RUNTIME__DTYPE": "float32"}
    if settings.runtime.num_threads:  # the threads the in-process numbers were measured with
        env["MOORAGE_RUNTIME__NUM_THREADS"] = str(settings.runtime.num_threads)
    cmd = [
        sys.executable,
        "-m",
        "moorage",
        "serve",
        *(a for ref in refs for a in ("--model", ref)),
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out: dict[str, Any] = {}
    try:
        wait_ready(port, "/readyz", proc, timeout=300)
        for ref in refs:
            bodies = [
                orjson.dumps({"model": ref, "input": [texts[(i * 32 + j) % len(texts)] for j in range(32)]})
                for i in range(8)
            ]
            posts = [encode_post("127.0.0.1", port, "/v1/embeddings", b) for b in bodies]
            warm = asyncio.run(run_load("127.0.0.1", port, posts, HTTP_CONNECTIONS, HTTP_CONNECTIONS, 60))
            if not warm.ok:
                raise SystemExit(f"{ref} over HTTP: warm-up failed {warm.statuses}")
            result = asyncio.run(run_load("127.0.0.1", port, posts, HTTP_CONNECTIONS, requests, 300))
            out[ref] = result.summary() | {"texts_per_s": round(result.ok * 32 / result.seconds, 1)}
            print(f"  HTTP {ref}: {out[ref]['texts_per_s']} texts/s ({result.ok} requests of 32)", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def print_table(rows: dict[str, dict]) -> None:
    head = f"{'variant':22s} {'mean cos':>9s} {'min cos':>8s} {'NN agr':>7s} {'b1/s':>8s} {'b32/s':>8s} {'x b32':>6s}"
    print(head + f" {'MB':>7s} {'size':>6s} {'load s':>7s}")
    for label, r in rows.items():
        print(
            f"{label:22s} {r.get('mean_cosine', float('nan')):9.4f} {r.get('min_cosine', float('nan')):8.4f} "
            f"{r.get('nn_agreement', float('nan')):7.3f} {r['texts_per_s_b1']:8.1f} {r['texts_per_s_b32']:8.1f} "
            f"{r['speedup_b32']:6.2f} {r['weights_mb']:7.1f} {r['size_ratio']:6.1%} {r['load_s']:7.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 sentences, fewer batches, tiny training budgets")
    parser.add_argument("--home", help="moorage home to use (default: a temporary one, removed at the end)")
    parser.add_argument("--threads", type=int, help="runtime.num_threads (default: the settings')")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP part")
    parser.add_argument("--classifier", help="also compress this classifier of --home (e.g. bbc-minilm@challenger)")
    parser.add_argument("--out", default="bench/results/compression.json")
    args = parser.parse_args()
    if args.home:
        run(args, Path(args.home))
        return
    with tempfile.TemporaryDirectory(prefix="moorage-bench-compression-") as home:
        run(args, Path(home))


def run(args, home: Path) -> None:
    started = time.perf_counter()
    env = {**os.environ, "MOORAGE_HOME": str(home), "HF_HUB_OFFLINE": "1", "MOORAGE_SECURITY__AUTH": "false"}
    if args.threads:
        env["MOORAGE_RUNTIME__NUM_THREADS"] = str(args.threads)
    if args.quick:
        env["MOORAGE_COMPRESSION__MAX_TEXTS"] = "64"
    settings = load_settings(environ=env)
    results: dict[str, Any] = {"machine": machine("float32", settings) | {"int8_isa": cpu_flags()}}
    m = results["machine"]
    print(f"cpu: {m['cpu']} ({m['cpus']} cpus), isa: {' '.join(m['isa'])}; int8: {' '.join(m['int8_isa'])}")
    dtype = settings.runtime.dtype
    print(f"torch {m['torch']}, {m['torch_threads']} threads; reference dtype float32 (runtime.dtype={dtype})")
    parent = prepare(settings)
    texts = sentences(64 if args.quick else 512)
    print(f"{len(texts)} sentences (the first of BBC articles), parent {parent.ref}")
    with tempfile.TemporaryDirectory(dir=home) as work:
        results |= side_by_side(settings, parent, texts, Path(work), args.quick)
    print_table(results["variants"])
    for note in results["notes"]:
        print(f"note: {note}")
    fp32_settings = with_dtype(settings, "float32")  # the gate's speed-up: against the parent in float32
    results["gated"] = gated(fp32_settings, texts)
    if results["gated"]["registered"] and not args.no_http:
        refs = [parent.ref, results["gated"]["registered"]]
        print(f"over HTTP ({HTTP_CONNECTIONS} connections, requests of 32 texts): {', '.join(refs)}")
        http = over_http(settings, refs, texts, QUICK_HTTP_REQUESTS if args.quick else HTTP_REQUESTS)
        inproc = results["gated"]["speed"]["texts_per_s"]
        results["http"] = {
            ref: http[ref] | {"over_inprocess_b32": round(http[ref]["texts_per_s"] / inproc[role]["batch_32"], 3)}
            for ref, role in zip(refs, ("parent", "derived"))
        }
    if args.classifier:
        results["classifier"] = classifier(fp32_settings, args.classifier)
    results["targets"] = check_targets(results)
    for name, (value, target, ok) in results["targets"].items():
        rule = "<=" if name in ("int8_size_ratio", "classifier_accuracy_loss") else ">="
        print(f"target {name:22s} {value:8.3f}  ({rule} {target}) {'ok' if ok else 'MISSED'}")
    results["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out} ({results['seconds']} s)")


def check_targets(results: dict) -> dict[str, tuple[float, float, bool]]:
    out: dict[str, tuple[float, float, bool]] = {}
    row = results["variants"].get("ORT int8 per-channel")
    if row is not None:
        out["int8_mean_cosine"] = (row["mean_cosine"], TARGETS["int8_mean_cosine"], row["mean_cosine"] >= 0.99)
        out["int8_speedup_b32"] = (row["speedup_b32"], TARGETS["int8_speedup_b32"], row["speedup_b32"] >= 1.5)
        out["int8_size_ratio"] = (row["size_ratio"], TARGETS["int8_size_ratio"], row["size_ratio"] <= 0.25)
    if "classifier" in results:
        loss = -results["classifier"]["quality"]["accuracy_delta"]
        out["classifier_accuracy_loss"] = (loss, 0.005, loss <= 0.005)
    http = results.get("http") or {}
    derived = results["gated"]["registered"]
    if derived in http:
        ratio = http[derived]["over_inprocess_b32"]
        out["http_over_inprocess"] = (ratio, TARGETS["http_over_inprocess"], ratio >= 0.75)
    return out


if __name__ == "__main__":
    main()
