"""Decode one chunk of a layer (``formats.layer_index.Chunk``) and verify it.

Every lazy read ends here: the fetched compressed bytes are decoded into exactly ``u_size``
bytes (never more: decoders are bounded, so a hostile blob cannot balloon) and their sha256
must equal the chunk's digest, or ``ChunkVerificationError`` is raised.
"""

from __future__ import annotations

import hashlib

import lz4.frame
import zstandard

from imgaccel.formats.layer_index import BLOCK_SIZE, Chunk, Encoding
from imgaccel.indexer.raw_inflate import InflateError, InflateInputEnded, inflate_from_checkpoint


class ChunkVerificationError(ValueError):
    """Chunk bytes did not decode, or decoded to bytes with the wrong digest."""


class ChunkInputEnded(ChunkVerificationError):
    """gzip: the compressed bytes ended before the wanted prefix was decoded. Given a prefix
    of the chunk's compressed bytes, fetch more; given all of them, the chunk is damaged."""


def decode_chunk(encoding: Encoding, data: bytes, chunk: Chunk, window: bytes = b"", upto: int | None = None) -> bytes:
    """The chunk's uncompressed bytes, verified. With ``upto`` and block digests (gzip), only
    the verified prefix covering ``[0, upto)``, rounded up to whole blocks, is decoded, and
    ``data`` may be a prefix of the chunk's compressed bytes (``ChunkInputEnded`` if short)."""
    want = chunk.u_size
    if upto is not None and chunk.blocks:
        want = min(chunk.u_size, -(-upto // BLOCK_SIZE) * BLOCK_SIZE)
    try:
        if encoding == "tar":
            out = data[:want]
        elif encoding == "gzip":
            try:
                out = inflate_from_checkpoint(data, chunk.bits, window, want)
            except InflateInputEnded as e:
                raise ChunkInputEnded(f"cannot decode: {e}") from e
        elif encoding == "zstd":
            reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False)
            parts, left = [], want + 1 if want == chunk.u_size else want
            while left > 0:
                part = reader.read(left)
                if not part:
                    break
                parts.append(part)
                left -= len(part)
            out = b"".join(parts)
        else:
            out = lz4.frame.LZ4FrameDecompressor().decompress(data, max_length=chunk.u_size + 1)
            out = out[:want] if len(out) == chunk.u_size else out
    except (InflateError, zstandard.ZstdError, RuntimeError) as e:
        raise ChunkVerificationError(f"cannot decode: {e}") from e
    if len(out) != want:
        raise ChunkVerificationError(f"decoded {len(out)} bytes, expected {want}")
    if chunk.blocks:  # (the index checked that the block list hashes to chunk.digest)
        view = memoryview(out)
        for i in range(0, len(out), BLOCK_SIZE):
            got = hashlib.sha256(view[i : i + BLOCK_SIZE]).hexdigest()
            if got != chunk.blocks[i // BLOCK_SIZE]:
                raise ChunkVerificationError(f"block {i // BLOCK_SIZE} digest mismatch: got sha256:{got}")
        return out
    got = "sha256:" + hashlib.sha256(out).hexdigest()
    if got != chunk.digest:
        raise ChunkVerificationError(f"digest mismatch: got {got}, expected {chunk.digest}")
    return out
