"""Node daemons reading blob bytes through cache nodes (``snapshotter.cache_nodes``): two real
cache nodes in this process in front of the real registry, each reaching it through a counting
proxy of its own, while the node's registry client goes through another one; sharding by
rendezvous hashing, failover to the other node and to the registry, the down period, and a
fake cache node serving corrupt bytes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from imgaccel.cachenode.config import CacheNodeConfig as ServerConfig
from imgaccel.cachenode.server import CacheNode as CacheNodeServer
from imgaccel.formats.rendezvous import rendezvous_key
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.reference import parse_reference
from imgaccel.reader.accelerated_image import AcceleratedImage, open_image
from imgaccel.reader.layer_reader import LayerReader
from imgaccel.snapshotter.cache_nodes import CacheNodes, MirroredFetcher
from imgaccel.snapshotter.config import CacheNodeConfig, ConfigError, NodeConfig, load_node_config
from imgaccel.snapshotter.erofs_layers import ErofsLayers
from imgaccel.snapshotter.lazy_layers import LayerTarget
from imgaccel.snapshotter.status import NodeStatus, render
from tests.helpers import sha256
from tests.registry import Registry
from tests.test_cachenode import TOKEN, SlowProxy, random_blobs, slow_proxy
from tests.threaded_app import ThreadedApp

FAST = 1 << 40  # SlowProxy rate: no slowing down, only counting


class NodeServer:
    """A real cache node on 127.0.0.1 that can be stopped and started again on the same port."""

    def __init__(self, data: Path, upstream_host: str, endpoint: str) -> None:
        self.config = ServerConfig.model_validate({
            "data_dir": str(data), "cluster_tokens": [{"value": TOKEN}],
            # Two upstreams: a request without ?ns= names none of them (404).
            "upstreams": [{"host": "registry.example"}, {"host": upstream_host, "endpoint": endpoint}],
        })  # fmt: skip
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            self._loop = loop = asyncio.new_event_loop()
            self._runner = web.AppRunner(CacheNodeServer(self.config).app())
            try:
                loop.run_until_complete(self._runner.setup())
                site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
                loop.run_until_complete(site.start())
                self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            except BaseException as e:
                failed.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10) and not failed, failed

    def stop(self) -> None:
        if self._thread is None:
            return
        assert self._loop is not None and self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None


@dataclass
class Cluster:
    node_proxy: SlowProxy  # what the node daemon's registry client talks to
    proxies: list[SlowProxy]  # the cache nodes' ways to the registry, one each
    servers: list[NodeServer]

    @property
    def registry(self) -> str:
        return self.node_proxy.host  # the registry as the node names it (and ?ns= names it)

    def owner(self, digest: str) -> int:
        """Which cache node a blob belongs to: rendezvous hashing, computed here on its own."""
        keys = [hashlib.sha256((s.address + digest).encode()).digest() for s in self.servers]
        return keys.index(max(keys))

    def seen_by(self, digest: str) -> set[int]:
        """The cache nodes that asked the registry for ``digest``."""
        return {i for i, p in enumerate(self.proxies) if any(s.path.endswith(f"/blobs/{digest}") for s in p.requests)}

    def node_range_gets(self) -> int:
        return sum(1 for s in self.node_proxy.requests if "/blobs/" in s.path and s.range is not None)

    def nodes(self, down_seconds: float = 30.0) -> CacheNodes:
        return CacheNodes([CacheNodeConfig(address=s.address) for s in self.servers], TOKEN, down_seconds)


@pytest.fixture
def cluster(registry: Registry, tmp_path: Path) -> Iterator[Cluster]:
    with ExitStack() as stack:
        node_proxy = stack.enter_context(slow_proxy(registry, FAST))
        proxies = [stack.enter_context(slow_proxy(registry, FAST)) for _ in range(2)]
        servers = [NodeServer(tmp_path / f"cachenode{i}", node_proxy.host, p.host) for i, p in enumerate(proxies)]
        for s in servers:
            s.start()
            stack.callback(s.stop)
        yield Cluster(node_proxy, proxies, servers)


def through(cluster: Cluster, ref: str) -> str:
    """``ref`` (on the registry) as the node names it: through its proxy."""
    return cluster.registry + "/" + ref.split("/", 1)[1]


async def read_whole(reader: LayerReader) -> str:
    """The sha256 of the layer's whole uncompressed tar, read through ``reader``."""
    h = hashlib.sha256()
    size = reader.index.uncompressed_size
    for off in range(0, size, 1 << 20):
        h.update(await reader.read(off, min(1 << 20, size - off), record=False))
    return "sha256:" + h.hexdigest()


async def open_and_read(client: RegistryClient, ref: str, fetcher: MirroredFetcher) -> AcceleratedImage:
    image = await open_image(client, parse_reference(ref), fetcher=fetcher)
    for reader in image.layers:
        assert await read_whole(reader) == reader.index.diff_id
    return image


# -- the daemon's machinery ----------------------------------------------------------------


def test_the_daemon_reads_every_layer_through_its_cache_nodes_never_ranges_from_the_registry(
    cluster: Cluster, registry: Registry, converted: dict[str, str], tmp_path: Path
) -> None:
    config = NodeConfig(
        root=tmp_path / "root", cache_dir=tmp_path / "cache", background_fetch="off", profile_label=None,
        cache_nodes=[{"address": s.address} for s in cluster.servers], cache_node_token=TOKEN,
    )  # fmt: skip
    digests: list[str] = []

    async def run() -> NodeStatus:
        layers = ErofsLayers(config)
        try:
            fetched = 0
            for mode in ("full", "index"):
                ref = parse_reference(through(cluster, converted[mode]))
                async with RegistryClient(registry.host) as direct:  # (not through any proxy)
                    layer_digests = (await open_image(direct, parse_reference(converted[mode]))).layer_digests
                for digest in layer_digests:
                    reader = await layers.images.layer(LayerTarget(ref, digest))
                    assert isinstance(reader.fetcher, MirroredFetcher)
                    assert await read_whole(reader) == reader.index.diff_id
                    fetched += reader.stats.bytes_fetched
                    if reader.stats.bytes_fetched:  # (not when the shared chunk cache had it all)
                        digests.append(reader.blob_digest)
            remote = layers.describe()
            assert sum(cn.bytes_fetched for cn in remote.cache_nodes) >= fetched > 0
            return NodeStatus(**remote.model_dump(), pid=1, uptime_seconds=1, rss_bytes=1, socket="s", root="r",
                              snapshots={}, remote_snapshots=0)  # fmt: skip
        finally:
            await layers.close()

    status = asyncio.run(run())
    # Not one blob Range request from the node: TOCs and chunks all came from the cache nodes ...
    assert cluster.node_range_gets() == 0
    # ... each blob from its own cache node, which alone asked the registry for it.
    assert len(set(digests)) >= 3
    for digest in digests:
        assert cluster.seen_by(digest) == {cluster.owner(digest)}, digest
    lines = render(status)
    for s in cluster.servers:
        assert any(s.address in line and "healthy" in line for line in lines), lines


def test_blobs_are_sharded_by_rendezvous_hashing(cluster: Cluster, registry: Registry) -> None:
    blobs = random_blobs(registry, "cachenodes/shard", [20000] * 24)
    nodes = cluster.nodes()

    async def run() -> None:
        async with RegistryClient(cluster.registry) as client:
            fetcher = nodes.fetcher(client)
            for rounds in range(2):
                for blob in blobs:
                    spans = [(rounds * 100, rounds * 100 + 50), (9000, 9100), (19990, 20000)]
                    got = await fetcher.fetch_ranges("cachenodes/shard", sha256(blob), spans)
                    assert got == [blob[s:e] for s, e in spans]
            assert fetcher.registry_requests == 0
        await nodes.close()

    asyncio.run(run())
    owners = [cluster.owner(sha256(b)) for b in blobs]
    assert set(owners) == {0, 1}  # 24 blobs: both nodes hold some (all on one: chance 2**-23)
    for blob, owner in zip(blobs, owners, strict=True):
        assert cluster.seen_by(sha256(blob)) == {owner}  # only its node ever asked, both rounds
        assert nodes.order(sha256(blob))[0].address == cluster.servers[owner].address
    by_node = [sum(1 for o in owners if o == i) for i in range(2)]
    assert [n.requests for n in nodes.nodes] == [2 * k for k in by_node]
    assert cluster.node_range_gets() == 0


def test_failover_to_the_other_node_then_the_registry_and_the_down_period(
    cluster: Cluster, registry: Registry, converted: dict[str, str]
) -> None:
    repo = "cachenodes/failover"
    blobs = random_blobs(registry, repo, [30000] * 16)
    digests = [sha256(b) for b in blobs]
    owned = [[d for d in digests if cluster.owner(d) == i] for i in range(2)]
    assert owned[0] and owned[1]  # (both empty: chance 2**-15)
    nodes = cluster.nodes(down_seconds=3)
    a, b = nodes.nodes
    pa, pb = cluster.proxies

    def saw(proxy: SlowProxy, digest: str) -> int:
        return sum(1 for s in proxy.requests if s.path.endswith(f"/blobs/{digest}"))

    async def fetch_all(fetcher: MirroredFetcher, which: list[str], start: int) -> None:
        for d in which:
            (got,) = await fetcher.fetch_ranges(repo, d, [(start, start + 100)])
            assert got == blobs[digests.index(d)][start : start + 100]

    async def run() -> None:
        async with RegistryClient(cluster.registry) as client:
            fetcher = nodes.fetcher(client)
            cluster.servers[0].stop()
            await fetch_all(fetcher, owned[0], 0)  # node 0 down: its blobs from node 1
            assert not nodes.healthy(a) and nodes.healthy(b) and a.failures == 1
            assert all(saw(pb, d) > 0 and saw(pa, d) == 0 for d in owned[0])
            assert fetcher.registry_requests == 0

            cluster.servers[0].start()  # back on the same port, but within its down period:
            await fetch_all(fetcher, owned[0], 1000)
            assert all(saw(pa, d) == 0 for d in owned[0])  # not asked (its proxy saw nothing)
            assert a.requests == 0 and a.failures == 1
            await asyncio.sleep(max(a.down_until - nodes.clock(), 0) + 0.1)
            await fetch_all(fetcher, owned[0], 2000)  # the period is over: asked again
            assert all(saw(pa, d) > 0 for d in owned[0]) and a.requests == len(owned[0])

            for server in cluster.servers:
                server.stop()
            before = cluster.node_range_gets()
            await fetch_all(fetcher, digests, 3000)  # both down: from the registry
            assert cluster.node_range_gets() - before == len(digests) == fetcher.registry_requests
            assert not nodes.healthy(a) and not nodes.healthy(b)
            assert a.failures == 2 and b.failures == 1  # each tried once, then skipped
            # The same check that the first test makes fails here: the node asked the registry.
            image = await open_and_read(client, through(cluster, converted["full"]), nodes.fetcher(client))
            assert all(r.stats.bytes_fetched > 0 for r in image.layers)
            assert cluster.node_range_gets() > before + len(digests)
        await nodes.close()

    asyncio.run(run())


# -- hot chunks kept by the cache nodes ---------------------------------------------------------


def metric(server: NodeServer, name: str) -> float:
    with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=30) as r:
        text = r.read().decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found[1]) if found else 0.0


@pytest.mark.parametrize("mode", ["full", "index"])
def test_a_second_node_reads_what_the_first_fetched_from_the_cache_nodes_alone(
    cluster: Cluster, converted: dict[str, str], mode: str
) -> None:
    """The first node daemon fetches whole chunks (as its background fetch or a profile replay
    does) through the cache nodes, which verify and keep each one, and its TOCs or indexes,
    never a whole layer; a second node daemon with empty caches of its own then reads every
    byte of the image from the cache nodes alone: the registry serves nothing twice."""
    ref = parse_reference(through(cluster, converted[mode]))

    async def node_daemon(prefetch: bool) -> AcceleratedImage:
        nodes = cluster.nodes()
        async with RegistryClient(cluster.registry) as client:
            image = await open_image(client, ref, fetcher=nodes.fetcher(client))
            for reader in image.layers:
                if prefetch:
                    assert await reader.prefetch(range(len(reader.index.chunks))) == []
                assert await read_whole(reader) == reader.index.diff_id
        await nodes.close()
        return image

    first = asyncio.run(node_daemon(prefetch=True))
    stored = sum(metric(s, 'imgaccel_cachenode_chunks_total{result="stored"}') for s in cluster.servers)
    assert stored >= sum(len(r.index.chunks) for r in first.layers) + len(first.layers)  # + TOCs or indexes
    for server in cluster.servers:
        for reader in first.layers:
            assert not (server.config.data_dir / "blobs" / "sha256" / reader.blob_digest.split(":")[1]).exists()
    asked = [len(p.requests) for p in cluster.proxies]

    second = asyncio.run(node_daemon(prefetch=False))
    assert sum(r.stats.bytes_fetched for r in second.layers) > 0  # read, from the cache nodes
    assert [len(p.requests) for p in cluster.proxies] == asked  # which asked the registry nothing
    assert cluster.node_range_gets() == 0  # nor did the node daemons
    served = sum(metric(s, 'imgaccel_cachenode_served_bytes_total{source="chunks"}') for s in cluster.servers)
    assert served >= sum(r.stats.bytes_fetched for r in second.layers)


# -- a cache node serving wrong bytes ---------------------------------------------------------


@contextmanager
def corrupt_node() -> Iterator[tuple[str, list[str]]]:
    """A fake cache node answering every Range request with random bytes of the right length
    (a fault the real one cannot produce): (its address, the Range headers it answered)."""
    answered: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        rng = request.headers.get("Range", "")
        if not rng.startswith("bytes="):
            return web.Response(status=404)
        spans = [tuple(int(x) for x in part.split("-")) for part in rng[6:].split(",")]
        lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
        answered.append(rng)
        return web.Response(
            status=206, body=os.urandom(hi - lo + 1), content_type="application/octet-stream",
            headers={"Content-Range": f"bytes {lo}-{hi}/*"},
        )  # fmt: skip

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    server = ThreadedApp(app)
    port = server.start()
    try:
        yield f"127.0.0.1:{port}", answered
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["full", "index"])
def test_a_cache_node_serving_corrupt_bytes_never_yields_them(
    cluster: Cluster, converted: dict[str, str], mode: str
) -> None:
    """Decided: the read returns the right bytes, from the next source (here the registry): the
    reader asks once more, ``fresh``, for a chunk that failed verification, and the fetcher asks
    the registry itself."""
    with corrupt_node() as (address, answered):
        nodes = CacheNodes([CacheNodeConfig(address=address)], TOKEN)

        async def run() -> tuple[AcceleratedImage, int]:
            async with RegistryClient(cluster.registry) as client:
                fetcher = nodes.fetcher(client)
                image = await open_and_read(client, through(cluster, converted[mode]), fetcher)
            await nodes.close()
            return image, fetcher.fresh_requests

        image, fresh = asyncio.run(run())
    (node,) = nodes.nodes
    assert answered and node.requests == len(answered)  # it did serve (wrong) bytes
    assert fresh > 0 and nodes.healthy(node)
    assert sum(r.stats.refetches for r in image.layers) > 0
    assert sum(r.stats.verification_failures for r in image.layers) == 0
    assert cluster.node_range_gets() > 0  # the refetches went to the registry


# -- configuration ----------------------------------------------------------------------------


def test_node_config_cache_node_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("cache_nodes: [{address: 'cn0:5100'}, {address: 'cn1:5100', plain_http: false}]\n"
                    "cache_node_token_env: IMGACCEL_TEST_TOKEN\ncache_node_down_seconds: 5\n")  # fmt: skip
    with pytest.raises(ConfigError, match="IMGACCEL_TEST_TOKEN is not set"):
        load_node_config(path)
    monkeypatch.setenv("IMGACCEL_TEST_TOKEN", TOKEN)
    config = load_node_config(path)
    assert [(n.address, n.plain_http) for n in config.cache_nodes] == [("cn0:5100", True), ("cn1:5100", False)]
    assert config.cache_node_token_value() == TOKEN
    nodes = CacheNodes.from_config(config)
    assert nodes is not None and nodes.down_seconds == 5 and nodes.token == TOKEN
    digest = "sha256:" + "ab" * 32
    keys = {n.address: rendezvous_key(n.address, digest) for n in nodes.nodes}
    assert [n.address for n in nodes.order(digest)] == sorted(keys, key=lambda a: keys[a], reverse=True)
    bad: dict[str, Any] = {"cache_node_token": TOKEN, "cache_node_token_env": "IMGACCEL_TEST_TOKEN"}
    with pytest.raises(ValueError, match="not both"):
        NodeConfig.model_validate(bad)
    with pytest.raises(ValueError):
        NodeConfig.model_validate({"cache_nodes": [{"address": "not a host"}]})
    assert CacheNodes.from_config(NodeConfig()) is None
