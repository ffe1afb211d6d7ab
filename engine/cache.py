"""One least-recently-used cache for the whole project: slide views, open slide handles,
rendered deep-zoom tiles and the like. Thread-safe (web workers share caches between
request threads); the value is built outside the lock, so two threads asking for the same
missing key at once may both build it, and one result is kept -- cheaper than holding every
other lookup while a slide is read."""

from __future__ import annotations

import collections
import threading
from typing import Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


class LRUCache(Generic[V]):
    """At most `maxsize` entries -- or, with `weight`, entries whose weights sum to at most
    `maxsize` (e.g. `weight=len` bounds encoded tiles in bytes; a value heavier than the
    whole cache is not kept). `on_evict(value)` runs for each value pushed out or dropped
    (e.g. to close a slide handle), outside the lock."""

    def __init__(
        self, maxsize: int, on_evict: Callable[[V], None] | None = None, weight: Callable[[V], int] | None = None
    ):
        if maxsize < 1:
            raise ValueError("an LRU cache holds at least one entry")
        self.maxsize = maxsize
        self._on_evict = on_evict
        self._weight = weight or (lambda _value: 1)
        self._total = 0
        self._items: collections.OrderedDict[Hashable, V] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def keys(self) -> list[Hashable]:
        """A snapshot of the keys, least recently used first."""
        with self._lock:
            return list(self._items)

    def get(self, key: Hashable, default: V | None = None) -> V | None:
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Hashable, value: V) -> None:
        if self._weight(value) > self.maxsize:
            return
        evicted = []
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._total -= self._weight(old)
                if old is not value:
                    evicted.append(old)
            self._items[key] = value
            self._total += self._weight(value)
            while self._total > self.maxsize:
                _, dropped = self._items.popitem(last=False)
                self._total -= self._weight(dropped)
                evicted.append(dropped)
        self._evict(evicted)

    def get_or_build(self, key: Hashable, build: Callable[[], V]) -> V:
        """The cached value for `key`, else `build()` (cached)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = build()
        self.put(key, value)
        return value

    def pop(self, key: Hashable) -> None:
        """Drop `key` (its value is evicted)."""
        with self._lock:
            value = self._items.pop(key, None)
            if value is not None:
                self._total -= self._weight(value)
        if value is not None:
            self._evict([value])

    def pop_where(self, predicate: Callable[[Hashable], bool]) -> None:
        """Drop every entry whose key matches."""
        with self._lock:
            keys = [k for k in self._items if predicate(k)]
            values = [self._items.pop(k) for k in keys]
            self._total -= sum(self._weight(v) for v in values)
        self._evict(values)

    def clear(self) -> None:
        self.pop_where(lambda _key: True)

    def _evict(self, values: list[V]) -> None:
        if self._on_evict is not None:
            for value in values:
                self._on_evict(value)
