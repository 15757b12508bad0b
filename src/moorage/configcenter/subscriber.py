"""The subscriber inside a running process: it fetches the config its instance should run, long-polls
for the next revision (with a periodic poll as a fallback and backoff on reconnect), validates each
one locally, hands it to the process (`apply`), reports back ``applied`` or ``rejected`` with the
reason, and keeps the last applied one as a checksum-verified local snapshot to start from when the
config center cannot be reached.

Two sources: `HttpSource` long-polls a server's ``/v1/config/watch`` with an API key (what a fleet
runs), `LocalSource` waits on a `ConfigCenter` the process holds itself (a single host on the
catalog, or a shared backend)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..config import Settings
from ..errors import MoorageError, require
from .snapshot import Snapshot, SnapshotCorrupted, effective_from_json, snapshot_path

if TYPE_CHECKING:
    from ..registry import Registry
    from .releases import ConfigCenter, Effective, Instance

log = logging.getLogger("moorage.configcenter")


class SourceUnavailable(MoorageError):
    """The config center could not be reached (refused, dropped, timed out, 5xx) or refused this
    process (a wrong key): the subscriber retries with backoff, and at start falls back to its snapshot."""

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
        httpx = require("httpx", "serve")
        self._httpx = httpx
        self.url = center_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._connect_timeout_s = connect_timeout_s
        timeout = httpx.Timeout(connect_timeout_s + 10.0, connect=connect_timeout_s)
        self._client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)

    async def effective(self, instance: Instance) -> Effective:
        found = await self._watch(instance, -1, None)
        if found is None:  # a server answers at once when asked for no revision in particular
            raise SourceUnavailable(f"config center {self.url} answered no config")
        return found

    async def watch(self, instance: Instance, after: int, hold_s: float) -> Effective | None:
        return await self._watch(instance, after, hold_s)

    async def _watch(self, instance: Instance, after: int, hold_s: float | None) -> Effective | None:
        params: dict[str, str | int | float] = {"instance": instance.id, "group": instance.group, "after": after}
        if instance.labels:
            params["labels"] = json.dumps(instance.labels, sort_keys=True)
        if hold_s is not None:
            params["hold"] = hold_s
        # The read may take the whole hold: the client waits a little longer than the server holds.
        read_s = (hold_s or 0.0) + 10.0
        timeout = self._httpx.Timeout(read_s, connect=self._connect_timeout_s)
        response = await self._request("GET", "/v1/config/watch", params=params, timeout=timeout)
        if response.status_code == 304:
            return None
        try:
            return effective_from_json(response.json())
        except ValueError as exc:
            raise SourceUnavailable(f"config center {self.url} answered an unreadable config: {exc}") from None

    async def report(self, instance: Instance, revision: int, status: str, reason: str = "") -> None:
        body = {
            "instance": instance.id,
            "group": instance.group,
            "labels": instance.labels,
            "revision": revision,
            "status": status,
            "reason": reason[:2000],
        }
        await self._request("POST", "/v1/config/reports", json=body)

    async def _request(self, method: str, path: str, **kwargs):
        try:
            response = await self._client.request(method, path, **kwargs)
        except self._httpx.HTTPError as exc:
            raise SourceUnavailable(f"config center {self.url} unreachable: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            raise SourceUnavailable(
                f"config center {self.url} answered {response.status_code}: {_error_text(response)}"
            )
        return response

    async def close(self) -> None:
        await self._client.aclose()


def _error_text(response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


class LocalSource:
    """A `ConfigCenter` this process holds (closed with the source when `owned`). Its blocking calls
    run in threads; a wait is cut into short slices so that stopping the subscriber leaves no thread
    waiting for long."""

    def __init__(self, center: ConfigCenter, *, wait_slice_s: float = 1.0, owned: bool = False) -> None:
        self.center = center
        self.wait_slice_s = wait_slice_s
        self.owned = owned

    async def effective(self, instance: Instance) -> Effective:
        return await self._call(self.center.effective, instance)

    async def watch(self, instance: Instance, after: int, hold_s: float) -> Effective | None:
        deadline = time.monotonic() + hold_s
        while (left := deadline - time.monotonic()) > 0:
            revision = await self._call(self.center.wait, after, min(left, self.wait_slice_s))
            if revision > after:
                return await self.effective(instance)
        return None

    async def report(self, instance: Instance, revision: int, status: str, reason: str = "") -> None:
        await self._call(self.center.report, instance, revision, status, reason)

    async def _call(self, fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except Exception as exc:  # a backend that is down (database, etcd) is retried like a dropped connection
            raise SourceUnavailable(f"config center unavailable: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self.owned:
            self.center.close()


Apply = Callable[[Settings, "Effective"], None]


def new_instance(settings: Settings, group: str) -> Instance:
    """This process as an instance of `group` (``config.group`` overrides it), with ``config.labels``:
    its id (host, pid and a random part) is unique per process and per start."""
    from .releases import Instance

    instance_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    return Instance(id=instance_id, group=settings.config.group or group, labels=dict(settings.config.labels))


def default_source(settings: Settings, registry: Registry | None = None) -> Source:
    """`HttpSource` on ``config.center_url`` when it is set, else the backend in-process (on the
    catalog of `registry` when given)."""
    cfg = settings.config
    if cfg.center_url:
        return HttpSource(cfg.center_url, cfg.api_key.get_secret_value() if cfg.api_key else None)
    from .releases import ConfigCenter

    return LocalSource(ConfigCenter.from_settings(settings, registry=registry), owned=True)


class Subscriber:
    """Keeps one instance on the config its center publishes.

    `apply(settings, effective)` gets the process's settings with the release's values merged in
    (already validated) and swaps them in; it raises to refuse (the exception's text is reported as
    the reason) and returns to accept. `source` defaults to `default_source(settings)`. Each release
    is merged into the settings the process started with, so a key a later release drops returns to
    the process's own value."""

    def __init__(
        self,
        settings: Settings,
        instance: Instance,
        apply: Apply,
        *,
        source: Source | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.settings = settings
        self.instance = instance
        self._apply = apply
        self._source = source or default_source(settings, registry)
        self._registry = registry
        self.snapshot = Snapshot(snapshot_path(settings, instance.group))
        self._current: Effective | None = None
        self._seen = -1  # the last revision handled, applied or rejected: the next long-poll's `after`
        self._report: tuple[int, str, str] | None = None  # what to (re)send: revision, status, reason
        self._report_due = False
        self._reported_at = 0.0
        self._fetched_at = 0.0
        self._needs_fetch = True
        self._task: asyncio.Task | None = None

    @property
    def current(self) -> Effective | None:
        """The last Effective applied (from the center or the snapshot), None before any."""
        return self._current

    @property
    def revision(self) -> int:
        """The last revision this subscriber handled (applied or rejected); -1 before any."""
        return self._seen

    async def start(self) -> None:
        """The first config: from the center, else from the checksum-verified local snapshot (logged:
        "config center unreachable: serving with snapshot of revision R"), else the process's own
        settings; then the long-poll loop runs in the background."""
        try:
            effective = await self._source.effective(self.instance)
        except SourceUnavailable as exc:
            await self._start_from_snapshot(exc)
        else:
            self._fetched_at, self._needs_fetch = time.monotonic(), False
            await self._deliver(effective)
            with contextlib.suppress(SourceUnavailable):  # the loop sends it again
                await self._send_report()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"config-subscriber-{self.instance.id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._source.close()

    async def _start_from_snapshot(self, exc: SourceUnavailable) -> None:
        path = self.snapshot.path
        try:
            effective = self.snapshot.load()
        except SnapshotCorrupted as corrupted:
            log.error(
                "config center unreachable (%s); the config snapshot %s is refused: %s; serving with this "
                "process's own settings",
                exc,
                path,
                corrupted,
            )
            return
        if effective is None:
            log.warning(
                "config center unreachable (%s), no snapshot at %s: serving with this process's own settings", exc, path
            )
            return
        log.warning(
            "config center unreachable (%s): serving with snapshot of revision %d (releases %s) from %s",
            exc,
            effective.revision,
            _numbers(effective),
            path,
        )
        await self._deliver(effective, from_snapshot=True)
        self._needs_fetch = True  # once the center answers, fetch in full: this instance's share may differ

    async def _run(self) -> None:
        require("tenacity", "serve")  # the message names the extra when it is missing
        from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

        while True:  # a fresh backoff after every step that reached the center
            # full jitter, at most 5 s: a fleet whose server restarted does not reconnect in step
            retrying = AsyncRetrying(
                wait=wait_random_exponential(multiplier=0.2, max=5.0),
                retry=retry_if_exception_type(SourceUnavailable),
                before_sleep=_log_retry,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        await self._step()
            except Exception:  # a bug must not end the following silently
                log.exception("config subscriber %s: unexpected error; following again in 5 s", self.instance.id)
                await asyncio.sleep(5.0)

    async def _step(self) -> None:
        """One exchange with the center: pending report, then a full fetch (first contact, or the
        fallback poll is due) or a long-poll from the last revision handled."""
        await self._send_report()
        cfg = self.settings.config
        if self._needs_fetch or time.monotonic() - self._fetched_at >= cfg.poll_interval_s:
            effective: Effective | None = await self._source.effective(self.instance)
            self._fetched_at, self._needs_fetch = time.monotonic(), False
        else:
            effective = await self._source.watch(self.instance, self._seen, cfg.hold_s)
        if effective is not None:
            await self._deliver(effective)
            await self._send_report()

    async def _send_report(self) -> None:
        """The pending report, or the last one again once a third of ``config.instance_ttl_s`` has
        passed: it is also how the center knows this instance is alive."""
        heartbeat_due = time.monotonic() - self._reported_at >= self.settings.config.instance_ttl_s / 3
        if self._report is None or not (self._report_due or heartbeat_due):
            return
        revision, status, reason = self._report
        await self._source.report(self.instance, revision, status, reason)
        self._reported_at = time.monotonic()
        if self._report == (revision, status, reason):
            self._report_due = False

    async def _deliver(self, effective: Effective, *, from_snapshot: bool = False) -> None:
        """Validate, merge and apply `effective` unless it is what already runs."""
        if self._current is not None and _same(effective, self._current):
            self._handled(effective, "applied", "")
            return
        if self._current is None and not (effective.releases or effective.values or effective.request_gray):
            await self._accepted(effective, from_snapshot)  # no release yet: the process's own settings are it
            return
        try:
            self._apply(self._merged(effective), effective)
        except Exception as exc:  # apply's contract: raising refuses, and the text is the reason
            reason = _reason(exc)
            log.error("config revision %d refused: %s", effective.revision, reason, exc_info=_unexpected(exc))
            self._handled(effective, "rejected", reason)
            return
        source = "snapshot" if from_snapshot else "config center"
        log.info(
            "config revision %d applied from the %s (releases %s)", effective.revision, source, _numbers(effective)
        )
        await self._accepted(effective, from_snapshot)

    async def _accepted(self, effective: Effective, from_snapshot: bool) -> None:
        self._current = effective
        if not from_snapshot:
            await self._write_snapshot(effective)
        self._handled(effective, "applied", "")

    def _merged(self, effective: Effective) -> Settings:
        from .schema import apply_values, validate_values

        return apply_values(self.settings, validate_values(effective.values, registry=self._registry))

    def _handled(self, effective: Effective, status: str, reason: str) -> None:
        self._seen = max(self._seen, effective.revision)
        report = (effective.revision, status, reason)
        if report != self._report:
            self._report, self._report_due = report, True

    async def _write_snapshot(self, effective: Effective) -> None:
        try:
            await asyncio.to_thread(self.snapshot.write, effective)  # fsync: not on the event loop
        except OSError as exc:  # the release runs; only a restart without the center would miss it
            log.error("could not write the config snapshot %s: %s", self.snapshot.path, exc)


def _same(a: Effective, b: Effective) -> bool:
    return a.checksum == b.checksum and a.values == b.values and a.request_gray == b.request_gray


def _numbers(effective: Effective) -> str:
    return ", ".join(map(str, effective.releases)) or "none"


def _reason(exc: BaseException) -> str:
    errors = getattr(exc, "errors", None)  # InvalidConfig names each field as a JSON pointer
    if isinstance(errors, list) and errors:
        return "; ".join(f"{e.get('pointer', '')}: {e.get('message', '')}" for e in errors if isinstance(e, dict))[
            :2000
        ]
    return (str(exc) or type(exc).__name__)[:2000]


def _unexpected(exc: BaseException) -> bool:
    """A refusal the process did not mean (a bug in apply) is logged with its traceback."""
    return not isinstance(exc, MoorageError | ValueError | TypeError)


def _log_retry(state) -> None:
    exc = state.outcome.exception() if state.outcome else None
    delay = state.next_action.sleep if state.next_action else 0.0
    log.warning("config center: %s; retrying in %.1f s", exc, delay)
