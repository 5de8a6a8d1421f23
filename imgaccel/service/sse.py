"""Server-sent events for the service's API: the latest record of a job or prewarm task on
every change, until it is finished.

``Watchers.publish(key, snapshot)`` hands a snapshot to every open stream of ``key``;
``Watchers.stream`` answers one ``GET .../events``: the first snapshot at once, then each
change (a burst of changes sends only the newest), a keep-alive comment every
``KEEPALIVE`` seconds (re-reading the record then, in case a change came from elsewhere; every
``SHARED_POLL`` seconds when replicas share the store), and the end of the stream after a final
snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

KEEPALIVE = 15.0
SHARED_POLL = 1.0  # seconds between re-reads when the store is shared by several replicas
Snapshot = dict[str, Any]


class Watchers:
    def __init__(self) -> None:
        self._queues: defaultdict[str, set[asyncio.Queue[Snapshot]]] = defaultdict(set)
        self._changed = asyncio.Event()  # set (and replaced) on every publish
        self.closed = False  # the service is stopping: streams end

    async def changed(self, timeout: float) -> None:
        """Return at the next publish of any key, or after ``timeout`` seconds."""
        if not self.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    def close(self) -> None:
        """End every stream (the service is stopping; browsers reconnect to another replica)."""
        self.closed = True
        self._changed.set()
        for queues in self._queues.values():
            for q in queues:
                q.put_nowait({})  # wakes the stream, which sees ``closed``

    def publish(self, key: str, snapshot: Callable[[], Snapshot]) -> None:
        """``snapshot`` is called only when someone watches ``key``."""
        self._changed.set()
        self._changed = asyncio.Event()
        queues = self._queues.get(key)
        if queues:
            made = snapshot()
            for q in list(queues):
                q.put_nowait(made)

    async def stream(self, request: web.Request, key: str, event: str, first: Snapshot,
                     final: Callable[[Snapshot], bool], reread: Callable[[], Awaitable[Snapshot | None]],
                     min_interval: float = 0.0, shared: bool = False) -> web.StreamResponse:  # fmt: skip
        """Stream ``key``'s snapshots as ``event`` events, at most one per ``min_interval`` s.
        ``shared``: the record may change in another replica, so it is re-read every
        ``SHARED_POLL`` seconds (a replica publishes only its own changes)."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        queue: asyncio.Queue[Snapshot] = asyncio.Queue()
        self._queues[key].add(queue)
        try:
            snapshot = first
            while not self.closed:
                while not queue.empty():  # a burst of changes: only the newest is sent
                    snapshot = queue.get_nowait()
                await resp.write(f"event: {event}\ndata: {json.dumps(snapshot)}\n\n".encode())
                if final(snapshot):
                    break
                try:
                    snapshot = await asyncio.wait_for(queue.get(), SHARED_POLL if shared else KEEPALIVE)
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    snapshot = await reread() or snapshot
                if self.closed:
                    break  # (not the empty snapshot ``close`` woke it with)
                if min_interval:
                    await asyncio.sleep(min_interval)
        finally:
            self._queues[key].discard(queue)
            if not self._queues[key]:
                del self._queues[key]
        return resp
