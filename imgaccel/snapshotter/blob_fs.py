"""BlobFS: a restartable, read-only FUSE server for one flat directory of big files.

This module owns the FUSE request loop the node daemon runs for lazy layers: each file is a
layer's uncompressed tar, ``name -> BlobSource``, which EROFS uses as its data device. It
speaks the kernel protocol directly (``fuse_wire``; no libfuse) on an asyncio loop over the
non-blocking ``/dev/fuse`` fd: requests are read as the fd becomes readable, metadata
requests are answered at once, and every READ runs as its own task, so a slow source delays
only the reads that wait for it.

Restarts. The fd comes from ``fuse_holder.attach``, which keeps the connection alive while
no server runs. A resumed server skips INIT and first writes FUSE_NOTIFY_RESEND, so the
requests its predecessor had read but not answered come again. The kernel caches node ids
and file handles, so both are fixed: node ids are assigned once per name and persisted with
each file's size in ``STATE_DIR/blobfs.json``; the file handle of an open file is its node
id. A restarted server therefore answers LOOKUP, GETATTR and OPEN from the state file at
once, and holds READs of a file until the daemon ``add``s its source again (up to
``source_wait`` seconds, then EIO). Node ids are never reused; the generation number is the
state file's creation time, so a lost state file cannot alias stale kernel inodes.

Files. Regular files, mode 0444, in a root directory of mode 0555, sizes from the sources.
They are opened with FOPEN_DIRECT_IO: EROFS caches the pages it reads, a second cache here
would hold the data twice. READs go up to 1 MiB (mount ``max_read`` and INIT ``max_pages``).
``remove`` drops a name and invalidates the kernel's dentry (FUSE_NOTIFY_INVAL_ENTRY, written
from a worker thread: the kernel takes the directory lock, which a LOOKUP waiting for this
loop may hold); a removed file stays readable through handles opened before, until they are
released — but only within one server process: after a restart such handles answer ESTALE.

Errors. A source raising ``OSError(errno)`` fails that one request with that errno (EIO if
it has none, or for any other exception, or a short read), logged with the file name and
byte range. Writes are refused by the read-only mount. Unknown requests answer ENOSYS.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import json
import logging
import os
import random
import stat
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from imgaccel.snapshotter import fuse_wire as w
from imgaccel.snapshotter.fuse_holder import attach

log = logging.getLogger(__name__)

STATE_FILE = "blobfs.json"
LOCK_FILE = "blobfs.lock"
MAX_PAGES = 256
"""READ requests up to 256 pages = 1 MiB (with the mount's ``max_read``)."""
_MAX_WRITE = 4096  # read-only: the smallest allowed, so that the request buffer stays small
_BUFFER_SIZE = 64 * 1024  # >= max(FUSE_MIN_READ_BUFFER, 80 + max_write); requests here are small
_READ_BATCH = 64  # requests taken per readable event before yielding to the loop
_TTL = 3600  # seconds the kernel may cache entries and attributes (removals are invalidated)
_WANTED_FLAGS = (
    w.FUSE_ASYNC_READ
    | w.FUSE_BIG_WRITES
    | w.FUSE_ASYNC_DIO
    | w.FUSE_PARALLEL_DIROPS
    | w.FUSE_MAX_PAGES
    | w.FUSE_DO_READDIRPLUS
    | w.FUSE_INIT_EXT
    | w.FUSE_HAS_RESEND
)


class BlobSource(Protocol):
    """The bytes of one file."""

    @property
    def size(self) -> int: ...

    async def read(self, offset: int, size: int) -> bytes:
        """Exactly ``min(size, self.size - offset)`` bytes; OSError(errno) on failure."""
        ...


@dataclass(frozen=True)
class BytesSource:
    """A file held in memory."""

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    async def read(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]


class FileSource:
    """A local file read with pread: in a worker thread (``threaded``, the default: a slow
    disk must not stall the loop), or inline when the file is known to be in the page cache."""

    def __init__(self, path: str | Path, threaded: bool = True) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size
        self._threaded = threaded

    @property
    def size(self) -> int:
        return self._size

    async def read(self, offset: int, size: int) -> bytes:
        if self._threaded:
            return await asyncio.to_thread(os.pread, self._fd, size, offset)
        return os.pread(self._fd, size, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class BlobFSError(RuntimeError):
    """The server cannot start or a name cannot be served."""


@dataclass
class FsStats:
    """What the server has done since it started."""

    requests: Counter[str] = field(default_factory=Counter)
    """Requests by opcode name."""
    read_sizes: Counter[int] = field(default_factory=Counter)
    """READ requests by requested size in bytes."""
    read_bytes: int = 0
    read_errors: int = 0
    resent: int = 0
    """Requests that arrived with the resend bit (re-queued after a restart)."""
    inflight_max: int = 0


@dataclass(eq=False)
class _Node:
    node_id: int
    name: str
    size: int
    source: BlobSource | None
    ready: asyncio.Event
    opens: int = 0
    removed: bool = False


@dataclass
class _State:
    """The persisted part: name -> (node id, size), the next node id, the generation."""

    path: Path
    generation: int
    next_node: int = w.ROOT_ID + 1
    files: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> _State:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(path, generation=time.time_ns())
        except (OSError, ValueError) as e:
            raise BlobFSError(f"BlobFS state {path} is unreadable: {e}") from e
        try:
            files = {str(k): (int(v["node"]), int(v["size"])) for k, v in raw["files"].items()}
            return cls(path, int(raw["generation"]), int(raw["next_node"]), files)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BlobFSError(f"BlobFS state {path} is malformed: {type(e).__name__}: {e}") from e

    def dump(self) -> str:
        files = {k: {"node": n, "size": s} for k, (n, s) in sorted(self.files.items())}
        return json.dumps({"version": 1, "generation": self.generation, "next_node": self.next_node, "files": files})

    def write(self, text: str) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class _Errno(Exception):
    """Answer the request with this errno."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _lock_state_dir(state_dir: Path) -> int:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BlobFSError(f"another BlobFS server already serves the state in {state_dir}") from None
    return fd


def _check_name(name: str) -> bytes:
    raw = os.fsencode(name)
    if not raw or raw in (b".", b"..") or b"/" in raw or b"\0" in raw or len(raw) > 255:
        raise BlobFSError(f"BlobFS file name {name!r} is not a valid single path component")
    return raw


_Handler = Callable[["BlobFS", w.InHeader, bytes], bytes | None]
_OPCODE_NAMES = {op.value: op.name for op in w.Opcode}


class _Started:
    """Awaitable that carries on a coroutine already run up to its first suspension point
    (``first``, what it yielded to the event loop) — an eager task start by hand."""

    def __init__(self, coro: Coroutine[Any, Any, None], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, None, None]:
        coro, pending = self._coro, self._first
        while True:
            try:
                yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as e:  # cancellation: the coroutine decides what to do
                try:
                    pending = coro.throw(e)
                except StopIteration:
                    return
                continue
            try:
                pending = coro.send(None)
            except StopIteration:
                return


async def _continue(coro: Coroutine[Any, Any, None], first: Any) -> None:
    await _Started(coro, first)


class BlobFS:
    """Serves ``name -> BlobSource`` read-only at ``mountpoint`` over an attached fd."""

    def __init__(
        self,
        fd: int,
        mountpoint: str | Path,
        state_dir: str | Path,
        resume: bool,
        source_wait: float = 60.0,
        _lock_fd: int | None = None,
    ) -> None:
        """Take over ``fd`` (a /dev/fuse connection mounted at ``mountpoint``); ``resume`` when
        another server answered INIT on it before. Call ``start`` on the serving loop."""
        self.mountpoint = Path(mountpoint)
        self.state_dir = Path(state_dir)
        self._lock_fd = _lock_fd if _lock_fd is not None else _lock_state_dir(self.state_dir)
        self._fd = fd
        self._resume = resume
        self._source_wait = source_wait
        self._state = _State.load(self.state_dir / STATE_FILE)
        self._buf = bytearray(_BUFFER_SIZE)
        self._by_name: dict[bytes, _Node] = {}
        self._by_id: dict[int, _Node] = {}
        for name, (node_id, size) in self._state.files.items():
            node = _Node(node_id, name, size, None, asyncio.Event())
            self._by_name[os.fsencode(name)] = node
            self._by_id[node_id] = node
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._interrupted: set[int] = set()
        self._dirs: dict[int, list[tuple[bytes, int]]] = {}
        self._next_dir_fh = random.getrandbits(31) << 32  # distinct from a predecessor's handles
        self._save_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gone: asyncio.Future[str] | None = None
        self._mtime = self._state.generation // 10**9
        self.stats = FsStats()
        self.init_flags = 0
        """INIT flags agreed with the kernel (0 after a resume: the predecessor agreed them)."""

    @classmethod
    async def open(cls, mountpoint: str | Path, state_dir: str | Path, source_wait: float = 60.0) -> BlobFS:
        """Attach to (or mount) ``mountpoint`` through its holder and start serving."""
        state = Path(state_dir)
        lock_fd = _lock_state_dir(state)
        try:
            att = await attach(mountpoint, state)
        except BaseException:
            os.close(lock_fd)
            raise
        fs = cls(att.fd, att.mountpoint, state, resume=not att.fresh, source_wait=source_wait, _lock_fd=lock_fd)
        fs.start()
        return fs

    # -----------------------------------------------------------------------------------------
    # The daemon's interface

    def start(self) -> None:
        """Serve on the running loop; after a resume, ask the kernel to resend lost requests."""
        self._loop = asyncio.get_running_loop()
        self._gone = self._loop.create_future()
        os.set_blocking(self._fd, False)
        self._loop.add_reader(self._fd, self._on_readable)
        if self._resume:
            try:
                os.write(self._fd, w.pack_notify_resend())
                log.info("BlobFS %s resumed: asked the kernel to resend requests in flight", self.mountpoint)
            except OSError as e:
                log.error("BlobFS %s: FUSE_NOTIFY_RESEND failed (kernel < 6.9?): %s", self.mountpoint, e)

    def path(self, name: str) -> Path:
        return self.mountpoint / name

    def names(self) -> list[str]:
        return sorted(n.name for n in self._by_name.values())

    def source(self, name: str) -> BlobSource | None:
        """The source serving ``name`` now (None: unknown, or not re-added since a restart)."""
        node = self._by_name.get(_check_name(name))
        return None if node is None else node.source

    async def add(self, name: str, source: BlobSource) -> Path:
        """Serve ``source`` as ``name``; its path. Re-adding a known name with the same size
        (as a restarted daemon does) keeps its node id; a new size replaces the file."""
        raw = _check_name(name)
        size = source.size
        old = self._by_name.get(raw)
        if old is not None and old.size == size:
            old.source = source
            old.ready.set()
            return self.path(name)
        if old is not None:
            self._detach(raw, old)
        node = _Node(self._state.next_node, name, size, source, asyncio.Event())
        node.ready.set()
        self._state.next_node += 1
        self._by_name[raw] = node
        self._by_id[node.node_id] = node
        self._state.files[name] = (node.node_id, size)
        await self._save()
        if old is not None:
            await self._invalidate(raw)
        return self.path(name)

    async def remove(self, name: str) -> None:
        """Stop serving ``name``; when this returns the kernel has forgotten the name."""
        raw = _check_name(name)
        node = self._by_name.get(raw)
        if node is None:
            raise BlobFSError(f"BlobFS {self.mountpoint} serves no file {name!r}")
        self._detach(raw, node)
        self._state.files.pop(name, None)
        await self._save()
        await self._invalidate(raw)

    async def wait_unmounted(self) -> str:
        """Wait until the file system is unmounted (or the connection aborted); why."""
        if self._gone is None:
            raise BlobFSError(f"BlobFS {self.mountpoint} was never started")
        return await asyncio.shield(self._gone)

    async def close(self, grace: float = 5.0) -> None:
        """Stop serving and close this server's fd (the holder keeps the mount). Reads still
        running after ``grace`` seconds are dropped unanswered: the next server gets them
        again through FUSE_NOTIFY_RESEND."""
        if self._fd < 0:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        pending = list(self._inflight.values())
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        os.close(self._fd)
        self._fd = -1
        os.close(self._lock_fd)
        self._finish("closed")

    # -----------------------------------------------------------------------------------------
    # State

    def _detach(self, raw: bytes, node: _Node) -> None:
        del self._by_name[raw]
        node.removed = True
        if node.opens == 0:
            self._by_id.pop(node.node_id, None)

    async def _save(self) -> None:
        async with self._save_lock:
            text = self._state.dump()
            await asyncio.to_thread(self._state.write, text)

    async def _invalidate(self, raw: bytes) -> None:
        if self._fd < 0 or self._gone is None or self._gone.done():
            return
        note = w.pack_notify_inval_entry(w.ROOT_ID, raw)
        try:
            await asyncio.to_thread(os.write, self._fd, note)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):  # ENOENT: nothing was cached
                log.error("BlobFS %s: invalidating %r failed: %s", self.mountpoint, os.fsdecode(raw), e)

    def _finish(self, why: str) -> None:
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(why)

    # -----------------------------------------------------------------------------------------
    # The request loop

    def _on_readable(self) -> None:
        for _ in range(_READ_BATCH):
            try:
                n = os.readv(self._fd, [self._buf])
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOENT:  # the request was interrupted before we took it
                    continue
                self._stop_reading("unmounted" if e.errno == errno.ENODEV else f"reading /dev/fuse failed: {e}")
                return
            self._dispatch(memoryview(self._buf)[:n])

    def _stop_reading(self, why: str) -> None:
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
        if why != "unmounted":
            log.error("BlobFS %s stops serving: %s", self.mountpoint, why)
        else:
            log.info("BlobFS %s was unmounted", self.mountpoint)
        self._finish(why)

    def _dispatch(self, buf: memoryview) -> None:
        try:
            h = w.parse_in_header(buf)
        except ValueError as e:
            log.error("BlobFS %s: %s", self.mountpoint, e)
            return
        name = _OPCODE_NAMES.get(h.opcode) or str(h.opcode)
        self.stats.requests[name] += 1
        if h.resent:
            self.stats.resent += 1
        if h.opcode == w.Opcode.READ:
            r = w.parse_read_in(buf[w.IN_HEADER.size : h.length])
            self.stats.read_sizes[r.size] += 1
            self._run(h.unique, self._read(h.unique, h.nodeid, r.offset, r.size))
            return
        body = bytes(buf[w.IN_HEADER.size : h.length])
        handler = self._handlers.get(h.opcode)
        if handler is None:
            if h.opcode not in w.NO_REPLY_OPCODES:
                self._reply_error(h.unique, errno.ENOSYS)
            return
        try:
            payload = handler(self, h, body)
        except _Errno as e:
            self._reply_error(h.unique, e.code)
            return
        except Exception as e:
            log.error("BlobFS %s: %s on node %d failed: %s: %s", self.mountpoint, name, h.nodeid, type(e).__name__, e)
            self._reply_error(h.unique, errno.EIO)
            return
        if payload is not None:
            self._reply(h.unique, payload)

    def _run(self, unique: int, coro: Coroutine[Any, Any, None]) -> None:
        """Run a request's coroutine eagerly: most READs complete without suspending (the
        source had the bytes), and then no task is created. One that suspends continues as a
        task, which INTERRUPT and ``close`` can cancel."""
        try:
            first = coro.send(None)
        except StopIteration:
            return
        assert self._loop is not None
        task = self._loop.create_task(_continue(coro, first))
        self._inflight[unique] = task
        self.stats.inflight_max = max(self.stats.inflight_max, len(self._inflight))
        task.add_done_callback(functools.partial(self._done, unique))

    def _done(self, unique: int, _task: asyncio.Task[None]) -> None:
        self._inflight.pop(unique, None)
        self._interrupted.discard(unique)

    def _reply(self, unique: int, payload: bytes) -> None:
        self._write([w.pack_out_header(unique, len(payload)), payload], unique)

    def _reply_error(self, unique: int, code: int) -> None:
        self._write([w.pack_out_header(unique, 0, code)], unique)

    def _write(self, parts: list[bytes], unique: int) -> None:
        if self._fd < 0:
            return
        try:
            os.writev(self._fd, parts)
        except OSError as e:
            if e.errno == errno.ENOENT:
                log.debug("BlobFS %s: request %#x was interrupted before its reply", self.mountpoint, unique)
            elif e.errno == errno.ENODEV:
                self._stop_reading("unmounted")
            else:
                log.error("BlobFS %s: reply to request %#x failed: %s", self.mountpoint, unique, e)

    async def _read(self, unique: int, nodeid: int, offset: int, size: int) -> None:
        node = self._by_id.get(nodeid)
        try:
            if node is None:
                log.error("BlobFS %s: READ of unknown node %d (removed before a restart)", self.mountpoint, nodeid)
                raise _Errno(errno.ESTALE)
            if node.source is None:
                try:
                    await asyncio.wait_for(node.ready.wait(), self._source_wait)
                except TimeoutError:
                    log.error(
                        "BlobFS %s: %s has no source %.0f s after the restart; READ [%d, +%d) fails",
                        self.mountpoint,
                        node.name,
                        self._source_wait,
                        offset,
                        size,
                    )
                    raise _Errno(errno.EIO) from None
            source = node.source
            assert source is not None
            want = max(0, min(size, node.size - offset))
            data = await source.read(offset, want) if want else b""
            if len(data) != want:
                log.error(
                    "BlobFS %s: %s [%d, +%d): source returned %d bytes",
                    self.mountpoint,
                    node.name,
                    offset,
                    want,
                    len(data),
                )
                raise _Errno(errno.EIO)
            self.stats.read_bytes += want
            self._reply(unique, data)
        except _Errno as e:
            self.stats.read_errors += 1
            self._reply_error(unique, e.code)
        except asyncio.CancelledError:
            if unique in self._interrupted:
                self._reply_error(unique, errno.EINTR)
            raise  # cancelled by close(): no reply, the next server gets the request again
        except Exception as e:
            self.stats.read_errors += 1
            code = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
            assert node is not None
            log.error(
                "BlobFS %s: reading %s [%d, +%d) failed: %s: %s (answering %s)",
                self.mountpoint,
                node.name,
                offset,
                size,
                type(e).__name__,
                e,
                errno.errorcode.get(code, code),
            )
            self._reply_error(unique, code)

    # -----------------------------------------------------------------------------------------
    # Metadata requests: each returns the reply body, or None for no reply; raises _Errno.

    def _root_attr(self) -> w.Attr:
        return w.Attr(w.ROOT_ID, 0, stat.S_IFDIR | 0o555, 2, mtime=self._mtime)

    def _attr(self, node: _Node) -> w.Attr:
        return w.Attr(node.node_id, node.size, stat.S_IFREG | 0o444, 1, mtime=self._mtime, blksize=1 << 20)

    def _entry(self, node: _Node) -> bytes:
        return w.pack_entry_out(node.node_id, self._attr(node), _TTL, self._state.generation)

    def _node(self, nodeid: int) -> _Node:
        node = self._by_id.get(nodeid)
        if node is None:
            raise _Errno(errno.ENOENT)
        return node

    def _op_init(self, h: w.InHeader, body: bytes) -> bytes:
        init = w.parse_init_in(body)
        if init.major < w.KERNEL_VERSION:
            log.error("BlobFS %s: kernel speaks FUSE %d.%d, too old", self.mountpoint, init.major, init.minor)
            raise _Errno(errno.EPROTO)
        self.init_flags = init.flags & _WANTED_FLAGS
        log.info(
            "BlobFS %s: INIT from kernel FUSE %d.%d; agreed flags %#x (resend %s)",
            self.mountpoint,
            init.major,
            init.minor,
            self.init_flags,
            "yes" if self.init_flags & w.FUSE_HAS_RESEND else "no",
        )
        return w.InitOut(
            max_readahead=init.max_readahead,
            flags=self.init_flags,
            max_background=64,
            congestion_threshold=48,
            max_write=_MAX_WRITE,
            max_pages=MAX_PAGES,
        ).pack()

    def _op_destroy(self, h: w.InHeader, body: bytes) -> bytes:
        self._finish("unmounted")
        return b""

    def _op_lookup(self, h: w.InHeader, body: bytes) -> bytes:
        if h.nodeid != w.ROOT_ID:
            raise _Errno(errno.ENOTDIR)
        node = self._by_name.get(w.parse_name(body))
        if node is None:
            raise _Errno(errno.ENOENT)
        return self._entry(node)

    def _op_getattr(self, h: w.InHeader, body: bytes) -> bytes:
        attr = self._root_attr() if h.nodeid == w.ROOT_ID else self._attr(self._node(h.nodeid))
        return w.pack_attr_out(attr, _TTL)

    def _op_open(self, h: w.InHeader, body: bytes) -> bytes:
        node = self._node(h.nodeid)
        flags, _ = w.OPEN_IN.unpack_from(body)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise _Errno(errno.EROFS)
        node.opens += 1
        return w.pack_open_out(node.node_id, w.FOPEN_DIRECT_IO)

    def _op_release(self, h: w.InHeader, body: bytes) -> bytes:
        node = self._by_id.get(h.nodeid)
        if node is not None:
            node.opens = max(0, node.opens - 1)
            if node.removed and node.opens == 0:
                self._by_id.pop(node.node_id, None)
        return b""

    def _op_flush(self, h: w.InHeader, body: bytes) -> bytes:
        return b""

    def _op_statfs(self, h: w.InHeader, body: bytes) -> bytes:
        total = sum(n.size for n in self._by_name.values())
        return w.pack_statfs_out(blocks=(total + 4095) // 4096, files=len(self._by_name) + 1)

    def _op_opendir(self, h: w.InHeader, body: bytes) -> bytes:
        if h.nodeid != w.ROOT_ID:
            raise _Errno(errno.ENOTDIR)
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = self._listing()
        return w.pack_open_out(fh, 0)

    def _listing(self) -> list[tuple[bytes, int]]:
        return [(raw, n.node_id) for raw, n in sorted(self._by_name.items())]

    def _op_readdir(self, h: w.InHeader, body: bytes) -> bytes:
        return self._readdir(body, plus=False)

    def _op_readdirplus(self, h: w.InHeader, body: bytes) -> bytes:
        return self._readdir(body, plus=True)

    def _readdir(self, body: bytes, plus: bool) -> bytes:
        r = w.parse_read_in(body)
        listing = self._dirs.get(r.fh)
        if listing is None:  # opened by a server before a restart
            listing = self._listing()
        entries = [(b".", w.ROOT_ID, w.DT_DIR), (b"..", w.ROOT_ID, w.DT_DIR)]
        entries += [(name, node_id, w.DT_REG) for name, node_id in listing]
        out: list[bytes] = []
        used = 0
        no_entry = w.ENTRY_OUT.pack(0, 0, 0, 0, 0, 0) + bytes(w.ATTR.size)
        for index in range(r.offset, len(entries)):
            name, ino, dtype = entries[index]
            if plus:
                node = self._by_id.get(ino) if dtype == w.DT_REG else None
                entry = self._entry(node) if node is not None else no_entry
                raw = w.pack_direntplus(entry, ino, index + 1, name, dtype)
            else:
                raw = w.pack_dirent(ino, index + 1, name, dtype)
            if used + len(raw) > r.size:
                break
            out.append(raw)
            used += len(raw)
        return b"".join(out)

    def _op_releasedir(self, h: w.InHeader, body: bytes) -> bytes:
        fh, _flags, _rflags, _owner = w.RELEASE_IN.unpack_from(body)
        self._dirs.pop(fh, None)
        return b""

    def _op_forget(self, h: w.InHeader, body: bytes) -> None:
        return None  # node ids live as long as their names; nothing to drop

    def _op_interrupt(self, h: w.InHeader, body: bytes) -> None:
        (target,) = w.INTERRUPT_IN.unpack_from(body)
        task = self._inflight.get(target)
        if task is not None:
            self._interrupted.add(target)
            task.cancel()
        return None

    _handlers: ClassVar[dict[int, _Handler]] = {
        w.Opcode.INIT: _op_init,
        w.Opcode.DESTROY: _op_destroy,
        w.Opcode.LOOKUP: _op_lookup,
        w.Opcode.GETATTR: _op_getattr,
        w.Opcode.OPEN: _op_open,
        w.Opcode.RELEASE: _op_release,
        w.Opcode.FLUSH: _op_flush,
        w.Opcode.STATFS: _op_statfs,
        w.Opcode.OPENDIR: _op_opendir,
        w.Opcode.READDIR: _op_readdir,
        w.Opcode.READDIRPLUS: _op_readdirplus,
        w.Opcode.RELEASEDIR: _op_releasedir,
        w.Opcode.FORGET: _op_forget,
        w.Opcode.BATCH_FORGET: _op_forget,
        w.Opcode.INTERRUPT: _op_interrupt,
    }
