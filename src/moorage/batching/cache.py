"""The response cache: a repeated deterministic request is answered without the model.

`InferenceService` consults it for every input of every edge (HTTP predict, the OpenAI routes,
jobs, stream workers), after the input side of the security policy and before the engine, and
fills it from the engine's result. What is deterministic: embed and classify always; generation
when greedy (temperature 0) or seeded. A sampled request without a seed is never looked up (it
counts as ``skip``).

The key is sha256 over canonical JSON of a format version, the model name, the resolved version
and its manifest digest (an alias move changes the key; two catalogs sharing one Redis never mix
their versions), the task, and the input as the model sees it: the text, or the prompt or chat
messages with their tools and every runtime parameter (max tokens, stop strings, seed, constraint,
logprobs). Entries hold the model's output before the output policy: a hit is screened by the
policy in force when it is served, exactly as a computed result is, so tightening a filter applies
to cached answers at once, and edges with different policies share entries safely. Token counts are
those of the computed answer, so usage and rate limits count a hit like any other answer.

Backends: ``memory`` (the default), one LRU per process bounded by entries, whose entries of a
version are dropped once no served reference points to it; ``redis``, one cache shared by every
process (entries expire after ``ttl_s``; Redis's own memory policy bounds it). A Redis that is
unreachable or failing never fails a request: the request runs without the cache, the failure is
counted (``moorage_response_cache_errors``) and logged once per outage, and Redis is tried again
after a short pause.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import orjson

from ..errors import MissingDependency
from ..observability import metrics
from ..runtime.base import Classification, GenerateInput, TokenLogprob, TopLogprob
from .contract import Result

if TYPE_CHECKING:
    from ..config import CacheSettings
    from .pool import ServedVersion

log = logging.getLogger(__name__)

FORMAT = 1  # of keys and entries: a change of either bumps it, so old entries are never misread
CACHED_FINISH = (None, "stop", "length")  # a complete answer (not one cut by a cancel or a failure)


def is_deterministic(item: Any) -> bool:
    """Whether the same input always gets the same answer: every embed/classify input; a generation
    when greedy or seeded."""
    if not isinstance(item, GenerateInput):
        return True
    return item.params.temperature == 0 or item.params.seed is not None


def request_key(sv: ServedVersion, item: Any) -> str:
    """sha256 (hex) over canonical JSON of everything that decides the answer to `item` on `sv`."""
    if isinstance(item, GenerateInput):
        request: Any = {"prompt": item.prompt, "messages": item.messages, "tools": item.tools, "params": item.params}
    else:
        request = {"text": item}
    data = {
        "format": FORMAT,
        "model": sv.name,
        "version": sv.version,
        "manifest": sv.info.manifest_sha256,
        "task": str(sv.task),
        "request": request,
    }
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


# -- entries: a Result as bytes and back (JSON: nothing that a shared store holds is ever executed) --
_OWN_FIELDS = frozenset({"output", "logprobs", "timings", "cached", "filtered"})  # encoded apart, or not kept


def encode_entry(result: Result) -> bytes:
    """A result as JSON: its output and logprobs in their own shape, every other field (token counts,
    finish reason, ...) as it is. The timings are the computation's, and the output is the model's,
    before any filter, so neither is kept."""
    entry = {f.name: getattr(result, f.name) for f in fields(result) if f.name not in _OWN_FIELDS}
    entry["output"] = _encode_output(result.output)
    entry["logprobs"] = None if result.logprobs is None else [_encode_logprob(t) for t in result.logprobs]
    return orjson.dumps(entry)


def decode_entry(data: bytes) -> Result:
    """The result `encode_entry` stored, marked cached (TypeError/KeyError/ValueError: not one)."""
    entry = orjson.loads(data)
    output, logprobs = _decode_output(entry.pop("output")), entry.pop("logprobs")
    logprobs = None if logprobs is None else tuple(_decode_logprob(t) for t in logprobs)
    return Result(output, **entry, logprobs=logprobs, cached=True)


def _encode_output(output: Any) -> dict[str, Any]:
    if isinstance(output, str):
        return {"text": output}
    if isinstance(output, Classification):
        return {"label": output.label, "score": output.score, "scores": output.scores}
    if isinstance(output, np.ndarray):  # bit for bit: the same vector as the model's
        return {"array": base64.b64encode(output.tobytes()).decode(), "dtype": str(output.dtype), "shape": output.shape}
    return {"value": output}  # a list of floats, ...: as JSON keeps it


def _decode_output(value: dict[str, Any]) -> Any:
    if "text" in value:
        return value["text"]
    if "label" in value:
        return Classification(value["label"], value["score"], value["scores"])
    if "array" in value:
        raw = base64.b64decode(value["array"])
        return np.frombuffer(raw, dtype=value["dtype"]).reshape(value["shape"]).copy()
    return value["value"]


def _encode_logprob(t: TokenLogprob) -> list[Any]:
    return [t.token_id, t.token, t.logprob, [[a.token_id, a.token, a.logprob] for a in t.top]]


def _decode_logprob(value: list[Any]) -> TokenLogprob:
    token_id, token, logprob, top = value
    return TokenLogprob(token_id, token, logprob, tuple(TopLogprob(*a) for a in top))


# -- backends -------------------------------------------------------------------------------------
class Backend(Protocol):
    name: str

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, data: bytes) -> None: ...

    def retain(self, live: set[tuple[str, int]]) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class _Entry:
    model: str
    version: int
    data: bytes
    expires_at: float


class MemoryBackend:
    """An LRU of at most `max_entries` entries in this process; entries expire after `ttl_s`."""

    name = "memory"

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()  # an edge may call from another thread's event loop

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.expires_at <= self.clock():
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            return entry.data

    async def put(self, key: str, data: bytes) -> None:
        model, version = _key_version(key)
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = _Entry(model, version, data, self.clock() + self.ttl_s)
            _count(model, 1, len(data))
            while len(self._entries) > self.max_entries:
                self._drop(next(iter(self._entries)))

    def retain(self, live: set[tuple[str, int]]) -> None:
        """Drop the entries of every version not in `live` (no served reference points to it)."""
        with self._lock:
            stale = [k for k, e in self._entries.items() if (e.model, e.version) not in live]
            for key in stale:
                self._drop(key)

    def versions(self) -> set[tuple[str, int]]:
        with self._lock:
            return {(e.model, e.version) for e in self._entries.values()}

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        _count(entry.model, -1, -len(entry.data))

    async def close(self) -> None:
        with self._lock:
            for key in list(self._entries):
                self._drop(key)


def _count(model: str, entries: int, size: int) -> None:
    metrics.RESPONSE_CACHE_ENTRIES.labels(model).inc(entries)
    metrics.RESPONSE_CACHE_BYTES.labels(model).inc(size)


class RedisBackend:
    """Entries in Redis under ``moorage:response:MODEL:VERSION:SHA256`` (so an operator can find or
    delete a version's entries), each expiring `ttl_s` after it was stored. After a failure Redis is
    left alone for `retry_after_s`: an outage costs the requests no timeouts."""

    name = "redis"

    def __init__(self, url: str, ttl_s: float, retry_after_s: float = 5.0, timeout_s: float = 0.5) -> None:
        try:
            import redis.asyncio as aredis
        except ImportError:
            raise MissingDependency("cache.backend 'redis' needs: pip install 'moorage[streams]'") from None
        self._errors = (aredis.RedisError, OSError)
        self._client = aredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.retry_after_s = retry_after_s
        self._down_since: float | None = None  # when the current outage began (None: Redis works)
        self._retry_at = 0.0

    async def get(self, key: str) -> bytes | None:
        return await self._call(lambda: self._client.get(f"moorage:response:{key}"))

    async def put(self, key: str, data: bytes) -> None:
        await self._call(lambda: self._client.set(f"moorage:response:{key}", data, px=self.ttl_ms))

    async def _call(self, operation: Callable[[], Awaitable[Any]]) -> Any:
        if self._down_since is not None and time.monotonic() < self._retry_at:
            return None
        try:
            value = await operation()
        except self._errors as exc:
            metrics.RESPONSE_CACHE_ERRORS.labels(self.name).inc()
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("response cache: Redis fails (%s); requests run without the cache until it is back", exc)
            self._retry_at = time.monotonic() + self.retry_after_s
            return None
        if self._down_since is not None:
            log.info("response cache: Redis works again after %.1fs", time.monotonic() - self._down_since)
            self._down_since = None
        return value

    def retain(self, live: set[tuple[str, int]]) -> None:
        pass  # shared with other processes, which may serve that version still: entries expire instead

    async def close(self) -> None:
        await self._client.aclose()


def _key_version(key: str) -> tuple[str, int]:
    model, version, _ = key.rsplit(":", 2)
    return model, int(version)


# -- the cache the service consults ---------------------------------------------------------------
class ResponseCache:
    """Looks up and stores the results of deterministic inputs of the models it applies to."""

    def __init__(self, backend: Backend, models: Iterable[str] = ("*",), max_entry_bytes: int = 1 << 20) -> None:
        self.backend = backend
        self.models = frozenset(models)
        self.max_entry_bytes = max_entry_bytes
        self._live: frozenset[tuple[str, int]] = frozenset()

    @classmethod
    def from_settings(cls, settings: CacheSettings) -> ResponseCache | None:
        """The cache the settings describe; None when it is off."""
        if not settings.enabled:
            return None
        backend: Backend
        if settings.backend == "redis":
            assert settings.redis_url is not None  # validated with the settings
            backend = RedisBackend(settings.redis_url, settings.ttl_s)
        else:
            backend = MemoryBackend(settings.max_entries, settings.ttl_s)
        return cls(backend, settings.models, settings.max_entry_bytes)

    def applies(self, model: str) -> bool:
        return "*" in self.models or model in self.models

    def key(self, sv: ServedVersion, item: Any) -> str | None:
        """The entry key of `item` on `sv`, or None when it is not looked up (the model is not cached,
        or the input is sampled without a seed: counted as a skip)."""
        if not self.applies(sv.name):
            return None
        if not is_deterministic(item):
            metrics.RESPONSE_CACHE_REQUESTS.labels(sv.name, "skip").inc()
            return None
        try:
            digest = request_key(sv, item)
        except TypeError:  # a value canonical JSON cannot hold: computed, never cached
            return None
        return f"{sv.name}:{sv.version}:{digest}"

    async def get(self, sv: ServedVersion, key: str) -> Result | None:
        data = await self.backend.get(key)
        result = None
        if data is not None:
            try:
                result = decode_entry(data)
            except (ValueError, KeyError, TypeError) as exc:  # written by another moorage: a miss
                log.warning("response cache: an entry of %s does not decode (%s); computing it", sv.info.ref, exc)
        metrics.RESPONSE_CACHE_REQUESTS.labels(sv.name, "miss" if result is None else "hit").inc()
        return result

    async def put(self, key: str, result: Result) -> None:
        """Store a complete result (not one cut short by a cancel) no larger than the entry bound."""
        if result.finish_reason not in CACHED_FINISH or result.filtered:
            return
        try:
            data = encode_entry(replace(result, timings=None))
        except TypeError as exc:  # an output JSON cannot hold: answered, not cached
            log.warning("response cache: cannot store an output of %s: %s", key.rsplit(":", 1)[0], exc)
            return
        if len(data) <= self.max_entry_bytes:
            await self.backend.put(key, data)

    def follow(self, served: Iterable[ServedVersion]) -> None:
        """Drop what the backend holds of versions no longer served here (after an alias moved)."""
        live = frozenset((sv.name, sv.version) for sv in served)
        if live != self._live:
            self._live = live
            self.backend.retain(set(live))

    async def close(self) -> None:
        await self.backend.close()
