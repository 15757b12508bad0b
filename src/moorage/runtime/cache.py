"""Loaded models, least recently used first out, bounded by the memory their weights take."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class ModelCache(Generic[T]):
    """`get_or_load` loads each key once even when many threads ask at the same time."""

    def __init__(self, max_bytes: int, size_of: Callable[[T], int]) -> None:
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._items: OrderedDict[Hashable, T] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[Hashable, threading.Lock] = {}

    def get_or_load(self, key: Hashable, load: Callable[[], T]) -> T:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:
                    return self._items[key]
            value = load()
            with self._lock:
                self._items[key] = value
                self._loading.pop(key, None)
                self._evict(keep=key)
            return value

    def _evict(self, keep: Hashable) -> None:
        while self.used_bytes > self.max_bytes and len(self._items) > 1:
            oldest = next(k for k in self._items if k != keep)
            self._items.pop(oldest)
            log.info("unloaded %s to stay under %d bytes", oldest, self.max_bytes)
        if self.used_bytes > self.max_bytes:
            log.warning("model %s alone takes more than the cache bound (%d bytes)", keep, self.max_bytes)

    def pop(self, key: Hashable) -> T | None:
        with self._lock:
            return self._items.pop(key, None)

    @property
    def used_bytes(self) -> int:
        return sum(self._size_of(v) for v in self._items.values())

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._items)
