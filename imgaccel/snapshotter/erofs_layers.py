"""Lazy layers through the kernel: the ``RemoteLayers`` the node daemon uses.

For each layer a Prepare names (``lazy_layers.layer_target``), ``ErofsLayers``:

1. opens the layer's verified index (``lazy_layers.LazyImages``: a full-mode TOC or the
   index-only artifact), and builds from it, once, an EROFS metadata image
   (``formats.erofs``) whose regular files point into device 1 = the layer's uncompressed tar;
2. serves that tar as one read-only file on the daemon's FUSE mount (``blob_fs.BlobFS``),
   every byte read through the verified ``LayerReader`` (chunk cache, Range requests);
3. mounts the EROFS image file-backed (mount(2), off the event loop: the kernel reads through
   the FUSE file while mounting) with ``device=`` that file, and returns the mount point.

The kernel then answers lookups, stat and readdir from the EROFS image, and caches file pages;
only data reads reach Python, as READs of the tar. Layout under ``<root>/lazy``::

    blobs/                  the BlobFS mount: one file per layer, named by the layer digest's hex
    blobfs/                 BlobFS state (node ids) and its holder process's socket
    layers/<hex>/meta-vN.erofs  the metadata image (a function of the verified index and the
                            writer's version N alone)
    layers/<hex>/fs         its mount point: the directory a Prepare gets, the overlay lowerdir

One layer digest is one mount, however many snapshots (chains, namespaces) use it; it is
unmounted when the last is removed. A restarted daemon re-serves every remote snapshot it
knows (``start``): mounts left by the previous daemon stay; only their sources are re-added.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path

from imgaccel.formats.erofs import WRITER_VERSION, build_erofs_image
from imgaccel.pusher.client import RegistryClient
from imgaccel.reader.chunk_cache import ChunkCache
from imgaccel.reader.layer_reader import LayerReader
from imgaccel.snapshotter import fuse_holder
from imgaccel.snapshotter.blob_fs import BlobFS, FsStats
from imgaccel.snapshotter.config import NodeConfig
from imgaccel.snapshotter.lazy_layers import (
    SNAPSHOT_REF,
    LayerTar,
    LayerTarget,
    LazyImages,
    NoLazyForm,
    layer_target,
)
from imgaccel.snapshotter.metadata import Snapshot
from imgaccel.snapshotter.mounts import MS_NODEV, MS_RDONLY, is_mountpoint, mount, mounts, umount_or_detach

log = logging.getLogger(__name__)


class ErofsLayers:
    """The node daemon's ``RemoteLayers``: lazy layers as EROFS mounts over FUSE-served tars."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.base = config.root / "lazy"
        self.blobs: BlobFS | None = None
        self._clients: dict[str, RegistryClient] = {}
        self._stack = AsyncExitStack()
        self._client_lock = asyncio.Lock()
        self.images = LazyImages(self._client, ChunkCache(config.cache_dir), profile_label=config.profile_label)
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._users: defaultdict[str, set[str]] = defaultdict(set)  # layer hex -> snapshot names
        self._restoring: list[asyncio.Task[None]] = []

    # -- lifecycle (called by the daemon) ------------------------------------------------------

    async def start(self, served: Sequence[Snapshot]) -> None:
        """Attach to (or mount) the FUSE data mount, then re-serve the remote snapshots a
        previous daemon left: their EROFS mounts stay, their tar sources come back."""
        # Not ``blobs``: it may be the FUSE mount, which nobody serves until we attach; stat
        # of it (as Path.mkdir(exist_ok=True) does) would wait for ourselves. attach makes it.
        for d in ("blobfs", "layers"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        self.blobs = await BlobFS.open(self.base / "blobs", self.base / "blobfs")
        # In the background: BlobFS holds the kernel's READs of a known file until its source
        # is added again, so the daemon need not wait for the registry before serving.
        self._restoring = [asyncio.create_task(self._restore(s)) for s in served if s.remote_dir]

    async def _restore(self, snap: Snapshot) -> None:
        try:
            target = layer_target(snap.info.labels)
            await self._serve(snap.info.name, target, await self.images.layer(target))
            log.info("re-served remote snapshot %s (layer %s)", snap.info.name, target.layer_digest)
        except (NoLazyForm, OSError) as e:
            log.error("remote snapshot %s cannot be served again: %s", snap.info.name, e)

    async def close(self) -> None:
        """Stop serving; the FUSE and EROFS mounts stay for the next daemon."""
        for task in self._restoring:
            task.cancel()
        self.images.close()
        if self.blobs is not None:
            log.info("FUSE requests served: %s", fuse_summary(self.blobs.stats))
            await self.blobs.close()
        await self._stack.aclose()

    async def _client(self, registry: str) -> RegistryClient:
        async with self._client_lock:
            if registry not in self._clients:
                client = RegistryClient(
                    registry,
                    plain_http=self.config.use_plain_http(registry),
                    credentials=self.config.credentials(registry),
                )
                self._clients[registry] = await self._stack.enter_async_context(client)
            return self._clients[registry]

    # -- RemoteLayers ----------------------------------------------------------------------

    async def prepare(self, namespace: str, key: str, parent: str | None, labels: dict[str, str]) -> str | None:
        name = labels.get(SNAPSHOT_REF, key)
        try:
            target = layer_target(labels)
            reader = await self.images.layer(target)
        except NoLazyForm as e:
            log.info("%s: no lazy form, containerd pulls it: %s", name, e)
            return None
        return await self._serve(name, target, reader)

    async def _serve(self, name: str, target: LayerTarget, reader: LayerReader) -> str:
        assert self.blobs is not None, "start() first"
        layer_digest = target.layer_digest
        hexd = layer_digest.split(":", 1)[1]
        layer_dir = self.base / "layers" / hexd
        fs = layer_dir / "fs"
        async with self._locks[hexd]:
            blob = await self.blobs.add(hexd, LayerTar(reader, target.image.registry))
            if not is_mountpoint(fs):
                meta = layer_dir / f"meta-v{WRITER_VERSION}.erofs"
                fs.mkdir(parents=True, exist_ok=True)
                if not meta.exists():
                    await asyncio.to_thread(_write_image, reader, meta)
                await asyncio.to_thread(mount, meta, fs, "erofs", MS_RDONLY | MS_NODEV, f"device={blob}")
                log.info("layer %s mounted lazily at %s", layer_digest, fs)
            self._users[hexd].add(name)
        return str(fs)

    async def remove(self, namespace: str, name: str, directory: str) -> None:
        hexd = Path(directory).parent.name
        async with self._locks[hexd]:
            self._users[hexd].discard(name)
            if self._users[hexd]:
                return
            del self._users[hexd]
            if is_mountpoint(directory):
                await asyncio.to_thread(umount_or_detach, directory)
            if self.blobs is not None and hexd in self.blobs.names():
                await self.blobs.remove(hexd)
            log.info("layer sha256:%s released", hexd)


async def unmount_all(root: Path) -> list[str]:
    """Take down what ``ErofsLayers`` left mounted under ``root`` (the daemon stopped, no
    container uses them): abort the FUSE connection (reads still waiting for a server fail),
    unmount every EROFS layer, then the FUSE data mount and its holder. Returns the mount
    points it unmounted."""
    base = root / "lazy"
    layers = os.path.realpath(base / "layers") + "/"
    done = []
    await asyncio.to_thread(fuse_holder.abort_connection, base / "blobs")  # pending reads fail now
    for mp in sorted((m.mountpoint for m in mounts() if m.mountpoint.startswith(layers)), reverse=True):
        await asyncio.to_thread(umount_or_detach, mp)
        done.append(mp)
    if (base / "blobfs").is_dir():
        await fuse_holder.unmount(base / "blobs", base / "blobfs")
        done.append(str(base / "blobs"))
    return done


def fuse_summary(stats: FsStats) -> str:
    """One line: requests by opcode, then READs by size (power-of-two buckets) and bytes."""
    ops = " ".join(f"{op}={n}" for op, n in sorted(stats.requests.items()))
    buckets: Counter[int] = Counter()
    for size, n in stats.read_sizes.items():
        buckets[1 << max(size - 1, 0).bit_length()] += n
    sizes = " ".join(f"<={b // 1024}KiB:{n}" for b, n in sorted(buckets.items()))
    return f"{ops}; READ sizes {sizes}; {stats.read_bytes} bytes read, {stats.read_errors} errors"


def _write_image(reader: LayerReader, path: Path) -> None:
    image = build_erofs_image(reader.index)
    for warning in image.warnings:
        log.warning("layer %s: %s", reader.blob_digest, warning)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(image.data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o444)
