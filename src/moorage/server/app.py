"""`create_app(settings)` -> the FastAPI application that serves registry models."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .. import __version__
from ..batching import InferenceService, ModelPool
from ..batching.cache import ResponseCache
from ..batching.hot import apply_hot
from ..batching.settings import serving_pool_config
from ..config import Settings
from ..configcenter.releases import ConfigCenter
from ..observability import metrics, tracing
from ..registry import Registry
from ..runtime import Runtime
from . import admin, classify, config, config_watch, health, inference, jobs, openai, promotion, responses
from .edge import EdgeMiddleware
from .errors import ERROR_RESPONSES, install_error_handlers
from .lifecycle import Drain
from .security import Guard, SecurityMiddleware, request_gray
from .training import router as training_router
from .training import start_worker, stop_worker

log = logging.getLogger("moorage.server")


def create_app(
    settings: Settings,
    models: list[str] | None = None,
    registry: Registry | None = None,
    load_before_serving: bool = False,
) -> FastAPI:
    """The app for `models` (default: ``settings.serve.models``). Models load in the background after
    start-up: ``/healthz`` answers at once, ``/readyz`` once every model is loaded, and a request that
    needs a model meanwhile waits for it (``serve.cold_start_hold_s``, ``serve.cold_start_queue``)
    or gets 503 with Retry-After. SIGTERM: see `lifecycle.Drain`. With
    `load_before_serving` start-up ends only once the models are loaded (or failed to load, which
    ``/readyz`` then says): for a worker of several behind one socket, which should take no
    connection it cannot serve."""
    tracing.configure(settings.observability)  # off: nothing of OpenTelemetry is imported
    registry = registry or Registry.from_settings(settings)
    runtime = Runtime(registry, settings.runtime)
    refs = list(models or settings.serve.models)
    pool = ModelPool(registry, runtime, refs, serving_pool_config(settings), routing=settings.routing)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        app.state.loading = loop.create_task(_load(pool, settings.serve.load_budget_s))
        watchdog = loop.create_task(_on_engine_failure(pool, settings.serve.exit_on_engine_failure))
        await guard.start()
        await app.state.config_delivery.start()  # the first release is in force before any request
        await app.state.jobs.start()
        start_worker(app)  # only with training.run_in_server
        drain.install()  # on top of the config delivery's hook: long-polls end when the listener closes
        if load_before_serving:
            await asyncio.wait([app.state.loading])  # a failure is kept for /readyz, as in the background
        try:
            yield
        finally:
            drain.uninstall()
            watchdog.cancel()
            app.state.loading.cancel()
            await app.state.jobs.stop()
            await stop_worker(app)
            await app.state.config_delivery.stop()
            center.close()
            await pool.stop()
            await app.state.service.close()
            await guard.stop()
            metrics.mark_process_dead(os.getpid())  # with several workers: drop this one's live gauges
            tracing.flush()
            log.info("stopped: every accepted request was answered")

    guard = Guard(settings, registry)
    app = FastAPI(
        title="moorage",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        responses=ERROR_RESPONSES,
    )
    app.state.pool = pool
    # SIGTERM: not ready at once, serving serve.drain_delay_s more (not when an engine died: nothing to serve)
    drain = Drain(settings.serve.drain_delay_s, can_serve=lambda: pool.dead_engine() is None)
    app.state.drain = drain
    cache = ResponseCache.from_settings(settings.cache)  # every route and job below shares it
    app.state.service = InferenceService(pool, settings.serve.default_max_tokens, cache=cache)
    app.state.settings = settings
    app.state.registry = registry
    app.state.guard = guard
    app.state.jobs = jobs.JobRunner(settings, app.state.service, registry.catalog, guard)
    center = ConfigCenter.from_settings(settings, registry=registry)
    app.state.config_center = center

    def apply_config(new: Settings, effective) -> None:  # every part checks the release before any swaps
        apply_hot(new, guard.stage, app.state.service.stage, gray=request_gray(new, effective))

    app.state.config_delivery = config_watch.ConfigDelivery(settings, center, apply_config, registry)
    install_error_handlers(app)
    app.add_middleware(SecurityMiddleware, guard=guard)  # inside the edge: bounded bodies, counted requests
    app.add_middleware(
        EdgeMiddleware,
        max_body_bytes=settings.serve.max_body_bytes,
        upload_bytes=settings.security.max_upload_bytes,
    )
    app.include_router(health.router)
    app.include_router(inference.router)
    app.include_router(classify.router)
    app.include_router(openai.router)
    app.include_router(responses.router)
    app.include_router(jobs.router)
    app.include_router(training_router)
    app.include_router(admin.router)
    app.include_router(config.router)
    app.include_router(config_watch.router)
    app.include_router(promotion.router)
    app.openapi = lambda: _openapi_with_auth(app, guard)  # type: ignore[method-assign]  # FastAPI's documented override
    return app


def _openapi_with_auth(app: FastAPI, guard: Guard) -> dict:
    """The schema, saying which operations need a bearer key (all but the open probes)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schema.setdefault("components", {})["securitySchemes"] = {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "moorage API key (moorage keys create)"}
        }
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                operation["security"] = [] if guard.is_open(path) else [{"apiKey": []}]
        app.openapi_schema = schema
    return app.openapi_schema


async def _on_engine_failure(pool: ModelPool, exit_process: bool) -> None:
    """An engine that died has already failed everything waiting on it (503) and turned /readyz 503.
    Its model state may be broken (a device error, memory exhausted), so the process is not patched
    up in place: it stops gracefully and its supervisor (Kubernetes, systemd, `serve --workers`)
    starts a fresh one, which loads the model anew."""
    await pool.failed.wait()
    if not exit_process:
        log.critical("%s; serve.exit_on_engine_failure is off: staying up, not ready", pool.engine_failure)
        return
    log.critical("%s; stopping this server process so that its supervisor restarts it", pool.engine_failure)
    os.kill(os.getpid(), signal.SIGTERM)


async def _load(pool: ModelPool, budget_s: float) -> None:
    late = asyncio.get_running_loop().call_later(
        budget_s,
        log.error,
        "the models are still loading after %g s (serve.load_budget_s): a Kubernetes startup probe restarts the "
        "pod now; raise the budget or make the models load faster (a local copy of the store, a smaller dtype)",
        budget_s,
    )
    try:
        await pool.start()
        log.info("ready: serving %s", ", ".join(f"{k} (version {v.version})" for k, v in pool.served().items()))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # kept by the pool: /readyz and every request held for the models say it
        log.error("could not load the models: %s", exc)  # an unexpected error's traceback: logged by the pool
        raise
    finally:
        late.cancel()
