"""Prometheus metrics of one cache node (one registry per node instance), served at ``/metrics``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class _StoreSize(Collector):
    def __init__(self, size: Callable[[], tuple[int, int, int, int]]) -> None:
        self._size = size

    def collect(self) -> Iterator[GaugeMetricFamily]:
        total, entries, chunks, limit = self._size()
        yield GaugeMetricFamily(
            "imgaccel_cachenode_store_bytes", "Bytes of blobs, chunks and manifests stored", value=total
        )
        yield GaugeMetricFamily("imgaccel_cachenode_store_entries", "Blobs, chunks and manifests stored", value=entries)
        yield GaugeMetricFamily("imgaccel_cachenode_store_chunks", "Chunks of blobs stored", value=chunks)
        yield GaugeMetricFamily("imgaccel_cachenode_store_max_bytes", "The store's size bound", value=limit)


class Metrics:
    def __init__(self, store_size: Callable[[], tuple[int, int, int, int]]) -> None:
        """``store_size``: (bytes stored, entries, chunks among them, the size bound)."""
        self.registry = CollectorRegistry()
        self.registry.register(_StoreSize(store_size))
        r = self.registry
        self.served = Counter(
            "imgaccel_cachenode_served_bytes",
            "Body bytes sent to clients, by where they came from: cache (a stored blob), chunks (stored chunks), "
            "upstream", ["source"], registry=r,
        )  # fmt: skip
        self.upstream_bytes = Counter(
            "imgaccel_cachenode_upstream_bytes", "Body bytes received from upstream registries", registry=r
        )
        self.lookups = Counter(
            "imgaccel_cachenode_lookups",
            "Blob and manifest requests by store hit or miss; chunk segments of chunk-aware requests by hit, miss "
            "or joined (another request was fetching the chunk)", ["kind", "result"], registry=r,
        )  # fmt: skip
        self.evictions = Counter("imgaccel_cachenode_evictions", "Entries evicted to stay under max_size", registry=r)
        self.evicted_bytes = Counter("imgaccel_cachenode_evicted_bytes", "Bytes evicted", registry=r)
        self.fills = Counter(
            "imgaccel_cachenode_fills", "Finished blob fills: stored, failed, or too big to store", ["result"],
            registry=r,
        )  # fmt: skip
        self.fills_in_flight = Gauge("imgaccel_cachenode_fills_in_flight", "Blob fills downloading now", registry=r)
        self.fills_waiting = Gauge(
            "imgaccel_cachenode_fills_waiting", "Background fills waiting for a fill slot", registry=r
        )
        self.chunks = Counter(
            "imgaccel_cachenode_chunks",
            "Listed chunks fetched from upstream: stored, mismatch (not the listed digest), too_big, failed",
            ["result"], registry=r,
        )  # fmt: skip
        self.access = Counter("imgaccel_cachenode_access", "Access decisions, by outcome", ["result"], registry=r)

    def evicted(self, size: int) -> None:
        self.evictions.inc()
        self.evicted_bytes.inc(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
