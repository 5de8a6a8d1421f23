"""``LayerReader``: random access into one layer's uncompressed tar through its index.

A read maps to the chunks covering it; runs of adjacent chunks are fetched with one Range
request, each chunk is decoded and verified (``indexer.chunk_decoder``) before any byte of it
is returned. A small LRU keeps recently decoded chunks for sequential reads.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from imgaccel.formats.layer_index import LayerIndex
from imgaccel.indexer.chunk_decoder import ChunkVerificationError, decode_chunk


class RangeFetcher(Protocol):
    async def fetch_range(self, repo: str, digest: str, start: int, end: int) -> bytes: ...


class ChunkReadError(IOError):
    """A chunk could not be fetched or failed verification: no byte of it was returned."""


@dataclass
class ReadStats:
    requests: int = 0
    bytes_fetched: int = 0
    chunks_decoded: int = 0


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
    ) -> None:
        self.fetcher = fetcher
        self.repo = repo
        self.blob_digest = blob_digest
        self.index = index
        self.blob_size = blob_size  # size of the blob chunks are read from
        self.index_size = index_size  # bytes of the index blob or TOC frame
        self.windows = windows or []
        self.stats = ReadStats()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_chunks = cache_chunks
        self._lock = asyncio.Lock()

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the uncompressed tar at ``offset`` (short at the end)."""
        end = min(offset + length, self.index.uncompressed_size)
        positions = self.index.chunk_range(offset, end)
        needed = {p: min(end - self.index.chunks[p].u_offset, self.index.chunks[p].u_size) for p in positions}
        chunks = await self._chunks(needed)
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
                else:
                    missing.append(p)
            for run in _runs(missing):
                start = self.index.chunks[run[0]].c_offset
                stop = max(self.index.chunks[p].c_offset + self.index.chunks[p].c_size for p in run)
                try:
                    data = await self.fetcher.fetch_range(self.repo, self.blob_digest, start, stop)
                except Exception as e:
                    raise ChunkReadError(
                        f"{self.repo}@{self.blob_digest}: fetching bytes {start}-{stop - 1}: {e}"
                    ) from e
                self.stats.requests += 1
                self.stats.bytes_fetched += len(data)
                for p in run:
                    c = self.index.chunks[p]
                    piece = data[c.c_offset - start : c.c_offset - start + c.c_size]
                    window = self.windows[c.window] if c.window >= 0 else b""
                    try:
                        decoded = await asyncio.to_thread(
                            decode_chunk, self.index.encoding, piece, c, window, needed[p]
                        )
                    except ChunkVerificationError as e:
                        raise ChunkReadError(
                            f"{self.repo}@{self.blob_digest}: chunk {p} (uncompressed {c.u_offset}-"
                            f"{c.u_offset + c.u_size - 1}) failed verification: {e}"
                        ) from e
                    self.stats.chunks_decoded += 1
                    out[p] = decoded
                    self._cache[p] = decoded
                    while len(self._cache) > self._cache_chunks:
                        self._cache.popitem(last=False)
        return out


def _runs(positions: list[int]) -> list[list[int]]:
    """Split sorted chunk positions into runs of consecutive positions."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and runs[-1][-1] + 1 == p:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs
