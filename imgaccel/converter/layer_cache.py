"""A registry-side record of converted layers, so no layer is converted twice anywhere.

Each converted layer is recorded as a tiny artifact manifest in one repository of the same
registry (``imgaccel-cache`` by default), tagged ``<mode>-v<format>-<options hash>-<source
layer hex>``, whose only layer is the converted blob. A lookup is one manifest GET; a hit is
made available to the target repository by a cross-repository blob mount. Because the record
lives in the registry, every converter process and machine shares it.
"""

from __future__ import annotations

import logging

from imgaccel.formats import oci
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.errors import NotFoundError, RegistryError

log = logging.getLogger(__name__)
CACHE_ARTIFACT_TYPE = "application/vnd.imgaccel.layer-cache.v1"


def empty_config() -> oci.Descriptor:
    return oci.Descriptor(mediaType=oci.OCI_EMPTY, digest=oci.sha256_digest(oci.EMPTY_JSON), size=len(oci.EMPTY_JSON))


class LayerCache:
    def __init__(self, client: RegistryClient, repo: str | None) -> None:
        self.client = client
        self.repo = repo

    def _tag(self, key: str, source_digest: str) -> str:
        return f"{key}-{source_digest.split(':', 1)[1]}"

    async def lookup(self, key: str, source_digest: str, target_repo: str) -> oci.Descriptor | None:
        """The recorded result, already present in ``target_repo``, or None."""
        if not self.repo:
            return None
        try:
            m = await self.client.get_manifest(self.repo, self._tag(key, source_digest))
            desc = oci.ImageManifest.model_validate_json(m.data).layers[0]
        except NotFoundError:
            return None
        except (RegistryError, ValueError, IndexError) as e:
            log.warning("layer cache entry for %s unreadable, converting again: %s", source_digest, e)
            return None
        if await self.client.blob_size(target_repo, desc.digest) == desc.size:
            return desc
        if await self.client.mount_blob(target_repo, desc.digest, self.repo):
            return desc
        return None

    async def store(self, key: str, source_digest: str, target_repo: str, result: oci.Descriptor) -> None:
        if not self.repo:
            return
        try:
            if not await self.client.mount_blob(self.repo, result.digest, target_repo):
                return
            await self.client.upload_blob(self.repo, empty_config().digest, oci.EMPTY_JSON)
            manifest = {
                "schemaVersion": 2,
                "mediaType": oci.OCI_MANIFEST,
                "artifactType": CACHE_ARTIFACT_TYPE,
                "config": empty_config().wire(),
                "layers": [result.wire()],
            }
            data = oci.canonical_json(manifest)
            await self.client.put_manifest(self.repo, self._tag(key, source_digest), data, oci.OCI_MANIFEST)
        except RegistryError as e:  # the cache is an optimisation: never fail a conversion on it
            log.warning("could not record %s in the layer cache: %s", source_digest, e)
