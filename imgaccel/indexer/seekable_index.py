"""Index-only mode: build a ``LayerIndex`` for a layer blob without changing it.

* tar: chunks are fixed ``span``-sized pieces of the blob (compressed == uncompressed).
* gzip: chunks run between the deflate block boundaries rapidgzip decodes at about every
  ``span`` uncompressed bytes; each keeps zran's bit offset and 32 KiB window.
* zstd: one chunk per zstd frame. A layer that is one big frame cannot be indexed
  (``NotSeekableError``): convert it in full mode instead.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import zstandard

from imgaccel.formats.layer_index import Chunk, Encoding, Entry, LayerIndex
from imgaccel.indexer.errors import LayerError, NotSeekableError
from imgaccel.indexer.raw_inflate import InflateError, inflate_from_checkpoint
from imgaccel.indexer.tar_walker import DigestSink, walk_tar
from imgaccel.indexer.uncompressed_stream import GzipCheckpoint, GzipStream, UncompressedStream, open_uncompressed
from imgaccel.indexer.zstd_frames import zstd_frames

# Unknown checkpoint boundaries may hold back at most this much data for hashing.
MAX_PENDING = 512 << 20


@dataclass
class SeekableIndex:
    index: LayerIndex
    windows: list[bytes] = field(default_factory=list)


class _SpanDigests(DigestSink):
    """diff_id + entries + sha256 of every span between boundaries known only as we go."""

    def __init__(self) -> None:
        super().__init__()
        self._buf = bytearray()
        self._buf_start = 0
        self.digests: dict[int, tuple[int, str]] = {}  # span start -> (size, digest)

    def write(self, data: bytes, offset: int) -> None:
        super().write(data, offset)
        self._buf += data
        if len(self._buf) > MAX_PENDING:
            raise LayerError("gzip checkpoints lag too far behind the decoder")

    @property
    def pending_end(self) -> int:
        return self._buf_start + len(self._buf)

    def cut(self, boundaries: list[int]) -> None:
        """Close every span whose end boundary is now known and fully received."""
        for b in boundaries:
            if b <= self._buf_start:
                continue
            if b > self.pending_end:
                break
            n = b - self._buf_start
            self.digests[self._buf_start] = (n, "sha256:" + hashlib.sha256(self._buf[:n]).hexdigest())
            del self._buf[:n]
            self._buf_start = b


def _fixed_chunks(sink: _SpanDigests, total: int, span: int) -> None:
    sink.cut([*range(span, total, span), total])


def build_seekable_index(path: str, encoding: Encoding, blob_digest: str, span: int = 4 << 20) -> SeekableIndex:
    """Read the blob at ``path`` once and return its index (and gzip windows)."""
    size = os.path.getsize(path)
    sink = _SpanDigests()
    if encoding == "gzip":
        return _gzip_index(path, blob_digest, size, span, sink)
    if encoding == "zstd":
        return _zstd_index(path, blob_digest, size, span, sink)
    if encoding != "tar":
        raise LayerError(f"index-only mode cannot index {encoding} layers")
    stream = open_uncompressed(path, "tar")
    try:
        total = _walk_with_cuts(stream, sink, lambda: [])
    finally:
        stream.close()
    _fixed_chunks(sink, total, span)
    chunks = [Chunk(c_offset=u, c_size=n, u_offset=u, u_size=n, digest=d) for u, (n, d) in sorted(sink.digests.items())]
    return SeekableIndex(_make_index("tar", blob_digest, size, total, chunks, sink.entries, sink))


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

    return walk_tar(stream, _CuttingSink())


def _gzip_index(path: str, blob_digest: str, size: int, span: int, sink: _SpanDigests) -> SeekableIndex:
    stream = GzipStream(path, span)
    try:
        total = _walk_with_cuts(stream, sink, stream.known_boundaries)
        points = stream.checkpoints()
    finally:
        stream.close()
    _verify_gzip_end(path, points, total)
    bounds = [p.u_offset for p in points if p.u_offset > 0]
    sink.cut([*bounds, total])
    windows: list[bytes] = []
    chunks: list[Chunk] = []
    for i, p in enumerate(points):
        u_end = points[i + 1].u_offset if i + 1 < len(points) else total
        if u_end == p.u_offset:
            continue  # an empty span (e.g. an empty trailing member)
        if p.u_offset not in sink.digests or sink.digests[p.u_offset][0] != u_end - p.u_offset:
            raise LayerError(f"gzip checkpoint at uncompressed offset {p.u_offset} was not hashed")
        c_start = p.c_offset - 1 if p.bits else p.c_offset
        c_end = min(points[i + 1].c_offset + 1, size) if i + 1 < len(points) else size
        wid = -1
        if p.window:
            wid = len(windows)
            windows.append(p.window)
        chunks.append(
            Chunk(
                c_offset=c_start,
                c_size=c_end - c_start,
                u_offset=p.u_offset,
                u_size=u_end - p.u_offset,
                digest=sink.digests[p.u_offset][1],
                bits=p.bits,
                window=wid,
            )
        )
    return SeekableIndex(_make_index("gzip", blob_digest, size, total, chunks, sink.entries, sink), windows)


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
    chunks = []
    u = 0
    for (off, csize), n in zip(frames, stream.sizes, strict=True):
        if n:
            chunks.append(Chunk(c_offset=off, c_size=csize, u_offset=u, u_size=n, digest=sink.digests[u][1]))
        u += n
    return SeekableIndex(_make_index("zstd", blob_digest, size, total, chunks, sink.entries, sink))


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
    entries: list[Entry],
    sink: DigestSink,
) -> LayerIndex:
    index = LayerIndex(
        encoding=encoding,
        blob_digest=blob_digest,
        blob_size=size,
        diff_id=sink.diff_id(),
        uncompressed_size=total,
        chunks=chunks,
        entries=entries,
    )
    index.validate_layout()
    return index
