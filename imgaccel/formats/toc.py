"""Full-mode blob trailer: zstd skippable frames holding the TOC and a seek table.

A full-mode layer is ``[data frames][TOC frame][seek-table frame]``:

* data frames: independent zstd (or lz4) frames; decompressed back to back they are the
  original tar, byte for byte.
* TOC frame: a skippable frame, magic ``TOC_MAGIC`` (0x184D2A5B), whose payload is the
  zstd-compressed ``LayerIndex`` JSON (``layer_index.encode_index_json``).
* seek-table frame (zstd layers only): the zstd seekable format's seek table (skippable
  magic 0x184D2A5E, footer magic 0x8F92EAB1) listing every data frame and, last, the TOC
  frame with decompressed size 0, so third-party seekable readers can use the blob and can
  find the TOC without the manifest.

Plain zstd/lz4 decoders skip both skippable frames, which is why the blob still decompresses
to the original tar.
"""

from __future__ import annotations

import struct

SKIPPABLE_HEADER = struct.Struct("<II")
TOC_MAGIC = 0x184D2A5B
SEEK_TABLE_MAGIC = 0x184D2A5E
SEEK_TABLE_FOOTER_MAGIC = 0x8F92EAB1
ZSTD_FRAME_MAGIC = 0xFD2FB528


def skippable_frame(magic: int, payload: bytes) -> bytes:
    """A zstd/lz4 skippable frame: ``<u32 magic><u32 length><payload>``."""
    if magic & 0xFFFFFFF0 != 0x184D2A50:
        raise ValueError("skippable frame magic must be 0x184D2A50..0x184D2A5F")
    return SKIPPABLE_HEADER.pack(magic, len(payload)) + payload


def parse_skippable_frame(data: bytes, magic: int) -> bytes:
    """Payload of a skippable frame that must carry ``magic`` and span all of ``data``."""
    if len(data) < SKIPPABLE_HEADER.size:
        raise ValueError("skippable frame is shorter than its header")
    got, length = SKIPPABLE_HEADER.unpack_from(data)
    if got != magic:
        raise ValueError(f"skippable frame magic is {got:#x}, expected {magic:#x}")
    if length != len(data) - SKIPPABLE_HEADER.size:
        raise ValueError("skippable frame length does not match its size")
    return data[SKIPPABLE_HEADER.size :]


def seek_table(frames: list[tuple[int, int]]) -> bytes:
    """The zstd seekable format seek table for ``(compressed, decompressed)`` frame sizes.

    Entries are 8 bytes (no checksums); the footer is ``<u32 count><u8 descriptor=0>
    <u32 0x8F92EAB1>``.
    """
    body = b"".join(struct.pack("<II", c, d) for c, d in frames)
    footer = struct.pack("<IBI", len(frames), 0, SEEK_TABLE_FOOTER_MAGIC)
    return skippable_frame(SEEK_TABLE_MAGIC, body + footer)
