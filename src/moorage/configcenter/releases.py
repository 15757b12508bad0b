"""Releases of the hot settings: drafts per scope, diffs, numbered immutable releases, approval,
rollback, gray releases, and the config each instance should run.

One save path: the HTTP API (``/v1/config/...``), the CLI (``moorage config ...``) and the console call
this `ConfigCenter`; every edit, publish, approval, rollback, promotion and abandon is a row in the
hash-chained audit log.

Scopes are ``global``, ``group:GROUP`` (``group:servers``, ``group:stream:NAME``) and ``model:NAME``
(only that model's ``/routing/NAME`` and ``/security/filters/NAME``). An instance runs the newest
published release of each scope that applies to it, merged in that order (global, its group, every
model scope); a gray release of a scope replaces the scope's main line on the instances it targets.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import Settings
from ..errors import BadRequest, Conflict, Forbidden, NotFound
from . import schema
from .schema import Change, InvalidConfig, check_scope

if TYPE_CHECKING:
    from ..registry import Registry
    from ..security.audit import AuditLog
    from .backends import Backend

STATES = ("pending_approval", "published", "gray", "promoted", "abandoned")


@dataclass(frozen=True)
class Instance:
    """One running process that follows the config center."""

    id: str  # unique per process, e.g. hostname-pid-random
    group: str  # "servers" or "stream:<worker name>"
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Release:
    """A numbered release of one scope. Its values never change; its state moves
    (pending_approval -> published | gray; gray -> promoted | abandoned)."""

    number: int
    scope: str  # "global", "model:<name>", "group:<group>"
    values: dict
    comment: str
    author: str
    created_at: str
    state: str  # see STATES
    approved_by: str | None = None
    rolled_back_to: int | None = None
    gray: dict | None = None  # {"labels": {...}} | {"percent": 30, "by": "instance"|"request", "key": ...}
    checksum: str = ""  # sha256 of the canonical values
    promoted_to: int | None = None  # a promoted gray release: the main-line release it became


@dataclass(frozen=True)
class Effective:
    """What one instance should run."""

    revision: int  # the config center's revision (grows with every publish/approve/rollback/gray change)
    values: dict  # merged: global, then its group, then model scopes (+ the gray releases targeting it)
    releases: tuple[int, ...]  # the release numbers that make it up
    checksum: str
    # gray releases by request share: [{"number", "scope", "percent", "key", "values"}]; each request whose
    # key's bucket falls under `percent` is served with `values` merged over the instance's own
    request_gray: tuple[dict, ...] = ()


def checksum(values: Any) -> str:
    """sha256 of the canonical JSON of `values` (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class GraySpec(BaseModel):
    """Whom a gray release targets: instances by label, or a sticky percentage of instances or of
    requests (a bucket from the hash of the instance id, or of the request's API key or a header)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: dict[str, str] | None = Field(None, min_length=1)
    percent: int | None = Field(None, ge=1, le=99)
    by: Literal["instance", "request"] = "instance"
    key: str | None = Field(None, description="by request: api_key or header:NAME")

    @model_validator(mode="after")
    def _one_target(self) -> GraySpec:
        if (self.labels is None) == (self.percent is None):
            raise ValueError("give labels or percent (not both)")
        if self.key is not None and not (self.key == "api_key" or self.key.startswith("header:") and len(self.key) > 7):
            raise ValueError("key: use api_key or header:NAME")
        if self.labels is not None and (self.by != "instance" or self.key is not None):
            raise ValueError("a gray release by labels targets instances: drop by and key")
        return self

    def as_dict(self) -> dict:
        if self.labels is not None:
            return {"labels": dict(self.labels)}
        if self.by == "request":
            return {"percent": self.percent, "by": "request", "key": self.key or "api_key"}
        return {"percent": self.percent, "by": "instance"}


def check_gray(gray: dict) -> dict:
    try:
        return GraySpec.model_validate(gray).as_dict()
    except ValidationError as exc:
        errors = [{"pointer": schema.pointer(("gray", *e["loc"])), "message": e["msg"]} for e in exc.errors()]
        raise InvalidConfig(errors) from None


def bucket(scope: str, key: str) -> int:
    """A stable bucket 0..9999 of `key` for gray releases of `scope`: a key in at 30 % stays in at 50 %."""
    return int(hashlib.sha256(f"{scope}|{key}".encode()).hexdigest()[:8], 16) % 10_000


def targets(gray: dict, scope: str, instance: Instance) -> bool:
    """Whether a gray release (by labels or by instance percentage) covers `instance`."""
    if "labels" in gray:
        return all(instance.labels.get(k) == v for k, v in gray["labels"].items())
    return gray.get("by") == "instance" and bucket(scope, instance.id) < gray["percent"] * 100


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class ConfigCenter:
    """Drafts, releases and what each instance runs, over one `Backend`; audit rows go to `audit`."""

    def __init__(
        self,
        backend: Backend,
        settings: Settings,
        *,
        registry: Registry | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self._registry = registry
        self._audit = audit if settings.security.audit else None
        self._owned: list[Any] = []  # catalogs opened here, disposed by close()
        self._owns_registry = False

    @classmethod
    def from_settings(cls, settings: Settings, *, registry: Registry | None = None) -> ConfigCenter:
        """The backend `settings.config.backend` names; audit rows go to the catalog either way."""
        from ..db import Catalog
        from ..security.audit import AuditLog
        from .backends import CatalogBackend, EtcdBackend

        catalog = (
            registry.catalog
            if registry is not None
            else Catalog(settings.catalog_url, settings.registry.lock_timeout_s)
        )
        backend: Backend
        if settings.config.backend == "etcd":
            backend = EtcdBackend(settings.config.etcd_url, settings.config.etcd_prefix)
        else:
            backend = CatalogBackend(catalog)
        center = cls(backend, settings, registry=registry, audit=AuditLog(catalog))
        if registry is None:
            center._owned.append(catalog)
        return center

    def close(self) -> None:
        if self.settings.config.backend == "etcd":
            self.backend.close()
        for owned in self._owned:
            owned.dispose()
        if self._owns_registry and self._registry is not None:
            self._registry.close()

    @property
    def registry(self) -> Registry:
        """The registry split targets are checked against (opened on first use)."""
        if self._registry is None:
            from ..registry import Registry

            self._registry = Registry.from_settings(self.settings)
            self._owns_registry = True
        return self._registry

    def _validate(self, values: dict, scope: str) -> dict:
        needs_registry = isinstance(values, dict) and bool(values.get("routing"))
        return schema.validate_values(values, registry=self.registry if needs_registry else None, scope=scope)

    def _releases(self) -> list[Release]:
        return [Release(**r) for r in self.backend.releases()]

    def _add(self, build: Callable[[int], Release]) -> Release:
        return Release(**self.backend.add_release(lambda n: asdict(build(n))))

    def _update(self, number: int, change: Callable[[Release], Release]) -> Release:
        return Release(**self.backend.update_release(number, lambda r: asdict(change(Release(**r)))))

    def _record(self, action: str, author: str, **detail: Any) -> None:
        if self._audit is None:
            return
        from ..security.audit import AuditEntry

        self._audit.append([AuditEntry(key_id=author, action=f"config.{action}", status=200, detail=detail)])

    # ---- drafts -----------------------------------------------------------------------------------------
    def draft(self, scope: str) -> dict:
        """The scope's draft; with none saved, the values of its newest published release ({} if none)."""
        saved = self.backend.get_draft(check_scope(scope))
        if saved is not None:
            return saved
        main = _main_line(self._releases(), scope)
        return dict(main.values) if main else {}

    def edit_draft(self, scope: str, values: dict, *, author: str) -> dict:
        """Replace the scope's draft; validated on save (`InvalidConfig` names each bad field)."""
        self._validate(values, check_scope(scope))
        changes = schema.diff(self.draft(scope), values)
        self.backend.put_draft(scope, values, author)
        self._record("edit", author, scope=scope, checksum=checksum(values), changed=[c.pointer for c in changes])
        return values

    def diff(self, scope: str) -> list[Change]:
        """The draft against the scope's newest published release."""
        main = _main_line(self._releases(), check_scope(scope))
        return schema.diff(main.values if main else {}, self.draft(scope))

    # ---- releases ---------------------------------------------------------------------------------------
    def publish(self, scope: str, *, author: str, comment: str = "", gray: dict | None = None) -> Release:
        """The scope's draft as a new release (pending approval when ``config.require_approval``)."""
        values = self._validate(self.draft(check_scope(scope)), scope)
        spec = check_gray(gray) if gray is not None else None
        releases = self._releases()
        main = _main_line(releases, scope)
        if spec is None and (main.values if main else {}) == values:
            raise Conflict(f"nothing to publish: the draft of {scope} equals its current release", code="no_changes")
        active = _gray_of(releases, scope)
        if spec is not None and active is not None:
            raise Conflict(
                f"gray release {active.number} of {scope} is still running: promote or abandon it first",
                code="gray_active",
            )
        state = "pending_approval" if self.settings.config.require_approval else ("gray" if spec else "published")
        release = self._add(
            lambda n: Release(n, scope, values, comment, author, _now(), state, gray=spec, checksum=checksum(values))
        )
        self._record("publish", author, scope=scope, release=release.number, state=state, checksum=release.checksum,
                     gray=spec, comment=comment)  # fmt: skip
        return release

    def approve(self, number: int, *, approver: str) -> Release:
        """Make a pending release effective; its author's own key is refused (403 ``self_approval``)."""

        def change(r: Release) -> Release:
            if r.state != "pending_approval":
                raise Conflict(f"release {number} is {r.state}, not pending approval", code="not_pending")
            if r.author == approver:
                raise Forbidden(f"release {number} was published by {approver}: another key must approve it",
                                code="self_approval")  # fmt: skip
            return replace(r, state="gray" if r.gray else "published", approved_by=approver)

        release = self._update(number, change)
        self._record("approve", approver, scope=release.scope, release=number, checksum=release.checksum)
        return release

    def rollback(self, scope: str, to: int, *, author: str, comment: str = "") -> Release:
        """A NEW release of `scope` equal to release `to` (pending approval when approval is required);
        the scope's draft becomes those values too."""
        target = self.release(to)
        if target.scope != check_scope(scope):
            raise BadRequest(f"release {to} belongs to {target.scope}, not {scope}", code="scope_mismatch")
        if target.state == "pending_approval":
            raise Conflict(f"release {to} was never approved: nothing to roll back to", code="not_published")
        values = self._validate(target.values, scope)  # a split target may have left the registry since
        state = "pending_approval" if self.settings.config.require_approval else "published"
        note = comment or f"rollback to release {to}"
        release = self._add(
            lambda n: Release(
                n, scope, values, note, author, _now(), state, rolled_back_to=to, checksum=checksum(values)
            )
        )
        self.backend.put_draft(scope, values, author)
        self._record("rollback", author, scope=scope, release=release.number, to=to, checksum=release.checksum)
        return release

    def promote(self, number: int, *, author: str) -> Release:
        """Merge a gray release into the main line: a new published release with its values."""
        gray = self.release(number)
        if gray.state != "gray":
            raise Conflict(f"release {number} is {gray.state}, not a running gray release", code="not_gray")
        note = f"promoted gray release {number}"
        release = self._add(
            lambda n: Release(n, gray.scope, gray.values, note, author, _now(), "published", checksum=gray.checksum)
        )

        def change(r: Release) -> Release:
            return replace(r, state="promoted", promoted_to=release.number)

        self._update(number, change)
        self._record("promote", author, scope=gray.scope, release=release.number, gray=number, checksum=gray.checksum)
        return release

    def abandon(self, number: int, *, author: str) -> Release:
        """Drop a gray release (or one still pending approval): its targets go back to the main line."""

        def change(r: Release) -> Release:
            if r.state not in ("gray", "pending_approval"):
                raise Conflict(f"release {number} is {r.state}: only gray or pending releases are abandoned",
                               code="not_gray")  # fmt: skip
            return replace(r, state="abandoned")

        release = self._update(number, change)
        self._record("abandon", author, scope=release.scope, release=number, checksum=release.checksum)
        return release

    def history(self, scope: str | None = None) -> list[Release]:
        """Releases, newest first (of one scope when given)."""
        if scope is not None:
            check_scope(scope)
        return [r for r in reversed(self._releases()) if scope is None or r.scope == scope]

    def release(self, number: int) -> Release:
        found = next((r for r in self._releases() if r.number == number), None)
        if found is None:
            raise NotFound(f"no config release {number}", code="release_not_found")
        return found

    # ---- delivery ---------------------------------------------------------------------------------------
    def revision(self) -> int:
        return self.backend.revision()

    def effective(self, instance: Instance) -> Effective:
        """The config `instance` should run: the main line of global, its group and every model scope,
        merged in that order, each replaced by a gray release of the scope that targets the instance."""
        revision = self.backend.revision()  # first: a release stored meanwhile shows a newer revision later
        releases = self._releases()
        models = sorted({r.scope for r in releases if r.scope.startswith("model:")})
        values: dict = {}
        numbers: list[int] = []
        request_gray: list[dict] = []
        for scope in ["global", f"group:{instance.group}", *models]:
            chosen = _main_line(releases, scope)
            gray = _gray_of(releases, scope)
            if gray is not None and gray.gray is not None and targets(gray.gray, scope, instance):
                chosen = gray
            elif gray is not None and gray.gray is not None and gray.gray.get("by") == "request":
                request_gray.append({"number": gray.number, "scope": scope, "percent": gray.gray["percent"],
                                     "key": gray.gray["key"], "values": gray.values})  # fmt: skip
            if chosen is not None:
                values = schema.merge(values, chosen.values)
                numbers.append(chosen.number)
        digest = checksum(values) if not request_gray else checksum([values, request_gray])
        return Effective(revision, values, tuple(numbers), digest, tuple(request_gray))

    def wait(self, after: int, timeout_s: float) -> int:
        """Block until the revision passes `after` or `timeout_s` ends; the revision then."""
        current = self.backend.revision()
        if current > after or timeout_s <= 0:
            return current
        return max(current, self.backend.wait(after, timeout_s))

    def report(self, instance: Instance, revision: int, status: str, reason: str = "") -> None:
        """`instance` applied (``applied``) or refused (``rejected``, `reason`) `revision`; also its heartbeat."""
        if status not in ("applied", "rejected"):
            raise BadRequest(f"unknown report status {status!r}: use applied or rejected", code="invalid_status")
        self.backend.put_report({"instance_id": instance.id[:200], "group": instance.group[:200],
                                 "labels": dict(instance.labels), "revision": int(revision), "status": status,
                                 "reason": reason[:2000], "at": datetime.now(UTC)})  # fmt: skip

    def status(self) -> dict:
        """Instances, the revision each runs, those that rejected and why, and a one-line summary
        ("M of N instances on revision R, K rejected"); instances silent for ``config.instance_ttl_s``
        count as gone."""
        revision = self.backend.revision()
        ttl = self.settings.config.instance_ttl_s
        cutoff = datetime.now(UTC) - timedelta(seconds=ttl)
        instances = []
        for r in self.backend.reports():
            gone = r["at"] < cutoff
            instances.append(r | {"at": r["at"].isoformat(), "gone": gone, "current": r["revision"] >= revision})
        live = [i for i in instances if not i["gone"]]
        current = sum(1 for i in live if i["current"] and i["status"] == "applied")
        rejected = sum(1 for i in live if i["status"] == "rejected")
        gone = len(instances) - len(live)
        summary = f"{current} of {len(live)} instances on revision {revision}, {rejected} rejected"
        if gone:
            summary += f" ({gone} gone: no report for {ttl:g} s)"
        return {"revision": revision, "instances": instances, "live": len(live), "current": current,
                "rejected": rejected, "gone": gone, "instance_ttl_s": ttl, "summary": summary}  # fmt: skip


def _main_line(releases: list[Release], scope: str) -> Release | None:
    return next((r for r in reversed(releases) if r.scope == scope and r.state == "published"), None)


def _gray_of(releases: list[Release], scope: str) -> Release | None:
    return next((r for r in reversed(releases) if r.scope == scope and r.state == "gray"), None)


def release_json(release: Release) -> dict:
    return asdict(release)
