"""Identify a layer blob's encoding from its first bytes and check it against its media type."""

from __future__ import annotations

import logging
from typing import BinaryIO

from imgaccel.formats import oci
from imgaccel.formats.layer_index import LAYER_LZ4, Encoding
from imgaccel.indexer.errors import LayerError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LZ4_MAGIC = b"\x04\x22\x4d\x18"
log = logging.getLogger(__name__)


def declared_encoding(media_type: str) -> Encoding:
    """The encoding a layer media type declares; unknown media types are an error."""
    if media_type == LAYER_LZ4:
        return "lz4"
    try:
        enc = oci.LAYER_COMPRESSION[media_type]
    except KeyError:
        raise LayerError(f"unsupported layer media type {media_type!r}") from None
    return enc  # type: ignore[return-value]


def sniff_encoding(f: BinaryIO) -> Encoding:
    head = f.read(4)
    f.seek(0)
    if head[:2] == GZIP_MAGIC:
        return "gzip"
    if head == ZSTD_MAGIC or (len(head) == 4 and head[0] & 0xF0 == 0x50 and head[1:] == b"\x2a\x4d\x18"):
        return "zstd"
    if head == LZ4_MAGIC:
        return "lz4"
    return "tar"


def check_encoding(f: BinaryIO, media_type: str, what: str = "layer") -> Encoding:
    """Encoding of the blob in ``f``; raises if it contradicts ``media_type``.

    One contradiction is tolerated, as containerd and Docker tolerate it (they pick the
    decompressor by magic bytes): a blob compressed with another codec than its media type
    names. ctr-remote's eStargz conversion writes gzip blobs under ``tar+zstd``.
    """
    declared = declared_encoding(media_type)
    found = sniff_encoding(f)
    if found != declared:
        if found == "tar" or declared == "tar":
            raise LayerError(f"media type {media_type} declares {declared}, but the blob is {found}")
        log.warning("%s: media type %s declares %s, but the blob is %s: reading it as %s", what, media_type,
                    declared, found, found)  # fmt: skip
    return found
