"""Full mode: re-encode a layer as independent zstd (or lz4) frames cut on tar entry boundaries.

Frames start at an entry's first header block, or every ``chunk_size`` bytes inside a large
file's data, and group small entries up to ``frame_size`` bytes: a lazy reader fetches whole
frames, so small frames keep what it fetches for a small file close to the file's own size
(128 KiB frames at zstd level 4 stay as small as 4 MiB frames at level 3 give, within 5%). Decompressing every frame
in order yields the original tar byte for byte. The TOC and seek table follow the data frames
(``formats.toc``). Each frame's sha256 is its chunk's ``c_digest``. Compression runs on a
thread pool (both codecs release the GIL); memory is bounded by ``MAX_IN_FLIGHT`` bytes of
frames in flight.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Literal

import lz4.frame
import zstandard

from imgaccel.formats import toc
from imgaccel.formats.layer_index import Chunk, Encoding, Entry, LayerIndex, encode_index_json
from imgaccel.indexer.limits import DEFAULT_TAR_LIMITS, TarLimits
from imgaccel.indexer.pending_bytes import PendingBytes
from imgaccel.indexer.tar_walker import DigestSink, walk_tar
from imgaccel.indexer.uncompressed_stream import open_uncompressed

Compression = Literal["zstd", "lz4"]
OutputFn = Callable[[int], None]
MAX_IN_FLIGHT = 24 << 20  # uncompressed bytes queued for or in compression


@dataclass
class FullLayer:
    index: LayerIndex
    digest: str  # of the new blob
    size: int
    toc_offset: int
    toc_size: int
    toc_digest: str


class _FrameWriter:
    """Compresses frames on a pool and appends them to ``out`` in order."""

    def __init__(
        self, out: BinaryIO, compression: Compression, level: int, threads: int, on_output: OutputFn | None
    ) -> None:
        self._out = out
        self._on_output = on_output
        self._compression = compression
        self._level = level
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="imgaccel-compress")
        self._local = threading.local()
        self._pending: deque[tuple[int, int, Future[tuple[bytes, str, str]]]] = deque()
        self._hash = hashlib.sha256()
        self._pending_bytes = 0
        self.offset = 0
        self.chunks: list[Chunk] = []

    def _compress(self, data: bytes) -> tuple[bytes, str, str]:
        """The frame, the sha256 of ``data`` and the sha256 of the frame (``Chunk.c_digest``)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if self._compression == "zstd":
            cctx = getattr(self._local, "cctx", None)
            if cctx is None:
                cctx = self._local.cctx = zstandard.ZstdCompressor(level=self._level, write_content_size=True)
            frame = cctx.compress(data)
        else:
            frame = lz4.frame.compress(data, compression_level=self._level, store_size=True)
        return frame, digest, "sha256:" + hashlib.sha256(frame).hexdigest()

    def submit(self, u_offset: int, data: bytes) -> None:
        self._pending.append((u_offset, len(data), self._pool.submit(self._compress, data)))
        self._pending_bytes += len(data)
        while self._pending_bytes >= MAX_IN_FLIGHT:
            self._drain_one()

    def _drain_one(self) -> None:
        u_offset, u_size, fut = self._pending.popleft()
        self._pending_bytes -= u_size
        frame, digest, c_digest = fut.result()
        self.write_raw(frame)
        self.chunks.append(Chunk(c_offset=self.offset - len(frame), c_size=len(frame), u_offset=u_offset,
                                 u_size=u_size, digest=digest, c_digest=c_digest))  # fmt: skip

    def write_raw(self, data: bytes) -> None:
        self._out.write(data)
        self._hash.update(data)
        self.offset += len(data)
        if self._on_output is not None:
            self._out.flush()
            self._on_output(self.offset)

    def flush(self) -> None:
        while self._pending:
            self._drain_one()
        self._pool.shutdown()

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


class _FrameCutter(DigestSink):
    """Collects the stream and cuts it into frames at allowed cut points."""

    def __init__(self, writer: _FrameWriter, frame_size: int, chunk_size: int) -> None:
        super().__init__()
        self._writer = writer
        self._frame = frame_size
        self._chunk = chunk_size
        self._pending = PendingBytes()  # starts at the open frame
        self._last_cut = 0  # latest allowed cut point at or before the received data
        # Announced cut points not yet reached, as ranges: a file's chunk boundaries are
        # produced as the stream reaches them, never listed up front.
        self._cuts: deque[range] = deque()

    def write(self, data: bytes, offset: int) -> None:
        super().write(data, offset)
        self._pending.append(data)
        self._advance()

    def entry(self, entry: Entry, header_offset: int) -> None:
        super().entry(entry, header_offset)
        self._cuts.append(range(header_offset, header_offset + 1))
        if entry.type == "reg" and entry.size > self._chunk:
            self._cuts.append(range(entry.offset + self._chunk, entry.offset + entry.size, self._chunk))
        self._advance()

    def _advance(self) -> None:
        while self._cuts:
            cuts = self._cuts[0]
            if not cuts:
                self._cuts.popleft()
                continue
            c = cuts[0]
            if c > self._pending.end:
                break
            self._cuts[0] = cuts[1:]
            if c - self._pending.start > self._frame and self._last_cut > self._pending.start:
                self._emit(self._last_cut)
            self._last_cut = c

    def _emit(self, upto: int) -> None:
        start = self._pending.start
        if upto > start:
            self._writer.submit(start, self._pending.take(upto))

    def finish(self, total: int) -> None:
        self._cuts.append(range(total, total + 1))
        self._advance()
        self._emit(total)


def encode_full_layer(
    src_path: str,
    src_encoding: Encoding,
    out_path: str,
    compression: Compression = "zstd",
    chunk_size: int = 4 << 20,
    level: int | None = None,
    threads: int | None = None,
    on_output: OutputFn | None = None,
    frame_size: int = 128 << 10,
    limits: TarLimits = DEFAULT_TAR_LIMITS,
) -> FullLayer:
    """Re-encode the blob at ``src_path`` into ``out_path``; returns its index and TOC location.

    ``on_output(n)`` is called (from this thread) whenever the first ``n`` bytes of
    ``out_path`` are written and flushed, so a caller can upload while encoding runs.
    """
    threads = threads or os.cpu_count() or 1
    if level is None:
        level = 4 if compression == "zstd" else 0
    with open(out_path, "wb") as out:
        writer = _FrameWriter(out, compression, level, threads, on_output)
        cutter = _FrameCutter(writer, min(frame_size, chunk_size), chunk_size)
        stream = open_uncompressed(src_path, src_encoding)
        try:
            max_bytes = limits.max_stream_bytes(os.path.getsize(src_path), src_encoding != "tar")
            total = walk_tar(stream, cutter, limits, max_bytes)
            cutter.finish(total)
        finally:
            stream.close()
            writer.flush()
        data_end = writer.offset
        index = LayerIndex(
            encoding=compression,
            blob_digest="",  # a blob cannot hold its own digest: readers take it from the descriptor
            blob_size=data_end,
            diff_id=cutter.diff_id(),
            uncompressed_size=total,
            chunks=writer.chunks,
            entries=cutter.entries,
        )
        toc_frame = toc.skippable_frame(toc.TOC_MAGIC, encode_index_json(index))
        writer.write_raw(toc_frame)
        if compression == "zstd":
            sizes = [(c.c_size, c.u_size) for c in writer.chunks] + [(len(toc_frame), 0)]
            writer.write_raw(toc.seek_table(sizes))
    return FullLayer(
        index=index,
        digest=writer.digest(),
        size=writer.offset,
        toc_offset=data_end,
        toc_size=len(toc_frame),
        toc_digest="sha256:" + hashlib.sha256(toc_frame).hexdigest(),
    )
