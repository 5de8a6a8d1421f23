"""Lay a ``tree.Node`` tree out as an EROFS image with 512-byte blocks; see FORMAT.md section 7.

Image layout (blocks are 512 bytes):
  bytes 0-1023     zero (EROFS leaves room for boot sectors)
  bytes 1024-1151  superblock; bytes 1152-1279 device slot 1 (devt_slotoff 9)
  bytes 1280-...   inodes on 32-byte slots (meta_blkaddr 0, so nid = byte offset / 32; the
                   root is nid 40: never 0, which readdir(3) would hide as a deleted entry),
                   breadth-first from the root, each followed by its inline xattrs and then
                   its chunk index (regular files) or the inline tail of its data
  then             whole data blocks of directories and symlinks whose data is not inline
Regular files point into device 1 (the layer's uncompressed tar) with one chunk each.
"""

from __future__ import annotations

import hashlib
import stat
from collections import Counter
from dataclasses import dataclass, field

from imgaccel.formats.erofs import ondisk as od
from imgaccel.formats.erofs.tree import Node, build_tree
from imgaccel.formats.layer_index import LayerIndex

# Bump when the bytes written for the same LayerIndex change (node caches key images by it).
WRITER_VERSION = 1
META_BLKADDR = 0
DEVT_SLOTOFF = (od.SUPER_OFFSET + od.SUPERBLOCK.size) // od.DEVICE_SLOT.size  # 9: byte 1152
INODES_START = (DEVT_SLOTOFF + 1) * od.DEVICE_SLOT.size  # 1280, after the one device slot
DEVICE_ID = 1  # the layer tar: the first (only) extra device


@dataclass(slots=True)
class ErofsImage:
    """An EROFS metadata image of one layer, and what could not be represented in it."""

    data: bytes
    warnings: list[str] = field(default_factory=list)
    inodes: int = 0
    device_blocks: int = 0  # 512-byte blocks of device 1, the layer's uncompressed tar


@dataclass(slots=True)
class _Plan:
    """Where one inode's record goes and what follows the inode in it."""

    node: Node
    extended: bool
    layout: int
    ibody: bytes  # inline xattrs
    record: int  # bytes from the inode start to the end of what is inline
    data: bytes = b""  # directory or symlink data (directories: blocks filled in later)
    blocks: int = 0  # whole data blocks outside the metadata area
    startblk: int = od.NULL_ADDR
    pos: int = 0  # byte offset of the inode in the image
    dir_blocks: list[tuple[int, int, int]] = field(default_factory=list)
    entries: list[tuple[bytes, Node]] = field(default_factory=list)


def _walk(root: Node) -> list[Node]:
    """Every inode once, breadth-first from the root, children in name order; sets parent
    and nlink (directories: 2 + subdirectories; others: the number of names)."""
    root.parent = root
    order, seen, i = [root], {id(root)}, 0
    while i < len(order):
        d = order[i]
        i += 1
        if d.children is None:
            continue
        d.nlink = 2
        for name in sorted(d.children):
            c = d.children[name]
            if c.children is not None:
                d.nlink += 1
                c.parent = d
            else:
                c.nlink += 1
            if id(c) not in seen:
                seen.add(id(c))
                order.append(c)
    return order


def _epoch(nodes: list[Node]) -> int:
    """The most common whole-second mtime: inodes with exactly that mtime can be compact."""
    counts = Counter(n.mtime for n in nodes if n.mtime_ns == 0)
    return counts.most_common(1)[0][0] if counts else 0


def _compact(n: Node, epoch: int) -> bool:
    # Compact inodes keep mtime as epoch + u32; older kernels (before ~6.15) ignore that u32
    # and show the epoch, so only an mtime equal to the epoch is stored compactly.
    return (
        n.mtime == epoch
        and n.mtime_ns == 0
        and n.uid <= 0xFFFF
        and n.gid <= 0xFFFF
        and n.size <= 0xFFFFFFFF
        and n.nlink <= 0xFFFF
    )


def _xattr_body(n: Node, warnings: list[str]) -> bytes:
    xattrs = n.xattrs
    if n.opaque:
        xattrs = [x for x in xattrs if x[:2] != (od.XATTR_INDEX_TRUSTED, b"overlay.opaque")]
        xattrs.append((od.XATTR_INDEX_TRUSTED, b"overlay.opaque", b"y"))
    limit = od.XATTR_IBODY_HEADER.size + 4 * (od.XATTR_MAX_ICOUNT - 1)
    total = od.XATTR_IBODY_HEADER.size
    for kept, (_, name, value) in enumerate(xattrs):
        total += -(-(od.XATTR_ENTRY.size + len(name) + len(value)) // 4) * 4
        if total > limit:
            warnings.append(f"an inode has more xattr bytes than EROFS holds inline; {len(xattrs) - kept} dropped")
            xattrs = xattrs[:kept]
            break
    return od.xattr_ibody(xattrs)


def _plan(n: Node, epoch: int, warnings: list[str]) -> _Plan:
    entries: list[tuple[bytes, Node]] = []
    dir_blocks: list[tuple[int, int, int]] = []
    if n.children is not None:
        entries = sorted([(b".", n), (b"..", n.parent or n), *n.children.items()], key=lambda e: e[0])
        dir_blocks = od.split_dirent_blocks([name for name, _ in entries])
        n.size = (len(dir_blocks) - 1) * od.BLOCK_SIZE + dir_blocks[-1][2]
    elif n.kind == stat.S_IFLNK:
        n.size = len(n.target)
    extended = not _compact(n, epoch)
    ibody = _xattr_body(n, warnings)
    head = (64 if extended else 32) + len(ibody)
    if n.kind == stat.S_IFREG and n.size:
        chunks = -(-n.size // (od.BLOCK_SIZE << _chunkbits(n.size)))
        return _Plan(n, extended, od.LAYOUT_CHUNK_BASED, ibody, -(-head // 8) * 8 + chunks * od.CHUNK_INDEX.size)
    plan = _Plan(n, extended, od.LAYOUT_FLAT_PLAIN, ibody, head, dir_blocks=dir_blocks, entries=entries)
    if n.kind == stat.S_IFLNK:
        plan.data = n.target
    elif n.children is None:
        return plan
    tail = n.size % od.BLOCK_SIZE
    if n.size and tail and head + tail <= od.BLOCK_SIZE:
        plan.layout, plan.record = od.LAYOUT_FLAT_INLINE, head + tail
        plan.blocks = n.size // od.BLOCK_SIZE
    else:
        plan.blocks = -(-n.size // od.BLOCK_SIZE)
    return plan


def _chunkbits(size: int) -> int:
    """The smallest chunk size (512 << bits) that holds ``size`` bytes in one chunk; files
    over 1 TiB (the largest chunk) get 1 TiB chunks."""
    return min(max(0, (size - 1).bit_length() - od.BLOCK_BITS), od.CHUNK_BLKBITS_MAX)


def _dir_data(p: _Plan) -> bytes:
    ftypes = od.FILE_TYPES
    out = bytearray()
    for first, end, _ in p.dir_blocks:
        block = od.pack_dirent_block([(name, c.nid, ftypes[c.kind]) for name, c in p.entries[first:end]])
        out += block
        if end != len(p.entries):
            out += b"\0" * (od.BLOCK_SIZE - len(block))
    return bytes(out)


def _write_inode(img: bytearray, p: _Plan, ino: int, epoch: int) -> None:
    n = p.node
    if p.layout == od.LAYOUT_CHUNK_BASED:
        i_u = od.CHUNK_FORMAT_INDEXES | _chunkbits(n.size)
    elif n.kind in (stat.S_IFCHR, stat.S_IFBLK):
        i_u = n.rdev
    elif n.kind == stat.S_IFIFO:
        i_u = 0
    else:
        i_u = p.startblk
    fmt = (od.INODE_EXTENDED if p.extended else od.INODE_COMPACT) | p.layout << 1
    icount = od.xattr_icount(len(p.ibody))
    mode = n.kind | n.perm
    if p.extended:
        od.INODE_EXTENDED_STRUCT.pack_into(
            img, p.pos, fmt, icount, mode, 0, n.size, i_u, ino, n.uid, n.gid, n.mtime, n.mtime_ns, n.nlink
        )
        end = p.pos + 64
    else:
        od.INODE_COMPACT_STRUCT.pack_into(
            img, p.pos, fmt, icount, mode, n.nlink, n.size, n.mtime - epoch, i_u, ino, n.uid, n.gid, 0
        )
        end = p.pos + 32
    img[end : end + len(p.ibody)] = p.ibody
    end += len(p.ibody)
    if p.layout == od.LAYOUT_CHUNK_BASED:
        # All of a file's data is contiguous in the tar: chunk i starts i chunks further on.
        chunk_blocks = 1 << _chunkbits(n.size)
        at = -(-end // 8) * 8
        for i in range(-(-n.size // (chunk_blocks * od.BLOCK_SIZE))):
            od.CHUNK_INDEX.pack_into(img, at + 8 * i, 0, DEVICE_ID, n.offset // od.BLOCK_SIZE + i * chunk_blocks)
        return
    data = _dir_data(p) if n.children is not None else p.data
    whole = p.blocks * od.BLOCK_SIZE
    if p.blocks:
        img[p.startblk * od.BLOCK_SIZE : p.startblk * od.BLOCK_SIZE + min(whole, len(data))] = data[:whole]
    if p.layout == od.LAYOUT_FLAT_INLINE:
        tail = data[whole:]
        img[end : end + len(tail)] = tail


def _uuid(index: LayerIndex) -> bytes:
    """A volume UUID derived from the layer, so the same layer always gives the same bytes."""
    raw = bytearray(hashlib.sha256(b"imgaccel erofs " + index.diff_id.encode()).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # RFC 9562 version 8 (custom), variant 10
    raw[8] = (raw[8] & 0x3F) | 0x80
    return bytes(raw)


def build_erofs_image(index: LayerIndex) -> ErofsImage:
    """The EROFS metadata image of ``index``'s layer, whose file data is read from device 1.

    Mount it read-only with the layer's uncompressed tar as the extra device
    (``mount -t erofs -o device=LAYER.tar IMAGE DIR`` through mount(2)). Entries EROFS cannot
    represent are skipped and listed in ``warnings``. Raises ValueError if the tar is too
    large for 32-bit block addresses (2 TiB).
    """
    device_blocks = -(-index.uncompressed_size // od.BLOCK_SIZE)
    if device_blocks > 0xFFFFFFFF:
        raise ValueError("layers of 2 TiB or more need EROFS 48-bit addressing, which is not written")
    root, warnings = build_tree(index.entries)
    nodes = _walk(root)
    epoch = _epoch(nodes)
    plans = [_plan(n, epoch, warnings) for n in nodes]

    meta_start = META_BLKADDR * od.BLOCK_SIZE
    pos = INODES_START
    for p in plans:
        if pos % od.BLOCK_SIZE + p.record > od.BLOCK_SIZE:
            pos = -(-pos // od.BLOCK_SIZE) * od.BLOCK_SIZE
        p.pos = pos
        p.node.nid = (pos - meta_start) // od.SLOT_SIZE
        pos += -(-p.record // od.SLOT_SIZE) * od.SLOT_SIZE
    block = -(-pos // od.BLOCK_SIZE)
    for p in plans:
        if p.blocks:
            p.startblk = block
            block += p.blocks
    if block > 0xFFFFFFFF:
        raise ValueError("the metadata image would exceed 32-bit block addresses")

    img = bytearray(block * od.BLOCK_SIZE)
    for ino, p in enumerate(plans, start=1):
        _write_inode(img, p, ino, epoch)
    od.SUPERBLOCK.pack_into(
        img,
        od.SUPER_OFFSET,
        od.MAGIC,
        0,  # checksum: the SB_CHKSUM feature is not set
        0,  # feature_compat
        od.BLOCK_BITS,
        0,  # sb_extslots
        root.nid,
        len(plans),  # inos
        epoch,
        0,  # fixed_nsec
        block,  # blocks of this image
        META_BLKADDR,
        0,  # xattr_blkaddr: no shared xattrs
        _uuid(index),
        b"",  # volume name
        od.FEATURE_INCOMPAT_CHUNKED_FILE | od.FEATURE_INCOMPAT_DEVICE_TABLE,
        0,  # available_compr_algs
        1,  # extra_devices
        DEVT_SLOTOFF,
        0,  # dirblkbits
        0,  # xattr_prefix_count
        0,  # xattr_prefix_start
        0,  # packed_nid
        0,  # xattr_filter_reserved
        0,  # build_time
        0,  # rootnid_8b
        0,  # reserved2
    )
    tag = index.diff_id.removeprefix("sha256:").encode()[:64]
    od.DEVICE_SLOT.pack_into(img, DEVT_SLOTOFF * od.DEVICE_SLOT.size, tag, device_blocks, 0)
    return ErofsImage(bytes(img), warnings, len(plans), device_blocks)
