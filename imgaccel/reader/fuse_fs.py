"""A read-only FUSE filesystem over an ``AcceleratedImage`` (pyfuse3 on the asyncio loop).

FUSE is a thin adapter: lookups, attributes, directory listings, links and xattrs come from
the ``MergedView``; file bytes come from ``AcceleratedImage.read_node`` (so from the chunk
caches or verified Range reads). Hardlinks share one inode number. The mount is read-only
(writes fail with EROFS); a chunk that cannot be fetched or verified makes the read fail with
EIO, and the failure is logged with the layer, chunk and registry named. An entry whose bytes
cannot be found (a hardlink to a missing target) answers EIO alone, logged once; every other
unexpected error in a handler also answers EIO (logged) rather than leaving the caller waiting
for a reply that never comes. Names are raw bytes: the index holds them decoded as UTF-8 with
``surrogateescape``, so undecodable bytes round-trip exactly.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import functools
import logging
import os
import select
import signal
import stat
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import pyfuse3.asyncio

from imgaccel.formats.layer_index import Entry
from imgaccel.reader.accelerated_image import AcceleratedImage
from imgaccel.reader.layer_reader import ChunkReadError
from imgaccel.reader.merged_view import BrokenHardlink, MergedView, Node, PathError, normalize_path

log = logging.getLogger(__name__)
_TYPE_BITS = {
    "reg": stat.S_IFREG,
    "hardlink": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT
_TIMEOUT = 3600.0  # the tree never changes: let the kernel cache entries and attributes
_P = ParamSpec("_P")
_T = TypeVar("_T")


def raw_name(name: str) -> bytes:
    """The bytes of a name as the tar held them (the index decodes with surrogateescape)."""
    return name.encode("utf-8", "surrogateescape")


def text_name(raw: bytes) -> str:
    """A name from the kernel as the index spells it (the inverse of ``raw_name``)."""
    return raw.decode("utf-8", "surrogateescape")


def _answers_eio(op: Callable[_P, Awaitable[_T]]) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """pyfuse3 replies only for ``FUSEError``: any other exception ends the worker task without
    a reply and the calling process waits forever (D state). Log it and answer EIO instead."""

    @functools.wraps(op)
    async def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await op(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            log.error("%s failed: %s: %s; answering EIO", op.__name__, type(e).__name__, e)
            log.debug("%s failed", op.__name__, exc_info=True)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return guarded


class ImageFS(pyfuse3.Operations):
    """The merged tree at the root or, with ``per_layer``, one directory per layer
    (``0``, ``1``, ...) in overlayfs form, for a snapshotter to stack with overlay mounts."""

    def __init__(self, image: AcceleratedImage, per_layer: bool = False) -> None:
        super().__init__()
        self.image = image
        if per_layer:
            root = Node(Entry(name="", type="dir", mode=0o555), -1)
            self._views = [MergedView.overlay_layer(i, layer.index.entries) for i, layer in enumerate(image.layers)]
            root.children = {str(i): view.root for i, view in enumerate(self._views)}
        else:
            root = image.view.root
            self._views = []
        # Inode numbers are given out as the kernel first meets a node (an image of 35000
        # entries mounts without a walk of its tree); a hardlink shares its target's number.
        self._nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: root}
        self._inos: dict[int, int] = {id(root): pyfuse3.ROOT_INODE}  # id(node) -> inode
        self._next_ino = pyfuse3.ROOT_INODE + 1
        self._listings: dict[int, list[tuple[bytes, Node]]] = {}
        self._attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self._broken: set[int] = set()  # inodes whose bytes cannot be found (logged once each)
        self._links: dict[int, int] = {}  # inode -> names beyond the first (hardlinks sharing it)
        for n, layer in enumerate(image.layers):
            for e in layer.index.entries:
                if e.type == "hardlink" and (path := normalize_path(e.name)) is not None:
                    node = self._view(n).find(path)
                    if node is not None and node.entry is e:  # still visible in the tree
                        ino = self._ino(node)
                        if self._nodes[ino] is not node:
                            self._links[ino] = self._links.get(ino, 0) + 1

    def _view(self, layer: int) -> MergedView:
        """The tree a node of ``layer`` belongs to (hardlink targets are looked up there)."""
        return self._views[layer] if self._views else self.image.view

    def _ino(self, node: Node) -> int:
        """The inode number of ``node``, given out on first use."""
        ino = self._inos.get(id(node))
        if ino is not None:
            return ino
        if node.entry.type == "hardlink":
            target = self._link_target(node)
            if target is not None:
                ino = self._inos[id(node)] = self._ino(target)  # a regular file: no further hop
                return ino
        ino = self._next_ino
        self._next_ino += 1
        self._nodes[ino] = node
        self._inos[id(node)] = ino
        return ino

    def _link_target(self, node: Node) -> Node | None:
        """The visible node of the regular file a hardlink names, if it still shows that file
        (so both names share one inode); None for a broken link or a target replaced since."""
        view = self._view(node.layer)
        try:
            entry = view.data_entry(node)
        except PathError:
            return None
        path = normalize_path(entry.name)
        found = view.find(path) if path is not None else None
        return found if found is not None and found is not node and found.entry is entry else None

    def _listing(self, inode: int) -> list[tuple[bytes, Node]]:
        listing = self._listings.get(inode)
        if listing is None:
            node = self._node(inode)
            if node.entry.type != "dir":
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            listing = self._listings[inode] = sorted((raw_name(k), v) for k, v in node.children.items())
        return listing

    def _node(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    @_answers_eio
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        attrs = self._attrs.get(inode)
        if attrs is None:  # the tree never changes: built once per inode
            if inode in self._broken:
                raise pyfuse3.FUSEError(errno.EIO)
            try:
                attrs = self._attrs[inode] = self._make_attrs(inode)
            except BrokenHardlink as e:
                self._broken.add(inode)
                layer = self.image.layers[e.layer].blob_digest if 0 <= e.layer < len(self.image.layers) else "?"
                log.error("layer %d (%s): entry %r: hardlink target %r %s; it answers EIO",
                          e.layer, layer, e.entry.name, e.entry.linkname, e.reason)  # fmt: skip
                raise pyfuse3.FUSEError(errno.EIO) from None
        return attrs

    def _make_attrs(self, inode: int, broken: bool = False) -> pyfuse3.EntryAttributes:
        """The attributes of ``inode``; ``broken``: an entry with no bytes, listed by readdir
        with nothing cached (the kernel looks it up again, and gets EIO)."""
        node = self._node(inode)
        e = node.entry
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.st_mode = _TYPE_BITS[e.type] | (e.mode & 0o7777)
        if e.type == "dir":
            attrs.st_nlink = 2 + sum(1 for c in node.children.values() if c.entry.type == "dir")
        else:
            attrs.st_nlink = 1 + self._links.get(inode, 0)
        attrs.st_uid, attrs.st_gid = e.uid, e.gid
        if e.type in ("reg", "hardlink") and not broken:
            attrs.st_size = self._view(node.layer).data_entry(node).size
        elif e.type == "symlink":
            attrs.st_size = len(raw_name(e.linkname))
        elif e.type == "dir":
            attrs.st_size = 4096
        if e.type in ("char", "block"):
            attrs.st_rdev = os.makedev(e.devmajor, e.devminor)
        ns = int(e.mtime * 1e9)
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = ns
        attrs.st_blksize = 4096
        attrs.st_blocks = (attrs.st_size + 511) // 512
        attrs.entry_timeout = attrs.attr_timeout = 0 if broken else _TIMEOUT
        return attrs

    @_answers_eio
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if parent.entry.type != "dir":
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        child = parent.children.get(text_name(name))
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(self._ino(child))

    @_answers_eio
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if self._node(inode).entry.type != "dir":
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_answers_eio
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._listing(fh)
        for i, (name, node) in enumerate(entries[start_id:], start_id):
            ino = self._ino(node)
            try:
                attrs = await self.getattr(ino)
            except pyfuse3.FUSEError as e:
                if e.errno != errno.EIO:
                    raise
                attrs = self._make_attrs(ino, broken=True)  # listed; a stat of it gets EIO
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                break

    @_answers_eio
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        e = self._node(inode).entry
        if e.type != "symlink":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return raw_name(e.linkname)

    @_answers_eio
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        if self._node(inode).entry.type not in ("reg", "hardlink"):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if inode in self._broken:
            raise pyfuse3.FUSEError(errno.EIO)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @_answers_eio
    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._node(fh)
        try:
            return await self.image.read_node(node, off, size)
        except ChunkReadError as e:
            log.error("read of inode %d failed (registry %s): %s", fh, self.image.ref.registry, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except PathError as e:
            log.error("read of inode %d: %s", fh, e)
            raise pyfuse3.FUSEError(errno.EIO) from None

    @_answers_eio
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self._node(inode).entry.xattrs.get(text_name(name))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return base64.b64decode(value)

    @_answers_eio
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [raw_name(k) for k in self._node(inode).entry.xattrs]

    @_answers_eio
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_blocks = sum(layer.index.uncompressed_size for layer in self.image.layers) // 4096
        st.f_files = sum(len(layer.index.entries) for layer in self.image.layers)
        st.f_namemax = 255
        return st


def _use_ready_fd_fast_path() -> None:
    """pyfuse3's asyncio mode waits for each FUSE request by registering the device fd with
    the event loop and removing it again (two ``epoll_ctl`` calls and a loop wake-up). When the
    kernel has already queued the next request, a zero-timeout ``poll`` says so at once: the
    waiter just yields to the loop and goes on. Start-up reads of thousands of small files
    went 20% faster (see the README's start-up benchmark). pyfuse3 looks the function up on
    its asyncio shim module at every call, so replacing it there is enough; a pyfuse3
    without that shim keeps its own."""
    shim = pyfuse3.asyncio
    slow = getattr(shim, "wait_readable", None)
    if slow is None or getattr(slow, "imgaccel_fast_path", False):
        return
    pollers: dict[int, select.poll] = {}

    async def wait_readable(fd: int) -> None:
        poller = pollers.get(fd)
        if poller is None:
            poller = pollers[fd] = select.poll()
            poller.register(fd, select.POLLIN)
        if poller.poll(0):
            await asyncio.sleep(0)  # still a scheduling point, as the slow path is
            return
        await slow(fd)

    wait_readable.imgaccel_fast_path = True  # type: ignore[attr-defined]
    shim.wait_readable = wait_readable


async def serve_mount(
    image: AcceleratedImage, mountpoint: str, ready: Callable[[], None] | None = None, per_layer: bool = False
) -> None:
    """Mount ``image`` read-only at ``mountpoint`` until unmounted or signalled."""
    pyfuse3.asyncio.enable()
    _use_ready_fd_fast_path()
    fs = ImageFS(image, per_layer)
    options = set(pyfuse3.default_options)
    options |= {"ro", "fsname=imgaccel", "subtype=imgaccel", "default_permissions"}
    if os.geteuid() == 0:
        options.add("allow_other")  # a container's processes run as other users
    pyfuse3.init(fs, mountpoint, options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, pyfuse3.terminate)
    if ready:
        ready()
    try:
        await pyfuse3.main()
    finally:
        pyfuse3.close(unmount=True)
