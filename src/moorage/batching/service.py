"""`InferenceService`: the one thing every edge calls (HTTP predict, the OpenAI routes, jobs, streams).

An edge parses its wire format into a model reference, inputs and parameters, and renders the
`Result`s it gets back. Everything between lives here once: the task dispatch, validation of
inputs and generation parameters (one model, one set of limits), the model's security policy on
inputs and outputs, submission to the model's engine, and a wait bounded by the request's deadline
plus a grace, so that no caller waits forever even if an engine hangs.

With tracing on, each call (`run`, `stream`, or the futures a stream worker hands `observe`) is
recorded as one span once it has ended, named after its GenAI operation and model, with the
engines' timings of its inputs as child spans (`moorage.observability.tracing`). With tracing off
this costs one check per call.

With a `ResponseCache`, each input of a cached model is looked up after the input policy and before
the engine, and a computed result fills the cache (`moorage.batching.cache`); a hit is screened by
the output policy like a computed result, and a streamed hit is one event with the whole text.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..config import Settings
from ..errors import DeadlineExceeded, Overloaded, PayloadTooLarge
from ..observability import semconv, tracing
from ..runtime.base import GenerateInput
from .cache import ResponseCache
from .contract import (
    FinishReason,
    GenerationParameters,
    Result,
    Task,
    encode_result,
    parse_inputs,
    parse_parameters,
)
from .generation import GenerationEngine, TokenEvent
from .pool import ModelPool, ServedVersion
from .routing import RequestGray
from .settings import serving_pool_config

if TYPE_CHECKING:
    from ..security.policy import Policy

GRACE_S = 5.0  # how long past its deadline a caller waits for an engine that shows no progress


@dataclass(frozen=True)
class Outcome:
    """The results of one call and the version that computed them."""

    name: str
    version: int
    task: Task
    results: list[Result]

    @property
    def total_tokens(self) -> int:
        return sum(r.total_tokens for r in self.results)

    def encode(self) -> dict[str, Any]:
        """moorage's own response shape (HTTP predict, job results)."""
        outputs = [encode_result(self.task, r) for r in self.results]
        return {"model": self.name, "version": self.version, "task": str(self.task), "outputs": outputs}


@dataclass(frozen=True)
class Call:
    """A validated call, ready for the engine: the task, its engine items, and the policy that applies
    to its outputs."""

    task: Task
    items: list[Any]
    policy: Policy | None = None
    n: int = 1  # choices per input (the items hold each input n times)


class InferenceService:
    def __init__(
        self,
        pool: ModelPool,
        default_max_tokens: int = 256,
        grace_s: float = GRACE_S,
        cache: ResponseCache | None = None,
    ) -> None:
        self.pool = pool
        self.default_max_tokens = default_max_tokens
        self.grace_s = grace_s
        self.cache = cache

    def stage(self, settings: Settings, gray: Sequence[tuple[RequestGray, Settings]] = ()) -> Callable[[], None]:
        """Check the hot settings of a server's engines (``serve.*``) and its traffic splits
        (``routing``), and return the swap that puts them in force; nothing changes if this raises. A
        call already submitted runs with the values it started with. (A stream worker stages its own:
        `StreamWorker.stage`.) `gray`: request-share gray releases and the settings of their lane, whose
        splits the requests in that lane follow (engine limits are the process's: one engine serves both)."""
        lanes = {g.number: lane.routing for g, lane in gray}
        swap_pool = self.pool.stage(serving_pool_config(settings), settings.routing, lanes)
        max_tokens = settings.serve.default_max_tokens

        def swap() -> None:
            swap_pool()
            self.default_max_tokens = max_tokens

        return swap

    def reconfigure(self, settings: Settings, gray: Sequence[tuple[RequestGray, Settings]] = ()) -> None:
        """`stage` and swap at once."""
        self.stage(settings, gray)()

    async def close(self) -> None:
        """Let go of the response cache's connections (the service is not used afterwards)."""
        if self.cache is not None:
            await self.cache.close()

    # -- validation: the same rules for every edge ------------------------------------------------
    def prepare(
        self,
        task: Task | str,
        inputs: Sequence[Any],
        parameters: dict | GenerationParameters | None = None,
        *,
        policy: Policy | None = None,
        n: int = 1,
        field: str = "inputs",
    ) -> Call:
        """Validate `inputs` and `parameters` for `task` and apply the input side of `policy`
        (size limits, content filters, masking). `n` > 1: that many choices per input, choice j
        sampling with seed + j. Raises a 4xx `MoorageError` naming what is wrong (`field`: what the
        edge calls its inputs, e.g. OpenAI's ``input``)."""
        task = Task(task)
        params = parse_parameters(task, parameters)
        if policy is not None and params is not None:
            policy.max_tokens(params.max_new_tokens)
            policy.logprobs(params.logprobs)
        items = parse_inputs(task, list(inputs), params, self.default_max_tokens, field)
        if policy is not None:
            items = [_screen(policy, item, f"{field}.{i}" if len(items) > 1 else field) for i, item in enumerate(items)]
        if n > 1 and params is not None:
            items = [
                replace(item, params=params.runtime(self.default_max_tokens, seed_offset=j))
                for item in items
                for j in range(n)
            ]
        return Call(task, items, policy, max(n, 1) if params is not None else 1)

    # -- whole results --------------------------------------------------------------------------
    async def infer(
        self,
        model: str,
        inputs: Sequence[Any],
        parameters: dict | GenerationParameters | None = None,
        *,
        policy: Policy | None = None,
        task: Task | None = None,
        timeout_s: float | None = None,
        n: int = 1,
    ) -> Outcome:
        """Every input's result, or the first error (the other inputs are then cancelled)."""
        async with self.pool.use(model, task) as sv:
            call = self.prepare(sv.task, inputs, parameters, policy=policy, n=n)
            results = await self.run(sv, call, timeout_s)
        return self.outcome(sv, results)

    async def run(self, sv: ServedVersion, call: Call, timeout_s: float | None = None) -> list[Result]:
        """Run a prepared call on a held version: all or nothing, none computed after a cancel."""
        trace = tracing.begin()
        if trace is None:
            return await self._run(sv, call, timeout_s)
        try:
            results = await self._run(sv, call, timeout_s)
        except BaseException as exc:
            _record(trace, sv, call, [], exc)
            raise
        _record(trace, sv, call, results)
        return results

    async def _run(self, sv: ServedVersion, call: Call, timeout_s: float | None) -> list[Result]:
        if len(call.items) > sv.engine.capacity:
            raise PayloadTooLarge(
                f"this call holds {len(call.items)} inputs; the model takes at most {sv.engine.capacity} at once",
                code="too_many_inputs",
            )
        if not sv.engine.has_room(len(call.items)):
            raise Overloaded("the model's queue is full; retry shortly", retry_after=1)
        futures: list[asyncio.Future[Result]] = []
        try:
            for item in call.items:
                futures.append(self.submit(sv, item, timeout_s, call.policy))
            await self._bounded(sv, futures, timeout_s)
        finally:
            for f in futures:  # an error or a cancel: the rest of this call stops costing compute
                f.cancel()
        return [f.result() for f in futures]

    def submit(
        self, sv: ServedVersion, item: Any, timeout_s: float | None = None, policy: Policy | None = None
    ) -> asyncio.Future[Result]:
        """One input on a held version: a future of its result with the output policy applied."""
        key = self._cache_key(sv, item)
        if key is not None:
            return asyncio.ensure_future(self._cached(sv, item, key, timeout_s, policy))
        inner = sv.engine.submit(item, timeout_s)
        if policy is None or Task(sv.task) != Task.GENERATE:
            return inner
        outer: asyncio.Future[Result] = asyncio.get_running_loop().create_future()

        def settle(f: asyncio.Future[Result]) -> None:
            if outer.done():
                return
            if f.cancelled():
                outer.cancel()
            elif f.exception() is not None:
                outer.set_exception(f.exception())  # type: ignore[arg-type]
            else:
                outer.set_result(_screen_output(policy, f.result()))

        inner.add_done_callback(settle)
        outer.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)
        return outer

    def _cache_key(self, sv: ServedVersion, item: Any) -> str | None:
        if self.cache is None:
            return None
        self.cache.follow(self.pool.served().values())  # entries of versions served no more are dropped
        return self.cache.key(sv, item)

    async def _cached(
        self, sv: ServedVersion, item: Any, key: str, timeout_s: float | None, policy: Policy | None
    ) -> Result:
        """The cached result of `item`, else the engine's, which then fills the cache; either passes the
        output policy in force now."""
        assert self.cache is not None
        result = await self.cache.get(sv, key)
        if result is None:
            result = await sv.engine.submit(item, timeout_s)
            await self.cache.put(key, result)
        if policy is None or Task(sv.task) != Task.GENERATE:
            return result
        return _screen_output(policy, result)

    async def _item_events(
        self, engine: GenerationEngine, sv: ServedVersion, item: GenerateInput, timeout_s: float | None
    ) -> AsyncGenerator[TokenEvent, None]:
        """The events of one generation: one event with the whole text when the cache has it, else the
        engine's, whose result then fills the cache."""
        key = self._cache_key(sv, item)
        hit = None if key is None or self.cache is None else await self.cache.get(sv, key)
        if hit is not None:
            yield TokenEvent(hit.output, hit, logprobs=hit.logprobs or ())
            return
        events = engine.stream(item, timeout_s)
        try:
            async for event in events:
                if key is not None and self.cache is not None and event.result is not None:
                    await self.cache.put(key, event.result)
                yield event
        finally:
            await events.aclose()

    async def _bounded(self, sv: ServedVersion, futures: list[asyncio.Future], timeout_s: float | None) -> None:
        """Wait for `futures`; fail fast on the first error; give up once the engine has shown no
        progress for the deadline plus a grace (a hung engine must not hang its callers)."""
        bound = (timeout_s or sv.engine.config.timeout_s) + self.grace_s
        started = time.perf_counter()
        pending = set(futures)
        while pending:
            done, pending = await asyncio.wait(pending, timeout=bound, return_when=asyncio.FIRST_EXCEPTION)
            for f in done:
                if not f.cancelled() and f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]
            if pending and not _progressing(sv.engine, started, bound):
                raise DeadlineExceeded(
                    f"the model did not answer within the deadline ({bound - self.grace_s:g}s) and a grace"
                )

    # -- streamed generation ------------------------------------------------------------------------
    def stream(
        self, sv: ServedVersion, call: Call, timeout_s: float | None = None
    ) -> AsyncGenerator[tuple[int, TokenEvent], None]:
        """(choice index, event) of every item of a generation call, interleaved as tokens arrive.
        Text passes the output policy's stream filter; a withheld choice ends with finish_reason
        `content_filter`. The first error ends the stream (the caller renders it)."""
        trace = tracing.begin()
        events = self._stream(sv, call, timeout_s)
        return events if trace is None else self._traced(trace, sv, call, events)

    async def _stream(
        self, sv: ServedVersion, call: Call, timeout_s: float | None
    ) -> AsyncGenerator[tuple[int, TokenEvent], None]:
        engine = sv.engine
        if not isinstance(engine, GenerationEngine):
            raise TypeError("stream() needs a generation model")  # the edges check the task first
        queue: asyncio.Queue[tuple[int, TokenEvent | None, BaseException | None]] = asyncio.Queue()
        filters = [call.policy.stream() if call.policy else None for _ in call.items]
        bound = (timeout_s or engine.config.timeout_s) + self.grace_s

        async def pump(index: int, item: GenerateInput) -> None:
            try:
                events = self._item_events(engine, sv, item, timeout_s)
                try:
                    async for event in events:
                        queue.put_nowait((index, event, None))
                finally:
                    await events.aclose()
            except Exception as exc:
                queue.put_nowait((index, None, exc))

        tasks = [asyncio.ensure_future(pump(i, item)) for i, item in enumerate(call.items)]
        try:
            remaining = len(call.items)
            while remaining:
                try:
                    index, event, exc = await asyncio.wait_for(queue.get(), timeout=bound)
                except TimeoutError:
                    if _progressing(engine, time.perf_counter() - bound, bound):
                        continue
                    raise DeadlineExceeded("the model stopped producing tokens past the deadline and a grace") from None
                if exc is not None:
                    raise exc
                assert event is not None
                gate = filters[index]
                if gate is not None and call.policy is not None:
                    event = _filtered_event(call.policy, gate, event)
                remaining -= event.result is not None
                yield index, event
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    async def _traced(
        trace: tracing.Trace, sv: ServedVersion, call: Call, events: AsyncGenerator[tuple[int, TokenEvent], None]
    ) -> AsyncGenerator[tuple[int, TokenEvent], None]:
        """`events`, recorded as the call's span once they end (done, failed or closed early)."""
        results: dict[int, Result] = {}
        error: BaseException | None = None
        try:
            async for index, event in events:
                if event.result is not None:
                    results[index] = event.result
                yield index, event
        except BaseException as exc:
            error = exc
            raise
        finally:
            await events.aclose()
            _record(trace, sv, call, [results[i] for i in sorted(results)], error, stream=True)

    async def wait_all(self, calls: list[tuple[ServedVersion, list[asyncio.Future], float | None]]) -> None:
        """Wait until every future of every (version, futures, timeout_s) call is resolved. The futures
        of a call whose engine shows no progress past its deadline plus the grace are cancelled (their
        callers count that as a deadline): a hung engine never hangs a stream worker."""
        started = time.perf_counter()
        while True:
            waiting = [(sv, fs, t) for sv, fs, t in calls if not all(f.done() for f in fs)]
            if not waiting:
                return
            bound = min((t or sv.engine.config.timeout_s) for sv, _, t in waiting) + self.grace_s
            await asyncio.wait([f for _, fs, _ in waiting for f in fs if not f.done()], timeout=bound)
            for sv, fs, t in waiting:
                if not _progressing(sv.engine, started, (t or sv.engine.config.timeout_s) + self.grace_s):
                    if time.perf_counter() - started >= (t or sv.engine.config.timeout_s) + self.grace_s:
                        for f in fs:
                            f.cancel()

    @staticmethod
    def observe(
        sv: ServedVersion, items: Sequence[Any], futures: Sequence[asyncio.Future], parent: str | None = None
    ) -> None:
        """Trace a call whose prepared `items` its caller submitted and awaits itself (a stream worker):
        its span is recorded once every future is resolved, as a child of `parent` (a traceparent, e.g.
        a message's or a job's). Nothing when tracing is off."""
        trace = tracing.begin(parent)
        if trace is None or not futures:
            return
        call = Call(Task(sv.task), list(items))
        left = len(futures)

        def settled(_: asyncio.Future) -> None:
            nonlocal left
            left -= 1
            if left:
                return
            error = next((_failure(f) for f in futures if _failure(f) is not None), None)
            results = [f.result() for f in futures] if error is None else []
            _record(trace, sv, call, results, error, kind="CONSUMER")

        for f in futures:
            f.add_done_callback(settled)

    @staticmethod
    def outcome(sv: ServedVersion, results: list[Result]) -> Outcome:
        return Outcome(sv.name, sv.version, sv.task, results)

    @asynccontextmanager
    async def hold(self, model: str, task: Task | None = None):
        """Hold the served version of `model` (a hot swap lets held calls finish on it)."""
        async with self.pool.use(model, task) as sv:
            yield sv


def _failure(f: asyncio.Future) -> BaseException | None:
    return asyncio.CancelledError() if f.cancelled() else f.exception()


def _record(
    trace: tracing.Trace,
    sv: ServedVersion,
    call: Call,
    results: Sequence[Result],
    error: BaseException | None = None,
    *,
    stream: bool = False,
    kind: str = "SERVER",
) -> None:
    """The call's span: ``"{operation} {model}"`` with the GenAI attributes of its request and results."""
    operation = _operation(call)
    attributes: dict[str, Any] = {
        semconv.OPERATION_NAME: operation,
        semconv.PROVIDER_NAME: semconv.PROVIDER,
        semconv.REQUEST_MODEL: sv.name,
        semconv.RESPONSE_MODEL: f"{sv.name}:{sv.version}",
        semconv.MODEL_VERSION: sv.version,
        semconv.INPUT_COUNT: len(call.items) // call.n,
    }
    first = call.items[0] if call.items else None
    if isinstance(first, GenerateInput):
        params = first.params
        attributes |= {
            semconv.REQUEST_MAX_TOKENS: params.max_new_tokens,
            semconv.REQUEST_TEMPERATURE: params.temperature,
            semconv.REQUEST_TOP_P: params.top_p,
            semconv.REQUEST_STREAM: stream,
        }
        if params.seed is not None:
            attributes[semconv.REQUEST_SEED] = params.seed
        if params.stop:
            attributes[semconv.REQUEST_STOP_SEQUENCES] = list(params.stop)
        if call.n > 1:
            attributes[semconv.REQUEST_CHOICE_COUNT] = call.n
    if results:
        # a prompt counts once however many choices it has, as OpenAI's usage counts it
        attributes[semconv.USAGE_INPUT_TOKENS] = sum(r.prompt_tokens for r in results[:: call.n])
        if isinstance(first, GenerateInput):
            attributes[semconv.USAGE_OUTPUT_TOKENS] = sum(r.completion_tokens for r in results)
            attributes[semconv.RESPONSE_FINISH_REASONS] = [r.finish_reason or "" for r in results]
    if isinstance(error, GeneratorExit | asyncio.CancelledError):
        error = asyncio.CancelledError()  # the caller went away: error.type "CancelledError"
    timings = [r.timings for r in results]
    tracing.record(trace, f"{operation} {sv.name}", attributes, timings, error, kind=kind)


def _operation(call: Call) -> str:
    if call.task == Task.EMBED:
        return semconv.OP_EMBEDDINGS
    if call.task == Task.CLASSIFY:
        return semconv.OP_CLASSIFY
    first = call.items[0] if call.items else None
    return semconv.OP_CHAT if getattr(first, "messages", None) is not None else semconv.OP_TEXT_COMPLETION


def _progressing(engine: Any, started: float, bound: float) -> bool:
    """Whether a generation engine completed a step recently (a long generation is not a hang)."""
    last = getattr(engine, "last_step_at", None)
    return last is not None and time.perf_counter() - max(last, started) < bound


def _screen(policy: Policy, item: Any, where: str) -> Any:
    """The input as the model may see it under `policy`."""
    if not isinstance(item, GenerateInput):
        return policy.texts([item], where)[0]
    if item.messages is None:
        return replace(item, prompt=policy.texts([item.prompt or ""], where)[0])
    contents = policy.texts([m["content"] for m in item.messages], f"{where}.messages")
    return replace(item, messages=tuple({**m, "content": c} for m, c in zip(item.messages, contents)))


def _screen_output(policy: Policy, result: Result) -> Result:
    text, withheld = policy.output(result.output)
    if withheld:
        return replace(result, output=text, finish_reason=FinishReason.CONTENT_FILTER.value, filtered=True)
    return replace(result, output=text)


def _filtered_event(policy: Policy, gate: Any, event: TokenEvent) -> TokenEvent:
    text = gate.push(event.text) if event.text else ""
    if event.result is None:
        return TokenEvent(text)
    text += gate.finish()
    result = _screen_output(policy, event.result)
    if gate.blocked and not result.filtered:
        result = replace(result, output="", finish_reason=FinishReason.CONTENT_FILTER.value, filtered=True)
    return TokenEvent(text, result)
