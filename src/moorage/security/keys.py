"""API keys and roles.

A key reads ``moor_<id>_<secret>``. The id is public (listed, logged, audited); only the sha256 of
the secret is stored, and it is compared in constant time. Roles nest: an ``invoker`` calls the
models its patterns allow, an ``operator`` may also register, alias, roll back and reload them,
an ``admin`` may also manage keys, settings and the audit log.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from ..db import Catalog, CatalogUnavailable, as_utc, utcnow
from ..errors import BadRequest, Forbidden, NotFound, Unauthorized
from .keycache import KeyCache
from .tables import ApiKey

log = logging.getLogger("moorage.security")

ROLES = ("invoker", "operator", "admin")
PREFIX = "moor"
# What each role may do, beyond calling models (every role may call the models its patterns allow).
# subscribe_config: follow the config center's releases and report on them (what a server or stream
# worker's key needs; releases carry filters and limits, so not an invoker's). manage_config: edit drafts,
# publish, approve, roll back, promote and abandon config releases.
PERMISSIONS = {
    "invoker": frozenset({"invoke"}),
    "operator": frozenset({"invoke", "manage_models", "subscribe_config", "manage_config"}),
    "admin": frozenset(
        {"invoke", "manage_models", "subscribe_config", "manage_config", "manage_keys", "read_settings", "read_audit"}
    ),
}
_KEY_RE = re.compile(rf"^{PREFIX}_([0-9a-f]{{12}})_([A-Za-z0-9_-]{{20,128}})$")
_PATTERN_RE = re.compile(r"^[a-z0-9_.*?\[\]-]{1,64}$")


def claimed_key_id(token: str | None) -> str | None:
    """The id a presented token claims (for the audit of a refused call), if it has the key format."""
    match = _KEY_RE.fullmatch(token.strip()) if token else None
    return match.group(1) if match else None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's id, role, model patterns and rate limits."""

    key_id: str
    role: str
    models: tuple[str, ...] = ("*",)
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def can(self, permission: str) -> bool:
        return permission in PERMISSIONS[self.role]

    def require(self, permission: str) -> None:
        if not self.can(permission):
            raise Forbidden(f"key {self.key_id} (role {self.role}) may not {permission.replace('_', ' ')}")

    def may_use(self, model_name: str) -> bool:
        return any(fnmatch.fnmatchcase(model_name, p) for p in self.models)

    def require_model(self, model_name: str) -> None:
        if not self.may_use(model_name):
            raise Forbidden(f"key {self.key_id} may not use model {model_name!r}", code="model_not_allowed")


ANONYMOUS = Principal(key_id="anonymous", role="admin")  # auth off (local development only)


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    role: str
    models: tuple[str, ...]
    requests_per_minute: int | None
    tokens_per_minute: int | None
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    revoked_at: datetime | None

    @property
    def state(self) -> str:
        if self.revoked_at:
            return "revoked"
        if self.expires_at and self.expires_at <= utcnow():
            return "expired"
        return "active"

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["models"] = list(self.models)
        out["state"] = self.state
        for k in ("created_at", "expires_at", "revoked_at"):
            out[k] = out[k].isoformat() if out[k] else None
        return out


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(
        id=row.id,
        name=row.name,
        role=row.role,
        models=tuple(row.models),
        requests_per_minute=row.requests_per_minute,
        tokens_per_minute=row.tokens_per_minute,
        created_at=as_utc(row.created_at),
        created_by=row.created_by,
        expires_at=as_utc(row.expires_at) if row.expires_at else None,
        revoked_at=as_utc(row.revoked_at) if row.revoked_at else None,
    )


class KeyStore:
    """Keys in the catalog database.

    `authenticate` trusts a key's row for `cache_s` seconds, so a key revoked by another process
    stops working within that time (at once in this process). While the catalog cannot be reached,
    a key whose row was read in the last `stale_s` seconds keeps working from that row (a revoked or
    expired row stays refused); any other key is answered `CatalogUnavailable` (503), never 401: it
    may have been created meanwhile. After a failed read the catalog is asked again only every
    `retry_s`, and while one call reads a key the others use its last row, so an outage does not
    queue every call behind a connection attempt.
    """

    def __init__(
        self,
        catalog: Catalog,
        cache_s: float = 5.0,
        stale_s: float = 300.0,
        *,
        retry_s: float = 1.0,
        max_cached: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalog = catalog
        self.cache_s = cache_s
        self.retry_s = retry_s
        self._cache: KeyCache[ApiKey] = KeyCache(cache_s, stale_s, max_known=max_cached, max_unknown=max_cached)
        self._clock = clock
        self._retry_at = -math.inf  # after a failed read: the catalog is not asked again before this
        self._is_down = False
        self._reading: dict[str, int] = {}  # key ids being read now, and by how many calls
        self._lock = threading.Lock()

    def create(
        self,
        role: str,
        *,
        name: str = "",
        models: list[str] | tuple[str, ...] = ("*",),
        expires_at: datetime | None = None,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        created_by: str = "",
    ) -> tuple[KeyInfo, str]:
        """A new key; the plaintext is returned once and never stored."""
        if role not in ROLES:
            raise BadRequest(f"unknown role {role!r}: use one of {', '.join(ROLES)}", code="invalid_role")
        models = list(models) or ["*"]
        bad = [p for p in models if not _PATTERN_RE.fullmatch(p)]
        if bad:
            raise BadRequest(
                f"invalid model pattern {bad[0]!r}: use model names with * ? [] globs", code="invalid_pattern"
            )
        if expires_at is not None and as_utc(expires_at) <= utcnow():
            raise BadRequest("the expiry is in the past", code="invalid_expiry")
        for limit in (requests_per_minute, tokens_per_minute):
            if limit is not None and limit < 1:
                raise BadRequest("rate limits must be at least 1 per minute", code="invalid_limit")
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        row = ApiKey(
            id=key_id,
            name=name[:128],
            role=role,
            models=models,
            secret_sha256=_digest(secret),
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            created_by=created_by,
            created_at=utcnow(),
            expires_at=expires_at,
        )
        with self.catalog.session() as s:
            s.add(row)
        return _info(row), f"{PREFIX}_{key_id}_{secret}"

    def list(self, include_revoked: bool = False) -> list[KeyInfo]:
        with self.catalog.session() as s:
            rows = s.scalars(select(ApiKey).order_by(ApiKey.created_at)).all()
        infos = [_info(r) for r in rows]
        return [k for k in infos if include_revoked or k.state != "revoked"]

    def get(self, key_id: str) -> KeyInfo:
        with self.catalog.session() as s:
            row = s.get(ApiKey, key_id)
        if row is None:
            raise NotFound(f"no API key with id {key_id!r}", code="key_not_found")
        return _info(row)

    def revoke(self, key_id: str) -> KeyInfo:
        with self.catalog.session() as s:
            row = s.get(ApiKey, key_id)
            if row is None:
                raise NotFound(f"no API key with id {key_id!r}", code="key_not_found")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
        self._cache.remember(key_id, row, self._clock())  # refused at once here, even if the catalog goes down
        return _info(row)

    def count_active(self) -> int:
        return sum(1 for k in self.list() if k.state == "active")

    def needs_lookup(self, token: str | None) -> bool:
        """Whether `authenticate(token)` would query the database: callers on an event loop run only
        those in a thread."""
        key_id = claimed_key_id(token)
        if key_id is None:
            return False
        try:
            return not self._cached(key_id, self._clock())[0]
        except CatalogUnavailable:
            return False  # refused without a read

    def authenticate(self, token: str | None) -> Principal:
        """The principal of a presented key, or `Unauthorized` saying why (never which part was wrong)."""
        if not token:
            raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'", code="missing_api_key")
        match = _KEY_RE.fullmatch(token.strip())
        row = self._row(match.group(1)) if match else None
        # compare even when there is no row, so timing does not tell a known id from an unknown one
        expected = row.secret_sha256 if row is not None else "0" * 64
        presented = _digest(match.group(2)) if match else "1" * 64
        if row is None or not hmac.compare_digest(expected, presented):
            raise Unauthorized("the API key is not valid")
        if row.revoked_at is not None:
            raise Unauthorized(f"API key {row.id} was revoked", code="revoked_api_key")
        if row.expires_at is not None and as_utc(row.expires_at) <= utcnow():
            raise Unauthorized(f"API key {row.id} expired", code="expired_api_key")
        return Principal(
            key_id=row.id,
            role=row.role,
            models=tuple(row.models) or ("*",),
            requests_per_minute=row.requests_per_minute,
            tokens_per_minute=row.tokens_per_minute,
        )

    def _cached(self, key_id: str, now: float) -> tuple[bool, ApiKey | None]:
        """(True, row or None) when the cache answers without a read: a fresh row or unknown id, or
        the last row of a known key while the catalog has just failed or another call is reading
        that key (a slow catalog then holds up one call, not all of them)."""
        is_fresh, row = self._cache.fresh(key_id, now)
        if is_fresh:
            return True, row
        if now < self._retry_at:
            return True, self._stale(key_id, now)
        if key_id in self._reading:
            stale = self._cache.stale(key_id, now)
            if stale is not None:
                return True, stale[1]
        return False, None

    def _row(self, key_id: str) -> ApiKey | None:
        now = self._clock()
        is_cached, row = self._cached(key_id, now)
        if is_cached:
            return row
        with self._lock:
            self._reading[key_id] = self._reading.get(key_id, 0) + 1
        try:
            row = self._read(key_id)
        except CatalogUnavailable:
            self._retry_at = self._clock() + self.retry_s
            if not self._is_down:
                self._is_down = True
                log.warning("the catalog cannot be reached: known API keys are served from their last rows")
            return self._stale(key_id, now)
        finally:
            with self._lock:
                num_left = self._reading.pop(key_id) - 1
                if num_left:
                    self._reading[key_id] = num_left
        if self._is_down:
            self._is_down = False
            log.warning("the catalog answers again: API keys are read from it")
        self._retry_at = -math.inf
        self._cache.remember(key_id, row, now)
        return row

    def _read(self, key_id: str) -> ApiKey | None:
        with self.catalog.session() as s:
            return s.get(ApiKey, key_id)

    def _stale(self, key_id: str, now: float) -> ApiKey:
        stale = self._cache.stale(key_id, now)
        if stale is None:
            raise CatalogUnavailable()
        return stale[1]


def parse_expiry(text: str) -> datetime:
    """'30d', '12h', '90m' from now, or an ISO 8601 date/time (UTC if no zone)."""
    from datetime import timedelta

    m = re.fullmatch(r"(\d+)([dhm])", text.strip())
    if m:
        unit = {"d": "days", "h": "hours", "m": "minutes"}[m.group(2)]
        return utcnow() + timedelta(**{unit: int(m.group(1))})
    try:
        return as_utc(datetime.fromisoformat(text.strip()))
    except ValueError:
        raise BadRequest(
            f"invalid expiry {text!r}: use e.g. 30d, 12h, 90m or an ISO date such as 2027-01-31", code="invalid_expiry"
        ) from None
