"""Run stream workers: the model pool, the broker, the sink and the worker wired from settings."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

from ..batching import InferenceService, ModelPool
from ..batching.cache import ResponseCache
from ..batching.hot import apply_hot
from ..batching.settings import from_settings, stream_pool_config
from ..config import Settings
from ..configcenter.subscriber import Subscriber, new_instance
from ..errors import EngineFailed
from ..observability import tracing
from ..refs import parse_ref
from ..registry import Registry
from ..runtime import Runtime
from ..security.audit import AuditLog, AuditWriter
from ..security.policy import Policy
from .brokers import open_broker
from .health import Health, serve_health
from .sinks import open_sink
from .worker import Counts, StreamWorker, WorkerConfig

log = logging.getLogger("moorage.streams")


@dataclass(frozen=True)
class StreamJob:
    source: str
    sink: str
    model: str


def worker_config(settings: Settings) -> WorkerConfig:
    """The worker's share of the `stream.*` settings (same names), and whether audit rows keep inputs."""
    return from_settings(WorkerConfig, settings.stream, audit_inputs=settings.security.audit_inputs)


async def run_stream(
    settings: Settings,
    job: StreamJob,
    stop: asyncio.Event,
    registry: Registry | None = None,
    name: str = "part",
    health: Health | None = None,
    follow_config: bool = False,
) -> Counts:
    """One worker until `stop` is set (or SIGTERM/SIGINT when run as a program); `health` says
    whether it is making progress. With `follow_config` it applies the config center's releases
    while it runs (`config_subscriber`)."""
    registry = registry or Registry.from_settings(settings)
    tracing.configure(settings.observability)  # off: nothing of OpenTelemetry is imported
    pool = ModelPool(registry, Runtime(registry, settings.runtime), [job.model], stream_pool_config(settings))
    security = settings.security
    policy = Policy.for_model(security, parse_ref(job.model).name)  # the model's filters and limits, as over HTTP
    audit = None
    if security.audit and security.audit_streams:
        audit = AuditWriter(AuditLog(registry.catalog), security.audit_flush_ms / 1000)
    await pool.start()
    try:
        async with open_broker(job.source) as source, open_sink(job.sink, name_prefix=name) as sink:
            cache = ResponseCache.from_settings(settings.cache)  # shared with the server over Redis, if so set
            service = InferenceService(pool, settings.stream.default_max_tokens, cache=cache)
            config = worker_config(settings)
            worker = StreamWorker(source, sink, service, job.model, config, policy, audit, health=health)
            if audit is not None:
                await audit.start()
            subscriber = config_subscriber(settings, job, worker, registry) if follow_config else None
            if subscriber is not None:
                await subscriber.start()  # the first release is in force before the first message
            watchdog = asyncio.ensure_future(_stop_when_failed(pool, stop))
            try:
                counts = await worker.run(stop)
            finally:
                watchdog.cancel()
                if subscriber is not None:
                    await subscriber.stop()
                await service.close()
                if audit is not None:
                    await audit.stop()
    finally:
        await pool.stop()
    if pool.failed.is_set():  # what was received went back to the broker; a new process takes over
        raise EngineFailed(f"the model's engine stopped ({pool.engine_failure}); restart this worker")
    return counts


def config_subscriber(settings: Settings, job: StreamJob, worker: StreamWorker, registry: Registry) -> Subscriber:
    """The worker's subscriber to the config center (over HTTP when ``config.center_url`` is set, else on
    the backend), as an instance of group ``config.group`` or ``stream:<model name>``."""
    instance = new_instance(settings, f"stream:{parse_ref(job.model).name}")
    return Subscriber(settings, instance, lambda new, _effective: apply_hot(new, worker.stage), registry=registry)


async def _stop_when_failed(pool: ModelPool, stop: asyncio.Event) -> None:
    """A dead engine would hand every message back until it is dead-lettered: stop receiving instead,
    and let the process end so that its supervisor starts a fresh one."""
    await pool.failed.wait()
    log.critical("%s: stopping the stream worker so that it is restarted", pool.engine_failure)
    stop.set()


def run_forever(settings: Settings, job: StreamJob, name: str = "part") -> Counts:
    """Blocking entry point for the CLI: SIGTERM or Ctrl-C stop the worker gracefully."""

    async def main() -> Counts:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        health = Health()
        server = None
        if settings.stream.metrics_port is not None:  # /metrics and /healthz
            server = serve_health(settings.stream.metrics_port, health, settings.stream.metrics_host)
        try:
            return await run_stream(settings, job, stop, name=name, health=health, follow_config=True)
        finally:
            if server is not None:
                server.shutdown()

    return asyncio.run(main())
