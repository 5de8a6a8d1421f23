"""Decode one chunk of a layer (``formats.layer_index.Chunk``) and verify it.

Every lazy read ends here: the fetched compressed bytes are decoded into exactly ``u_size``
bytes (never more: decoders are bounded, so a hostile blob cannot balloon) and their sha256
must equal the chunk's digest, or ``ChunkVerificationError`` is raised.
"""

from __future__ import annotations

import hashlib

import lz4.frame
import zstandard

from imgaccel.formats.layer_index import Chunk, Encoding
from imgaccel.indexer.raw_inflate import InflateError, inflate_from_checkpoint


class ChunkVerificationError(ValueError):
    """Chunk bytes did not decode, or decoded to bytes with the wrong digest."""


def decode_chunk(encoding: Encoding, data: bytes, chunk: Chunk, window: bytes = b"") -> bytes:
    try:
        if encoding == "tar":
            out = data
        elif encoding == "gzip":
            out = inflate_from_checkpoint(data, chunk.bits, window, chunk.u_size)
        elif encoding == "zstd":
            reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False)
            parts, want = [], chunk.u_size + 1
            while want > 0:
                part = reader.read(want)
                if not part:
                    break
                parts.append(part)
                want -= len(part)
            out = b"".join(parts)
        else:
            out = lz4.frame.LZ4FrameDecompressor().decompress(data, max_length=chunk.u_size + 1)
    except (InflateError, zstandard.ZstdError, RuntimeError) as e:
        raise ChunkVerificationError(f"cannot decode: {e}") from e
    if len(out) != chunk.u_size:
        raise ChunkVerificationError(f"decoded {len(out)} bytes, expected {chunk.u_size}")
    got = "sha256:" + hashlib.sha256(out).hexdigest()
    if got != chunk.digest:
        raise ChunkVerificationError(f"digest mismatch: got {got}, expected {chunk.digest}")
    return out
