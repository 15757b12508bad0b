"""The broker contract: publish, receive a batch, ack, retry later, dead-letter.

A URL names the backend and where to read or write:

    sqlite:///PATH/queue.db?topic=in          embedded default, safe across processes
    redis://127.0.0.1:6379/0?topic=in         Redis Streams, consumer groups
    amqp://guest:guest@127.0.0.1:5672/?topic=in   RabbitMQ quorum queue
    kafka://127.0.0.1:9092?topic=in           Kafka consumer groups

Query options shared by every backend: ``topic`` (default ``moorage``), ``group`` (consumers that
share the work, default ``moorage``), ``dlq`` (dead-letter destination, default ``TOPIC.dlq``),
``max_deliveries`` (after that many deliveries without success a message is dead-lettered, default
5) and ``consumer`` (this consumer's name, default host-pid). Backend options are documented on each
class.

Every message is delivered at least once: what is received and not acknowledged comes back after a
crash, a lost connection or an expired lease, with its delivery count raised.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from ...errors import BadRequest, MissingDependency, MoorageError

log = logging.getLogger(__name__)

SCHEMES = {
    "sqlite": ("sqlite", "SQLiteBroker"),
    "redis": ("redis", "RedisBroker"),
    "rediss": ("redis", "RedisBroker"),
    "amqp": ("rabbitmq", "RabbitMQBroker"),
    "amqps": ("rabbitmq", "RabbitMQBroker"),
    "kafka": ("kafka", "KafkaBroker"),
}


@dataclass
class Message:
    """One received message. `broker_id` is the broker's own id, stable across redeliveries."""

    broker_id: str
    body: bytes
    attempts: int = 1  # deliveries so far, this one included
    published_at: float | None = None
    headers: dict[str, str] = field(default_factory=dict)
    last_error: str | None = None  # why the previous delivery was retried, when the broker keeps it
    handle: Any = None  # what ack/retry/dead_letter need (backend specific)

    @property
    def reply_to(self) -> str | None:
        return self.headers.get("reply_to")

    @property
    def correlation_id(self) -> str | None:
        return self.headers.get("correlation_id")


@dataclass(frozen=True)
class DeadLetter:
    message_id: str
    body: bytes
    reason: str
    attempts: int
    topic: str
    at: float


class BrokerURL:
    """A broker URL split into the server address (query removed) and moorage's options."""

    COMMON = {"topic", "group", "dlq", "max_deliveries", "consumer"}

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise BadRequest(
                f"unknown broker URL {redact(url)!r}: use one of {', '.join(sorted(SCHEMES))}://...",
                code="invalid_broker_url",
            )
        self.url = url
        self.scheme = parts.scheme
        self.options = dict(parse_qsl(parts.query))
        self.server = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        self.netloc = parts.netloc
        self.path = parts.path
        self.topic = self.options.get("topic", "moorage")
        self.group = self.options.get("group", "moorage")
        self.dlq = self.options.get("dlq", f"{self.topic}.dlq")
        self.max_deliveries = self.int("max_deliveries", 5)
        self.consumer = self.options.get("consumer") or f"{socket.gethostname()}-{os.getpid()}"
        for name in (self.topic, self.group, self.dlq):
            if not name or len(name) > 200 or any(c.isspace() for c in name):
                raise BadRequest(f"invalid topic or group name {name!r} in {redact(url)!r}", code="invalid_broker_url")

    def int(self, key: str, default: int) -> int:
        return int(self.number(key, default))

    def number(self, key: str, default: float) -> float:
        raw = self.options.get(key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise BadRequest(f"broker option {key}={raw!r} is not a number", code="invalid_broker_url") from None
        if value < 0:
            raise BadRequest(f"broker option {key}={raw!r} must not be negative", code="invalid_broker_url")
        return value

    def with_topic(self, topic: str) -> BrokerURL:
        clone = BrokerURL.__new__(BrokerURL)
        clone.__dict__.update(self.__dict__)
        clone.topic, clone.dlq = topic, f"{topic}.dlq"
        return clone

    def __str__(self) -> str:
        return redact(self.url)


def redact(url: str) -> str:
    """The URL without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url


class BrokerUnavailable(MoorageError):
    """The broker server cannot be reached (a transient error: the worker retries with backoff)."""

    status = 503
    code = "broker_unavailable"


class BlockingCalls:
    """Runs a synchronous client's calls in threads, and closes the client only once none is running.

    Cancelling an ``await asyncio.to_thread(...)`` does not stop its thread: a receive cancelled at
    shutdown goes on polling, and closing the client under it makes C libraries (sqlite3, librdkafka)
    use freed memory and crash the process. ``close(fn)`` refuses new calls, waits for the running
    ones, then runs ``fn``; a call after that raises BrokerUnavailable.

    A call can block far longer than its caller's patience: a Kafka commit while the coordinator is
    unreachable waits out librdkafka's request timeouts, again and again. So calls run in daemon
    threads (one stuck there cannot hold the process at exit) and ``close`` waits at most
    ``close_wait_s``: after that the client is left to be closed by that thread once its calls
    return, and the worker stops on time."""

    def __init__(self, close_wait_s: float = 15.0) -> None:
        self.close_wait_s = close_wait_s
        self._cv = threading.Condition()
        self._running = 0
        self._closed = False

    def open(self) -> None:
        with self._cv:
            self._closed = False

    async def run(self, fn, *args):
        return await self._start(fn, *args)

    async def run_within(self, timeout_s: float, what: str, fn, *args):
        """``run``, but the caller waits at most ``timeout_s``, then gets BrokerUnavailable; the call
        goes on in its thread (and ``close`` waits for it as for any other)."""
        future = self._start(fn, *args)
        if not await _settled_within(future, timeout_s):
            raise BrokerUnavailable(f"{what} did not finish within {timeout_s:g} s")
        return future.result()

    def _start(self, fn, *args) -> asyncio.Future:
        return _in_daemon_thread(self._call, fn, *args, name=getattr(fn, "__name__", "call"))

    def _call(self, fn, *args):
        with self._cv:
            if self._closed:
                raise BrokerUnavailable("the broker connection is closed")
            self._running += 1
        try:
            return fn(*args)
        finally:
            with self._cv:
                self._running -= 1
                self._cv.notify_all()

    async def close(self, fn) -> None:
        if not await _settled_within(_in_daemon_thread(self._close, fn, name="close"), self.close_wait_s):
            log.warning("a broker call was still running %.0f s after close: the client closes when it returns",
                        self.close_wait_s)  # fmt: skip

    def _close(self, fn) -> None:
        with self._cv:
            self._closed = True
            self._cv.wait_for(lambda: self._running == 0)
        fn()


async def _settled_within(future: asyncio.Future, timeout_s: float) -> bool:
    """Whether a thread's future settles within ``timeout_s``; it is not cancelled (its thread goes
    on), and a late failure that nobody waits for any more is retrieved, not logged as lost."""
    await asyncio.wait({future}, timeout=timeout_s)
    if not future.done():
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return False
    return True


def _in_daemon_thread(fn, *args, name: str = "call") -> asyncio.Future:
    """``asyncio.to_thread`` in a daemon thread of its own: the default executor's threads are
    joined at exit, so one blocked in a client library would keep the process from ending."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()
    context = contextvars.copy_context()

    def settle(ok: bool, value) -> None:
        if not future.done():  # the caller may have been cancelled meanwhile
            (future.set_result if ok else future.set_exception)(value)

    def target() -> None:
        try:
            outcome = (True, context.run(fn, *args))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
            outcome = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is closed: nobody waits for this any more
            pass

    threading.Thread(target=target, name=f"broker-{name}", daemon=True).start()
    return future


ReplyHandler = Callable[[str | None, bytes], None]
"""Called with each reply's correlation id (None when it has none) and body."""


class ReplyInbox(ABC):
    """A caller's private destination for the replies to its own requests (request/reply).

    `address` goes into each request's ``reply_to`` header; the broker calls the inbox's handler
    for every reply that arrives. Close the inbox before its broker."""

    address: str

    @abstractmethod
    async def close(self) -> None:
        """Stop receiving replies and remove the destination when the broker does not."""


class Broker(ABC):
    """One connection to a broker, reading one topic as one consumer of one group."""

    scheme: ClassVar[str]
    supports_reply: ClassVar[bool] = True

    def __init__(self, url: BrokerURL) -> None:
        self.url = url
        self.topic = url.topic
        self.group = url.group
        self.dlq = url.dlq
        self.max_deliveries = url.max_deliveries
        self.consumer = url.consumer

    async def __aenter__(self) -> Broker:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:  # noqa: B027 - optional hook
        pass

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass

    @abstractmethod
    async def publish(self, bodies: Sequence[bytes], topic: str | None = None, headers: dict | None = None) -> None:
        """Append messages to `topic` (default: this broker's topic); durable when this returns."""

    @abstractmethod
    async def receive(self, max_messages: int, timeout_s: float) -> list[Message]:
        """Up to `max_messages`, waiting at most `timeout_s` for the first one."""

    @abstractmethod
    async def ack(self, messages: Sequence[Message]) -> None:
        """Done with these: never deliver them again."""

    async def extend(self, messages: Sequence[Message]) -> None:  # noqa: B027 - leases that do not expire
        """Work on these is still going: keep them from being delivered to anyone else. Brokers whose
        leases expire on a clock (SQLite's visibility timeout, Redis's claim idle time) renew them;
        RabbitMQ (unacked messages stay with their consumer) and Kafka (uncommitted offsets stay with
        their partition's owner) need nothing."""

    def is_stale(self, message: Message) -> bool:
        """Whether this delivery can no longer be settled: the connection it came on is gone, and the
        broker has already queued the message again (it comes back as a new delivery). Settling a stale
        delivery is a no-op, never an error."""
        return False

    @abstractmethod
    async def retry(self, messages: Sequence[Message], reason: str, delay_s: float = 1.0) -> None:
        """Deliver these again later (to this or another consumer); their delivery count grows."""

    @abstractmethod
    async def dead_letter(self, entries: Sequence[tuple[Message, str]]) -> None:
        """Move each message with its reason to the dead-letter destination, then ack it."""

    @abstractmethod
    async def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        """What the dead-letter destination holds (without consuming it)."""

    async def lag(self) -> int | None:
        """Messages of the topic not yet acknowledged by this group, when the broker can tell."""
        return None

    async def reply(self, message: Message, body: bytes) -> None:
        """Answer a request message (RPC): publish to its reply_to with its correlation id."""
        if message.reply_to:
            await self.publish([body], topic=message.reply_to, headers={"correlation_id": message.correlation_id or ""})

    async def open_replies(self, on_reply: ReplyHandler) -> ReplyInbox:
        """Open a reply inbox (the caller's side of request/reply); the broker must be connected."""
        raise BadRequest(
            f"request/reply needs a redis:// or amqp:// broker, not {self.scheme}://", code="rpc_unsupported"
        )


def open_broker(url: str | BrokerURL) -> Broker:
    """The broker for a URL (not connected yet: use ``async with``)."""
    import importlib

    parsed = url if isinstance(url, BrokerURL) else BrokerURL(url)
    module, cls = SCHEMES[parsed.scheme]
    try:
        backend = importlib.import_module(f".{module}", __package__)
    except ImportError as exc:
        raise MissingDependency(
            f"the {parsed.scheme} broker needs '{exc.name}': pip install 'moorage[streams]'"
        ) from None
    return getattr(backend, cls)(parsed)


def now() -> float:
    return time.time()
