"""What a conversion produces: ``ConvertOptions`` and the defaults behind the CLI flags, and
``ConversionLimits``: how much of each kind of input one conversion accepts."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from imgaccel.formats.layer_index import FORMAT_VERSION
from imgaccel.indexer.limits import DEFAULT_TAR_LIMITS, TarLimits

Mode = Literal["index", "full"]
DEFAULT_SUFFIX: dict[str, str] = {"index": "_accelerated", "full": "_containerd_accelerated"}
DEFAULT_CACHE_REPO = "imgaccel-cache"


class ConversionLimits(BaseModel):
    """Bounds on what an image may declare; exceeding one fails the conversion with a
    one-line error naming the image, the layer and entry where there is one, and the limit.
    Defaults, and why (the tar ones are explained in ``indexer.limits``):

    * ``max_layers`` 128 per image: Docker refuses to build past 125, and overlayfs stacks
      of that depth are already slow; an image of thousands of layers is an attack.
    * ``max_index_depth`` 2: an index of platform manifests, or an index of such indexes.
    * ``max_index_manifests`` 256 entries in one index: real indexes list a few platforms
      plus attestations.
    * ``max_manifest_bytes`` 4 MiB: distribution and containerd refuse larger manifests.
    * ``max_config_bytes`` 8 MiB: configs carry env, labels and history, rarely over 100 KB.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_header_bytes: int = Field(default=DEFAULT_TAR_LIMITS.max_header_bytes, ge=512)
    max_entries: int = Field(default=DEFAULT_TAR_LIMITS.max_entries, ge=1)
    max_expansion: int = Field(default=DEFAULT_TAR_LIMITS.max_expansion, ge=1)
    max_layers: int = Field(default=128, ge=1)
    max_index_depth: int = Field(default=2, ge=1)
    max_index_manifests: int = Field(default=256, ge=1)
    max_manifest_bytes: int = Field(default=4 << 20, ge=1024)
    max_config_bytes: int = Field(default=8 << 20, ge=1024)

    def tar(self) -> TarLimits:
        return TarLimits(self.max_header_bytes, self.max_entries, self.max_expansion)


@dataclass(frozen=True)
class ConvertOptions:
    mode: Mode = "index"
    compression: Literal["zstd", "lz4"] = "zstd"  # full mode
    tag_suffix: str | None = None  # None: DEFAULT_SUFFIX[mode]
    span: int = 1 << 20  # index mode: uncompressed bytes between gzip checkpoints / tar chunks
    chunk_size: int = 4 << 20  # full mode: big files are split into frames of this size
    frame_size: int = 128 << 10  # full mode: small entries are grouped into frames up to this size
    level: int | None = None  # full mode compression level (zstd 4, lz4 0 by default)
    fallback: Literal["none", "full"] = "none"  # index mode: what to do with unseekable layers
    platforms: tuple[str, ...] = ()  # e.g. ("linux/amd64",); empty: all
    cache_repo: str | None = DEFAULT_CACHE_REPO  # registry-side record of converted layers
    layer_jobs: int = 2  # layers of one image converted at once
    gzip_threads: int = 1  # index mode: parallel gzip inflate (2: ~20% faster, ~100 MB more memory)
    workdir: str | None = None  # temp files; default: the system temp dir
    limits: ConversionLimits = field(default_factory=ConversionLimits)

    @property
    def suffix(self) -> str:
        return self.tag_suffix if self.tag_suffix is not None else DEFAULT_SUFFIX[self.mode]

    def layer_key(self, mode: Mode) -> str:
        """What makes two conversions of one layer identical: mode, format version, options."""
        if mode == "index":
            opts = f"span={self.span}"
        else:
            opts = f"c={self.compression},chunk={self.chunk_size},frame={self.frame_size},level={self.level}"
        short = hashlib.sha256(opts.encode()).hexdigest()[:8]
        return f"{mode}-v{FORMAT_VERSION}-{short}"
