"""OCI image-spec and Docker schema-2 wire types (descriptors, manifests, indexes, configs).

Models keep unknown fields (``extra="allow"``) so nothing a registry sent is lost, but a
manifest is always pushed and digested as the exact bytes it was read as: never re-serialize
a source manifest.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"

LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
IMAGE_CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)
ACCEPT_MANIFESTS = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))

# Layer media type -> compression it declares.
LAYER_COMPRESSION: dict[str, str] = {
    LAYER_TAR: "tar",
    DOCKER_LAYER_TAR: "tar",
    LAYER_GZIP: "gzip",
    DOCKER_LAYER_GZIP: "gzip",
    LAYER_ZSTD: "zstd",
    # Non-distributable variants are still layers of the same encodings.
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
}


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hasher(digest: str) -> Any:
    """A hashlib object for ``digest``'s algorithm (sha256 or sha512)."""
    return hashlib.new(digest.split(":", 1)[0])


def digest_of(data: bytes, like: str) -> str:
    """``data``'s digest with the algorithm of the digest ``like``."""
    h = hasher(like)
    h.update(data)
    return f"{like.split(':', 1)[0]}:{h.hexdigest()}"


def canonical_json(obj: Any) -> bytes:
    """The bytes imgaccel pushes for manifests it writes: compact, keys in model order."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class Platform(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    architecture: str
    os: str
    variant: str | None = None
    os_version: str | None = Field(default=None, alias="os.version")

    def label(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


class Descriptor(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    mediaType: str
    digest: str
    size: int = Field(ge=0)
    annotations: dict[str, str] | None = None
    platform: Platform | None = None
    artifactType: str | None = None
    urls: list[str] | None = None

    def wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class ImageManifest(BaseModel):
    model_config = ConfigDict(extra="allow")
    schemaVersion: int
    mediaType: str | None = None
    artifactType: str | None = None
    config: Descriptor
    layers: list[Descriptor]
    subject: Descriptor | None = None
    annotations: dict[str, str] | None = None


class ImageIndex(BaseModel):
    model_config = ConfigDict(extra="allow")
    schemaVersion: int
    mediaType: str | None = None
    artifactType: str | None = None
    manifests: list[Descriptor]
    subject: Descriptor | None = None
    annotations: dict[str, str] | None = None


class RootFS(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    diff_ids: list[str]


class ImageConfig(BaseModel):
    """The parts of an image config imgaccel reads; everything else is kept untouched."""

    model_config = ConfigDict(extra="allow")
    architecture: str | None = None
    os: str | None = None
    rootfs: RootFS
