"""On-disk cache of verified chunk bytes, content-addressed by digest.

Entries are the *uncompressed, verified* bytes of a chunk (full mode: keyed by the chunk
digest) or of a 1 MiB block of a chunk (index mode: keyed by the block digest), so identical
data of different layers and images is stored once. Files are written to a temporary name and
renamed into place, so several mounts and processes can share one cache; an entry is hashed
again when it is read from disk and a damaged one is deleted and reported as a miss, never
served; a small in-memory LRU keeps entries this process verified recently. For each entry it
verified, the process also keeps the sha256 of every 64 KiB piece, so a later read of a few
bytes of a large entry (a 1 MiB index-mode block) reads and hashes only the pieces holding
them, checked against digests taken from bytes that matched the entry's own. The
cache is bounded: when it grows past ``limit`` bytes the least recently used entries (by
modification time, refreshed on every hit) are evicted under an exclusive lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
DEFAULT_LIMIT = 10 << 30
PIECE = 64 << 10  # granularity of partial reads of an entry (``get_range``)
MAX_PIECE_LISTS = 1 << 16  # entries whose piece digests are kept (~1 KiB each for 1 MiB entries)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    bytes_served: int = 0
    bytes_stored: int = 0
    evicted: int = 0


class ChunkCache:
    def __init__(self, root: Path, limit: int = DEFAULT_LIMIT, memory: int = 64 << 20) -> None:
        self.root = root
        self.limit = limit
        self.stats = CacheStats()
        # Recently verified entries, so a file read in many small pieces (FUSE reads are
        # 128 KiB) is not read from disk and hashed again for every piece.
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._memory_limit = memory
        self._memory_bytes = 0
        self._memory_lock = threading.Lock()
        (root / "chunks").mkdir(parents=True, exist_ok=True)
        self._lock_path = root / "lock"
        self._dirs: set[str] = set()  # entry directories known to exist
        # digest -> sha256 of each PIECE of an entry this process verified (at most MAX_PIECE_LISTS)
        self._pieces: OrderedDict[str, list[bytes]] = OrderedDict()
        self._serial = itertools.count()
        self._size = self._scan_size()

    def _path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[-1]
        if len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.root / "chunks" / hexd[:2] / hexd

    def _scan_size(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.root / "chunks"):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.path.getsize(os.path.join(dirpath, f))
        return total

    def peek(self, digest: str) -> bytes | None:
        """The entry if it was verified recently by this process (memory only, no I/O)."""
        with self._memory_lock:
            data = self._memory.get(digest)
            if data is None:
                return None
            self._memory.move_to_end(digest)
        self.stats.hits += 1
        self.stats.bytes_served += len(data)
        return data

    def _keep(self, digest: str, data: bytes) -> None:
        with self._memory_lock:
            if digest in self._memory:
                return
            self._memory[digest] = data
            self._memory_bytes += len(data)
            while self._memory_bytes > self._memory_limit and self._memory:
                self._memory_bytes -= len(self._memory.popitem(last=False)[1])

    def get(self, digest: str) -> bytes | None:
        """The verified bytes for ``digest``, or None (missing or damaged: refetch)."""
        if (data := self.peek(digest)) is not None:
            return data
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        if "sha256:" + hashlib.sha256(data).hexdigest() != ("sha256:" + digest.split(":", 1)[-1]):
            self.stats.corrupt += 1
            log.warning("chunk cache: %s is damaged; dropping it and fetching again", path)
            path.unlink(missing_ok=True)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # least recently *used*
        self._keep(digest, data)
        self.stats.hits += 1
        self.stats.bytes_served += len(data)
        return data

    def get_range(self, digest: str, lo: int, hi: int) -> bytes | None:
        """Bytes ``[lo, hi)`` of the entry for ``digest``, verified, or None (missing or
        damaged: refetch). Reads only the 64 KiB pieces holding them once this process has
        verified the whole entry."""
        if (data := self.peek(digest)) is not None:
            return data[lo:hi]
        with self._memory_lock:
            pieces = self._pieces.get(digest)
        if pieces is None:
            data = self.get(digest)  # read and hashed whole, once
            if data is not None and len(data) > PIECE:
                view = memoryview(data)
                pieces = [hashlib.sha256(view[i : i + PIECE]).digest() for i in range(0, len(data), PIECE)]
                with self._memory_lock:
                    self._pieces[digest] = pieces
                    if len(self._pieces) > MAX_PIECE_LISTS:
                        self._pieces.popitem(last=False)
            return None if data is None else data[lo:hi]
        if hi <= lo:
            return b""
        first, last = lo // PIECE, (hi - 1) // PIECE
        path = self._path(digest)
        try:
            with open(path, "rb") as f:
                f.seek(first * PIECE)
                raw = f.read((last - first + 1) * PIECE)
        except FileNotFoundError:
            with self._memory_lock:
                self._pieces.pop(digest, None)
            self.stats.misses += 1
            return None
        view = memoryview(raw)
        for k in range(first, last + 1):
            piece = view[(k - first) * PIECE : (k - first + 1) * PIECE]
            if k >= len(pieces) or hashlib.sha256(piece).digest() != pieces[k]:
                self.stats.corrupt += 1
                log.warning("chunk cache: %s is damaged; dropping it and fetching again", path)
                with self._memory_lock:
                    self._pieces.pop(digest, None)
                path.unlink(missing_ok=True)
                return None
        with contextlib.suppress(OSError):
            os.utime(path)  # least recently *used*
        self.stats.hits += 1
        self.stats.bytes_served += hi - lo
        return raw[lo - first * PIECE : hi - first * PIECE]

    def verified(self, digest: str) -> bool:
        """Whether this process verified the entry, so ``get_range`` reads only pieces of it."""
        with self._memory_lock:
            return digest in self._memory or digest in self._pieces

    def contains(self, digest: str) -> bool:
        """Whether an entry exists (not verified: ``get`` verifies)."""
        return self._path(digest).exists()

    def put(self, digest: str, data: bytes) -> None:
        """Store bytes the caller has verified against ``digest``."""
        path = str(self._path(digest))
        self._keep(digest, data)
        if os.path.exists(path):
            return
        parent = os.path.dirname(path)
        if parent not in self._dirs:
            os.makedirs(parent, exist_ok=True)
            self._dirs.add(parent)
        # A name no other process or thread uses; renamed into place once complete.
        tmp = f"{parent}/.tmp-{os.getpid()}-{threading.get_ident()}-{next(self._serial)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._size += len(data)
        self.stats.bytes_stored += len(data)
        if self._size > self.limit:
            self.evict()

    def evict(self, target: float = 0.9) -> int:
        """Delete least recently used entries until the cache is under ``target * limit``."""
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = []
            for dirpath, _, files in os.walk(self.root / "chunks"):
                for f in files:
                    p = os.path.join(dirpath, f)
                    try:
                        st = os.stat(p)
                    except FileNotFoundError:
                        continue
                    entries.append((st.st_mtime_ns, st.st_size, p))
            self._size = sum(size for _, size, _ in entries)
            removed = 0
            for _, size, p in sorted(entries):
                if self._size <= self.limit * target:
                    break
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    continue
                self._size -= size
                removed += 1
            self.stats.evicted += removed
            return removed

    def size(self) -> int:
        return self._scan_size()

    def entries(self) -> list[tuple[Path, int]]:
        out = []
        for dirpath, _, files in os.walk(self.root / "chunks"):
            for f in files:
                if f.startswith(".tmp-"):
                    continue
                p = Path(dirpath) / f
                with contextlib.suppress(FileNotFoundError):
                    out.append((p, p.stat().st_size))
        return out

    def verify(self) -> tuple[int, list[Path]]:
        """Hash every entry; damaged ones are deleted. Returns (checked, removed)."""
        removed = []
        entries = self.entries()
        for p, _ in entries:
            data = p.read_bytes()
            if hashlib.sha256(data).hexdigest() != p.name:
                p.unlink(missing_ok=True)
                removed.append(p)
        return len(entries), removed
