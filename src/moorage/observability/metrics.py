"""Every Prometheus metric moorage exports, declared once.

Several server worker processes: each one writes its values to files in one folder, and `render`
merges them, so counters add up across workers and gauges say how they are combined (``livesum``:
live processes summed). prometheus_client learns the folder from ``PROMETHEUS_MULTIPROC_DIR`` when
it is imported, so ``moorage serve --workers N`` sets that for its workers; moorage itself is told
the same folder (``serve.metrics_dir``) through `merge_processes`.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LABELS = ("model", "version")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter("moorage_requests", "inference requests by outcome", (*LABELS, "status"))
REQUEST_LATENCY = Histogram("moorage_request_latency_seconds", "request latency", LABELS, buckets=LATENCY_BUCKETS)
QUEUE_WAIT = Histogram("moorage_queue_wait_seconds", "time from enqueue to batch", LABELS, buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("moorage_batch_size", "inputs per model call", LABELS, buckets=BATCH_BUCKETS)
IN_FLIGHT = Gauge("moorage_in_flight", "requests being served", LABELS, multiprocess_mode="livesum")
QUEUE_DEPTH = Gauge("moorage_queue_depth", "inputs waiting for a batch", LABELS, multiprocess_mode="livesum")
RUNNING_SEQS = Gauge("moorage_running_sequences", "sequences in the decode batch", LABELS, multiprocess_mode="livesum")
GENERATED_TOKENS = Counter("moorage_generated_tokens", "tokens generated", LABELS)
PROMPT_TOKENS = Counter("moorage_prompt_tokens", "prompt tokens processed", LABELS)
TIME_TO_FIRST_TOKEN = Histogram(
    "moorage_time_to_first_token_seconds", "arrival to first token", LABELS, buckets=LATENCY_BUCKETS
)
INTER_TOKEN_LATENCY = Histogram(
    "moorage_inter_token_latency_seconds", "time between two tokens of a sequence", LABELS, buckets=TOKEN_BUCKETS
)
MODEL_LOAD_SECONDS = Histogram(
    "moorage_model_load_seconds", "time to load a model version", LABELS, buckets=LATENCY_BUCKETS
)
MODEL_SWAPS = Counter("moorage_model_swaps", "served versions replaced by another", ("model",))
MODEL_LOAD_FAILURES = Counter(
    "moorage_model_load_failures", "versions that failed to load for a swap (the old one keeps serving)", LABELS
)
READY = Gauge(
    "moorage_ready",
    "1 while every served model is loaded and every engine alive (/readyz 200), 0 while loading or failed",
    multiprocess_mode="livemin",
)
STREAM_MESSAGES = Counter(
    "moorage_stream_messages",
    "stream messages by outcome: processed, retried (delivered again later), dead_lettered",
    ("source", *LABELS, "outcome"),
)
STREAM_BATCH_SIZE = Histogram(
    "moorage_stream_batch_size", "messages per received batch", ("source",), buckets=BATCH_BUCKETS
)
STREAM_WRITE_SECONDS = Histogram(
    "moorage_stream_sink_write_seconds", "time to make a batch durable in the sink", ("sink",), buckets=LATENCY_BUCKETS
)
STREAM_LATENCY = Histogram(
    "moorage_stream_latency_seconds", "publish to durable result, per message", ("source",), buckets=LATENCY_BUCKETS
)
STREAM_LAG = Gauge("moorage_stream_lag", "messages of the source not yet acknowledged by the group", ("source",),
                   multiprocess_mode="max")  # fmt: skip
STREAM_HEALTHY = Gauge(
    "moorage_stream_healthy",
    "1 while the stream worker makes progress, 0 while a broker or sink operation keeps failing",
    ("source",),
    multiprocess_mode="min",
)
SECURITY_REJECTIONS = Counter(
    "moorage_security_rejections", "requests refused before routing (auth, rate limit) by error code", ("code",)
)
CONTENT_FILTERED = Counter(
    "moorage_content_filtered", "inputs refused and outputs withheld by content filters", ("model", "direction")
)
RESPONSE_CACHE_REQUESTS = Counter(
    "moorage_response_cache_requests",
    "inputs looked up in the response cache: hit, miss, or skip (not deterministic: sampled without a seed)",
    ("model", "result"),
)
RESPONSE_CACHE_ENTRIES = Gauge(
    "moorage_response_cache_entries", "entries in the in-memory response cache", ("model",), multiprocess_mode="livesum"
)
RESPONSE_CACHE_BYTES = Gauge(
    "moorage_response_cache_bytes",
    "bytes of the in-memory response cache's entries",
    ("model",),
    multiprocess_mode="livesum",
)
RESPONSE_CACHE_ERRORS = Counter(
    "moorage_response_cache_errors", "response cache backend failures; those requests ran without it", ("backend",)
)
# queued jobs (training, evaluation, batch) as their workers run them; `model`: the model a job is about
TRAINING_JOBS = Counter("moorage_training_jobs", "queued jobs that ended, by kind and status", ("kind", "status"))
TRAINING_JOBS_RUNNING = Gauge(
    "moorage_training_jobs_running", "queued jobs running in this process", ("kind",), multiprocess_mode="livesum"
)
TRAINING_STEP = Gauge(
    "moorage_training_step", "current step of a running job", ("kind", "model"), multiprocess_mode="liveall"
)
TRAINING_TOTAL_STEPS = Gauge(
    "moorage_training_total_steps", "steps a running job takes in all", ("kind", "model"), multiprocess_mode="liveall"
)
TRAINING_LOSS = Gauge(
    "moorage_training_loss", "latest training loss of a running job", ("kind", "model"), multiprocess_mode="liveall"
)
TRAINING_METRIC = Gauge(
    "moorage_training_validation_metric",
    "latest validation metrics of a running job",
    ("kind", "model", "metric"),
    multiprocess_mode="liveall",
)
PROCESS_CPU = Gauge("moorage_process_cpu_seconds", "CPU time of the server process", multiprocess_mode="all")
PROCESS_MEMORY = Gauge("moorage_process_max_resident_memory_bytes", "peak RSS of the process", multiprocess_mode="all")
PROCESS_RSS = Gauge("moorage_process_resident_memory_bytes", "RSS of the process", multiprocess_mode="all")

_processes_dir: str | None = None  # the folder of every worker's values, when there are several


def merge_processes(directory: Path | None) -> None:
    """From now on `render` merges the values every worker process writes to `directory` (None: only
    this process's). Called once by a worker of ``serve --workers N`` before it serves."""
    global _processes_dir
    _processes_dir = str(directory) if directory is not None else None


def update_process_metrics() -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    PROCESS_CPU.set(usage.ru_utime + usage.ru_stime)
    PROCESS_MEMORY.set(usage.ru_maxrss * 1024)  # kilobytes on Linux
    PROCESS_RSS.set(_current_rss())


def _current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux
        return 0


def render() -> tuple[bytes, str]:
    """The exposition text and its content type, merged over worker processes when there are several."""
    update_process_metrics()
    if _processes_dir is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=_processes_dir)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    if _processes_dir is not None:
        multiprocess.mark_process_dead(pid, path=_processes_dir)
