"""Stream benchmark: messages per second end to end (source -> MiniLM -> Parquet) on every broker,
with 1 and 2 worker processes, beside the raw in-process throughput of the same model in the
same run.

    python bench/streams.py [--home DIR] [--messages 2000] [--out bench/results/streams.json]
    python bench/streams.py --audit-ab --brokers sqlite     # 1 worker, audit rows off vs on


Each broker is a real server on 127.0.0.1 started here (Redis, RabbitMQ from Debian's packages,
librdkafka's mock Kafka cluster, the embedded SQLite queue) and stopped at the end. A run
publishes N BBC News sentences, starts `moorage stream run` (1 or 2 workers, batch size 64) and
waits until the Parquet sink holds N rows. Throughput is measured from the rows themselves:
N / (last completed_at - first received_at), so process start-up and model loading are not counted.
Target: 1 worker >= 0.85 x raw in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from serving import sentences  # noqa: E402

from moorage.config import load_settings  # noqa: E402
from moorage.demo import assets  # noqa: E402
from moorage.demo.run import DEMO_MODELS, ensure_registered  # noqa: E402
from moorage.registry import Registry  # noqa: E402
from moorage.runtime import Runtime  # noqa: E402
from moorage.streams import open_broker  # noqa: E402

from tests.services.servers import kafka_mock, rabbitmq_server, redis_server  # noqa: E402

BATCH = 64


def raw_in_process(model, texts: list[str], n: int) -> float:
    """The handler alone on the same texts in batches of BATCH: the limit a worker can reach."""
    model.predict(texts[:BATCH])  # warm-up
    started = time.perf_counter()
    for i in range(0, n, BATCH):
        model.predict([texts[(i + j) % len(texts)] for j in range(min(BATCH, n - i))])
    return n / (time.perf_counter() - started)


async def publish(url: str, texts: list[str], n: int, run: str) -> None:
    async with open_broker(url) as b:
        bodies = [json.dumps({"id": f"{run}-{i}", "text": texts[i % len(texts)]}).encode() for i in range(n)]
        for i in range(0, n, 1000):
            await b.publish(bodies[i : i + 1000])


def parquet_rows(folder: Path):
    import pyarrow.parquet as pq

    files = sorted(folder.glob("*.parquet"))
    if not files:
        return None
    return pq.read_table(files, columns=["id", "received_at", "completed_at"])


def stream_run(url: str, workers: int, n: int, texts: list[str], env: dict, tmp: Path, run: str) -> dict:
    asyncio.run(publish(url, texts, n, run))
    out = tmp / run
    cmd = [sys.executable, "-m", "moorage", "stream", "run", "--source", url, "--model", "minilm",
           "--sink", f"parquet://{out}?seconds=1", "--batch-size", str(BATCH), "--workers", str(workers)]  # fmt: skip
    log = open(tmp / f"{run}.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    rows = 0
    try:
        while time.monotonic() < deadline:
            table = parquet_rows(out)
            rows = 0 if table is None else table.num_rows
            if rows >= n or proc.poll() is not None:
                break
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    if rows < n:
        raise RuntimeError(f"{run}: only {rows}/{n} rows; see {tmp / (run + '.log')}")
    table = parquet_rows(out)
    ids = table.column("id").to_pylist()
    span = max(table.column("completed_at").to_pylist()) - min(table.column("received_at").to_pylist())
    return {"messages": n, "unique_ids": len(set(ids)), "rows": len(ids), "seconds": round(span, 2),
            "throughput": round(n / span, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=os.environ.get("MOORAGE_HOME", str(Path.home() / ".moorage")))
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--brokers", default="sqlite,redis,amqp,kafka")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "streams.json"))
    parser.add_argument("--audit-ab", action="store_true", help="1 worker with audit rows off, then on")
    args = parser.parse_args()
    env = {**os.environ, "MOORAGE_HOME": args.home, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    settings = load_settings(environ=env)
    registry = Registry.from_settings(settings)
    for name, task, package in DEMO_MODELS:
        if name == "minilm":
            ensure_registered(registry, name, task, package, assets.minilm_folder)
    texts = sentences(2000)
    model = Runtime(registry, settings.runtime).get("minilm")
    raw = raw_in_process(model, texts, args.messages)
    print(f"raw in-process MiniLM, batch {BATCH}: {raw:.1f} sentences/s", flush=True)
    results: dict = {"raw_in_process": round(raw, 1), "batch_size": BATCH, "brokers": {}}
    tmp = Path(tempfile.mkdtemp(prefix="moorage-bench-streams-"))
    wanted = args.brokers.split(",")
    with ExitStack() as stack:
        bases = {"sqlite": f"sqlite:///{tmp}/queue.db"}
        if "redis" in wanted:
            bases["redis"] = stack.enter_context(redis_server())
        if "amqp" in wanted:
            bases["amqp"] = stack.enter_context(rabbitmq_server())
        if "kafka" in wanted:
            bases["kafka"] = stack.enter_context(kafka_mock())
        extra = {"kafka": "&create=auto", "amqp": "&prefetch=512"}
        variants = [("audit-off", 1, "false"), ("audit-on", 1, "true")] if args.audit_ab else [
            ("1", 1, "true"), ("2", 2, "true")]  # fmt: skip
        for kind in wanted:
            per = {}
            for label, workers, audit in variants:
                run = f"{kind}-{label}w"
                url = f"{bases[kind]}?topic={run}{extra.get(kind, '')}"
                run_env = env | {"MOORAGE_SECURITY__AUDIT_STREAMS": audit}
                r = stream_run(url, workers, args.messages, texts, run_env, tmp, run)
                r["ratio_to_raw"] = round(r["throughput"] / raw, 3)
                per[f"{label}_worker"] = r
                print(f"{kind:7s} {label} worker(s): {r['throughput']:7.1f} msg/s  = {r['ratio_to_raw']:.2f} x raw"
                      f"  ({r['rows']} rows, {r['unique_ids']} unique ids, {r['seconds']} s)", flush=True)  # fmt: skip
            results["brokers"][kind] = per
    if args.audit_ab:
        print("\nsummary: audit rows on / off, 1 worker")
        for kind, per in results["brokers"].items():
            on, off = per["audit-on_worker"]["throughput"], per["audit-off_worker"]["throughput"]
            print(f"  {kind:7s} {off:.1f} -> {on:.1f} msg/s = {on / off:.2f}x")
        Path(args.out).with_name("streams-audit.json").write_text(json.dumps(results, indent=2))
        return
    print("\nsummary (target: 1 worker >= 0.85 x raw in-process)")
    for kind, per in results["brokers"].items():
        one, two = per["1_worker"]["ratio_to_raw"], per["2_worker"]["ratio_to_raw"]
        print(f"  {kind:7s} 1 worker {one:.2f} x raw {'OK' if one >= 0.85 else 'BELOW'};  2 workers {two:.2f} x raw")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
