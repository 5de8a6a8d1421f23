"""Chunk-aware Range requests (``Imgaccel-Chunks``, see ``formats.cache_chunks``): byte ranges
of a blob that is not stored whole, answered from the blob's stored chunks where they cover
the bytes and from upstream elsewhere, keeping each chunk the client listed whose upstream
bytes hash to its digest. No whole-blob fill is started for them.

A request is planned before its first byte goes out: each span is cut into segments served
from a stored chunk, from another request's fetch of a listed chunk (*joined*: one upstream
fetch per chunk however many requests want it at once), or from upstream. The upstream
segments of one request are read as one ``Upstream.read_spans`` stream (multi-range requests,
pieces of bounded size), lazily, in the order the client receives them; the listed chunks in
them are written to store writers (temporary files, hashed as written) as their bytes pass,
and stored if their digest matches. A mismatch is logged and counted, the chunk is not stored,
and the bytes still go to the client, which verifies every chunk itself (the status line is
out by then anyway).

Claims are taken while a request is planned, with no await between looking and claiming, so a
request only ever waits for chunks claimed by requests planned before it: waits cannot form a
cycle. A request that ends early (client gone, upstream failure) gives up its unfinished claims;
a request waiting for one of those then reads the bytes from upstream itself, as it does after
``JOIN_TIMEOUT`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field

from imgaccel.cachenode.metrics import Metrics
from imgaccel.cachenode.responses import file_pieces
from imgaccel.cachenode.store import Store, StoredChunk, VerifyError, Writer
from imgaccel.cachenode.upstream import Upstream
from imgaccel.formats.cache_chunks import CacheChunk

log = logging.getLogger(__name__)

JOIN_TIMEOUT = 30.0  # seconds a request waits for another request's fetch of a chunk
ChunkKey = tuple[str, StoredChunk]  # (blob digest, chunk)


@dataclass
class _Claim:
    """A listed chunk this request fetches from upstream and stores for everyone."""

    key: ChunkKey
    done: asyncio.Future[bool]  # True once stored
    writer: Writer | None = None
    over: bool = False  # stored, refused, or given up


@dataclass
class _Stored:
    chunk: StoredChunk
    start: int
    end: int


@dataclass
class _Join:
    chunk: StoredChunk
    done: asyncio.Future[bool]
    start: int
    end: int


@dataclass
class _Fetch:
    fetch_start: int  # upstream bytes from here: a claimed chunk may start before ``start``
    start: int
    end: int
    claims: list[_Claim] = field(default_factory=list)


Segment = _Stored | _Join | _Fetch


class ChunkReads:
    """The chunk fetches running on one cache node, keyed by blob and chunk."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics
        self._claims: dict[ChunkKey, asyncio.Future[bool]] = {}

    def plan(
        self, upstream: Upstream, repo: str, digest: str, spans: list[tuple[int, int]], listed: Sequence[CacheChunk]
    ) -> ChunkRead:
        """Plan the answer to ``spans`` of blob ``digest`` with ``listed`` chunks (sorted, as
        ``parse_chunks`` returns them); call ``ChunkRead.close`` when done with it."""
        read = ChunkRead(self, upstream, repo, digest)
        chunks = [StoredChunk(*c) for c in listed]
        try:
            for start, end in spans:
                inside = [c for c in chunks if start <= c.offset and c.end <= end]
                self._plan_span(read, start, end, inside)
        except BaseException:
            read.close()
            raise
        return read

    def _plan_span(self, read: ChunkRead, start: int, end: int, inside: list[StoredChunk]) -> None:
        """Segments for ``[start, end)``; ``inside``: the listed chunks lying wholly in it."""
        pos, i = start, 0
        fetch: _Fetch | None = None
        while pos < end:
            while i < len(inside) and inside[i].end <= pos:
                i += 1
            listed = inside[i] if i < len(inside) and inside[i].offset <= pos else None
            reused = self._reuse(read.digest, pos, end, listed)
            if reused is not None:
                read.segments.append(reused)
                fetch, pos = None, reused.end
                continue
            next_listed = inside[i].offset if i < len(inside) else end
            fetch = self._fetch_from(read, fetch, pos, end, listed, next_listed)
            pos = fetch.end

    def _reuse(self, blob: str, pos: int, end: int, listed: StoredChunk | None) -> _Stored | _Join | None:
        """Bytes from ``pos`` that need no fetch of this request: a stored chunk holding byte
        ``pos``, or the listed chunk holding it while another request fetches it."""
        stored = self.store.covering(blob, pos)
        if stored is not None:
            self.metrics.lookups.labels("chunk", "hit").inc()
            return _Stored(stored, pos, min(stored.end, end))
        if listed is not None and (done := self._claims.get((blob, listed))) is not None:
            self.metrics.lookups.labels("chunk", "joined").inc()
            return _Join(listed, done, pos, listed.end)
        return None

    def _fetch_from(self, read: ChunkRead, fetch: _Fetch | None, pos: int, end: int, listed: StoredChunk | None,
                    next_listed: int) -> _Fetch:  # fmt: skip
        """``fetch`` (the upstream segment ending at ``pos``, if any) extended, or a new one
        started, over the bytes from ``pos``: the ``listed`` chunk holding ``pos`` (claimed:
        fetched from its first byte), else up to where the next listed or stored chunk starts."""
        if listed is not None:
            first, hi = listed.offset, listed.end
        else:
            next_stored = self.store.next_chunk(read.digest, pos)
            first, hi = pos, min(next_listed, end if next_stored is None else next_stored, end)
        if fetch is None or first < fetch.fetch_start:
            fetch = _Fetch(first, pos, hi)
            read.segments.append(fetch)
        fetch.end = hi
        if listed is not None:
            fetch.claims.append(self._claim((read.digest, listed)))
            self.metrics.lookups.labels("chunk", "miss").inc()
        return fetch

    def _claim(self, key: ChunkKey) -> _Claim:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._claims[key] = done
        return _Claim(key, done)

    def release(self, claim: _Claim, stored: bool) -> None:
        """The claim is over: wake the requests waiting for it."""
        claim.over = True
        if claim.writer is not None:
            claim.writer.close()  # (after a commit: nothing to do)
        if not claim.done.done():
            claim.done.set_result(stored)
        if self._claims.get(claim.key) is claim.done:
            del self._claims[claim.key]


class ChunkRead:
    """One planned request: ``pieces()`` yields its bytes in order; ``close()`` gives up the
    claims it has not finished, whether or not it was read."""

    def __init__(self, reads: ChunkReads, upstream: Upstream, repo: str, digest: str) -> None:
        self.reads = reads
        self.upstream = upstream
        self.repo = repo
        self.digest = digest
        self.segments: list[Segment] = []

    async def pieces(self) -> AsyncGenerator[bytes, None]:
        fetches = [s for s in self.segments if isinstance(s, _Fetch)]
        stream = self.upstream.read_spans(self.repo, self.digest, [(f.fetch_start, f.end) for f in fetches])
        async with contextlib.aclosing(stream):
            for segment in self.segments:
                if isinstance(segment, _Stored):
                    parts = self._from_store(segment.chunk, segment.start, segment.end)
                elif isinstance(segment, _Join):
                    parts = self._joined(segment)
                else:
                    parts = self._fetched(segment, stream)
                async with contextlib.aclosing(parts):
                    async for piece in parts:
                        yield piece

    async def _from_store(self, chunk: StoredChunk, start: int, end: int) -> AsyncGenerator[bytes, None]:
        """Bytes ``[start, end)`` of the blob from a stored chunk holding them, or from upstream
        when the chunk is gone (evicted since the request was planned)."""
        fd = self.reads.store.open_chunk(self.digest, chunk)
        if fd is None:
            async with contextlib.aclosing(self.upstream.read_spans(self.repo, self.digest, [(start, end)])) as up:
                async for piece in up:
                    self.reads.metrics.served.labels("upstream").inc(len(piece))
                    yield piece
            return
        try:
            async with contextlib.aclosing(file_pieces(fd, [(start - chunk.offset, end - chunk.offset)])) as pieces:
                async for piece in pieces:
                    self.reads.metrics.served.labels("chunks").inc(len(piece))
                    yield piece
        finally:
            os.close(fd)

    async def _joined(self, segment: _Join) -> AsyncGenerator[bytes, None]:
        """Bytes of a chunk another request is fetching, from the store once it is stored, else
        (it failed, or took longer than ``JOIN_TIMEOUT``) from upstream."""
        with contextlib.suppress(TimeoutError):  # then read from upstream
            await asyncio.wait_for(asyncio.shield(segment.done), JOIN_TIMEOUT)
        async with contextlib.aclosing(self._from_store(segment.chunk, segment.start, segment.end)) as pieces:
            async for piece in pieces:
                yield piece

    async def _fetched(self, segment: _Fetch, stream: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
        """Upstream bytes of the segment; the claimed chunks in them are stored before the bytes
        that complete them go out (a client that has every byte finds its chunks stored, and a
        response ends without asking for more pieces)."""
        pos = segment.fetch_start
        while pos < segment.end:
            data = await anext(stream)
            for claim in segment.claims:
                self._feed(claim, pos, data)
                if not claim.over and claim.key[1].end <= pos + len(data):
                    await self._finish(claim)
            skip = max(segment.start - pos, 0)
            if skip < len(data):
                self.reads.metrics.served.labels("upstream").inc(len(data) - skip)
                yield data[skip:] if skip else data
            pos += len(data)

    def _feed(self, claim: _Claim, pos: int, data: bytes) -> None:
        """The bytes of ``data`` (blob bytes from ``pos``) that belong to the claimed chunk."""
        chunk = claim.key[1]
        lo, hi = max(chunk.offset, pos), min(chunk.end, pos + len(data))
        if claim.over or hi <= lo:
            return
        try:
            if claim.writer is None:
                claim.writer = self.reads.store.chunk_writer(self.digest, chunk)
                claim.writer.reserve()
            claim.writer.write(memoryview(data)[lo - pos : hi - pos])
        except OSError as e:
            log.warning("store: cannot keep chunk %d+%d of %s: %s", chunk.offset, chunk.length, self.digest, e)
            self.reads.metrics.chunks.labels("failed").inc()
            self.reads.release(claim, False)

    async def _finish(self, claim: _Claim) -> None:
        chunk, writer = claim.key[1], claim.writer
        stored, result = False, "failed"
        try:
            if writer is not None:
                stored = await writer.commit()
                result = "stored" if stored else "too_big"
        except VerifyError as e:
            result = "mismatch"
            log.warning("%s/%s@%s: chunk %d+%d does not match its listed digest (%s); not stored",
                        self.upstream.host, self.repo, self.digest, chunk.offset, chunk.length, e)  # fmt: skip
        except OSError as e:
            log.warning("store: cannot keep chunk %d+%d of %s: %s", chunk.offset, chunk.length, self.digest, e)
        finally:
            self.reads.metrics.chunks.labels(result).inc()
            self.reads.release(claim, stored)

    def close(self) -> None:
        for segment in self.segments:
            if isinstance(segment, _Fetch):
                for claim in segment.claims:
                    if not claim.over:
                        self.reads.release(claim, False)
