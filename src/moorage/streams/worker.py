"""The stream worker: receive -> decode -> micro-batch -> infer -> write -> ack.

Two tasks share one bounded queue of in-flight batches, so the broker is read while the model
computes the previous batch and the sink writes the one before:

    receiver: broker.receive -> codec.decode -> InferenceService.prepare/submit -> queue
    writer:   queue (in order) -> await results -> codec.row -> sink.write -> ack (once durable)

A `Codec` says what a source's messages ask for and what their rows look like: `MessageCodec` for
stream messages (one input each, against the worker's model), `streams.jobs.JobCodec` for jobs (a
job row in the catalog, any served model, several inputs). Everything else is shared.

A message whose body is bad (not JSON, no text, too long), that the model's security policy refuses
(content filter, size limits: the same `Policy` as over HTTP) or that the model rejects (a 4xx error
such as a too-long prompt) goes to the dead-letter destination with its reason. A model error that
may pass (anything else) is retried in place with backoff. Each broker counts deliveries; past
``max_deliveries`` a message is dead-lettered with its last error, so one bad message never stalls
a worker.

Faults outside the model are not the message's fault, so they never count as a delivery:

- A broker or a sink that is down (a restart, an outage) is retried with bounded backoff until it
  is back, while the worker keeps the leases of every message it holds (received, batched, being
  written, buffered by a file sink) and stops receiving more. Meanwhile `Health` reports the
  problem (``/healthz`` 503, ``moorage_stream_healthy`` 0); it clears on the first success.
- A sink that refuses a batch (a row it cannot store: not an outage) gets ``sink_retries``
  attempts, then the batch and whatever the sink had buffered go back to the broker.
- A handle that went stale (RabbitMQ's channel closed under it) is settled by the broker already:
  the message is queued again and comes back on the new connection.
- Stop (SIGTERM) ends every retry at once on the receive side; what was received is finished and
  acknowledged within ``stop_grace_s``, and what is still unsettled then is handed back.

A generated output that the content filter withholds is written with empty text and finish_reason
"content_filter". With an `AuditWriter`, every processed or dead-lettered message gets a
hash-chained audit row once its outcome is settled with the broker and the sink.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol, TypeVar

import orjson

from ..batching import InferenceService, Result, ServedVersion, Task, encode_result
from ..batching.routing import RequestGray
from ..batching.settings import from_settings, stream_pool_config
from ..config import Settings
from ..errors import DeadlineExceeded, ModelNotFound, MoorageError
from ..observability import metrics, tracing
from ..refs import parse_ref
from ..security.audit import MAX_AUDIT_TEXT, AuditEntry, AuditWriter, sha256_text
from ..security.policy import Policy
from .brokers import Broker, Message
from .health import Health
from .records import with_record
from .sinks import Row, Sink

log = logging.getLogger("moorage.streams")
T = TypeVar("T")


@dataclass(frozen=True)
class WorkerConfig:
    batch_size: int = 64
    max_in_flight: int = 2  # batches between receive and ack (pipelining depth)
    receive_timeout_s: float = 0.5
    max_text_chars: int = 20_000
    item_timeout_s: float = 600.0
    model_retries: int = 3
    sink_retries: int = 5
    backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    log_interval_s: float = 10.0
    lease_heartbeat_s: float = 10.0  # renew the leases of messages held (long generations, sink outages)
    stop_grace_s: float = 10.0  # after stop: finish and acknowledge within this, then hand the rest back
    reconnect_backoff_s: float = 1.0  # longest pause between broker retries (cheap; recovery comes sooner)
    default_max_tokens: int = 128
    audit_inputs: bool = False  # keep the raw body in audit rows (default: its sha256 only)


class Poison(Exception):
    """This message can never succeed as it is: dead-letter it with this reason."""


class GiveBack(Exception):
    """This message cannot be handled now (its job is not visible yet, the model is not ready):
    hand it back to the broker with this reason; past ``max_deliveries`` it is dead-lettered."""


class Skip(Exception):
    """There is nothing left to do for this message (e.g. its job already finished): acknowledge it."""


class Stopping(Exception):
    """The worker was told to stop while this operation was waiting to be retried."""


@dataclass(frozen=True)
class Work:
    """What one message asks for, as the inference service takes it."""

    id: str
    model: str
    inputs: list[Any]
    parameters: Any = None
    policy: Policy | None = None
    timeout_s: float | None = None
    context: Any = None  # the codec's own (e.g. the job row)
    traceparent: str | None = None  # the trace this work continues (a job's creation, a message's producer)


@dataclass
class Request:
    message: Message
    work: Work
    received_at: float
    sv: ServedVersion | None = None
    items: list[Any] = field(default_factory=list)
    futures: list[asyncio.Future] = field(default_factory=list)
    tries: int = 0


@dataclass
class InFlight:
    requests: list[Request] = field(default_factory=list)
    rows: list[tuple[Request, Row, int]] = field(default_factory=list)  # rows decided before the model (rejections)
    dead: list[tuple[Message, str]] = field(default_factory=list)
    dead_svs: list[ServedVersion | None] = field(default_factory=list)
    given_back: list[tuple[Message, str]] = field(default_factory=list)
    skipped: list[Message] = field(default_factory=list)
    audit: list[AuditEntry] = field(default_factory=list)

    def held(self) -> list[ServedVersion]:
        return [r.sv for r in self.requests + [r for r, _, _ in self.rows] if r.sv is not None]


@dataclass
class Counts:
    processed: int = 0
    dead_lettered: int = 0
    retried: int = 0

    def __str__(self) -> str:
        return f"processed {self.processed}, dead-lettered {self.dead_lettered}, retried {self.retried}"


class Codec(Protocol):
    """How a source's messages become work, and results become sink rows."""

    async def decode(self, message: Message) -> Work:
        """The work a message asks for; raises `Poison`, `GiveBack` or `Skip`."""
        ...

    def row(self, req: Request, results: list[Result]) -> Row: ...

    def rejected(self, req: Request, exc: MoorageError) -> Row | None:
        """A row recording that the model or the policy refused this work, or None to dead-letter it."""
        ...

    async def abandon(self, message: Message, reason: str) -> None:
        """The message is dead-lettered after too many deliveries; settle what it stood for."""
        ...


@dataclass(frozen=True)
class Envelope:
    """What a stream message asks for, before validation: its id, one model input, parameters."""

    id: str
    input: Any  # a text, or {"messages": [...]} for a chat generation
    parameters: Any = None
    traceparent: str | None = None  # W3C, from the message's headers or its body


def decode(message: Message, task: str, config: WorkerConfig) -> Envelope:
    """The message's envelope, or `Poison` with a reason a person can act on. The input and its
    parameters are validated by the inference service, with the same rules as over HTTP."""
    try:
        body = orjson.loads(message.body)
    except orjson.JSONDecodeError as exc:
        raise Poison(f"invalid_json: the body is not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise Poison(f"invalid_message: the body must be a JSON object, not {type(body).__name__}")
    msg_id = body.get("id", message.broker_id)
    if not isinstance(msg_id, str | int) or isinstance(msg_id, bool) or not str(msg_id) or len(str(msg_id)) > 512:
        raise Poison("invalid_id: 'id' must be a non-empty string or integer of at most 512 characters")
    text = body.get("text")
    messages = body.get("messages") if task == Task.GENERATE else None
    if messages is None and (not isinstance(text, str) or not text.strip()):
        raise Poison("missing_text: the message needs a non-empty string 'text'")
    size = len(text) if isinstance(text, str) else len(orjson.dumps(messages))
    if size > config.max_text_chars:
        raise Poison(f"text_too_long: {size} characters; the limit is {config.max_text_chars} (stream.max_text_chars)")
    traceparent = _traceparent(message, body) if tracing.is_enabled() else None
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise Poison("invalid_messages: 'messages' must be a non-empty list of {role, content} objects")
        return Envelope(str(msg_id), {"messages": messages}, body.get("parameters"), traceparent)
    return Envelope(str(msg_id), text, body.get("parameters"), traceparent)


def _traceparent(message: Message, body: dict) -> str | None:
    """A message's W3C trace context: its ``traceparent`` header, else a ``traceparent`` body field
    (for brokers or producers without headers); a malformed one is ignored."""
    value = message.headers.get("traceparent") or body.get("traceparent")
    return tracing.valid_traceparent(value if isinstance(value, str) else None)


class MessageCodec:
    """Stream messages ``{"id", "text" | "messages", "parameters"}`` for one model: one input each, a
    flat row per message; whatever the model or the policy refuses is dead-lettered."""

    def __init__(self, service: InferenceService, model: str, config: WorkerConfig, policy: Policy | None) -> None:
        self.service, self.model, self.config, self.policy = service, model, config, policy

    async def decode(self, message: Message) -> Work:
        task = self.service.pool.lookup(self.model).task
        envelope = decode(message, task, self.config)
        return Work(
            envelope.id,
            self.model,
            [envelope.input],
            envelope.parameters,
            self.policy,
            traceparent=envelope.traceparent,
        )

    def row(self, req: Request, results: list[Result]) -> Row:
        """The message's flat row; with a JSON Schema in its parameters, with its record's typed columns."""
        sv = req.sv
        assert sv is not None
        row = {
            "id": req.work.id,
            "model": sv.name,
            "version": sv.version,
            "task": str(sv.task),
            **encode_result(sv.task, results[0]),
            **timings(req),
            **engine_timings(sv.task, results[0]),
            "input_sha256": input_sha256(req.work.inputs[0]),
        }
        if results[0].cached:  # answered by the response cache: no engine timings
            row["cached"] = True
        return with_record(row, req.items[0], results[0]) if req.items else row

    def rejected(self, req: Request, exc: MoorageError) -> Row | None:
        return None

    async def abandon(self, message: Message, reason: str) -> None:
        return None


def timings(req: Request) -> Row:
    completed = time.time()
    return {
        "latency_ms": round((completed - req.received_at) * 1000, 3),
        "published_at": req.message.published_at,
        "received_at": req.received_at,
        "completed_at": completed,
        "attempts": req.message.attempts,
    }


def engine_timings(task: str, result: Result) -> Row:
    """From the engine's `Timings`: ``queue_ms``, the input's wait in the engine before its batch (or
    its generation row) started, and ``ttft_ms``, arrival in the engine to the first token (generation
    only). None where the engine noted no timings, or no first token."""
    t = result.timings
    if t is None:
        return {"queue_ms": None, "ttft_ms": None}
    ttft = None
    if task == Task.GENERATE and t.first_token is not None and t.first_token >= t.queued:
        ttft = round((t.first_token - t.queued) * 1000, 3)
    return {"queue_ms": round(max(0.0, t.started - t.queued) * 1000, 3), "ttft_ms": ttft}


def input_sha256(value: Any) -> str:
    """The sha256 (hex, `sha256_text`) of a stream message's input: of the text's UTF-8, or for a chat
    input of its ``messages`` as compact JSON with sorted keys. Equal inputs hash equal whatever the
    message id; the audit rows' ``input_sha256`` is of the whole message body (id included)."""
    if isinstance(value, str):
        return sha256_text(value)
    return sha256_text(orjson.dumps(value.get("messages") if isinstance(value, dict) else value,
                                    option=orjson.OPT_SORT_KEYS))  # fmt: skip


def _unprefixed(message: str) -> str:
    """A service message names the field as `inputs...`; a stream message has one input."""
    return message.removeprefix("inputs.0.").removeprefix("inputs: ").removeprefix("inputs.")


_OPERATOR_ONLY = {"model_error", "sink_error", "max_deliveries", "internal_error"}  # their text is for logs


def _error_reply(message: Message, reason: str) -> Row:
    """What a request/reply caller reads: the code, and the message only when it was written for them."""
    code, _, text = reason.partition(": ")
    if code in _OPERATOR_ONLY:
        text = "the message could not be processed; it is in the dead-letter destination"
    return {"id": message.broker_id, "error": {"code": code, "message": text or reason}}


def _first_error(futures: list[asyncio.Future]) -> BaseException | None:
    """The first error among resolved futures; a cancelled one means its engine stopped answering."""
    for f in futures:
        if f.cancelled():
            return DeadlineExceeded("the model did not answer within the deadline and a grace")
        if f.exception() is not None:
            return f.exception()
    return None


def _is_refusal(exc: BaseException) -> bool:
    """A 4xx that no retry changes (429 means: later)."""
    return isinstance(exc, MoorageError) and 400 <= exc.status < 500 and exc.status != 429


def _config_fields() -> list[str]:
    return [f.name for f in fields(WorkerConfig)]


class StreamWorker:
    """Consume `source`, run each message through the inference service, write to `sink`.

    Without a `codec`, messages are stream messages for `model` (`MessageCodec`)."""

    def __init__(
        self,
        source: Broker,
        sink: Sink,
        service: InferenceService,
        model: str,
        config: WorkerConfig,
        policy: Policy | None = None,
        audit: AuditWriter | None = None,
        codec: Codec | None = None,
        health: Health | None = None,
    ) -> None:
        self.source = source
        self.sink = sink
        self.service = service
        self.pool = service.pool
        self.model = model
        self.config = config
        self.codec: Codec = codec or MessageCodec(service, model, config, policy)
        self.audit = audit
        self.counts = Counts()
        self._queue: asyncio.Queue[InFlight | None] = asyncio.Queue(maxsize=max(1, config.max_in_flight))
        self._unacked: list[Message] = []  # written to a buffering sink, not durable yet
        self._held: dict[str, Message] = {}  # received and not settled with the broker yet, by broker id
        self._receiving: InFlight | None = None  # the batch being started, not queued yet
        self._abort = asyncio.Event()  # the grace period is over: stop retrying, hand back what is held
        self._source_label = f"{source.scheme}:{source.topic}"
        self.health = health or Health()
        self.health.watch(self._source_label)
        self._sink_label = type(sink).__name__
        self._last_log = time.monotonic()
        self._last_counts = Counts()

    def stage(self, settings: Settings, gray: Sequence[tuple[RequestGray, Settings]] = ()) -> Callable[[], None]:
        """Build the worker's hot settings (``stream.*``: batch size, waits, retries, backoff; the model's
        engines; its policy: limits and content filter) and return the swap that puts them in force;
        nothing changes if this raises. Messages already received finish with the values they started
        with. The other ``stream.*`` keys (the pipeline depth, receive timeout, lease heartbeat, stop grace)
        are read at start: a release changing them waits for a restart. Traffic splits (``routing``) are
        not the worker's: it serves the one reference its messages are for; neither is request-share
        `gray` (a message carries no API key): its messages follow the worker's own release."""
        from ..configcenter.schema import HOT_KEYS

        new = from_settings(WorkerConfig, settings.stream)
        hot = {f: getattr(new, f) for f in _config_fields() if f"/stream/{f}" in HOT_KEYS}
        config = replace(self.config, **hot)
        started = settings.stream.model_copy(update={"max_in_flight": self.config.max_in_flight})
        swap_pool = self.pool.stage(stream_pool_config(settings.model_copy(update={"stream": started})), {})
        max_tokens = settings.stream.default_max_tokens
        codec = self.codec if isinstance(self.codec, MessageCodec) else None
        policy = None
        if codec is not None and codec.policy is not None:
            policy = Policy.for_model(settings.security, parse_ref(self.model).name)

        def swap() -> None:
            swap_pool()
            self.service.default_max_tokens = max_tokens
            self.config = config
            if codec is not None:
                codec.config, codec.policy = config, policy

        return swap

    def reconfigure(self, settings: Settings) -> None:
        """`stage` and swap at once."""
        self.stage(settings)()

    async def run(self, stop: asyncio.Event) -> Counts:
        """Work until `stop` is set, then finish and acknowledge what was received, within
        ``stop_grace_s``; what is still unsettled then goes back to the broker."""
        receiver = asyncio.create_task(self._receive_loop(stop), name="moorage-stream-receive")
        writer = asyncio.create_task(self._write_loop(), name="moorage-stream-write")
        leases = asyncio.create_task(self._keep_leased(), name="moorage-stream-leases")
        work = asyncio.gather(receiver, writer)
        reserve_s = min(3.0, self.config.stop_grace_s / 3)  # to hand back, and for the caller to close
        hand_back_s = reserve_s / 2
        grace = asyncio.create_task(self._grace_over(stop, self.config.stop_grace_s - reserve_s))
        try:
            waiting: set[asyncio.Future[Any]] = {work, grace}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                work.result()  # a crash of either loop is the caller's to see
        finally:
            self._abort.set()
            for task in (receiver, writer, leases, grace):
                task.cancel()
            await asyncio.gather(receiver, writer, leases, grace, return_exceptions=True)
            if work.done() and not work.cancelled():
                work.exception()  # seen (a crash was raised above; a cancel at the deadline is expected)
            await self._hand_back(hand_back_s)
        log.info("%s: stopped; %s", self._source_label, self.counts)
        return self.counts

    async def _grace_over(self, stop: asyncio.Event, grace_s: float) -> None:
        await stop.wait()
        await asyncio.sleep(grace_s)
        log.warning("%s: still busy %.1fs after stop; handing back what is held", self._source_label, grace_s)

    async def _hand_back(self, timeout_s: float) -> None:
        """At stop, whatever is not settled goes back to the broker: rows a file sink still buffers
        are dropped (their messages are delivered again), and each message is retried. A broker that
        cannot be reached gets them back anyway, when their lease expires or the connection closes."""
        abandoned: list[InFlight | None] = [self._receiving]
        while not self._queue.empty():
            abandoned.append(self._queue.get_nowait())
        for batch in abandoned:  # never written: the model versions they hold are free again
            for sv in batch.held() if batch is not None else []:
                self.pool.release(sv)
        self._receiving = None
        self.sink.discard()
        self._unacked = []
        held = [m for m in self._held.values() if not self.source.is_stale(m)]
        self._held.clear()
        if not held:
            return
        log.warning("%s: %d unsettled messages go back to the broker", self._source_label, len(held))
        try:
            await asyncio.wait_for(self.source.retry(held, "stopped: the worker stopped first", 0.0), timeout_s)
        except Exception as exc:  # unreachable: the broker redelivers them on its own
            log.warning("%s: could not hand back %d messages (%s); the broker redelivers them", self._source_label,
                        len(held), f"{type(exc).__name__}: {exc}".rstrip(": "))  # fmt: skip

    # -- receive side ---------------------------------------------------------------------------
    async def _receive_loop(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                messages = await self._retrying(
                    "receive",
                    lambda: self.source.receive(self.config.batch_size, self.config.receive_timeout_s),
                    until=stop,
                    max_delay=self.config.reconnect_backoff_s,
                )
                messages = self._hold(messages)
                if not messages:
                    continue
                metrics.STREAM_BATCH_SIZE.labels(self._source_label).observe(len(messages))
                self._receiving = InFlight()  # the writer's once queued; run() releases it if abandoned
                await self._start(self._receiving, messages)
                await self._queue.put(self._receiving)
                self._receiving = None
        except Stopping:
            pass
        await self._queue.put(None)  # the writer finishes what was received (a cancel ends both instead)

    def _hold(self, messages: list[Message]) -> list[Message]:
        """Track what was received until it is settled; a message this worker already holds (its
        lease lapsed during an outage and it claimed it again) is not started twice."""
        fresh = []
        for m in messages:
            held = self._held.get(m.broker_id)
            if held is not None and held.handle == m.handle and not self.source.is_stale(held):
                continue
            self._held[m.broker_id] = m
            fresh.append(m)
        return fresh

    def _without_stale(self, done: list[tuple[Request, Row, int]]) -> list[tuple[Request, Row, int]]:
        """Rows of deliveries that went stale meanwhile (the broker queued them again: their new
        delivery writes them) are not written now, which would write each of them twice."""
        stale = [r.message for r, _, _ in done if self.source.is_stale(r.message)]
        if not stale:
            return done
        log.info("%s: %d results not written: their deliveries went stale and come again", self._source_label,
                 len(stale))  # fmt: skip
        self._settled(stale)
        return [d for d in done if not self.source.is_stale(d[0].message)]

    def _settled(self, messages: list[Message]) -> None:
        for m in messages:
            if self._held.get(m.broker_id) is m:
                del self._held[m.broker_id]

    async def _start(self, batch: InFlight, messages: list[Message]) -> None:
        now = time.time()
        for m in messages:
            try:
                await self._admit(batch, m, now)
            except Exception:  # a bug, or a store that failed: this message comes back, the worker goes on
                log.exception("%s: message %s could not be started", self._source_label, m.broker_id)
                batch.given_back.append((m, "internal_error: the message could not be started"))

    async def _admit(self, batch: InFlight, m: Message, now: float) -> None:
        """Decode one message and submit its work; or file it as dead, skipped or handed back."""
        if m.attempts > self.source.max_deliveries:
            reason = f"max_deliveries: delivered {m.attempts} times (max_deliveries={self.source.max_deliveries})"
            reason += f"; last error: {m.last_error}" if m.last_error else ""
            await self.codec.abandon(m, reason)
            self._dead(batch, m, reason)
            return
        try:
            work = await self.codec.decode(m)
        except Poison as exc:
            self._dead(batch, m, str(exc))
            return
        except Skip:
            batch.skipped.append(m)
            return
        except GiveBack as exc:
            batch.given_back.append((m, str(exc)))
            return
        except MoorageError as exc:  # the model is not ready, the catalog is down: later
            batch.given_back.append((m, f"{exc.code}: {exc.message}"))
            return
        req = Request(m, work, now)
        try:
            req.sv = self.pool.acquire(work.model)
            call = self.service.prepare(req.sv.task, work.inputs, work.parameters, policy=work.policy)
            req.items = call.items
            self._submit(req)
        except BaseException as exc:
            if req.sv is not None:
                self.pool.release(req.sv)
                req.sv = None
            if not isinstance(exc, MoorageError):
                raise
            if _is_refusal(exc) and not isinstance(exc, ModelNotFound):
                self._refused(batch, req, exc)  # invalid parameters, refused by the policy, ...
            else:  # not ready, or not served by this process: later, or by another replica
                batch.given_back.append((m, f"{exc.code}: {exc.message}"))
            return
        batch.requests.append(req)

    def _refused(self, batch: InFlight, req: Request, exc: MoorageError) -> None:
        """The codec records the refusal as a row, or it is dead-lettered with its code."""
        row = self.codec.rejected(req, exc)
        if row is not None:
            batch.rows.append((req, row, exc.status))
            return
        self._dead(batch, req.message, f"{exc.code}: {_unprefixed(exc.message)}", exc.status, req.sv)

    def _dead(
        self, batch: InFlight, message: Message, reason: str, status: int = 422, sv: ServedVersion | None = None
    ) -> None:
        batch.dead.append((message, reason))
        batch.dead_svs.append(sv)
        self._audited(batch, message, status, sv, error=reason.partition(":")[0])

    def _audited(
        self,
        batch: InFlight,
        message: Message,
        status: int,
        sv: ServedVersion | None,
        latency_ms: float = 0.0,
        **detail,
    ) -> None:
        if self.audit is None:
            return
        body = bytes(message.body)
        sv = sv or self._default_version()
        task = sv.task if sv is not None else "unknown"
        batch.audit.append(
            AuditEntry(
                key_id=f"stream:{self.source.consumer}",
                action=f"stream.{task}",
                status=status,
                model=sv.name if sv is not None else self.model,
                version=sv.version if sv is not None else None,
                latency_ms=latency_ms,
                input_sha256=sha256_text(body),
                input_text=body[:MAX_AUDIT_TEXT].decode("utf-8", "replace") if self.config.audit_inputs else None,
                detail={"source": self._source_label, "message": message.broker_id, **detail},
            )
        )

    def _default_version(self) -> ServedVersion | None:
        """The version the worker's model is served as (for a message refused before the model)."""
        try:
            return self.pool.lookup(self.model) if self.model else None
        except MoorageError:
            return None

    def _timeout(self, req: Request) -> float:
        return req.work.timeout_s or self.config.item_timeout_s

    def _submit(self, req: Request) -> None:
        req.tries += 1
        assert req.sv is not None
        loop = asyncio.get_running_loop()
        futures = []
        for item in req.items:
            try:
                futures.append(self.service.submit(req.sv, item, self._timeout(req), req.work.policy))
            except Exception as exc:  # e.g. the queue is full: answer through the future like a batch error
                failed = loop.create_future()
                failed.set_exception(exc)
                futures.append(failed)
        req.futures = futures
        self.service.observe(req.sv, req.items, futures, req.work.traceparent)  # with tracing on: its span

    # -- write side -----------------------------------------------------------------------------
    async def _write_loop(self) -> None:
        try:
            await self._write_batches()
        except Stopping:  # the grace period ended during a retry: run() hands back what is held
            pass

    async def _write_batches(self) -> None:
        while True:
            try:
                batch = await asyncio.wait_for(self._queue.get(), timeout=0.2)
            except TimeoutError:
                if self.sink.flush_due():
                    await self._flush()
                self._maybe_log()
                continue
            if batch is None:
                await self._flush()
                return
            try:
                await self._finish(batch)
            finally:
                for sv in batch.held():
                    self.pool.release(sv)
            self._maybe_log()

    async def _finish(self, batch: InFlight) -> None:
        await self._settle(batch)
        if self.audit is not None and batch.audit:
            await self.audit.record(*batch.audit)

    async def _settle(self, batch: InFlight) -> None:
        done, failed = await self._results(batch)
        if batch.dead:
            await self._retrying(
                "dead-letter", lambda: self.source.dead_letter(batch.dead), max_delay=self.config.reconnect_backoff_s
            )
            self._settled([m for m, _ in batch.dead])
            self._count("dead_lettered", batch.dead_svs)
            await self._reply([(m, _error_reply(m, reason)) for m, reason in batch.dead])
        give_back: list[tuple[Message, str, ServedVersion | None]] = [(m, why, None) for m, why in batch.given_back]
        give_back += [(r.message, why, r.sv) for r, why in failed]
        for reason in dict.fromkeys(why for _, why, _ in give_back):  # one call per reason
            again = [(m, sv) for m, why, sv in give_back if why == reason]
            await self._give_back([m for m, _ in again], reason)
            self._count("retried", [sv for _, sv in again])
        self._unacked.extend(batch.skipped)
        done = self._without_stale(done)
        if not done:
            if batch.skipped:
                await self._flush()
            return
        rows = [row for _, row, _ in done]
        started = time.perf_counter()
        try:
            await self._retrying("sink write", lambda: self.sink.write(rows), give_up=self._sink_refuses)
        except Stopping:
            raise
        except Exception as exc:  # the sink refuses this batch (not an outage): it goes back, with the buffer
            await self._sink_refused(exc, [r.message for r, _, _ in done])
            self._count("retried", [r.sv for r, _, _ in done])
            return
        await self._reply([(r.message, row) for r, row, _ in done])
        for r, row, status in done:
            filtered = {"filtered": True} if row.get("filtered") else {}
            self._audited(batch, r.message, status, r.sv, row.get("latency_ms", 0.0), id=row["id"], **filtered)
        self._unacked.extend(r.message for r, _, _ in done)
        if self.sink.pending == 0 or self.sink.flush_due():
            await self._flush()
        metrics.STREAM_WRITE_SECONDS.labels(self._sink_label).observe(time.perf_counter() - started)
        self._count("processed", [r.sv for r, _, _ in done])

    async def _keep_leased(self) -> None:
        """Renew the lease of every message held, so that no other consumer gets it while it waits for
        the model (a long generation), in the queue, for a sink that is down, or in a file sink's
        buffer: each outlives a broker's visibility timeout."""
        while True:
            await asyncio.sleep(self.config.lease_heartbeat_s)
            held = [m for m in self._held.values() if not self.source.is_stale(m)]
            if not held:
                continue
            try:
                await self.source.extend(held)
            except Exception as exc:  # a missed renewal only risks a second delivery
                log.warning("%s: could not renew leases: %s", self._source_label, exc)

    async def _give_back(self, messages: list[Message], reason: str) -> None:
        await self._retrying(
            "retry", lambda: self.source.retry(messages, reason), max_delay=self.config.reconnect_backoff_s
        )
        self._settled(messages)

    def _sink_refuses(self, exc: Exception, failures: int) -> bool:
        """An outage is waited out; an error that is not one ends after ``sink_retries`` attempts."""
        return not self.sink.is_transient(exc) and failures >= self.config.sink_retries

    async def _sink_refused(self, exc: Exception, messages: list[Message]) -> None:
        """Rows the sink buffered are dropped with the failed batch, and their messages go back to the
        broker with it: nothing that was handed back is written later as well."""
        self.sink.discard()
        back, self._unacked = messages + self._unacked, []
        reason = f"sink_error: {type(exc).__name__}: {exc}"
        log.error("%s: the sink refused a batch, %d messages go back to the broker: %s", self._sink_label,
                  len(back), exc)  # fmt: skip
        await self._give_back(back, reason)

    async def _results(self, batch: InFlight) -> tuple[list[tuple[Request, Row, int]], list[tuple[Request, str]]]:
        """Rows of what succeeded (and of refusals a codec records); other refusals join the dead
        letters; other errors are retried here, then handed back to the broker."""
        done = list(batch.rows)
        failed: list[tuple[Request, str]] = []
        pending = list(batch.requests)
        while pending:
            await self.service.wait_all([(r.sv, r.futures, self._timeout(r)) for r in pending if r.sv is not None])
            again = []
            for req in pending:
                exc = _first_error(req.futures)
                if exc is None:
                    done.append((req, self.codec.row(req, [f.result() for f in req.futures]), 200))
                elif _is_refusal(exc):
                    assert isinstance(exc, MoorageError)
                    row = self.codec.rejected(req, exc)
                    if row is None:
                        self._dead(batch, req.message, f"{exc.code}: {exc.message}", exc.status, req.sv)
                    else:
                        done.append((req, row, exc.status))
                elif req.tries <= self.config.model_retries:
                    again.append(req)
                else:
                    failed.append((req, f"model_error: {type(exc).__name__}: {exc}"))
            if again:
                await asyncio.sleep(self._backoff(again[0].tries))
                for req in again:
                    self._submit(req)
            pending = again
        return done, failed

    async def _flush(self) -> None:
        """Make the sink durable, then acknowledge every message written so far."""
        try:
            await self._retrying("sink flush", self.sink.flush, give_up=self._sink_refuses)
        except Stopping:
            raise
        except Exception as exc:
            await self._sink_refused(exc, [])
            return
        if self._unacked:
            acked, self._unacked = self._unacked, []
            await self._retrying("ack", lambda: self.source.ack(acked), max_delay=self.config.reconnect_backoff_s)
            self._settled(acked)
            now = time.time()
            hist = metrics.STREAM_LATENCY.labels(self._source_label)
            for m in acked:
                if m.published_at:
                    hist.observe(max(0.0, now - m.published_at))

    async def _reply(self, answers: list[tuple[Message, Row]]) -> None:
        """Request/reply: answer messages that carry a reply_to (a lost reply is logged, not retried:
        the caller times out and may ask again)."""
        for m, row in answers:
            if m.reply_to:
                try:
                    await self.source.reply(m, orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY))
                except Exception as exc:
                    log.warning("reply to %s failed: %s", m.reply_to, exc)

    # -- helpers --------------------------------------------------------------------------------
    async def _retrying(
        self,
        what: str,
        call: Callable[[], Awaitable[T]],
        give_up: Callable[[Exception, int], bool] | None = None,
        until: asyncio.Event | None = None,
        max_delay: float | None = None,
    ) -> T:
        """`call()` until it succeeds, with exponential backoff (at most `max_delay`) between tries:
        a broker or sink restart is waited out. `give_up(exc, failures)` ends it with that error;
        `until` (default: the end of the grace period after stop) ends it with `Stopping`."""
        until = until or self._abort
        failures = 0
        while True:
            try:
                result = await call()
            except Exception as exc:
                failures += 1
                if give_up is not None and give_up(exc, failures):
                    self.health.recovered(what)  # refused, not stuck: the caller deals with it
                    raise
                if failures > 1:
                    self.health.failing(what, exc)
                delay = min(max_delay or self.config.max_backoff_s, self._backoff(failures))
                if failures & (failures - 1) == 0:  # attempts 1, 2, 4, 8, ...: an outage is a few lines
                    error = f"{type(exc).__name__}: {exc}".rstrip(": ")
                    log.warning("%s failed (attempt %d), retrying in %.1fs: %s", what, failures, delay, error)
                await self._pause(what, delay, until)
                continue
            if failures:
                self.health.recovered(what)
                log.info("%s: %s works again after %d failed attempts", self._source_label, what, failures)
            return result

    @staticmethod
    async def _pause(what: str, delay: float, until: asyncio.Event) -> None:
        if not until.is_set():
            try:
                await asyncio.wait_for(until.wait(), delay)
            except TimeoutError:
                return
        raise Stopping(f"stopped while retrying {what}")

    def _backoff(self, attempt: int) -> float:
        return min(self.config.max_backoff_s, self.config.backoff_s * 2 ** (attempt - 1))

    def _count(self, outcome: str, svs: list[ServedVersion | None]) -> None:
        """Count messages by outcome, labelled with the model version each went to (if any)."""
        setattr(self.counts, outcome, getattr(self.counts, outcome) + len(svs))
        by_labels: dict[tuple[str, str], int] = {}
        for sv in svs:
            sv = sv or self._default_version()
            labels = sv.labels if sv is not None else (self.model, "")
            by_labels[labels] = by_labels.get(labels, 0) + 1
        for labels, n in by_labels.items():
            metrics.STREAM_MESSAGES.labels(self._source_label, *labels, outcome).inc(n)

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log < self.config.log_interval_s:
            return
        rate = (self.counts.processed - self._last_counts.processed) / (now - self._last_log)
        self._last_log, self._last_counts = now, Counts(**vars(self.counts))
        self._log_task = asyncio.ensure_future(self._log_progress(rate))  # held: a bare task may be collected

    async def _log_progress(self, rate: float) -> None:
        try:
            lag = await self.source.lag()
        except Exception:  # lag is informational only
            lag = None
        if lag is not None:
            metrics.STREAM_LAG.labels(self._source_label).set(lag)
        log.info("%s: %s (%.1f msg/s), lag %s", self._source_label, self.counts, rate, "?" if lag is None else lag)
