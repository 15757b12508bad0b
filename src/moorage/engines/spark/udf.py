"""`predict_udf`: a registry model as a Spark column function, on moorage's one inference path.

The driver resolves the reference once to a pinned version (``NAME:VERSION``), so an alias moved
while the job runs changes nothing in it. Each Python worker loads that version once from the
registry (checksums, decryption and the local cache, as everywhere) and keeps it with its engine
in a module-level registry keyed by catalog and version for as long as the worker lives: every
task, batch and re-created UDF of the job on that worker reuses it (Spark reuses its Python
workers unless ``spark.python.worker.reuse`` is off). Rows go through `InferenceService` (the same
input rules, security policy, dynamic batcher and result encoder as the server) and come back as
one struct per row: the typed fields of `encode_result`, and `error`, set (with the other fields
null) where that row was refused. A bad row never fails its task.

What the workers are told travels in the UDF's closure: the pinned version, the catalog URL with
credentials masked (it names the catalog, it does not open it) and the driver's settings without
any secret; each worker takes secrets (a catalog password, the master key) from its own
environment and config file, as any moorage process does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd  # type: ignore[import-untyped]
from pyspark.accumulators import AccumulatorParam
from pyspark.sql import Column, SparkSession
from pyspark.sql.functions import pandas_udf
from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    DoubleType,
    FloatType,
    IntegerType,
    MapType,
    StringType,
    StructField,
    StructType,
)

from ...batching import InferenceService, ModelPool, Result, Task, encode_result
from ...batching.cache import ResponseCache
from ...batching.contract import parse_parameters
from ...batching.dynamic import BatchConfig
from ...batching.settings import stream_pool_config
from ...config import Settings, load_settings, redact, redact_url
from ...errors import BadRequest, DeadlineExceeded, EngineFailed, MoorageError
from ...observability.logging import quiet_libraries
from ...registry import Registry
from ...runtime import Runtime
from ...security.policy import Policy

log = logging.getLogger("moorage.engines.spark")

# Rows of a pandas batch queued in the engine at once: enough that tokenising the next model batch
# overlaps computing this one and that the batcher can group rows of similar length; few enough that
# a generation's queue wait stays short of its deadline.
CHUNK_BATCHES = 16

_ERROR = StructField("error", StringType())
SCHEMAS: dict[Task, StructType] = {
    Task.EMBED: StructType(
        [StructField("embedding", ArrayType(FloatType())), StructField("tokens", IntegerType()), _ERROR]
    ),
    Task.CLASSIFY: StructType(
        [
            StructField("label", StringType()),
            StructField("score", DoubleType()),
            StructField("scores", MapType(StringType(), DoubleType())),
            StructField("tokens", IntegerType()),
            _ERROR,
        ]
    ),
    Task.GENERATE: StructType(
        [
            StructField("text", StringType()),
            StructField("finish_reason", StringType()),
            StructField("prompt_tokens", IntegerType()),
            StructField("completion_tokens", IntegerType()),
            StructField("tokens", IntegerType()),
            StructField("filtered", BooleanType()),
            _ERROR,
        ]
    ),
}


@dataclass(frozen=True)
class PinnedVersion:
    """What a Python worker needs to load and run the version the driver resolved: no secret."""

    name: str
    version: int
    task: Task
    catalog: str  # the catalog URL with credentials masked: the workers' cache key, and a check
    config_file: str | None
    overrides: dict[str, Any] = field(hash=False)  # the driver's settings, secrets left out
    batch_size: int = 32
    parameters: dict[str, Any] | None = field(default=None, hash=False)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


class _Pids(AccumulatorParam):
    """Python worker pids, in the order they were added (a pid twice: added twice)."""

    def zero(self, value: list[int]) -> list[int]:
        return []

    def addInPlace(self, value1: list[int], value2: list[int]) -> list[int]:  # noqa: N802 (Spark's name)
        return value1 + value2


@dataclass
class PredictUDF:
    """``udf(column)`` is the struct column of the pinned version's results for `column`'s texts.

    Two Spark accumulators, read on the driver after an action, say where the jobs that ran it
    ran: `load_pids`, the Python worker of each model load (one per worker that had not loaded
    this version yet), and `workers`, every Python worker that ran one of its tasks. Spark merges
    them from the tasks that ended normally (a ``limit`` that stops reading early may leave some
    out)."""

    pinned: PinnedVersion
    schema: StructType
    function: Any
    loaded: Any
    ran: Any

    def __call__(self, column: str | Column) -> Column:
        return self.function(column)

    @property
    def load_pids(self) -> list[int]:
        return list(self.loaded.value)

    @property
    def loads(self) -> int:
        return len(self.loaded.value)

    @property
    def workers(self) -> set[int]:
        return set(self.ran.value)


def predict_udf(
    ref: str,
    task: str | None = None,
    batch_size: int = 32,
    *,
    parameters: dict[str, Any] | None = None,
    settings: Settings | None = None,
    config_file: str | None = None,
    num_threads: int | None = None,
    spark: SparkSession | None = None,
) -> PredictUDF:
    """Resolve `ref` now (one line of error for an unknown reference, a wrong `task` or bad generation
    `parameters`) and build the UDF of its version. `num_threads`: torch threads per Python worker;
    by default ``spark.task.cpus`` (1), since Spark runs one task per that many cores, each in its
    own worker: on ``local[N]`` N workers share N cores, and more threads would only contend."""
    if batch_size < 1:
        raise BadRequest("batch_size must be at least 1", code="invalid_batch_size")
    spark = spark or SparkSession.getActiveSession()
    if spark is None:
        raise BadRequest("no active Spark session: start one first (moorage.engines.spark.local_session())")
    settings = settings or load_settings(config_file)
    registry = Registry.from_settings(settings)
    try:
        info = registry.resolve(ref)
    finally:
        registry.close()
    if task is not None and task != info.task:
        raise BadRequest(f"{info.ref} has task {info.task}, not {task}", code="wrong_task")
    resolved = Task(info.task)
    parse_parameters(resolved, parameters)  # refused here, not once per row on the workers
    threads = num_threads or int(spark.conf.get("spark.task.cpus", "1") or 1)
    public = public_settings(settings)
    pinned = PinnedVersion(
        name=info.name,
        version=info.version,
        task=resolved,
        catalog=redact_url(settings.catalog_url),
        config_file=str(config_file) if config_file else None,
        overrides=public | {"runtime": public["runtime"] | {"num_threads": threads}},
        batch_size=batch_size,
        parameters=parameters,
    )
    loaded = spark.sparkContext.accumulator([], _Pids())
    ran = spark.sparkContext.accumulator([], _Pids())
    schema = SCHEMAS[resolved]

    def predict(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        engine = worker_engine(pinned, loaded)
        ran.add([os.getpid()])
        for texts in batches:
            yield engine.frame(texts)

    log.info("spark UDF of %s (%s) resolved from %s", pinned.ref, resolved, ref)
    function = pandas_udf(predict, returnType=schema)  # type: ignore[call-overload]
    return PredictUDF(pinned, schema, function, loaded, ran)


def public_settings(settings: Settings) -> dict[str, Any]:
    """The settings as JSON-able data with every value that `redact` masks left out (not masked: a
    worker must read the real value from its own environment, not a mask)."""
    return _unmasked(settings.model_dump(mode="json"), redact(settings.model_dump()))


def _unmasked(data: Any, masked: Any) -> Any:
    if isinstance(data, dict) and isinstance(masked, dict):
        out = {}
        for key, value in data.items():
            kept = _unmasked(value, masked.get(key))
            if kept is not _SECRET:
                out[key] = kept
        return out
    return data if data == masked and not (isinstance(data, str) and data.startswith("**")) else _SECRET


_SECRET = object()


# -- the Python worker's side -------------------------------------------------------------------


class _Loop:
    """One event loop per Python worker, in a daemon thread: the engines' batchers run on it while
    Spark's thread hands it batches."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def run(cls, coro: Any) -> Any:
        with cls._lock:
            if cls._loop is None:
                cls._loop = asyncio.new_event_loop()
                threading.Thread(target=cls._loop.run_forever, name="moorage-spark-loop", daemon=True).start()
            loop = cls._loop
        future: Future = asyncio.run_coroutine_threadsafe(coro, loop)
        return future.result()


@dataclass
class _Catalog:
    """A catalog as one Python worker sees it: its settings, registry and runtime (the model cache)."""

    settings: Settings
    registry: Registry
    runtime: Runtime


_CATALOGS: dict[str, _Catalog] = {}
_ENGINES: dict[tuple[str, str, int, int], WorkerEngine] = {}
_REGISTRY_LOCK = threading.Lock()


def worker_engine(pinned: PinnedVersion, loads: Any = None) -> WorkerEngine:
    """The engine of `pinned` in this Python worker: loaded on first use, then kept."""
    key = (pinned.catalog, pinned.name, pinned.version, pinned.batch_size)
    with _REGISTRY_LOCK:
        engine = _ENGINES.get(key)
        if engine is None or not engine.is_alive:
            catalog = _catalog(pinned)
            model_key = (pinned.name, pinned.version)
            fresh = model_key not in catalog.runtime.cache.keys()
            engine = _ENGINES[key] = WorkerEngine.start(pinned, catalog)
            if fresh:
                log.info("python worker %d loaded %s", os.getpid(), pinned.ref)
                if loads is not None:
                    loads.add([os.getpid()])
    return engine


def _catalog(pinned: PinnedVersion) -> _Catalog:
    catalog = _CATALOGS.get(pinned.catalog)
    if catalog is None:
        quiet_libraries()  # no progress bars or advisories from the model libraries in the executors' logs
        settings = load_settings(pinned.config_file, overrides=pinned.overrides)
        if redact_url(settings.catalog_url) != pinned.catalog:
            raise MoorageError(
                f"this Spark worker's catalog is {redact_url(settings.catalog_url)}, the driver's {pinned.catalog}: "
                "give the workers the driver's moorage settings (MOORAGE_* variables or the config file)",
                code="catalog_mismatch",
            )
        registry = Registry.from_settings(settings)
        catalog = _CATALOGS[pinned.catalog] = _Catalog(settings, registry, Runtime(registry, settings.runtime))
    return catalog


class WorkerEngine:
    """A pinned version served inside one Python worker: its pool, service and the model's policy."""

    def __init__(self, pinned: PinnedVersion, catalog: _Catalog, pool: ModelPool) -> None:
        self.pinned = pinned
        self.pool = pool
        # the response cache of the settings: with Redis, shared with the servers and stream workers
        cache = ResponseCache.from_settings(catalog.settings.cache)
        self.service = InferenceService(pool, catalog.settings.stream.default_max_tokens, cache=cache)
        self.policy = Policy.for_model(catalog.settings.security, pinned.name)  # limits and filters, as over HTTP
        self.timeout_s = catalog.settings.stream.item_timeout_s
        self.chunk = CHUNK_BATCHES * pinned.batch_size
        self.columns = [f.name for f in SCHEMAS[pinned.task].fields]

    @classmethod
    def start(cls, pinned: PinnedVersion, catalog: _Catalog) -> WorkerEngine:
        base = stream_pool_config(catalog.settings)
        room = CHUNK_BATCHES * pinned.batch_size
        config = replace(
            base,
            batch=BatchConfig(
                max_batch_size=pinned.batch_size, max_wait_ms=0.0, max_queue=room, timeout_s=base.batch.timeout_s
            ),
            generation=replace(base.generation, max_waiting=max(base.generation.max_waiting, room)),
            poll_interval_s=0.0,  # the version is pinned: nothing to follow
        )
        pool = ModelPool(catalog.registry, catalog.runtime, [pinned.ref], config)
        _Loop.run(pool.start())
        return cls(pinned, catalog, pool)

    @property
    def is_alive(self) -> bool:
        return self.pool.dead_engine() is None

    def frame(self, texts: pd.Series) -> pd.DataFrame:
        """One pandas batch of inputs -> one row of result columns per input."""
        values = texts.tolist()
        rows: list[dict[str, Any]] = []
        for start in range(0, len(values), self.chunk):
            rows.extend(_Loop.run(self.rows(values[start : start + self.chunk])))
        return pd.DataFrame.from_records(rows, columns=self.columns)

    async def rows(self, values: list[Any]) -> list[dict[str, Any]]:
        """Each value's result row, or its error row: refusals come from the same `prepare` as over HTTP."""
        outcomes: list[Result | BaseException | None] = [None] * len(values)
        submitted: list[tuple[int, asyncio.Future[Result]]] = []
        async with self.service.hold(self.pinned.ref) as sv:
            for i, value in enumerate(values):
                try:
                    call = self.service.prepare(
                        sv.task, [value], self.pinned.parameters, policy=self.policy, field="input"
                    )
                    submitted.append((i, self.service.submit(sv, call.items[0], self.timeout_s, self.policy)))
                except MoorageError as exc:
                    outcomes[i] = exc
            await self.service.wait_all([(sv, [f for _, f in submitted], self.timeout_s)])
        for i, future in submitted:
            outcomes[i] = _outcome(future)
        if any(isinstance(o, EngineFailed) for o in outcomes):  # not a bad row: the task fails, Spark retries it
            raise EngineFailed(f"the engine of {self.pinned.ref} stopped in python worker {os.getpid()}")
        return [self.row(o) for o in outcomes]

    def row(self, outcome: Result | BaseException | None) -> dict[str, Any]:
        if isinstance(outcome, Result):
            encoded = encode_result(self.pinned.task, outcome)
            if self.pinned.task == Task.GENERATE:
                encoded.setdefault("filtered", False)
            return {name: encoded.get(name) for name in self.columns} | {"error": None}
        return dict.fromkeys(self.columns) | {"error": error_reason(outcome)}


def _outcome(future: asyncio.Future[Result]) -> Result | BaseException:
    if future.cancelled():  # wait_all gave up on an engine that showed no progress
        return DeadlineExceeded("the model did not answer within the deadline and a grace")
    exc = future.exception()
    return future.result() if exc is None else exc


def error_reason(exc: BaseException | None) -> str:
    """``code: message`` as a dead-letter reason reads; a model failure names only its type (the
    worker's log has the traceback)."""
    if isinstance(exc, MoorageError):
        message = exc.message.removeprefix("input.0: ").removeprefix("input.0.")  # one row: no index
        return f"{exc.code}: {message}"
    log.error("model error in python worker %d", os.getpid(), exc_info=exc)
    return f"model_error: {type(exc).__name__}"
