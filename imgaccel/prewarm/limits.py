"""How fast a prewarm task may go: requests in flight towards the registry (halved on every
429, never below one) and an optional average bandwidth."""

from __future__ import annotations

import asyncio
import time
from types import TracebackType


class AdaptiveLimit:
    """A semaphore whose size can shrink while it is held (``reduce``)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.active = 0
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.active < self.limit)
            self.active += 1

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        async with self._changed:
            self.active -= 1
            self._changed.notify_all()

    def reduce(self) -> int:
        """Halve the limit (at least 1); returns the new one."""
        self.limit = max(1, self.limit // 2)
        return self.limit


class Pacer:
    """Keeps the average rate of ``spent`` bytes at or under ``rate`` bytes per second."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self.started = time.monotonic()
        self.sent = 0

    async def spent(self, n: int) -> None:
        self.sent += n
        if self.rate is None:
            return
        ahead = self.sent / self.rate - (time.monotonic() - self.started)
        if ahead > 0:
            await asyncio.sleep(ahead)
