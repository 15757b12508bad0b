"""Config delivery over HTTP: ``GET /v1/config/watch`` (long-poll) and ``POST /v1/config/reports``.

A subscriber asks with the last revision it has seen (``after``); the server answers the Effective
config of the asking instance as soon as the center's revision passes it, or 304 when the hold ends
first (``config.hold_s``, 25 s by default: well under the 60 s idle timeout of common load
balancers, which cut longer holds). A client whose connection dropped asks again with the same
``after`` and misses nothing. Waiting holds no thread: every waiter awaits one asyncio event, set by
one thread per process that waits on the center's revision (`Revisions`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from ..config import Settings
from ..configcenter.snapshot import effective_json
from ..configcenter.subscriber import Apply, LocalSource, Subscriber, new_instance
from ..errors import BadRequest, Overloaded
from .common import FastJSON, unless_disconnected
from .security import require

if TYPE_CHECKING:
    from ..configcenter.releases import ConfigCenter, Effective, Instance
    from ..registry import Registry

log = logging.getLogger("moorage.server")
router = APIRouter(tags=["config"])
PERMISSION = "subscribe_config"
INSTANCE_PATTERN = r"^[A-Za-z0-9._:@-]{1,128}$"
GROUP_PATTERN = r"^[A-Za-z0-9._:@-]{1,128}$"


class Revisions:
    """The center's revision as this process last saw it, and one asyncio event per revision.

    One daemon thread waits on the center (its `wait` blocks) and hands each new revision to the
    event loop; every long-poll awaits the current event, so a hundred waiting subscribers cost a
    hundred futures, not a hundred threads."""

    def __init__(self, center: ConfigCenter, *, wait_slice_s: float = 5.0) -> None:
        self.center = center
        self.revision = -1
        self.draining = False
        self.wait_slice_s = wait_slice_s
        self._changed = asyncio.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.revision = await asyncio.to_thread(self.center.revision)
        except Exception as exc:  # a backend that is down at start: the thread follows it once it is up
            log.warning("config center: cannot read its revision: %s: %s", type(exc).__name__, exc)
        self._thread = threading.Thread(target=self._follow, args=(loop,), name="config-revisions", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the waiting thread within one slice of its wait (it holds nothing: not joined)."""
        self._stopping.set()

    def _follow(self, loop: asyncio.AbstractEventLoop) -> None:
        seen = self.revision
        while not self._stopping.is_set():
            try:
                revision = self.center.wait(seen, self.wait_slice_s)
            except Exception as exc:  # the backend is down: say so, wait a slice, try again
                log.warning("config center: cannot follow its revision: %s: %s", type(exc).__name__, exc)
                self._stopping.wait(self.wait_slice_s)
                continue
            if revision > seen:
                seen = revision
                try:
                    loop.call_soon_threadsafe(self._advance, revision)
                except RuntimeError:  # the loop has closed
                    return

    def drain(self) -> None:
        """End every client's hold now (304) and answer new ones at once: the server is stopping."""
        self.draining = True
        changed, self._changed = self._changed, asyncio.Event()  # the server's own subscriber waits on
        changed.set()

    def _advance(self, revision: int) -> None:
        if revision > self.revision:
            self.revision = revision
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    async def wait_past(self, after: int, timeout_s: float, *, client: bool = False) -> bool:
        """True as soon as the revision is past `after`, False when `timeout_s` ends first (or, for a
        `client`'s long-poll, once the server drains)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.revision <= after:
            left = deadline - loop.time()
            if left <= 0 or (client and self.draining):
                return False
            try:
                async with asyncio.timeout(left):
                    await self._changed.wait()
            except TimeoutError:
                return False
        return True


class Effectives:
    """The Effective configs this server hands out. With no gray release in force an instance's config
    depends on its group alone (the main lines of global, its group and the model scopes), so one
    computation per group and revision serves every long-poll that revision wakes; while a gray
    release is in force each instance gets its own. Called in threads."""

    def __init__(self, center: ConfigCenter) -> None:
        self.center = center
        self._lock = threading.Lock()
        self._by_group: dict[str, Effective] = {}
        self._gray_at = -1  # the newest revision seen with a gray release in force

    def get(self, instance: Instance, floor: int) -> Effective:
        """`instance`'s config at revision `floor` or later."""
        if self._gray_at >= floor:
            return self.center.effective(instance)
        with self._lock:  # the waiters of one revision: one computes, the others take its result
            hit = self._by_group.get(instance.group)
            if hit is not None and hit.revision >= floor:
                return hit
            effective = self.center.effective(instance)
            if self._shared(effective):
                self._by_group[instance.group] = effective
            else:
                self._gray_at = max(self._gray_at, effective.revision)
            return effective

    def _shared(self, effective: Effective) -> bool:
        """No gray release in force, and every release in `effective` still on its main line (read after
        it: a gray release that ended meanwhile may be in it, and is then not handed to others)."""
        if effective.request_gray:
            return False
        states = {r.number: r.state for r in self.center.history()}
        return "gray" not in states.values() and all(states.get(n) == "published" for n in effective.releases)


class FollowedSource(LocalSource):
    """The server's own subscriber, on the center it serves: it waits on the same `Revisions` as
    every long-poll (no thread of its own)."""

    def __init__(self, revisions: Revisions) -> None:
        super().__init__(revisions.center)
        self.revisions = revisions

    async def watch(self, instance: Instance, after: int, hold_s: float) -> Effective | None:
        if not await self.revisions.wait_past(after, hold_s):
            return None
        return await self.effective(instance)


class Reports:
    """Instance reports, written by one task after the configs being handed out: a release wakes every
    subscriber at once and their reports follow at once, and writing them meanwhile would delay the
    last configs. The newest report of an instance supersedes one not yet written."""

    MAX_PENDING = 10_000

    def __init__(self, center: ConfigCenter) -> None:
        self.center = center
        self.delivering = 0  # long-polls woken and not yet answered
        self._idle = asyncio.Event()
        self._idle.set()
        self._pending: dict[str, tuple[Instance, int, str, str]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="config-reports")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self._write, self._take())  # what is still pending is not lost

    def submit(self, instance: Instance, revision: int, status: str, reason: str) -> None:
        if len(self._pending) >= self.MAX_PENDING and instance.id not in self._pending:
            raise Overloaded("too many config reports waiting to be written; report again later")
        self._pending[instance.id] = (instance, revision, status, reason)
        self._wake.set()

    @contextlib.contextmanager
    def delivery(self) -> Iterator[None]:
        self.delivering += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.delivering -= 1
            if self.delivering == 0:
                self._idle.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._idle.wait()
            await asyncio.to_thread(self._write, self._take())

    def _take(self) -> list[tuple[Instance, int, str, str]]:
        batch, self._pending = list(self._pending.values()), {}
        return batch

    def _write(self, batch: list[tuple[Instance, int, str, str]]) -> None:
        for instance, revision, status, reason in batch:
            try:
                self.center.report(instance, revision, status, reason)
            except Exception as exc:  # one report lost is sent again by its heartbeat
                log.warning("config center: cannot record %s's report: %s: %s", instance.id, type(exc).__name__, exc)


class ConfigDelivery:
    """A server's part of config delivery: the revision follower the watch route awaits, and the
    server's own subscriber (over HTTP to ``config.center_url`` when it is set, else on the center
    it serves), which hands each release to `apply`."""

    def __init__(self, settings: Settings, center: ConfigCenter, apply: Apply, registry: Registry | None = None):
        self.revisions = Revisions(center)
        self.effectives = Effectives(center)
        self.reports = Reports(center)
        self._handlers: list[tuple[int, Any, Any]] = []
        source = None if settings.config.center_url else FollowedSource(self.revisions)
        instance = new_instance(settings, "servers")
        self.subscriber = Subscriber(settings, instance, apply, source=source, registry=registry)

    async def start(self) -> None:
        await self.revisions.start()
        self.reports.start()
        await self.subscriber.start()
        self._drain_on_signals()

    async def stop(self) -> None:
        for sig, previous, mine in self._handlers:
            if signal.getsignal(sig) is mine:
                signal.signal(sig, previous)
        await self.subscriber.stop()
        await self.reports.stop()
        self.revisions.stop()

    def _drain(self) -> None:
        if not self.revisions.draining:
            log.info("stopping: every held config long-poll is answered now")
        self.revisions.drain()

    def _drain_on_signals(self) -> None:
        """uvicorn waits for the requests in progress before the app's shutdown runs, so a held long-poll
        would keep a stopping server up for the rest of its hold: SIGTERM and SIGINT end every hold
        first, then reach the handler uvicorn installed (only a program's main thread has signals)."""
        self._handlers = []
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            if not callable(previous):  # the default or ignored: not a server's handler, left alone
                continue

            def drain_first(signum, frame, previous=previous) -> None:
                with contextlib.suppress(RuntimeError):  # the loop has closed: nothing is held any more
                    loop.call_soon_threadsafe(self._drain)
                previous(signum, frame)

            signal.signal(sig, drain_first)
            self._handlers.append((sig, previous, drain_first))


def _delivery(request: Request) -> ConfigDelivery:
    return request.app.state.config_delivery


def _instance(instance_id: str, group: str, labels: dict[str, str]) -> Instance:
    from ..configcenter.releases import Instance

    return Instance(id=instance_id, group=group, labels=labels)


def _labels(text: str) -> dict[str, str]:
    try:
        labels = json.loads(text) if text else {}
    except ValueError:
        labels = None
    valid = isinstance(labels, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
    if not valid or labels is None:
        raise BadRequest('labels must be a JSON object of strings, e.g. {"zone": "eu-1"}', code="invalid_labels")
    return labels


@router.get(
    "/v1/config/watch",
    responses={304: {"description": "the hold ended before the revision passed `after`"}},
)
async def watch(
    request: Request,
    instance: str = Query(..., pattern=INSTANCE_PATTERN, description="the asking instance's id (unique per process)"),
    group: str = Query("servers", pattern=GROUP_PATTERN, description="servers, or stream:<worker name>"),
    labels: str = Query("", max_length=4096, description="the instance's labels as a JSON object"),
    after: int = Query(-1, ge=-1, le=2**62, description="the last revision seen; -1: answer at once"),
    hold: float | None = Query(None, gt=0, le=55, description="hold at most this long (capped by config.hold_s)"),
    _caller=Depends(require(PERMISSION)),
) -> Response:
    """The asking instance's Effective config once the center's revision passes `after` (at once
    for -1), else 304 at the end of the hold."""
    who = _instance(instance, group, _labels(labels))
    hold_s = min(hold or request.app.state.settings.config.hold_s, request.app.state.settings.config.hold_s)
    # a client that goes away mid-hold ends its wait at once (ClientGone): it is not woken for nothing
    delivery = _delivery(request)
    if after >= 0 and not await unless_disconnected(request, delivery.revisions.wait_past(after, hold_s, client=True)):
        return Response(status_code=304)
    with delivery.reports.delivery():
        effective = await asyncio.to_thread(delivery.effectives.get, who, delivery.revisions.revision)
    return FastJSON(effective_json(effective))


class Report(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instance: str = Field(pattern=INSTANCE_PATTERN)
    group: str = Field("servers", pattern=GROUP_PATTERN)
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    revision: int = Field(ge=0, le=2**62)
    status: Literal["applied", "rejected"]
    reason: str = Field("", max_length=2000)


@router.post(
    "/v1/config/reports", status_code=202, response_class=Response, responses={202: {"description": "accepted"}}
)
async def report(request: Request, body: Report, _caller=Depends(require(PERMISSION))) -> Response:
    """An instance says it applied a revision, or refused it and why; `moorage config status` counts
    it once written (202: accepted, written after the configs being handed out)."""
    _delivery(request).reports.submit(
        _instance(body.instance, body.group, body.labels), body.revision, body.status, body.reason
    )
    return Response(status_code=202)
