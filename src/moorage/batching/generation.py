"""Continuous (iteration-level) batching for generation.

One engine thread per model version runs `step()` in a loop: drop cancelled and expired
sequences, let the `Scheduler` admit waiting ones (a limit on running sequences and on prompt
tokens prefilled per step), prefill those or decode one token for every running sequence, then
stream each sequence's new text to its caller and drop the finished rows from the KV cache.
New sequences therefore join between decode steps instead of waiting for a whole batch to end.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ..errors import BadRequest, DeadlineExceeded, NotReady, Overloaded
from ..observability import metrics
from ..runtime.base import GenerateInput, Generation, NewSequence, StepGenerator, TextStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationConfig:
    max_num_seqs: int = 32  # rows in the running batch
    max_prefill_tokens: int = 4096  # prompt tokens prefilled in one step (one long prompt always fits)
    max_waiting: int = 256  # sequences queued before 429
    timeout_s: float = 60.0  # how long a sequence may wait for a slot before 504

    def __post_init__(self) -> None:
        if min(self.max_num_seqs, self.max_prefill_tokens, self.max_waiting) < 1 or self.timeout_s <= 0:
            raise ValueError(f"invalid generation config {self}: limits must be >= 1, timeout positive")


@dataclass(frozen=True)
class TokenEvent:
    """New text of one sequence; `result` is set on its last event."""

    text: str
    result: Generation | None = None
    error: BaseException | None = None


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    stream: TextStream
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    arrival: float
    deadline: float
    cancelled: bool = False
    last_token_at: float | None = None

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
        seq.events.put_nowait(event)


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

    # -- the edge side ----------------------------------------------------------------------
    def submit(self, item: GenerateInput, timeout_s: float | None = None) -> Sequence:
        if not self._accepting:
            raise NotReady("this model version is not accepting requests (starting or shutting down)")
        with self._cv:
            waiting = len(self._inbox) + len(self.scheduler.waiting)
        if waiting >= self.config.max_waiting:
            raise Overloaded(f"{waiting} sequences are waiting for a slot; retry shortly", retry_after=1)
        prompt_ids = self.handler.encode_prompt(item)
        budget = self.handler.max_context - len(prompt_ids)
        if item.params.max_new_tokens > budget:
            raise BadRequest(
                f"the prompt has {len(prompt_ids)} tokens; with max_tokens={item.params.max_new_tokens} it exceeds"
                f" the model's context of {self.handler.max_context} tokens",
                code="context_length_exceeded",
            )
        now = time.perf_counter()
        seq = Sequence(
            seq_id=next(self._ids),
            prompt_ids=prompt_ids,
            stream=TextStream(self.handler, item.params, len(prompt_ids)),
            loop=asyncio.get_running_loop(),
            events=asyncio.Queue(),
            arrival=now,
            deadline=now + (timeout_s if timeout_s is not None else self.config.timeout_s),
        )
        with self._cv:
            self._inbox.append(seq)
            self._cv.notify()
        return seq

    async def generate(self, item: GenerateInput, timeout_s: float | None = None) -> AsyncIterator[TokenEvent]:
        """Token events of one sequence; closing the iterator early cancels it and frees its row."""
        seq = self.submit(item, timeout_s)
        finished = False
        try:
            while True:
                event = await seq.events.get()
                if event.error is not None:
                    finished = True
                    raise event.error
                finished = event.result is not None
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self.cancel(seq)

    async def complete(self, item: GenerateInput, timeout_s: float | None = None) -> Generation:
        async for event in self.generate(item, timeout_s):
            if event.result is not None:
                return event.result
        raise RuntimeError("generation ended without a result")  # pragma: no cover - engine bug

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        with self._cv:
            self._cv.notify()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="moorage-generate", daemon=True)
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
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._inbox and self.scheduler.is_idle and not self._stopping:
                    self._cv.wait()
                self.scheduler.waiting.extend(self._inbox)
                self._inbox.clear()
                if self._stopping and self.scheduler.is_idle:
                    return
            try:
                self.step()
            except Exception as exc:  # a model failure fails the sequences it touched, not the engine
                log.error("generation step failed", exc_info=exc)
                self._fail_all(exc)

    def step(self) -> None:
        now = time.perf_counter()
        self._drop_waiting(now)
        cancelled = {s for s in self.scheduler.running if s.cancelled}
        self._remove(cancelled)
        admitted = self.scheduler.schedule()
        if admitted:
            for seq in admitted:
                self._stats.queue_wait.observe(now - seq.arrival)
                self._stats.prompt.inc(seq.num_prompt_tokens)
            tokens = self._batch.add([NewSequence(s.seq_id, s.prompt_ids, s.stream.params) for s in admitted])
            stepped = admitted
        elif self.scheduler.running:
            by_id = {s.seq_id: s for s in self.scheduler.running}
            stepped = [by_id[i] for i in self._batch.seq_ids]
            tokens = self._batch.step()
        else:
            return
        self._stats.batch.observe(len(stepped))
        self._stats.running.set(len(self.scheduler.running))
        self._stats.waiting.set(len(self.scheduler.waiting))
        self._deliver(stepped, tokens)

    def _deliver(self, stepped: list[Sequence], tokens: list[int]) -> None:
        now = time.perf_counter()
        finished = set()
        events = []
        for seq, token in zip(stepped, tokens):
            if seq.last_token_at is None:
                self._stats.ttft.observe(now - seq.arrival)
            else:
                self._stats.itl.observe(now - seq.last_token_at)
            seq.last_token_at = now
            self._stats.tokens.inc()
            text = seq.stream.push(token)
            if seq.stream.result is not None:
                finished.add(seq)
            if text or seq.stream.result is not None:
                events.append((seq, TokenEvent(text, seq.stream.result)))
        _emit_all(events)
        self._remove(finished)

    def _remove(self, seqs: set[Sequence]) -> None:
        if seqs:
            self._batch.remove({s.seq_id for s in seqs})
            self.scheduler.finish(seqs)

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

    def _fail_all(self, exc: Exception) -> None:
        for seq in self.scheduler.running:
            seq.emit(TokenEvent("", error=exc))
        self.scheduler.running = []
        self._batch = self.handler.new_batch()
