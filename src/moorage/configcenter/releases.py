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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import Settings
from .schema import Change

if TYPE_CHECKING:
    from ..registry import Registry
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


class ConfigCenter:
    def __init__(self, backend: Backend, settings: Settings, *, registry: Registry | None = None) -> None:
        raise NotImplementedError

    @classmethod
    def from_settings(cls, settings: Settings, *, registry: Registry | None = None) -> ConfigCenter:
        """The backend `settings.config.backend` names; audit rows go to the catalog either way."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # ---- drafts -----------------------------------------------------------------------------------------
    def draft(self, scope: str) -> dict:
        """The scope's draft; with none saved, the values of its newest published release ({} if none)."""
        raise NotImplementedError

    def edit_draft(self, scope: str, values: dict, *, author: str) -> dict:
        """Replace the scope's draft; validated on save (`InvalidConfig` names each bad field)."""
        raise NotImplementedError

    def diff(self, scope: str) -> list[Change]:
        """The draft against the scope's newest published release."""
        raise NotImplementedError

    # ---- releases ---------------------------------------------------------------------------------------
    def publish(self, scope: str, *, author: str, comment: str = "", gray: dict | None = None) -> Release:
        """The scope's draft as a new release (pending approval when ``config.require_approval``)."""
        raise NotImplementedError

    def approve(self, number: int, *, approver: str) -> Release:
        """Make a pending release effective; its author's own key is refused (403 ``self_approval``)."""
        raise NotImplementedError

    def rollback(self, scope: str, to: int, *, author: str, comment: str = "") -> Release:
        """A NEW release of `scope` equal to release `to`."""
        raise NotImplementedError

    def promote(self, number: int, *, author: str) -> Release:
        """Merge a gray release into the main line: a new published release with its values."""
        raise NotImplementedError

    def abandon(self, number: int, *, author: str) -> Release:
        """Drop a gray release: its targets go back to the main line."""
        raise NotImplementedError

    def history(self, scope: str | None = None) -> list[Release]:
        """Releases, newest first."""
        raise NotImplementedError

    def release(self, number: int) -> Release:
        raise NotImplementedError

    # ---- delivery ---------------------------------------------------------------------------------------
    def revision(self) -> int:
        raise NotImplementedError

    def effective(self, instance: Instance) -> Effective:
        raise NotImplementedError

    def wait(self, after: int, timeout_s: float) -> int:
        """Block until the revision passes `after` or `timeout_s` ends; the revision then."""
        raise NotImplementedError

    def report(self, instance: Instance, revision: int, status: str, reason: str = "") -> None:
        """`instance` applied (``applied``) or refused (``rejected``, `reason`) `revision`; also its heartbeat."""
        raise NotImplementedError

    def status(self) -> dict:
        """Instances, the revision each runs, those that rejected and why, and a one-line summary
        ("M of N instances on revision R, K rejected"); instances silent for ``config.instance_ttl_s``
        count as gone."""
        raise NotImplementedError
