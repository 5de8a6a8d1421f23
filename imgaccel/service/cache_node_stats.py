"""What the console's nodes page shows of each configured cache node (``prewarm.cache_nodes``):
read from the node's own Prometheus ``/metrics`` (``imgaccel.cachenode.metrics``), fetched
concurrently with a short timeout, answers kept ``ttl`` seconds so a storm of page reloads
costs each cache node one request per ``ttl``. Client calls only: nothing is bound.

The cache node serves ``/metrics`` without credentials (its content routes ask for them), so
the cluster token (``prewarm.cache_node_token``) is not sent along.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from imgaccel.prewarm.config import CacheNodeTarget

if TYPE_CHECKING:
    from imgaccel.service.service import Service

TIMEOUT = 2.0  # seconds for one cache node's /metrics, connecting included
TTL = 2.0  # seconds an answer is shown again before the cache nodes are asked anew
MAX_METRICS = 1 << 20  # bytes of /metrics read at most (a cache node's are a few KiB)
STORE_BYTES = "imgaccel_cachenode_store_bytes"
STORE_MAX_BYTES = "imgaccel_cachenode_store_max_bytes"
LOOKUPS = "imgaccel_cachenode_lookups_total"
SERVED = "imgaccel_cachenode_served_bytes_total"


@dataclass(frozen=True)
class CacheNodeStats:
    """One cache node as last asked. Without ``error`` every number is set; with it (the node
    could not be reached or answered no imgaccel metrics) they are None."""

    address: str
    error: str | None  # one line
    last_seen: float | None  # time.time() of the last answer with metrics; None: never
    cached_bytes: int | None = None  # blobs, chunks and manifests in its store
    max_bytes: int | None = None  # its store's bound
    hits: int | None = None
    misses: int | None = None
    served_bytes: int | None = None  # body bytes sent to clients, whatever their source
    served_from_store: int | None = None  # of them, from stored blobs and chunks

    @property
    def reachable(self) -> bool:
        return self.error is None

    @property
    def hit_ratio(self) -> float | None:
        """hits / (hits + misses) of the node's lookups since it started: requests for blobs and
        manifests, and chunk segments of chunk-aware requests, found in its store (hit) or not
        (miss). Segments ``joined`` to a fetch another request had started count as neither.
        None before any lookup."""
        if self.hits is None or self.misses is None or self.hits + self.misses == 0:
            return None
        return self.hits / (self.hits + self.misses)


def parse_metrics(text: str) -> dict[str, int]:
    """The numbers the page shows from a cache node's ``/metrics`` text (ValueError: not
    Prometheus text, or not a cache node's)."""
    store: dict[str, float] = {}
    lookups = {"hit": 0.0, "miss": 0.0}
    served = {"all": 0.0, "store": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (STORE_BYTES, STORE_MAX_BYTES):
                store[sample.name] = sample.value
            elif sample.name == LOOKUPS and sample.labels.get("result") in lookups:
                lookups[sample.labels["result"]] += sample.value
            elif sample.name == SERVED:
                served["all"] += sample.value
                if sample.labels.get("source") in ("cache", "chunks"):
                    served["store"] += sample.value
    if STORE_BYTES not in store:
        raise ValueError(f"no {STORE_BYTES} in its /metrics: not an imgaccel cache node?")
    return {
        "cached_bytes": int(store[STORE_BYTES]), "max_bytes": int(store.get(STORE_MAX_BYTES, 0)),
        "hits": int(lookups["hit"]), "misses": int(lookups["miss"]),
        "served_bytes": int(served["all"]), "served_from_store": int(served["store"]),
    }  # fmt: skip


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:299] + "…"


class CacheNodeScraper:
    """Asks the cache nodes ``targets()`` names for their metrics, at most once per ``ttl``
    (concurrent callers share one round), and remembers when each address last answered."""

    def __init__(self, targets: Callable[[], Sequence[CacheNodeTarget]], ttl: float = TTL,
                 timeout: float = TIMEOUT) -> None:  # fmt: skip
        self.targets = targets
        self.ttl = ttl
        self.timeout = timeout
        self._last_seen: dict[str, float] = {}
        self._answer: list[CacheNodeStats] = []
        self._answered_at = float("-inf")  # time.monotonic()
        self._lock = asyncio.Lock()

    async def stats(self) -> list[CacheNodeStats]:
        """Each configured cache node, in the configuration's order."""
        async with self._lock:
            targets = list(self.targets())
            fresh = time.monotonic() - self._answered_at < self.ttl
            if not fresh or [s.address for s in self._answer] != [t.address for t in targets]:
                self._answer = await self._ask(targets) if targets else []
                self._answered_at = time.monotonic()
            return list(self._answer)

    async def _ask(self, targets: list[CacheNodeTarget]) -> list[CacheNodeStats]:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            return list(await asyncio.gather(*(self._one(session, t) for t in targets)))

    async def _one(self, session: aiohttp.ClientSession, target: CacheNodeTarget) -> CacheNodeStats:
        url = f"{'http' if target.plain_http else 'https'}://{target.address}/metrics"
        try:
            async with session.get(url, allow_redirects=False) as resp:
                body = await resp.content.read(MAX_METRICS + 1)
                if resp.status != 200:
                    raise ValueError(f"GET /metrics answered {resp.status} {resp.reason or ''}".rstrip())
            if len(body) > MAX_METRICS:
                raise ValueError(f"its /metrics is over {MAX_METRICS} bytes")
            numbers = parse_metrics(body.decode("utf-8", "replace"))
        except TimeoutError:
            error = f"no answer within {self.timeout:g} s"
        except (aiohttp.ClientError, ValueError, OverflowError, OSError) as e:  # (Overflow: an infinite count)
            error = _one_line(e)
        else:
            now = time.time()
            self._last_seen[target.address] = now
            return CacheNodeStats(target.address, None, now, **numbers)
        return CacheNodeStats(target.address, error, self._last_seen.get(target.address))


_SCRAPERS: weakref.WeakKeyDictionary[Service, CacheNodeScraper] = weakref.WeakKeyDictionary()


def scraper_for(service: Service) -> CacheNodeScraper:
    """The service's one scraper (made at first use), reading ``prewarm.cache_nodes`` each time."""
    scraper = _SCRAPERS.get(service)
    if scraper is None:
        prewarm = service.config.prewarm  # (not the service: the scraper must not keep its key alive)
        scraper = _SCRAPERS[service] = CacheNodeScraper(lambda: prewarm.cache_nodes)
    return scraper
