"""Walk a tar stream once, in order, reporting every byte and every entry.

``walk_tar`` reads the uncompressed stream through ``tarfile`` in streaming mode, hands
every byte it reads (headers, data, padding, and the end-of-archive trailer) to a
``StreamSink`` and every entry, as a ``formats.layer_index.Entry`` with the offset of its data
in the stream, to the same sink. Names are recorded as the archive states them; hostile
names are data here and are neutralized by the reader, which never resolves outside the image.
"""

from __future__ import annotations

import base64
import hashlib
import tarfile
from typing import Protocol

from imgaccel.formats.layer_index import Entry, EntryType
from imgaccel.indexer.errors import LayerError
from imgaccel.indexer.uncompressed_stream import UncompressedStream

READ_SIZE = 1 << 20

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


class _Tee:
    """File-like view of the stream that shows each byte to the sink once."""

    def __init__(self, stream: UncompressedStream, sink: StreamSink) -> None:
        self._stream = stream
        self._sink = sink
        self.pos = 0
        self._recent: list[tuple[int, bytes]] = []  # the last reads: tarfile reads ahead

    def read(self, n: int = READ_SIZE) -> bytes:
        data = self._stream.read(n)
        if data:
            self._sink.write(data, self.pos)
            self._recent = [*self._recent[-2:], (self.pos, data)]
            self.pos += len(data)
        return data

    def nonzero_after(self, offset: int) -> int | None:
        """Offset of the first non-zero byte at or after ``offset`` among recent reads."""
        for start, data in self._recent:
            skip = max(offset - start, 0)
            if skip >= len(data):
                continue
            rest = data[skip:]
            stripped = rest.lstrip(b"\0")
            if stripped:
                return start + skip + len(rest) - len(stripped)
        return None


def to_entry(ti: tarfile.TarInfo) -> Entry:
    etype = _TYPES.get(ti.type)
    if etype is None:
        if ti.type == tarfile.GNUTYPE_SPARSE or ti.issparse():
            raise LayerError(f"tar entry {ti.name!r} is a GNU sparse file, which is not supported")
        raise LayerError(f"tar entry {ti.name!r} has unsupported type {ti.type!r}")
    xattrs = {}
    for key, value in ti.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
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


def walk_tar(stream: UncompressedStream, sink: StreamSink) -> int:
    """Read the whole stream; returns its length. Raises ``LayerError`` on a bad archive."""
    tee = _Tee(stream, sink)
    try:
        tf = tarfile.open(fileobj=tee, mode="r|", bufsize=READ_SIZE)  # type: ignore[call-overload]  # noqa: SIM115
    except tarfile.TarError as e:
        raise LayerError(f"not a tar archive: {e}") from e
    last_end = 0
    last: Entry | None = None
    try:
        while True:
            ti = tf.next()
            if ti is None:
                break
            tf.members.clear()  # stream mode keeps every TarInfo otherwise
            entry = to_entry(ti)
            if entry.type == "reg":
                last_end = max(last_end, entry.offset + entry.size)
            last = entry
            sink.entry(entry, ti.offset)
    except tarfile.TarError as e:
        if last is not None and last.offset + last.size > tee.pos:
            raise LayerError(_past_end(last, tee.pos)) from e
        raise LayerError(f"corrupt tar stream at offset {tee.pos}: {e}") from e
    end_of_entries = tf.offset
    garbage = tee.nonzero_after(end_of_entries)
    while garbage is None:
        start = tee.pos
        data = tee.read(READ_SIZE)
        if not data:
            break
        garbage = tee.nonzero_after(start)
    if garbage is not None:
        raise LayerError(f"invalid tar header or trailing data at offset {garbage}")
    if last is not None and last_end > tee.pos:
        raise LayerError(_past_end(last, tee.pos))
    return tee.pos


def _past_end(entry: Entry, stream_end: int) -> str:
    return (
        f"tar entry {entry.name!r} declares {entry.size} bytes at offset {entry.offset}, "
        f"past the end of the stream ({stream_end} bytes)"
    )


class DigestSink:
    """sha256 of the whole stream (the layer's diff_id) and the list of entries."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.entries: list[Entry] = []

    def write(self, data: bytes, offset: int) -> None:
        self._h.update(data)

    def entry(self, entry: Entry, header_offset: int) -> None:
        self.entries.append(entry)

    def diff_id(self) -> str:
        return "sha256:" + self._h.hexdigest()
