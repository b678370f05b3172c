"""In-process helpers for hot lookups: a map of entries that expire, and single flights.

`LocalCache` is what one process may answer without asking Redis. Every entry carries its
own expiry, so a value read from a Redis entry that expires sooner never outlives it here.
Nothing is cached when the TTL is 0. Bounded: past `max_entries` the oldest insertions go
first (a hot entry is re-inserted whenever it is refreshed).

Each hit tells a tracked request (`shared/validity.py`) when the entry expires, and each miss
that the request read something from elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Generic, TypeVar

from shared import validity

K = TypeVar("K")
V = TypeVar("V")


class LocalCache(Generic[K, V]):
    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self._max_entries = max_entries
        self._entries: dict[K, tuple[V, float]] = {}

    def get(self, key: K) -> V | None:
        found = self._entries.get(key)
        if found is None:
            validity.read_elsewhere()
            return None
        if found[1] <= time.monotonic():
            self._entries.pop(key, None)
            validity.read_elsewhere()
            return None
        validity.depends_until(found[1])
        return found[0]

    def put(self, key: K, value: V, ttl: float | None = None) -> None:
        """Keep `value` for `ttl` seconds (at most the cache's own TTL when not given)."""
        seconds = self.ttl if ttl is None else ttl
        if seconds <= 0:
            self._entries.pop(key, None)
            return
        self._entries.pop(key, None)
        self._entries[key] = (value, time.monotonic() + seconds)
        if len(self._entries) > self._max_entries:
            del self._entries[next(iter(self._entries))]

    def drop(self, *keys: K) -> None:
        for key in keys:
            self._entries.pop(key, None)


class SingleFlight(Generic[K, V]):
    """Concurrent calls for one key in this process share one call: when a hot entry
    expires, every request waiting on it would otherwise ask Redis (or the bucket) at once."""

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Future[V]] = {}

    async def run(self, key: K, call: Callable[[], Awaitable[V]]) -> V:
        running = self._running.get(key)
        if running is None:
            running = asyncio.ensure_future(call())
            self._running[key] = running
            running.add_done_callback(partial(self._finished, key))
        # Shielded: one waiter going away (a client hanging up) must not cancel the others'.
        return await asyncio.shield(running)

    def _finished(self, key: K, done: asyncio.Future[V]) -> None:
        if self._running.get(key) is done:
            del self._running[key]
        if not done.cancelled():
            done.exception()  # retrieved here, in case every waiter has gone
