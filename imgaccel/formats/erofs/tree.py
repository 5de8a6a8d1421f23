"""A layer's tar entries as the file tree an overlayfs lower layer must show.

Applies tar semantics (a later entry with the same path replaces an earlier one; a directory
over a directory updates its metadata and keeps its children; a hardlink shares the inode of
the entry its target path names at that point), creates missing parent directories (mode
0755, owner 0:0, mtime 0), normalises names (leading ``/`` and ``./``, empty and ``.``
components dropped; names with a ``..`` component skipped), and turns OCI whiteouts into
overlayfs ones: ``.wh.NAME`` becomes a character device 0/0 named NAME, ``.wh..wh..opq``
marks its directory opaque. What cannot be represented is skipped and reported as a warning.
"""

from __future__ import annotations

import base64
import binascii
import math
import stat
from dataclasses import dataclass, field

from imgaccel.formats.erofs.ondisk import (
    BLOCK_SIZE,
    NAME_MAX,
    XATTR_VALUE_MAX,
    encode_rdev,
    split_xattr_name,
)
from imgaccel.formats.layer_index import Entry

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
NOBODY = 65534  # owner used for ids EROFS cannot store (more than 32 bits)

Xattr = tuple[int, bytes, bytes]  # (EROFS short prefix index, name suffix, value)


@dataclass(slots=True, eq=False)
class Node:
    """One inode of the tree. Directories have ``children``; hardlinked paths share a Node."""

    kind: int  # stat.S_IFREG, S_IFDIR, S_IFLNK, S_IFCHR, S_IFBLK or S_IFIFO
    perm: int = 0o755  # permission bits incl. setuid/setgid/sticky
    uid: int = 0
    gid: int = 0
    mtime: int = 0  # seconds since the epoch
    mtime_ns: int = 0  # 0..999999999
    size: int = 0  # regular file: data bytes
    offset: int = 0  # regular file: offset of the data in the layer's uncompressed tar
    target: bytes = b""  # symlink target
    rdev: int = 0  # character/block device number, kernel encoding
    xattrs: list[Xattr] = field(default_factory=list)
    children: dict[bytes, Node] | None = None
    opaque: bool = False  # hides what lower layers hold in this directory
    whiteout: bool = False  # made from an OCI whiteout (char 0/0)
    # Filled in by the writer.
    nid: int = -1
    nlink: int = 0
    parent: Node | None = None


def fs_bytes(text: str) -> bytes:
    """An index string as the tar's raw bytes (``os.fsencode`` semantics)."""
    return text.encode("utf-8", "surrogateescape")


def _components(name: str) -> tuple[list[bytes], str]:
    """Path components of ``name`` and, when it must be skipped, why."""
    parts = [p for p in fs_bytes(name).split(b"/") if p and p != b"."]
    if b".." in parts:
        return parts, "has a '..' component"
    if any(len(p) > NAME_MAX for p in parts):
        return parts, f"has a component longer than {NAME_MAX} bytes"
    return parts, ""


class TreeBuilder:
    """Feed entries in tar order with ``add``; read ``root`` and ``warnings`` afterwards."""

    def __init__(self) -> None:
        self.root = Node(stat.S_IFDIR, children={})
        self.warnings: list[str] = []

    def _warn(self, entry: Entry, why: str) -> None:
        self.warnings.append(f"{entry.name!r} ({entry.type}): {why}; skipped")

    def _parent(self, parts: list[bytes], entry: Entry) -> Node:
        """The directory holding ``parts``' last component, created (0755) where missing."""
        d = self.root
        for p in parts:
            assert d.children is not None
            c = d.children.get(p)
            if c is None or c.children is None:
                if c is not None and not c.whiteout:
                    self.warnings.append(f"{entry.name!r}: a non-directory on its path became a directory")
                # A directory that replaces a whiteout of the same layer starts empty.
                c = Node(stat.S_IFDIR, children={}, opaque=c is not None and c.whiteout)
                d.children[p] = c
            d = c
        return d

    def _lookup(self, parts: list[bytes]) -> Node | None:
        n: Node | None = self.root
        for p in parts:
            if n is None or n.children is None:
                return None
            n = n.children.get(p)
        return n

    def _xattrs(self, entry: Entry) -> list[Xattr]:
        out: list[Xattr] = []
        for name, encoded in entry.xattrs.items():
            try:
                value = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                self.warnings.append(f"{entry.name!r}: xattr {name!r} is not valid base64; xattr skipped")
                continue
            split = split_xattr_name(fs_bytes(name))
            if split is None:
                self.warnings.append(f"{entry.name!r}: xattr {name!r}: EROFS cannot store its namespace; xattr skipped")
            elif len(split[1]) > NAME_MAX or len(value) > XATTR_VALUE_MAX:
                self.warnings.append(f"{entry.name!r}: xattr {name!r} is too long for EROFS; xattr skipped")
            else:
                out.append((split[0], split[1], value))
        out.sort()
        return out

    def _metadata(self, node: Node, entry: Entry) -> None:
        node.perm = entry.mode & 0o7777
        node.uid, node.gid = self._id(entry, entry.uid), self._id(entry, entry.gid)
        node.mtime, node.mtime_ns = _split_time(entry.mtime)
        node.xattrs = self._xattrs(entry)

    def _id(self, entry: Entry, value: int) -> int:
        if 0 <= value <= 0xFFFFFFFF:
            return value
        self.warnings.append(f"{entry.name!r}: owner id {value} does not fit 32 bits; stored as {NOBODY}")
        return NOBODY

    def add(self, entry: Entry) -> None:
        parts, problem = _components(entry.name)
        if problem:
            self._warn(entry, f"name {problem}")
            return
        if not parts:
            if entry.type == "dir":
                self._metadata(self.root, entry)
            else:
                self._warn(entry, "empty name")
            return
        parent = self._parent(parts[:-1], entry)
        assert parent.children is not None
        name = parts[-1]
        if name == OPAQUE_MARKER:
            parent.opaque = True
            return
        if name.startswith(WHITEOUT_PREFIX):
            self._whiteout(parent.children, name[len(WHITEOUT_PREFIX) :], entry)
            return
        existing = parent.children.get(name)
        if entry.type == "hardlink":
            target_parts, problem = _components(entry.linkname)
            target = None if problem else self._lookup(target_parts)
            if target is None or target.whiteout or target.kind not in (stat.S_IFREG, stat.S_IFLNK):
                what = "missing" if target is None else "not a regular file or symlink"
                self._warn(entry, f"hardlink target {entry.linkname!r} is {what} in this layer")
                return
            parent.children[name] = target
            return
        if entry.type == "dir" and existing is not None and existing.children is not None:
            self._metadata(existing, entry)  # a directory over a directory merges
            return
        node = self._node(entry)
        if node is None:
            return
        if node.children is not None and existing is not None and existing.whiteout:
            node.opaque = True  # the layer deleted the lower NAME, then made a new directory
        parent.children[name] = node

    def _whiteout(self, siblings: dict[bytes, Node], name: bytes, entry: Entry) -> None:
        if not name or name in (b".", b"..") or name.startswith(WHITEOUT_PREFIX):
            self._warn(entry, "unsupported whiteout name")
            return
        existing = siblings.get(name)
        if existing is None:
            node = Node(stat.S_IFCHR, perm=0, whiteout=True)
            node.uid, node.gid = self._id(entry, entry.uid), self._id(entry, entry.gid)
            node.mtime, node.mtime_ns = _split_time(entry.mtime)
            siblings[name] = node
        elif existing.children is not None:
            existing.opaque = True
        # Whiteouts apply to lower layers only: a non-directory of this layer already hides
        # whatever the lower layers have under that name.

    def _node(self, entry: Entry) -> Node | None:
        kind = _KINDS.get(entry.type)
        if kind is None:
            self._warn(entry, "unknown entry type")
            return None
        node = Node(kind, children={} if kind == stat.S_IFDIR else None)
        self._metadata(node, entry)
        if kind == stat.S_IFREG:
            if entry.size and entry.offset % BLOCK_SIZE:
                self._warn(entry, f"data offset {entry.offset} is not {BLOCK_SIZE}-aligned")
                return None
            node.size, node.offset = entry.size, entry.offset
        elif kind == stat.S_IFLNK:
            node.target = fs_bytes(entry.linkname)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            node.rdev = encode_rdev(entry.devmajor, entry.devminor)
        return node


_KINDS = {
    "reg": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


def _split_time(mtime: float) -> tuple[int, int]:
    """(seconds, nanoseconds) of a tar mtime, clamped to what an s64 second count holds."""
    if not math.isfinite(mtime):
        return 0, 0
    seconds = math.floor(mtime)
    nanos = min(round((mtime - seconds) * 1e9), 999_999_999)
    return max(min(seconds, (1 << 63) - 1), -(1 << 63)), nanos


def build_tree(entries: list[Entry]) -> tuple[Node, list[str]]:
    """The tree of ``entries`` (in tar order) and the warnings about what was skipped."""
    builder = TreeBuilder()
    for entry in entries:
        builder.add(entry)
    return builder.root, builder.warnings
