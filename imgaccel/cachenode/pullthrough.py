"""What the cache node knows about upstream content besides blob bytes: manifests (stored by
digest; tags resolved upstream and the answer reused for ``manifest_ttl`` seconds, or longer
while the upstream cannot be reached), blob sizes, and which digests belong to which repository
(a digest stored from one repository is served through another only once the upstream confirmed
it is in that one too, unless the client holds a cluster token)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from imgaccel.cachenode.flight import SingleFlight, TTLCache
from imgaccel.cachenode.metrics import Metrics
from imgaccel.cachenode.store import Kind, Store
from imgaccel.cachenode.upstream import Upstream
from imgaccel.formats import oci
from imgaccel.pusher.errors import AuthError, NotFoundError, RegistryError
from imgaccel.pusher.reference import is_digest

log = logging.getLogger(__name__)

LINK_TTL = 3600.0  # seconds a "digest is in repository" answer is reused
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"


@dataclass(frozen=True)
class ManifestAnswer:
    data: bytes
    media_type: str
    digest: str
    cached: bool  # served from the store


class PullThrough:
    def __init__(self, store: Store, metrics: Metrics, manifest_ttl: float) -> None:
        self.store = store
        self.metrics = metrics
        self._tags: TTLCache[tuple[str, str, str], str] = TTLCache(manifest_ttl)
        self._sizes: TTLCache[str, int] = TTLCache(float("inf"))  # a digest's size never changes
        self._links: TTLCache[tuple[str, str, Kind, str], bool] = TTLCache(LINK_TTL)
        self._manifests: SingleFlight[tuple[str, str, str], ManifestAnswer] = SingleFlight()
        self._heads: SingleFlight[tuple[str, str, Kind, str], int | None] = SingleFlight()

    # -- manifests ------------------------------------------------------------------------

    async def manifest(self, upstream: Upstream, repo: str, reference: str, check_link: bool) -> ManifestAnswer:
        """The manifest ``reference`` (tag or digest) of ``repo``; ``NotFoundError`` when there is none."""
        if is_digest(reference):
            digest = reference
        else:
            digest = await self._resolve(upstream, repo, reference)
            check_link = False  # the tag was resolved in this repository
        data = self.store.read_small("manifests", digest)
        if data is not None:
            if check_link:
                await self.check_link(upstream, repo, "manifests", digest)
            self.metrics.lookups.labels("manifest", "hit").inc()
            return ManifestAnswer(data, _media_type(data), digest, True)
        self.metrics.lookups.labels("manifest", "miss").inc()
        return await self._manifests.run((upstream.host, repo, digest), lambda: self._fetch(upstream, repo, digest))

    async def _fetch(self, upstream: Upstream, repo: str, digest: str) -> ManifestAnswer:
        m = await upstream.client.get_manifest(repo, digest)  # digest checked by the client
        self.metrics.upstream_bytes.inc(len(m.data))
        await self.store.put_small("manifests", digest, m.data)
        self._links.put((upstream.host, repo, "manifests", digest), True)
        return ManifestAnswer(m.data, m.media_type, digest, False)

    async def _resolve(self, upstream: Upstream, repo: str, tag: str) -> str:
        key = (upstream.host, repo, tag)
        digest = self._tags.get(key)
        if digest is not None:
            return digest
        try:
            found = await upstream.client.manifest_exists(repo, tag)
            if found is not None and not is_digest(found):  # no Docker-Content-Digest: read it
                found = (await upstream.client.get_manifest(repo, tag)).digest
        except (NotFoundError, AuthError):
            raise
        except RegistryError as e:
            stale = self._tags.stale(key)
            if stale is None:
                raise
            log.warning("%s/%s:%s: upstream unavailable (%s); serving the last known digest %s",
                        upstream.host, repo, tag, e, stale)  # fmt: skip
            return stale
        if found is None:
            raise NotFoundError(f"{upstream.host}/{repo}:{tag}: manifest unknown", 404)
        self._tags.put(key, found)
        self._links.put((upstream.host, repo, "manifests", found), True)
        return found

    # -- blobs ----------------------------------------------------------------------------

    async def blob_size(self, upstream: Upstream, repo: str, digest: str) -> int:
        """The size of a blob not stored, from upstream (HEAD), remembered; ``NotFoundError``."""
        if (size := self._sizes.get(digest)) is not None and self._links.get((upstream.host, repo, "blobs", digest)):
            return size
        found = await self._head(upstream, repo, "blobs", digest)
        if found is None or found < 0:
            raise NotFoundError(f"{upstream.host}/{repo}@{digest}: blob unknown", 404)
        return found

    async def check_link(self, upstream: Upstream, repo: str, kind: Kind, digest: str) -> None:
        """``NotFoundError`` unless upstream has ``digest`` in ``repo`` (asked once an hour)."""
        if self._links.get((upstream.host, repo, kind, digest)):
            return
        if await self._head(upstream, repo, kind, digest) is None:
            raise NotFoundError(f"{upstream.host}/{repo}@{digest}: {kind[:-1]} unknown in this repository", 404)

    async def _head(self, upstream: Upstream, repo: str, kind: Kind, digest: str) -> int | None:
        """HEAD upstream with the node's credentials: a blob's size (-1: not announced), 0 for a
        manifest that exists, None when absent."""

        async def head() -> int | None:
            if kind == "blobs":
                size = await upstream.client.blob_size(repo, digest)
                if size is not None and size >= 0:
                    self._sizes.put(digest, size)
            else:
                size = 0 if await upstream.client.manifest_exists(repo, digest) is not None else None
            if size is not None:
                self._links.put((upstream.host, repo, kind, digest), True)
            return size

        return await self._heads.run((upstream.host, repo, kind, digest), head)


def _media_type(data: bytes) -> str:
    """A stored manifest's media type: its ``mediaType`` field, else what its shape says (as
    distribution decides for OCI manifests that leave the field out)."""
    try:
        value = json.loads(data)
    except ValueError:
        return oci.OCI_MANIFEST
    if not isinstance(value, dict):
        return oci.OCI_MANIFEST
    declared = value.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if value.get("schemaVersion") == 1:
        return SCHEMA1
    return oci.OCI_INDEX if "manifests" in value else oci.OCI_MANIFEST
