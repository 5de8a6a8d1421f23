"""imgaccel's per-layer index: the one data model behind both conversion modes.

A ``LayerIndex`` describes a layer blob as (1) the tar entries of its *uncompressed* stream,
each regular file with the offset of its data in that stream, and (2) a list of chunks:
independently decodable pieces of the blob, each mapping a compressed byte range to an
uncompressed byte range, with the sha256 of the uncompressed bytes so a reader verifies
every chunk before returning a byte of it.

Index-only mode stores it as a separate blob (``encode_index_blob``); full mode stores the
same JSON inside a zstd skippable frame at the end of the layer (``formats.toc``).  The byte
layout is specified in docs/FORMAT.md; this module is its executable form.

    index blob (media type ``INDEX_BLOB_MEDIA_TYPE``), all integers little-endian:
      offset  size  field
      0       8     magic  b"IMGACCIX"
      8       4     format version (u32) = FORMAT_VERSION
      12      4     flags (u32), 0
      16      8     J: byte length of the JSON section (u64)
      24      8     W: byte length of the window section (u64)
      32      J     one zstd frame: UTF-8 JSON of ``LayerIndex``
      32+J    W     one zstd frame: the gzip windows, ``window_size`` bytes each, window id
                    k at uncompressed offset k * window_size (absent: W = 0)
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Annotated, Literal

import zstandard
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticSerializationError

FORMAT_VERSION = 1

# Media and artifact types.
INDEX_ARTIFACT_TYPE = "application/vnd.imgaccel.index.v1"
INDEX_BLOB_MEDIA_TYPE = "application/vnd.imgaccel.layer.index.v1"
LAYER_LZ4 = "application/vnd.imgaccel.layer.v1.tar+lz4"

# Annotations on the manifests and descriptors imgaccel writes.
ANN_SOURCE_DIGEST = "io.imgaccel.source.digest"
ANN_SOURCE_REF = "io.imgaccel.source.reference"
ANN_MODE = "io.imgaccel.mode"
ANN_FORMAT_VERSION = "io.imgaccel.format.version"
ANN_LAYER_DIGEST = "io.imgaccel.layer.digest"  # index blob -> the source layer it indexes
ANN_LAYER_DIFF_ID = "io.imgaccel.layer.diff_id"  # sha256 of the layer's uncompressed tar, as verified
ANN_TOC_OFFSET = "io.imgaccel.toc.offset"  # full mode: where the TOC skippable frame starts
ANN_TOC_SIZE = "io.imgaccel.toc.size"  # full mode: its length, 8-byte header included
ANN_TOC_DIGEST = "io.imgaccel.toc.digest"  # full mode: sha256 of those bytes
ANN_UNCOMPRESSED_SIZE = "io.imgaccel.uncompressed.size"

INDEX_MAGIC = b"IMGACCIX"
_HEADER = struct.Struct("<8sIIQQ")
GZIP_WINDOW_SIZE = 32768
BLOCK_SIZE = 1 << 20  # granularity of Chunk.blocks

Encoding = Literal["tar", "gzip", "zstd", "lz4"]
EntryType = Literal["reg", "dir", "symlink", "hardlink", "char", "block", "fifo"]


class IndexFormatError(ValueError):
    """Bytes that claim to be an imgaccel index or TOC but are not a valid one."""


@dataclass(slots=True)
class Entry:
    """One tar entry, as the tar stream states it (names are not normalized here).

    A slotted dataclass rather than a model: a layer can hold a million entries (this is a
    quarter of the memory). Pydantic still validates it inside ``LayerIndex``.
    Strings hold the tar's bytes decoded as UTF-8 with ``surrogateescape`` (tarfile's and
    ``os.fsdecode``'s convention): a name that is not valid UTF-8 keeps its raw bytes, which
    ``os.fsencode`` gives back. In JSON such a field is escaped (see ``RAW_FIELDS``).
    """

    __pydantic_config__ = ConfigDict(extra="forbid")
    name: str
    type: EntryType
    size: Annotated[int, Field(ge=0)] = 0  # data bytes (reg only)
    offset: Annotated[int, Field(ge=0)] = 0  # data offset in the uncompressed tar (reg only)
    mode: int = 0  # permission bits incl. setuid/setgid/sticky, no file-type bits
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime: float = 0
    linkname: str = ""  # symlink target, or the hardlink's target path in this layer
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)  # SCHILY.xattr.<name> -> base64 of the raw value


class Chunk(BaseModel):
    """An independently decodable piece of the blob.

    Fetch blob bytes ``[c_offset, c_offset + c_size)``, decode them with the layer's
    encoding into exactly ``u_size`` bytes, which are uncompressed-stream bytes
    ``[u_offset, u_offset + u_size)``, and check their sha256 against ``digest``.
    gzip: ``bits`` > 0 means the chunk starts at the top ``bits`` bits of the first fetched
    byte (zran's convention); ``window`` is the id of the 32 KiB preset dictionary, -1 none.
    ``blocks`` (index-only mode): sha256 hex of each ``BLOCK_SIZE`` piece of the uncompressed
    bytes, the last one shorter, so a reader may decode and verify only the prefix it needs.
    ``digest`` is then ``block_list_digest(blocks)``: the sha256 of the concatenated binary
    block digests. Without ``blocks`` (full mode), ``digest`` is the sha256 of the bytes.
    ``c_digest`` (optional, added in this revision of version 1): sha256 of the compressed blob
    bytes ``[c_offset, c_offset + c_size)`` exactly as fetched (a gzip chunk's shared first
    byte included), so a cache node can verify and keep the chunk without decoding it.
    """

    model_config = ConfigDict(extra="forbid")
    c_offset: int = Field(ge=0)
    c_size: int = Field(ge=0)
    u_offset: int = Field(ge=0)
    u_size: int = Field(ge=0)
    digest: str
    blocks: list[str] = []
    bits: int = Field(default=0, ge=0, le=7)
    window: int = -1
    c_digest: str | None = Field(default=None, pattern=r"^sha256:[0-9a-f]{64}$")


# Entry fields that may hold bytes that are not UTF-8. In the JSON, such a field holds a
# display form (invalid bytes replaced by U+FFFD) and ``<field>_raw`` the base64 of its raw
# bytes, which a reader must use instead when present.
RAW_FIELDS = ("name", "linkname", "uname", "gname")


def entry_bytes(text: str) -> bytes:
    """The raw bytes of an ``Entry`` string field (``os.fsencode`` on a UTF-8 system)."""
    return text.encode("utf-8", "surrogateescape")


def _escape_raw_fields(entry: dict[str, object]) -> dict[str, object]:
    for key in RAW_FIELDS:
        value = entry.get(key)
        if isinstance(value, str) and not value.isascii():
            raw = entry_bytes(value)
            if raw.decode("utf-8", "replace") != value:  # held undecodable bytes
                entry[key] = raw.decode("utf-8", "replace")
                entry[key + "_raw"] = base64.b64encode(raw).decode()
    return entry


def _unescape_raw_fields(entry: object) -> None:
    if not isinstance(entry, dict):
        return
    for key in RAW_FIELDS:
        raw = entry.pop(key + "_raw", None)
        if raw is not None:
            try:
                entry[key] = base64.b64decode(raw, validate=True).decode("utf-8", "surrogateescape")
            except (TypeError, ValueError) as e:
                raise IndexFormatError(f"entry field {key}_raw is not valid base64") from e


def block_list_digest(blocks: list[str]) -> str:
    """A chunk's digest when it carries block digests: sha256 of the binary digests in order."""
    return "sha256:" + hashlib.sha256(b"".join(bytes.fromhex(b) for b in blocks)).hexdigest()


class LayerIndex(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = FORMAT_VERSION
    encoding: Encoding
    blob_digest: str = ""  # the blob chunk offsets refer to ("" in full mode's TOC: see FORMAT.md)
    blob_size: int  # bytes of the blob chunks may address (full mode: the data frames only)
    diff_id: str  # sha256 of the whole uncompressed tar
    uncompressed_size: int
    window_size: int = GZIP_WINDOW_SIZE
    chunks: list[Chunk]
    entries: list[Entry]

    def chunk_range(self, u_start: int, u_end: int) -> list[int]:
        """Positions in ``chunks`` covering uncompressed bytes ``[u_start, u_end)``."""
        if u_end <= u_start:
            return []
        first = max(bisect_right(self.chunks, u_start, key=lambda c: c.u_offset) - 1, 0)
        out: list[int] = []
        for i in range(first, len(self.chunks)):
            c = self.chunks[i]
            if c.u_offset >= u_end:
                break
            if c.u_offset + c.u_size > u_start:
                out.append(i)
        return out

    def validate_layout(self) -> None:
        """Chunks must tile ``[0, uncompressed_size)`` in order; entries must lie inside it."""
        pos = 0
        for i, c in enumerate(self.chunks):
            if c.blocks and len(c.blocks) != -(-c.u_size // BLOCK_SIZE):
                raise IndexFormatError(f"chunk {i} has {len(c.blocks)} block digests for {c.u_size} bytes")
            if c.blocks and c.digest != block_list_digest(c.blocks):
                raise IndexFormatError(f"chunk {i} digest does not match its block digests")
            if c.u_offset != pos:
                raise IndexFormatError(f"chunk {i} starts at {c.u_offset}, expected {pos}")
            if c.c_offset + c.c_size > self.blob_size:
                raise IndexFormatError(f"chunk {i} lies past the end of the blob")
            pos += c.u_size
        if pos != self.uncompressed_size:
            raise IndexFormatError(f"chunks cover {pos} bytes of {self.uncompressed_size}")
        for e in self.entries:
            if e.type == "reg" and e.offset + e.size > self.uncompressed_size:
                raise IndexFormatError(f"entry {e.name!r} lies past the end of the layer")


def _json_bytes(index: LayerIndex) -> bytes:
    try:
        return index.model_dump_json(exclude_defaults=True).encode()
    except PydanticSerializationError:  # a string field holds bytes that are not UTF-8
        body = index.model_dump(mode="python", exclude_defaults=True)
        body["entries"] = [_escape_raw_fields(e) for e in body["entries"]]
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def encode_index_json(index: LayerIndex, level: int = 9) -> bytes:
    """The zstd-compressed JSON of ``index`` (also the payload of full mode's TOC frame)."""
    return zstandard.ZstdCompressor(level=level).compress(_json_bytes(index))


def decode_index_json(data: bytes, max_size: int = 1 << 30) -> LayerIndex:
    try:
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    except zstandard.ZstdError as e:
        raise IndexFormatError(f"index JSON is not valid zstd: {e}") from e
    if len(raw) > max_size:
        raise IndexFormatError("index JSON is larger than the limit")
    try:
        if b'_raw"' in raw:  # escaped non-UTF-8 fields: the slow path
            body = json.loads(raw)
            for entry in body.get("entries", []) if isinstance(body, dict) else []:
                _unescape_raw_fields(entry)
            index = LayerIndex.model_validate(body)
        else:
            index = LayerIndex.model_validate_json(raw)
    except ValueError as e:
        raise IndexFormatError(f"index JSON does not match the schema: {e}") from e
    if index.version != FORMAT_VERSION:
        raise IndexFormatError(f"index format version {index.version} is not supported")
    index.validate_layout()
    return index


def encode_index_blob(index: LayerIndex, windows: list[bytes]) -> bytes:
    """Serialize an index-only blob: header, JSON section, window section."""
    js = encode_index_json(index)
    ws = b""
    if windows:
        if any(len(w) != index.window_size for w in windows):
            raise ValueError("every window must be window_size bytes")
        ws = zstandard.ZstdCompressor(level=9).compress(b"".join(windows))
    return _HEADER.pack(INDEX_MAGIC, FORMAT_VERSION, 0, len(js), len(ws)) + js + ws


def decode_index_blob(data: bytes) -> tuple[LayerIndex, list[bytes]]:
    """Parse an index-only blob into the index and its gzip windows."""
    if len(data) < _HEADER.size:
        raise IndexFormatError("index blob is shorter than its header")
    magic, version, _flags, jlen, wlen = _HEADER.unpack_from(data)
    if magic != INDEX_MAGIC:
        raise IndexFormatError("index blob has the wrong magic")
    if version != FORMAT_VERSION:
        raise IndexFormatError(f"index blob format version {version} is not supported")
    if _HEADER.size + jlen + wlen != len(data):
        raise IndexFormatError("index blob section lengths do not add up to its size")
    index = decode_index_json(data[_HEADER.size : _HEADER.size + jlen])
    windows: list[bytes] = []
    if wlen:
        try:
            raw = zstandard.ZstdDecompressor().decompressobj().decompress(data[_HEADER.size + jlen :])
        except zstandard.ZstdError as e:
            raise IndexFormatError(f"index window section is not valid zstd: {e}") from e
        if len(raw) % index.window_size:
            raise IndexFormatError("window section is not a whole number of windows")
        windows = [raw[i : i + index.window_size] for i in range(0, len(raw), index.window_size)]
    for i, c in enumerate(index.chunks):
        if c.window >= len(windows):
            raise IndexFormatError(f"chunk {i} names window {c.window}, which is absent")
    return index, windows
