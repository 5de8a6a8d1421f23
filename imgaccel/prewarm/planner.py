"""Plan a prewarm task before a byte moves: for each image, the blobs (``full``) or the hot
chunks of its profile (``hot``) with their sizes, and what each target receives.

``full`` works for any image (its config and layers, plus the indexes of an accelerated one);
``hot`` needs an accelerated image with a profile for the task's label: its chunks are the
profile's (whole chunks, so cache nodes can verify and keep them) plus every layer's index,
which a node reads before any chunk. Cache-node targets each receive the blobs rendezvous
hashing gives them; node targets each receive everything.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from imgaccel.formats import layer_index as li
from imgaccel.formats import oci
from imgaccel.formats.prewarm import BlobPlan, ChunkRange, ImagePlan, Mode, Plan
from imgaccel.formats.rendezvous import rendezvous_order
from imgaccel.pusher.client import Manifest, RegistryClient
from imgaccel.pusher.errors import RegistryError
from imgaccel.pusher.reference import ImageRef
from imgaccel.reader.accelerated_image import AcceleratedImage, ImageOpenError, open_image
from imgaccel.reader.profiles import find_profile

log = logging.getLogger(__name__)


class PlanError(Exception):
    """An image cannot be planned (not found, no profile for the label, ...); one line."""


async def plan_image(client: RegistryClient, ref: ImageRef, reference: str, mode: Mode, label: str,
                     platform: str, need_accelerated: bool) -> ImagePlan:  # fmt: skip
    """The plan of one image. ``need_accelerated``: node targets, which open the image lazily."""
    try:
        top = await client.get_manifest(ref.repository, ref.reference)
        pinned = ref.with_digest(top.digest)
        image: AcceleratedImage | None = None
        if mode == "hot" or need_accelerated:
            image = await open_image(client, pinned, platform)
        if mode == "hot":
            assert image is not None
            blobs, chunks = await _hot_blobs(client, image, label, reference)
            manifest = image.manifest_digest
        else:
            manifest, blobs = await _full_blobs(client, pinned, top, platform, image)
            chunks = 0
    except ImageOpenError as e:
        raise PlanError(f"{reference}: {e}") from None
    except RegistryError as e:
        raise PlanError(f"{reference}: {e}") from None
    return ImagePlan(reference=reference, registry=ref.registry, repository=ref.repository, top_digest=top.digest,
                     manifest=manifest, mode=mode, profile_chunks=chunks, blobs=blobs)  # fmt: skip


async def _hot_blobs(
    client: RegistryClient, image: AcceleratedImage, label: str, reference: str
) -> tuple[list[BlobPlan], int]:
    profile = await find_profile(client, image, label)
    if profile is None:
        raise PlanError(
            f"{reference}: no profile labelled {label!r} for platform manifest {image.manifest_digest} "
            "(record one: node daemons with record_profiles, or a conversion rule with 'profile:')"
        )
    ranges: dict[str, set[tuple[int, int, str | None]]] = {}
    sizes: dict[str, int] = {}
    for r in image.index_ranges:
        ranges.setdefault(r.blob, set()).add((r.offset, r.length, r.digest))
    for reader, digest in zip(image.layers, image.layer_digests, strict=True):
        sizes[digest] = reader.blob_size
    stale = 0
    for item in profile.chunks:
        if item.layer >= len(image.layers) or item.chunk >= len(image.layers[item.layer].index.chunks):
            stale += 1
            continue
        c = image.layers[item.layer].index.chunks[item.chunk]
        if c.digest != item.digest:
            stale += 1
            continue
        ranges.setdefault(image.layer_digests[item.layer], set()).add(
            (c.c_offset, c.c_size, getattr(c, "c_digest", None))
        )
    if stale:
        log.warning("%s: profile %s: %d stale chunks skipped", reference, label, stale)
    blobs = []
    for blob, spans in ranges.items():
        chunks = [ChunkRange(offset=o, length=n, digest=d) for o, n, d in sorted(spans)]
        size = sizes.get(blob) or max(c.offset + c.length for c in chunks)
        blobs.append(BlobPlan(digest=blob, size=size, bytes=sum(c.length for c in chunks), chunks=chunks))
    return blobs, len(profile.chunks) - stale


async def _full_blobs(
    client: RegistryClient, ref: ImageRef, top: Manifest, platform: str, image: AcceleratedImage | None
) -> tuple[str, list[BlobPlan]]:
    """The platform manifest's config and layers, and the index blobs of an index-mode
    accelerated image (found through its referrers: no blob is read to plan)."""
    manifest = top
    if top.media_type in oci.INDEX_TYPES:
        if image is not None:
            manifest = await client.get_manifest(ref.repository, image.manifest_digest)
        else:
            manifest = await _platform_manifest(client, ref, oci.ImageIndex.model_validate_json(top.data), platform)
    parsed = oci.ImageManifest.model_validate_json(manifest.data)
    blobs = {d.digest: BlobPlan(digest=d.digest, size=d.size, bytes=d.size) for d in (parsed.config, *parsed.layers)}
    # An index-mode image lists its index artifact in its image index, or has it as a referrer.
    listed = oci.ImageIndex.model_validate_json(top.data).manifests if top.media_type in oci.INDEX_TYPES else []
    candidates = [d for d in listed if d.artifactType == li.INDEX_ARTIFACT_TYPE]
    if not candidates:
        candidates = [d for d in await client.referrers(ref.repository, manifest.digest)
                      if d.artifactType == li.INDEX_ARTIFACT_TYPE]  # fmt: skip
    for desc in candidates:
        artifact = oci.ImageManifest.model_validate_json((await client.get_manifest(ref.repository, desc.digest)).data)
        if artifact.subject is not None and artifact.subject.digest == manifest.digest:
            for d in artifact.layers:
                blobs.setdefault(d.digest, BlobPlan(digest=d.digest, size=d.size, bytes=d.size))
            break
    return manifest.digest, list(blobs.values())


async def _platform_manifest(client: RegistryClient, ref: ImageRef, index: oci.ImageIndex,
                             platform: str) -> Manifest:  # fmt: skip
    for desc in index.manifests:
        p = desc.platform
        if p is not None and p.label() == platform:
            return await client.get_manifest(ref.repository, desc.digest)
    have = sorted({d.platform.label() for d in index.manifests if d.platform and d.platform.os != "unknown"})
    raise PlanError(f"{ref}: no manifest for platform {platform} (available: {', '.join(have) or 'none'})")


def share_of(address: str, addresses: Sequence[str], blob: str) -> bool:
    """Whether ``blob`` is ``address``'s to hold among ``addresses`` (rendezvous hashing)."""
    return rendezvous_order(addresses, blob)[0] == address


def summarize(images: list[ImagePlan], targets: list[str], kind: str, quota: int) -> Plan:
    """The task's plan: per target bytes and the total the quota is checked against."""
    if kind == "cachenode":
        per = {t: 0 for t in targets}
        for image in images:
            for blob in image.blobs:
                if targets:
                    per[rendezvous_order(targets, blob.digest)[0]] += blob.bytes
        total = sum(per.values())
        biggest = max(per.values(), default=0)
    else:
        each = sum(i.bytes for i in images)
        total, biggest = each * len(targets), each
    return Plan(images=images, targets=targets, bytes_per_target=biggest, total_bytes=total, quota=quota)
