"""Blob bodies written to clients, streamed in blocks of at most 1 MiB (no blob is ever held in
memory whole).

* A whole blob is re-hashed as it is sent, from the store or from a fill that is still
  downloading, and its **last block is held back until everything sent hashes to the digest**.
  On a mismatch the connection is closed instead: the client has announced Content-Length
  bytes minus at least one, so every HTTP client sees a truncated body and fails, and no
  client ever receives a complete body that is not the blob. This lets a client start reading
  a large layer while the node is still fetching it (rather than waiting for the whole
  download and its verification before the first byte), at the price of at most one block
  (1 MiB) held back.
* Byte ranges (one, or several as ``multipart/byteranges``) come from the store or straight
  from upstream; they cannot be checked against the blob's digest on their own (the reader
  checks every chunk against its index).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from aiohttp import web

from imgaccel.cachenode.ranges import PART_TYPE, content_range, multipart

BLOCK = 1 << 20
# For a fill: waits until bytes past the offset are written, returns how many there are (raises
# when the fill failed).
Ready = Callable[[int], Awaitable[int]]


async def _pread(fd: int, length: int, offset: int) -> bytes:
    return await asyncio.get_running_loop().run_in_executor(None, os.pread, fd, length, offset)


def abort(request: web.Request) -> None:
    """Close the connection mid-body: the client sees fewer bytes than Content-Length."""
    if request.transport is not None:
        request.transport.close()


async def send_whole(
    request: web.Request,
    headers: dict[str, str],
    fd: int,
    size: int,
    digest: str,
    ready: Ready | None,
    count: Callable[[int], None],
) -> tuple[web.StreamResponse, bool]:
    """Send the blob in ``fd`` (200), verified as described above; ``(response, verified)``."""
    resp = web.StreamResponse(status=200, headers={**headers, "Content-Length": str(size)})
    await resp.prepare(request)
    h = hashlib.new(digest.split(":", 1)[0])
    pos = 0
    while pos < size:
        try:
            available = size if ready is None else min(await ready(pos), size)
        except Exception:  # the fill failed: the client must not mistake what it got for the blob
            abort(request)
            return resp, False
        block = await _pread(fd, min(BLOCK, available - pos), pos) if available > pos else b""
        if not block:
            if ready is None:  # the file is shorter than it was stored as
                abort(request)
                return resp, False
            continue  # a fill that started over: wait for it to get here again
        h.update(block)
        if pos + len(block) == size and f"{digest.split(':', 1)[0]}:{h.hexdigest()}" != digest:
            abort(request)
            return resp, False
        await resp.write(block)
        count(len(block))
        pos += len(block)
    await resp.write_eof()
    return resp, True


async def file_pieces(fd: int, spans: list[tuple[int, int]]) -> AsyncGenerator[bytes, None]:
    """The bytes of ``spans`` of a stored file, in blocks."""
    for start, end in spans:
        for pos in range(start, end, BLOCK):
            want = min(BLOCK, end - pos)
            data = await _pread(fd, want, pos)
            if len(data) != want:
                raise OSError(f"stored blob is shorter than {end} bytes")
            yield data


async def send_spans(
    request: web.Request,
    headers: dict[str, str],
    spans: list[tuple[int, int]],
    size: int,
    pieces: AsyncIterator[bytes],
    count: Callable[[int], None],
) -> web.StreamResponse:
    """206 with the bytes of ``spans`` (``pieces`` yields them in order, never crossing from one
    span into the next): one span as is, several as ``multipart/byteranges``. The first piece
    is read before the status line is sent, so a source that fails at once gives an error
    answer, not a cut connection."""
    it = aiter(pieces)
    first: bytes | None = await anext(it)
    if len(spans) == 1:
        start, end = spans[0]
        hdrs = {"Content-Range": content_range(start, end, size), "Content-Length": str(end - start),
                "Content-Type": PART_TYPE}  # fmt: skip
        framing = None
    else:
        framing = multipart(spans, size)
        hdrs = {"Content-Type": framing.content_type, "Content-Length": str(framing.length)}
    resp = web.StreamResponse(status=206, headers={**headers, **hdrs})
    await resp.prepare(request)
    for i, (start, end) in enumerate(spans):
        if framing is not None:
            await resp.write(framing.heads[i])
        left = end - start
        while left > 0:
            data = first if first is not None else await anext(it)
            first = None
            if len(data) > left:
                raise ValueError("a piece crosses the end of its range")
            await resp.write(data)
            count(len(data))
            left -= len(data)
    if framing is not None:
        await resp.write(framing.tail)
    await resp.write_eof()
    return resp
