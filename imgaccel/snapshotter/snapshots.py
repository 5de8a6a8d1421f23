"""Snapshots on disk with containerd's overlayfs-snapshotter semantics, and remote layers.

``Snapshotter`` owns ``<root>/snapshots/<id>/{fs,work}`` and turns the records of the metadata
store (``metadata.py``) into what containerd mounts:

- no parents: a bind mount of the snapshot's own ``fs`` (``rw``; ``ro`` for a view);
- a view of exactly one layer: a read-only bind mount of that layer's ``fs``;
- otherwise overlayfs: ``lowerdir=`` the parents' trees nearest first, plus ``upperdir=`` /
  ``workdir=`` for an active snapshot (a view has lowers only).

A **remote layer** is a committed snapshot whose tree is a directory someone else provides
(lazily, e.g. EROFS over FUSE). When Prepare carries ``containerd.io/snapshot.ref`` (the chain ID
the layer will be committed as) and a ``RemoteLayers`` hook is installed, the hook is asked for
that directory; if it gives one, the snapshot is committed under the target name with that
directory as its tree and Prepare fails with ``AlreadyExists``, which tells containerd the layer
is there and must not be downloaded. If the hook declines or fails, Prepare goes on normally
and containerd pulls and unpacks the layer itself.

Metadata calls run on one dedicated thread (the SQLite store is not thread-safe, and this keeps
them ordered); directory creation happens inside the same transaction so a crash leaves at most
an orphan directory, which ``cleanup`` removes. Tree walks (usage) and deletions run on worker
threads so the event loop keeps answering.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from .metadata import AlreadyExists, FailedPrecondition, Info, Kind, MetadataStore, Snapshot, SnapshotError, Usage

log = logging.getLogger(__name__)

LABEL_TARGET = "containerd.io/snapshot.ref"  # the name (chain ID) a prepared layer will be committed as
LABEL_REMOTE = "containerd.io/snapshot/remote"  # set on snapshots served by a remote layer
REMOTE_MARK = "imgaccel"
_OVERLAY_INDEX = Path("/sys/module/overlay/parameters/index")

T = TypeVar("T")


@dataclass(frozen=True)
class Mount:
    """One mount containerd performs (``containerd.types.Mount``)."""

    type: str
    source: str
    options: tuple[str, ...]
    target: str = ""


class RemoteLayers(Protocol):
    """Serves image layers lazily as read-only directory trees (the node daemon's lazy mounts)."""

    async def start(self, served: Sequence[Snapshot]) -> None:
        """Called once before the daemon serves: ``served`` are the remote snapshots the store
        knows (a restarted daemon's), whose directories the hook must serve again."""
        ...

    async def close(self) -> None:
        """The daemon stops; mounts that running containers use must stay."""
        ...

    async def prepare(self, namespace: str, key: str, parent: str | None, labels: dict[str, str]) -> str | None:
        """Make the layer that ``labels`` name available lazily; return the directory holding its
        read-only tree (used as that snapshot's fs / lowerdir), or None to let containerd pull and
        unpack it normally (log why). ``key`` is the active key containerd asked for (it is never
        created when a directory is returned); ``labels[LABEL_TARGET]`` is the committed name the
        layer will have; ``parent`` is the committed parent's name. Raising is treated like None.
        The directory must be absolute and free of ``:`` and ``,`` (overlayfs option syntax).
        ``namespace`` is the containerd namespace pulling (gRPC metadata, else the key's prefix)."""
        ...

    async def remove(self, namespace: str, name: str, directory: str) -> None:
        """The snapshot ``name`` that ``prepare`` served from ``directory`` was removed: release it.
        ``namespace`` is the snapshotter namespace it lived in: "" under containerd 1.x, which sends
        none, so one remote layer serves every containerd namespace that pulls it."""
        ...


class Snapshotter:
    """The snapshotter's operations, each one containerd Snapshots RPC (namespaced, async)."""

    def __init__(self, root: Path, remote: RemoteLayers | None = None) -> None:
        self.root = root
        self.snapshots_dir = root / "snapshots"
        self.snapshots_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.remote = remote
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="imgaccel-metadata")
        self.store = self._pool.submit(MetadataStore, root / "metadata.db").result()
        self._targets: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()
        self._overlay_options = ("index=off",) if _OVERLAY_INDEX.exists() else ()

    async def close(self) -> None:
        await self._db(self.store.close)
        self._pool.shutdown()

    async def _db(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    # -- paths and mounts ------------------------------------------------------------------

    def fs_dir(self, snap: Snapshot) -> str:
        """The directory holding ``snap``'s own tree (a remote layer's directory for remote layers)."""
        return snap.remote_dir or str(self.snapshots_dir / snap.id / "fs")

    def work_dir(self, snap: Snapshot) -> str:
        return str(self.snapshots_dir / snap.id / "work")

    def _mounts(self, snap: Snapshot, parents: Sequence[Snapshot]) -> list[Mount]:
        kind = snap.info.kind
        if not parents:
            return [Mount("bind", self.fs_dir(snap), ("ro" if kind == Kind.VIEW else "rw", "rbind"))]
        options: list[str] = []
        if kind == Kind.ACTIVE:
            options += [f"workdir={self.work_dir(snap)}", f"upperdir={self.fs_dir(snap)}"]
        elif len(parents) == 1:
            return [Mount("bind", self.fs_dir(parents[0]), ("ro", "rbind"))]
        options.append("lowerdir=" + ":".join(self.fs_dir(p) for p in parents))
        options += self._overlay_options
        return [Mount("overlay", "overlay", tuple(options))]

    def _mounts_sync(self, namespace: str, key: str) -> list[Mount]:
        snap = self.store.get(namespace, key)
        if snap.info.kind not in (Kind.ACTIVE, Kind.VIEW):
            raise FailedPrecondition(f"snapshot {key!r} is not active or view")
        return self._mounts(snap, self.store.parents(snap))

    # -- creating ----------------------------------------------------------------------------

    def _create_sync(self, namespace: str, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        with self.store.transaction():
            snap = self.store.create(namespace, kind, key, parent, labels)
            parents = self.store.parents(snap)
            tmp = Path(tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir))
            try:
                (tmp / "fs").mkdir(0o755)
                if kind == Kind.ACTIVE:
                    (tmp / "work").mkdir(0o711)
                if parents:  # the new upper dir takes the owner of the tree below it, as containerd does
                    st = os.stat(self.fs_dir(parents[0]))
                    os.lchown(tmp / "fs", st.st_uid, st.st_gid)
                tmp.rename(self.snapshots_dir / snap.id)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return self._mounts(snap, parents)

    async def prepare(self, namespace: str, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """An active snapshot ``key`` on ``parent``; AlreadyExists when a remote layer now stands in."""
        target = labels.get(LABEL_TARGET)
        if target and self.remote is not None:
            await self._try_remote(namespace, key, parent, dict(labels), target)
        return await self._db(self._create_sync, namespace, Kind.ACTIVE, key, parent, labels)

    async def view(self, namespace: str, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return await self._db(self._create_sync, namespace, Kind.VIEW, key, parent, labels)

    async def _try_remote(self, namespace: str, key: str, parent: str, labels: dict[str, str], target: str) -> None:
        """Commit ``target`` as a remote layer and raise AlreadyExists, or return to prepare normally."""
        assert self.remote is not None
        lock = self._targets.setdefault((namespace, target), asyncio.Lock())
        async with lock:  # one lookup per layer, however many pulls ask at once
            existing = await self._db(self.store.find, namespace, target)
            if existing is not None:
                if existing.info.kind == Kind.COMMITTED and existing.info.parent == parent:
                    raise AlreadyExists(f"target snapshot {target!r} already exists")
                log.info("prepare %s: %r exists but is not the committed layer asked for; unpacking", key, target)
                return
            if parent:
                p = await self._db(self.store.find, namespace, parent)
                if p is None or p.info.kind != Kind.COMMITTED:
                    return  # the normal path reports the bad parent
            try:
                directory = await self.remote.prepare(_namespace_of(namespace, key), key, parent or None, dict(labels))
            except Exception as e:
                log.warning("layer %s: lazy mount failed, containerd will pull it: %s: %s", target, type(e).__name__, e)
                log.debug("lazy mount failure", exc_info=True)
                return
            if directory is None:
                log.info("layer %s: no lazy mount offered, containerd will pull it", target)
                return
            problem = _layer_dir_problem(directory)
            if problem is None:
                try:
                    await self._db(
                        self.store.create_committed,
                        namespace,
                        target,
                        parent,
                        {**labels, LABEL_REMOTE: REMOTE_MARK},
                        directory,
                    )
                except SnapshotError as e:
                    problem = str(e)
            if problem is not None:
                log.warning("layer %s: lazy mount %s unusable (%s), pulling instead", target, directory, problem)
                await self._release(namespace, target, directory)
                return
            log.info("layer %s: served lazily from %s", target, directory)
            raise AlreadyExists(f"target snapshot {target!r} already exists")

    async def _release(self, namespace: str, name: str, directory: str) -> None:
        if self.remote is None:
            log.warning("snapshot %s: no remote-layer hook to release %s", name, directory)
            return
        try:
            await self.remote.remove(namespace, name, directory)
        except Exception as e:
            log.warning("snapshot %s: releasing lazy mount %s failed: %s: %s", name, directory, type(e).__name__, e)

    # -- the other calls -----------------------------------------------------------------------

    async def mounts(self, namespace: str, key: str) -> list[Mount]:
        return await self._db(self._mounts_sync, namespace, key)

    async def commit(self, namespace: str, name: str, key: str, labels: Mapping[str, str], parent: str = "") -> None:
        snap = await self._db(self.store.get, namespace, key)
        usage = Usage()
        if snap.info.kind == Kind.ACTIVE:  # else the store reports the right error
            usage = await asyncio.to_thread(disk_usage, Path(self.fs_dir(snap)))
        await self._db(self.store.commit, namespace, key, name, labels, usage, parent)

    async def remove(self, namespace: str, key: str) -> None:
        snap = await self._db(self.store.remove, namespace, key)
        if snap.remote_dir:
            await self._release(namespace, snap.info.name, snap.remote_dir)
        await asyncio.to_thread(shutil.rmtree, self.snapshots_dir / snap.id, True)

    async def stat(self, namespace: str, key: str) -> Info:
        return (await self._db(self.store.get, namespace, key)).info

    async def update(self, namespace: str, name: str, labels: Mapping[str, str], fieldpaths: Sequence[str]) -> Info:
        return (await self._db(self.store.update, namespace, name, labels, fieldpaths)).info

    async def walk(self, namespace: str, filters: Sequence[str]) -> list[Info]:
        return [s.info for s in await self._db(self.store.walk, namespace, filters)]

    async def usage(self, namespace: str, key: str) -> Usage:
        snap = await self._db(self.store.get, namespace, key)
        if snap.info.kind == Kind.ACTIVE:
            return await asyncio.to_thread(disk_usage, Path(self.fs_dir(snap)))
        return snap.usage

    def _unowned_sync(self) -> list[Path]:
        owned = self.store.ids()
        return [p for p in self.snapshots_dir.iterdir() if p.name not in owned]

    async def cleanup(self) -> None:
        """Remove every directory under ``snapshots/`` that no snapshot owns (crash leftovers)."""
        for path in await self._db(self._unowned_sync):
            log.info("cleanup: removing %s (no snapshot owns it)", path)
            await asyncio.to_thread(shutil.rmtree, path, True)

    async def remote_snapshots(self) -> list[Snapshot]:
        return [s for s in await self._db(self.store.all) if s.remote_dir]

    async def check_remote_dirs(self) -> list[Snapshot]:
        """Remote snapshots whose directory is gone (after a reboot, say): containers on them fail."""
        snaps = await self._db(self.store.all)
        return [s for s in snaps if s.remote_dir and not os.path.isdir(s.remote_dir)]


def _namespace_of(namespace: str, key: str) -> str:
    """The containerd namespace behind a call: sent in gRPC metadata, or the prefix of the key
    (containerd 1.x names backend snapshots ``<namespace>/<n>/<key>`` and sends no metadata)."""
    if namespace:
        return namespace
    head, sep, _ = key.partition("/")
    return head if sep else ""


def _layer_dir_problem(directory: str) -> str | None:
    if not os.path.isabs(directory):
        return "not an absolute path"
    if ":" in directory or "," in directory:
        return "':' or ',' cannot appear in an overlayfs lowerdir"
    if not os.path.isdir(directory):
        return "not a directory"
    return None


def disk_usage(path: Path) -> Usage:
    """Bytes allocated and inodes used under ``path`` (hardlinked inodes counted once)."""
    seen: set[tuple[int, int]] = set()
    size = 0

    def add(p: str) -> None:
        nonlocal size
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return
        ident = (st.st_dev, st.st_ino)
        if ident not in seen:
            seen.add(ident)
            size += st.st_blocks * 512

    add(str(path))
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            add(os.path.join(dirpath, name))
    return Usage(size=size, inodes=len(seen))
