"""Multi-range blob reads against answers the real registry does not give: parts out of order
after a preamble, and malformed parts (the client then asks one range per request). The
server is a real HTTP server on 127.0.0.1; the registry's own multipart answers are tested in
test_registry_faults.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from aiohttp import web

from imgaccel.pusher.client import RegistryClient
from tests.threaded_app import ThreadedApp

BLOB = bytes(range(256)) * 4096  # 1 MiB
DIGEST = "sha256:" + "ab" * 32
BOUNDARY = "3d6b6a416f9b5"


def _ranges(header: str) -> list[tuple[int, int]]:
    spans = []
    for spec in header.removeprefix("bytes=").split(","):
        first, _, last = spec.partition("-")
        spans.append((int(first), int(last) + 1))
    return spans


class BlobServer:
    """Serves BLOB; ``style`` says how a multi-range GET is answered."""

    def __init__(self, style: str) -> None:
        self.style = style
        self.requests: list[int] = []  # ranges per request
        app = web.Application()
        app.router.add_get("/v2/repo/blobs/{digest}", self._blob)
        self._server = ThreadedApp(app)

    async def _blob(self, request: web.Request) -> web.Response:
        spans = _ranges(request.headers["Range"])
        self.requests.append(len(spans))
        if len(spans) == 1:
            (a, b) = spans[0]
            return web.Response(status=206, body=BLOB[a:b], headers={"Content-Range": f"bytes {a}-{b - 1}/{len(BLOB)}"})
        parts = []
        for a, b in reversed(spans):  # any order is allowed
            headers = f"Content-Type: application/octet-stream\r\nContent-Range: bytes {a}-{b - 1}/{len(BLOB)}\r\n"
            if self.style == "no-content-range":
                headers = "Content-Type: application/octet-stream\r\n"
            parts.append(f"--{BOUNDARY}  \r\n{headers}\r\n".encode() + BLOB[a:b] + b"\r\n")
        body = b"this is a preamble\r\n" + b"".join(parts) + f"--{BOUNDARY}--\r\nepilogue".encode()
        return web.Response(
            status=206, body=body, headers={"Content-Type": f'multipart/byteranges; boundary="{BOUNDARY}"'}
        )

    def __enter__(self) -> str:
        return f"127.0.0.1:{self._server.start()}"

    def __exit__(self, *exc: object) -> None:
        self._server.stop()


@pytest.fixture(params=["ok", "no-content-range"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[BlobServer, str]]:
    blob_server = BlobServer(request.param)
    with blob_server as host:
        yield blob_server, host


def test_multipart_answers_are_read_by_length_or_refused(server: tuple[BlobServer, str]) -> None:
    blob_server, host = server
    spans = [(10, 5000), (70_000, 70_001), (300_000, 400_000)]

    async def go() -> tuple[list[bytes], list[bytes], bool]:
        async with RegistryClient(host) as client:
            first = await client.fetch_ranges("repo", DIGEST, spans)
            second = await client.fetch_ranges("repo", DIGEST, spans)
            return first, second, client.multi_range_unsupported

    first, second, refused = asyncio.run(go())
    assert first == second == [BLOB[a:b] for a, b in spans]
    if blob_server.style == "ok":
        assert (blob_server.requests, refused) == ([3, 3], False)
    else:  # one malformed answer, then one range per request
        assert (blob_server.requests, refused) == ([3, 1, 1, 1, 1, 1, 1], True)
