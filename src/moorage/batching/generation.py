"""Continuous (iteration-level) batching for generation.

One engine thread per model version runs `step()` in a loop: drop cancelled and expired
sequences, let the `Scheduler` admit waiting ones (a limit on running sequences and on prompt
tokens prefilled per step), prefill those or decode one token for every running sequence, then
stream each sequence's new text to its caller and drop the finished rows from the KV cache.
New sequences therefore join between decode steps instead of waiting for a whole batch to end.

The engine thread owns every model call, prompt tokenisation included, so the event loop never
waits on the model. `submit` answers a future of a `Result`; `stream` also yields the text as it
is decoded. Every future is resolved: a result, a typed error, `DeadlineExceeded` when no row was
free in time, or `EngineFailed` for every waiting and running sequence when the engine thread dies
(an exception outside one step, the thread exiting, or steps failing again and again).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadRequest, DeadlineExceeded, EngineFailed, MoorageError, NotReady, Overloaded
from ..observability import metrics
from ..runtime.base import GenerateInput, Generation, NewSequence, StepGenerator, TextStream, TokenLogprob
from .contract import Result, Timings

JSON_KINDS = ("json_object", "json_schema")  # constraints whose text is JSON once complete

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationConfig:
    max_num_seqs: int = 32  # rows in the running batch
    max_prefill_tokens: int = 4096  # prompt tokens prefilled in one step (one long prompt always fits)
    max_waiting: int = 256  # sequences queued before 429
    timeout_s: float = 60.0  # how long a sequence may wait for a slot before 504
    max_failed_steps: int = 3  # consecutive failing steps after which the engine counts as dead

    def __post_init__(self) -> None:
        if min(self.max_num_seqs, self.max_prefill_tokens, self.max_waiting) < 1 or self.timeout_s <= 0:
            raise ValueError(f"invalid generation config {self}: limits must be >= 1, timeout positive")


@dataclass(frozen=True)
class TokenEvent:
    """New text of one sequence; `result` is set on its last event, `error` on a failed one.
    `logprobs` holds those of the tokens decoded since the previous event (when asked for)."""

    text: str
    result: Result | None = None
    error: BaseException | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


def as_result(g: Generation, timings: Timings | None = None, item: GenerateInput | None = None) -> Result:
    constraint = item.params.constraint if item is not None else None
    return Result(
        g.text,
        g.prompt_tokens,
        g.completion_tokens,
        g.finish_reason,
        timings=timings,
        logprobs=g.logprobs,
        is_json=constraint is not None and constraint.kind in JSON_KINDS,
    )


@dataclass(eq=False)
class Sequence:
    seq_id: int
    item: GenerateInput
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    events: asyncio.Queue | None  # only for a streamed sequence
    arrival: float
    deadline: float
    prompt_ids: list[int] = field(default_factory=list)
    stream: TextStream | None = None
    cancelled: bool = False
    last_token_at: float | None = None
    admitted_at: float = 0.0
    first_token_at: float = 0.0
    batch_size: int = 0  # rows running when it was admitted

    def timings(self, finished: float) -> Timings:
        return Timings(
            self.arrival, self.admitted_at, self.admitted_at, finished, finished, self.batch_size, self.first_token_at
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def emit(self, event: TokenEvent) -> None:
        _emit_all([(self, event)])


def _emit_all(pairs: list[tuple[Sequence, TokenEvent]]) -> None:
    """Hand a step's events to their event loops: one cross-thread wake-up per loop, not per token
    (each wake-up makes the engine thread wait for the GIL again)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, TokenEvent]]] = {}
    for seq, event in pairs:
        by_loop.setdefault(seq.loop, []).append((seq, event))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver_events, items)
        except RuntimeError:  # that event loop is gone: nobody is listening
            for seq, _ in items:
                seq.cancelled = True


def _deliver_events(items: list[tuple[Sequence, TokenEvent]]) -> None:
    for seq, event in items:
        if seq.events is not None:
            seq.events.put_nowait(event)
        if seq.future.done():
            continue
        if event.error is not None:
            seq.future.set_exception(event.error)
        elif event.result is not None:
            seq.future.set_result(event.result)


class Scheduler:
    """Waiting and running sequences under the limits; no model, no threads, testable alone."""

    def __init__(self, max_num_seqs: int, max_prefill_tokens: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Any] = deque()
        self.running: list[Any] = []

    def schedule(self) -> list[Any]:
        """Admit waiting sequences, oldest first, while a row is free and the prefill budget lasts."""
        admitted: list[Any] = []
        tokens = 0
        while self.waiting and len(self.running) + len(admitted) < self.max_num_seqs:
            cost = self.waiting[0].num_prompt_tokens
            if admitted and tokens + cost > self.max_prefill_tokens:
                break
            tokens += cost
            admitted.append(self.waiting.popleft())
        self.running.extend(admitted)
        return admitted

    def finish(self, seqs: set[Any]) -> None:
        if seqs:
            self.running = [s for s in self.running if s not in seqs]

    @property
    def is_idle(self) -> bool:
        return not self.waiting and not self.running


class _Stats:
    """The engine's metric children for one model version, bound once."""

    def __init__(self, labels: tuple[str, str]) -> None:
        self.ttft = metrics.TIME_TO_FIRST_TOKEN.labels(*labels)
        self.itl = metrics.INTER_TOKEN_LATENCY.labels(*labels)
        self.tokens = metrics.GENERATED_TOKENS.labels(*labels)
        self.prompt = metrics.PROMPT_TOKENS.labels(*labels)
        self.running = metrics.RUNNING_SEQS.labels(*labels)
        self.waiting = metrics.QUEUE_DEPTH.labels(*labels)
        self.queue_wait = metrics.QUEUE_WAIT.labels(*labels)
        self.batch = metrics.BATCH_SIZE.labels(*labels)


class GenerationEngine:
    def __init__(self, handler: StepGenerator, config: GenerationConfig, labels: tuple[str, str] = ("model", "0")):
        self.handler = handler
        self.config = config
        self.scheduler = Scheduler(config.max_num_seqs, config.max_prefill_tokens)
        self._inbox: list[Sequence] = []
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._batch = handler.new_batch()
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stats = _Stats(labels)
        self._labels = labels
        self._failed_steps = 0
        self.last_step_at: float | None = None  # when the engine thread last finished a step
        self.failure: BaseException | None = None  # set when the engine thread died
        self._on_failure: list[tuple[asyncio.AbstractEventLoop, Callable[[BaseException], None]]] = []

    # -- the edge side ----------------------------------------------------------------------
    def submit(self, item: GenerateInput, timeout_s: float | None = None) -> asyncio.Future[Result]:
        """A future of the whole generation; cancelling it frees the sequence's row."""
        return self._enqueue(item, timeout_s, streamed=False).future

    async def stream(self, item: GenerateInput, timeout_s: float | None = None) -> AsyncGenerator[TokenEvent, None]:
        """Token events of one sequence; closing the iterator early cancels it and frees its row."""
        seq = self._enqueue(item, timeout_s, streamed=True)
        assert seq.events is not None
        try:
            while True:
                event = await seq.events.get()
                if event.error is not None:
                    raise event.error
                yield event
                if event.result is not None:
                    return
        finally:
            seq.future.cancel()  # a no-op once it is resolved

    def _enqueue(self, item: GenerateInput, timeout_s: float | None, streamed: bool) -> Sequence:
        if self.failure is not None:
            raise EngineFailed("this model version's generation engine stopped after an internal error")
        if not self._accepting:
            raise NotReady("this model version is not accepting requests (starting or shutting down)")
        with self._cv:
            waiting = len(self._inbox) + len(self.scheduler.waiting)
        if waiting >= self.config.max_waiting:
            raise Overloaded(f"{waiting} sequences are waiting for a slot; retry shortly", retry_after=1)
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        seq = Sequence(
            seq_id=next(self._ids),
            item=item,
            loop=loop,
            future=loop.create_future(),
            events=asyncio.Queue() if streamed else None,
            arrival=now,
            deadline=now + (timeout_s if timeout_s is not None else self.config.timeout_s),
        )
        seq.future.add_done_callback(lambda f: self.cancel(seq) if f.cancelled() else None)
        with self._cv:
            if self.failure is not None:  # it died since the check above: nobody would answer this one
                raise EngineFailed("this model version's generation engine stopped after an internal error")
            self._inbox.append(seq)
            self._cv.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        with self._cv:
            self._cv.notify()

    def reconfigure(self, config: GenerationConfig) -> None:
        """New limits from the next step on: running sequences keep their rows (fewer rows only admit
        fewer new ones), waiting ones keep their deadlines."""
        with self._cv:
            self.config = config
            self.scheduler.max_num_seqs = config.max_num_seqs
            self.scheduler.max_prefill_tokens = config.max_prefill_tokens
            self._cv.notify()

    def add_failure_listener(self, callback: Callable[[BaseException], None]) -> None:
        """`callback(exc)` runs on the caller's event loop if the engine thread dies."""
        self._on_failure.append((asyncio.get_running_loop(), callback))

    @property
    def is_alive(self) -> bool:
        return self.failure is None

    def has_room(self, n: int) -> bool:
        return self.queue_depth + n <= self.config.max_waiting

    @property
    def capacity(self) -> int:
        """The most inputs one call can ever have queued at once."""
        return self.config.max_waiting

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._accepting = True
        self._thread = threading.Thread(target=self._thread_main, name="moorage-generate", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop accepting; finish every queued and running sequence; then end the engine thread."""
        self._accepting = False
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    @property
    def queue_depth(self) -> int:
        return len(self._inbox) + len(self.scheduler.waiting)

    # -- the engine thread -------------------------------------------------------------------
    def _thread_main(self) -> None:
        """The thread's whole life: whatever ends it early, no caller is left waiting."""
        error: BaseException | None = None
        try:
            self._run()
            if not self._stopping:
                error = RuntimeError("the engine thread returned while serving")
        except BaseException as exc:  # SystemExit included: a thread that ends here serves nobody
            error = exc
        if error is not None:
            self._died(error)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._inbox and self.scheduler.is_idle and not self._stopping:
                    self._cv.wait()
                arrived, self._inbox = self._inbox, []
                if self._stopping and self.scheduler.is_idle and not arrived:
                    return
            if arrived:
                self.scheduler.waiting.extend(self._prepared(arrived))
                self._set_gauges()
            try:
                self.step()
                self._failed_steps = 0
                self.last_step_at = time.perf_counter()
            except Exception as exc:  # a model failure fails the sequences it touched, not the engine
                self._failed_steps += 1
                if self._failed_steps >= self.config.max_failed_steps:
                    raise
                log.error("generation step failed", exc_info=exc)
                self._fail_running(exc)

    def _prepared(self, arrived: list[Sequence]) -> list[Sequence]:
        """Tokenise new prompts and compile their constraints here, off the event loop; refuse those
        that cannot fit the context or whose constraint cannot be compiled (only that sequence fails)."""
        ready = []
        for seq in arrived:
            if seq.cancelled:
                continue
            try:
                seq.prompt_ids = self.handler.encode_prompt(seq.item)
                budget = self.handler.max_context - len(seq.prompt_ids)
                if seq.item.params.max_new_tokens > budget:
                    raise BadRequest(
                        f"the prompt has {len(seq.prompt_ids)} tokens; with max_tokens="
                        f"{seq.item.params.max_new_tokens} it exceeds the model's context of"
                        f" {self.handler.max_context} tokens",
                        code="context_length_exceeded",
                    )
                if seq.item.params.constraint is not None:
                    self.handler.compile_constraint(seq.item.params.constraint)
                seq.stream = TextStream(self.handler, seq.item.params, len(seq.prompt_ids))
            except Exception as exc:
                if not isinstance(exc, MoorageError):
                    log.error("could not prepare a sequence", exc_info=exc)
                seq.emit(TokenEvent("", error=exc))
                continue
            ready.append(seq)
        return ready

    def step(self) -> None:
        now = time.perf_counter()
        self._drop_waiting(now)
        cancelled = {s for s in self.scheduler.running if s.cancelled}
        self._remove(cancelled)
        admitted = self.scheduler.schedule()
        if admitted:
            self._set_gauges()
            rows = len(self.scheduler.running)
            for seq in admitted:
                seq.admitted_at, seq.batch_size = now, rows
                self._stats.queue_wait.observe(now - seq.arrival)
                self._stats.prompt.inc(seq.num_prompt_tokens)
            tokens = self._batch.add([NewSequence(s.seq_id, s.prompt_ids, s.item.params) for s in admitted])
            stepped = admitted
        elif self.scheduler.running:
            by_id = {s.seq_id: s for s in self.scheduler.running}
            stepped = [by_id[i] for i in self._batch.seq_ids]
            tokens = self._batch.step()
        else:
            return
        self._stats.batch.observe(len(stepped))
        self._deliver(stepped, tokens, self._batch.logprobs)

    def _deliver(self, stepped: list[Sequence], tokens: list[int], logprobs: list[TokenLogprob | None]) -> None:
        now = time.perf_counter()
        finished = set()
        events = []
        for seq, token, logprob in zip(stepped, tokens, logprobs):
            if seq.last_token_at is None:
                seq.first_token_at = now
                self._stats.ttft.observe(now - seq.arrival)
            else:
                self._stats.itl.observe(now - seq.last_token_at)
            seq.last_token_at = now
            self._stats.tokens.inc()
            stream = seq.stream
            assert stream is not None  # set when the sequence was admitted
            text = stream.push(token, logprob)
            if stream.result is not None:
                finished.add(seq)
                result = as_result(stream.result, seq.timings(now), seq.item)
                events.append((seq, TokenEvent(text, result, logprobs=stream.take_logprobs())))
            elif text and seq.events is not None:  # nobody reads the deltas of an unstreamed sequence
                events.append((seq, TokenEvent(text, logprobs=stream.take_logprobs())))
        _emit_all(events)
        self._remove(finished)

    def _remove(self, seqs: set[Sequence]) -> None:
        if seqs:
            self._batch.remove({s.seq_id for s in seqs})
            self.scheduler.finish(seqs)
            self._set_gauges()

    def _set_gauges(self) -> None:
        """Called wherever rows change (arrival, admission, finish, cancel, deadline, failure), not once
        per step: the step that drops the last cancelled or finished row has no row left to report."""
        self._stats.running.set(len(self.scheduler.running))
        self._stats.waiting.set(len(self.scheduler.waiting))

    def _drop_waiting(self, now: float) -> None:
        if not any(s.cancelled or s.deadline <= now for s in self.scheduler.waiting):
            return
        keep: deque[Sequence] = deque()
        for seq in self.scheduler.waiting:
            if seq.cancelled:
                continue
            if seq.deadline <= now:
                seq.emit(TokenEvent("", error=DeadlineExceeded("the request waited for a free slot past its deadline")))
                continue
            keep.append(seq)
        self.scheduler.waiting = keep
        self._set_gauges()

    def _fail_running(self, exc: Exception) -> None:
        """A failed step: a fresh decode batch (if that fails too, the engine is dead), then the
        sequences the step touched get its error."""
        self._batch = self.handler.new_batch()
        running, self.scheduler.running = self.scheduler.running, []
        self._set_gauges()
        _emit_all([(seq, TokenEvent("", error=exc)) for seq in running])

    def _died(self, exc: BaseException) -> None:
        log.critical("the generation engine of %s version %s died", *self._labels, exc_info=exc)
        with self._cv:
            self.failure = exc
            self._accepting = False
            seqs = self._inbox + list(self.scheduler.waiting) + self.scheduler.running
            self._inbox, self.scheduler.running = [], []
            self.scheduler.waiting.clear()
            self._set_gauges()
        for loop, callback in self._on_failure:  # first: nobody is told "failed" while the pool looks ready
            try:
                loop.call_soon_threadsafe(callback, exc)
            except RuntimeError:  # that loop is closed
                pass
        error = EngineFailed("this model version's generation engine stopped after an internal error")
        _emit_all([(seq, TokenEvent("", error=error)) for seq in seqs])
