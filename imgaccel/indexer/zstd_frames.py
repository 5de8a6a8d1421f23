"""Find the frames of a zstd blob by reading frame and block headers (no decompression).

Frame layout per RFC 8878 section 3.1: magic, frame header (descriptor, optional window
descriptor, dictionary id, content size), blocks (3-byte headers with type and size), and an
optional 4-byte checksum. Skippable frames (magic 0x184D2A5?) are skipped.
"""

from __future__ import annotations

import struct

from imgaccel.indexer.errors import LayerError

_ZSTD_MAGIC = 0xFD2FB528


def zstd_frames(path: str) -> list[tuple[int, int]]:
    """``(offset, length)`` of every zstd data frame in the file, in order."""
    frames: list[tuple[int, int]] = []
    with open(path, "rb") as f:
        data_len = f.seek(0, 2)
        pos = 0
        while pos < data_len:
            f.seek(pos)
            head = f.read(14)
            if len(head) < 8:
                raise LayerError(f"truncated zstd frame header at offset {pos}")
            (magic,) = struct.unpack_from("<I", head)
            if magic & 0xFFFFFFF0 == 0x184D2A50:
                (length,) = struct.unpack_from("<I", head, 4)
                pos += 8 + length
                continue
            if magic != _ZSTD_MAGIC:
                raise LayerError(f"no zstd frame at offset {pos}")
            desc = head[4]
            fcs_flag, single, checksum, dict_flag = desc >> 6, (desc >> 5) & 1, (desc >> 2) & 1, desc & 3
            header = 1 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
            header += (1 if single else 0, 2, 4, 8)[fcs_flag]
            p = pos + 4 + header
            while True:
                f.seek(p)
                bh = f.read(3)
                if len(bh) < 3:
                    raise LayerError(f"truncated zstd block header at offset {p}")
                v = bh[0] | bh[1] << 8 | bh[2] << 16
                last, btype, bsize = v & 1, (v >> 1) & 3, v >> 3
                if btype == 3:
                    raise LayerError(f"reserved zstd block type at offset {p}")
                p += 3 + (1 if btype == 1 else bsize)
                if last:
                    break
            p += 4 if checksum else 0
            if p > data_len:
                raise LayerError(f"zstd frame at offset {pos} runs past the end of the blob")
            frames.append((pos, p - pos))
            pos = p
    return frames
