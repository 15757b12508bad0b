"""Report benchmark: `moorage report` over 100,000 result rows, end to end (the command a user runs,
process start included), on at most 2 cores. Target: under 10 s.

    python bench/report.py [--rows 100000] [--tasks generate,classify,embed] [--cores 2] [--keep DIR]

The rows are written by the real file sink (`FileSink`, files rolled at 10,000 rows) from real
`Result`s through `encode_result` and the worker's timing columns, so their schema is the worker's.
Writing them is not timed. Each case prints rows, seconds, the HTML's size and whether drift was
flagged (the second half of each set is shifted, so it should be); the header names the CPU, its
ISA flags (DuckDB's vectorised kernels use them) and the cores the command may use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moorage.batching import Result, encode_result
from moorage.runtime.base import Classification
from moorage.streams.sinks import FileSink

ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "neon")
WORDS = ("the", "model", "serves", "tokens", "fast", "and", "safe", "moorage", "batch", "ready")


def machine(cores: list[int]) -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:
        pass
    import duckdb

    return {"cpu": model, "isa": [f for f in ISA_FLAGS if f in flags], "cores": cores, "duckdb": duckdb.__version__}


def result(task: str, i: int, shifted: bool, rng: np.random.Generator) -> Result:
    if task == "embed":
        return Result(rng.standard_normal(384).astype(np.float32) * (1.3 if shifted else 1.0), int(rng.integers(5, 60)))
    if task == "classify":
        p = float(rng.beta(9, 2) if shifted else rng.beta(4, 3)) * 0.5 + 0.5
        label = "positive" if rng.random() < (0.8 if shifted else 0.5) else "negative"
        other = "negative" if label == "positive" else "positive"
        return Result(Classification(label, p, {label: p, other: 1 - p}), int(rng.integers(5, 60)))
    n = int(rng.integers(1, 128))
    text = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))
    return Result(text, int(rng.integers(5, 400)), n, "length" if n == 127 or (shifted and n > 90) else "stop")


async def write_rows(folder: Path, task: str, fmt: str, rows: int) -> None:
    """`rows` rows as the worker writes them: `MessageCodec.row` (encode_result + timings)."""
    rng = np.random.default_rng(0)
    sink = FileSink(str(folder), fmt, rows=10_000, seconds=3600)
    await sink.open()
    start = time.time() - rows / 200
    batch = []
    for i in range(rows):
        shifted = i >= rows // 2
        completed = start + i / 200
        latency = float(rng.gamma(2.0, 15.0)) * (2.5 if shifted else 1.0)
        received = completed - latency / 1000
        batch.append({"id": f"m-{i}", "model": task, "version": 1, "task": task,
                      **encode_result(task, result(task, i, shifted, rng)),
                      "latency_ms": round(latency, 3), "published_at": received - float(rng.gamma(2.0, 2.0)) / 1000,
                      "received_at": received, "completed_at": completed, "attempts": 1})  # fmt: skip
        if len(batch) == 1000:
            await sink.write(batch)
            batch = []
    await sink.write(batch)
    await sink.close()


def run_report(folder: Path, out: Path, cores: list[int]) -> tuple[float, dict]:
    command = [sys.executable, "-m", "moorage", "report", str(folder), "-o", str(out)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, preexec_fn=lambda: os.sched_setaffinity(0, cores))
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"moorage report failed: {done.stderr.strip()}")
    data = subprocess.run([*command[:-2], "--format", "json"], capture_output=True, text=True, check=True,
                          preexec_fn=lambda: os.sched_setaffinity(0, cores))  # fmt: skip
    return seconds, json.loads(data.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--tasks", default="generate,classify,embed")
    parser.add_argument("--formats", default="parquet", help="parquet,jsonl")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="keep the rows and reports in this folder")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))[: args.cores]
    print(json.dumps(machine(cores)))
    root = args.keep or Path(tempfile.mkdtemp(prefix="moorage-bench-report-"))
    print(f"{'task':<10} {'format':<8} {'rows':>8} {'seconds':>8} {'html KiB':>9} {'in-process s':>12}  drift")
    for task in args.tasks.split(","):
        for fmt in args.formats.split(","):
            folder = root / f"{task}-{fmt}"
            if not folder.exists():
                asyncio.run(write_rows(folder, task, fmt, args.rows))
            out = root / f"{task}-{fmt}.html"
            seconds, data = run_report(folder, out, cores)
            flagged = ", ".join(data["drift"]["flagged"]) or "none"
            kib = out.stat().st_size / 1024
            print(f"{task:<10} {fmt:<8} {data['summary']['rows']:>8,} {seconds:>8.2f} {kib:>9.1f} "
                  f"{data['seconds']:>12.2f}  {flagged}")  # fmt: skip
    print(f"target: under 10 s each on {len(cores)} cores; rows and reports in {root}")


if __name__ == "__main__":
    main()
