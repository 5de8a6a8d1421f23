"""Two small concurrency helpers: ``SingleFlight`` (concurrent calls for one key share one run)
and ``TTLCache`` (answers kept for a while, bounded in number)."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """``await flights.run(key, fn)``: the first caller for ``key`` runs ``fn()`` in a task of its
    own; callers arriving while it runs wait for the same result (or exception). A caller that
    is cancelled (its client went away) does not cancel the run the others wait for."""

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Task[V]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._running

    async def run(self, key: K, fn: Callable[[], Awaitable[V]]) -> V:
        task = self._running.get(key)
        if task is None:

            async def call() -> V:
                try:
                    return await fn()
                finally:
                    self._running.pop(key, None)

            task = asyncio.ensure_future(call())
            self._running[key] = task
            task.add_done_callback(_consume)
        return await asyncio.shield(task)


def _consume(task: asyncio.Task[object]) -> None:
    """Mark an exception as retrieved: every waiter may have gone away."""
    if not task.cancelled():
        task.exception()


class TTLCache(Generic[K, V]):
    """Values that expire ``ttl`` seconds after they were put; at most ``limit`` entries (the
    oldest put are dropped first). ``stale`` returns an expired value still held."""

    def __init__(self, ttl: float, limit: int = 100_000) -> None:
        self.ttl = ttl
        self.limit = limit
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None or item[0] <= time.monotonic():
            return None
        return item[1]

    def stale(self, key: K) -> V | None:
        item = self._items.get(key)
        return None if item is None else item[1]

    def put(self, key: K, value: V) -> None:
        self._items.pop(key, None)
        self._items[key] = (time.monotonic() + self.ttl, value)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
