"""Traffic splits: which served reference a request for a bare model name goes to.

``routing.<model>.split`` gives each arm (an alias, a version or a reference) a share in percent. A
request is placed in one of 10,000 buckets and the arms own consecutive ranges of buckets, in the
order they are listed: with ``sticky`` set, the bucket is a hash of the request's key (its API key id,
or a header) and the model name, so one key always lands on the same arm, and a key inside an arm's
range stays inside it while that range grows (Unleash's sticky rollout: in at 10 %, still in at
30 %, as long as the growing arm keeps its place at either end). Without a key each request draws
its bucket at random.

The edge that knows the caller (the HTTP security middleware) sets `ROUTE_KEYS` for the request;
everything below reads it from the context, so the split applies wherever a bare name is resolved.

A gray release by request share (`RequestGray`) uses the same buckets: a request whose key falls in
its first ``percent`` of buckets runs in the release's lane (its policy and its splits), the others
on the main line; a request without the key stays on the main line.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from itertools import accumulate

from ..config import RouteSettings

BUCKETS = 10_000  # a weight of 1 % is 100 buckets; the hash spreads keys evenly over them


@dataclass(frozen=True)
class RouteKeys:
    """What a request can be kept sticky by: the caller's API key id and its headers (lower-case
    names, as ASGI gives them)."""

    api_key: str | None = None
    headers: Mapping[bytes, bytes] = field(default_factory=dict)
    lane: int | None = None  # the request-share gray release this request runs in (its number), if any

    def get(self, sticky: str) -> str | None:
        """The value of `sticky` ("api_key" or "header:NAME") for this request, if it has one."""
        if sticky == "api_key":
            return self.api_key
        value = self.headers.get(sticky.removeprefix("header:").lower().encode("latin-1"))
        return value.decode("latin-1") if value else None


ROUTE_KEYS: ContextVar[RouteKeys | None] = ContextVar("moorage_route_keys", default=None)


def bucket(key: str, name: str) -> int:
    """The bucket (0..9,999) of `key` for model `name`: the same key lands in independent buckets of
    different models, so one caller is not in every canary at once."""
    digest = hashlib.sha256(f"{name}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@dataclass(frozen=True)
class Router:
    """The split of one model: each arm's served reference and the upper bound of its bucket range."""

    name: str
    refs: tuple[str, ...]
    bounds: tuple[int, ...]  # cumulative, in buckets; an arm of weight 0 owns an empty range
    sticky: str | None = None

    @classmethod
    def from_settings(cls, name: str, route: RouteSettings) -> Router:
        refs = tuple(arm.ref(name) for arm in route.split)
        bounds = tuple(accumulate(arm.weight * BUCKETS // 100 for arm in route.split))
        return cls(name, refs, bounds, route.sticky)

    def arm(self, b: int) -> str:
        """The reference that owns bucket `b`."""
        return self.refs[bisect.bisect_right(self.bounds, b)]

    def pick(self, keys: RouteKeys | None = None) -> str:
        """The reference this request goes to: by its sticky key when it has one, else at random."""
        key = keys.get(self.sticky) if keys is not None and self.sticky else None
        return self.arm(bucket(key, self.name) if key is not None else random.randrange(BUCKETS))


def routers(routing: Mapping[str, RouteSettings]) -> dict[str, Router]:
    return {name: Router.from_settings(name, route) for name, route in routing.items()}


@dataclass(frozen=True)
class RequestGray:
    """A gray release served to a sticky share of requests: those whose `key` ("api_key" or
    "header:NAME") falls in the first `percent` of the buckets of its scope. A key in at 10 % stays in
    when a later gray release of the same scope takes 30 %."""

    number: int
    scope: str
    percent: int
    key: str

    def covers(self, keys: RouteKeys | None) -> bool:
        value = keys.get(self.key) if keys is not None else None
        return value is not None and bucket(value, self.scope) < self.percent * BUCKETS // 100


def lane_of(grays: Sequence[RequestGray], keys: RouteKeys | None) -> int | None:
    """The number of the first gray release that covers this request, or None: the main line."""
    return next((g.number for g in grays if g.covers(keys)), None)
