"""Dynamic batching for embeddings and classification.

Inputs wait in one bounded queue per model version. `next_batch` (a pure function) decides when a
batch leaves and which inputs it holds: as soon as `max_batch_size` inputs wait, or when the oldest
has waited `max_wait_ms`; among more waiting inputs than fit, the oldest always goes, with the
neighbours closest to it in length, so a batch pads little. Tokenisation runs in one thread and
the model in another, so the next batch is tokenised while the current one computes.

Every future is resolved: a `Result`, the batch's error, `DeadlineExceeded` when the deadline
passes while queued, `EngineFailed` for everything waiting when the batching loop itself dies, or
nothing at all when its caller went away (a cancelled future is never computed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import DeadlineExceeded, EngineFailed, MoorageError, NotReady, Overloaded
from ..observability import metrics
from ..runtime import TaskHandler
from .contract import Result, Timings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 1 or self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise ValueError(f"invalid batch config {self}: sizes must be >= 1, times positive")


@dataclass(eq=False)
class Pending:
    item: Any
    size: int
    future: asyncio.Future
    enqueued: float
    deadline: float
    taken: float = 0.0  # when a batch took it


def next_batch(queue: Sequence[Pending], now: float, max_batch_size: int, max_wait_s: float) -> tuple[list, float]:
    """The inputs of the next batch (oldest first in `queue`), or `[]` and how long to wait for one."""
    if not queue:
        return [], float("inf")
    oldest = queue[0]
    if len(queue) < max_batch_size and now - oldest.enqueued < max_wait_s:
        return [], oldest.enqueued + max_wait_s - now
    if len(queue) <= max_batch_size:
        return list(queue), 0.0
    window = sorted(queue[: max_batch_size * 4], key=lambda p: p.size)
    anchor = window.index(oldest)
    starts = range(max(0, anchor - max_batch_size + 1), min(anchor, len(window) - max_batch_size) + 1)
    best = min(starts, key=lambda s: window[s + max_batch_size - 1].size - window[s].size)
    return window[best : best + max_batch_size], 0.0


class _Stats:
    def __init__(self, labels: tuple[str, str]) -> None:
        self.queue_depth = metrics.QUEUE_DEPTH.labels(*labels)
        self.queue_wait = metrics.QUEUE_WAIT.labels(*labels)
        self.batch_size = metrics.BATCH_SIZE.labels(*labels)


class DynamicBatcher:
    """`submit(item, timeout_s)` -> future of a `Result`; one instance per loaded model version."""

    def __init__(
        self,
        handler: TaskHandler,
        config: BatchConfig,
        labels: tuple[str, str] = ("model", "0"),
        size_of: Callable[[Any], int] = lambda item: len(str(item)),
    ) -> None:
        self.handler = handler
        self.config = config
        self._size_of = size_of
        self._queue: list[Pending] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._computing: set[asyncio.Task] = set()
        self._slot = asyncio.Semaphore(1)  # one batch computes while the next one is tokenised
        self._pre = ThreadPoolExecutor(1, thread_name_prefix="moorage-tokenize")
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="moorage-compute")
        self._stats = _Stats(labels)
        self._labels = labels
        self.failure: BaseException | None = None  # set when the batching loop died
        self._on_failure: list[Callable[[BaseException], None]] = []

    # -- the edge side ----------------------------------------------------------------------
    def submit(self, item: Any, timeout_s: float | None = None) -> asyncio.Future[Result]:
        if self.failure is not None:
            raise EngineFailed("this model version's batcher stopped after an internal error")
        if self._closing or self._task is None:
            raise NotReady("this model version is not accepting requests (starting or shutting down)")
        if len(self._queue) >= self.config.max_queue:
            raise Overloaded(f"queue full ({self.config.max_queue} inputs waiting); retry shortly", retry_after=1)
        now = time.perf_counter()
        future = asyncio.get_running_loop().create_future()
        deadline = now + (timeout_s if timeout_s is not None else self.config.timeout_s)
        self._queue.append(Pending(item, self._size_of(item), future, now, deadline))
        self._stats.queue_depth.set(len(self._queue))
        self._wakeup.set()
        return future

    def reconfigure(self, config: BatchConfig) -> None:
        """New limits for what comes next: the batch being computed keeps its inputs, and inputs already
        queued keep their deadlines; a smaller queue bound only refuses new inputs (429) until it drains."""
        self.config = config
        self._wakeup.set()  # a batch waiting to fill is decided again under the new size and wait

    def has_room(self, n: int) -> bool:
        return len(self._queue) + n <= self.config.max_queue

    @property
    def capacity(self) -> int:
        """The most inputs one call can ever have queued at once."""
        return self.config.max_queue

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def is_alive(self) -> bool:
        return self.failure is None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="moorage-batcher")
        self._task.add_done_callback(self._loop_ended)

    def add_failure_listener(self, callback: Callable[[BaseException], None]) -> None:
        """`callback(exc)` runs (on the event loop) if the batching loop dies."""
        self._on_failure.append(callback)

    def _loop_ended(self, task: asyncio.Task) -> None:
        """If the loop dies (a bug, not a model error), nothing that waits on it may hang."""
        if task.cancelled():  # the event loop is going away: nothing will compute what waits
            for p in self._queue:
                if not p.future.done():
                    p.future.set_exception(NotReady("the server is shutting down"))
            self._queue = []
            self._stats.queue_depth.set(0)
            return
        if task.exception() is not None:
            exc: BaseException = task.exception()  # type: ignore[assignment]
        elif self._closing:
            return
        else:
            exc = RuntimeError("the batching loop returned while serving")
        log.error(
            "the batcher of %s version %s died; failing %d waiting inputs",
            *self._labels,
            len(self._queue),
            exc_info=exc,
        )
        self.failure = exc
        error = EngineFailed("this model version's batcher stopped after an internal error")
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(error)
        self._queue = []
        self._stats.queue_depth.set(0)
        for callback in self._on_failure:
            callback(exc)

    async def stop(self) -> None:
        """Stop accepting; everything queued is still computed and answered."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._computing:
            await asyncio.gather(*self._computing, return_exceptions=True)
        self._pre.shutdown(wait=False)
        self._compute.shutdown(wait=False)

    # -- the worker --------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._take()
            if batch is None:
                return
            items = [p.item for p in batch]
            try:
                features = await loop.run_in_executor(self._pre, self.handler.preprocess, items)
            except Exception as exc:
                self._fail(batch, exc)
                continue
            await self._slot.acquire()
            task = loop.create_task(self._run_batch(batch, features))
            self._computing.add(task)
            task.add_done_callback(self._computing.discard)

    async def _take(self) -> list[Pending] | None:
        while True:
            now = time.perf_counter()
            self._sweep(now)
            max_wait = 0.0 if self._closing else self.config.max_wait_ms / 1000
            batch, wait = next_batch(self._queue, now, self.config.max_batch_size, max_wait)
            if batch:
                taken = set(map(id, batch))
                self._queue = [p for p in self._queue if id(p) not in taken]
                self._stats.queue_depth.set(len(self._queue))
                for p in batch:
                    p.taken = now
                    self._stats.queue_wait.observe(now - p.enqueued)
                return batch
            if self._closing:
                return None
            self._wakeup.clear()
            deadline = min((p.deadline for p in self._queue), default=now + 3600) - now
            try:
                await asyncio.wait_for(self._wakeup.wait(), max(0.0, min(wait, deadline)))
            except TimeoutError:
                pass

    def _sweep(self, now: float) -> None:
        """Drop inputs whose caller went away; answer those past their deadline with 504."""
        if not any(p.future.done() or p.deadline <= now for p in self._queue):
            return
        keep = []
        for p in self._queue:
            if p.future.done():
                continue
            if p.deadline <= now:
                p.future.set_exception(DeadlineExceeded("the request waited in the queue past its deadline"))
                continue
            keep.append(p)
        self._queue = keep
        self._stats.queue_depth.set(len(keep))

    async def _run_batch(self, batch: list[Pending], features: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            now = time.perf_counter()
            for p in batch:  # it may have waited for the compute slot past its deadline
                if not p.future.done() and p.deadline <= now:
                    p.future.set_exception(DeadlineExceeded("the request waited in the queue past its deadline"))
            if all(p.future.done() for p in batch):
                return
            self._stats.batch_size.observe(len(batch))
            outputs, model_started, model_finished = await loop.run_in_executor(self._compute, self._timed, features)
            if len(outputs) != len(batch):
                raise RuntimeError(f"handler returned {len(outputs)} outputs for {len(batch)} inputs")
            counts = self.handler.token_counts(features, [p.item for p in batch])
            finished = time.perf_counter()
            for p, out, tokens in zip(batch, outputs, counts):
                if not p.future.done():
                    timings = Timings(p.enqueued, p.taken, model_started, model_finished, finished, len(batch))
                    p.future.set_result(Result(out, tokens, timings=timings))
        except Exception as exc:
            self._fail(batch, exc)
        finally:
            self._slot.release()

    def _timed(self, features: Any) -> tuple[list[Any], float, float]:
        started = time.perf_counter()
        outputs = self._predict(features)
        return outputs, started, time.perf_counter()

    def _predict(self, features: Any) -> list[Any]:
        return self.handler.postprocess(self.handler.predict(features))

    @staticmethod
    def _fail(batch: list[Pending], exc: Exception) -> None:
        if not isinstance(exc, MoorageError):
            log.error("batch of %d failed", len(batch), exc_info=exc)
        for p in batch:
            if not p.future.done():
                p.future.set_exception(exc)
