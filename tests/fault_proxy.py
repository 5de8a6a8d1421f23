"""A real HTTP proxy on 127.0.0.1 in front of the real registry that injects faults the
registry itself cannot produce: 429 with Retry-After, 503, and connections dropped mid-blob."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

# A rule sees (method, path, how many times this method+path was seen) and returns a fault name:
# "429", "503", "drop" (close the connection mid-body) or "slow" (wait 3 s, then forward).
Rule = Callable[[str, str, int], str | None]
HOP_HEADERS = {"transfer-encoding", "connection", "keep-alive", "content-encoding"}


@dataclass
class FaultProxy:
    upstream: str  # host:port of the real registry
    rule: Rule
    host: str = ""
    faults: Counter[str] = field(default_factory=Counter)
    seen: Counter[tuple[str, str]] = field(default_factory=Counter)
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        key = (request.method, request.path)
        self.seen[key] += 1
        fault = self.rule(request.method, request.path, self.seen[key])
        if fault == "429":
            self.faults[fault] += 1
            return web.Response(status=429, headers={"Retry-After": "1"}, text="slow down")
        if fault == "503":
            self.faults[fault] += 1
            return web.Response(status=503, text="unavailable")
        if fault == "slow":
            self.faults[fault] += 1
            await asyncio.sleep(3)
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS | {"content-length"}}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.request(
                request.method,
                f"http://{self.upstream}{request.path_qs}",
                headers=headers,
                data=body or None,
                allow_redirects=False,
            ) as up,
        ):
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in HOP_HEADERS}
            resp = web.StreamResponse(status=up.status, headers=out_headers)
            await resp.prepare(request)
            sent = 0
            async for block in up.content.iter_chunked(64 << 10):
                if fault == "drop" and sent + len(block) > int(up.headers.get("Content-Length", "0")) // 2:
                    self.faults[fault] += 1
                    assert request.transport is not None
                    request.transport.close()  # the connection dies mid-body
                    return resp
                await resp.write(block)
                sent += len(block)
            await resp.write_eof()
            return resp

    def start(self) -> FaultProxy:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.host = f"127.0.0.1:{port}"
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        assert self._loop is not None and self._runner is not None and self._thread is not None
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        fut.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
