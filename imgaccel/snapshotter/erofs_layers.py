"""Lazy layers through the kernel: the ``RemoteLayers`` the node daemon uses.

For each layer a Prepare names (``lazy_layers.layer_target``), ``ErofsLayers``:

1. opens the layer's verified index (``lazy_layers.LazyImages``: a full-mode TOC or the
   index-only artifact), and builds from it, once, an EROFS metadata image
   (``formats.erofs``) whose regular files point into device 1 = the layer's uncompressed tar;
2. serves that tar as one read-only file on the daemon's FUSE mount (``blob_fs.BlobFS``),
   every byte read through the verified ``LayerReader`` (chunk cache, Range requests);
3. mounts the EROFS image (``kernel_path.mount_layer``: file-backed, or on loop devices for
   kernels before 6.12; off the event loop: the kernel reads through the FUSE file while
   mounting) with ``device=`` that file, and returns the mount point.

The kernel then answers lookups, stat and readdir from the EROFS image, and caches file pages;
only data reads reach Python, as READs of the tar. Kernels without 512-byte-block EROFS get
a FUSE tree process per layer instead (``kernel_path``, "fuse" mode). Once the image's warm-up
(``image_warmup``) has cached every chunk, each layer is written out as a local tar checked
against its diff_id; its FUSE file reads from it, and later mounts use it as ``device=``.
``describe`` reports all of it for ``imgaccel node status``. Layout under ``<root>/lazy``::

    blobs/                  the BlobFS mount: one file per layer, named by the layer digest's hex
    blobfs/                 BlobFS state (node ids) and its holder process's socket
    layers/<hex>/meta-vN.erofs  the metadata image (a function of the verified index and the
                            writer's version N alone)
    layers/<hex>/layer.tar  the layer's verified local copy, once fully fetched
    layers/<hex>/fs         its mount point: the directory a Prepare gets, the overlay lowerdir

One layer digest is one mount, however many snapshots (chains, namespaces) use it; it is
unmounted when the last is removed. A restarted daemon re-serves every remote snapshot it
knows (``start``): mounts left by the previous daemon stay; only their sources are re-added.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path

from imgaccel.formats.erofs import WRITER_VERSION, build_erofs_image
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.reference import ImageRef
from imgaccel.reader.accelerated_image import AcceleratedImage, open_image
from imgaccel.reader.chunk_cache import ChunkCache
from imgaccel.reader.layer_reader import FetchSlots, LayerReader
from imgaccel.snapshotter import fuse_holder, kernel_path
from imgaccel.snapshotter.blob_fs import BlobFS, FsStats
from imgaccel.snapshotter.cache_nodes import CacheNodes
from imgaccel.snapshotter.config import NodeConfig
from imgaccel.snapshotter.image_warmup import WarmUp
from imgaccel.snapshotter.keychain import Keychain
from imgaccel.snapshotter.lazy_layers import (
    SNAPSHOT_REF,
    LayerTar,
    LayerTarget,
    LazyImages,
    NoLazyForm,
    layer_target,
    write_local_tar,
)
from imgaccel.snapshotter.metadata import Snapshot
from imgaccel.snapshotter.mounts import is_mountpoint, mount_at, mounts, umount_or_detach
from imgaccel.snapshotter.prewarm_agent import PrewarmAgent, chunk_cache_stats
from imgaccel.snapshotter.status import FuseStatus, ImageStatus, LayerStatus, RemoteStatus

log = logging.getLogger(__name__)
LOCAL_TAR = "layer.tar"  # a layer's verified local copy, next to its metadata image
# Verified chunk-cache entries kept in memory: the kernel caches the pages it read, so this
# only spares a re-hash while a read of one chunk arrives as several FUSE READs.
CHUNK_CACHE_MEMORY = 8 << 20


class ErofsLayers:
    """The node daemon's ``RemoteLayers``: lazy layers as EROFS mounts over FUSE-served tars."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.base = config.root / "lazy"
        self.blobs: BlobFS | None = None
        self.kernel_path: str = config.kernel_path  # "auto" until start() settles it
        self._clients: dict[str, RegistryClient] = {}
        self._stack = AsyncExitStack()
        self._client_lock = asyncio.Lock()
        self.keychain: Keychain | None = None  # credentials of CRI pulls (the daemon's, with its CRI proxy)
        self.cache = cache = ChunkCache(config.cache_dir, memory=CHUNK_CACHE_MEMORY)
        self.cache_nodes = CacheNodes.from_config(config)  # blob bytes come through them first (None: none)
        if self.cache_nodes is not None:
            self._stack.push_async_callback(self.cache_nodes.close)
        self.images = LazyImages(self._client, cache, warm_up=warm_up_policy(config),
                                 on_complete=self._write_local_layers,
                                 fetcher_for=self.cache_nodes.fetcher if self.cache_nodes else None)  # fmt: skip
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._users: defaultdict[str, set[str]] = defaultdict(set)  # layer hex -> snapshot names
        self._restoring: list[asyncio.Task[None]] = []
        self.fallbacks: Counter[str] = Counter()  # why Prepares were left to containerd's pull
        self.prewarm: PrewarmAgent | None = None
        if config.prewarm is not None:
            self.prewarm = PrewarmAgent(config.prewarm, self._open_for_prewarm, self._client,
                                        partial(chunk_cache_stats, cache))  # fmt: skip

    # -- lifecycle (called by the daemon) ------------------------------------------------------

    async def start(self, served: Sequence[Snapshot]) -> None:
        """Settle how layers reach the kernel (``config.kernel_path``; "auto": probed), attach
        to (or mount) the FUSE data mount, then re-serve the remote snapshots a previous daemon
        left: their mounts stay, their tar sources come back (a "fuse" mode layer's tree
        process outlives the daemon: it is kept)."""
        # Not ``blobs``: it may be the FUSE mount, which nobody serves until we attach; stat
        # of it (as Path.mkdir(exist_ok=True) does) would wait for ourselves. attach makes it.
        for d in ("blobfs", "layers"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        if self.config.kernel_path == "auto":
            self.kernel_path, why = await asyncio.to_thread(kernel_path.probe, self.base / "probe")
        else:
            self.kernel_path, why = self.config.kernel_path, "set in the node configuration"
        log.info("kernel path: %s (%s)", self.kernel_path, why)
        # "fuse" mode serves no tar: the data mount is needed only for EROFS layers an earlier
        # daemon (in another mode) left mounted.
        layers = os.path.realpath(self.base / "layers") + "/"
        erofs_left = any(m.fstype == "erofs" and m.mountpoint.startswith(layers) for m in mounts())
        if self.kernel_path != "fuse" or erofs_left:
            self.blobs = await BlobFS.open(self.base / "blobs", self.base / "blobfs")
        # In the background: BlobFS holds the kernel's READs of a known file until its source
        # is added again, so the daemon need not wait for the registry before serving.
        self._restoring = [asyncio.create_task(self._restore(s)) for s in served if s.remote_dir]
        if self.prewarm is not None:
            self.prewarm.start()

    async def _open_for_prewarm(self, ref: ImageRef, platform: str) -> AcceleratedImage:
        """``ref`` opened as a pull opens it (cache nodes, chunk cache), for a prewarm assignment."""
        client = await self._client(ref.registry)
        fetcher = self.cache_nodes.fetcher(client) if self.cache_nodes is not None else None
        return await open_image(client, ref, platform, self.cache, FetchSlots(), fetcher)

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
        if self.prewarm is not None:
            await self.prewarm.close()
        self.images.close()
        if self.blobs is not None:
            log.info("FUSE requests served: %s", fuse_summary(self.blobs.stats))
            await self.blobs.close()
        await self._stack.aclose()

    async def _client(self, registry: str) -> RegistryClient:
        """The registry's client. Credentials: the Docker config's, if it has some; else the
        newest a CRI pull brought (``keychain``), which a client made before they arrived takes
        up too (and keeps after they expire there: the images it opened are still read)."""
        async with self._client_lock:
            pulled = self.keychain.get(registry) if self.keychain is not None else None
            if registry not in self._clients:
                client = RegistryClient(
                    registry,
                    plain_http=self.config.use_plain_http(registry),
                    credentials=self.config.credentials(registry) or pulled,
                    docker_config=False,  # (the node config's docker_config was read just above)
                )
                self._clients[registry] = await self._stack.enter_async_context(client)
            elif (
                pulled is not None
                and pulled != self._clients[registry].credentials
                and self.config.credentials(registry) is None  # the Docker config's still win
            ):
                self._clients[registry].set_credentials(pulled)
                log.info("registry %s: using the credentials of a newer CRI pull", registry)
            return self._clients[registry]

    # -- RemoteLayers ----------------------------------------------------------------------

    async def prepare(self, namespace: str, key: str, parent: str | None, labels: dict[str, str]) -> str | None:
        name = labels.get(SNAPSHOT_REF, key)
        try:
            target = layer_target(labels)
            reader = await self.images.layer(target)
        except NoLazyForm as e:
            log.info("%s: no lazy form, containerd pulls it: %s", name, e)
            self.fallbacks[_reason(e)] += 1
            return None
        return await self._serve(name, target, reader)

    async def _serve(self, name: str, target: LayerTarget, reader: LayerReader) -> str:
        """Mount the layer at ``layers/<hex>/fs`` (in every mode) unless it is mounted there;
        a mount an earlier daemon left keeps its kind (EROFS: its tar source comes back; a
        FUSE tree: its process is kept while alive)."""
        layer_digest = target.layer_digest
        hexd = layer_digest.split(":", 1)[1]
        layer_dir = self.base / "layers" / hexd
        fs = layer_dir / "fs"
        async with self._locks[hexd]:
            here = mount_at(fs)
            tree = here.fstype.startswith("fuse") if here is not None else self.kernel_path == "fuse"
            if tree:
                if here is None or kernel_path.layer_tree_pid(layer_dir) is None:
                    client = await self._client(target.image.registry)
                    source = kernel_path.LayerTreeSource(
                        ref=str(target.image), registry=target.image.registry, layer_digest=layer_digest,
                        cache_dir=self.config.cache_dir, plain_http=client.base_url.startswith("http:"),
                        credentials=client.credentials,
                    )  # fmt: skip
                    started = await asyncio.to_thread(kernel_path.serve_layer_tree, source, layer_dir)
                    how = "a new FUSE tree process" if started else "its running FUSE tree process"
                    log.info("layer %s served lazily by %s at %s", layer_digest, how, fs)
            else:
                assert self.blobs is not None, "start() first"
                # A layer written out whole (``_write_local_layers``) is read from that copy: by
                # EROFS directly when mounted now, else through its FUSE file.
                local = self.local_tar(layer_digest)
                local_ok = self.config.local_layers and local.exists()
                tar = LayerTar(reader, target.image.registry, local=local if local_ok else None)
                blob = await self.blobs.add(hexd, tar)
                if here is None:
                    meta = layer_dir / f"meta-v{WRITER_VERSION}.erofs"
                    fs.mkdir(parents=True, exist_ok=True)
                    if not meta.exists():
                        await asyncio.to_thread(write_erofs_image, reader, meta)
                    device = local if local_ok else blob
                    await asyncio.to_thread(kernel_path.mount_layer, self.kernel_path, meta, device, fs)
                    how = "from its local copy" if local_ok else "lazily"
                    log.info("layer %s mounted %s at %s (%s)", layer_digest, how, fs, self.kernel_path)
            self._users[hexd].add(name)
        return str(fs)

    async def remove(self, namespace: str, name: str, directory: str) -> None:
        hexd = Path(directory).parent.name
        async with self._locks[hexd]:
            self._users[hexd].discard(name)
            if self._users[hexd]:
                return
            del self._users[hexd]
            # A FUSE tree ("fuse" mode): its bind mount, process and tree mount. EROFS: the
            # mount (on loop devices, they detach themselves as it goes).
            await asyncio.to_thread(kernel_path.stop_layer_tree, Path(directory).parent)
            if is_mountpoint(directory):
                await asyncio.to_thread(umount_or_detach, directory)
            if self.blobs is not None and hexd in self.blobs.names():
                await self.blobs.remove(hexd)
            self.images.release(f"sha256:{hexd}")
            # The local copy goes with the layer: removing an image frees its disk space (the
            # chunk cache, bounded, still holds its chunks for a later pull).
            local = self.local_tar(f"sha256:{hexd}")
            local.unlink(missing_ok=True)
            local.with_name(local.name + ".tmp").unlink(missing_ok=True)
            log.info("layer sha256:%s released", hexd)

    # -- warm-up results and status ----------------------------------------------------------

    def local_tar(self, layer_digest: str) -> Path:
        """Where the layer's verified local copy lives once every chunk of it is cached."""
        return self.base / "layers" / layer_digest.split(":", 1)[1] / LOCAL_TAR

    async def _write_local_layers(self, image: AcceleratedImage) -> None:
        """Every chunk of ``image`` is cached: write each mounted layer out as a local tar
        (``config.local_layers``); its FUSE file then reads from it, and later mounts point
        EROFS's ``device=`` at it, so the layer no longer goes through FUSE or the chunk cache."""
        if not self.config.local_layers or self.kernel_path == "fuse":
            return  # (FUSE tree processes read the chunk cache, which the fetch filled)
        for digest, reader in zip(image.layer_digests, image.layers, strict=True):
            path = self.local_tar(digest)
            path.parent.mkdir(parents=True, exist_ok=True)  # (the pull may not have mounted it yet)
            if not path.exists():
                t0 = time.monotonic()
                await write_local_tar(reader, path)
                log.info("layer %s: written out as %s (%.1f s); reads no longer go through the registry",
                         digest, path, time.monotonic() - t0)  # fmt: skip
            hexd = digest.split(":", 1)[1]
            source = self.blobs.source(hexd) if self.blobs is not None else None
            if isinstance(source, LayerTar):
                source.local = path
            reader.drop_memory_cache()  # reads of the layer come from the local copy now

    def describe(self) -> RemoteStatus:
        """The lazy side of ``imgaccel node status``."""
        images, layers, seen = [], [], set()
        for opened in self.images.opened():
            image = opened.image
            images.append(ImageStatus(
                ref=str(image.ref), manifest=image.manifest_digest, mode=image.mode, layers=len(image.layers),
                profile=opened.warm_up.profile, recording=opened.warm_up.recording,
                background_fetch=opened.warm_up.background_fetch,
            ))  # fmt: skip
            for digest, reader in zip(image.layer_digests, image.layers, strict=True):
                hexd = digest.split(":", 1)[1]
                if hexd in seen or hexd not in self._users:
                    continue
                seen.add(hexd)
                layers.append(LayerStatus(
                    digest=digest, image=str(image.ref), mode=image.mode,
                    source="local" if self.local_tar(digest).exists() else "fuse",
                    size=reader.index.uncompressed_size, chunks=len(reader.index.chunks),
                    chunks_cached=sum(1 for p in range(len(reader.index.chunks)) if reader.is_cached(p)),
                    bytes_fetched=reader.stats.bytes_fetched, requests=reader.stats.requests,
                    verification_failures=reader.stats.verification_failures, snapshots=len(self._users[hexd]),
                ))  # fmt: skip
        fuse = None
        if self.blobs is not None:
            st = self.blobs.stats
            fuse = FuseStatus(requests=dict(st.requests), read_bytes=st.read_bytes, read_errors=st.read_errors,
                              resent=st.resent, read_sizes=read_size_histogram(st))  # fmt: skip
        return RemoteStatus(
            kernel_path=getattr(self, "kernel_path", "file"),
            images=images,
            layers=layers,
            fuse=fuse,
            counters=dataclasses.asdict(self.images.counters),
            fallbacks=dict(self.fallbacks),
            cache_nodes=self.cache_nodes.status() if self.cache_nodes is not None else [],
            prewarm=self.prewarm.describe() if self.prewarm is not None else None,
        )


def warm_up_policy(config: NodeConfig) -> WarmUp:
    return WarmUp(
        profile_label=config.profile_label,
        record_profiles=config.record_profiles,
        record_seconds=config.record_seconds,
        background_fetch=config.background_fetch,
    )


def _reason(e: NoLazyForm) -> str:
    """A decline's reason without what differs between layers and images (for counting)."""
    return re.sub(r"sha256:[0-9a-f]{64}", "sha256:…", str(e))[:200]


async def unmount_all(root: Path) -> list[str]:
    """Take down what ``ErofsLayers`` left mounted under ``root`` (the daemon stopped, no
    container uses them): abort the FUSE connection (reads still waiting for a server fail),
    end every layer's FUSE tree process ("fuse" mode) with its mounts, unmount every EROFS
    layer (loop devices detach themselves), then the FUSE data mount and its holder. Returns
    the mount points it unmounted."""
    base = root / "lazy"
    layers = os.path.realpath(base / "layers") + "/"
    done = []
    await asyncio.to_thread(fuse_holder.abort_connection, base / "blobs")  # pending reads fail now
    for pid_file in sorted((base / "layers").glob(f"*/{kernel_path.TREE_PID}")):
        done += await asyncio.to_thread(kernel_path.stop_layer_tree, pid_file.parent)
    for mp in sorted((m.mountpoint for m in mounts() if m.mountpoint.startswith(layers)), reverse=True):
        await asyncio.to_thread(umount_or_detach, mp)
        done.append(mp)
    if (base / "blobfs").is_dir():
        await fuse_holder.unmount(base / "blobs", base / "blobfs")
        done.append(str(base / "blobs"))
    return done


def read_size_histogram(stats: FsStats) -> str:
    """READs by requested size, in power-of-two buckets: ``<=4KiB:3 <=128KiB:40``."""
    buckets: Counter[int] = Counter()
    for size, n in stats.read_sizes.items():
        buckets[1 << max(size - 1, 0).bit_length()] += n
    return " ".join(f"<={b // 1024}KiB:{n}" for b, n in sorted(buckets.items()))


def fuse_summary(stats: FsStats) -> str:
    """One line: requests by opcode, then READs by size (power-of-two buckets) and bytes."""
    ops = " ".join(f"{op}={n}" for op, n in sorted(stats.requests.items()))
    sizes = read_size_histogram(stats)
    return f"{ops}; READ sizes {sizes}; {stats.read_bytes} bytes read, {stats.read_errors} errors"


def write_erofs_image(reader: LayerReader, path: Path) -> None:
    """Write the EROFS metadata image of ``reader``'s layer to ``path`` (atomically, read-only),
    logging what the image cannot represent."""
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
