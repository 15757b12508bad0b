"""Where the config center keeps its state: the catalog database (the default, no new service) or etcd.

Both keep drafts by scope, releases by number, instance reports by id and a revision that grows with
every change to a release; `wait` blocks until the revision passes a value. Waiting costs one thread
per backend, however many callers wait: the catalog's polls its one-row revision every
`CatalogBackend.poll_interval_s`, etcd's watches the revision key. One conformance suite
(tests/integration/test_config_center.py) runs on both.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

from sqlalchemy import func, select

from ..db import Catalog, CatalogUnavailable, as_utc, utcnow
from ..errors import Conflict, MoorageError, NotFound, require
from .tables import ConfigDraft, ConfigRelease, ConfigReport, ConfigRevision

log = logging.getLogger("moorage.configcenter")


class BackendUnavailable(MoorageError):
    """The config center's store (etcd) cannot be reached (HTTP 503)."""

    status = 503
    code = "config_backend_unavailable"
    public = "the config center's store cannot be reached; retry shortly"


class Backend(Protocol):
    def get_draft(self, scope: str) -> dict | None: ...

    def put_draft(self, scope: str, values: dict, author: str) -> None: ...

    def add_release(self, build: Callable[[int], dict]) -> dict:
        """Store the release record ``build(next_number)`` and bump the revision, atomically."""
        ...

    def update_release(self, number: int, change: Callable[[dict], dict]) -> dict:
        """Replace release record `number` by ``change(current)`` and bump the revision, atomically;
        `change` raises to refuse (nothing is written)."""
        ...

    def releases(self) -> list[dict]:
        """Every release record (the fields of `releases.Release`), oldest first."""
        ...

    def revision(self) -> int: ...

    def wait(self, after: int, timeout_s: float) -> int:
        """Block until the revision passes `after` or `timeout_s` ends; the revision then."""
        ...

    def put_report(self, report: dict) -> None:
        """Store an instance's report (keys: instance_id, group, labels, revision, status, reason, at)."""
        ...

    def reports(self) -> list[dict]: ...

    def close(self) -> None: ...


class Waiters:
    """Every caller of `wait` sleeps on one condition; one thread, alive only while someone waits,
    learns the next revision (`next_revision(known)` blocks a little while) and wakes them all."""

    def __init__(self, next_revision: Callable[[int], int]) -> None:
        self._next = next_revision
        self._cond = threading.Condition()
        self._revision = -1
        self._waiting = 0
        self._thread: threading.Thread | None = None

    def wait(self, after: int, timeout_s: float) -> int:
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            self._waiting += 1
            try:
                while self._revision <= after:
                    if self._thread is None:
                        self._thread = threading.Thread(target=self._run, name="config-revision", daemon=True)
                        self._thread.start()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                return self._revision
            finally:
                self._waiting -= 1

    def notify(self, revision: int) -> None:
        with self._cond:
            if revision > self._revision:
                self._revision = revision
                self._cond.notify_all()

    def _run(self) -> None:
        failures = 0
        while True:
            with self._cond:
                if self._waiting == 0:
                    self._thread = None
                    return
                known = self._revision
            try:
                self.notify(self._next(known))
                failures = 0
            except MoorageError as exc:  # the store is down: waiters time out, the thread keeps trying
                failures += 1
                log.warning("config center revision unavailable (%s); retrying", exc.message)
                time.sleep(min(5.0, 0.2 * 2**failures))


# ---- the catalog ---------------------------------------------------------------------------------


class CatalogBackend:
    """Tables of migration 0007 in the catalog; writers lock the revision row."""

    poll_interval_s = 0.1

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._waiters = Waiters(self._next_revision)

    def get_draft(self, scope: str) -> dict | None:
        with self.catalog.session() as s:
            row = s.get(ConfigDraft, scope)
            return None if row is None else dict(row.values)

    def put_draft(self, scope: str, values: dict, author: str) -> None:
        with self.catalog.session() as s:
            row = s.get(ConfigDraft, scope)
            if row is None:
                s.add(ConfigDraft(scope=scope, values=values, updated_by=author, updated_at=utcnow()))
            else:
                row.values, row.updated_by, row.updated_at = values, author, utcnow()

    def add_release(self, build: Callable[[int], dict]) -> dict:
        with self.catalog.session() as s:
            head = self._lock_revision(s)
            number = (s.scalar(select(func.max(ConfigRelease.number))) or 0) + 1
            release = build(number)
            s.add(ConfigRelease(**release))
            head.revision += 1
            revision = head.revision
        self._waiters.notify(revision)
        return release

    def update_release(self, number: int, change: Callable[[dict], dict]) -> dict:
        with self.catalog.session() as s:
            head = self._lock_revision(s)
            row = s.get(ConfigRelease, number)
            if row is None:
                raise NotFound(f"no config release {number}", code="release_not_found")
            release = change(_row_release(row))
            for key, value in release.items():
                setattr(row, key, value)
            head.revision += 1
            revision = head.revision
        self._waiters.notify(revision)
        return release

    def releases(self) -> list[dict]:
        with self.catalog.session() as s:
            return [_row_release(r) for r in s.scalars(select(ConfigRelease).order_by(ConfigRelease.number))]

    def revision(self) -> int:
        with self.catalog.session() as s:
            return s.get_one(ConfigRevision, 1).revision

    def wait(self, after: int, timeout_s: float) -> int:
        return self._waiters.wait(after, timeout_s)

    def _next_revision(self, known: int) -> int:
        if known >= 0:
            time.sleep(self.poll_interval_s)
        return self._peek_revision()

    def _peek_revision(self) -> int:
        """The revision by one plain SELECT outside a session: on SQLite a session takes the write lock
        (BEGIN IMMEDIATE), and the poll should neither take it nor wait behind a writer (WAL readers don't)."""
        try:
            conn = self.catalog.engine.raw_connection()
            try:
                cursor = conn.cursor()
                cursor.execute("SELECT revision FROM config_revision WHERE id = 1")
                row = cursor.fetchone()
                cursor.close()
                conn.rollback()  # end the read's implicit transaction (PostgreSQL); a no-op on SQLite
            finally:
                conn.close()
        except Exception as exc:  # the driver's own errors: the database is down or unreachable
            raise CatalogUnavailable(f"catalog {self.catalog.safe_url}: {exc}") from None
        if row is None:
            raise CatalogUnavailable(f"catalog {self.catalog.safe_url} has no config revision row (migration 0007)")
        return int(row[0])

    def put_report(self, report: dict) -> None:
        with self.catalog.session() as s:
            row = s.get(ConfigReport, report["instance_id"])
            if row is None:
                s.add(ConfigReport(**report))
            else:
                for key, value in report.items():
                    setattr(row, key, value)

    def reports(self) -> list[dict]:
        with self.catalog.session() as s:
            return [
                {
                    "instance_id": r.instance_id,
                    "group": r.group,
                    "labels": dict(r.labels),
                    "revision": r.revision,
                    "status": r.status,
                    "reason": r.reason,
                    "at": as_utc(r.at),
                }
                for r in s.scalars(select(ConfigReport).order_by(ConfigReport.instance_id))
            ]

    def close(self) -> None:
        self.catalog.dispose()

    @staticmethod
    def _lock_revision(s) -> ConfigRevision:
        return s.scalars(select(ConfigRevision).where(ConfigRevision.id == 1).with_for_update()).one()


def _row_release(row: ConfigRelease) -> dict:
    return {column.key: getattr(row, column.key) for column in ConfigRelease.__table__.columns}


# ---- etcd ----------------------------------------------------------------------------------------


class EtcdBackend:
    """Keys under ``config.etcd_prefix``: ``rev`` (its mod revision is the config center's revision),
    ``next`` (the next release number), ``releases/NUMBER``, ``drafts/SCOPE``, ``reports/INSTANCE``.
    A release write is one transaction that also puts ``rev``, guarded by the mod revision it read
    (retried when another writer got there first); `wait` watches ``rev`` from the revision after."""

    watch_slice_s = 5.0
    max_attempts = 50

    def __init__(self, url: str, prefix: str = "/moorage/config/", *, timeout_s: float = 10.0) -> None:
        etcd3gw = require("etcd3gw", "etcd")
        parts = urlsplit(url if "://" in url else f"http://{url}")
        self.url = url
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        address = {"host": parts.hostname or "127.0.0.1", "port": parts.port or 2379, "protocol": parts.scheme}
        self.client = etcd3gw.Etcd3Client(**address, timeout=timeout_s)
        # the watch has a client of its own: ending a watch closes its session's connection pool
        self._watch_client = etcd3gw.Etcd3Client(**address)
        self._waiters = Waiters(self._next_revision)

    # plumbing: every etcd3gw error becomes BackendUnavailable (or, for a refused txn, a retry)
    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from etcd3gw.exceptions import Etcd3Exception

        try:
            return fn(*args, **kwargs)
        except Etcd3Exception as exc:
            detail = f"{type(exc).__name__}: {(exc.detail_text or '').strip()[:300] or 'no detail'}"
            log.warning("etcd %s failed: %s", self.url, detail)
            raise BackendUnavailable(f"etcd {self.url} failed ({detail}); is it running?") from None

    def _get(self, key: str) -> tuple[Any, int]:
        """(decoded JSON value or None, mod revision or 0)."""
        found = self._call(self.client.get, self.prefix + key, metadata=True)
        if not found:
            return None, 0
        value, meta = found[0]
        return json.loads(value), int(meta["mod_revision"])

    def _prefix(self, key: str) -> list[Any]:
        return [json.loads(value) for value, _ in self._call(self.client.get_prefix, self.prefix + key)]

    def _txn(self, guards: dict[str, int], puts: dict[str, Any]) -> bool:
        """Put every key of `puts` (JSON) and ``rev`` iff each key of `guards` still has that mod revision."""
        from etcd3gw.utils import _encode

        compare = [
            {"key": _encode(self.prefix + k), "result": "EQUAL", "target": "MOD", "mod_revision": rev}
            for k, rev in guards.items()
        ]
        success = [
            {"request_put": {"key": _encode(self.prefix + k), "value": _encode(json.dumps(v))}}
            for k, v in (puts | {"rev": ""}).items()
        ]
        result = self._call(self.client.transaction, {"compare": compare, "success": success, "failure": []})
        return bool(result.get("succeeded"))

    def _retry(self, attempt: Callable[[], dict | None]) -> dict:
        for _ in range(self.max_attempts):
            done = attempt()
            if done is not None:
                self._waiters.notify(self.revision())
                return done
        raise Conflict("the config center is busy: another writer kept changing it; retry", code="config_busy")

    # the protocol
    def get_draft(self, scope: str) -> dict | None:
        draft, _ = self._get(f"drafts/{scope}")
        return None if draft is None else dict(draft["values"])

    def put_draft(self, scope: str, values: dict, author: str) -> None:
        record = {"values": values, "updated_by": author, "updated_at": utcnow().isoformat()}
        self._call(self.client.put, self.prefix + f"drafts/{scope}", json.dumps(record))

    def add_release(self, build: Callable[[int], dict]) -> dict:
        def attempt() -> dict | None:
            number, mod = self._get("next")
            release = build(number or 1)
            puts = {"next": release["number"] + 1, f"releases/{release['number']:010d}": release}
            return release if self._txn({"next": mod}, puts) else None

        return self._retry(attempt)

    def update_release(self, number: int, change: Callable[[dict], dict]) -> dict:
        key = f"releases/{number:010d}"

        def attempt() -> dict | None:
            data, mod = self._get(key)
            if data is None:
                raise NotFound(f"no config release {number}", code="release_not_found")
            release = change(data)
            return release if self._txn({key: mod}, {key: release}) else None

        return self._retry(attempt)

    def releases(self) -> list[dict]:
        return sorted(self._prefix("releases/"), key=lambda r: r["number"])

    def revision(self) -> int:
        return self._get("rev")[1]

    def wait(self, after: int, timeout_s: float) -> int:
        return self._waiters.wait(after, timeout_s)

    def _next_revision(self, known: int) -> int:
        if known < 0:
            return self.revision()
        from etcd3gw.exceptions import WatchTimedOut

        try:
            event = self._watch_client.watch_once(
                self.prefix + "rev", timeout=self.watch_slice_s, start_revision=known + 1
            )
        except WatchTimedOut:  # also what a watch from a compacted revision looks like: read the key itself
            return self.revision()
        except Exception as exc:  # the watch runs in etcd3gw's threads: any failure there means etcd is gone
            raise BackendUnavailable(f"etcd {self.url} watch failed: {exc}") from None
        return int(event["kv"]["mod_revision"])

    def put_report(self, report: dict) -> None:
        record = report | {"at": report["at"].isoformat()}
        self._call(self.client.put, self.prefix + f"reports/{report['instance_id']}", json.dumps(record))

    def reports(self) -> list[dict]:
        return [r | {"at": as_utc(datetime.fromisoformat(r["at"]))} for r in self._prefix("reports/")]

    def close(self) -> None:
        self.client.session.close()
        self._watch_client.session.close()
