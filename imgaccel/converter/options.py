"""What a conversion produces: ``ConvertOptions`` and the defaults behind the CLI flags."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from imgaccel.formats.layer_index import FORMAT_VERSION

Mode = Literal["index", "full"]
DEFAULT_SUFFIX: dict[str, str] = {"index": "_accelerated", "full": "_containerd_accelerated"}
DEFAULT_CACHE_REPO = "imgaccel-cache"


@dataclass(frozen=True)
class ConvertOptions:
    mode: Mode = "index"
    compression: Literal["zstd", "lz4"] = "zstd"  # full mode
    tag_suffix: str | None = None  # None: DEFAULT_SUFFIX[mode]
    span: int = 4 << 20  # index mode: uncompressed bytes between gzip checkpoints / tar chunks
    chunk_size: int = 4 << 20  # full mode: big files are split into frames of this size
    frame_size: int = 128 << 10  # full mode: small entries are grouped into frames up to this size
    level: int | None = None  # full mode compression level (zstd 4, lz4 0 by default)
    fallback: Literal["none", "full"] = "none"  # index mode: what to do with unseekable layers
    platforms: tuple[str, ...] = ()  # e.g. ("linux/amd64",); empty: all
    cache_repo: str | None = DEFAULT_CACHE_REPO  # registry-side record of converted layers
    layer_jobs: int = 2  # layers of one image converted at once
    gzip_threads: int = 1  # index mode: parallel gzip inflate (2: ~20% faster, ~100 MB more memory)
    workdir: str | None = None  # temp files; default: the system temp dir

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
