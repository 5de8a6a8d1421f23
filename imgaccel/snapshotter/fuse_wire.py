"""The FUSE kernel protocol (include/uapi/linux/fuse.h, protocol 7.40) as pure data.

This module owns the wire format spoken over ``/dev/fuse``: opcode, flag and notification
numbers, the byte layout of every request body and reply this project's servers use, and
small pack/unpack helpers. It does no I/O. Everything is little-endian on the machines we
run on (x86-64, arm64); the kernel uses native byte order, and these layouts say ``<``.

Framing
=======
One ``read(2)`` on ``/dev/fuse`` returns exactly one request: a ``fuse_in_header`` followed by
the opcode's body (``len`` counts both). The buffer handed to ``read`` must be at least
``max(FUSE_MIN_READ_BUFFER, 80 + max_write)`` bytes or the kernel answers EINVAL.
One ``write(2)`` (``writev`` is fine) sends exactly one reply: a ``fuse_out_header`` whose
``unique`` is the request's, ``error`` 0 or a negated errno (then no body), followed by the
reply body. A write with ``unique == 0`` is a notification: ``error`` holds the notify code.

A write answers ENOENT when its request is gone (interrupted, or the connection was aborted):
not an error of the server. Reads and writes answer ENODEV once the file system is unmounted.

Resuming a connection (FUSE_NOTIFY_RESEND, kernel >= 6.9)
=========================================================
Requests the server has read but not answered sit on the connection's "processing" list,
which belongs to the open ``/dev/fuse`` file, not to the process. If the server dies while
another process (the holder) keeps a copy of the fd, the connection survives; a new server
writes the notification ``FUSE_NOTIFY_RESEND`` (header only) and the kernel puts every
request on the processing list back in the queue, with bit 63 (``FUSE_UNIQUE_RESEND``) set
in ``unique``. The reply must carry the ``unique`` exactly as received. A server announces
that it understands this by offering ``FUSE_HAS_RESEND`` (flags2 bit 7, i.e. bit 39) in its
INIT reply. A resumed server never sees INIT: the kernel sent it once, to the first server.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# Versions and fixed numbers

KERNEL_VERSION = 7
"""Protocol major version; only 7 exists."""
KERNEL_MINOR_VERSION = 40
"""The minor version these layouts describe (7.40 added FUSE_HAS_RESEND and NOTIFY_RESEND)."""
ROOT_ID = 1
"""The node id of the mount's root directory, fixed by the kernel."""
MIN_READ_BUFFER = 8192
"""FUSE_MIN_READ_BUFFER: the smallest buffer ``read(2)`` on /dev/fuse accepts."""
UNIQUE_RESEND = 1 << 63
"""FUSE_UNIQUE_RESEND: set in ``unique`` of a request re-queued by FUSE_NOTIFY_RESEND."""


class Opcode(enum.IntEnum):
    """``enum fuse_opcode``: the request kinds (the subset a read-only server sees, and the
    ones it must recognise to answer ENOSYS or nothing)."""

    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36  # no reply
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42  # no reply
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52


NO_REPLY_OPCODES = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT})
"""Requests the kernel expects no answer to (a reply would be rejected with EINVAL).
INTERRUPT may be answered by replying to the *interrupted* request, e.g. with EINTR."""


class NotifyCode(enum.IntEnum):
    """``enum fuse_notify_code``: the ``error`` field of a notification (``unique == 0``)."""

    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6
    RESEND = 7


# ---------------------------------------------------------------------------------------------
# INIT flags: ``fuse_init_in.flags`` / ``flags2`` (offered by the kernel) and ``fuse_init_out``
# (accepted by the server). Bits 32-63 travel in ``flags2`` and only when FUSE_INIT_EXT is set.

FUSE_ASYNC_READ = 1 << 0
"""Several READs of one file may be in flight at once (readahead and async direct I/O)."""
FUSE_BIG_WRITES = 1 << 5
"""Writes larger than a page (irrelevant for a read-only server)."""
FUSE_DO_READDIRPLUS = 1 << 13
"""Directory listings use READDIRPLUS (entries carry attributes) instead of READDIR."""
FUSE_ASYNC_DIO = 1 << 15
"""A large direct read is split into several READs sent concurrently."""
FUSE_PARALLEL_DIROPS = 1 << 18
"""LOOKUP and READDIR of one directory may run concurrently."""
FUSE_MAX_PAGES = 1 << 22
"""``fuse_init_out.max_pages`` is meaningful: READ requests up to max_pages pages."""
FUSE_INIT_EXT = 1 << 30
"""``flags2`` is present (bits 32-63 of the flags)."""
FUSE_HAS_RESEND = 1 << 39
"""The server understands FUSE_NOTIFY_RESEND and the resend bit in ``unique``."""

# ``fuse_open_out.open_flags``
FOPEN_DIRECT_IO = 1 << 0
"""Bypass the page cache of the FUSE file: every read becomes a READ request. Used because
EROFS caches the pages of the files it serves; caching the blob too would hold data twice."""
FOPEN_KEEP_CACHE = 1 << 1
"""Keep cached pages of the file across opens."""

# Directory entry types (``fuse_dirent.type``: the DT_* values, i.e. S_IFMT >> 12)
DT_DIR = 4
DT_REG = 8

# ``fuse_notify_inval_entry_out.flags``
FUSE_EXPIRE_ONLY = 1 << 0
"""Only expire the dentry's timeout rather than dropping it (not used here)."""


# ---------------------------------------------------------------------------------------------
# Struct layouts. Each ``struct.Struct`` is documented field by field in wire order.

IN_HEADER = struct.Struct("<IIQQIIIHH")
"""``fuse_in_header``, 40 bytes, precedes every request:
len u32 (header + body), opcode u32, unique u64 (the request id; bit 63 = resent),
nodeid u64 (the inode the request is about), uid u32, gid u32, pid u32 (of the caller),
total_extlen u16 (request extensions after the body, in 8-byte units), padding u16."""

OUT_HEADER = struct.Struct("<IiQ")
"""``fuse_out_header``, 16 bytes, precedes every reply and notification:
len u32 (header + body), error i32 (0, a negated errno, or a notify code when unique is 0),
unique u64 (the request's, as received)."""

INIT_IN = struct.Struct("<IIIII44x")
"""``fuse_init_in``, 64 bytes: major u32, minor u32, max_readahead u32, flags u32 (bits 0-31),
flags2 u32 (bits 32-63, valid when FUSE_INIT_EXT is in flags), unused u32[11]."""

INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
"""``fuse_init_out``, 64 bytes: major u32, minor u32, max_readahead u32, flags u32,
max_background u16 (async requests in flight before the kernel throttles),
congestion_threshold u16, max_write u32 (>= 4096), time_gran u32 (timestamp granularity in
ns), max_pages u16 (largest READ/WRITE in pages, with FUSE_MAX_PAGES), map_alignment u16
(DAX only), flags2 u32 (bits 32-63), max_stack_depth u32 (passthrough only), unused u32[6]
(7.43's request_timeout u16 sits there; 0 = no timeout)."""

ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
"""``fuse_attr``, 88 bytes: ino u64, size u64, blocks u64 (512-byte units), atime u64,
mtime u64, ctime u64 (seconds), atimensec u32, mtimensec u32, ctimensec u32, mode u32
(S_IFMT | permissions), nlink u32, uid u32, gid u32, rdev u32, blksize u32 (preferred I/O
size), flags u32 (FUSE_ATTR_SUBMOUNT, FUSE_ATTR_DAX)."""

ENTRY_OUT = struct.Struct("<QQQQII")
"""``fuse_entry_out`` without its trailing ``fuse_attr`` (40 + 88 = 128 bytes): nodeid u64
(0 = negative entry), generation u64 (nodeid + generation must be unique over the mount's
life), entry_valid u64, attr_valid u64 (cache timeouts, seconds), entry_valid_nsec u32,
attr_valid_nsec u32. Reply to LOOKUP; also the head of each READDIRPLUS entry."""

ATTR_OUT = struct.Struct("<QII")
"""``fuse_attr_out`` without its trailing ``fuse_attr`` (16 + 88 = 104 bytes): attr_valid u64,
attr_valid_nsec u32, dummy u32. Reply to GETATTR."""

OPEN_IN = struct.Struct("<II")
"""``fuse_open_in``, 8 bytes: flags u32 (the open(2) flags), open_flags u32 (FUSE_OPEN_*)."""

OPEN_OUT = struct.Struct("<QIi")
"""``fuse_open_out``, 16 bytes: fh u64 (the server's handle, echoed in READ/RELEASE),
open_flags u32 (FOPEN_*), backing_id i32 (passthrough only, else 0). Reply to OPEN and
OPENDIR."""

READ_IN = struct.Struct("<QQIIQII")
"""``fuse_read_in``, 40 bytes: fh u64, offset u64, size u32 (bytes wanted), read_flags u32,
lock_owner u64, flags u32 (the file's open flags), padding u32. Body of READ, READDIR and
READDIRPLUS. The reply to READ is the bytes themselves: exactly ``size`` unless the end of
the file comes first (a short reply means EOF to the kernel)."""

RELEASE_IN = struct.Struct("<QIIQ")
"""``fuse_release_in``, 24 bytes: fh u64, flags u32, release_flags u32, lock_owner u64.
Body of RELEASE and RELEASEDIR; the reply has no body."""

FORGET_IN = struct.Struct("<Q")
"""``fuse_forget_in``, 8 bytes: nlookup u64 (lookups of ``nodeid`` the kernel drops)."""

BATCH_FORGET_IN = struct.Struct("<II")
"""``fuse_batch_forget_in``, 8 bytes: count u32, dummy u32; followed by ``count``
``fuse_forget_one`` (nodeid u64, nlookup u64)."""

FORGET_ONE = struct.Struct("<QQ")
"""``fuse_forget_one``, 16 bytes: nodeid u64, nlookup u64."""

INTERRUPT_IN = struct.Struct("<Q")
"""``fuse_interrupt_in``, 8 bytes: unique u64 of the request the caller gave up on."""

KSTATFS = struct.Struct("<QQQQQIIII24x")
"""``fuse_kstatfs`` (= ``fuse_statfs_out``), 80 bytes: blocks u64, bfree u64, bavail u64,
files u64, ffree u64, bsize u32, namelen u32, frsize u32, padding u32, spare u32[6]."""

DIRENT = struct.Struct("<QQII")
"""``fuse_dirent`` head, 24 bytes: ino u64, off u64 (the offset of the *next* entry, passed
back in the next READDIR), namelen u32, type u32 (DT_*); then the name, no NUL, padded with
zeros to a multiple of 8. READDIRPLUS entries are a ``fuse_entry_out`` (128 bytes) then this."""

NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")
"""``fuse_notify_inval_entry_out``, 16 bytes: parent u64 (directory node id), namelen u32,
flags u32 (FUSE_EXPIRE_ONLY); followed by the name and one NUL byte."""


# ---------------------------------------------------------------------------------------------
# Parsed requests


@dataclass(frozen=True, slots=True)
class InHeader:
    """A request's ``fuse_in_header``."""

    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int

    @property
    def resent(self) -> bool:
        """The kernel re-queued this request after FUSE_NOTIFY_RESEND."""
        return bool(self.unique & UNIQUE_RESEND)


def parse_in_header(buf: bytes | bytearray | memoryview) -> InHeader:
    """The header of one request read from /dev/fuse; ValueError if the request is truncated."""
    if len(buf) < IN_HEADER.size:
        raise ValueError(f"FUSE request of {len(buf)} bytes is shorter than its {IN_HEADER.size}-byte header")
    length, opcode, unique, nodeid, uid, gid, pid, _extlen, _pad = IN_HEADER.unpack_from(buf)
    if length > len(buf):
        raise ValueError(f"FUSE request {unique} says {length} bytes but {len(buf)} were read")
    return InHeader(length, opcode, unique, nodeid, uid, gid, pid)


@dataclass(frozen=True, slots=True)
class InitIn:
    """The kernel's INIT offer."""

    major: int
    minor: int
    max_readahead: int
    flags: int
    """All 64 flag bits (``flags2`` folded in when FUSE_INIT_EXT is set)."""


def parse_init_in(body: bytes | bytearray | memoryview) -> InitIn:
    """INIT's body. Old kernels send a shorter struct (up to ``flags``); missing fields are 0."""
    padded = bytes(body[: INIT_IN.size]).ljust(INIT_IN.size, b"\0")
    major, minor, max_readahead, flags, flags2 = INIT_IN.unpack(padded)
    if flags & FUSE_INIT_EXT:
        flags |= flags2 << 32
    return InitIn(major, minor, max_readahead, flags)


@dataclass(frozen=True, slots=True)
class InitOut:
    """The server's INIT answer."""

    max_readahead: int
    flags: int
    """All 64 flag bits; split into ``flags`` and ``flags2`` on the wire."""
    max_background: int
    congestion_threshold: int
    max_write: int
    max_pages: int
    time_gran: int = 1
    minor: int = KERNEL_MINOR_VERSION

    def pack(self) -> bytes:
        return INIT_OUT.pack(
            KERNEL_VERSION,
            self.minor,
            self.max_readahead,
            self.flags & 0xFFFFFFFF,
            self.max_background,
            self.congestion_threshold,
            self.max_write,
            self.time_gran,
            self.max_pages,
            0,
            self.flags >> 32,
            0,
        )


@dataclass(frozen=True, slots=True)
class ReadIn:
    """The body of READ, READDIR and READDIRPLUS."""

    fh: int
    offset: int
    size: int


def parse_read_in(body: bytes | bytearray | memoryview) -> ReadIn:
    fh, offset, size, _rflags, _owner, _flags, _pad = READ_IN.unpack_from(body)
    return ReadIn(fh, offset, size)


def parse_name(body: bytes | bytearray | memoryview) -> bytes:
    """A NUL-terminated name (LOOKUP's body)."""
    raw = bytes(body)
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def parse_batch_forget(body: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
    """BATCH_FORGET's (nodeid, nlookup) pairs."""
    count, _ = BATCH_FORGET_IN.unpack_from(body)
    return [FORGET_ONE.unpack_from(body, BATCH_FORGET_IN.size + i * FORGET_ONE.size) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Replies


@dataclass(frozen=True, slots=True)
class Attr:
    """The attributes of one inode, as ``fuse_attr`` carries them."""

    ino: int
    size: int
    mode: int
    nlink: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    blksize: int = 4096

    def pack(self) -> bytes:
        blocks = (self.size + 511) // 512
        t = self.mtime
        return ATTR.pack(
            self.ino, self.size, blocks, t, t, t, 0, 0, 0, self.mode, self.nlink, self.uid, self.gid, 0, self.blksize, 0
        )


def pack_out_header(unique: int, body_len: int, error: int = 0) -> bytes:
    """The header of a reply: ``error`` is a positive errno (sent negated) or 0."""
    return OUT_HEADER.pack(OUT_HEADER.size + body_len, -error, unique)


def pack_entry_out(nodeid: int, attr: Attr, valid: int, generation: int = 0) -> bytes:
    """LOOKUP's reply (also the head of a READDIRPLUS entry), cached ``valid`` seconds."""
    return ENTRY_OUT.pack(nodeid, generation, valid, valid, 0, 0) + attr.pack()


def pack_attr_out(attr: Attr, valid: int) -> bytes:
    """GETATTR's reply, cached ``valid`` seconds."""
    return ATTR_OUT.pack(valid, 0, 0) + attr.pack()


def pack_open_out(fh: int, open_flags: int) -> bytes:
    return OPEN_OUT.pack(fh, open_flags, 0)


def pack_statfs_out(blocks: int, files: int, bsize: int = 4096, namelen: int = 255) -> bytes:
    return KSTATFS.pack(blocks, 0, 0, files, 0, bsize, namelen, bsize, 0)


def _padded(head: bytes, name: bytes) -> bytes:
    raw = head + name
    return raw + b"\0" * (-len(raw) % 8)


def pack_dirent(ino: int, next_off: int, name: bytes, dtype: int) -> bytes:
    """One READDIR entry; ``next_off`` is where the listing resumes after it."""
    return _padded(DIRENT.pack(ino, next_off, len(name), dtype), name)


def pack_direntplus(entry: bytes, ino: int, next_off: int, name: bytes, dtype: int) -> bytes:
    """One READDIRPLUS entry: ``entry`` from ``pack_entry_out`` (nodeid 0 = no lookup)."""
    return _padded(entry + DIRENT.pack(ino, next_off, len(name), dtype), name)


def pack_notify_resend() -> bytes:
    """FUSE_NOTIFY_RESEND: re-queue every request read but not answered on this connection."""
    return OUT_HEADER.pack(OUT_HEADER.size, NotifyCode.RESEND, 0)


def pack_notify_inval_entry(parent: int, name: bytes) -> bytes:
    """FUSE_NOTIFY_INVAL_ENTRY: drop ``name`` in directory ``parent`` from the dentry cache.
    The kernel answers ENOENT when nothing was cached. Must not be written from the thread
    that answers requests: the kernel takes the directory's lock, which a LOOKUP waiting for
    that thread may hold."""
    body = NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0) + name + b"\0"
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), NotifyCode.INVAL_ENTRY, 0) + body
