"""``Chunk.c_digest`` for chunks of a local blob: the sha256 of each chunk's compressed byte
range, computed in one sequential pass over the file with one read block in memory.

Index-only mode learns a gzip layer's chunk boundaries only as rapidgzip reports them, after
the bytes went by; the converter still has the blob on disk, so hashing the ranges afterwards
is the simplest correct way (about one more sequential read of the blob, usually from the page
cache, and one sha256 pass over it: see notes/chunks.md for the measured cost).
"""

from __future__ import annotations

import hashlib
import itertools

from imgaccel.formats.layer_index import Chunk
from imgaccel.indexer.errors import LayerError

READ_BLOCK = 1 << 20


def add_compressed_digests(path: str, chunks: list[Chunk]) -> None:
    """Set ``c_digest`` on every chunk from the blob at ``path``. Chunks must be in blob order
    (``c_offset`` not decreasing); their ranges may overlap (gzip chunks share one byte)."""
    if not chunks:
        return
    if any(b.c_offset < a.c_offset for a, b in itertools.pairwise(chunks)):
        raise LayerError("chunks are not in blob order: cannot hash their compressed ranges")
    hashes = {id(c): hashlib.sha256() for c in chunks}
    waiting = 0  # chunks before this one have started
    open_: list[Chunk] = []  # started, not finished
    pos = chunks[0].c_offset
    end = max(c.c_offset + c.c_size for c in chunks)
    with open(path, "rb") as f:
        f.seek(pos)
        while waiting < len(chunks) or open_:
            block = f.read(min(READ_BLOCK, end - pos)) if pos < end else b""
            if not block and pos < end:
                raise LayerError(f"blob {path} ends at byte {pos}, before its last chunk does")
            block_end = pos + len(block)
            while waiting < len(chunks) and chunks[waiting].c_offset <= block_end:
                open_.append(chunks[waiting])
                waiting += 1
            for c in open_:
                lo, hi = max(c.c_offset, pos), min(c.c_offset + c.c_size, block_end)
                if hi > lo:
                    hashes[id(c)].update(memoryview(block)[lo - pos : hi - pos])
            done = [c for c in open_ if c.c_offset + c.c_size <= block_end]
            for c in done:
                c.c_digest = "sha256:" + hashes.pop(id(c)).hexdigest()
            open_ = [c for c in open_ if c.c_offset + c.c_size > block_end]
            pos = block_end
