"""Per-key rate limits: token buckets for requests and for tokens, refilled continuously.

A request takes one request token before it runs; tokens (input + output) are charged when the
response is done, so a bucket may go below zero and the key then waits (429 + Retry-After) until
it has refilled.

`RateLimiter` keeps the buckets in the process: with N server workers each enforces the whole
limit. `RedisRateLimiter` (``security.limits.redis_url``) keeps them in Redis, updated by one Lua
script per call (atomic, Redis's clock), so every worker and replica shares one budget per key. If
Redis cannot be reached the request is let through and a warning logged (failing open: a limiter
outage must not become an API outage).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..errors import MissingDependency, RateLimited

log = logging.getLogger("moorage.security")


class _Bucket:
    __slots__ = ("capacity", "level", "stamp")

    def __init__(self, capacity: float, now: float) -> None:
        self.capacity, self.level, self.stamp = capacity, capacity, now

    def refill(self, capacity: float, now: float) -> None:
        self.capacity = capacity
        self.level = min(capacity, self.level + (now - self.stamp) * capacity / 60.0)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until the bucket holds `amount`."""
        return max(0.0, (amount - self.level) * 60.0 / self.capacity)


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._lock = threading.Lock()

    def _bucket(self, key_id: str, kind: str, per_minute: int, now: float) -> _Bucket:
        bucket = self._buckets.get((key_id, kind))
        if bucket is None:
            bucket = self._buckets[(key_id, kind)] = _Bucket(per_minute, now)
        bucket.refill(per_minute, now)
        return bucket

    async def admit(self, key_id: str, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        """Take one request, or raise `RateLimited` with the seconds to wait."""
        with self._lock:
            now = self.clock()
            if tokens_per_minute:
                tokens = self._bucket(key_id, "tokens", tokens_per_minute, now)
                if tokens.level <= 0:
                    raise _limited(key_id, "tokens", tokens_per_minute, tokens.wait_for(1.0))
            if requests_per_minute:
                requests = self._bucket(key_id, "requests", requests_per_minute, now)
                if requests.level < 1:
                    raise _limited(key_id, "requests", requests_per_minute, requests.wait_for(1.0))
                requests.level -= 1

    async def charge_tokens(self, key_id: str, tokens_per_minute: int | None, tokens: int) -> None:
        if not tokens_per_minute or tokens <= 0:
            return
        with self._lock:
            self._bucket(key_id, "tokens", tokens_per_minute, self.clock()).level -= tokens

    async def close(self) -> None:
        pass


def _limited(key_id: str, kind: str, per_minute: int, wait_s: float) -> RateLimited:
    return RateLimited(f"key {key_id} used its {per_minute} {kind} per minute", retry_after=wait_s)


# KEYS: tokens bucket, requests bucket. ARGV: tokens/min, requests/min (0: no limit), tokens to charge
# (0: admit one request). Returns {0, ""} when admitted or charged, {1, wait_s} (tokens) or {2, wait_s}.
# A bucket is a hash {level, stamp}; it expires once it would be full again (no state for idle keys).
_BUCKET_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, cap)
  local v = redis.call('HMGET', key, 'level', 'stamp')
  if not v[1] then return cap end
  return math.min(cap, tonumber(v[1]) + (now - tonumber(v[2])) * cap / 60)
end
local function save(key, lvl, cap)
  redis.call('HSET', key, 'level', tostring(lvl), 'stamp', tostring(now))
  redis.call('EXPIRE', key, math.ceil((cap - lvl) * 60 / cap) + 1)
end
local tpm, rpm, charge = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if charge > 0 then
  if tpm > 0 then save(KEYS[1], level(KEYS[1], tpm) - charge, tpm) end
  return {0, ''}
end
if tpm > 0 then
  local lt = level(KEYS[1], tpm)
  if lt <= 0 then return {1, tostring((1 - lt) * 60 / tpm)} end
end
if rpm > 0 then
  local lr = level(KEYS[2], rpm)
  if lr < 1 then return {2, tostring((1 - lr) * 60 / rpm)} end
  save(KEYS[2], lr - 1, rpm)
end
return {0, ''}
"""


class RedisRateLimiter:
    """The same token buckets, shared through Redis by every process that points at it."""

    WARN_EVERY_S = 10.0

    def __init__(self, url: str, prefix: str = "moorage:ratelimit") -> None:
        try:
            import redis.asyncio as aredis
        except ImportError:
            raise MissingDependency("security.limits.redis_url needs: pip install 'moorage[streams]'") from None
        self._errors = (aredis.RedisError, OSError)
        self.client = aredis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.script = self.client.register_script(_BUCKET_SCRIPT)
        self.prefix = prefix
        self._warned_at = 0.0

    async def admit(self, key_id: str, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        if not (requests_per_minute or tokens_per_minute):
            return
        result = await self._run(key_id, tokens_per_minute or 0, requests_per_minute or 0, 0)
        if result and int(result[0]):
            kind, per_minute = (
                ("tokens", tokens_per_minute or 0) if int(result[0]) == 1 else ("requests", requests_per_minute or 0)
            )
            raise _limited(key_id, kind, per_minute, float(result[1]))

    async def charge_tokens(self, key_id: str, tokens_per_minute: int | None, tokens: int) -> None:
        if tokens_per_minute and tokens > 0:
            await self._run(key_id, tokens_per_minute, 0, tokens)

    async def _run(self, key_id: str, tpm: int, rpm: int, charge: int):
        keys = [f"{self.prefix}:{key_id}:tokens", f"{self.prefix}:{key_id}:requests"]
        try:
            return await self.script(keys=keys, args=[tpm, rpm, charge])
        except self._errors as exc:
            now = time.monotonic()
            if now - self._warned_at > self.WARN_EVERY_S:
                self._warned_at = now
                log.warning("rate limits not enforced: Redis unreachable (%s); requests are let through", exc)
            return None

    async def close(self) -> None:
        await self.client.aclose()


def rate_limiter(redis_url: str | None) -> RateLimiter | RedisRateLimiter:
    return RedisRateLimiter(redis_url) if redis_url else RateLimiter()
