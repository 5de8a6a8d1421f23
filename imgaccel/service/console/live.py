"""Live updates of the console's pages: server-sent events carrying HTML fragments that the
pages' own templates render, sent whenever they change.

One stream per open page (``/ui/live/...``). Each event is ``event: update`` with a JSON
object: ``{"items": [[key, html], ...]}`` for a list (the page keeps the elements whose
``data-key`` it already shows, replaces changed ones and inserts new ones in order), or
``{"html": ..., "final": bool}`` for one record (``final``: it will not change again, the page
closes the stream). The fragment is re-rendered on every change the replica publishes (at
most every ``MIN_INTERVAL`` s), every ``SHARED_POLL`` s when replicas share the store (a
change may come from another replica), and at least every ``LIVE_POLL`` s (durations move);
it is sent only when it differs from the last one sent. A store outage sends ``event:
paused`` with the reason and the stream keeps trying. Streams end when the page goes away or
the service stops (``Watchers.close``; the browser reconnects, to another replica if need be).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from imgaccel.service.job_store import STORE_ERRORS
from imgaccel.service.sse import SHARED_POLL, Watchers

log = logging.getLogger(__name__)
MIN_INTERVAL = 0.5  # seconds between two renders of one stream
LIVE_POLL = 5.0  # seconds between renders when nothing was published
KEEPALIVE = 15.0  # seconds between keep-alive comments while nothing changes


async def stream_rendered(
    request: web.Request,
    render: Callable[[], Awaitable[dict[str, Any]]],
    watchers: Watchers,
    shared: bool,
    headers: dict[str, str],
) -> web.StreamResponse:
    """Send ``render()`` as ``update`` events while it changes, until it says ``final``."""
    resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-store"})
    await resp.prepare(request)
    last = ""
    quiet_since = time.monotonic()
    try:
        while True:
            try:
                data = await render()
            except STORE_ERRORS as e:
                log.warning("console live update: the store is unavailable: %s", e)
                await resp.write(f"event: paused\ndata: {json.dumps({'error': str(e)})}\n\n".encode())
                data = {}
            else:
                text = json.dumps(data)
                if text != last:
                    await resp.write(f"event: update\ndata: {text}\n\n".encode())
                    last, quiet_since = text, time.monotonic()
                elif time.monotonic() - quiet_since > KEEPALIVE:
                    await resp.write(b": keep-alive\n\n")
                    quiet_since = time.monotonic()
            if data.get("final"):
                return resp
            await watchers.changed(SHARED_POLL if shared else LIVE_POLL)
            if watchers.closed or request.transport is None or request.transport.is_closing():
                return resp  # the service is stopping, or the page was closed
            await asyncio.sleep(MIN_INTERVAL)
    except ConnectionResetError:  # the page was closed or left
        return resp
