"""Which layer a containerd Prepare names, and its lazy form: a verified reader of its tar.

containerd passes the image and layer in Prepare labels, and who sets them decides the names:

* the CRI plugin (kubelet pulls; ``disable_snapshot_annotations = false``):
  ``containerd.io/snapshot/cri.image-ref``, ``cri.manifest-digest``, ``cri.layer-digest``;
* ``ctr-remote image rpull`` (Debian's stargz-snapshotter):
  ``containerd.io/snapshot/remote/stargz.reference``, ``stargz.digest`` (the layer).

``layer_target`` reads either into a ``LayerTarget``. ``LazyImages`` opens each image once
(``reader.accelerated_image.open_image``: a full-mode manifest's TOCs, or the index-only
artifact attached to the manifest as a referrer or in the ``_accelerated`` index) and keeps it
per manifest, so every layer of a pull costs no more registry round trips than the first.
When it first opens an image it also looks up the image's hot-chunk profile for the node's
label and replays it in the background (``reader.prefetch.replay_profile``), so the chunks a
start-up reads are on their way before the container asks for them.
``LayerTar`` exposes one layer's uncompressed tar, read through the verified ``LayerReader``,
as the ``size`` + ``read`` source the FUSE data server serves.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.errors import RegistryError
from imgaccel.pusher.reference import ImageRef, ReferenceError, parse_reference
from imgaccel.reader.accelerated_image import AcceleratedImage, ImageOpenError, open_image
from imgaccel.reader.chunk_cache import ChunkCache
from imgaccel.reader.layer_reader import FetchSlots, LayerReader
from imgaccel.reader.prefetch import replay_profile
from imgaccel.reader.profiles import find_profile

log = logging.getLogger(__name__)
ClientFactory = Callable[[str], Awaitable[RegistryClient]]  # registry host -> its client

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


class LazyImages:
    """Accelerated images opened once per (registry, repository, reference), shared by every
    layer Prepare of a pull. ``client_for(registry)`` gives the registry client to use."""

    def __init__(
        self,
        client_for: ClientFactory,
        cache: ChunkCache | None = None,
        slots: FetchSlots | None = None,
        platform: str | None = None,
        profile_label: str | None = None,
    ) -> None:
        self._client_for = client_for
        self._cache = cache
        self._slots = slots or FetchSlots()
        self._platform = platform
        self._profile_label = profile_label
        self._images: dict[ImageRef, asyncio.Task[AcceleratedImage]] = {}
        self._replays: set[asyncio.Task[None]] = set()

    async def layer(self, target: LayerTarget) -> LayerReader:
        image = await self._open(target.image)
        for digest, reader in zip(image.layer_digests, image.layers, strict=True):
            if digest == target.layer_digest:
                return reader
        raise NoLazyForm(f"{target.image}: the image has no layer {target.layer_digest}")

    async def _open(self, ref: ImageRef) -> AcceleratedImage:
        task = self._images.get(ref)
        if task is None or (task.done() and task.exception() is not None):
            task = asyncio.ensure_future(self._open_once(ref))
            self._images[ref] = task
        try:
            return await asyncio.shield(task)
        except (ImageOpenError, RegistryError, ValueError) as e:
            raise NoLazyForm(str(e)) from None

    async def _open_once(self, ref: ImageRef) -> AcceleratedImage:
        client = await self._client_for(ref.registry)
        image = await open_image(client, ref, self._platform, self._cache, self._slots)
        if self._profile_label:
            task = asyncio.create_task(self._replay(client, image, self._profile_label))
            self._replays.add(task)
            task.add_done_callback(self._replays.discard)
        return image

    async def _replay(self, client: RegistryClient, image: AcceleratedImage, label: str) -> None:
        try:
            profile = await find_profile(client, image, label)
            if profile is None:
                log.info("%s: no %r profile to replay", image.ref, label)
                return
            t0 = time.monotonic()
            n = await replay_profile(image, profile)
            log.info("%s: replayed profile %r: %d chunks in %.2f s", image.ref, label, n, time.monotonic() - t0)
        except Exception as e:  # a profile only speeds things up: never fail a pull on it
            log.warning("%s: profile %r not replayed: %s", image.ref, label, e)

    def close(self) -> None:
        for task in self._replays:
            task.cancel()


@dataclass
class LayerTar:
    """One layer's uncompressed tar as a read-only byte source (``BlobSource``): every byte
    comes through the ``LayerReader``, which verifies each chunk before returning it. A read
    that fails (a chunk failing verification twice, a registry outage) raises EIO with a
    message naming the registry, the layer and the chunk, which the FUSE server logs."""

    reader: LayerReader
    registry: str

    @property
    def size(self) -> int:
        return self.reader.index.uncompressed_size

    async def read(self, offset: int, size: int) -> bytes:
        if offset >= self.size:
            return b""
        try:
            return await self.reader.read(offset, min(size, self.size - offset))
        except Exception as e:
            raise OSError(errno.EIO, f"registry {self.registry}: {e}") from e
