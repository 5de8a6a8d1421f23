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
registry itself. A 429 from a cache node is the registry throttling it, passed on: the node is
asked again after its Retry-After (at most ``MAX_THROTTLE_WAIT`` s, ``THROTTLED_ATTEMPTS``
asks in all) rather than sending every node to the registry, which would throttle them too.

With ``chunks`` (the ``c_digest`` of each whole chunk inside the requested ranges), a request
to a cache node carries the ``Imgaccel-Chunks`` header, so the node verifies and keeps those
chunks and serves them to every other node without asking the registry again; the header is
sent empty when no whole chunk lies inside the ranges (a prefix read), so the node still
answers from its chunks and starts no whole-blob fill. Without ``chunks`` (None: an index
without compressed digests) no header is sent and the node does as for any client. A header
lists at most ``MAX_CHUNKS`` chunks: more are asked in several requests, a range cut where a
chunk ends (the next part starting where its next chunk starts: gzip chunks share bytes). The
registry is never sent the header.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

from imgaccel.formats.cache_chunks import CHUNKS_HEADER, MAX_CHUNKS, CacheChunk, format_chunks, usable_chunks
from imgaccel.formats.rendezvous import rendezvous_key
from imgaccel.pusher.auth import Credentials
from imgaccel.pusher.client import RegistryClient, RetryPolicy
from imgaccel.pusher.errors import RegistryError
from imgaccel.snapshotter.config import CacheNodeConfig, NodeConfig
from imgaccel.snapshotter.status import CacheNodeStatus

log = logging.getLogger(__name__)
CACHE_NODE_USER = "imgaccel-node"  # the Basic user name sent with the cluster token (any is accepted)
CACHE_NODE_TIMEOUT = 10.0  # seconds a cache node may keep an answer waiting before it counts as failed
THROTTLED_ATTEMPTS = 4  # asks of a cache node that passes on the registry's 429 (Retry-After waited)
MAX_THROTTLE_WAIT = 10.0  # seconds waited at most per 429
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
        self,
        repo: str,
        digest: str,
        ranges: Sequence[tuple[int, int]],
        *,
        fresh: bool = False,
        chunks: Sequence[CacheChunk] | None = None,
    ) -> list[bytes]:
        if fresh:  # bytes a cache node (or the registry) gave failed verification: the origin
            self.fresh_requests += 1
            log.warning("%s@%s: bytes failed verification; asking the registry itself", repo, digest)
        for node in () if fresh else self.nodes.order(digest):
            for attempt in range(THROTTLED_ATTEMPTS):
                try:
                    client = await self.nodes.client(node, self.registry.registry)
                    datas = await _fetch_listing(client, repo, digest, ranges, chunks)
                except _FAILURES as e:
                    status = getattr(e, "status", None)
                    if status == 429 and attempt + 1 < THROTTLED_ATTEMPTS:
                        # The registry throttles the cache node: asking it directly would not help.
                        retry_after = getattr(e, "retry_after", None) or 1.0
                        await asyncio.sleep(min(retry_after, MAX_THROTTLE_WAIT))
                        continue
                    if status is not None and status < 500:  # it cannot serve this one; it is not down
                        log.info("cache node %s: %s; asking the next source", node.address, e)
                    else:
                        self.nodes.mark_down(node, f"{type(e).__name__}: {e}")
                    break
                node.requests += 1
                node.bytes_fetched += sum(len(d) for d in datas)
                return datas
        self.registry_requests += 1
        return await self.registry.fetch_ranges(repo, digest, ranges)


@dataclass
class _Part:
    """Bytes ``[start, end)`` of requested range ``index``, asked in one request."""

    index: int
    start: int
    end: int


@dataclass
class _Request:
    parts: list[_Part] = field(default_factory=list)
    chunks: list[CacheChunk] = field(default_factory=list)


async def _fetch_listing(
    client: RegistryClient,
    repo: str,
    digest: str,
    ranges: Sequence[tuple[int, int]],
    chunks: Sequence[CacheChunk] | None,
) -> list[bytes]:
    """``ranges`` from a cache node, ``chunks`` listed in the ``Imgaccel-Chunks`` header of
    the requests (several when there are more than ``MAX_CHUNKS``; an empty header when none
    lies inside them, so the node serves the bytes from its chunks and starts no whole-blob
    fill). ``chunks`` None (an index without compressed digests): no header."""
    if chunks is None:
        return await client.fetch_ranges(repo, digest, ranges)
    out: list[bytearray] = [bytearray() for _ in ranges]
    ends = [start for start, _ in ranges]  # where what is assembled of each range ends
    for request in _plan_requests(ranges, usable_chunks(chunks)):
        headers = {CHUNKS_HEADER: format_chunks(sorted(request.chunks))}
        datas = await client.fetch_ranges(repo, digest, [(p.start, p.end) for p in request.parts], headers=headers)
        for part, data in zip(request.parts, datas, strict=True):
            out[part.index] += memoryview(data)[ends[part.index] - part.start :]  # a shared byte once
            ends[part.index] = part.end
    return [bytes(b) for b in out]


def _plan_requests(ranges: Sequence[tuple[int, int]], listed: list[CacheChunk]) -> list[_Request]:
    """Requests asking ``ranges`` that each list at most ``MAX_CHUNKS`` of the chunks lying
    wholly inside a range. A range with more than a request has room for is cut after the last
    chunk that fits; its rest starts where the next chunk starts, in the next request."""
    requests = [_Request()]
    for i, (start, end) in enumerate(ranges):
        first = bisect_left(listed, (start,))
        inside = [c for c in listed[first : bisect_left(listed, (end,))] if c[0] + c[1] <= end]
        while True:
            request = requests[-1]
            room = MAX_CHUNKS - len(request.chunks)
            if len(inside) <= room:
                request.parts.append(_Part(i, start, end))
                request.chunks += inside
                break
            if room:
                cut = inside[room - 1][0] + inside[room - 1][1]
                request.parts.append(_Part(i, start, cut))
                request.chunks += inside[:room]
                inside = inside[room:]
                start = min(cut, inside[0][0])
            requests.append(_Request())
    return [r for r in requests if r.parts]
