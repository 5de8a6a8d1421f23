"""Index-only mode: build a ``LayerIndex`` for a layer blob without changing it.

* tar: chunks are fixed ``span``-sized pieces of the blob (compressed == uncompressed).
* gzip: chunks run between the deflate block boundaries rapidgzip decodes at about every
  ``span`` uncompressed bytes; each keeps zran's bit offset and 32 KiB window.
* zstd: one chunk per zstd frame. A layer that is one big frame cannot be indexed
  (``NotSeekableError``): convert it in full mode instead.

Every chunk also gets ``c_digest``, the sha256 of its compressed byte range, in a pass over
the blob file once the chunks are known (``indexer.compressed_digests``).
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

import zstandard

from imgaccel.formats.layer_index import BLOCK_SIZE, Chunk, Encoding, Entry, LayerIndex, block_list_digest
from imgaccel.indexer.compressed_digests import add_compressed_digests
from imgaccel.indexer.errors import LayerError, NotSeekableError
from imgaccel.indexer.limits import DEFAULT_TAR_LIMITS, TarLimits
from imgaccel.indexer.pending_bytes import PendingBytes
from imgaccel.indexer.raw_inflate import InflateError, inflate_from_checkpoint
from imgaccel.indexer.tar_walker import DigestSink, walk_tar
from imgaccel.indexer.uncompressed_stream import GzipCheckpoint, GzipStream, UncompressedStream, open_uncompressed
from imgaccel.indexer.zstd_frames import zstd_frames

# Unknown checkpoint boundaries may hold back at most this much data for hashing.
MAX_PENDING = 512 << 20
DECODE_CHUNK = 1 << 20  # bounds rapidgzip's chunk cache (~150 MB on one thread)
MAX_HASH_IN_FLIGHT = 4  # spans queued for the hashing thread


@dataclass
class SeekableIndex:
    index: LayerIndex
    windows: list[bytes] = field(default_factory=list)


def _block_digests(pieces: list[memoryview], stream_hash: hashlib._Hash) -> list[str]:
    """sha256 hex of each ``BLOCK_SIZE`` piece of the concatenated ``pieces``; the pieces
    also go into ``stream_hash`` (spans arrive in stream order)."""
    block, blocks, filled = hashlib.sha256(), [], 0
    for piece in pieces:
        stream_hash.update(piece)
        while piece:
            take = min(len(piece), BLOCK_SIZE - filled)
            block.update(piece[:take])
            filled += take
            piece = piece[take:]
            if filled == BLOCK_SIZE:
                blocks.append(block.hexdigest())
                block, filled = hashlib.sha256(), 0
    if filled:
        blocks.append(block.hexdigest())
    return blocks


class _SpanDigests(DigestSink):
    """Entries, the block digests of every span between boundaries that become known only
    as we go, and the digest of the whole stream (the layer's diff_id). Hashing runs on one
    helper thread (hashlib releases the GIL), overlapping the decoder; call ``close`` when
    done. ``limits`` and ``max_stream_bytes`` are what the tar walk is held to."""

    def __init__(self, limits: TarLimits, max_stream_bytes: int, min_span: int = 0) -> None:
        super().__init__(hash_stream=False)  # hashed on the helper thread instead
        self.limits = limits
        self.max_stream_bytes = max_stream_bytes
        self._stream_hash = hashlib.sha256()
        self._min_span = min_span
        self._pending = PendingBytes()
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgaccel-hash")
        self._spans: dict[int, tuple[int, Future[list[str]]]] = {}  # span start -> (size, block digests)
        self._in_flight: deque[Future[list[str]]] = deque()

    def write(self, data: bytes, offset: int) -> None:
        self._pending.append(data)
        if len(self._pending) > MAX_PENDING:
            raise LayerError("gzip checkpoints lag too far behind the decoder")

    def cut(self, boundaries: list[int], final: bool = False) -> None:
        """Close every span whose end boundary is now known and fully received.

        Spans shorter than ``min_span`` are extended to a later boundary (greedily, so the
        choice depends only on the sorted boundaries), except the ``final`` one.
        """
        for i, b in enumerate(boundaries):
            start = self._pending.start
            if b <= start:
                continue
            if b > self._pending.end:
                break
            if b - start < self._min_span and not (final and i == len(boundaries) - 1):
                continue
            pieces = list(self._pending.pieces(b))
            self._spans[start] = (b - start, self._hasher.submit(_block_digests, pieces, self._stream_hash))
            self._in_flight.append(self._spans[start][1])
            while len(self._in_flight) > MAX_HASH_IN_FLIGHT:  # bound the memory held for hashing
                self._in_flight.popleft().result()

    def fixed_boundaries(self, span: int) -> list[int]:
        """Every multiple of ``span`` between the pending bytes' start and end (plain tar:
        spans are cut as the bytes arrive, so at most about ``span`` bytes wait for hashing)."""
        first = (self._pending.start // span + 1) * span
        return list(range(first, self._pending.end + 1, span))

    def span_starts(self) -> list[int]:
        return sorted(self._spans)

    @property
    def digests(self) -> dict[int, tuple[int, str, list[str]]]:
        """span start -> (size, chunk digest, block digests); waits for the hashing."""
        out = {}
        for start, (size, fut) in sorted(self._spans.items()):
            blocks = fut.result()
            out[start] = (size, block_list_digest(blocks), blocks)
        return out

    def diff_id(self) -> str:
        """sha256 of every byte cut into spans; call after ``digests``."""
        return "sha256:" + self._stream_hash.hexdigest()

    def close(self) -> None:
        self._hasher.shutdown(cancel_futures=True)


def _fixed_chunks(sink: _SpanDigests, total: int, span: int) -> None:
    sink.cut([*range(span, total, span), total])


def build_seekable_index(
    path: str,
    encoding: Encoding,
    blob_digest: str,
    span: int = 1 << 20,
    gzip_threads: int = 1,
    limits: TarLimits = DEFAULT_TAR_LIMITS,
) -> SeekableIndex:
    """Read the blob at ``path`` once and return its index (and gzip windows).

    The index records the diff_id computed from the stream: the caller compares it with the
    image config's. ``gzip_threads`` > 1 lets rapidgzip inflate in parallel: faster, but
    its cache then needs about 100 MB more.
    """
    size = os.path.getsize(path)
    max_bytes = limits.max_stream_bytes(size, encoding != "tar")
    sink = _SpanDigests(limits, max_bytes, min_span=span if encoding == "gzip" else 0)
    try:
        built = _build(path, encoding, blob_digest, size, span, gzip_threads, sink)
    finally:
        sink.close()
    add_compressed_digests(path, built.index.chunks)
    return built


def _build(
    path: str,
    encoding: Encoding,
    blob_digest: str,
    size: int,
    span: int,
    threads: int,
    sink: _SpanDigests,
) -> SeekableIndex:
    if encoding == "gzip":
        return _gzip_index(path, blob_digest, size, span, threads, sink)
    if encoding == "zstd":
        return _zstd_index(path, blob_digest, size, span, sink)
    if encoding != "tar":
        raise LayerError(f"index-only mode cannot index {encoding} layers")
    stream = open_uncompressed(path, "tar")
    try:
        total = _walk_with_cuts(stream, sink, lambda: sink.fixed_boundaries(span))
    finally:
        stream.close()
    _fixed_chunks(sink, total, span)
    chunks = [
        Chunk(c_offset=u, c_size=n, u_offset=u, u_size=n, digest=d, blocks=b)
        for u, (n, d, b) in sorted(sink.digests.items())
    ]
    return SeekableIndex(_make_index("tar", blob_digest, size, total, chunks, sink))


def _walk_with_cuts(stream: UncompressedStream, sink: _SpanDigests, boundaries: Callable[[], list[int]]) -> int:
    """walk_tar, closing spans as boundaries become known."""

    class _CuttingSink:
        def __init__(self) -> None:
            self._since = 0

        def write(self, data: bytes, offset: int) -> None:
            sink.write(data, offset)
            self._since += len(data)
            if self._since >= 8 << 20:
                self._since = 0
                sink.cut(boundaries())

        def entry(self, entry: Entry, header_offset: int) -> None:
            sink.entry(entry, header_offset)

    return walk_tar(stream, _CuttingSink(), sink.limits, sink.max_stream_bytes)


def _gzip_index(path: str, blob_digest: str, size: int, span: int, threads: int, sink: _SpanDigests) -> SeekableIndex:
    # rapidgzip decodes (and reports boundaries) every DECODE_CHUNK bytes or so; the sink
    # keeps a boundary about every ``span`` bytes. Smaller decode chunks bound its memory.
    stream = GzipStream(path, min(span, DECODE_CHUNK), threads)
    try:
        total = _walk_with_cuts(stream, sink, stream.known_boundaries)
        bounds = [u for u in stream.known_boundaries() if u < total]
        sink.cut([*(u for u in bounds if u > 0), total], final=True)
        keep = {*sink.span_starts(), max(bounds, default=0)}  # the last span is decoded once more below
        points = stream.checkpoints(keep.__contains__)
    finally:
        stream.close()
    _verify_gzip_end(path, points, total)
    by_u = {p.u_offset: p for p in points}
    digests = sink.digests
    starts = sorted(digests)
    windows: list[bytes] = []
    chunks: list[Chunk] = []
    for i, u in enumerate(starts):
        p = by_u.get(u)
        if p is None:
            raise LayerError(f"no gzip checkpoint at uncompressed offset {u}")
        u_size, digest, blocks = digests[u]
        nxt = by_u[starts[i + 1]] if i + 1 < len(starts) else None
        c_start = p.c_offset - 1 if p.bits else p.c_offset
        c_end = min(nxt.c_offset + 1, size) if nxt else size
        wid = -1
        if p.window:
            wid = len(windows)
            windows.append(p.window)
        chunks.append(
            Chunk(
                c_offset=c_start,
                c_size=c_end - c_start,
                u_offset=u,
                u_size=u_size,
                digest=digest,
                blocks=blocks,
                bits=p.bits,
                window=wid,
            )
        )
    return SeekableIndex(_make_index("gzip", blob_digest, size, total, chunks, sink), windows)


def _verify_gzip_end(path: str, points: list[GzipCheckpoint], total: int) -> None:
    """rapidgzip accepts a truncated stream silently: decode the last span strictly."""
    spans = [p for p in points if p.u_offset < total] or points[:1]  # rapidgzip may add an end point
    if not spans:
        raise LayerError("empty or invalid gzip stream")
    last = spans[-1]
    start = last.c_offset - 1 if last.bits else last.c_offset
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    try:
        inflate_from_checkpoint(data, last.bits, last.window, total - last.u_offset, expect_end=True)
    except InflateError as e:
        raise LayerError(f"corrupt or truncated gzip: {e}") from e


class _FrameSlice:
    """Bytes ``[offset, offset + length)`` of a file, as a readable."""

    def __init__(self, f: BinaryIO, offset: int, length: int) -> None:
        self._f, self._pos, self._left = f, offset, length

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        self._f.seek(self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        self._left -= len(data)
        return data


class _FrameStream:
    """The frames of a zstd blob, decoded one by one, recording each frame's output size."""

    def __init__(self, path: str, frames: list[tuple[int, int]]) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.sizes: list[int] = []
        self._blocks = self._decode(frames)

    def _decode(self, frames: list[tuple[int, int]]) -> Iterator[bytes]:
        for i, (off, csize) in enumerate(frames):
            self.sizes.append(0)
            dctx = zstandard.ZstdDecompressor()
            try:
                frame = _FrameSlice(self._f, off, csize)
                for block in dctx.read_to_iter(frame, read_size=1 << 20, write_size=1 << 20):  # type: ignore[arg-type]
                    self.sizes[-1] += len(block)
                    yield block
            except zstandard.ZstdError as e:
                raise LayerError(f"corrupt zstd frame {i} at offset {off}: {e}") from e

    def read(self, n: int) -> bytes:
        return next(self._blocks, b"")

    def close(self) -> None:
        self._f.close()


def _zstd_index(path: str, blob_digest: str, size: int, span: int, sink: _SpanDigests) -> SeekableIndex:
    frames = zstd_frames(path)
    stream = _FrameStream(path, frames)
    try:
        total = _walk_with_cuts(stream, sink, lambda: _running_ends(stream.sizes)[:-1])
    finally:
        stream.close()
    if len(stream.sizes) != len(frames):
        raise LayerError("zstd frames end before the tar stream does")
    biggest = max(stream.sizes, default=0)
    if biggest > max(4 * span, 64 << 20) or (len(frames) == 1 and biggest > span):
        raise NotSeekableError(
            f"zstd layer has {len(frames)} frame(s), the largest {biggest} bytes uncompressed: "
            "index-only mode needs many small frames (use --mode full or --fallback full)"
        )
    ends = _running_ends(stream.sizes)
    sink.cut(ends)
    digests = sink.digests
    chunks = []
    u = 0
    for (off, csize), n in zip(frames, stream.sizes, strict=True):
        if n:
            _, digest, blocks = digests[u]
            chunks.append(Chunk(c_offset=off, c_size=csize, u_offset=u, u_size=n, digest=digest, blocks=blocks))
        u += n
    return SeekableIndex(_make_index("zstd", blob_digest, size, total, chunks, sink))


def _running_ends(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for n in sizes:
        acc += n
        out.append(acc)
    return out


def _make_index(
    encoding: Encoding,
    blob_digest: str,
    size: int,
    total: int,
    chunks: list[Chunk],
    sink: _SpanDigests,
) -> LayerIndex:
    index = LayerIndex(
        encoding=encoding,
        blob_digest=blob_digest,
        blob_size=size,
        diff_id=sink.diff_id(),
        uncompressed_size=total,
        chunks=chunks,
        entries=sink.entries,
    )
    index.validate_layout()
    return index
