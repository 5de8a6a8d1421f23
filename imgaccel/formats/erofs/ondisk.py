"""EROFS on-disk structures, as imgaccel writes them: constants, struct layouts, packers.

Source of truth: the Linux kernel's ``fs/erofs/erofs_fs.h`` (layout as of 6.18). Only what
imgaccel's metadata images use is here; docs/FORMAT.md section 7 specifies the image. All
integers are little-endian. Sizes below are checked at import time against the kernel's
``BUILD_BUG_ON`` sizes.
"""

from __future__ import annotations

import stat
import struct
from typing import Final

MAGIC: Final = 0xE0F5E1E2
SUPER_OFFSET: Final = 1024  # the superblock starts 1024 bytes into the image
BLOCK_BITS: Final = 9
BLOCK_SIZE: Final = 1 << BLOCK_BITS  # 512: tar data is 512-aligned, so device 1 maps 1:1
SLOT_SIZE: Final = 32  # inodes start on 32-byte slots; nid = slot number from meta_blkaddr
NULL_ADDR: Final = 0xFFFFFFFF  # "no block" (a flat inode without data)

# Feature bits (superblock feature_incompat). A kernel refuses images with bits it lacks.
FEATURE_INCOMPAT_CHUNKED_FILE: Final = 0x00000004  # EROFS_INODE_CHUNK_BASED inodes
FEATURE_INCOMPAT_DEVICE_TABLE: Final = 0x00000008  # extra_devices / devt_slotoff are valid

# Inode data layouts (bits 1-3 of i_format); bit 0 is the inode version.
LAYOUT_FLAT_PLAIN: Final = 0  # data in whole blocks from startblk (or none: NULL_ADDR)
LAYOUT_FLAT_INLINE: Final = 2  # whole blocks from startblk, the tail right after the inode
LAYOUT_CHUNK_BASED: Final = 4  # chunk indexes follow the inode (8-byte aligned)
INODE_COMPACT: Final = 0
INODE_EXTENDED: Final = 1

CHUNK_FORMAT_INDEXES: Final = 0x0020  # chunk entries are 8-byte erofs_inode_chunk_index
CHUNK_BLKBITS_MAX: Final = 0x1F  # chunk size = BLOCK_SIZE << chunkbits

# Short xattr name prefixes (erofs_xattr_entry.e_name_index).
XATTR_INDEX_USER: Final = 1
XATTR_INDEX_POSIX_ACL_ACCESS: Final = 2
XATTR_INDEX_POSIX_ACL_DEFAULT: Final = 3
XATTR_INDEX_TRUSTED: Final = 4
XATTR_INDEX_SECURITY: Final = 6
XATTR_PREFIXES: Final = (
    (b"user.", XATTR_INDEX_USER),
    (b"trusted.", XATTR_INDEX_TRUSTED),
    (b"security.", XATTR_INDEX_SECURITY),
)
XATTR_WHOLE_NAMES: Final = {
    b"system.posix_acl_access": XATTR_INDEX_POSIX_ACL_ACCESS,
    b"system.posix_acl_default": XATTR_INDEX_POSIX_ACL_DEFAULT,
}
XATTR_MAX_ICOUNT: Final = 0xFFFF  # i_xattr_icount is u16: 12 + 4 * (icount - 1) bytes at most
NAME_MAX: Final = 255  # EROFS_NAME_LEN; also the longest xattr name suffix (u8 length)
XATTR_VALUE_MAX: Final = 0xFFFF  # e_value_size is u16

# Directory entry file types (the kernel's FT_*).
FILE_TYPES: Final = {
    stat.S_IFREG: 1,
    stat.S_IFDIR: 2,
    stat.S_IFCHR: 3,
    stat.S_IFBLK: 4,
    stat.S_IFIFO: 5,
    stat.S_IFSOCK: 6,
    stat.S_IFLNK: 7,
}

# struct erofs_super_block, the 128-byte base (sb_extslots = 0):
#   0 magic u32, 4 checksum u32, 8 feature_compat u32, 12 blkszbits u8, 13 sb_extslots u8,
#   14 root_nid u16, 16 inos u64, 24 epoch s64, 32 fixed_nsec u32, 36 blocks u32,
#   40 meta_blkaddr u32, 44 xattr_blkaddr u32, 48 uuid[16], 64 volume_name[16],
#   80 feature_incompat u32, 84 available_compr_algs u16, 86 extra_devices u16,
#   88 devt_slotoff u16, 90 dirblkbits u8, 91 xattr_prefix_count u8, 92 xattr_prefix_start u32,
#   96 packed_nid u64, 104 xattr_filter_reserved u8, 105 reserved[3], 108 build_time u32,
#   112 rootnid_8b u64, 120 reserved2 u64.
SUPERBLOCK: Final = struct.Struct("<IIIBBHQqIIII16s16sIHHHBBIQB3xIQQ")
# struct erofs_deviceslot: tag[64], blocks_lo u32, uniaddr_lo u32, then hi parts (48-bit
# layout only) and reserved bytes, all zero here.
DEVICE_SLOT: Final = struct.Struct("<64sII56x")
# struct erofs_inode_compact: i_format, i_xattr_icount, i_mode, i_nlink (u16 each), i_size u32,
# i_mtime u32 (seconds after the superblock epoch), i_u u32, i_ino u32, i_uid u16, i_gid u16,
# reserved u32.
INODE_COMPACT_STRUCT: Final = struct.Struct("<HHHHIIIIHHI")
# struct erofs_inode_extended: i_format, i_xattr_icount, i_mode, i_nb (u16, 0 here), i_size u64,
# i_u u32, i_ino u32, i_uid u32, i_gid u32, i_mtime s64, i_mtime_nsec u32, i_nlink u32,
# reserved[16].
INODE_EXTENDED_STRUCT: Final = struct.Struct("<HHHHQIIIIqII16x")
# struct erofs_xattr_ibody_header: h_name_filter u32 (0: no filter), h_shared_count u8, 7 reserved.
XATTR_IBODY_HEADER: Final = struct.Struct("<IB7x")
# struct erofs_xattr_entry: e_name_len u8, e_name_index u8, e_value_size u16; name; value.
XATTR_ENTRY: Final = struct.Struct("<BBH")
# struct erofs_inode_chunk_index: startblk_hi u16, device_id u16, startblk_lo u32.
CHUNK_INDEX: Final = struct.Struct("<HHI")
# struct erofs_dirent: nid u64, nameoff u16, file_type u8, reserved u8.
DIRENT: Final = struct.Struct("<QHBB")

assert SUPERBLOCK.size == 128
assert DEVICE_SLOT.size == 128
assert INODE_COMPACT_STRUCT.size == 32
assert INODE_EXTENDED_STRUCT.size == 64
assert XATTR_IBODY_HEADER.size == 12
assert CHUNK_INDEX.size == 8
assert DIRENT.size == 12


def encode_rdev(major: int, minor: int) -> int:
    """The kernel's ``new_encode_dev``: the 32-bit device number an inode's i_u.rdev holds."""
    return ((minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def split_xattr_name(name: bytes) -> tuple[int, bytes] | None:
    """(short prefix index, the rest of the name), or None if EROFS cannot store the name."""
    whole = XATTR_WHOLE_NAMES.get(name)
    if whole is not None:
        return whole, b""
    for prefix, index in XATTR_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return index, name[len(prefix) :]
    return None


def xattr_ibody(xattrs: list[tuple[int, bytes, bytes]]) -> bytes:
    """The inline xattr area of an inode: header, then 4-byte-aligned entries (b"" if none)."""
    if not xattrs:
        return b""
    out = bytearray(XATTR_IBODY_HEADER.pack(0, 0))
    for index, name, value in xattrs:
        out += XATTR_ENTRY.pack(len(name), index, len(value))
        out += name
        out += value
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def xattr_icount(ibody_size: int) -> int:
    """i_xattr_icount for an inline xattr area of ``ibody_size`` bytes."""
    return 0 if ibody_size == 0 else (ibody_size - XATTR_IBODY_HEADER.size) // 4 + 1


def split_dirent_blocks(names: list[bytes]) -> list[tuple[int, int, int]]:
    """Pack sorted names into directory blocks greedily.

    Returns ``(first, end, used)`` per block: names ``[first, end)`` go in it and take
    ``used`` bytes (12 per dirent plus the names; the rest of a block is zero).
    """
    blocks: list[tuple[int, int, int]] = []
    first, used = 0, 0
    for i, name in enumerate(names):
        need = DIRENT.size + len(name)
        if used + need > BLOCK_SIZE:
            blocks.append((first, i, used))
            first, used = i, 0
        used += need
    blocks.append((first, len(names), used))
    return blocks


def pack_dirent_block(entries: list[tuple[bytes, int, int]]) -> bytes:
    """One directory block from (name, nid, file type), names already sorted."""
    nameoff = DIRENT.size * len(entries)
    heads = bytearray()
    for name, nid, ftype in entries:
        heads += DIRENT.pack(nid, nameoff, ftype, 0)
        nameoff += len(name)
    return bytes(heads) + b"".join(name for name, _, _ in entries)
