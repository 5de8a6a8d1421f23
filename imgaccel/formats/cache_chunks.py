"""Cache node chunk requests: the ``Imgaccel-Chunks`` header a node daemon (or a prewarm task)
sends with a blob Range GET to a cache node, listing the chunks of the requested bytes with the
sha256 of their compressed bytes (``Chunk.c_digest``), so the cache node can verify each one and
keep it without ever holding or fetching the whole blob. Pure data; docs/FORMAT.md, "Cache node
chunk requests", is the specification.

    Imgaccel-Chunks: <offset>+<length>=sha256:<hex>,<offset>+<length>=sha256:<hex>,...

Entries are sorted by offset (strictly increasing), each overlaps the one before it by at most
``MAX_OVERLAP`` bytes (index-mode gzip chunks share one or two bytes with the next one,
FORMAT.md 2.2; the bound keeps what a node hashes close to what it fetches), none is empty, all
lie inside the blob, and there are at most ``MAX_CHUNKS`` of them (``MAX_HEADER_BYTES`` of
text). Spaces or tabs around an entry are ignored. An empty value lists no chunk but still
makes the request chunk-aware: a reader whose index has compressed digests sends it when none
of its chunks lies wholly inside the requested bytes (a prefix of a gzip chunk), so that the
cache node serves them from stored chunks if it can, and never starts a whole-blob fill for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

CHUNKS_HEADER = "Imgaccel-Chunks"
MAX_CHUNKS = 512  # entries in one header; a client lists more in several requests
MAX_OVERLAP = 8  # bytes an entry may share with the one before it
_MAX_ENTRY = 20 + len("+") + 20 + len("=sha256:") + 64 + len(",")  # offsets and lengths have <= 20 digits
# The longest value MAX_CHUNKS entries make: a cache node must accept header fields this long
# (aiohttp's default limit is 8190 bytes).
MAX_HEADER_BYTES = MAX_CHUNKS * _MAX_ENTRY

CacheChunk = tuple[int, int, str]  # (offset, length, "sha256:<hex>") of compressed blob bytes
_ENTRY = re.compile(r"(0|[1-9][0-9]{0,19})\+([1-9][0-9]{0,19})=(sha256:[0-9a-f]{64})")


def format_chunks(chunks: Sequence[CacheChunk]) -> str:
    """The header value listing ``chunks`` (given in the order they are to be listed)."""
    return ",".join(f"{offset}+{length}={digest}" for offset, length, digest in chunks)


def parse_chunks(value: str, blob_size: int) -> list[CacheChunk]:
    """The chunks a header value lists; ``ValueError`` (one line) unless it is well formed."""
    if len(value) > MAX_HEADER_BYTES:
        raise ValueError(f"{CHUNKS_HEADER}: longer than {MAX_HEADER_BYTES} bytes")
    if not value.strip(" \t"):
        return []
    items = value.split(",")
    if len(items) > MAX_CHUNKS:
        raise ValueError(f"{CHUNKS_HEADER}: {len(items)} entries, at most {MAX_CHUNKS} allowed")
    out: list[CacheChunk] = []
    for i, item in enumerate(items):
        m = _ENTRY.fullmatch(item.strip())
        if m is None:
            raise ValueError(f"{CHUNKS_HEADER}: entry {i} {item.strip()[:40]!r} is not <offset>+<length>=sha256:<hex>")
        offset, length = int(m[1]), int(m[2])
        if offset + length > blob_size:
            raise ValueError(f"{CHUNKS_HEADER}: entry {i} ends at {offset + length}, past the blob's {blob_size} bytes")
        if out and not _follows(out[-1], offset):
            raise ValueError(f"{CHUNKS_HEADER}: entry {i} at {offset} is out of order or overlaps the one before")
        out.append((offset, length, m[3]))
    return out


def usable_chunks(chunks: Iterable[CacheChunk]) -> list[CacheChunk]:
    """``chunks`` sorted, without duplicates and without those ``parse_chunks`` would refuse:
    empty, negative, not a sha256 digest, or overlapping the one kept before it by more than
    ``MAX_OVERLAP`` bytes."""
    out: list[CacheChunk] = []
    for chunk in sorted(set(chunks)):
        if _ENTRY.fullmatch(f"{chunk[0]}+{chunk[1]}={chunk[2]}") and (not out or _follows(out[-1], chunk[0])):
            out.append(chunk)
    return out


def _follows(before: CacheChunk, offset: int) -> bool:
    """Whether a chunk at ``offset`` may come after ``before``: later, sharing at most
    ``MAX_OVERLAP`` bytes with it."""
    return offset > before[0] and offset >= before[0] + before[1] - MAX_OVERLAP
