"""The security edge: who is calling (API key), may they (role, model pattern, rate limit), what
they sent (content filters, size limits) and a hash-chained audit row for every call.

`SecurityMiddleware` authenticates every request outside the open paths before any route runs
(default deny: a new route cannot be left open by mistake), takes a request from the key's rate
limit, hashes the body as it streams through, and after the response writes the audit row and
charges the tokens the route reported. Routes ask `principal(request)` for per-model rights.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from fastapi import Request

from ..batching.routing import ROUTE_KEYS, RequestGray, RouteKeys, lane_of
from ..config import SecuritySettings, Settings
from ..errors import MoorageError, Unauthorized
from ..observability import metrics
from ..refs import parse_ref
from ..registry import Registry
from ..security.audit import MAX_AUDIT_TEXT, AuditEntry, AuditLog, AuditWriter
from ..security.filters import Filters
from ..security.keys import ANONYMOUS, KeyStore, Principal, claimed_key_id
from ..security.limits import rate_limiter
from ..security.policy import Policy
from .edge import reject, track_status

if TYPE_CHECKING:
    from ..configcenter.releases import Effective

log = logging.getLogger("moorage.security")

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect"})


class Guard:
    """Everything the security edge needs, built once per app."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings: SecuritySettings = settings.security
        self.keys = KeyStore(registry.catalog, self.settings.key_cache_s, self.settings.key_stale_s)
        self.limiter = rate_limiter(self.settings.limits.redis_url)
        self.filters = Filters(self.settings.filters)
        self.grays: tuple[RequestGray, ...] = ()  # request-share gray releases, and the policy of each lane
        self._lanes: dict[int, tuple[SecuritySettings, Filters]] = {}
        self.audit = AuditLog(registry.catalog)
        self.writer = AuditWriter(self.audit, self.settings.audit_flush_ms / 1000) if self.settings.audit else None

    def stage(self, settings: Settings, gray: Sequence[tuple[RequestGray, Settings]] = ()) -> Callable[[], None]:
        """Build the hot part of `settings.security` and return the swap that puts it in force (nothing
        changes if this raises, e.g. on a rule that does not compile): rate limits, request limits and
        content filters. A request already past the guard keeps the policy it was given; each key's
        bucket keeps its level and refills at the new rate. Keys, audit and the Redis of shared buckets
        are read at start (a release changing them waits for a restart). `gray`: request-share gray
        releases and the settings of their lane, whose policy the requests in that lane get."""
        security, filters = self._hot(settings)
        lanes = {g.number: self._hot(lane) for g, lane in gray}
        grays = tuple(g for g, _ in gray)

        def swap() -> None:
            self.settings, self.filters, self.grays, self._lanes = security, filters, grays, lanes

        return swap

    def _hot(self, settings: Settings) -> tuple[SecuritySettings, Filters]:
        new = settings.security
        limits = new.limits.model_copy(update={"redis_url": self.settings.limits.redis_url})
        security = self.settings.model_copy(update={"limits": limits, "filters": new.filters})
        return security, Filters(security.filters)  # every rule compiled here, before anything changes

    def reconfigure(self, settings: Settings, gray: Sequence[tuple[RequestGray, Settings]] = ()) -> None:
        """`stage` and swap at once."""
        self.stage(settings, gray)()

    def in_force(self) -> tuple[SecuritySettings, Filters]:
        """The security settings and filters of this request: its gray lane's, else the main line's."""
        keys = ROUTE_KEYS.get()
        lane = self._lanes.get(keys.lane) if keys is not None and keys.lane is not None else None
        return lane or (self.settings, self.filters)

    def route_keys(self, p: Principal, headers: dict[bytes, bytes]) -> RouteKeys:
        """What this request is kept sticky by (splits, request-share gray), and the gray lane it runs in."""
        keys = RouteKeys(None if p is ANONYMOUS else p.key_id, headers)
        return replace(keys, lane=lane_of(self.grays, keys)) if self.grays else keys

    def is_open(self, path: str) -> bool:
        return path in OPEN_PATHS or (path == "/metrics" and not self.settings.metrics_auth)

    async def start(self) -> None:
        if not self.settings.auth:
            log.warning(
                "security.auth is false: every endpoint is open to anyone who reaches this server, with admin "
                "rights. Use this for local development only."
            )
        elif await asyncio.to_thread(self.keys.count_active) == 0:
            log.warning("no active API key: every request will get 401; create one with `moorage keys create`")
        if self.writer:
            await self.writer.start()

    async def stop(self) -> None:
        if self.writer:
            await self.writer.stop()
        await self.limiter.close()

    async def authenticate(self, headers: dict[bytes, bytes]) -> Principal:
        if not self.settings.auth:
            return ANONYMOUS
        token = _token(headers)
        if self.keys.needs_lookup(token):
            return await asyncio.to_thread(self.keys.authenticate, token)
        return self.keys.authenticate(token)  # a cached key: no database, no thread hop

    async def admit(self, p: Principal) -> None:
        limits = self.in_force()[0].limits
        rpm = p.requests_per_minute or limits.requests_per_minute
        await self.limiter.admit(p.key_id, rpm, p.tokens_per_minute or limits.tokens_per_minute)

    async def charge(self, p: Principal, tokens: int) -> None:
        tpm = p.tokens_per_minute or self.in_force()[0].limits.tokens_per_minute
        await self.limiter.charge_tokens(p.key_id, tpm, tokens)


def _token(headers: dict[bytes, bytes]) -> str | None:
    auth = headers.get(b"authorization", b"").decode("latin-1").strip()
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    api_key = headers.get(b"x-api-key")
    return api_key.decode("latin-1").strip() if api_key else None


def _claimed_id(headers: dict[bytes, bytes]) -> str:
    key_id = claimed_key_id(_token(headers))
    return f"unknown:{key_id}" if key_id else "none"


class SecurityMiddleware:
    def __init__(self, app, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.guard.is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers") or ())
        state = scope.setdefault("state", {})
        try:
            principal = await self.guard.authenticate(headers)
            state["principal"] = principal
            # what splits and gray releases keep this caller sticky by, for everything the request does
            ROUTE_KEYS.set(self.guard.route_keys(principal, headers))
            await self.guard.admit(principal)
        except MoorageError as exc:
            metrics.SECURITY_REJECTIONS.labels(exc.code).inc()
            await reject(scope, receive, send, exc)
            key_id = state["principal"].key_id if "principal" in state else _claimed_id(headers)
            await self._audit(scope, key_id, exc.status, started, "", None, detail={"error": exc.code})
            return
        digest, body = hashlib.sha256(), bytearray()
        keep_text = self.guard.settings.audit_inputs

        async def hashing_receive():
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                digest.update(chunk)
                if keep_text and len(body) < MAX_AUDIT_TEXT:
                    body.extend(chunk[: MAX_AUDIT_TEXT - len(body)])
            return message

        tracking_send, status = track_status(send)
        try:
            await self.app(scope, hashing_receive, tracking_send)
        finally:
            await self.guard.charge(principal, int(state.get("usage_tokens", 0)))
            if scope["path"] != "/metrics":
                text = body.decode("utf-8", "replace") if keep_text and body else None
                await self._audit(scope, principal.key_id, status[0], started, digest.hexdigest(), text)

    async def _audit(self, scope, key_id, status, started, input_sha, text, detail=None) -> None:
        writer = self.guard.writer
        if writer is None:
            return
        state = scope.get("state") or {}
        endpoint = scope.get("endpoint")
        action = state.get("audit_action") or (endpoint.__name__ if endpoint else f"{scope['method']} {scope['path']}")
        labels = state.get("labels")
        params = scope.get("path_params") or {}
        model = labels[0] if labels else state.get("audit_model") or params.get("name") or params.get("model") or ""
        version = labels[1] if labels else state.get("audit_version")
        entry = AuditEntry(
            key_id=key_id,
            action=action,
            status=status,
            model=str(model)[:128],
            version=int(str(version)) if str(version or "").isdigit() else None,
            latency_ms=(time.perf_counter() - started) * 1000,
            input_sha256=input_sha,
            input_text=text,
            detail=detail or state.get("audit_detail") or {},
        )
        admin = scope["path"].startswith(("/admin", "/v1/registry")) and scope["method"] != "GET"
        await writer.record(entry, now=admin)  # refusals are batched: a flood of bad keys is not a flood of commits


# ---- what routes call --------------------------------------------------------------------------
def guard_of(request: Request) -> Guard:
    return request.app.state.guard


def principal(request: Request) -> Principal:
    p = getattr(request.state, "principal", None)
    if p is None:  # only reachable if a route is served without the middleware
        raise Unauthorized("an API key is required", code="missing_api_key")
    return p


def policy_for(guard: Guard, name: str) -> Policy:
    settings, filters = guard.in_force()
    return Policy.for_model(settings, name, filters)


def request_gray(settings: Settings, effective: Effective | None) -> list[tuple[RequestGray, Settings]]:
    """The request-share gray releases of `effective`, each with the settings of its lane: its values
    merged over `settings` (the main line this process runs), validated like any release."""
    if effective is None or not effective.request_gray:
        return []
    from ..configcenter.schema import apply_values, validate_values

    return [
        (
            RequestGray(g["number"], g["scope"], g["percent"], g["key"]),
            apply_values(settings, validate_values(g["values"])),
        )
        for g in effective.request_gray
    ]


def authorize_model(request: Request, model: str) -> Policy:
    """Check the caller may use `model` (a reference); return the policy its call must follow."""
    name = parse_ref(model).name
    p = principal(request)
    p.require("invoke")
    p.require_model(name)
    request.state.audit_model = name
    return policy_for(guard_of(request), name)


def require(permission: str):
    """A route dependency: the caller's role must grant `permission`."""

    def dependency(request: Request) -> Principal:
        p = principal(request)
        p.require(permission)
        return p

    return dependency


def usage(request: Request, tokens: int) -> None:
    """Report the tokens a request used (input + output): charged to the key's tokens per minute."""
    request.state.usage_tokens = getattr(request.state, "usage_tokens", 0) + tokens
