"""A real HTTP proxy on 127.0.0.1 in front of the real registry that injects faults the
registry itself cannot produce: 429 with Retry-After, 503, and connections dropped mid-blob.
It also counts the body bytes it forwarded per path (the "registry egress") and can hold the
link to ``rate`` bytes per second."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from tests.threaded_app import ThreadedApp

# A rule sees (method, path, how many times this method+path was seen) and returns a fault name:
# "429", "503", "drop" (close the connection mid-body), "slow" (wait 3 s, then forward) or
# "norange" (forward without the Range header: answer 200 with the whole blob), or
# "nomultirange" (like S3: a Range header listing several ranges is dropped and the whole blob
# sent with 200, slowly, so a client that hangs up early is seen doing so; one range is kept).
Rule = Callable[[str, str, int], str | None]
HOP_HEADERS = {"transfer-encoding", "connection", "keep-alive", "content-encoding"}


@dataclass
class FaultProxy:
    upstream: str  # host:port of the real registry
    rule: Rule
    host: str = ""
    faults: Counter[str] = field(default_factory=Counter)
    seen: Counter[tuple[str, str]] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)  # body bytes written, by fault
    body_bytes: Counter[str] = field(default_factory=Counter)  # body bytes forwarded, by request path
    rate: int | None = None  # bytes per second of every body (None: as fast as it goes)
    _server: ThreadedApp = field(init=False)

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
        if fault == "norange":  # a registry (or CDN) that ignores Range and sends the whole blob
            self.faults[fault] += 1
            headers.pop("Range", None)
        if fault == "nomultirange":
            if "," not in headers.get("Range", ""):
                fault = None
            else:
                self.faults[fault] += 1
                headers.pop("Range", None)
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
                try:
                    await resp.write(block)
                except ConnectionError:
                    return resp  # the client hung up
                sent += len(block)
                self.body_bytes[request.path] += len(block)
                if self.rate is not None:
                    await asyncio.sleep(len(block) / self.rate)
                if fault is not None:
                    self.sent[fault] += len(block)
                if fault == "nomultirange":
                    await asyncio.sleep(0.01)
            await resp.write_eof()
            return resp

    def start(self) -> FaultProxy:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._server = ThreadedApp(app)
        self.host = f"127.0.0.1:{self._server.start()}"
        return self

    def stop(self) -> None:
        self._server.stop()
