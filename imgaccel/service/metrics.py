"""Prometheus metrics of the conversion service (one registry per service instance)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class _JobCounts(Collector):
    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self._counts()
        jobs = GaugeMetricFamily("imgaccel_jobs", "Conversion jobs by state", labels=["state"])
        for state, n in sorted(counts.items()):
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily("imgaccel_queue_depth", "Jobs waiting for a worker", value=counts.get("queued", 0))


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._counts: dict[str, int] = {}
        self.registry.register(_JobCounts(lambda: self._counts))
        self.duration = Histogram(
            "imgaccel_conversion_duration_seconds",
            "Wall time of successful conversions",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 1800),
            registry=self.registry,
        )
        self.bytes_in = Counter("imgaccel_bytes_in", "Source layer bytes downloaded", registry=self.registry)
        self.bytes_out = Counter("imgaccel_bytes_out", "Converted bytes uploaded", registry=self.registry)
        self.events = Counter("imgaccel_events", "Event requests by outcome", ["outcome"], registry=self.registry)
        self.notification_failures = Counter(
            "imgaccel_notification_failures", "Failed webhook delivery attempts", registry=self.registry
        )

    def render(self, job_counts: dict[str, int]) -> bytes:
        """The text format, with the job counts just read from the store."""
        self._counts = job_counts
        return generate_latest(self.registry)
