"""``LayerReader``: random access into one layer's uncompressed tar through its index.

A read maps to the chunks covering it. Chunks that are not cached are grouped into runs
(adjacent chunks, and chunks at most ``gap`` bytes apart, share one byte range), and the runs
of one read, or of one batch of background work, into one request: a multi-range GET where the
registry supports it (``RangeFetcher.fetch_ranges``). A gzip span (index mode) is fetched only
as far as the 1 MiB blocks a read needs, and topped up when that estimate falls short. Each
chunk is decoded and verified (``indexer.chunk_decoder``) before any byte of it is returned.
Fetches run as tasks with one future per chunk, so concurrent reads of the same chunk share
one request and reads of different chunks proceed in parallel, bounded by ``FetchSlots``.
Background work (readahead, profile replay, background fetch) uses ``prefetch``: it claims
its chunks only once it holds a request slot, so a foreground read never queues behind it.

A small in-memory LRU keeps recently decoded chunks; an optional ``ChunkCache`` keeps verified
chunks (or 1 MiB blocks) on disk across reads, mounts and processes. A chunk that fails
verification is fetched once more, then the read fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from imgaccel.formats.layer_index import BLOCK_SIZE, LayerIndex
from imgaccel.indexer.chunk_decoder import ChunkInputEnded, ChunkVerificationError, decode_chunk
from imgaccel.reader.chunk_cache import ChunkCache

log = logging.getLogger(__name__)
MAX_REQUEST = 2 << 20  # background requests are cut at this many compressed bytes (bounds memory)
MAX_RANGES = 128  # byte ranges in one multi-range request (keeps the Range header short)
READAHEAD = 1 << 20  # uncompressed bytes fetched ahead of a sequential reader
INLINE_DISK_READ = 256 << 10  # cached chunks up to this size are read (and re-hashed) on the event loop
Run = list[int]  # chunk positions fetched as one byte range
T = TypeVar("T")
# gzip chunks (index mode) are fetched only as far as the blocks a read needs, estimated from the
# chunk's compression ratio with this margin (a short estimate costs one more request).
PREFIX_MARGIN, PREFIX_SLACK = 1.25, 32 << 10


class RangeFetcher(Protocol):
    multi_range_unsupported: bool  # True: each byte range needs a request of its own

    async def fetch_ranges(
        self,
        repo: str,
        digest: str,
        ranges: Sequence[tuple[int, int]],
        *,
        fresh: bool = False,
        chunks: Sequence[tuple[int, int, str]] | None = None,
    ) -> list[bytes]:
        """The bytes of ``ranges`` of the blob. ``fresh``: bytes an earlier answer gave for
        them failed verification: ask the origin (the registry), not a mirror or cache.
        ``chunks``: ``(offset, length, c_digest)`` of the chunks whose whole compressed range
        lies inside one of ``ranges``, sorted, possibly none; None when the index has no
        compressed digests. A cache node verifies and keeps them (see ``formats.cache_chunks``),
        a registry ignores them."""
        ...


class ChunkReadError(IOError):
    """A chunk could not be fetched or failed verification: no byte of it was returned."""


@dataclass
class ReadStats:
    requests: int = 0
    bytes_fetched: int = 0
    chunks_decoded: int = 0
    refetches: int = 0
    verification_failures: int = 0
    wait_seconds: float = 0.0  # foreground reads waiting on Range requests


class FetchSlots:
    """Bounds the Range requests in flight to one registry (shared by an image's layers).
    Background work may hold at most ``background`` of the ``total`` slots, so foreground
    reads always find one."""

    def __init__(self, total: int = 32, background: int = 24) -> None:
        if total < 2 or not 1 <= background < total:
            raise ValueError("FetchSlots: need total >= 2 and 1 <= background < total")
        self.total, self.background = total, background
        self._loop: asyncio.AbstractEventLoop | None = None
        self._all = asyncio.Semaphore(total)
        self._bg = asyncio.Semaphore(background)

    @contextlib.asynccontextmanager
    async def slot(self, background: bool) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # semaphores belong to one event loop
            self._loop, self._all, self._bg = loop, asyncio.Semaphore(self.total), asyncio.Semaphore(self.background)
        if background:
            async with self._bg, self._all:
                yield
        else:
            async with self._all:
                yield


def pack_consecutive(items: Iterable[T], size: Callable[[T], int], limit: int = 0, max_count: int = 0) -> list[list[T]]:
    """Consecutive items grouped so that each group's sizes add up to at most ``limit`` and it
    holds at most ``max_count`` items (0: no bound); an item bigger than ``limit`` is a group
    of its own."""
    out: list[list[T]] = []
    total = 0
    for item in items:
        n = size(item)
        if out and (not max_count or len(out[-1]) < max_count) and (not limit or total + n <= limit):
            out[-1].append(item)
            total += n
        else:
            out.append([item])
            total = n
    return out


def _retrieve(fut: asyncio.Future[bytes]) -> None:
    if not fut.cancelled():
        fut.exception()  # a background failure nobody waited for is not an "unretrieved" error


class LayerReader:
    def __init__(
        self,
        fetcher: RangeFetcher,
        repo: str,
        blob_digest: str,
        index: LayerIndex,
        windows: list[bytes] | None = None,
        memory_cache: int = 32 << 20,
        *,
        blob_size: int = 0,
        index_size: int = 0,
        disk_cache: ChunkCache | None = None,
        slots: FetchSlots | None = None,
    ) -> None:
        self.fetcher = fetcher
        self.repo = repo
        self.blob_digest = blob_digest
        self.index = index
        self.blob_size = blob_size  # size of the blob chunks are read from
        self.index_size = index_size  # bytes of the index blob or TOC frame
        self.windows = windows or []
        self.disk_cache = disk_cache
        self.slots = slots or FetchSlots()
        self.on_fetch: Callable[[float], None] | None = None  # seconds per Range request (metrics)
        self.readahead = READAHEAD  # uncompressed bytes prefetched after a sequential read (0: off)
        self.gap = 64 << 10  # merge Range requests for chunks at most this many bytes apart
        self.memory_cache = memory_cache  # bytes of decoded chunks kept in memory
        self._last_end = -1
        self.first_reads: dict[int, float] = {}  # chunk position -> when a foreground read first needed it
        self.read_upto: dict[int, int] = {}  # chunk position -> uncompressed bytes of it foreground reads reached
        self.stats = ReadStats()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cached_bytes = 0
        self._compressed: OrderedDict[int, bytes] = OrderedDict()  # partly decoded chunks
        self._inflight: dict[int, asyncio.Future[bytes]] = {}
        self._tasks: set[asyncio.Task[object]] = set()
        self._c_offsets = [c.c_offset for c in index.chunks]  # not decreasing: chunks are in blob order
        self._c_digests = any(c.c_digest is not None for c in index.chunks)

    async def read(self, offset: int, length: int, limit: int | None = None, *, record: bool = True) -> bytes:
        """``length`` bytes of the uncompressed tar at ``offset`` (short at the end). ``limit``
        is where the data being read ends (a file's last byte + 1): readahead stops there.
        ``record``: a workload's read, which a profile being recorded counts (not a copy of
        the whole layer, say)."""
        end = min(offset + length, self.index.uncompressed_size)
        positions = self.note_read(offset, end - offset) if record else self.index.chunk_range(offset, end)
        parts: dict[int, bytes] = {}
        needed: dict[int, int] = {}
        for p in positions:
            c = self.index.chunks[p]
            lo, hi = max(offset - c.u_offset, 0), min(end - c.u_offset, c.u_size)
            if (data := self._cache.get(p)) is not None and len(data) >= hi:
                self._cache.move_to_end(p)
                parts[p] = data[lo:hi]
            elif c.blocks and (piece := await self._blocks_from_disk(p, lo, hi)) is not None:
                parts[p] = piece  # only the cached 1 MiB blocks this read needs
            else:
                needed[p] = hi
        for p, data in (await self._chunks(needed)).items():
            c = self.index.chunks[p]
            parts[p] = data[max(offset - c.u_offset, 0) : min(end - c.u_offset, c.u_size)]
        if self.readahead and positions and offset == self._last_end:
            self._read_ahead(positions[-1] + 1, self.index.uncompressed_size if limit is None else limit)
        self._last_end = end
        return b"".join(parts[p] for p in positions)

    def note_read(self, offset: int, length: int) -> list[int]:
        """Record a foreground read of ``length`` bytes at ``offset`` for a profile
        (``first_reads``, ``read_upto``), whoever serves its bytes; the chunk positions it spans."""
        end = min(offset + length, self.index.uncompressed_size)
        positions = self.index.chunk_range(offset, end)
        now = time.monotonic()
        for p in positions:
            self.first_reads.setdefault(p, now)
            c = self.index.chunks[p]
            hi = min(end - c.u_offset, c.u_size)
            if hi > self.read_upto.get(p, 0):
                self.read_upto[p] = hi
        return positions

    async def _chunks(self, needed: dict[int, int], nested: bool = False) -> dict[int, bytes]:
        """Decoded, verified bytes of each chunk position, at least ``needed[p]`` of them."""
        out: dict[int, bytes] = {}
        waits: dict[int, asyncio.Future[bytes]] = {}
        missing = []
        for p, n in needed.items():
            if (data := await self._cached(p, n)) is not None:
                out[p] = data
            elif (fut := self._inflight.get(p)) is not None:
                waits[p] = fut
            else:
                missing.append(p)
        for request in self._requests(self._runs(sorted(missing))):
            waits.update(self._start(request, {p: needed[p] for run in request for p in run}, background=False))
        started = time.monotonic()
        try:
            for p, fut in waits.items():
                data = await asyncio.shield(fut)
                if len(data) < needed[p]:  # another read decoded less of this chunk than we need
                    data = (await self._chunks({p: needed[p]}, nested=True))[p]
                out[p] = data
        finally:
            if waits and not nested:
                self.stats.wait_seconds += time.monotonic() - started
        return out

    async def prefetch(
        self,
        positions: Iterable[int],
        max_request: int = MAX_REQUEST,
        gap: int | None = None,
        in_flight: asyncio.Semaphore | None = None,
        upto: dict[int, int] | None = None,
    ) -> list[int]:
        """Background: make the chunks at ``positions`` cached (memory, and disk when there is
        a disk cache), with requests of at most ``max_request`` compressed bytes sent in the
        order given (``gap``: see ``_runs``; default ``self.gap``). ``in_flight`` bounds this
        work's requests on top of the background slots; ``upto`` limits a chunk to its first
        bytes (index mode fetches and decodes only the blocks covering them). Returns the
        positions that could not be fetched or verified (logged; a foreground read will report
        them)."""
        upto = upto or {}
        todo = [p for p in dict.fromkeys(positions) if not self.is_cached(p, upto.get(p))]
        runs = self._runs(todo, max_request, keep_order=True, gap=self.gap if gap is None else gap)
        results = await asyncio.gather(
            *(self._background_request(r, in_flight, upto) for r in self._requests(runs, max_request))
        )
        return [p for failed in results for p in failed]

    def _read_ahead(self, p: int, limit: int) -> None:
        """Sequential reading: fetch the next ``readahead`` bytes before ``limit`` in the background."""
        chunks, positions, ahead = self.index.chunks, [], 0
        while p < len(chunks) and ahead < self.readahead and chunks[p].u_offset < limit:
            positions.append(p)
            ahead += chunks[p].u_size
            p += 1
        if positions:
            self._spawn(self.prefetch(positions))

    # -- fetching ---------------------------------------------------------------------------

    def _start(self, request: list[Run], needed: dict[int, int], background: bool) -> dict[int, asyncio.Future[bytes]]:
        """Claim the chunks of ``request``'s runs and fetch them in a task; returns their futures."""
        loop = asyncio.get_running_loop()
        futures = {}
        for run in request:
            for p in run:
                fut: asyncio.Future[bytes] = loop.create_future()
                fut.add_done_callback(_retrieve)
                futures[p] = self._inflight[p] = fut

        async def go() -> None:
            if background:
                await self._fetch_request(request, needed, futures)
                return
            async with self.slots.slot(background=False):
                await self._fetch_request(request, needed, futures)

        self._spawn(go())
        return futures

    async def _background_request(
        self, request: list[Run], in_flight: asyncio.Semaphore | None, upto: dict[int, int]
    ) -> list[int]:
        async with in_flight or contextlib.nullcontext(), self.slots.slot(background=True):
            # Claimed only now: chunks a foreground read fetched meanwhile are skipped.
            request = [r for r in ([p for p in run if p not in self._inflight and not self.is_cached(p, upto.get(p))]
                                   for run in request) if r]  # fmt: skip
            if not request:
                return []
            needed = {p: upto.get(p) or self.index.chunks[p].u_size for r in request for p in r}
            futures = self._start(request, needed, True)
            await asyncio.wait(futures.values())
        return [p for p, f in futures.items() if f.cancelled() or f.exception() is not None]

    async def _fetch_request(
        self, request: list[Run], needed: dict[int, int], futures: dict[int, asyncio.Future[bytes]]
    ) -> None:
        """One request (one byte range per run); settles every future (result or ChunkReadError)."""
        try:
            chunks = self.index.chunks
            ends = {p: self.fetch_end(p, needed[p]) for run in request for p in run}
            spans = [(chunks[run[0]].c_offset, max(ends[p] for p in run)) for run in request]
            datas = await self._fetch(spans)
            pieces = {
                p: data[chunks[p].c_offset - start : ends[p] - start]
                for run, (start, _), data in zip(request, spans, datas, strict=True)
                for p in run
            }
            # Decoded, verified and written to the disk cache in one worker-thread call, before
            # readers go on (a short-lived process keeps what it read).
            decoded = await asyncio.to_thread(self._decode_and_store, pieces, needed)
            for p in pieces:
                result = decoded[p]
                try:
                    if isinstance(result, ChunkInputEnded) and len(pieces[p]) < chunks[p].c_size:
                        try:  # the estimated prefix was short: fetch the rest of the chunk
                            result, pieces[p] = await self._complete(p, pieces[p], needed[p])
                        except ChunkVerificationError as e:
                            result = e
                    if isinstance(result, ChunkVerificationError):
                        result, pieces[p] = await self._refetch(p, needed[p], result)
                except ChunkReadError as e:
                    futures[p].set_exception(e)
                    continue
                if result is not decoded[p]:  # decoded here, not stored by the worker yet
                    await self._to_disk(p, result)
                self._remember(p, result, pieces[p])
                futures[p].set_result(result)
        except ChunkReadError as e:
            for f in futures.values():
                if not f.done():
                    f.set_exception(e)
        except BaseException as e:
            for f in futures.values():
                if not f.done():
                    f.set_exception(ChunkReadError(f"{self.repo}@{self.blob_digest}: fetch interrupted: {e!r}"))
            raise
        finally:
            for p, f in futures.items():
                if self._inflight.get(p) is f:
                    del self._inflight[p]

    def fetch_end(self, p: int, needed: int) -> int:
        """Where the compressed bytes to fetch for the first ``needed`` uncompressed bytes of
        chunk ``p`` end: all of the chunk, but for a gzip chunk with block digests only an
        estimate covering the whole blocks that hold them."""
        c = self.index.chunks[p]
        if self.index.encoding != "gzip" or not c.blocks or needed >= c.u_size or not c.u_size:
            return c.c_offset + c.c_size
        want = min(c.u_size, -(-needed // BLOCK_SIZE) * BLOCK_SIZE)
        return c.c_offset + min(c.c_size, int(c.c_size * want / c.u_size * PREFIX_MARGIN) + PREFIX_SLACK)

    async def _complete(self, p: int, prefix: bytes, needed: int) -> tuple[bytes, bytes]:
        """Chunk ``p`` decoded from ``prefix`` (its first compressed bytes) and the rest of it."""
        c = self.index.chunks[p]
        piece = prefix + (await self._fetch([(c.c_offset + len(prefix), self._c_end(p))]))[0]
        return await asyncio.to_thread(self._decode, p, piece, needed), piece

    async def _refetch(self, p: int, needed: int, first: ChunkVerificationError) -> tuple[bytes, bytes]:
        """A chunk failed verification: fetch it once more (a transient bad transfer)."""
        c = self.index.chunks[p]
        log.warning("%s@%s chunk %d failed verification (%s); fetching it again", self.repo, self.blob_digest, p, first)
        self.stats.refetches += 1
        piece = (await self._fetch([(c.c_offset, self._c_end(p))], fresh=True))[0]
        try:
            return await asyncio.to_thread(self._decode, p, piece, needed), piece
        except ChunkVerificationError as e:
            self.stats.verification_failures += 1
            raise ChunkReadError(
                f"{self.repo}@{self.blob_digest}: chunk {p} (uncompressed {c.u_offset}-"
                f"{c.u_offset + c.u_size - 1}) failed verification: {e}"
            ) from e

    def _runs(
        self, positions: list[int], max_request: int = 0, keep_order: bool = False, gap: int | None = None
    ) -> list[Run]:
        """Group chunk positions into Range requests: adjacent chunks, and chunks separated by
        at most ``gap`` compressed bytes (fetched and discarded: one round trip is cheaper).
        ``keep_order`` merges only neighbours in the given order; ``max_request`` caps a run."""
        runs: list[Run] = []
        chunks = self.index.chunks
        gap = self.gap if gap is None else gap
        for p in positions if keep_order else sorted(positions):
            if runs:
                last, first = runs[-1][-1], runs[-1][0]
                distance = chunks[p].c_offset - self._c_end(last)
                fits = not max_request or self._c_end(p) - chunks[first].c_offset <= max_request
                if p > last and distance <= gap and fits:
                    runs[-1].append(p)
                    continue
            runs.append([p])
        return runs

    def _requests(self, runs: list[Run], max_request: int = 0) -> list[list[Run]]:
        """Consecutive runs grouped into requests of at most ``MAX_RANGES`` ranges and (when
        ``max_request`` is set) ``max_request`` compressed bytes; one run per request when the
        registry cannot answer multi-range requests."""
        if self.fetcher.multi_range_unsupported:
            return [[run] for run in runs]
        return pack_consecutive(
            runs, lambda run: self._c_end(run[-1]) - self.index.chunks[run[0]].c_offset, max_request, MAX_RANGES
        )

    def _c_end(self, p: int) -> int:
        c = self.index.chunks[p]
        return c.c_offset + c.c_size

    async def _fetch(self, spans: list[tuple[int, int]], fresh: bool = False) -> list[bytes]:
        started = time.monotonic()
        try:
            datas = await self.fetcher.fetch_ranges(
                self.repo, self.blob_digest, spans, fresh=fresh, chunks=self._listed_chunks(spans)
            )
        except Exception as e:
            where = f"bytes {spans[0][0]}-{spans[0][1] - 1}" + (
                f" and {len(spans) - 1} more ranges" if len(spans) > 1 else ""
            )
            raise ChunkReadError(f"{self.repo}@{self.blob_digest}: fetching {where}: {e}") from e
        self.stats.requests += 1
        self.stats.bytes_fetched += sum(len(d) for d in datas)
        if self.on_fetch is not None:
            self.on_fetch(time.monotonic() - started)
        return datas

    def _listed_chunks(self, spans: list[tuple[int, int]]) -> list[tuple[int, int, str]] | None:
        """``(c_offset, c_size, c_digest)`` of the chunks with a ``c_digest`` whose whole
        compressed range lies inside one of ``spans`` (a prefix of a chunk is not listed);
        None when the index has no ``c_digest`` at all (written before they existed)."""
        if not self._c_digests:
            return None
        chunks, found = self.index.chunks, set()
        for start, end in spans:
            for p in range(bisect_left(self._c_offsets, start), len(chunks)):
                c = chunks[p]
                if c.c_offset >= end:
                    break
                if c.c_digest is not None and c.c_offset + c.c_size <= end:
                    found.add((c.c_offset, c.c_size, c.c_digest))
        return sorted(found)

    def _decode_and_store(
        self, pieces: dict[int, bytes], needed: dict[int, int]
    ) -> dict[int, bytes | ChunkVerificationError]:
        out: dict[int, bytes | ChunkVerificationError] = {}
        for p, piece in pieces.items():
            try:
                out[p] = decoded = self._decode(p, piece, needed[p])
            except ChunkVerificationError as e:
                out[p] = e
                continue
            self._store(p, decoded)
        return out

    def _decode(self, p: int, piece: bytes, needed: int) -> bytes:
        c = self.index.chunks[p]
        window = self.windows[c.window] if c.window >= 0 else b""
        decoded = decode_chunk(self.index.encoding, piece, c, window, needed)
        self.stats.chunks_decoded += 1
        return decoded

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- caches -----------------------------------------------------------------------------

    async def _cached(self, p: int, needed: int) -> bytes | None:
        """The chunk from memory, from its kept compressed bytes, or from the disk cache."""
        if p in self._cache and len(self._cache[p]) >= needed:
            self._cache.move_to_end(p)
            return self._cache[p]
        if p in self._compressed:
            # A chunk decoded only in part (index mode decodes the verified prefix a read
            # needs) keeps its compressed bytes, so reading further into it costs no fetch.
            piece = self._compressed[p]
            try:
                try:
                    decoded = await asyncio.to_thread(self._decode, p, piece, needed)
                except ChunkInputEnded:
                    if len(piece) >= self.index.chunks[p].c_size:
                        raise
                    decoded, piece = await self._complete(p, piece, needed)
            except (ChunkVerificationError, ChunkReadError):
                self._compressed.pop(p, None)
                return None
            self._remember(p, decoded, piece)
            await self._to_disk(p, decoded)
            return decoded
        if (data := await self._from_disk(p, needed)) is not None:
            self._remember(p, data)
            return data
        return None

    def drop_memory_cache(self) -> None:
        """Forget the decoded chunks kept in memory (reads then come from the disk cache)."""
        self._cache.clear()
        self._cached_bytes = 0
        self._compressed.clear()

    def is_cached(self, p: int, upto: int | None = None) -> bool:
        """Chunk (its first ``upto`` bytes, in whole blocks) in memory or on disk (not
        re-verified here: reads verify)."""
        c = self.index.chunks[p]
        need = c.u_size if upto is None else min(upto, c.u_size)
        if p in self._cache and len(self._cache[p]) >= need:
            return True
        if self.disk_cache is None:
            return False
        if not c.blocks:
            return self.disk_cache.contains(c.digest)
        return all(self.disk_cache.contains(d) for d in c.blocks[: max(1, -(-need // BLOCK_SIZE))])

    def _remember(self, p: int, decoded: bytes, compressed: bytes | None = None) -> None:
        if p in self._cache:
            self._cached_bytes -= len(self._cache.pop(p))
        self._cache[p] = decoded
        self._cached_bytes += len(decoded)
        while self._cached_bytes > self.memory_cache and len(self._cache) > 1:
            self._cached_bytes -= len(self._cache.popitem(last=False)[1])
        if compressed is not None and len(decoded) < self.index.chunks[p].u_size:
            self._compressed[p] = compressed
        else:
            self._compressed.pop(p, None)
        while len(self._compressed) > 8:
            self._compressed.popitem(last=False)

    async def _blocks_from_disk(self, p: int, lo: int, hi: int) -> bytes | None:
        """Bytes ``lo:hi`` of chunk ``p`` from its cached 1 MiB blocks, or None."""
        if self.disk_cache is None or hi <= lo:
            return None
        cache, blocks = self.disk_cache, self.index.chunks[p].blocks
        spans = [
            (blocks[k], max(lo - k * BLOCK_SIZE, 0), min(hi - k * BLOCK_SIZE, BLOCK_SIZE))
            for k in range(lo // BLOCK_SIZE, (hi - 1) // BLOCK_SIZE + 1)
        ]
        # Pieces of blocks this process verified are cheap (a few 64 KiB reads and hashes): read
        # them on the event loop; a block read and hashed whole goes to a worker thread.
        if hi - lo > INLINE_DISK_READ or not all(cache.verified(d) for d, _, _ in spans):
            found = await asyncio.to_thread(lambda: [cache.get_range(d, a, b) for d, a, b in spans])
        else:
            found = [cache.get_range(d, a, b) for d, a, b in spans]
        if any(b is None for b in found):
            return None
        return b"".join(b for b in found if b is not None)

    async def _from_disk(self, p: int, needed: int) -> bytes | None:
        """The chunk (or its first ``needed`` bytes, whole blocks) from the disk cache."""
        if self.disk_cache is None:
            return None
        c = self.index.chunks[p]
        if not c.blocks:
            if (data := self.disk_cache.peek(c.digest)) is not None:
                return data
            if c.u_size <= INLINE_DISK_READ:  # cheaper than a hop to a worker thread and back
                return self.disk_cache.get(c.digest)
            return await asyncio.to_thread(self.disk_cache.get, c.digest)
        parts = []
        for i in range(-(-needed // BLOCK_SIZE) if needed else 1):
            block = await asyncio.to_thread(self.disk_cache.get, c.blocks[i])
            if block is None:
                return None
            parts.append(block)
        return b"".join(parts)

    async def _to_disk(self, p: int, decoded: bytes) -> None:
        if self.disk_cache is not None:
            await asyncio.to_thread(self._store, p, decoded)

    def _store(self, p: int, decoded: bytes) -> None:
        """Verified bytes of chunk ``p`` into the disk cache (whole chunk, or its 1 MiB blocks)."""
        if self.disk_cache is None:
            return
        c = self.index.chunks[p]
        try:
            if not c.blocks:
                self.disk_cache.put(c.digest, decoded)
                return
            for i in range(0, len(decoded), BLOCK_SIZE):
                self.disk_cache.put(c.blocks[i // BLOCK_SIZE], decoded[i : i + BLOCK_SIZE])
        except OSError as e:  # a full or broken cache disk costs refetches, never a read
            log.warning("chunk cache %s: cannot store chunk %d of %s: %s", self.disk_cache.root, p, self.blob_digest, e)
