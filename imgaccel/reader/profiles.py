"""Record, publish and find hot-chunk profiles (``formats.profile``); ``prefetch`` replays them."""

from __future__ import annotations

import logging

from imgaccel.formats import oci
from imgaccel.formats.profile import (
    ANN_PROFILE_LABEL,
    PROFILE_ARTIFACT_TYPE,
    PROFILE_MEDIA_TYPE,
    Profile,
    ProfileChunk,
)
from imgaccel.formats.sizes import format_size
from imgaccel.pusher.client import RegistryClient
from imgaccel.reader.accelerated_image import AcceleratedImage

log = logging.getLogger(__name__)
MAX_PROFILE = 64 << 20  # bytes of one profile blob read


def build_profile(image: AcceleratedImage, label: str) -> Profile:
    """The chunks the image's readers served to foreground reads, in first-read order."""
    seen = sorted(
        (t, layer_no, pos)
        for layer_no, layer in enumerate(image.layers)
        for pos, t in layer.first_reads.items()
    )  # fmt: skip
    chunks = []
    for _, n, p in seen:
        layer = image.layers[n]
        c = layer.index.chunks[p]
        upto = layer.read_upto.get(p, c.u_size)
        partial = bool(c.blocks) and 0 < upto < c.u_size
        chunks.append(ProfileChunk(layer=n, chunk=p, digest=c.digest, upto=upto if partial else None))
    return Profile(label=label, image=image.top_digest, manifest=image.manifest_digest, chunks=chunks)


async def push_profile(client: RegistryClient, image: AcceleratedImage, profile: Profile) -> str:
    """Upload the profile and attach it to the image; returns the artifact manifest digest."""
    repo = image.ref.repository
    data = profile.model_dump_json().encode()
    empty = oci.EMPTY_JSON
    await client.upload_blob(repo, oci.sha256_digest(data), data)
    await client.upload_blob(repo, oci.sha256_digest(empty), empty)
    annotations = {ANN_PROFILE_LABEL: profile.label}
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "artifactType": PROFILE_ARTIFACT_TYPE,
        "config": {"mediaType": oci.OCI_EMPTY, "digest": oci.sha256_digest(empty), "size": len(empty)},
        "layers": [{"mediaType": PROFILE_MEDIA_TYPE, "digest": oci.sha256_digest(data), "size": len(data)}],
        "subject": {"mediaType": image.top_media_type, "digest": image.top_digest, "size": image.top_size},
        "annotations": annotations,
    }
    body = oci.canonical_json(manifest)
    digest = await client.put_manifest(repo, oci.sha256_digest(body), body, oci.OCI_MANIFEST)
    desc = oci.Descriptor(
        mediaType=oci.OCI_MANIFEST,
        digest=digest,
        size=len(body),
        artifactType=PROFILE_ARTIFACT_TYPE,
        annotations=annotations,
    )
    await client.add_referrer(repo, image.top_digest, desc)
    return digest


async def read_profile(client: RegistryClient, repo: str, artifact: str, max_size: int = MAX_PROFILE) -> Profile:
    """The profile the artifact manifest ``artifact`` (a referrer with the profile artifact
    type) holds. ValueError (one line) when it holds none or one over ``max_size`` bytes;
    RegistryError when it cannot be read."""
    manifest = oci.ImageManifest.model_validate_json((await client.get_manifest(repo, artifact)).data)
    if not manifest.layers or manifest.layers[0].mediaType != PROFILE_MEDIA_TYPE:
        raise ValueError(f"{artifact}: not a profile (no {PROFILE_MEDIA_TYPE} layer)")
    blob = manifest.layers[0]
    if blob.size > max_size:
        raise ValueError(f"{artifact}: the profile is {format_size(blob.size)}, over the {format_size(max_size)} read")
    return Profile.model_validate_json(await client.read_blob(repo, blob.digest, max_size=max_size))


async def find_profile(client: RegistryClient, image: AcceleratedImage, label: str) -> Profile | None:
    """The newest profile with ``label`` attached to the image, if any."""
    repo = image.ref.repository
    for desc in reversed(await client.referrers(repo, image.top_digest)):
        if desc.artifactType != PROFILE_ARTIFACT_TYPE or (desc.annotations or {}).get(ANN_PROFILE_LABEL) != label:
            continue
        profile = await read_profile(client, repo, desc.digest)
        if profile.manifest != image.manifest_digest:
            continue  # recorded for another platform
        return profile
    return None
