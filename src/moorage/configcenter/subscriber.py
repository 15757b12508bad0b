"""The subscriber inside a running process: it fetches the config its instance should run, long-polls
for the next revision (with a periodic poll as a fallback and backoff on reconnect), validates each
one locally, hands it to the process (`apply`), reports back ``applied`` or ``rejected`` with the
reason, and keeps the last applied one as a checksum-verified local snapshot to start from when the
config center cannot be reached.

Two sources: `HttpSource` long-polls a server's ``/v1/config/watch`` with an API key (what a fleet
runs), `LocalSource` waits on a `ConfigCenter` the process holds itself (a single host on the
catalog, or a shared backend)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..config import Settings
from ..errors import MoorageError

if TYPE_CHECKING:
    from .releases import ConfigCenter, Effective, Instance


class SourceUnavailable(MoorageError):
    """The config center could not be reached (refused, dropped, timed out, 5xx): the subscriber
    retries with backoff, and at start falls back to its snapshot."""

    status = 503
    code = "config_center_unavailable"


class Source(Protocol):
    """Where a subscriber reads its config from."""

    async def effective(self, instance: Instance) -> Effective:
        """The config `instance` should run now."""
        ...

    async def watch(self, instance: Instance, after: int, hold_s: float) -> Effective | None:
        """The config as soon as the center's revision passes `after`; None when `hold_s` ends first."""
        ...

    async def report(self, instance: Instance, revision: int, status: str, reason: str = "") -> None:
        """Tell the center `instance` applied (``applied``) or refused (``rejected``, `reason`) `revision`."""
        ...

    async def close(self) -> None: ...


class HttpSource:
    """A server's ``/v1/config/watch`` and ``/v1/config/reports`` over httpx, with the key's bearer token."""

    def __init__(self, center_url: str, api_key: str | None = None, *, connect_timeout_s: float = 5.0) -> None:
        raise NotImplementedError


class LocalSource:
    """A `ConfigCenter` this process holds (its blocking calls run in threads)."""

    def __init__(self, center: ConfigCenter) -> None:
        raise NotImplementedError


Apply = Callable[[Settings, "Effective"], None]


class Subscriber:
    """Keeps one instance on the config its center publishes.

    `apply(settings, effective)` gets the process's settings with the release's values merged in
    (already validated) and swaps them in; it raises to refuse (the exception's text is reported as
    the reason) and returns to accept. `source` defaults to `HttpSource` when ``config.center_url``
    is set, else to a `LocalSource` on ``ConfigCenter.from_settings(settings)``."""

    def __init__(
        self,
        settings: Settings,
        instance: Instance,
        apply: Apply,
        *,
        source: Source | None = None,
    ) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        """The first config: from the center, else from the checksum-verified local snapshot (logged:
        "config center unreachable: serving with snapshot of revision R"), else the process's own
        settings; then the long-poll loop runs in the background."""
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    @property
    def current(self) -> Effective | None:
        """The last Effective applied (from the center or the snapshot), None before any."""
        raise NotImplementedError
