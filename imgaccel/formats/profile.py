"""Hot-chunk profiles: the chunks a workload read at start-up, in the order it first read them.

A profile is a JSON document (media type ``PROFILE_MEDIA_TYPE``) stored as the only layer of
an artifact manifest (``artifactType`` ``PROFILE_ARTIFACT_TYPE``, annotation
``io.imgaccel.profile.label``) whose ``subject`` is the accelerated image's top manifest or
index, so it is found through the OCI 1.1 referrers of that digest (tag-schema fallback on
registries without the referrers API). Several labels may exist for one image.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

PROFILE_VERSION = 2  # 2 added ProfileChunk.upto; version 1 profiles read as before
PROFILE_MEDIA_TYPE = "application/vnd.imgaccel.profile.v1+json"
PROFILE_ARTIFACT_TYPE = "application/vnd.imgaccel.profile.v1"
ANN_PROFILE_LABEL = "io.imgaccel.profile.label"


class ProfileChunk(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: int = Field(ge=0)  # position of the layer in the platform manifest
    chunk: int = Field(ge=0)  # position of the chunk in that layer's index
    digest: str  # the chunk's digest, so a stale profile is detected rather than misapplied
    # Index mode: how many uncompressed bytes from the chunk's start the workload read, when
    # less than the whole chunk (replay then fetches only the blocks covering them); absent:
    # the whole chunk.
    upto: int | None = Field(default=None, ge=1)


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(default=PROFILE_VERSION, ge=1, le=PROFILE_VERSION)
    label: str
    image: str  # digest of the accelerated image's top manifest or index (the subject)
    manifest: str  # digest of the platform manifest whose layers ``layer`` counts
    chunks: list[ProfileChunk]
