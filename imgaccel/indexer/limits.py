"""Limits on what one layer's tar stream may declare, so a hostile layer fails early and cheaply.

A tar header is data from whoever pushed the image: its size fields can be negative or
absurd, its PAX records arbitrarily long, its entry count unbounded. ``TarLimits`` bounds each
before any memory or time is spent on it; ``tar_walker.walk_tar`` enforces them and fails
with a ``LayerError`` naming the entry and the limit. Defaults, and why:

* ``max_header_bytes`` 1 MiB: one PAX extended header or GNU long name/link record. Go's
  archive/tar (containerd, Docker) rejects larger ones, so no runnable image needs more.
* ``max_entries`` 1,000,000 entries per layer: the largest real layers (conda or node_modules
  trees) hold a few hundred thousand; the index costs about 300 bytes of memory per entry.
* ``max_expansion`` 1100: no entry may declare more data than the compressed blob times
  this (an uncompressed tar: than the blob itself). Deflate cannot expand more than 1032:1,
  so no valid gzip layer is refused; a zstd layer of a larger all-zero file needs it raised.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TarLimits:
    max_header_bytes: int = 1 << 20
    max_entries: int = 1_000_000
    max_expansion: int = 1100

    def max_stream_bytes(self, blob_size: int, compressed: bool) -> int:
        """The most uncompressed bytes a blob of ``blob_size`` may honestly declare."""
        return blob_size * self.max_expansion if compressed else blob_size


DEFAULT_TAR_LIMITS = TarLimits()
