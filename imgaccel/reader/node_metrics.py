"""Node-side metrics (Prometheus): what lazy reads cost, for a mount's ``--metrics-file``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from imgaccel.reader.accelerated_image import AcceleratedImage

FETCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _ImageStats(Collector):
    def __init__(self, image: AcceleratedImage) -> None:
        self.image = image

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        layers = self.image.layers
        fetched = sum(layer.stats.bytes_fetched for layer in layers)
        yield CounterMetricFamily("imgaccel_node_registry_bytes", "Bytes fetched from the registry", value=fetched)
        yield CounterMetricFamily(
            "imgaccel_node_read_wait_seconds",
            "Time reads spent waiting for Range requests (not served from a cache)",
            value=sum(layer.stats.wait_seconds for layer in layers),
        )
        yield GaugeMetricFamily(
            "imgaccel_node_index_bytes",
            "Bytes of the layers' indexes (index blobs, TOCs) fetched to open the image",
            value=sum(layer.index_size for layer in layers),
        )
        yield CounterMetricFamily(
            "imgaccel_node_registry_requests",
            "Range requests sent",
            value=sum(layer.stats.requests for layer in layers),
        )
        yield CounterMetricFamily(
            "imgaccel_node_verification_failures",
            "Chunks that failed verification twice (reads answered EIO)",
            value=sum(layer.stats.verification_failures for layer in layers),
        )
        yield CounterMetricFamily(
            "imgaccel_node_refetches", "Chunks fetched again after a failed verification",
            value=sum(layer.stats.refetches for layer in layers),
        )  # fmt: skip
        caches = {id(layer.disk_cache): layer.disk_cache for layer in layers if layer.disk_cache is not None}
        served = sum(c.stats.bytes_served for c in caches.values())
        hits = sum(c.stats.hits for c in caches.values())
        misses = sum(c.stats.misses for c in caches.values())
        yield CounterMetricFamily("imgaccel_node_cache_bytes", "Bytes served from the chunk cache", value=served)
        yield GaugeMetricFamily(
            "imgaccel_node_cache_hit_ratio",
            "Chunk cache hits / lookups",
            value=hits / (hits + misses) if hits + misses else 0,
        )
        fallbacks = sum(1 for layer in layers if getattr(layer.fetcher, "range_unsupported", False))
        yield CounterMetricFamily(
            "imgaccel_node_range_fallbacks", "Registries that ignored Range requests", value=fallbacks
        )
        fetchers = {id(layer.fetcher): layer.fetcher for layer in layers}
        yield CounterMetricFamily(
            "imgaccel_node_multi_range_fallbacks",
            "Registries that did not answer multi-range requests part by part (one range per request since)",
            value=sum(1 for f in fetchers.values() if f.multi_range_unsupported),
        )


class NodeMetrics:
    def __init__(self, image: AcceleratedImage) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_ImageStats(image))
        self.fetch_seconds = Histogram(
            "imgaccel_node_fetch_seconds", "Latency of Range requests", buckets=FETCH_BUCKETS, registry=self.registry
        )
        for layer in image.layers:
            layer.on_fetch = self.fetch_seconds.observe

    async def write_every(self, path: Path, interval: float = 5.0) -> None:
        """Write the metrics text file every ``interval`` seconds (atomically), until cancelled."""
        try:
            while True:
                write_to_textfile(str(path), self.registry)
                await asyncio.sleep(interval)
        finally:
            write_to_textfile(str(path), self.registry)
