"""The model versions a process serves, and hot swaps when an alias moves.

Each served reference (``minilm@production``, ``smollm2``, ``clf:3``) maps to one `ServedVersion`:
a loaded model and its engine (dynamic batcher or generation engine). A watcher re-resolves the
references every few seconds (one small catalog read each) and `reload()` does it on demand. When a
reference now points to another version, that version is loaded and started in the background,
then the reference switches to it in one assignment; the old version keeps answering what it
already accepted, and is stopped and unloaded once its last request has finished.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import RouteSettings
from ..errors import (
    BadRequest,
    EngineFailed,
    ModelLoadFailed,
    ModelLoading,
    ModelNotFound,
    MoorageError,
    NotReady,
    Unprocessable,
)
from ..observability import metrics
from ..refs import ModelRef, parse_ref
from ..registry import Registry, VersionInfo
from ..runtime import LoadedModel, Runtime
from ..runtime.base import StepGenerator
from .contract import Task
from .dynamic import BatchConfig, DynamicBatcher
from .generation import GenerationConfig, GenerationEngine
from .routing import ROUTE_KEYS, Router

log = logging.getLogger(__name__)

# What a request refused during a cold start is told to wait before it asks again: about one
# readiness-probe period (Kubernetes' default is 10 s, the chart's 5 s), by which time this replica
# has often loaded, or the load balancer has another ready one to send it to.
LOADING_RETRY_AFTER_S = 5.0


@dataclass(frozen=True)
class PoolConfig:
    batch: BatchConfig = field(default_factory=BatchConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    poll_interval_s: float = 2.0  # 0: follow aliases only on reload()
    # a version that fails to load is retried by the watcher after 2 s, 4 s, 8 s, ... at most every 5 min
    retry_initial_s: float = 2.0
    retry_max_s: float = 300.0
    # while the models load (a cold start), a request waits up to `cold_start_hold_s` for them, at most
    # `cold_start_queue` at once; beyond either, 503 model_loading with Retry-After (0: at once)
    cold_start_hold_s: float = 0.0
    cold_start_queue: int = 0

    def retry_delay(self, attempts: int) -> float:
        """Seconds before the watcher tries a failing version again, after `attempts` failures."""
        return min(self.retry_max_s, self.retry_initial_s * 2.0 ** min(attempts - 1, 32))


@dataclass(frozen=True)
class LoadFailure:
    """A served reference whose new target did not load: the watcher backs off before trying again."""

    version: int
    attempts: int
    delay_s: float
    next_attempt_at: float  # on the pool's clock (time.monotonic)
    error: str


class ServedVersion:
    def __init__(self, loaded: LoadedModel, engine: DynamicBatcher | GenerationEngine) -> None:
        self.loaded = loaded
        self.engine = engine
        self.active = 0
        self.drained = asyncio.Event()
        self.drained.set()

    @property
    def info(self) -> VersionInfo:
        return self.loaded.info

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def version(self) -> int:
        return self.info.version

    @property
    def task(self) -> Task:
        return Task(self.info.task)

    @property
    def labels(self) -> tuple[str, str]:
        return self.info.name, str(self.info.version)


class ModelPool:
    def __init__(
        self,
        registry: Registry,
        runtime: Runtime,
        refs: list[str],
        config: PoolConfig,
        routing: Mapping[str, RouteSettings] | None = None,
    ) -> None:
        if not refs:
            raise BadRequest("no model to serve: pass --model NAME[@ALIAS|:VERSION] (or set serve.models)")
        self.registry = registry
        self.runtime = runtime
        self.config = config
        self.refs: dict[str, ModelRef] = {}
        for ref in refs:
            parsed = parse_ref(ref)
            self.refs[str(parsed)] = parsed
        self._served: dict[str, ServedVersion] = {}
        self._routes = self._routers(routing or {})  # traffic splits by bare model name (routing.*)
        self._gray_routes: dict[int, dict[str, Router]] = {}  # those of each request-share gray release
        self._swap_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task] = set()
        self._watcher: asyncio.Task | None = None
        self._loaded = False
        self._failures: dict[str, LoadFailure] = {}
        self.clock = time.monotonic  # replaceable in tests
        self.load_error: str | None = None  # why the models did not load, for the log
        self.load_failure: MoorageError | None = None  # the same, as a client may be told it
        self._stopped = False
        self._settled = asyncio.Event()  # set once start() ended (loaded or failed) or stop() began
        self._num_held = 0  # requests waiting for the models to load
        self.engine_failure: str | None = None  # set once any engine died: not ready until restarted
        self.failed = asyncio.Event()
        self.ready = asyncio.Event()  # set once every model is loaded

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Load and start every served reference. A failure is kept (`load_failure`) and answered to every
        request held for the models and every later one, with its code, as 503 (not ready)."""
        for key, ref in self.refs.items():
            info = None
            try:
                info = await asyncio.to_thread(self.registry.resolve, ref)
                self._served[key] = await self._start_version(info)
            except Exception as exc:
                self.load_error = str(exc)
                self.load_failure = _start_failed(info, exc) if info is not None else _resolve_failed(key, exc)
                self._settled.set()
                raise
        self._loaded = True
        self.ready.set()
        self._settled.set()
        metrics.READY.set(1)
        if self.config.poll_interval_s > 0:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="moorage-alias-watch")

    async def stop(self) -> None:
        """Finish what every engine has accepted, then stop them."""
        self._loaded = False
        self._stopped = True
        self._settled.set()  # a request still held for the models is answered now
        metrics.READY.set(0)
        if self._watcher is not None:
            self._watcher.cancel()
        async with self._swap_lock:
            served, self._served = list(self._served.values()), {}
        for sv in served:
            await self._retire(sv)
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    @property
    def is_ready(self) -> bool:
        return self._loaded and self.dead_engine() is None

    def dead_engine(self) -> str | None:
        """Why the pool is not serving: an engine that died (read from the engines themselves, so that
        it holds from the moment an engine thread fails, before the event loop hears of it)."""
        if self.engine_failure is not None:
            return self.engine_failure
        for sv in self._served.values():
            if not sv.engine.is_alive:
                return f"{sv.info.ref}: {type(sv.engine.failure).__name__}"
        return None

    def _engine_failed(self, sv: ServedVersion, exc: BaseException) -> None:
        self.engine_failure = f"{sv.info.ref}: {type(exc).__name__}"
        metrics.READY.set(0)
        self.failed.set()

    # -- cold start --------------------------------------------------------------------------
    @property
    def num_held(self) -> int:
        """Requests waiting for the models to load."""
        return self._num_held

    async def wait_loaded(self) -> None:
        """Return once the models are loaded: at once when they are; during a cold start, hold the
        request up to `cold_start_hold_s` (at most `cold_start_queue` held at once), then raise 503
        model_loading with Retry-After. A failed load raises its 503 at once, held requests included."""
        if self._loaded:
            return
        if self._settled.is_set():
            raise self._not_loaded()
        hold_s, room = self.config.cold_start_hold_s, self.config.cold_start_queue
        if hold_s <= 0 or self._num_held >= room:
            why = "" if hold_s <= 0 else f" ({room} requests already wait for them, serve.cold_start_queue)"
            raise ModelLoading(f"the models are still loading{why}; retry shortly", retry_after=LOADING_RETRY_AFTER_S)
        self._num_held += 1
        try:
            async with asyncio.timeout(hold_s):
                await self._settled.wait()
        except TimeoutError:
            raise ModelLoading(
                f"the models are still loading after {hold_s:g} s (serve.cold_start_hold_s); retry shortly",
                retry_after=LOADING_RETRY_AFTER_S,
            ) from None
        finally:
            self._num_held -= 1
        if not self._loaded:
            raise self._not_loaded()

    def _not_loaded(self) -> NotReady:
        """Why a request finds no model loaded: stopping, failed to load (503 with the failure's code), or
        still loading."""
        if self._stopped:
            return NotReady("the server is shutting down", code="shutting_down")
        if self.load_failure is not None:
            return NotReady(f"not serving: {self.load_failure.client_message}", code=self.load_failure.code)
        return ModelLoading("the models are still loading; retry shortly", retry_after=LOADING_RETRY_AFTER_S)

    # -- lookups -----------------------------------------------------------------------------
    def lookup(self, model: str) -> ServedVersion:
        """A served version by the reference it is served as, or by its bare name when that is unique."""
        dead = self.dead_engine()
        if dead is not None:
            raise EngineFailed(f"not serving: an engine stopped ({dead}); this process is restarting")
        if not self.is_ready:
            raise self._not_loaded()
        served = self._served.get(self._routed(model))
        if served is None:
            parse_ref(model)  # a malformed reference is a 400, not an unknown model
            matches = [sv for key, sv in self._served.items() if self.refs[key].name == model]
            if len(matches) > 1:
                keys = ", ".join(k for k in self._served if self.refs[k].name == model)
                raise BadRequest(f"model {model!r} is served as {keys}: name one of them", code="ambiguous_model")
            if not matches:
                raise ModelNotFound(f"model {model!r} is not served here; served: {', '.join(self._served) or 'none'}")
            served = matches[0]
        return served

    def _routed(self, model: str) -> str:
        """`model`, or the arm of its split this request goes to (its gray lane's split, if it has one)."""
        keys = ROUTE_KEYS.get()
        routes = self._routes if keys is None or keys.lane is None else self._gray_routes.get(keys.lane, self._routes)
        router = routes.get(model)
        return router.pick(keys) if router is not None else model

    def served(self) -> dict[str, ServedVersion]:
        return dict(self._served)

    @property
    def routes(self) -> dict[str, Router]:
        return dict(self._routes)

    # -- hot settings ------------------------------------------------------------------------
    def stage(
        self,
        config: PoolConfig,
        routing: Mapping[str, RouteSettings],
        gray: Mapping[int, Mapping[str, RouteSettings]] | None = None,
    ) -> Callable[[], None]:
        """Check `config` and `routing` against what this pool serves and build what they need; return
        the swap that puts them in force (the config center's apply: nothing changes if this raises).

        Every engine takes the new limits for what it accepts from then on; a batch or a sequence
        already running finishes as it started. The alias poll interval is kept (it is read at start).
        A split of a model served here must name targets served here (serve.models): a release whose
        target is not loaded is refused with the reason, rather than loading models on the side.
        `gray`: the splits of each request-share gray release, by its number (`RouteKeys.lane`)."""
        config = replace(config, poll_interval_s=self.config.poll_interval_s)
        routes = self._routers(routing)
        gray_routes = {number: self._routers(lane) for number, lane in (gray or {}).items()}

        def swap() -> None:
            self.config = config
            self._routes, self._gray_routes = routes, gray_routes
            for sv in self._served.values():
                _reconfigure(sv.engine, config)

        return swap

    def reconfigure(
        self,
        config: PoolConfig,
        routing: Mapping[str, RouteSettings],
        gray: Mapping[int, Mapping[str, RouteSettings]] | None = None,
    ) -> None:
        self.stage(config, routing, gray)()

    def _routers(self, routing: Mapping[str, RouteSettings]) -> dict[str, Router]:
        served_names = {ref.name for ref in self.refs.values()}
        routes = {}
        for name, route in routing.items():
            if name not in served_names:
                continue  # a split of a model another process serves
            router = Router.from_settings(name, route)
            keys = tuple(str(parse_ref(ref)) for ref in router.refs)
            missing = [key for key in keys if key not in self.refs]
            if missing:
                raise Unprocessable(
                    f"routing.{name}: {', '.join(missing)} not served by this process (served: "
                    f"{', '.join(self.refs)}); add it to serve.models and restart before splitting traffic to it",
                    code="split_target_not_served",
                )
            self._check_tasks(name, keys)
            routes[name] = replace(router, refs=keys)
        return routes

    def _check_tasks(self, name: str, keys: tuple[str, ...]) -> None:
        tasks = {str(self._served[key].task) for key in keys if key in self._served}
        if len(tasks) > 1:
            raise Unprocessable(
                f"routing.{name}: the split's targets do different tasks ({', '.join(sorted(tasks))})",
                code="split_tasks_differ",
            )

    @asynccontextmanager
    async def use(self, model: str, task: Task | None = None):
        """Hold a served version for one request: a swap lets it finish on the version it started on.
        During a cold start the request first waits for the models (`wait_loaded`)."""
        sv = await self.acquire_loaded(model, task)
        try:
            yield sv
        finally:
            self.release(sv)

    async def acquire_loaded(self, model: str, task: Task | None = None) -> ServedVersion:
        """`acquire`, once the models are loaded (a cold start holds the request: `wait_loaded`)."""
        await self.wait_loaded()
        return self.acquire(model, task)

    def acquire(self, model: str, task: Task | None = None) -> ServedVersion:
        sv = self.lookup(model)
        if task is not None and sv.task != task:
            raise BadRequest(
                f"model {model!r} is {_a(sv.task)} model, this endpoint needs {_a(task)} model", code="wrong_task"
            )
        sv.active += 1
        sv.drained.clear()
        metrics.IN_FLIGHT.labels(*sv.labels).inc()
        return sv

    def release(self, sv: ServedVersion) -> None:
        sv.active -= 1
        metrics.IN_FLIGHT.labels(*sv.labels).dec()
        if sv.active == 0:
            sv.drained.set()

    # -- hot swap ----------------------------------------------------------------------------
    def load_failures(self) -> dict[str, LoadFailure]:
        """The served references whose new target failed to load, still serving their old version."""
        return dict(self._failures)

    async def reload(self, *, force: bool = True) -> list[dict[str, Any]]:
        """Re-resolve every served reference; swap the ones that moved. Returns what changed.

        A reference whose new version fails to load keeps serving its current one and does not stop
        the others from swapping; the first failure is raised once every reference has been tried
        (`ModelLoadFailed`, 422). Without `force` (the watcher), a version that failed is tried again
        only once its back-off delay has passed."""
        changes: list[dict[str, Any]] = []
        errors: list[tuple[str, Exception]] = []
        async with self._swap_lock:
            for key, ref in self.refs.items():
                try:
                    change = await self._follow(key, ref, force)
                except Exception as exc:
                    errors.append((key, exc))
                    continue
                if change is not None:
                    changes.append(change)
        if errors:
            raise _reload_error(errors, changes)
        return changes

    async def _follow(self, key: str, ref: ModelRef, force: bool) -> dict[str, Any] | None:
        info = await asyncio.to_thread(self.registry.resolve, ref)
        old = self._served.get(key)
        if old is None or old.version == info.version:
            self._failures.pop(key, None)  # e.g. the alias was moved back
            return None
        failure = self._failures.get(key)
        if failure is not None and failure.version != info.version:
            failure = None  # a new target: a fresh start
        if failure is not None and not force and self.clock() < failure.next_attempt_at:
            return None
        try:
            new = await self._start_version(info)
        except Exception as exc:
            error = _start_failed(info, exc)
            metrics.MODEL_LOAD_FAILURES.labels(info.name, str(info.version)).inc()
            self._failures[key] = failure = self._failed(info, failure, error)
            log.warning(
                "%s: cannot load version %d (attempt %d), still serving version %d; next try in %.0fs: %s",
                key, info.version, failure.attempts, old.version, failure.delay_s, failure.error,
            )  # fmt: skip
            raise error from exc
        self._failures.pop(key, None)
        self._served[key] = new  # the switch: new requests now get the new version
        metrics.MODEL_SWAPS.labels(info.name).inc()
        log.info("%s: version %d -> %d", key, old.version, new.version)
        task = asyncio.get_running_loop().create_task(self._retire(old))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return {"model": key, "from_version": old.version, "to_version": new.version}

    def _failed(self, info: VersionInfo, previous: LoadFailure | None, error: MoorageError) -> LoadFailure:
        attempts = previous.attempts + 1 if previous is not None else 1
        delay = self.config.retry_delay(attempts)
        return LoadFailure(info.version, attempts, delay, self.clock() + delay, error.message)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.reload(force=False)
            except Exception as exc:  # the catalog may be briefly unreachable: keep serving what we have
                log.warning("reload failed, serving the current versions: %s", exc)

    async def _start_version(self, info: VersionInfo) -> ServedVersion:
        loaded = await asyncio.to_thread(self.runtime.load, info)
        metrics.MODEL_LOAD_SECONDS.labels(info.name, str(info.version)).observe(loaded.load_seconds)
        labels = (info.name, str(info.version))
        handler = loaded.handler
        try:
            if Task(info.task) == Task.GENERATE:
                if not isinstance(handler, StepGenerator):
                    raise BadRequest(f"{info.ref}: its handler cannot generate step by step", code="unsupported_model")
                engine: DynamicBatcher | GenerationEngine = GenerationEngine(handler, self.config.generation, labels)
            else:
                engine = DynamicBatcher(handler, self.config.batch, labels)
            engine.start()
        except BaseException:
            if not any(sv.name == info.name and sv.version == info.version for sv in self._served.values()):
                self.runtime.unload(info.name, info.version)  # nothing serves it: do not keep it in memory
            raise
        sv = ServedVersion(loaded, engine)
        engine.add_failure_listener(lambda exc: self._engine_failed(sv, exc))
        return sv

    async def _retire(self, sv: ServedVersion) -> None:
        await sv.drained.wait()
        await sv.engine.stop()
        if not any(other.info.name == sv.name and other.version == sv.version for other in self._served.values()):
            self.runtime.unload(sv.name, sv.version)
            log.info("unloaded %s", sv.info.ref)


def _reconfigure(engine: DynamicBatcher | GenerationEngine, config: PoolConfig) -> None:
    if isinstance(engine, GenerationEngine):
        engine.reconfigure(config.generation)
    else:
        engine.reconfigure(config.batch)


def _start_failed(info: VersionInfo, exc: Exception) -> MoorageError:
    """A version that did not start, as the error a reload answers with: its own 4xx or 503 (a store
    outage), else 422 model_load_failed (an encrypted file that does not open, an engine that did not
    start) rather than a 500 that says nothing."""
    if isinstance(exc, MoorageError) and exc.status != 500:
        return exc
    if isinstance(exc, MoorageError):
        return ModelLoadFailed(exc.message)
    log.error("could not start %s", info.ref, exc_info=exc)
    return ModelLoadFailed(f"cannot start {info.ref} ({type(exc).__name__}; the server log has the details)")


def _resolve_failed(key: str, exc: Exception) -> MoorageError:
    """A served reference that did not resolve at start (an unknown alias, the catalog down)."""
    if isinstance(exc, MoorageError):
        return exc
    log.error("could not resolve %s", key, exc_info=exc)
    return ModelLoadFailed(f"cannot resolve {key} ({type(exc).__name__}; the server log has the details)")


def _reload_error(errors: list[tuple[str, Exception]], changes: list[dict[str, Any]]) -> Exception:
    """One error for a reload in which some references failed: the first known error (its own status
    and code, e.g. 422 model_load_failed), its message naming the other failures and the swaps done."""
    known = [exc for _, exc in errors if isinstance(exc, MoorageError)]
    if not known:
        return errors[0][1]  # unexpected (e.g. the catalog is unreachable): the caller's 500 path logs it
    notes = [f"{key}: {exc.message}" for key, exc in errors if isinstance(exc, MoorageError) and exc is not known[0]]
    notes += [f"{c['model']} swapped {c['from_version']} -> {c['to_version']}" for c in changes]
    if not notes:
        return known[0]
    error = copy.copy(known[0])
    error.message = f"{error.message} (also: {'; '.join(notes)})"
    return error


def _a(task: str) -> str:
    """The task with its article: "an embed", "a classify"."""
    return f"an {task}" if task[:1] in "aeiou" else f"a {task}"
