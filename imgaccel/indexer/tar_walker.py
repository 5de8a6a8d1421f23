"""Walk a tar stream once, in order, reporting every byte and every entry.

``walk_tar`` pulls the uncompressed stream in large blocks and hands each block (headers,
data, padding, and the end-of-archive trailer) to a ``StreamSink``; ``tarfile`` parses the
headers and seeks over the data. Every entry goes to the same sink, as a
``formats.layer_index.Entry`` with the offset of its data in the stream. Names are recorded
as the archive states them; hostile names are data here and are neutralized by the reader,
which never resolves outside the image. Header fields are checked against ``TarLimits``
before tarfile acts on them: a negative size would make it seek backwards forever, a huge
one or a huge extended header would make callers allocate for it.
"""

from __future__ import annotations

import base64
import hashlib
import tarfile
from collections import deque
from typing import Protocol

from imgaccel.formats.layer_index import Entry, EntryType
from imgaccel.indexer.errors import LayerError
from imgaccel.indexer.limits import DEFAULT_TAR_LIMITS, TarLimits
from imgaccel.indexer.uncompressed_stream import UncompressedStream

READ_SIZE = 4 << 20

_TYPES: dict[bytes, EntryType] = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.CONTTYPE: "reg",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


class StreamSink(Protocol):
    def write(self, data: bytes, offset: int) -> None:
        """``data`` are the uncompressed bytes at ``offset`` (called in stream order)."""

    def entry(self, entry: Entry, header_offset: int) -> None:
        """An entry whose first header block starts at ``header_offset``."""


class _ForwardReader:
    """A forward-seekable file over the stream, for ``tarfile``'s seekable ``r:`` mode.

    tarfile then reads only headers and seeks over file data, so data bytes never pass
    through Python-level copies: each block pulled from the stream goes to the sink whole.
    The last two blocks stay available because tarfile steps back one byte to detect a
    truncated member.
    """

    def __init__(self, stream: UncompressedStream, sink: StreamSink, max_header_bytes: int) -> None:
        self._stream = stream
        self._sink = sink
        self._max_read = max_header_bytes + tarfile.BLOCKSIZE
        self._blocks: deque[tuple[int, bytes]] = deque(maxlen=2)
        self._pos = 0
        self.end = 0  # stream bytes pulled so far

    def _pull(self) -> bool:
        data = self._stream.read(READ_SIZE)
        if not data:
            return False
        self._sink.write(data, self.end)
        self._blocks.append((self.end, data))
        self.end += len(data)
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 1:
            pos += self._pos
        elif whence != 0:
            raise OSError("the layer stream cannot seek from its end")
        if self._blocks and pos < self._blocks[0][0]:
            raise OSError(f"cannot seek back to offset {pos} in the layer stream")
        self._pos = pos
        return pos

    def read(self, n: int = -1) -> bytes:
        """What tarfile asks for: a header block, or a whole PAX / GNU long-name record."""
        if n < 0:
            raise LayerError(f"tar header before offset {self._pos} declares a negative size")
        if n > self._max_read:
            raise LayerError(
                f"tar header before offset {self._pos} has a {n}-byte extended header (PAX or GNU long name), "
                f"over the limit max_header_bytes={self._max_read - tarfile.BLOCKSIZE}"
            )
        return self._read(n)

    def _read(self, n: int) -> bytes:
        out: list[bytes] = []
        while n != 0:
            while self._pos >= self.end:
                if not self._pull():
                    return b"".join(out)
            for start, block in self._blocks:
                if start <= self._pos < start + len(block):
                    off = self._pos - start
                    take = len(block) - off if n < 0 else min(n, len(block) - off)
                    out.append(block[off : off + take])
                    self._pos += take
                    n = n - take if n > 0 else n
                    break
            else:
                raise OSError(f"offset {self._pos} of the layer stream is no longer available")
        return b"".join(out)

    def first_nonzero(self, offset: int) -> int | None:
        """Offset of the first non-zero byte from ``offset`` to the end of the stream."""
        self.seek(max(offset, self._blocks[0][0] if self._blocks else 0))
        while True:
            pos = self._pos
            data = self._read(READ_SIZE)
            if not data:
                return None
            stripped = data.lstrip(b"\0")
            if stripped:
                return pos + len(data) - len(stripped)


def to_entry(ti: tarfile.TarInfo) -> Entry:
    if "\0" in ti.name or "\0" in ti.linkname:
        raise LayerError(f"tar entry {ti.name!r} has a NUL byte in its name or link target")
    etype = _TYPES.get(ti.type)
    if etype is None:
        if ti.type == tarfile.GNUTYPE_SPARSE or ti.issparse():
            raise LayerError(f"tar entry {ti.name!r} is a GNU sparse file, which is not supported")
        raise LayerError(f"tar entry {ti.name!r} has unsupported type {ti.type!r}")
    xattrs = {}
    for key, value in ti.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            if "\0" in key or not key.isprintable():
                raise LayerError(f"tar entry {ti.name!r} has an xattr whose name is not printable: {key!r}")
            raw = value.encode("utf-8", "surrogateescape")
            xattrs[key[len("SCHILY.xattr.") :]] = base64.b64encode(raw).decode()
    reg = etype == "reg"
    return Entry(
        name=ti.name,
        type=etype,
        size=ti.size if reg else 0,
        offset=ti.offset_data if reg else 0,
        mode=ti.mode & 0o7777,
        uid=ti.uid,
        gid=ti.gid,
        uname=ti.uname,
        gname=ti.gname,
        mtime=ti.mtime,
        linkname=ti.linkname,
        devmajor=ti.devmajor,
        devminor=ti.devminor,
        xattrs=xattrs,
    )


def walk_tar(
    stream: UncompressedStream,
    sink: StreamSink,
    limits: TarLimits = DEFAULT_TAR_LIMITS,
    max_stream_bytes: int | None = None,
) -> int:
    """Read the whole stream; returns its length. Raises ``LayerError`` on a bad archive.

    ``max_stream_bytes`` bounds what one entry may declare (``TarLimits.max_stream_bytes``).
    """
    reader = _ForwardReader(stream, sink, limits.max_header_bytes)
    try:
        tf = tarfile.open(  # type: ignore[call-overload]  # noqa: SIM115
            fileobj=reader, mode="r:", encoding="utf-8", errors="surrogateescape"
        )
    except (tarfile.TarError, OSError) as e:
        raise LayerError(f"not a tar archive: {e}") from e
    last_end = 0
    last: Entry | None = None
    count = 0
    try:
        # tarfile has already read the first header; each one is checked before the next
        # call to ``next`` lets tarfile seek by its size.
        while True:
            ti = tf.next()
            if ti is None:
                break
            tf.members.clear()  # TarFile keeps every TarInfo otherwise
            _check_header(ti, limits, max_stream_bytes)
            count += 1
            if count > limits.max_entries:
                raise LayerError(f"tar entry {ti.name!r}: the layer has more than max_entries={limits.max_entries}")
            entry = to_entry(ti)
            if entry.type == "reg":
                last_end = max(last_end, entry.offset + entry.size)
            last = entry
            sink.entry(entry, ti.offset)
    except (tarfile.TarError, OSError) as e:
        if last is not None and last.offset + last.size > reader.end:
            raise LayerError(_past_end(last, reader.end)) from e
        raise LayerError(f"corrupt tar stream at offset {reader.tell()}: {e}") from e
    garbage = reader.first_nonzero(tf.offset)
    if garbage is not None:
        raise LayerError(f"invalid tar header or trailing data at offset {garbage}")
    if last is not None and last_end > reader.end:
        raise LayerError(_past_end(last, reader.end))
    return reader.end


def _check_header(ti: tarfile.TarInfo, limits: TarLimits, max_stream_bytes: int | None) -> None:
    if ti.size < 0:
        raise LayerError(f"tar entry {ti.name!r} at offset {ti.offset} declares a negative size ({ti.size})")
    if max_stream_bytes is not None and ti.offset_data + ti.size > max_stream_bytes:
        raise LayerError(
            f"tar entry {ti.name!r} declares {ti.size} bytes at offset {ti.offset_data}, past the end of the stream, "
            f"which can hold at most {max_stream_bytes} bytes (limit max_expansion={limits.max_expansion})"
        )


def _past_end(entry: Entry, stream_end: int) -> str:
    return (
        f"tar entry {entry.name!r} declares {entry.size} bytes at offset {entry.offset}, "
        f"past the end of the stream ({stream_end} bytes)"
    )


class DigestSink:
    """The list of entries and, with ``hash_stream``, the sha256 of the whole stream (diff_id)."""

    def __init__(self, hash_stream: bool = True) -> None:
        self._h = hashlib.sha256() if hash_stream else None
        self.entries: list[Entry] = []

    def write(self, data: bytes, offset: int) -> None:
        if self._h is not None:
            self._h.update(data)

    def entry(self, entry: Entry, header_offset: int) -> None:
        self.entries.append(entry)

    def diff_id(self) -> str:
        if self._h is None:
            raise RuntimeError("this sink does not hash the stream")
        return "sha256:" + self._h.hexdigest()
