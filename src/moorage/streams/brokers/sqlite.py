"""The embedded default: a durable queue in one SQLite file, safe across processes.

``sqlite:///PATH?topic=in`` (absolute path: four slashes, ``sqlite:////var/lib/q.db``). Options:
``visibility_timeout`` (seconds a received message stays hidden before it is delivered again,
default 30), ``poll_ms`` (how often an empty queue is polled, default 50).

A receive leases messages: one ``BEGIN IMMEDIATE`` transaction picks the oldest visible rows and
hides them for the visibility timeout under a lease token that names the consumer. Ack deletes the
row only while this lease holds; an expired lease lets another consumer take the message, and
`release_consumer` ends at once every lease of a consumer known to be gone. The group is the whole
file: every consumer of a topic shares its work.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from ...errors import BadRequest
from .base import BlockingCalls, Broker, BrokerURL, DeadLetter, Message

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    body BLOB NOT NULL,
    headers TEXT,
    published_at REAL NOT NULL,
    visible_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease TEXT,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (topic, visible_at, seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    source_topic TEXT NOT NULL,
    message_id TEXT NOT NULL,
    body BLOB NOT NULL,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    dead_at REAL NOT NULL
);
"""


class SQLiteBroker(Broker):
    scheme = "sqlite"

    def __init__(self, url: BrokerURL) -> None:
        super().__init__(url)
        path = url.path[1:] if url.path.startswith("/") else url.path  # sqlite:///rel, sqlite:////abs
        if not path or url.netloc:
            raise BadRequest(f"a SQLite queue URL looks like sqlite:///PATH, not {url}", code="invalid_broker_url")
        self.path = Path(path).expanduser()
        self.visibility_timeout = url.number("visibility_timeout", 30.0)
        self.poll_s = url.number("poll_ms", 50.0) / 1000
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._calls = BlockingCalls()

    async def connect(self) -> None:
        await asyncio.to_thread(self._open)
        self._calls.open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        db.executescript(SCHEMA)
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            await self._calls.close(self._close_db)

    def _close_db(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    async def _tx(self, fn, *args):
        """Run `fn(db, *args)` in a thread, in one write transaction (taken at BEGIN, so readers never deadlock)."""
        return await self._calls.run(self._transaction, fn, *args)

    def _transaction(self, fn, *args):
        if self._db is None:
            raise RuntimeError("broker is not connected: use `async with open_broker(url)`")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._db, *args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    async def publish(self, bodies: Sequence[bytes], topic: str | None = None, headers: dict | None = None) -> None:
        now = time.time()
        h = json.dumps(headers) if headers else None
        rows = [(topic or self.topic, bytes(b), h, now, now) for b in bodies]

        def insert(db):
            db.executemany(
                "INSERT INTO messages (topic, body, headers, published_at, visible_at) VALUES (?, ?, ?, ?, ?)", rows
            )

        await self._tx(insert)

    async def receive(self, max_messages: int, timeout_s: float) -> list[Message]:
        deadline = time.monotonic() + timeout_s
        while True:
            messages = await self._tx(self._lease, max_messages)
            if messages or time.monotonic() >= deadline:
                return messages
            await asyncio.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))

    def _lease(self, db: sqlite3.Connection, n: int) -> list[Message]:
        now = time.time()
        rows = db.execute(
            "SELECT seq, body, headers, published_at, attempts, last_error FROM messages"
            " WHERE topic = ? AND visible_at <= ? ORDER BY seq LIMIT ?",
            (self.topic, now, n),
        ).fetchall()
        if not rows:
            return []
        lease = f"{self.consumer} {uuid.uuid4().hex}"
        db.executemany(
            "UPDATE messages SET visible_at = ?, attempts = attempts + 1, lease = ? WHERE seq = ?",
            [(now + self.visibility_timeout, lease, r[0]) for r in rows],
        )
        return [
            Message(
                broker_id=str(seq),
                body=body,
                attempts=attempts + 1,
                published_at=published,
                headers=json.loads(headers) if headers else {},
                last_error=last_error,
                handle=(seq, lease),
            )
            for seq, body, headers, published, attempts, last_error in rows
        ]

    async def ack(self, messages: Sequence[Message]) -> None:
        handles = [m.handle for m in messages]
        sql = "DELETE FROM messages WHERE seq = ? AND lease = ?"
        await self._tx(lambda db: db.executemany(sql, handles))

    async def extend(self, messages: Sequence[Message]) -> None:
        rows = [(time.time() + self.visibility_timeout, *m.handle) for m in messages]
        sql = "UPDATE messages SET visible_at = ? WHERE seq = ? AND lease = ?"  # only while the lease is ours
        await self._tx(lambda db: db.executemany(sql, rows))

    async def retry(self, messages: Sequence[Message], reason: str, delay_s: float = 1.0) -> None:
        rows = [(time.time() + delay_s, reason, *m.handle) for m in messages]
        sql = "UPDATE messages SET visible_at = ?, last_error = ?, lease = NULL WHERE seq = ? AND lease = ?"
        await self._tx(lambda db: db.executemany(sql, rows))

    async def release_consumer(self, consumer: str) -> int:
        """Make every message that `consumer` (a process known to be gone) holds visible now, instead
        of when its visibility timeout ends; their delivery counts stay. Answers how many."""
        if not consumer or " " in consumer:
            return 0
        sql = "UPDATE messages SET visible_at = ?, lease = NULL WHERE topic = ? AND substr(lease, 1, ?) = ?"
        prefix = f"{consumer} "
        return await self._tx(lambda db: db.execute(sql, (time.time(), self.topic, len(prefix), prefix)).rowcount)

    async def dead_letter(self, entries: Sequence[tuple[Message, str]]) -> None:
        now = time.time()

        def move(db):
            for m, reason in entries:
                gone = db.execute("DELETE FROM messages WHERE seq = ? AND lease = ?", m.handle).rowcount
                if gone:  # still ours: nobody else dead-letters or processes it
                    db.execute(
                        "INSERT INTO dead_letters (topic, source_topic, message_id, body, reason, attempts, dead_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (self.dlq, self.topic, m.broker_id, m.body, reason, m.attempts, now),
                    )

        await self._tx(move)

    async def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        def read(db):
            return db.execute(
                "SELECT message_id, body, reason, attempts, source_topic, dead_at FROM dead_letters"
                " WHERE topic = ? ORDER BY seq LIMIT ?",
                (self.dlq, limit),
            ).fetchall()

        return [DeadLetter(*row) for row in await self._tx(read)]

    async def lag(self) -> int | None:
        def count(db):
            return db.execute("SELECT count(*) FROM messages WHERE topic = ?", (self.topic,)).fetchone()[0]

        return await self._tx(count)
