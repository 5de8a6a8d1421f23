"""Open an accelerated image reference as a readable merged filesystem.

``open_image`` finds, for the wanted platform, each layer's index: index-only images through
the artifact manifest in the ``_accelerated`` index (or the source manifest's referrers), full
images through the TOC that each layer's annotations locate and pin by digest. Only indexes
and the chunks a read needs are fetched. Manifests and index-only index blobs come from the
client; byte ranges of layer blobs (full-mode TOCs, chunks) from ``fetcher`` when one is given
(the node daemon's cache nodes: ``snapshotter.cache_nodes``), else from the client too.
"""

from __future__ import annotations

import asyncio
import hashlib
import platform as host_platform
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import cached_property

from imgaccel.formats import layer_index as li
from imgaccel.formats import oci, toc
from imgaccel.pusher.client import Manifest, RegistryClient
from imgaccel.pusher.reference import ImageRef
from imgaccel.reader.chunk_cache import ChunkCache
from imgaccel.reader.layer_reader import FetchSlots, LayerReader, RangeFetcher
from imgaccel.reader.merged_view import MergedView, Node, PathError

MAX_INDEX_BLOB = 256 << 20
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


class ImageOpenError(Exception):
    """The reference is not a readable accelerated image; the message says why."""


def host_platform_label() -> str:
    machine = host_platform.machine()
    return f"linux/{_ARCH.get(machine, machine)}"


@dataclass(frozen=True)
class IndexRange:
    blob: str  # the blob holding the index
    offset: int
    length: int
    digest: str  # sha256 of those bytes (the blob's own digest for a whole index blob)


def index_ranges(descriptors: list[oci.Descriptor]) -> list[IndexRange]:
    """The TOC ranges of full-mode layers and the index blobs among ``descriptors``."""
    out = []
    for d in descriptors:
        ann = d.annotations or {}
        if li.ANN_TOC_DIGEST in ann:
            off, size = int(ann[li.ANN_TOC_OFFSET]), int(ann[li.ANN_TOC_SIZE])
            out.append(IndexRange(d.digest, off, size, ann[li.ANN_TOC_DIGEST]))
        elif d.mediaType == li.INDEX_BLOB_MEDIA_TYPE:
            out.append(IndexRange(d.digest, 0, d.size, d.digest))
    return out


@dataclass
class AcceleratedImage:
    ref: ImageRef
    top_digest: str  # what ``ref`` points to (index or manifest): profiles attach here
    top_media_type: str
    top_size: int
    mode: str
    manifest_digest: str  # the platform manifest the layers belong to
    source_digest: str | None
    layers: list[LayerReader]
    layer_digests: list[str]  # the platform manifest's layers, in order: what a runtime pulls
    # Where the layers' indexes are: full-mode TOCs (ranges of the layer blobs) and index blobs
    # (whole blobs). A prewarm fetches these with the chunks.
    index_ranges: list[IndexRange] = field(default_factory=list)

    @cached_property
    def view(self) -> MergedView:
        """The layers merged as a runtime would see them (built on first use: the node daemon,
        which lets the kernel merge, never pays for it)."""
        return MergedView([layer.index.entries for layer in self.layers])

    def stat(self, path: str, follow: bool = False) -> Node:
        return self.view.lookup(path, follow)[1]

    def listdir(self, path: str) -> list[str]:
        _, node = self.view.lookup(path, True)
        if node.entry.type != "dir":
            raise PathError(f"{path}: not a directory")
        return sorted(node.children)

    async def read_node(self, node: Node, offset: int = 0, length: int | None = None) -> bytes:
        entry = self.view.data_entry(node)
        layer = self.layers[node.layer]  # a hardlink's bytes are at its target, in the same layer
        size = entry.size
        end = size if length is None else min(size, offset + length)
        if offset >= end:
            return b""
        return await layer.read(entry.offset + offset, end - offset, entry.offset + size)

    async def read_file(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        _, node = self.view.lookup(path, True)
        return await self.read_node(node, offset, length)

    async def iter_file(self, path: str, block: int = 4 << 20) -> AsyncIterator[bytes]:
        _, node = self.view.lookup(path, True)
        size = self.view.data_entry(node).size
        for off in range(0, size, block):
            yield await self.read_node(node, off, block)

    def bytes_fetched(self) -> int:
        return sum(layer.stats.bytes_fetched for layer in self.layers)


def _platform_ok(p: oci.Platform | None, wanted: str) -> bool:
    if p is None or p.os == "unknown":
        return False
    return wanted in (p.label(), f"{p.os}/{p.architecture}")


async def _pick_platform(client: RegistryClient, ref: ImageRef, index: oci.ImageIndex, wanted: str) -> Manifest:
    for desc in index.manifests:
        if _platform_ok(desc.platform, wanted):
            return await client.get_manifest(ref.repository, desc.digest)
    have = sorted({d.platform.label() for d in index.manifests if d.platform and d.platform.os != "unknown"})
    raise ImageOpenError(f"{ref}: no manifest for platform {wanted} (available: {', '.join(have) or 'none'})")


async def _index_artifact(
    client: RegistryClient, ref: ImageRef, manifest: Manifest, candidates: list[oci.Descriptor]
) -> oci.ImageManifest | None:
    for desc in candidates:
        if desc.artifactType != li.INDEX_ARTIFACT_TYPE:
            continue
        m = await client.get_manifest(ref.repository, desc.digest)
        art = oci.ImageManifest.model_validate_json(m.data)
        if art.subject is not None and art.subject.digest == manifest.digest:
            return art
    return None


async def _read_toc(
    client: RegistryClient, repo: str, layer: oci.Descriptor, fetcher: RangeFetcher | None = None
) -> li.LayerIndex:
    ann = layer.annotations or {}
    what = f"{client.registry}/{repo}@{layer.digest}"
    try:
        off, size, digest = int(ann[li.ANN_TOC_OFFSET]), int(ann[li.ANN_TOC_SIZE]), ann[li.ANN_TOC_DIGEST]
    except (KeyError, ValueError):
        raise ImageOpenError(f"{what}: layer has no imgaccel TOC annotations") from None
    if off < 0 or size <= 0 or off + size > layer.size:
        raise ImageOpenError(f"{what}: TOC annotations point outside the blob")
    # Listed as a chunk with its digest: a cache node verifies and keeps the TOC alone, and
    # does not start filling the whole blob for it.
    chunk = [(off, size, digest)]
    for fresh in (False, True):  # asked once more on a mismatch: of the registry itself (``fresh``)
        (data,) = await (fetcher or client).fetch_ranges(
            repo, layer.digest, [(off, off + size)], fresh=fresh, chunks=chunk
        )
        if "sha256:" + hashlib.sha256(data).hexdigest() == digest:
            break
    else:
        raise ImageOpenError(f"{what}: TOC bytes do not match their digest {digest}")
    try:
        index = li.decode_index_json(toc.parse_skippable_frame(data, toc.TOC_MAGIC))
    except ValueError as e:
        raise ImageOpenError(f"{what}: invalid TOC: {e}") from e
    index.blob_digest = layer.digest
    return index


async def _read_index_blob(fetcher: RangeFetcher, repo: str, desc: oci.Descriptor, what: str) -> bytes:
    """An index blob, read like chunks are (through cache nodes, if any) and digest-checked."""
    if not 0 < desc.size <= MAX_INDEX_BLOB:
        raise ImageOpenError(f"{what}: index {desc.digest} has size {desc.size} (at most {MAX_INDEX_BLOB})")
    whole = [(0, desc.size, desc.digest)]
    for fresh in (False, True):  # asked once more on a mismatch: of the registry itself (``fresh``)
        (data,) = await fetcher.fetch_ranges(repo, desc.digest, [(0, desc.size)], fresh=fresh, chunks=whole)
        if oci.digest_of(data, desc.digest) == desc.digest:
            return data
    raise ImageOpenError(f"{what}: index {desc.digest}: the bytes do not match the digest")


async def _full_layers(
    client: RegistryClient,
    ref: ImageRef,
    manifest: oci.ImageManifest,
    cache: ChunkCache | None,
    slots: FetchSlots,
    fetcher: RangeFetcher,
) -> list[LayerReader]:
    indexes = await asyncio.gather(*(_read_toc(client, ref.repository, layer, fetcher) for layer in manifest.layers))
    return [
        _toc_reader(fetcher, ref, layer, index, cache, slots)
        for layer, index in zip(manifest.layers, indexes, strict=True)
    ]


def _toc_reader(
    fetcher: RangeFetcher,
    ref: ImageRef,
    layer: oci.Descriptor,
    index: li.LayerIndex,
    cache: ChunkCache | None,
    slots: FetchSlots,
) -> LayerReader:
    toc_size = int((layer.annotations or {})[li.ANN_TOC_SIZE])
    return LayerReader(
        fetcher,
        ref.repository,
        layer.digest,
        index,
        blob_size=layer.size,
        index_size=toc_size,
        disk_cache=cache,
        slots=slots,
    )


async def _index_layers(
    client: RegistryClient,
    ref: ImageRef,
    source: oci.ImageManifest,
    artifact: oci.ImageManifest,
    cache: ChunkCache | None,
    slots: FetchSlots,
    fetcher: RangeFetcher,
) -> list[LayerReader]:
    by_source = {(d.annotations or {}).get(li.ANN_LAYER_DIGEST): d for d in artifact.layers}

    async def reader(layer: oci.Descriptor) -> LayerReader:
        desc = by_source.get(layer.digest)
        what = f"{client.registry}/{ref.repository}@{layer.digest}"
        if desc is None:
            raise ImageOpenError(f"{what}: the index artifact has no index for this layer")
        if desc.mediaType != li.INDEX_BLOB_MEDIA_TYPE:  # a full-mode copy (--fallback full)
            index = await _read_toc(client, ref.repository, desc, fetcher)
            return _toc_reader(fetcher, ref, desc, index, cache, slots)
        blob = await _read_index_blob(fetcher, ref.repository, desc, what)
        try:
            index, windows = li.decode_index_blob(blob)
        except li.IndexFormatError as e:
            raise ImageOpenError(f"{what}: invalid index {desc.digest}: {e}") from e
        if index.blob_digest != layer.digest or index.blob_size != layer.size:
            raise ImageOpenError(f"{what}: index {desc.digest} describes another blob ({index.blob_digest})")
        return LayerReader(
            fetcher,
            ref.repository,
            layer.digest,
            index,
            windows,
            blob_size=layer.size,
            index_size=desc.size,
            disk_cache=cache,
            slots=slots,
        )

    return list(await asyncio.gather(*(reader(layer) for layer in source.layers)))


async def open_image(
    client: RegistryClient,
    ref: ImageRef,
    platform: str | None = None,
    cache: ChunkCache | None = None,
    slots: FetchSlots | None = None,
    fetcher: RangeFetcher | None = None,
) -> AcceleratedImage:
    """Open ``ref`` (an ``_accelerated`` or ``_containerd_accelerated`` image, or a source
    image with an index attached as a referrer) for lazy reading. ``slots`` bounds the Range
    requests all its layers have in flight. ``fetcher`` (default: ``client``) answers the
    byte-range reads of layer blobs: full-mode TOCs and every chunk."""
    slots = slots or FetchSlots()
    fetcher = fetcher or client
    wanted = platform or host_platform_label()
    top = await client.get_manifest(ref.repository, ref.reference)
    candidates: list[oci.Descriptor] = []
    if top.media_type in oci.INDEX_TYPES:
        index = oci.ImageIndex.model_validate_json(top.data)
        manifest = await _pick_platform(client, ref, index, wanted)
        candidates = index.manifests
    elif top.media_type in oci.MANIFEST_TYPES:
        manifest = top
    else:
        raise ImageOpenError(f"{ref}: unsupported manifest media type {top.media_type!r}")
    parsed = oci.ImageManifest.model_validate_json(manifest.data)
    ann = parsed.annotations or {}
    if ann.get(li.ANN_MODE) == "full":
        layers = await _full_layers(client, ref, parsed, cache, slots, fetcher)
        mode, source = "full", ann.get(li.ANN_SOURCE_DIGEST)
        ranges = index_ranges(parsed.layers)
    else:
        artifact = await _index_artifact(client, ref, manifest, candidates)
        if artifact is None:
            artifact = await _index_artifact(
                client, ref, manifest, await client.referrers(ref.repository, manifest.digest)
            )
        if artifact is None:
            raise ImageOpenError(f"{ref}: not an accelerated image (no imgaccel index for {manifest.digest})")
        layers = await _index_layers(client, ref, parsed, artifact, cache, slots, fetcher)
        mode, source = "index", manifest.digest
        ranges = index_ranges(artifact.layers)
    digests = [layer.digest for layer in parsed.layers]
    return AcceleratedImage(
        ref, top.digest, top.media_type, len(top.data), mode, manifest.digest, source, layers, digests, ranges
    )
