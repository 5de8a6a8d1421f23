"""The cache node's store: blobs, chunks of blobs and manifests on disk, content-addressed,
bounded in size.

Layout under the data directory::

    blobs/<alg>/<hex>        a blob, exactly the bytes that hash to <alg>:<hex>
    manifests/<alg>/<hex>    a manifest, likewise
    chunks/<alg>/<hex>/<offset>-<length>-<sha256 hex>
                             bytes [offset, offset + length) of blob <alg>:<hex>, exactly the
                             bytes that hash to sha256:<sha256 hex> (a chunk's ``c_digest``)
    tmp/                     files being filled (removed at start-up)

A file enters ``blobs/``, ``manifests/`` or ``chunks/`` only through ``Writer.commit``, which
checks the size and the digest of every byte written first and renames the file into place
afterwards; anything else (a mismatch, a dropped fill) removes the temporary file, so nothing
unverified is ever stored. A chunk is stored only from upstream bytes that hash to the digest a
client listed for that range, so it holds the upstream blob's bytes there whoever listed it.
Once the whole blob is stored its chunks are dropped (the blob serves every range). The
chunks of each blob are also indexed in memory (sorted by offset) to find the stored chunks
covering a byte range; the index is rebuilt from the file names at start-up.

The total size of stored files (blobs, chunks and manifests together) plus the space reserved
by running fills stays at or under ``max_size``: making room evicts the least recently used
entries, whatever their kind. Use is tracked in memory (an ordered dict, moved to the end on
each hit) and persisted cheaply as the file's mtime, touched at most once a minute per file,
which orders the entries again after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import time
from bisect import bisect_right, insort
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from imgaccel.formats import oci
from imgaccel.pusher.reference import check_digest

log = logging.getLogger(__name__)

Kind = Literal["blobs", "manifests"]
KINDS: tuple[Kind, ...] = ("blobs", "manifests")
CHUNKS = "chunks"
TOUCH_INTERVAL = 60.0  # seconds between mtime updates of one entry
COVER_SCAN = 16  # stored chunks starting at or before a position looked at to find one covering it
_HEX = {"sha256": re.compile(r"[0-9a-f]{64}"), "sha512": re.compile(r"[0-9a-f]{128}")}
_CHUNK_FILE = re.compile(r"(0|[1-9][0-9]{0,19})-([1-9][0-9]{0,19})-([0-9a-f]{64})")


class StoreError(Exception):
    """The data directory cannot hold the store; one line."""


class VerifyError(Exception):
    """Bytes written to a ``Writer`` are not the blob they were written as."""


@dataclass
class _Entry:
    size: int
    touched: float  # wall-clock time of the last mtime update


@dataclass(frozen=True, order=True)
class StoredChunk:
    """Bytes ``[offset, offset + length)`` of a blob, hashing to ``digest`` (sha256)."""

    offset: int
    length: int
    digest: str

    @property
    def end(self) -> int:
        return self.offset + self.length


class Store:
    def __init__(self, root: Path, max_size: int, on_evict: Callable[[int], None] | None = None) -> None:
        self.root = root
        self.max_size = max_size
        self.on_evict = on_evict
        self.total = 0  # bytes of stored entries
        self.reserved = 0  # bytes promised to running fills
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # "<kind>/<alg>/<hex>", least recently used first
        self._chunks: dict[str, list[StoredChunk]] = {}  # "<alg>/<hex>" of a blob -> its chunks, sorted
        try:
            for kind in (*KINDS, CHUNKS):
                for alg in _HEX:
                    (root / kind / alg).mkdir(parents=True, exist_ok=True)
            tmp = root / "tmp"
            tmp.mkdir(exist_ok=True)
            for leftover in tmp.iterdir():
                leftover.unlink()
            probe = tmp / f"probe-{secrets.token_hex(4)}"
            probe.write_bytes(b"ok")
            probe.unlink()
            self._scan()
        except OSError as e:
            raise StoreError(f"data_dir {root}: cannot keep the store there: {e.strerror or e}") from None
        self._evict(0)
        log.info("store %s: %d entries, %d bytes (max %d)", root, len(self._entries), self.total, max_size)

    def _scan(self) -> None:
        found: list[tuple[float, str, int]] = []
        for kind in KINDS:
            for alg, pattern in _HEX.items():
                with os.scandir(self.root / kind / alg) as it:
                    for f in it:
                        if pattern.fullmatch(f.name) and f.is_file(follow_symlinks=False):
                            st = f.stat(follow_symlinks=False)
                            found.append((st.st_mtime, f"{kind}/{alg}/{f.name}", st.st_size))
        found += self._scan_chunks()
        for mtime, key, size in sorted(found):
            self._entries[key] = _Entry(size, mtime)
            self.total += size
            self._index_chunk(key)
        for blob_id in [b for b in self._chunks if f"blobs/{b}" in self._entries]:  # a stop mid-way
            self.drop_chunks(blob_id.replace("/", ":", 1))

    def _scan_chunks(self) -> list[tuple[float, str, int]]:
        """``(mtime, key, size)`` of the stored chunks; a chunk file whose size is not the
        length its name says is damaged: removed."""
        found: list[tuple[float, str, int]] = []
        for alg, pattern in _HEX.items():
            with os.scandir(self.root / CHUNKS / alg) as blobs:
                dirs = [b.path for b in blobs if pattern.fullmatch(b.name) and b.is_dir(follow_symlinks=False)]
            for path in dirs:
                with os.scandir(path) as it:
                    files = [f for f in it if _CHUNK_FILE.fullmatch(f.name) and f.is_file(follow_symlinks=False)]
                for f in files:
                    st = f.stat(follow_symlinks=False)
                    if st.st_size != int(f.name.split("-")[1]):
                        log.warning("store: chunk %s has %d bytes, not the length its name says; removed",
                                    f.path, st.st_size)  # fmt: skip
                        os.unlink(f.path)
                        continue
                    found.append((st.st_mtime, f"{CHUNKS}/{alg}/{os.path.basename(path)}/{f.name}", st.st_size))
                with contextlib.suppress(OSError):  # an empty directory of a blob without chunks
                    os.rmdir(path)
        return found

    @staticmethod
    def _key(kind: Kind, digest: str) -> str:
        alg, _, hexpart = check_digest(digest, "store").partition(":")
        return f"{kind}/{alg}/{hexpart}"

    def path(self, kind: Kind, digest: str) -> Path:
        return self.root / self._key(kind, digest)

    def __len__(self) -> int:
        return len(self._entries)

    def has(self, kind: Kind, digest: str) -> bool:
        return self._key(kind, digest) in self._entries

    def open(self, kind: Kind, digest: str) -> tuple[int, int] | None:
        """``(fd, size)`` of a stored entry, opened for reading (the caller closes the fd), and
        marked as just used; None when it is not stored."""
        return self._open(self._key(kind, digest))

    def _open(self, key: str) -> tuple[int, int] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        path = self.root / key
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        now = time.time()
        if now - entry.touched > TOUCH_INTERVAL:
            entry.touched = now
            with contextlib.suppress(OSError):
                os.utime(fd)
        return fd, entry.size

    def read_small(self, kind: Kind, digest: str) -> bytes | None:
        """A small stored entry (a manifest) in memory, re-verified; None when it is not stored
        or no longer matches its digest (then it is dropped)."""
        opened = self.open(kind, digest)
        if opened is None:
            return None
        fd, size = opened
        try:
            data = os.pread(fd, size + 1, 0)
        finally:
            os.close(fd)
        if oci.digest_of(data, digest) != digest:
            log.warning("store: %s %s is damaged on disk; dropped", kind, digest)
            self.remove(kind, digest)
            return None
        return data

    async def put_small(self, kind: Kind, digest: str, data: bytes) -> None:
        """Store a small entry (a manifest) held in memory; ``VerifyError`` if it is not ``digest``."""
        if self.has(kind, digest):
            return
        writer = self.writer(kind, digest, len(data))
        try:
            writer.reserve()
            writer.write(data)
            await writer.commit()
        finally:
            writer.close()

    def writer(self, kind: Kind, digest: str, size: int) -> Writer:
        return Writer(self, self._key(kind, digest), digest, size)

    # -- chunks -------------------------------------------------------------------------------

    def _chunk_key(self, blob: str, chunk: StoredChunk) -> str:
        alg, _, hexpart = check_digest(chunk.digest, "chunk").partition(":")
        if alg != "sha256":
            raise ValueError(f"chunk {chunk.offset}+{chunk.length} of {blob}: digest is not sha256")
        return f"{CHUNKS}/{self._key('blobs', blob).removeprefix('blobs/')}/{chunk.offset}-{chunk.length}-{hexpart}"

    def chunk_writer(self, blob: str, chunk: StoredChunk) -> Writer:
        """A writer that stores ``chunk`` of ``blob`` once its bytes hash to ``chunk.digest``."""
        return Writer(self, self._chunk_key(blob, chunk), chunk.digest, chunk.length)

    def has_chunk(self, blob: str, chunk: StoredChunk) -> bool:
        return self._chunk_key(blob, chunk) in self._entries

    def open_chunk(self, blob: str, chunk: StoredChunk) -> int | None:
        """A stored chunk's file opened for reading (the caller closes it), marked as just
        used; None when it is not stored."""
        opened = self._open(self._chunk_key(blob, chunk))
        return None if opened is None else opened[0]

    def chunk_count(self) -> int:
        return sum(len(c) for c in self._chunks.values())

    def covering(self, blob: str, pos: int) -> StoredChunk | None:
        """Of the stored chunks of ``blob`` holding byte ``pos``, the one reaching furthest
        (looking at the last ``COVER_SCAN`` chunks starting at or before ``pos``)."""
        chunks = self._chunks.get(self._blob_id(blob))
        if not chunks:
            return None
        i = bisect_right(chunks, pos, key=lambda c: c.offset)
        best = None
        for c in chunks[max(i - COVER_SCAN, 0) : i]:
            if c.end > pos and (best is None or c.end > best.end):
                best = c
        return best

    def next_chunk(self, blob: str, pos: int) -> int | None:
        """Where the first stored chunk of ``blob`` starting after ``pos`` starts (None: none)."""
        chunks = self._chunks.get(self._blob_id(blob), [])
        i = bisect_right(chunks, pos, key=lambda c: c.offset)
        return chunks[i].offset if i < len(chunks) else None

    def drop_chunks(self, blob: str) -> None:
        """Remove every stored chunk of ``blob`` (the whole blob is stored now)."""
        blob_id = self._blob_id(blob)
        for c in list(self._chunks.get(blob_id, [])):
            self._delete(f"{CHUNKS}/{blob_id}/{c.offset}-{c.length}-{c.digest.partition(':')[2]}")

    def _blob_id(self, blob: str) -> str:
        return self._key("blobs", blob).removeprefix("blobs/")

    def _index_chunk(self, key: str) -> None:
        parsed = _parse_chunk_key(key)
        if parsed is not None:
            insort(self._chunks.setdefault(parsed[0], []), parsed[1])

    def _unindex_chunk(self, key: str) -> None:
        parsed = _parse_chunk_key(key)
        if parsed is None:
            return
        blob_id, chunk = parsed
        chunks = self._chunks.get(blob_id, [])
        with contextlib.suppress(ValueError):
            chunks.remove(chunk)
        if not chunks:
            self._chunks.pop(blob_id, None)
            with contextlib.suppress(OSError):  # not empty (a chunk is being renamed in): kept
                (self.root / CHUNKS / blob_id).rmdir()

    def remove(self, kind: Kind, digest: str) -> None:
        self._delete(self._key(kind, digest))

    def _delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / key).unlink()
        self._drop(key)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.total -= entry.size
            self._unindex_chunk(key)

    def _reserve(self, size: int) -> None:
        self.reserved += size
        self._evict(0)

    def _release(self, size: int) -> None:
        self.reserved -= size

    def _add(self, key: str, size: int) -> None:
        self._drop(key)
        self._entries[key] = _Entry(size, time.time())
        self.total += size
        self._index_chunk(key)
        if key.startswith("blobs/"):
            alg, _, hexpart = key.removeprefix("blobs/").partition("/")
            self.drop_chunks(f"{alg}:{hexpart}")
        self._evict(0)

    def _evict(self, need: int) -> None:
        """Remove least recently used entries until stored + reserved + ``need`` fits."""
        while self._entries and self.total + self.reserved + need > self.max_size:
            key, entry = self._entries.popitem(last=False)
            self.total -= entry.size
            with contextlib.suppress(FileNotFoundError):
                (self.root / key).unlink()
            self._unindex_chunk(key)
            log.info("store: evicted %s (%d bytes)", key, entry.size)
            if self.on_evict:
                self.on_evict(entry.size)


class Writer:
    """A temporary file that becomes the stored entry ``digest`` once ``commit`` has verified
    it. Written at increasing offsets (``write``); ``restart`` empties it (a fill starting
    over). ``fd`` is opened read-write, so ``os.dup(fd)`` lets a reader follow the file while
    it grows, and keep reading it after it was renamed into place or removed."""

    def __init__(self, store: Store, key: str, digest: str, size: int) -> None:
        self.store = store
        self.digest = digest
        self.size = size
        self.key = key  # where it is stored, relative to the data directory
        self.tmp = store.root / "tmp" / f"{self.key.replace('/', '-')}.{secrets.token_hex(6)}"
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.written = 0
        self._hash = oci.hasher(digest)
        self._reserved = 0
        self._closed = False

    def reserve(self) -> None:
        """Make room for the whole blob now (evicting); a blob larger than the store is filled
        for the readers following it but never stored."""
        if not self._reserved and self.size <= self.store.max_size:
            self._reserved = self.size
            self.store._reserve(self.size)

    def write(self, block: bytes | memoryview) -> None:
        if self.written + len(block) > self.size:
            raise VerifyError(f"{self.digest}: more than the {self.size} bytes announced")
        view = memoryview(block)
        while view:
            n = os.pwrite(self.fd, view, self.written)
            self._hash.update(view[:n])
            self.written += n
            view = view[n:]

    def restart(self) -> None:
        os.ftruncate(self.fd, 0)
        self.written = 0
        self._hash = oci.hasher(self.digest)

    async def commit(self) -> bool:
        """Verify and move into place; True when stored (False: larger than the store).
        ``VerifyError`` (and the temporary file removed) when the bytes are not the blob."""
        actual = f"{self.digest.split(':', 1)[0]}:{self._hash.hexdigest()}"
        if self.written != self.size:
            self.close()
            raise VerifyError(f"{self.digest}: {self.written} bytes written, {self.size} expected")
        if actual != self.digest:
            self.close()
            raise VerifyError(f"{self.digest}: the bytes hash to {actual}")
        if not self._reserved:
            self.close()
            return False
        await asyncio.to_thread(os.fsync, self.fd)
        final = self.store.root / self.key
        final.parent.mkdir(exist_ok=True)  # a blob's chunk directory
        os.replace(self.tmp, final)
        self.store._release(self._reserved)
        self._reserved = 0
        self.store._add(self.key, self.size)
        self._closed = True
        os.close(self.fd)
        return True

    def close(self) -> None:
        """Drop the temporary file unless committed (idempotent)."""
        if self._closed:
            return
        self._closed = True
        os.close(self.fd)
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()
        if self._reserved:
            self.store._release(self._reserved)
            self._reserved = 0


def _parse_chunk_key(key: str) -> tuple[str, StoredChunk] | None:
    """``("<alg>/<hex>" of the blob, the chunk)`` for a chunk's key, None for other keys."""
    if not key.startswith(CHUNKS + "/"):
        return None
    blob_id, _, name = key.removeprefix(CHUNKS + "/").rpartition("/")
    m = _CHUNK_FILE.fullmatch(name)
    if m is None:
        return None
    return blob_id, StoredChunk(int(m[1]), int(m[2]), f"sha256:{m[3]}")
