"""What the catalog last said about each API key id, bounded so that made-up ids cannot push out the
keys in use.

Two LRUs, bounded apart: rows the catalog returned (known ids) and ids it said do not exist (unknown
ids). A flood of random ids only ever evicts other random ids. A known row is *fresh* for `fresh_s`
(then it is read again, so a revocation made by another process takes effect); while the catalog
cannot be reached it may still be used until it is `stale_s` old. An unknown id is never used stale:
while the catalog is down nobody can say whether it was created meanwhile.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")
Row = TypeVar("Row")


class Lru(Generic[K, V]):
    """A dict that forgets its least recently used entry beyond `max_entries` (not thread-safe)."""

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("an LRU needs room for at least one entry")
        self.max_entries = max_entries
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def pop(self, key: K) -> V | None:
        return self._items.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


class KeyCache(Generic[Row]):
    """Rows by key id with the (monotonic) time the catalog last vouched for them."""

    def __init__(self, fresh_s: float, stale_s: float, max_known: int = 10_000, max_unknown: int = 10_000) -> None:
        self.fresh_s = fresh_s
        self.stale_s = max(stale_s, fresh_s)
        self._known: Lru[str, tuple[float, Row]] = Lru(max_known)
        self._unknown: Lru[str, float] = Lru(max_unknown)
        self._lock = threading.Lock()

    def fresh(self, key_id: str, now: float) -> tuple[bool, Row | None]:
        """(True, row) for a fresh known id, (True, None) for a fresh unknown one, else (False, None)."""
        with self._lock:
            known = self._known.get(key_id)
            if known is not None:
                at, row = known
                return (True, row) if now - at < self.fresh_s else (False, None)
            seen = self._unknown.get(key_id)
            return seen is not None and now - seen < self.fresh_s, None

    def stale(self, key_id: str, now: float) -> tuple[float, Row] | None:
        """The last row of a known id and its age, if it is younger than `stale_s` (for an outage)."""
        with self._lock:
            known = self._known.get(key_id)
        if known is None or now - known[0] >= self.stale_s:
            return None
        return now - known[0], known[1]

    def remember(self, key_id: str, row: Row | None, at: float) -> None:
        """What the catalog said at `at` (the time the read began). An answer older than the one
        cached is dropped: a read that raced with a revocation in this process must not undo it."""
        with self._lock:
            known = self._known.get(key_id)
            seen = known[0] if known is not None else self._unknown.get(key_id)
            if seen is not None and seen > at:
                return
            if row is None:
                self._known.pop(key_id)
                self._unknown.put(key_id, at)
            else:
                self._unknown.pop(key_id)
                self._known.put(key_id, (at, row))

    def sizes(self) -> tuple[int, int]:
        """(known ids, unknown ids) held."""
        with self._lock:
            return len(self._known), len(self._unknown)
