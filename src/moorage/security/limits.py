"""Per-key rate limits: token buckets for requests and for tokens, refilled continuously.

A request takes one request token before it runs; tokens (input + output) are charged when the
response is done, so a bucket may go below zero and the key then waits (429 + Retry-After) until
it has refilled. Buckets live in the process: with N server workers each enforces the limit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..errors import RateLimited


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

    def admit(self, key_id: str, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        """Take one request, or raise `RateLimited` with the seconds to wait."""
        with self._lock:
            now = self.clock()
            if tokens_per_minute:
                tokens = self._bucket(key_id, "tokens", tokens_per_minute, now)
                if tokens.level <= 0:
                    raise RateLimited(
                        f"key {key_id} used its {tokens_per_minute} tokens per minute",
                        retry_after=tokens.wait_for(1.0),
                    )
            if requests_per_minute:
                requests = self._bucket(key_id, "requests", requests_per_minute, now)
                if requests.level < 1:
                    raise RateLimited(
                        f"key {key_id} used its {requests_per_minute} requests per minute",
                        retry_after=requests.wait_for(1.0),
                    )
                requests.level -= 1

    def charge_tokens(self, key_id: str, tokens_per_minute: int | None, tokens: int) -> None:
        if not tokens_per_minute or tokens <= 0:
            return
        with self._lock:
            self._bucket(key_id, "tokens", tokens_per_minute, self.clock()).level -= tokens
