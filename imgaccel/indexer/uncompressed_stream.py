"""Sequential readers that turn a local layer blob into its uncompressed tar stream.

For index-only mode, gzip goes through rapidgzip (``GzipStream``: parallel inflate on every
core), which also reports the deflate block boundaries it decoded: the checkpoints. Full mode
inflates with ISA-L on one thread (``open_uncompressed``), leaving the other cores to zstd.
"""

from __future__ import annotations

import io
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import isal.igzip_threaded
import lz4.frame
import rapidgzip
import zstandard

from imgaccel.formats.layer_index import Encoding
from imgaccel.indexer.errors import LayerError


class UncompressedStream(Protocol):
    def read(self, n: int) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class GzipCheckpoint:
    """A deflate block boundary: bit position ``c_offset * 8 - bits`` <-> ``u_offset``."""

    c_offset: int
    u_offset: int
    bits: int
    window: bytes  # 32 KiB before u_offset (unused bytes zeroed), b"" at a member start


class GzipStream:
    """Parallel gzip inflate of a local file, exposing its checkpoints."""

    def __init__(self, path: str, chunk_size: int, threads: int = 1) -> None:
        self._path = path
        self._file = rapidgzip._RapidgzipFile(path, parallelization=threads, chunk_size=chunk_size)

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        try:
            got = self._file.readinto(buf)
        except Exception as e:  # rapidgzip raises plain exceptions for bad data
            raise LayerError(f"corrupt or truncated gzip: {e}") from e
        return bytes(memoryview(buf)[:got])

    def known_boundaries(self) -> list[int]:
        """Uncompressed offsets of the checkpoints decoded so far, ascending."""
        return sorted(self._file.available_block_offsets().values())

    def checkpoints(self, keep_window: Callable[[int], bool]) -> list[GzipCheckpoint]:
        """All checkpoints, with the windows of those ``keep_window(u_offset)`` selects.
        Call after reading the stream to its end. (The gztool export is used because its
        windows are compressed: rapidgzip keeps what it exports in memory.)"""
        with tempfile.TemporaryFile(prefix="imgaccel-gzindex-") as tmp:
            self._file.export_index(tmp, rapidgzip.IndexFormat.GZTOOL)
            tmp.seek(0)
            return read_gztool_index(tmp, keep_window)

    def close(self) -> None:
        self._file.close()


def read_gztool_index(f: BinaryIO, keep_window: Callable[[int], bool]) -> list[GzipCheckpoint]:
    """Parse a gztool v0 index (as rapidgzip exports it), streaming.

    Layout, integers big-endian: 8 zero bytes, ``gzipindx``, u64 point count, u64 capacity;
    per point: u64 uncompressed offset, u64 compressed offset, u32 bits, u32 window length,
    then the window compressed with zlib (absent when the length is 0); finally u64 total
    uncompressed size. ``bits`` follows zran: the point is at bit ``offset * 8 - bits``.
    """
    head = f.read(32)
    if len(head) < 32 or head[:16] != b"\0" * 8 + b"gzipindx":
        raise LayerError("gzip index export has an unknown format")
    (count,) = struct.unpack_from(">Q", head, 16)
    points = []
    for _ in range(count):
        entry = f.read(24)
        if len(entry) < 24:
            raise LayerError("gzip index export is truncated")
        u, c, bits, wlen = struct.unpack(">QQII", entry)
        window = b""
        if wlen:
            if keep_window(u):
                window = zlib.decompress(f.read(wlen))
                if len(window) != 32768:
                    raise LayerError(f"gzip index window at {u} is {len(window)} bytes")
            else:
                f.seek(wlen, 1)
        points.append(GzipCheckpoint(c, u, bits, window))
    return points


class _FrameReader:
    """zstd or lz4 frames decoded back to back (skippable frames ignored)."""

    def __init__(self, f: BinaryIO, encoding: Encoding) -> None:
        self._raw: io.RawIOBase | BinaryIO
        if encoding == "zstd":
            self._raw = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        else:
            self._raw = lz4.frame.LZ4FrameFile(f, "rb")
        self._f = f

    def read(self, n: int) -> bytes:
        try:
            return self._raw.read(n)
        except (zstandard.ZstdError, RuntimeError, EOFError, OSError) as e:
            raise LayerError(f"corrupt or truncated compressed stream: {e}") from e

    def close(self) -> None:
        self._raw.close()
        self._f.close()


class _PlainReader:
    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    def read(self, n: int) -> bytes:
        return self._f.read(n)

    def close(self) -> None:
        self._f.close()


class _StrictGzipReader:
    """gzip (ISA-L) inflated on one background thread; fails on truncation and CRC errors."""

    def __init__(self, path: str) -> None:
        self._f: BinaryIO = isal.igzip_threaded.open(path, "rb", threads=1)  # type: ignore[no-untyped-call]

    def read(self, n: int) -> bytes:
        try:
            return bytes(self._f.read(n))
        except (EOFError, OSError, ValueError) as e:
            raise LayerError(f"corrupt or truncated gzip: {e}") from e

    def close(self) -> None:
        self._f.close()


def open_uncompressed(path: str, encoding: Encoding) -> UncompressedStream:
    """A strict sequential reader of the uncompressed tar inside the blob at ``path``."""
    if encoding == "gzip":
        return _StrictGzipReader(path)
    f = open(path, "rb")  # noqa: SIM115 - the returned reader closes it
    if encoding in ("zstd", "lz4"):
        return _FrameReader(f, encoding)
    return _PlainReader(f)
