"""The node daemon's cache nodes: which one serves a blob, their health, and ``MirroredFetcher``,
the ``RangeFetcher`` that reads blob bytes through them before the registry.

Each blob has one preferred cache node across the cluster (rendezvous hashing: the highest
sha256(node address + blob digest) first), so the nodes' stores shard the images instead of
all holding everything. ``MirroredFetcher.fetch_ranges`` asks the blob's cache nodes in that
order (``?ns=<registry host>``, the cluster token as the Basic password), then the registry
itself. A node that fails (connection error, timeout, 5xx) is skipped by every fetch for
``cache_node_down_seconds``, then tried again; a 4xx (the node does not mirror that registry,
refuses the token) only moves this request on. Cache nodes are not trusted for content: the
``LayerReader`` verifies every chunk and asks once more, ``fresh``, for one that failed
verification (as a TOC read does after a digest mismatch); a fresh request goes to the
registry itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp

from imgaccel.pusher.auth import Credentials
from imgaccel.pusher.client import RegistryClient, RetryPolicy
from imgaccel.pusher.errors import RegistryError
from imgaccel.snapshotter.config import CacheNodeConfig, NodeConfig
from imgaccel.snapshotter.status import CacheNodeStatus

log = logging.getLogger(__name__)
CACHE_NODE_USER = "imgaccel-node"  # the Basic user name sent with the cluster token (any is accepted)
CACHE_NODE_TIMEOUT = 10.0  # seconds a cache node may keep an answer waiting before it counts as failed
_FAILURES = (RegistryError, aiohttp.ClientError, asyncio.TimeoutError, OSError)


@dataclass
class CacheNode:
    address: str  # host:port
    plain_http: bool = True
    down_until: float = 0.0  # monotonic time until which it is skipped
    last_error: str = ""
    requests: int = 0  # requests it answered
    bytes_fetched: int = 0  # bytes it answered with
    failures: int = 0


def rendezvous_key(address: str, digest: str) -> bytes:
    """The blob's score at a node: the highest scoring healthy node serves it first."""
    return hashlib.sha256((address + digest).encode()).digest()


class CacheNodes:
    """The configured cache nodes, their health and their clients (one per node and registry,
    as ``?ns=`` differs)."""

    def __init__(
        self,
        nodes: Sequence[CacheNodeConfig],
        token: str | None = None,
        down_seconds: float = 30.0,
        *,
        timeout: float = CACHE_NODE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nodes = [CacheNode(n.address, n.plain_http) for n in nodes]
        self.token = token
        self.down_seconds = down_seconds
        self.timeout = timeout
        self.clock = clock
        self._clients: dict[tuple[str, str], RegistryClient] = {}

    @classmethod
    def from_config(cls, config: NodeConfig) -> CacheNodes | None:
        if not config.cache_nodes:
            return None
        return cls(config.cache_nodes, config.cache_node_token_value(), config.cache_node_down_seconds)

    def healthy(self, node: CacheNode) -> bool:
        return self.clock() >= node.down_until

    def order(self, digest: str) -> list[CacheNode]:
        """The healthy nodes in the order ``digest`` is asked from them (rendezvous hashing)."""
        healthy = [n for n in self.nodes if self.healthy(n)]
        return sorted(healthy, key=lambda n: rendezvous_key(n.address, digest), reverse=True)

    def mark_down(self, node: CacheNode, why: str) -> None:
        node.failures += 1
        node.last_error = why
        if self.healthy(node):
            log.warning("cache node %s is down for %.0f s: %s", node.address, self.down_seconds, why)
        node.down_until = self.clock() + self.down_seconds

    async def client(self, node: CacheNode, registry: str) -> RegistryClient:
        key = (node.address, registry)
        if key not in self._clients:
            client = RegistryClient(
                node.address,
                plain_http=node.plain_http,
                credentials=Credentials(CACHE_NODE_USER, self.token) if self.token else None,
                docker_config=False,
                retry=RetryPolicy(attempts=1),  # a failure goes to the next source, not to a retry
                timeout=self.timeout,
                namespace=registry,
            )
            await client.__aenter__()
            if key in self._clients:  # made meanwhile by a concurrent fetch
                await client.close()
            else:
                self._clients[key] = client
        return self._clients[key]

    def fetcher(self, registry: RegistryClient) -> MirroredFetcher:
        return MirroredFetcher(registry, self)

    def status(self) -> list[CacheNodeStatus]:
        now = self.clock()
        out = []
        for n in self.nodes:
            out.append(CacheNodeStatus(
                address=n.address, healthy=now >= n.down_until, down_seconds_left=max(n.down_until - now, 0.0),
                requests=n.requests, bytes_fetched=n.bytes_fetched, failures=n.failures,
                last_error=n.last_error,
            ))  # fmt: skip
        return out

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


class MirroredFetcher:
    """A ``RangeFetcher`` for one registry's blobs: the blob's cache nodes in rendezvous order,
    then ``registry``. Bytes are not verified here (``LayerReader`` verifies every chunk)."""

    def __init__(self, registry: RegistryClient, nodes: CacheNodes) -> None:
        self.registry = registry
        self.nodes = nodes
        self.registry_requests = 0  # requests that fell through to the registry
        self.fresh_requests = 0  # of them, asked of the registry because bytes failed verification

    @property
    def multi_range_unsupported(self) -> bool:
        # Cache nodes answer multi-range requests; a registry that cannot is handled by its client.
        return self.registry.multi_range_unsupported and not any(self.nodes.healthy(n) for n in self.nodes.nodes)

    @multi_range_unsupported.setter
    def multi_range_unsupported(self, value: bool) -> None:
        self.registry.multi_range_unsupported = value

    async def fetch_ranges(
        self, repo: str, digest: str, ranges: Sequence[tuple[int, int]], *, fresh: bool = False
    ) -> list[bytes]:
        if fresh:  # bytes a cache node (or the registry) gave failed verification: the origin
            self.fresh_requests += 1
            log.warning("%s@%s: bytes failed verification; asking the registry itself", repo, digest)
        for node in () if fresh else self.nodes.order(digest):
            try:
                client = await self.nodes.client(node, self.registry.registry)
                datas = await client.fetch_ranges(repo, digest, ranges)
            except _FAILURES as e:
                status = getattr(e, "status", None)
                if status is not None and status < 500:  # it cannot serve this one; it is not down
                    log.info("cache node %s: %s; asking the next source", node.address, e)
                else:
                    self.nodes.mark_down(node, f"{type(e).__name__}: {e}")
                continue
            node.requests += 1
            node.bytes_fetched += sum(len(d) for d in datas)
            return datas
        self.registry_requests += 1
        return await self.registry.fetch_ranges(repo, digest, ranges)
