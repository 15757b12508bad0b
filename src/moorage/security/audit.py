"""The audit log: an append-only, hash-chained SQL table of admin actions and inference calls.

Each row stores ``hash = sha256(prev_hash | canonical JSON of the row)``. `verify` recomputes the
chain and names the first row that was edited, inserted out of order or deleted; the head row
(`audit_head`) records where the chain ends, so deleting the newest rows is caught too.

Appends take the head row's lock (``SELECT ... FOR UPDATE``; SQLite serialises writers with
``BEGIN IMMEDIATE``), so several processes can share one chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

from sqlalchemy import select

from ..db import Catalog
from .tables import AuditHead, AuditRow

log = logging.getLogger("moorage.audit")
GENESIS = "0" * 64
MAX_AUDIT_TEXT = 64 * 1024  # characters of an input kept with security.audit_inputs
FIELDS = ("seq", "at", "key_id", "action", "model", "version", "status", "latency_ms", "input_sha256", "input_text",
          "detail")  # fmt: skip


@dataclass
class AuditEntry:
    key_id: str
    action: str
    status: int
    model: str = ""
    version: int | None = None
    latency_ms: float = 0.0
    input_sha256: str = ""
    input_text: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="microseconds"))

    def __post_init__(self) -> None:  # fit the columns: a client-chosen path or key id cannot break an insert
        self.key_id, self.action, self.model = self.key_id[:160], self.action[:64], self.model[:128]


def sha256_text(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def row_hash(prev_hash: str, values: dict[str, Any]) -> str:
    canonical = json.dumps({k: values[k] for k in FIELDS}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{prev_hash}|{canonical}".encode()).hexdigest()


class AuditLog:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def append(self, entries: list[AuditEntry]) -> None:
        if not entries:
            return
        with self.catalog.session() as s:
            head = s.scalars(select(AuditHead).where(AuditHead.id == 1).with_for_update()).one()
            seq, prev = head.seq, head.hash
            for e in entries:
                seq += 1
                values = asdict(e) | {"seq": seq, "latency_ms": round(float(e.latency_ms), 3)}
                digest = row_hash(prev, values)
                s.add(AuditRow(**values, prev_hash=prev, hash=digest))
                prev = digest
            head.seq, head.hash = seq, prev

    def rows(
        self,
        *,
        key_id: str | None = None,
        action: str | None = None,
        model: str | None = None,
        since: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[dict[str, Any]]:
        query = select(AuditRow)
        for column, value in ((AuditRow.key_id, key_id), (AuditRow.action, action), (AuditRow.model, model)):
            if value:
                query = query.where(column == value)
        if since:
            query = query.where(AuditRow.at >= since)
        query = query.order_by(AuditRow.seq.desc() if newest_first else AuditRow.seq)
        if limit:
            query = query.limit(limit)
        with self.catalog.session() as s:
            return [_as_dict(r) for r in s.scalars(query)]

    def _iter_rows(self, batch: int = 5000) -> Iterator[AuditRow]:
        last = 0
        while True:
            with self.catalog.session() as s:
                chunk = list(s.scalars(select(AuditRow).where(AuditRow.seq > last).order_by(AuditRow.seq).limit(batch)))
            yield from chunk
            if len(chunk) < batch:
                return
            last = chunk[-1].seq

    def verify(self) -> tuple[int, list[str]]:
        """(rows checked, problems). Each problem names a row by its sequence number."""
        problems: list[str] = []
        expected_seq, prev_hash, count = 1, GENESIS, 0
        with self.catalog.session() as s:  # first: every row up to the head is committed with it
            head = s.get_one(AuditHead, 1)
            head_seq, head_hash = head.seq, head.hash
        later: list[int] = []  # rows a live server wrote while this ran, or rows added behind its back
        for row in self._iter_rows():
            if row.seq > head_seq:
                later.append(row.seq)
                continue
            count += 1
            values = _as_dict(row)
            if row.seq != expected_seq:
                gap = f"row {expected_seq}" if row.seq == expected_seq + 1 else f"rows {expected_seq}-{row.seq - 1}"
                problems.append(f"{gap} deleted (the log jumps from row {expected_seq - 1} to row {row.seq})")
            elif row.prev_hash != prev_hash:
                problems.append(
                    f"row {row.seq - 1} was edited or replaced: row {row.seq} does not chain to it"
                    if row.seq > 1
                    else "row 1 does not start the chain"
                )
            if row_hash(row.prev_hash, values) != row.hash:
                problems.append(f"row {row.seq} was edited: its content does not match its hash")
            expected_seq, prev_hash = row.seq + 1, row.hash
        if later:
            with self.catalog.session() as s:
                head_seq_now = s.get_one(AuditHead, 1).seq
            if max(later) > head_seq_now:
                problems.append(f"rows after {head_seq_now} were appended outside the audit log")
        if head_seq != expected_seq - 1:
            problems.append(f"rows {expected_seq}-{head_seq} deleted (the log should end at row {head_seq})")
        elif head_hash != prev_hash:
            problems.append(f"row {head_seq} was edited or replaced: it is not the row the log ended with")
        return count, problems

    def export(self, out: IO[str], fmt: str = "jsonl") -> int:
        n = 0
        writer = None
        for row in self._iter_rows():
            values = _as_dict(row) | {"prev_hash": row.prev_hash, "hash": row.hash}
            if fmt == "csv":
                if writer is None:
                    writer = csv.DictWriter(out, fieldnames=list(values))
                    writer.writeheader()
                writer.writerow(values | {"detail": json.dumps(values["detail"], sort_keys=True)})
            else:
                out.write(json.dumps(values, sort_keys=True) + "\n")
            n += 1
        return n


def _as_dict(row: AuditRow) -> dict[str, Any]:
    return {k: getattr(row, k) for k in FIELDS}


class AuditWriter:
    """Batches inference audit rows off the request path: one transaction every `interval_s`.
    `record(..., now=True)` (admin actions) writes at once. Rows still queued when the process is
    killed with SIGKILL are lost; a clean stop writes them all."""

    MAX_PENDING = 100_000  # while the database is unreachable; beyond it the oldest rows are dropped, loudly

    def __init__(self, log_: AuditLog, interval_s: float) -> None:
        self.log = log_
        self.interval_s = interval_s
        self._pending: list[AuditEntry] = []
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        if self.interval_s > 0:
            self._stopping.clear()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Write every queued row. The loop is asked to end rather than cancelled: a cancelled await
        would leave its batch being written in a thread while the final flush runs beside it."""
        if self._task:
            self._stopping.set()
            await self._task
            self._task = None
        await self.flush()

    async def record(self, *entries: AuditEntry, now: bool = False) -> None:
        self._pending.extend(entries)
        if now or self._task is None:
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            batch, self._pending = self._pending, []
            if not batch:
                return
            try:
                await asyncio.to_thread(self.log.append, batch)
            except Exception:
                self._pending[:0] = batch  # keep them for the next attempt
                dropped = len(self._pending) - self.MAX_PENDING
                if dropped > 0:
                    del self._pending[:dropped]
                    log.error("audit database unreachable: dropped the %d oldest unwritten audit rows", dropped)
                log.exception("could not write %d audit rows; will retry", len(batch))

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)
            await self.flush()
