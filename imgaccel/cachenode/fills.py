"""Fills: whole blobs copied from upstream into the store, one copy per blob however many
requests want it (singleflight).

A fill writes into a store ``Writer`` (a temporary file, verified and renamed into place at the
end). Readers follow it while it grows: ``Fill.reader()`` hands them a duplicate of the file's
descriptor and ``Fill.wait(pos)`` wakes them as bytes arrive. A fill started for a client that
wants the whole blob now is *urgent* and starts at once; one started in the background (a
Range request for bytes not yet stored) waits for one of ``concurrency`` fill slots, unless an
urgent request for the same blob arrives meanwhile. At most ``max_waiting`` background fills
wait; beyond that new ones are not started (a later Range request starts them again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from imgaccel.cachenode.metrics import Metrics
from imgaccel.cachenode.store import Store, Writer
from imgaccel.cachenode.upstream import Upstream

log = logging.getLogger(__name__)


class Fill:
    def __init__(self, digest: str, writer: Writer) -> None:
        self.digest = digest
        self.size = writer.size
        self.writer = writer
        self.urgent = asyncio.Event()
        self.done = False
        self.error: BaseException | None = None
        self._changed = asyncio.Event()

    @property
    def written(self) -> int:
        """Bytes in the file now (back to 0 if the fill had to start over)."""
        return self.writer.written

    def notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait(self, pos: int) -> None:
        """Until more than ``pos`` bytes are written or the fill is over."""
        while not (self.written > pos or self.done):
            await self._changed.wait()

    def reader(self) -> int:
        """A file descriptor to ``os.pread`` the fill's bytes from; the caller closes it."""
        return os.dup(self.writer.fd)


class Fills:
    def __init__(self, store: Store, metrics: Metrics, concurrency: int, max_waiting: int = 256) -> None:
        self.store = store
        self.metrics = metrics
        self.max_waiting = max_waiting
        self._concurrency = concurrency
        self._slots: asyncio.Semaphore | None = None
        self._running: dict[str, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting = 0

    def __contains__(self, digest: str) -> bool:
        return digest in self._running

    def get(self, upstream: Upstream, repo: str, digest: str, size: int, urgent: bool) -> Fill | None:
        """The running fill of ``digest``, or a new one; None when a background fill is not
        started (too many waiting). Call without awaiting between the store lookup and this, so
        a fill that just finished cannot be missed."""
        fill = self._running.get(digest)
        if fill is None:
            if not urgent and self._waiting >= self.max_waiting:
                return None
            fill = Fill(digest, self.store.writer("blobs", digest, size))
            self._running[digest] = fill
            task = asyncio.create_task(self._run(fill, upstream, repo))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if urgent:
            fill.urgent.set()
        return fill

    async def _run(self, fill: Fill, upstream: Upstream, repo: str) -> None:
        slot = False
        result = "failed"
        try:
            if not fill.urgent.is_set():
                self._waiting += 1
                self.metrics.fills_waiting.inc()
                try:
                    slot = await self._slot_or(fill.urgent)
                finally:
                    self._waiting -= 1
                    self.metrics.fills_waiting.dec()
            self.metrics.fills_in_flight.inc()
            try:
                fill.writer.reserve()
                await upstream.copy_blob(repo, fill.digest, fill.writer, fill.notify)
                result = "stored" if await fill.writer.commit() else "not_stored"
            finally:
                self.metrics.fills_in_flight.dec()
        except Exception as e:
            fill.error = e
            log.warning("fill of %s/%s@%s failed: %s", upstream.host, repo, fill.digest, e)
        except asyncio.CancelledError as e:
            fill.error = e
            raise
        finally:
            if slot:
                assert self._slots is not None
                self._slots.release()
            fill.writer.close()
            if self._running.get(fill.digest) is fill:
                del self._running[fill.digest]
            fill.done = True
            fill.notify()
            self.metrics.fills.labels(result).inc()

    async def _slot_or(self, urgent: asyncio.Event) -> bool:
        """Wait for a fill slot (True: taken, release it) or for ``urgent`` (False)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._concurrency)
        acquire = asyncio.ensure_future(self._slots.acquire())
        hurry = asyncio.ensure_future(urgent.wait())
        try:
            await asyncio.wait({acquire, hurry}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled while waiting: give back a slot taken meanwhile
            hurry.cancel()
            if acquire.done() and not acquire.cancelled() and acquire.exception() is None:
                self._slots.release()
            acquire.cancel()
            raise
        hurry.cancel()
        if acquire.done():
            return True
        acquire.cancel()  # the semaphore passes a wake-up it gets meanwhile on to the next waiter
        return False

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
