"""Spark benchmark: BBC News sentences through MiniLM by `predict_udf` on Spark local[2], beside the
in-process moorage batch throughput on the same cores and `moorage stream run` with 2 workers, in
one run.

    python bench/spark.py [--home DIR] [--n 10000] [--out bench/results/spark.json]

- in-process: `InferenceService` over the model pool (the dynamic batcher, batches of 32) in this
  process, torch on every core: what one moorage process does with the machine.
- Spark local[2]: `predict_udf("minilm", batch_size=32)` over the sentences in 8 partitions, written
  to Spark's no-op sink so that every row is computed; two Python workers with one torch thread
  each (the same cores). Cold start: the session's start, then the first prediction on fresh
  workers (fork, imports, model load); the timed job runs after it, on the warm workers. Model
  loads: the UDF's own count, with the Python workers that ran its tasks.
- stream: `moorage stream run --workers 2` from the embedded SQLite queue to Parquet (bench/streams.py);
  its throughput is measured from the rows (first receive to last completion).

Each phase prints the share of the machine's CPU that other processes took meanwhile (this
process, its JVM, Python workers and stream workers excluded): on a shared machine a ratio is only
as good as the quiet it was measured in. Target: Spark local[2] >= 0.8 x in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from cpuload import _machine  # noqa: E402
from serving import machine  # noqa: E402
from streams import stream_run  # noqa: E402

from moorage.batching import InferenceService, ModelPool  # noqa: E402
from moorage.batching.dynamic import BatchConfig  # noqa: E402
from moorage.batching.pool import PoolConfig  # noqa: E402
from moorage.config import load_settings  # noqa: E402
from moorage.demo import assets  # noqa: E402
from moorage.demo.run import DEMO_MODELS, ensure_registered  # noqa: E402
from moorage.observability.logging import quiet_libraries  # noqa: E402
from moorage.registry import Registry  # noqa: E402
from moorage.runtime import Runtime  # noqa: E402

BATCH = 32
PARTITIONS = 8
TARGET = 0.8


def bbc_sentences(n: int) -> list[str]:
    """`n` sentences of the BBC News articles, in order (the corpus holds about 37,000)."""
    out: list[str] = []
    for row in assets.bbc_news():
        for sentence in row["text"].replace("\n", " ").split(". "):
            if 20 < len(sentence.strip()) < 300:
                out.append(sentence.strip())
                if len(out) == n:
                    return out
    return [out[i % len(out)] for i in range(n)]


def _ticks(pid: int | str) -> int:
    """CPU clock ticks of a process and of its children that ended (utime, stime, cutime, cstime)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return sum(int(v) for v in fields[11:15])


def _family(pid: int | str = "self") -> list[str]:
    """This process and every live descendant."""
    out, todo = [], [str(pid)]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += (task / "children").read_text().split()
            except OSError:
                pass
    return out


class OthersLoad:
    """The share of the machine's CPU taken by processes outside this one and its descendants (the
    JVM, Python workers, stream workers, even those that ended) while the block ran."""

    share: float | None = None

    def _own(self) -> dict[str, int]:
        return {p: _ticks(p) for p in _family()}

    def __enter__(self) -> OthersLoad:
        self._start, self._own_start = _machine(), self._own()
        return self

    def __exit__(self, *exc: object) -> None:
        end, own_end = _machine(), self._own()
        if self._start is None or end is None or end[1] <= self._start[1]:
            return
        own = sum(t - self._own_start.get(p, 0) for p, t in own_end.items())
        busy, total = end[0] - self._start[0], end[1] - self._start[1]
        self.share = round(max(0.0, (busy - own) / total), 3)


def in_process(registry: Registry, settings, texts: list[str]) -> tuple[float, list]:
    """Sentences/s of InferenceService over the dynamic batcher, and the embeddings."""

    async def run() -> tuple[float, list]:
        queue = max(len(texts), 2 * BATCH)
        batch = BatchConfig(max_batch_size=BATCH, max_wait_ms=0, max_queue=queue, timeout_s=3600)
        config = PoolConfig(batch=batch, poll_interval_s=0)
        pool = ModelPool(registry, Runtime(registry, settings.runtime), ["minilm"], config)
        await pool.start()
        service = InferenceService(pool)
        try:
            await service.infer("minilm", texts[: 2 * BATCH])  # warm-up
            started = time.perf_counter()
            outcome = await service.infer("minilm", texts)  # every sentence queued at once: the best case
            return len(texts) / (time.perf_counter() - started), [r.output for r in outcome.results]
        finally:
            await pool.stop()

    return asyncio.run(run())


def on_spark(settings, texts: list[str]) -> dict:
    from pyspark.sql import functions as F

    from moorage.engines.spark import local_session, predict_udf

    started = time.perf_counter()
    spark = local_session("local[2]", app_name="moorage-bench")
    session_s = time.perf_counter() - started
    try:
        udf = predict_udf("minilm", batch_size=BATCH, settings=settings, spark=spark)
        first = spark.sparkContext.parallelize(list(enumerate(texts[:2])), 2).toDF("id int, text string")
        first.select(udf("text").alias("p")).collect()  # both workers: fork, imports, model load, one batch
        cold_s = time.perf_counter() - started
        df = spark.createDataFrame(list(enumerate(texts)), "id int, text string").repartition(PARTITIONS).cache()
        df.count()  # the input in Spark's memory: the timed job reads no Python list
        out = df.select("id", udf("text").alias("p"))
        job = time.perf_counter()
        out.write.format("noop").mode("overwrite").save()
        seconds = time.perf_counter() - job
        sample = {r.id: r.p.embedding for r in out.where(F.col("id") < 256).collect()}
        errors = out.where("p.error IS NOT NULL").count()
        return {"throughput": len(texts) / seconds, "seconds": seconds, "session_start_s": session_s,
                "cold_start_s": cold_s, "model_loads": udf.loads, "python_workers": len(udf.workers),
                "errors": errors, "sample": sample}  # fmt: skip
    finally:
        spark.stop()


def _dtype(settings) -> str:
    """The dtype MiniLM runs in here ("auto" resolved as the runtime resolves it)."""
    import torch

    from moorage.runtime.hf import resolve_dtype

    return str(resolve_dtype(torch, settings.runtime)).removeprefix("torch.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=os.environ.get("MOORAGE_HOME", str(Path.home() / ".moorage")))
    parser.add_argument("--n", type=int, default=10_000, help="sentences")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "spark.json"))
    args = parser.parse_args()
    env = {**os.environ, "MOORAGE_HOME": args.home, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    os.environ.update({k: env[k] for k in ("MOORAGE_HOME", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")})  # workers
    quiet_libraries()
    settings = load_settings(environ=env)
    registry = Registry.from_settings(settings)
    for name, task, package in DEMO_MODELS:
        if name == "minilm":
            ensure_registered(registry, name, task, package, assets.minilm_folder)
    texts = bbc_sentences(args.n)
    header = machine(_dtype(settings), settings)
    print(f"{header}  (in-process: {header['torch_threads']} torch threads; Spark: 2 workers x 1 thread)")
    print(f"{len(texts)} BBC News sentences, MiniLM (minilm@production), batch size {BATCH}", flush=True)

    with OthersLoad() as load:
        base, vectors = in_process(registry, settings, texts)
    results: dict = {"machine": header, "n": len(texts), "batch_size": BATCH,
                     "in_process": {"throughput": round(base, 1), "other_cpu_share": load.share}}  # fmt: skip
    print(f"in-process moorage batch:      {base:7.1f} sentences/s  [other load {100 * (load.share or 0):.0f} %]",
          flush=True)  # fmt: skip

    with OthersLoad() as load:
        spark = on_spark(settings, texts)
    sample = spark.pop("sample")
    diff = max(float(np.abs(np.asarray(vectors[i]) - np.asarray(sample[i])).max()) for i in sample)
    spark |= {"ratio_to_in_process": round(spark["throughput"] / base, 3), "max_abs_diff": diff,
              "other_cpu_share": load.share}  # fmt: skip
    results["spark_local2"] = {k: round(v, 3) if k.endswith("_s") or k == "seconds" else v for k, v in spark.items()}
    print(f"Spark local[2] predict_udf:    {spark['throughput']:7.1f} sentences/s = {spark['ratio_to_in_process']:.2f}"
          f" x in-process  [other load {100 * (load.share or 0):.0f} %]")  # fmt: skip
    print(f"  cold start: session {spark['session_start_s']:.1f} s, first prediction at {spark['cold_start_s']:.1f} s;"
          f" model loads {spark['model_loads']} on {spark['python_workers']} Python workers; {spark['errors']} errors;"
          f" max |embedding - in-process| {diff:.2e}", flush=True)  # fmt: skip

    with OthersLoad() as load, tempfile.TemporaryDirectory(prefix="moorage-bench-spark-") as tmp:
        stream = stream_run(f"sqlite:///{tmp}/queue.db?topic=bench", 2, len(texts), texts, env, Path(tmp), "sqlite-2w")
    stream |= {"ratio_to_in_process": round(stream["throughput"] / base, 3), "other_cpu_share": load.share}
    results["stream_2_workers"] = stream
    print(
        f"moorage stream run, 2 workers: {stream['throughput']:7.1f} sentences/s = "
        f"{stream['ratio_to_in_process']:.2f} x in-process  [other load {100 * (load.share or 0):.0f} %]"
    )
    ratio = spark["ratio_to_in_process"]
    print(f"\nSpark local[2] / in-process = {ratio:.2f} ({'OK' if ratio >= TARGET else 'BELOW'} target {TARGET});"
          f" Spark / stream run 2 workers = {spark['throughput'] / stream['throughput']:.2f}")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
