"""Which layer a containerd Prepare names, and its lazy form: a verified reader of its tar.

containerd passes the image and layer in Prepare labels, and who sets them decides the names:

* the CRI plugin (kubelet pulls; ``disable_snapshot_annotations = false``):
  ``containerd.io/snapshot/cri.image-ref``, ``cri.manifest-digest``, ``cri.layer-digest``;
* ``ctr-remote image rpull`` (Debian's stargz-snapshotter):
  ``containerd.io/snapshot/remote/stargz.reference``, ``stargz.digest`` (the layer).

``layer_target`` reads either into a ``LayerTarget``. ``LazyImages`` opens each image once
(``reader.accelerated_image.open_image``: a full-mode manifest's TOCs, or the index-only
artifact attached to the manifest as a referrer or in the ``_accelerated`` index) and keeps it
per manifest, so every layer of a pull costs no more registry round trips than the first,
and while any of its layers is mounted. When it first opens an image it starts the image's
warm-up in the background (``image_warmup``: replay or record the hot-chunk profile, fetch the
rest), so the chunks a start-up reads are on their way before the container asks for them.
``LayerTar`` exposes one layer's uncompressed tar, read through the verified ``LayerReader``,
as the ``size`` + ``read`` source the FUSE data server serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
from bisect import bisect_right
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.errors import RegistryError
from imgaccel.pusher.reference import ImageRef, ReferenceError, parse_reference
from imgaccel.reader.accelerated_image import AcceleratedImage, ImageOpenError, open_image
from imgaccel.reader.chunk_cache import ChunkCache
from imgaccel.reader.layer_reader import FetchSlots, LayerReader, RangeFetcher
from imgaccel.snapshotter.image_warmup import WarmUp, WarmUpCounters, WarmUpState, warm_up
from imgaccel.snapshotter.memory import release_free_memory

log = logging.getLogger(__name__)
ClientFactory = Callable[[str], Awaitable[RegistryClient]]  # registry host -> its client
FetcherFactory = Callable[[RegistryClient], RangeFetcher]  # a registry's client -> what reads its blobs' bytes
READER_MEMORY_CACHE = 4 << 20  # decoded bytes each layer reader keeps in memory

SNAPSHOT_REF = "containerd.io/snapshot.ref"
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_MANIFEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_LAYER = "containerd.io/snapshot/cri.layer-digest"
STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_LAYER = "containerd.io/snapshot/remote/stargz.digest"


class NoLazyForm(Exception):
    """The layer cannot be served lazily (no labels, no accelerated form, registry trouble):
    the caller lets containerd pull it; the message says why, in one line."""


@dataclass(frozen=True)
class LayerTarget:
    image: ImageRef  # pinned to the manifest digest when the labels give it
    layer_digest: str


def layer_target(labels: dict[str, str]) -> LayerTarget:
    """The image and layer a Prepare's labels name; ``NoLazyForm`` when they name none."""
    if CRI_IMAGE_REF in labels and CRI_LAYER in labels:
        ref_text, layer, manifest = labels[CRI_IMAGE_REF], labels[CRI_LAYER], labels.get(CRI_MANIFEST)
    elif STARGZ_REFERENCE in labels and STARGZ_LAYER in labels:
        ref_text, layer, manifest = labels[STARGZ_REFERENCE], labels[STARGZ_LAYER], None
    else:
        raise NoLazyForm("the Prepare labels name no image layer (a plain pull)")
    try:
        ref = parse_reference(ref_text)
        if manifest:
            ref = ref.with_digest(manifest)
        ImageRef(ref.registry, ref.repository, digest=layer)  # validates the layer digest
    except ReferenceError as e:
        raise NoLazyForm(f"unusable image labels: {e}") from None
    return LayerTarget(ref, layer)


@dataclass
class OpenImage:
    """An image the daemon opened, with its warm-up."""

    image: AcceleratedImage
    warm_up: WarmUpState
    task: asyncio.Task[None] | None = None


class LazyImages:
    """Accelerated images opened once per (registry, repository, reference), shared by every
    layer Prepare of a pull. ``client_for(registry)`` gives the registry client to use, and
    ``fetcher_for(client)``, when given, what layer readers fetch blob bytes through (cache nodes).

    An image stays open while any of its layers is in use (``layer`` marks one, ``release``
    unmarks it); when none is, it is closed and its warm-up stopped, so a node's memory follows
    the images it runs, not every image it ever pulled."""

    def __init__(
        self,
        client_for: ClientFactory,
        cache: ChunkCache | None = None,
        slots: FetchSlots | None = None,
        platform: str | None = None,
        warm_up: WarmUp | None = None,
        on_complete: Callable[[AcceleratedImage], Awaitable[None]] | None = None,
        fetcher_for: FetcherFactory | None = None,
    ) -> None:
        self._client_for = client_for
        self._fetcher_for = fetcher_for
        self._cache = cache
        self._slots = slots or FetchSlots()
        self._platform = platform
        self.policy = warm_up or WarmUp()
        self._on_complete = on_complete
        self.counters = WarmUpCounters()
        self._images: dict[ImageRef, asyncio.Task[OpenImage]] = {}
        self._in_use: set[str] = set()  # layer digests mounted for some snapshot

    async def layer(self, target: LayerTarget) -> LayerReader:
        opened = await self._open(target.image)
        for digest, reader in zip(opened.image.layer_digests, opened.image.layers, strict=True):
            if digest == target.layer_digest:
                self._in_use.add(digest)
                return reader
        raise NoLazyForm(f"{target.image}: the image has no layer {target.layer_digest}")

    def opened(self) -> list[OpenImage]:
        """The images open now (for ``node status``)."""
        return [t.result() for t in self._images.values() if _opened(t)]

    def release(self, layer_digest: str) -> None:
        """The layer is no longer mounted: close every open image none of whose layers is."""
        self._in_use.discard(layer_digest)
        for ref, task in list(self._images.items()):
            if not task.done():
                continue
            opened = task.result() if _opened(task) else None
            if opened is None or not self._in_use.intersection(opened.image.layer_digests):
                del self._images[ref]
                if opened is not None:
                    self._stop(opened)
                    log.info("%s: closed (no layer of it is mounted)", ref)
                    release_free_memory()

    async def _open(self, ref: ImageRef) -> OpenImage:
        task = self._images.get(ref)
        if task is None or (task.done() and not _opened(task)):
            task = asyncio.ensure_future(self._open_once(ref))
            self._images[ref] = task
        try:
            return await asyncio.shield(task)
        except (ImageOpenError, RegistryError, ValueError) as e:
            raise NoLazyForm(str(e)) from None

    async def _open_once(self, ref: ImageRef) -> OpenImage:
        client = await self._client_for(ref.registry)
        fetcher = self._fetcher_for(client) if self._fetcher_for is not None else None
        image = await open_image(client, ref, self._platform, self._cache, self._slots, fetcher)
        for reader in image.layers:
            # The kernel caches file pages and the chunk cache holds every chunk: a small
            # in-memory cache (partly read chunks, neighbours of a read) is all that pays here.
            reader.memory_cache = READER_MEMORY_CACHE
        opened = OpenImage(image, WarmUpState())
        opened.task = asyncio.create_task(
            warm_up(client, image, self.policy, self.counters, opened.warm_up, self._on_complete)
        )
        opened.task.add_done_callback(lambda _: release_free_memory())  # its buffers are garbage now
        return opened

    @staticmethod
    def _stop(opened: OpenImage) -> None:
        if opened.task is not None:
            opened.task.cancel()

    def close(self) -> None:
        for task in self._images.values():
            if _opened(task):
                self._stop(task.result())
            else:
                task.cancel()


def _opened(task: asyncio.Task[OpenImage]) -> bool:
    """The image task finished with an image (not failed, not cancelled)."""
    return task.done() and not task.cancelled() and task.exception() is None


@dataclass
class LayerTar:
    """One layer's uncompressed tar as a read-only byte source (``BlobSource``): every byte
    comes through the ``LayerReader``, which verifies each chunk before returning it, or, once
    the daemon has written the whole layer out and checked it against its diff_id, from that
    local file (``local``). A read that fails (a chunk failing verification twice, a registry
    outage) raises EIO with a message naming the registry, the layer and the chunk, which the
    FUSE server logs."""

    reader: LayerReader
    registry: str
    local: Path | None = None  # the verified local copy, once it exists
    # Where each regular file's data lies in the tar (starts, ends; sorted), built at the first
    # read: the kernel reads a file as consecutive reads of this tar, and readahead must stop
    # at the end of that file, not run on into the next files (which no profile names).
    _files: tuple[list[int], list[int]] | None = field(default=None, init=False, repr=False)

    @property
    def size(self) -> int:
        return self.reader.index.uncompressed_size

    def data_end(self, offset: int, size: int) -> int:
        """Where readahead of a read at ``offset`` stops: the end of the data of the file the
        read is in, or the end of the read itself outside any file's data (headers, padding)."""
        if self._files is None:
            spans = sorted(
                (e.offset, e.offset + e.size) for e in self.reader.index.entries if e.type == "reg" and e.size
            )
            self._files = ([a for a, _ in spans], [b for _, b in spans])
        starts, ends = self._files
        i = bisect_right(starts, offset) - 1
        return ends[i] if i >= 0 and offset < ends[i] else offset + size

    async def read(self, offset: int, size: int) -> bytes:
        if offset >= self.size:
            return b""
        size = min(size, self.size - offset)
        if self.local is not None:
            try:
                data = await asyncio.to_thread(_pread, self.local, offset, size)
                self.reader.note_read(offset, size)  # a profile being recorded still sees it
                return data
            except OSError as e:
                log.warning("layer %s: local copy %s unusable (%s); reading through the registry again",
                            self.reader.blob_digest, self.local, e)  # fmt: skip
                self.local = None
        try:
            return await self.reader.read(offset, size, self.data_end(offset, size))
        except Exception as e:
            raise OSError(errno.EIO, f"registry {self.registry}: {e}") from e


def _pread(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise OSError(errno.EIO, f"{len(data)} of {size} bytes at {offset}: the file is shorter than the layer")
    return data


async def write_local_tar(reader: LayerReader, path: Path, piece: int = 4 << 20) -> None:
    """Write the layer's whole uncompressed tar to ``path`` (atomically: a temporary file,
    fsync, rename) from the verified reader, and check its sha256 against the index's diff_id;
    on a mismatch nothing is left behind and ``OSError`` says so."""
    size = reader.index.uncompressed_size
    tmp = path.with_name(path.name + ".tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for offset in range(0, size, piece):
                data = await reader.read(offset, min(piece, size - offset), record=False)
                await asyncio.to_thread(_write_and_hash, f, digest, data)
            await asyncio.to_thread(os.fsync, f.fileno())
        got = "sha256:" + digest.hexdigest()
        if got != reader.index.diff_id:
            raise OSError(errno.EIO, f"layer {reader.blob_digest}: local copy hashes to {got}, "
                                     f"its diff_id is {reader.index.diff_id}")  # fmt: skip
        os.chmod(tmp, 0o444)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _write_and_hash(f: BinaryIO, digest: hashlib._Hash, data: bytes) -> None:
    digest.update(data)
    f.write(data)
