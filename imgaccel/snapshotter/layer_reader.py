"""``LayerReader``: random access into one layer's uncompressed tar through its index.

A read maps to the chunks covering it; runs of adjacent chunks are fetched with one Range
request, each chunk is decoded and verified (``indexer.chunk_decoder``) before any byte of it
is returned. A small in-memory LRU keeps recently decoded chunks for sequential reads; an optional
``ChunkCache`` keeps verified chunks (or 1 MiB blocks) on disk across reads, mounts and
processes. A chunk that fails verification is fetched once more, then the read fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from imgaccel.formats.layer_index import BLOCK_SIZE, LayerIndex
from imgaccel.indexer.chunk_decoder import ChunkVerificationError, decode_chunk
from imgaccel.snapshotter.chunk_cache import ChunkCache

log = logging.getLogger(__name__)


class RangeFetcher(Protocol):
    async def fetch_range(self, repo: str, digest: str, start: int, end: int) -> bytes: ...


class ChunkReadError(IOError):
    """A chunk could not be fetched or failed verification: no byte of it was returned."""


@dataclass
class ReadStats:
    requests: int = 0
    bytes_fetched: int = 0
    chunks_decoded: int = 0
    refetches: int = 0
    verification_failures: int = 0


class LayerReader:
    def __init__(
        self,
        fetcher: RangeFetcher,
        repo: str,
        blob_digest: str,
        index: LayerIndex,
        windows: list[bytes] | None = None,
        cache_chunks: int = 8,
        *,
        blob_size: int = 0,
        index_size: int = 0,
        disk_cache: ChunkCache | None = None,
    ) -> None:
        self.fetcher = fetcher
        self.repo = repo
        self.blob_digest = blob_digest
        self.index = index
        self.blob_size = blob_size  # size of the blob chunks are read from
        self.index_size = index_size  # bytes of the index blob or TOC frame
        self.windows = windows or []
        self.disk_cache = disk_cache
        self.on_fetch: Callable[[float], None] | None = None  # seconds per Range request (metrics)
        self.readahead = True  # sequential reads prefetch the next chunk
        self.gap = 64 << 10  # merge Range requests for chunks at most this many bytes apart
        self._last_end = -1
        self.first_reads: dict[int, float] = {}  # chunk position -> when a foreground read first needed it
        self._background: set[asyncio.Task[None]] = set()
        self.stats = ReadStats()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._compressed: OrderedDict[int, bytes] = OrderedDict()  # partly decoded chunks
        self._cache_chunks = cache_chunks
        self._lock = asyncio.Lock()

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the uncompressed tar at ``offset`` (short at the end)."""
        end = min(offset + length, self.index.uncompressed_size)
        positions = self.index.chunk_range(offset, end)
        needed = {p: min(end - self.index.chunks[p].u_offset, self.index.chunks[p].u_size) for p in positions}
        now = time.monotonic()
        for p in positions:
            self.first_reads.setdefault(p, now)
        chunks = await self._chunks(needed)
        if self.readahead and positions and offset == self._last_end:
            self._read_ahead(positions[-1] + 1)
        self._last_end = end
        parts = []
        for pos in positions:
            c = self.index.chunks[pos]
            data = chunks[pos]
            lo = max(offset - c.u_offset, 0)
            hi = min(end - c.u_offset, c.u_size)
            parts.append(data[lo:hi])
        return b"".join(parts)

    async def _chunks(self, needed: dict[int, int]) -> dict[int, bytes]:
        """Decoded, verified bytes of each chunk position, at least ``needed[p]`` of them."""
        out: dict[int, bytes] = {}
        async with self._lock:
            missing = []
            for p in needed:
                if p in self._cache and len(self._cache[p]) >= needed[p]:
                    self._cache.move_to_end(p)
                    out[p] = self._cache[p]
                elif (cached := await self._from_disk(p, needed[p])) is not None:
                    out[p] = cached
                    self._remember(p, cached)
                else:
                    missing.append(p)
            # A chunk decoded only in part (index mode decodes the verified prefix a read needs)
            # keeps its compressed bytes, so reading further into it costs no second fetch.
            for p in [p for p in missing if p in self._compressed]:
                try:
                    decoded = await self._decode(p, self._compressed[p], needed[p])
                except ChunkVerificationError:
                    del self._compressed[p]  # fetch it again below
                    continue
                missing.remove(p)
                out[p] = decoded
                self._remember(p, decoded, self._compressed[p])
                await self._to_disk(p, decoded)
            for run in self._runs(sorted(missing)):
                start = self.index.chunks[run[0]].c_offset
                data = await self._fetch(start, max(self._c_end(p) for p in run))
                for p in run:
                    c = self.index.chunks[p]
                    piece = data[c.c_offset - start : self._c_end(p) - start]
                    try:
                        decoded = await self._decode(p, piece, needed[p])
                    except ChunkVerificationError as e:  # refetch once: a transient bad transfer
                        log.warning("%s@%s chunk %d failed verification (%s); fetching it again",
                                    self.repo, self.blob_digest, p, e)  # fmt: skip
                        self.stats.refetches += 1
                        piece = await self._fetch(c.c_offset, self._c_end(p))
                        try:
                            decoded = await self._decode(p, piece, needed[p])
                        except ChunkVerificationError as e2:
                            self.stats.verification_failures += 1
                            raise ChunkReadError(
                                f"{self.repo}@{self.blob_digest}: chunk {p} (uncompressed {c.u_offset}-"
                                f"{c.u_offset + c.u_size - 1}) failed verification: {e2}"
                            ) from e2
                    out[p] = decoded
                    self._remember(p, decoded, piece)
                    await self._to_disk(p, decoded)
        return out

    async def prefetch_chunk(self, p: int) -> None:
        """Make chunk ``p`` cached (memory, and disk when there is a disk cache)."""
        await self._chunks({p: self.index.chunks[p].u_size})

    def _read_ahead(self, p: int) -> None:
        """Sequential reading: decode the next chunk in the background (errors are left for the
        foreground read that needs it)."""
        if p >= len(self.index.chunks) or p in self._cache or self._background:
            return

        async def fetch() -> None:
            with contextlib.suppress(ChunkReadError):
                await self._chunks({p: self.index.chunks[p].u_size})

        task = asyncio.create_task(fetch())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _runs(self, positions: list[int]) -> list[list[int]]:
        """Group chunk positions into Range requests: adjacent chunks, and chunks separated by
        at most ``gap`` compressed bytes (fetched and discarded: one round trip is cheaper)."""
        runs: list[list[int]] = []
        for p in positions:
            if runs and self.index.chunks[p].c_offset - self._c_end(runs[-1][-1]) <= self.gap:
                runs[-1].append(p)
            else:
                runs.append([p])
        return runs

    def _c_end(self, p: int) -> int:
        c = self.index.chunks[p]
        return c.c_offset + c.c_size

    async def _fetch(self, start: int, stop: int) -> bytes:
        started = time.monotonic()
        try:
            data = await self.fetcher.fetch_range(self.repo, self.blob_digest, start, stop)
        except Exception as e:
            raise ChunkReadError(f"{self.repo}@{self.blob_digest}: fetching bytes {start}-{stop - 1}: {e}") from e
        self.stats.requests += 1
        self.stats.bytes_fetched += len(data)
        if self.on_fetch is not None:
            self.on_fetch(time.monotonic() - started)
        return data

    async def _decode(self, p: int, piece: bytes, needed: int) -> bytes:
        c = self.index.chunks[p]
        window = self.windows[c.window] if c.window >= 0 else b""
        decoded = await asyncio.to_thread(decode_chunk, self.index.encoding, piece, c, window, needed)
        self.stats.chunks_decoded += 1
        return decoded

    def _remember(self, p: int, decoded: bytes, compressed: bytes | None = None) -> None:
        self._cache[p] = decoded
        while len(self._cache) > self._cache_chunks:
            self._cache.popitem(last=False)
        if compressed is not None and len(decoded) < self.index.chunks[p].u_size:
            self._compressed[p] = compressed
        else:
            self._compressed.pop(p, None)
        while len(self._compressed) > self._cache_chunks:
            self._compressed.popitem(last=False)

    async def _from_disk(self, p: int, needed: int) -> bytes | None:
        """The chunk (or its first ``needed`` bytes, whole blocks) from the disk cache."""
        if self.disk_cache is None:
            return None
        c = self.index.chunks[p]
        if not c.blocks:
            return await asyncio.to_thread(self.disk_cache.get, c.digest)
        parts = []
        for i in range(-(-needed // BLOCK_SIZE) if needed else 1):
            block = await asyncio.to_thread(self.disk_cache.get, c.blocks[i])
            if block is None:
                return None
            parts.append(block)
        return b"".join(parts)

    async def _to_disk(self, p: int, decoded: bytes) -> None:
        if self.disk_cache is None:
            return
        c = self.index.chunks[p]
        if not c.blocks:
            await asyncio.to_thread(self.disk_cache.put, c.digest, decoded)
            return
        for i in range(0, len(decoded), BLOCK_SIZE):
            await asyncio.to_thread(self.disk_cache.put, c.blocks[i // BLOCK_SIZE], decoded[i : i + BLOCK_SIZE])
