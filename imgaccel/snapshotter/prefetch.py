"""Fetching ahead of reads: replay a hot-chunk profile, then (optionally) the rest of the image.

Both are background work on ``LayerReader.prefetch``: requests are merged (nearby chunks share
one Range request), bounded by the image's ``FetchSlots`` background share, and a chunk is
claimed only when its request starts, so a foreground read that needs a chunk first fetches it
itself instead of waiting in this queue.
"""

from __future__ import annotations

import asyncio
import logging
import time

from imgaccel.formats.profile import Profile
from imgaccel.snapshotter.accelerated_image import AcceleratedImage

log = logging.getLogger(__name__)
PROFILE_WINDOW = 64  # profile entries sorted and merged together (order is kept across windows)
BACKGROUND_BATCH = 4 << 20  # compressed bytes per background-fetch request


async def replay_profile(image: AcceleratedImage, profile: Profile) -> int:
    """Fetch the profile's chunks into the caches in profile order (within windows of
    ``PROFILE_WINDOW`` entries, sorted so neighbours share a request). Returns how many are
    now cached; stale entries (another image's chunks) and failures are skipped and logged."""
    valid: list[tuple[int, int]] = []
    for item in profile.chunks:
        layer = image.layers[item.layer] if item.layer < len(image.layers) else None
        if (
            layer is None
            or item.chunk >= len(layer.index.chunks)
            or layer.index.chunks[item.chunk].digest != item.digest
        ):
            log.warning("profile %s: chunk %d of layer %d is stale; skipped", profile.label, item.chunk, item.layer)
            continue
        valid.append((item.layer, item.chunk))
    work = []
    for i in range(0, len(valid), PROFILE_WINDOW):
        by_layer: dict[int, list[int]] = {}
        for n, p in valid[i : i + PROFILE_WINDOW]:
            by_layer.setdefault(n, []).append(p)
        work += [image.layers[n].prefetch(sorted(ps)) for n, ps in by_layer.items()]
    failed = sum(len(f) for f in await asyncio.gather(*work))
    if failed:
        log.warning("profile %s: %d chunks could not be fetched", profile.label, failed)
    return len(valid) - failed


def _batches(sizes: dict[int, int], limit: int) -> list[list[int]]:
    """Consecutive positions grouped so each group's sizes add up to at most ``limit``
    (a single bigger chunk is a group of its own)."""
    out: list[list[int]] = []
    total = 0
    for p, size in sizes.items():
        if out and total + size <= limit:
            out[-1].append(p)
            total += size
        else:
            out.append([p])
            total = size
    return out


async def fetch_rest(image: AcceleratedImage, rate: float) -> int:
    """Fetch every chunk not yet cached, layer by layer in blob order, at most ``rate``
    compressed bytes per second on average. Returns the compressed bytes requested."""
    started, sent = time.monotonic(), 0
    for layer in image.layers:
        chunks = layer.index.chunks
        todo = {p: chunks[p].c_size for p in range(len(chunks)) if not layer.is_cached(p)}
        for batch in _batches(todo, BACKGROUND_BATCH):
            await layer.prefetch(batch, BACKGROUND_BATCH)
            sent += sum(todo[p] for p in batch)
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
    log.info("background fetch: done, %d bytes in %.1f s", sent, time.monotonic() - started)
    return sent
