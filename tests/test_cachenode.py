"""The cache node against the real registry (Debian docker-registry) as its upstream: bytes equal
the registry's, second reads come from the store, ranges, pull-through while slow, singleflight,
corrupt upstream blobs, eviction, access control, chunk-aware requests (Imgaccel-Chunks), the lazy
reader through it, and the CLI."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from imgaccel.cachenode.config import CacheNodeConfig
from imgaccel.cachenode.server import CacheNode
from imgaccel.formats import oci
from imgaccel.formats.cache_chunks import CHUNKS_HEADER, MAX_CHUNKS, format_chunks
from imgaccel.pusher.auth import Credentials
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.errors import AuthError
from imgaccel.pusher.reference import ImageRef
from imgaccel.reader.accelerated_image import open_image
from tests.fault_proxy import FaultProxy
from tests.helpers import ROOT, sha256
from tests.raw_push import push_image
from tests.registry import Registry, free_port, start_registry
from tests.threaded_app import ThreadedApp

TOKEN = "cluster-token-0123456789abcdef"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
ACCEPT = {"Accept": oci.ACCEPT_MANIFESTS}
ACCESS_LINE = re.compile(r'"([A-Z]+) (\S*) HTTP/[0-9.]+"')
OCTET = "application/octet-stream"


# -- helpers ------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def http(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> Answer:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return Answer(r.status, dict(r.headers), r.read())
    except urllib.error.HTTPError as e:
        return Answer(e.code, dict(e.headers), e.read())


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@dataclass
class Node:
    host: str  # 127.0.0.1:PORT
    data: Path

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"

    def stored(self, kind: str, digest: str) -> Path:
        return self.data / kind / "sha256" / digest.split(":", 1)[1]

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.data.rglob("*") if p.is_file())

    def metrics(self) -> dict[str, float]:
        text = http(self.url("/metrics")).body.decode()
        return {k: float(v) for k, v in re.findall(r"^(imgaccel_cachenode_\S+) (\S+)$", text, re.M)}

    def wait_idle(self, timeout: float = 30) -> None:
        """Until no fill runs or waits (a failed fill has removed its temporary file)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["imgaccel_cachenode_fills_in_flight"] == 0 and m["imgaccel_cachenode_fills_waiting"] == 0:
                return
            assert time.monotonic() < deadline, m
            time.sleep(0.05)


@contextmanager
def cache_node(data: Path, upstreams: list[dict[str, Any]], **settings: Any) -> Iterator[Node]:
    """A cache node in this process (its own event loop thread) on 127.0.0.1, port 0."""
    config = CacheNodeConfig.model_validate(
        {"data_dir": str(data), "cluster_tokens": [{"value": TOKEN}], "upstreams": upstreams, **settings}
    )
    server = ThreadedApp(CacheNode(config).app())
    port = server.start()
    try:
        yield Node(f"127.0.0.1:{port}", data)
    finally:
        server.stop()


def access_log(registry: Registry) -> list[tuple[str, str]]:
    text = (registry.root.parent / "registry.log").read_text(errors="replace")
    return [(m.group(1), m.group(2)) for m in ACCESS_LINE.finditer(text)]


def settled_log(registry: Registry) -> list[tuple[str, str]]:
    """The access log once the registry has written the lines of requests already answered."""
    last: list[tuple[str, str]] = []
    for _ in range(20):
        time.sleep(0.1)
        now = access_log(registry)
        if now == last:
            return now
        last = now
    return last


def random_blobs(registry: Registry, repo: str, sizes: list[int]) -> list[bytes]:
    """Fresh random blobs (never seen by any cache node) pushed as the layers of ``repo:v1``."""
    blobs = [os.urandom(n) for n in sizes]
    push_image(registry.host, repo, "v1", [(OCTET, b) for b in blobs])
    return blobs


def read_image(base: str, repo: str, ref: str, headers: dict[str, str]) -> dict[str, bytes]:
    """Every manifest and blob of an image (all platforms) as ``base`` serves them: path -> bytes."""
    out: dict[str, bytes] = {}

    def get(path: str) -> bytes:
        a = http(f"{base}/v2/{repo}/{path}", {**headers, **ACCEPT})
        assert a.status == 200, (path, a.status, a.body[:300])
        if path.startswith("blobs/") or path.startswith("manifests/sha256:"):
            assert sha256(a.body) == path.split("/", 1)[1], path
        out[path] = a.body
        return a.body

    todo = [f"manifests/{ref}"]
    while todo:
        doc = json.loads(get(todo.pop()))
        todo += [f"manifests/{m['digest']}" for m in doc.get("manifests", [])]
        for d in [doc.get("config"), *doc.get("layers", [])]:
            if d:
                get(f"blobs/{d['digest']}")
    return out


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    started: float
    last_block: float | None = None  # when the latest block of the body started out


@dataclass
class SlowProxy:
    """A small HTTP proxy in front of the registry that records every request and sends the
    body of whole-blob GETs (no Range header; Range GETs too with ``slow_ranges``) at ``rate``
    bytes per second."""

    upstream: str
    rate: int
    slow_ranges: bool = False
    requests: list[Seen] = field(default_factory=list)
    host: str = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rng = request.headers.get("Range")
        seen = Seen(request.method, request.path, rng, time.monotonic())
        self.requests.append(seen)
        slow = request.method == "GET" and "/blobs/" in request.path and (rng is None or self.slow_ranges)
        keep = ("Authorization", "Range", "Accept")
        headers = {k: request.headers[k] for k in keep if k in request.headers}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.request(
                request.method, f"http://{self.upstream}{request.path_qs}", headers=headers, allow_redirects=False
            ) as up,
        ):
            drop = {"transfer-encoding", "connection", "keep-alive", "content-encoding"}
            resp = web.StreamResponse(
                status=up.status, headers={k: v for k, v in up.headers.items() if k.lower() not in drop}
            )
            await resp.prepare(request)
            async for block in up.content.iter_chunked(64 << 10):
                seen.last_block = time.monotonic()
                try:
                    await resp.write(block)
                except ConnectionError:
                    return resp
                if slow:
                    await asyncio.sleep(len(block) / self.rate)
            await resp.write_eof()
            return resp

    def gets(self, digest: str, ranged: bool = False) -> list[Seen]:
        return [
            s for s in self.requests
            if s.method == "GET" and s.path.endswith(f"/blobs/{digest}") and (s.range is not None) == ranged
        ]  # fmt: skip

    def full_gets(self, digest: str) -> int:
        return len(self.gets(digest))

    def range_gets(self, digest: str) -> int:
        return len(self.gets(digest, ranged=True))


@contextmanager
def slow_proxy(registry: Registry, rate: int, slow_ranges: bool = False) -> Iterator[SlowProxy]:
    proxy = SlowProxy(registry.host, rate, slow_ranges)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy._handle)
    server = ThreadedApp(app)
    proxy.host = f"127.0.0.1:{server.start()}"
    try:
        yield proxy
    finally:
        server.stop()


# -- pull-through, store, ranges -----------------------------------------------------------


def test_a_whole_image_equals_the_registrys_and_is_then_served_from_the_store(
    registry: Registry, images: dict[str, str], tmp_path: Path
) -> None:
    with cache_node(tmp_path / "data", [{"host": registry.host}]) as node:
        for name in ("app", "multi"):
            repo = f"fixtures/{name}"
            direct = read_image(f"http://{registry.host}", repo, "v1", {})
            first = read_image(f"http://{node.host}", repo, "v1", BEARER)
            assert first == direct
            assert any(p.startswith("blobs/") for p in first) and len(first) >= 3
            node.wait_idle()  # the last blob is renamed into place just after its last block went out
            before = settled_log(registry)
            second = read_image(f"http://{node.host}", repo, "v1", BEARER)
            assert second == direct
            fetched = [(m, p) for m, p in settled_log(registry)[len(before) :] if p.startswith(f"/v2/{repo}/")]
            assert fetched == []  # no manifest, no blob, not even the tag (within manifest_ttl)
            for path, data in direct.items():
                kind, digest = path.split("/", 1)
                if digest.startswith("sha256:"):
                    assert node.stored(kind, digest).read_bytes() == data
        m = node.metrics()
        assert m['imgaccel_cachenode_lookups_total{kind="blob",result="hit"}'] >= 4
        assert m['imgaccel_cachenode_served_bytes_total{source="cache"}'] > 0


def test_tags_are_resolved_again_after_the_ttl(registry: Registry, tmp_path: Path) -> None:
    repo = "cachenode/retag"
    random_blobs(registry, repo, [1000])
    with cache_node(tmp_path / "data", [{"host": registry.host}], manifest_ttl=5) as node:
        first = http(node.url(f"/v2/{repo}/manifests/v1"), {**BEARER, **ACCEPT})
        resolved = time.monotonic()
        push_image(registry.host, repo, "v1", [(OCTET, os.urandom(1000))])  # v1 moves
        cached = http(node.url(f"/v2/{repo}/manifests/v1"), {**BEARER, **ACCEPT})
        assert time.monotonic() - resolved < 5
        assert cached.body == first.body  # within the TTL
        time.sleep(max(0.0, resolved + 5.1 - time.monotonic()))
        moved = http(node.url(f"/v2/{repo}/manifests/v1"), {**BEARER, **ACCEPT})
        assert moved.status == 200 and moved.body != first.body
        assert moved.body == http(f"http://{registry.host}/v2/{repo}/manifests/v1", ACCEPT).body


def test_ranges_and_multi_ranges_equal_slices_of_the_blob(registry: Registry, tmp_path: Path) -> None:
    (blob,) = random_blobs(registry, "cachenode/ranges", [3 << 20])
    digest, size = sha256(blob), len(blob)
    with cache_node(tmp_path / "data", [{"host": registry.host}]) as node:
        url = node.url(f"/v2/cachenode/ranges/blobs/{digest}")

        def check_all(expect_stored: bool) -> None:
            assert node.stored("blobs", digest).exists() == expect_stored
            for header, start, end in [
                ("bytes=0-0", 0, 1), ("bytes=100-2000000", 100, 2000001), ("bytes=3000000-", 3000000, size),
                ("bytes=-5000", size - 5000, size), (f"bytes={size - 10}-{size + 100}", size - 10, size),
            ]:  # fmt: skip
                a = http(url, {**BEARER, "Range": header})
                assert a.status == 206, (header, a.status, a.body[:200])
                assert a.headers["Content-Range"] == f"bytes {start}-{end - 1}/{size}"
                assert a.body == blob[start:end]
            a = http(url, {**BEARER, "Range": f"bytes={size}-"})
            assert a.status == 416 and a.headers["Content-Range"] == f"bytes */{size}"
            assert http(url, {**BEARER, "Range": "bytes=oops"}).status == 416
            spans = [(5, 10), (1 << 20, (1 << 20) + 4096), (size - 3, size)]
            raw = http(url, {**BEARER, "Range": "bytes=" + ",".join(f"{s}-{e - 1}" for s, e in spans)})
            assert raw.status == 206 and raw.headers["Content-Type"].startswith("multipart/byteranges; boundary=")
            assert int(raw.headers["Content-Length"]) == len(raw.body)
            for s, e in spans:  # each part says which bytes it holds, then holds them
                assert f"Content-Range: bytes {s}-{e - 1}/{size}\r\n".encode() + b"Content-Type: " in raw.body
                assert blob[s:e] in raw.body

            async def through_client() -> list[bytes]:  # the project's own multipart reader
                async with RegistryClient(node.host, credentials=Credentials("node", TOKEN)) as client:
                    parts = await client.fetch_ranges("cachenode/ranges", digest, spans)
                    assert not client.multi_range_unsupported
                    return parts

            assert asyncio.run(through_client()) == [blob[s:e] for s, e in spans]

        check_all(expect_stored=False)  # answered from upstream (a Range request each)
        node.wait_idle()
        assert node.stored("blobs", digest).read_bytes() == blob  # filled in the background
        check_all(expect_stored=True)  # now from the store
        whole = http(url, BEARER)
        assert whole.status == 200 and whole.body == blob and whole.headers["Docker-Content-Digest"] == digest
        head = http(url, BEARER, method="HEAD")
        assert head.status == 200 and head.headers["Content-Length"] == str(size) and head.body == b""


def test_a_range_of_an_uncached_blob_is_answered_before_the_blob_is_stored(registry: Registry, tmp_path: Path) -> None:
    (blob,) = random_blobs(registry, "cachenode/slow", [4 << 20])
    digest = sha256(blob)
    with (
        slow_proxy(registry, rate=1 << 20) as proxy,  # the whole blob takes ~4 s upstream
        cache_node(tmp_path / "data", [{"host": proxy.host}]) as node,
    ):
        started = time.monotonic()
        a = http(node.url(f"/v2/cachenode/slow/blobs/{digest}"), {**BEARER, "Range": "bytes=2000000-2099999"})
        answered = time.monotonic() - started
        assert a.status == 206 and a.body == blob[2000000:2100000]
        assert not node.stored("blobs", digest).exists()
        assert answered < 2.0, answered
        assert proxy.range_gets(digest) == 1
        while not node.stored("blobs", digest).exists():  # the background fill finishes later
            assert time.monotonic() - started < 30
            time.sleep(0.05)
        assert time.monotonic() - started > 3.0
        assert proxy.full_gets(digest) == 1
        assert node.stored("blobs", digest).read_bytes() == blob


def test_concurrent_gets_of_one_blob_fetch_it_upstream_once(registry: Registry, tmp_path: Path) -> None:
    (blob,) = random_blobs(registry, "cachenode/once", [3 << 20])
    digest = sha256(blob)
    with (
        slow_proxy(registry, rate=2 << 20) as proxy,  # the fill takes ~1.5 s: every GET joins it
        cache_node(tmp_path / "data", [{"host": proxy.host}]) as node,
    ):

        async def get_all(n: int) -> list[bytes]:
            async with aiohttp.ClientSession() as session:

                async def one() -> bytes:
                    async with session.get(node.url(f"/v2/cachenode/once/blobs/{digest}"), headers=BEARER) as r:
                        assert r.status == 200
                        return await r.read()

                return await asyncio.gather(*(one() for _ in range(n)))

        bodies = asyncio.run(get_all(6))
        assert all(b == blob for b in bodies)
        assert proxy.full_gets(digest) == 1
        assert sum(1 for s in proxy.requests if s.method == "HEAD" and s.path.endswith(digest)) <= 1
        assert node.metrics()['imgaccel_cachenode_served_bytes_total{source="upstream"}'] == 6 * len(blob)


def test_background_fills_are_bounded_and_a_whole_get_does_not_wait_for_one(registry: Registry, tmp_path: Path) -> None:
    blobs = random_blobs(registry, "cachenode/bounded", [2 << 20, 2 << 20])
    a, b = (sha256(x) for x in blobs)
    with (
        slow_proxy(registry, rate=1 << 20) as proxy,  # a whole blob takes ~2 s upstream
        cache_node(tmp_path / "data", [{"host": proxy.host}], fill_concurrency=1) as node,
    ):
        for digest in (a, b):
            r = http(node.url(f"/v2/cachenode/bounded/blobs/{digest}"), {**BEARER, "Range": "bytes=0-99"})
            assert r.status == 206
        m = node.metrics()
        assert m["imgaccel_cachenode_fills_in_flight"] == 1 and m["imgaccel_cachenode_fills_waiting"] == 1
        assert proxy.full_gets(a) == 1 and proxy.full_gets(b) == 0  # b waits for a's slot
        whole = http(node.url(f"/v2/cachenode/bounded/blobs/{b}"), BEARER)  # wanted now: starts at once
        assert whole.body == blobs[1] and proxy.full_gets(b) == 1
        node.wait_idle()
        (fill_a,), (fill_b,) = proxy.gets(a), proxy.gets(b)
        assert fill_a.last_block is not None and fill_b.started < fill_a.last_block  # b did not wait for a's slot
        assert all(node.stored("blobs", d).read_bytes() == x for d, x in zip((a, b), blobs, strict=True))
        assert proxy.full_gets(a) == 1 and proxy.full_gets(b) == 1


def test_a_tag_is_served_from_its_last_answer_while_upstream_fails(registry: Registry, tmp_path: Path) -> None:
    repo = "cachenode/stale"
    random_blobs(registry, repo, [1000])
    tag_path = f"/v2/{repo}/manifests/v1"
    proxy = FaultProxy(registry.host, lambda method, path, n: "503" if path == tag_path and n > 1 else None).start()
    try:
        with cache_node(tmp_path / "data", [{"host": proxy.host}], manifest_ttl=0) as node:
            first = http(node.url(tag_path), {**BEARER, **ACCEPT})
            assert first.status == 200
            again = http(node.url(tag_path), {**BEARER, **ACCEPT})  # ttl 0: asks upstream, which fails
            assert again.status == 200 and again.body == first.body
            assert proxy.faults["503"] > 0
            missing = http(node.url(f"/v2/{repo}/manifests/v2"), {**BEARER, **ACCEPT})
            assert missing.status == 404 and b"MANIFEST_UNKNOWN" in missing.body
    finally:
        proxy.stop()


def test_a_corrupt_blob_upstream_is_never_stored_nor_served_as_good(registry: Registry, tmp_path: Path) -> None:
    (blob,) = random_blobs(registry, "cachenode/corrupt", [2 << 20])
    digest = sha256(blob)
    path = registry.blob_path(digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = bytes(64)
    path.write_bytes(bytes(data))

    async def whole(url: str) -> bytes:
        async with aiohttp.ClientSession() as session, session.get(url, headers=BEARER) as r:
            assert r.status == 200 and r.headers["Content-Length"] == str(len(blob))
            return await r.read()

    with cache_node(tmp_path / "data", [{"host": registry.host}]) as node:
        url = node.url(f"/v2/cachenode/corrupt/blobs/{digest}")
        for _ in range(2):  # the second attempt fetches again: nothing was kept
            with pytest.raises(aiohttp.ClientPayloadError):
                asyncio.run(whole(url))
            node.wait_idle()
            assert not node.stored("blobs", digest).exists()
            assert list((node.data / "tmp").iterdir()) == []
        assert node.metrics()['imgaccel_cachenode_fills_total{result="failed"}'] == 2


def test_a_blob_damaged_in_the_store_is_dropped_not_served(registry: Registry, tmp_path: Path) -> None:
    (blob,) = random_blobs(registry, "cachenode/rot", [2 << 20])
    digest = sha256(blob)
    with cache_node(tmp_path / "data", [{"host": registry.host}]) as node:
        url = node.url(f"/v2/cachenode/rot/blobs/{digest}")
        assert http(url, BEARER).body == blob
        node.wait_idle()
        stored = node.stored("blobs", digest)
        damaged = bytearray(stored.read_bytes())
        damaged[-10] ^= 0xFF
        stored.write_bytes(bytes(damaged))

        async def whole() -> bytes:
            async with aiohttp.ClientSession() as session, session.get(url, headers=BEARER) as r:
                return await r.read()

        with pytest.raises(aiohttp.ClientPayloadError):
            asyncio.run(whole())
        assert not stored.exists()
        assert http(url, BEARER).body == blob  # fetched again from upstream
        node.wait_idle()
        assert stored.read_bytes() == blob


def test_eviction_keeps_the_store_under_max_size(registry: Registry, tmp_path: Path) -> None:
    mib = 1 << 20
    blobs = random_blobs(registry, "cachenode/evict", [mib] * 5)
    digests = [sha256(b) for b in blobs]
    with cache_node(tmp_path / "data", [{"host": registry.host}], max_size="3MiB") as node:

        def read(i: int) -> None:
            a = http(node.url(f"/v2/cachenode/evict/blobs/{digests[i]}"), BEARER)
            assert a.status == 200 and a.body == blobs[i]
            node.wait_idle()
            assert node.disk_bytes() <= 3 * mib

        def held() -> set[int]:
            return {i for i, d in enumerate(digests) if node.stored("blobs", d).exists()}

        for i in (0, 1, 2):
            read(i)
        assert held() == {0, 1, 2}
        read(0)  # used again: now the most recently used
        read(3)
        assert held() == {0, 2, 3}  # the least recently used went
        read(4)
        assert held() == {0, 3, 4}
        m = node.metrics()
        assert m["imgaccel_cachenode_evictions_total"] == 2
        assert m["imgaccel_cachenode_evicted_bytes_total"] == 2 * mib
        assert m["imgaccel_cachenode_store_bytes"] == 3 * mib
    with cache_node(tmp_path / "data", [{"host": registry.host}], max_size="2MiB") as node:
        assert node.disk_bytes() <= 2 * mib  # a restart with a smaller bound evicts at once,
        # in mtime order: a use is written to the file's mtime at most once a minute, so blob 0
        # (stored first, used again seconds later) counts as the oldest after a restart
        assert {i for i, d in enumerate(digests) if node.stored("blobs", d).exists()} == {3, 4}


def test_upstream_selection_with_ns(registry: Registry, tmp_path: Path) -> None:
    (blob,) = random_blobs(registry, "cachenode/ns", [1000])
    other = f"127.0.0.1:{free_port()}"
    with cache_node(tmp_path / "data", [{"host": "registry.example"}, {"host": registry.host}]) as node:
        path = f"/v2/cachenode/ns/blobs/{sha256(blob)}"
        assert http(node.url(f"{path}?ns={registry.host}"), BEARER).body == blob
        missing = http(node.url(path), BEARER)
        assert missing.status == 404 and b"ns=" in missing.body
        unknown = http(node.url(f"{path}?ns={other}"), BEARER)
        assert unknown.status == 404 and b"not an upstream" in unknown.body
        assert http(node.url(f"/v2/cachenode/ns/blobs/{sha256(b'x')}?ns={registry.host}"), BEARER).status == 404
        assert http(node.url(f"/v2/Bad..Name/blobs/{sha256(blob)}?ns={registry.host}"), BEARER).status == 400
        assert http(node.url(f"/v2/cachenode/ns/blobs/sha256:abc?ns={registry.host}"), BEARER).status == 400
        assert http(node.url(f"{path}?ns={registry.host}"), BEARER, method="DELETE").status == 405


def test_referrers_are_passed_through(registry: Registry, tmp_path: Path) -> None:
    random_blobs(registry, "cachenode/refs", [100])
    digest = sha256(http(f"http://{registry.host}/v2/cachenode/refs/manifests/v1", ACCEPT).body)
    upstream = http(f"http://{registry.host}/v2/cachenode/refs/referrers/{digest}")
    with cache_node(tmp_path / "data", [{"host": registry.host}]) as node:
        a = http(node.url(f"/v2/cachenode/refs/referrers/{digest}"), BEARER)
        assert a.status == upstream.status == 404  # distribution 2.8 has no referrers API
        assert http(node.url(f"/v2/cachenode/refs/referrers/{digest}")).status == 401


# -- access ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    d = tmp_path_factory.mktemp("cachenode-authreg")
    htpasswd = subprocess.run(["htpasswd", "-Bbn", "alice", "s3cret"], capture_output=True, text=True, check=True)
    (d / "htpasswd").write_text(htpasswd.stdout)
    reg = start_registry(d, f"auth:\n  htpasswd:\n    realm: imgaccel-test\n    path: {d / 'htpasswd'}\n")
    try:
        yield reg
    finally:
        reg.stop()


def push_private(registry: Registry, repo: str, blob: bytes) -> None:
    async def go() -> None:
        async with RegistryClient(registry.host, credentials=Credentials("alice", "s3cret")) as client:
            await client.upload_blob(repo, sha256(blob), blob)
            config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
            await client.upload_blob(repo, sha256(config), config)
            manifest = {
                "schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                "config": {"mediaType": oci.OCI_CONFIG, "digest": sha256(config), "size": len(config)},
                "layers": [{"mediaType": OCTET, "digest": sha256(blob), "size": len(blob)}],
            }  # fmt: skip
            await client.put_manifest(repo, "v1", json.dumps(manifest).encode(), oci.OCI_MANIFEST)

    asyncio.run(go())


def test_no_one_reads_what_they_could_not_pull(auth_registry: Registry, tmp_path: Path) -> None:
    blob = os.urandom(100_000)
    push_private(auth_registry, "private/app", blob)
    push_private(auth_registry, "private/other", os.urandom(1000))
    upstream = {"host": auth_registry.host, "username": "alice", "password": {"value": "s3cret"}}
    with cache_node(tmp_path / "data", [upstream]) as node:
        path = f"/v2/private/app/blobs/{sha256(blob)}"
        assert http(node.url(path), BEARER).body == blob  # the cluster token reads; the blob is now stored
        node.wait_idle()
        assert node.stored("blobs", sha256(blob)).exists()
        manifest = http(node.url("/v2/private/app/manifests/v1"), {**BEARER, **ACCEPT})
        assert manifest.status == 200
        by_digest = f"/v2/private/app/manifests/{sha256(manifest.body)}"

        refused = [
            {}, {"Authorization": "Bearer not-the-token-0123456789"}, basic("alice", "wrong"),
            basic("mallory", TOKEN[:-1]), {"Authorization": "Basic %%%"}, {"Authorization": "Digest x"},
        ]  # fmt: skip
        for headers in refused:
            for p in (path, by_digest, "/v2/private/app/manifests/v1"):
                a = http(node.url(p), {**headers, **ACCEPT})
                assert a.status in (401, 403), (headers, p, a.status)
                assert blob not in a.body
                if a.status == 401:
                    assert a.headers["WWW-Authenticate"] == 'Basic realm="imgaccel-cachenode"'
            assert http(node.url(path), headers, method="HEAD").status in (401, 403)

        # The registry's own credentials: checked upstream (with the node's check that the blob
        # is in this repository) on the first read, then remembered for auth_ttl.
        assert http(node.url(path), basic("alice", "s3cret")).body == blob
        before = settled_log(auth_registry)
        for _ in range(3):
            a = http(node.url(path), basic("alice", "s3cret"))
            assert a.status == 200 and a.body == blob
        assert [x for x in settled_log(auth_registry)[len(before) :] if x[1] == path] == []
        assert http(node.url(by_digest), {**basic("alice", "s3cret"), **ACCEPT}).body == manifest.body
        # alice:wrong was refused above: the refusal is remembered too, upstream is not asked again.
        before = settled_log(auth_registry)
        for _ in range(3):
            assert http(node.url(path), basic("alice", "wrong")).status == 401
        assert [x for x in settled_log(auth_registry)[len(before) :] if x[1] == path] == []
        # A cluster token's password form works for Basic-only clients.
        assert http(node.url(path), basic("anyone", TOKEN)).body == blob
        # Access to one repository does not read a stored blob through another.
        a = http(node.url(f"/v2/private/other/blobs/{sha256(blob)}"), basic("alice", "s3cret"))
        assert a.status == 404 and blob not in a.body
        # The base endpoint asks for credentials too.
        assert http(node.url("/v2/")).status == 401
        assert http(node.url("/v2/"), BEARER).status == 200
        assert node.metrics()['imgaccel_cachenode_access_total{result="denied"}'] >= 20

    with cache_node(tmp_path / "data", [{**upstream, "anonymous": True}]) as node:
        a = http(node.url(path))  # the registry does not let anonymous clients pull: neither does the node
        assert a.status == 401 and blob not in a.body


def test_anonymous_reads_of_a_public_upstream(registry: Registry, tmp_path: Path) -> None:
    (blob,) = random_blobs(registry, "cachenode/public", [5000])
    path = f"/v2/cachenode/public/blobs/{sha256(blob)}"
    with cache_node(tmp_path / "closed", [{"host": registry.host}]) as node:
        assert http(node.url(path)).status == 401
    with cache_node(tmp_path / "open", [{"host": registry.host, "anonymous": True}]) as node:
        assert http(node.url(path)).body == blob
        assert http(node.url("/v2/")).status == 200
        assert http(node.url(path), {"Authorization": "Bearer wrong-token-0123456789"}).status == 401


# -- chunk-aware requests (Imgaccel-Chunks) ------------------------------------------------------


FAST = 1 << 40  # SlowProxy rate: no slowing down, only counting


def listing(blob: bytes, spans: list[tuple[int, int]]) -> list[tuple[int, int, str]]:
    """``(offset, length, sha256)`` of ``blob[start:end]`` for each span: chunks as an index lists them."""
    return [(s, e - s, sha256(blob[s:e])) for s, e in spans]


def chunk_request(spans: list[tuple[int, int]], chunks: list[tuple[int, int, str]]) -> dict[str, str]:
    return {"Range": "bytes=" + ",".join(f"{s}-{e - 1}" for s, e in spans), CHUNKS_HEADER: format_chunks(chunks)}


def fetch(node: Node, repo: str, digest: str, spans: list[tuple[int, int]], headers: dict[str, str]) -> list[bytes]:
    """``spans`` of the blob through the project's client (cluster token), with ``headers``."""

    async def go() -> list[bytes]:
        async with RegistryClient(node.host, credentials=Credentials("node", TOKEN)) as client:
            return await client.fetch_ranges(repo, digest, spans, headers=headers)

    return asyncio.run(go())


def stored_chunks(node: Node, digest: str) -> set[str]:
    d = node.data / "chunks" / "sha256" / digest.split(":", 1)[1]
    return {p.name for p in d.iterdir()} if d.exists() else set()


def blob_requests(proxy: SlowProxy, digest: str, since: int = 0) -> list[Seen]:
    return [s for s in proxy.requests[since:] if s.path.endswith(f"/blobs/{digest}")]


def test_listed_chunks_are_kept_and_served_again_without_upstream(registry: Registry, tmp_path: Path) -> None:
    repo = "cachenode/chunks"
    (blob,) = random_blobs(registry, repo, [3 << 20])
    digest = sha256(blob)
    # Like index-mode gzip chunks, neighbours share one byte; a second range holds one more chunk.
    chunks = listing(blob, [(1000, 201_000), (200_999, 500_999), (500_998, 600_999), (2_000_000, 2_050_000)])
    spans = [(1000, 600_999), (2_000_000, 2_050_000)]
    expect = [blob[s:e] for s, e in spans]
    with (
        slow_proxy(registry, FAST) as proxy,
        cache_node(tmp_path / "data", [{"host": proxy.host}]) as node,
    ):
        assert fetch(node, repo, digest, spans, {CHUNKS_HEADER: format_chunks(chunks)}) == expect
        node.wait_idle()
        m = node.metrics()
        assert m['imgaccel_cachenode_chunks_total{result="stored"}'] == 4
        assert m["imgaccel_cachenode_store_chunks"] == 4
        assert stored_chunks(node, digest) == {f"{o}-{n}-{d.split(':')[1]}" for o, n, d in chunks}
        assert not node.stored("blobs", digest).exists()  # no whole-blob fill, now or later
        assert proxy.full_gets(digest) == 0 and not any(k.startswith("imgaccel_cachenode_fills_total") for k in m)
        upstream = m["imgaccel_cachenode_upstream_bytes_total"]
        assert upstream == sum(n for _, n, _ in chunks) - 2  # each shared byte fetched once

        seen = len(proxy.requests)
        assert fetch(node, repo, digest, spans, {CHUNKS_HEADER: format_chunks(chunks)}) == expect
        # Bytes inside stored chunks come from them, whatever the request lists (here a chunk
        # elsewhere): the same ranges again, and a range across two chunks.
        elsewhere = {CHUNKS_HEADER: format_chunks(chunks[3:])}
        assert fetch(node, repo, digest, [(150_000, 250_000)], elsewhere) == [blob[150_000:250_000]]
        # An empty list: a prefix read of a chunk, which a node lists nowhere.
        assert fetch(node, repo, digest, [(200_999, 300_000)], {CHUNKS_HEADER: ""}) == [blob[200_999:300_000]]
        assert blob_requests(proxy, digest, seen) == []  # not even a HEAD
        m = node.metrics()
        assert m["imgaccel_cachenode_upstream_bytes_total"] == upstream
        served = sum(map(len, expect)) + 100_000 + 99_001
        assert m['imgaccel_cachenode_served_bytes_total{source="chunks"}'] == served
        # Bytes no stored chunk covers come from upstream, still without a whole-blob fill.
        assert fetch(node, repo, digest, [(2_500_000, 2_600_000)], {CHUNKS_HEADER: ""}) == [blob[2_500_000:2_600_000]]
        node.wait_idle()
        assert node.metrics()["imgaccel_cachenode_upstream_bytes_total"] == upstream + 100_000
        assert not node.stored("blobs", digest).exists() and proxy.full_gets(digest) == 0

        # Without the header a Range request behaves as before: from upstream, whole blob filled.
        assert fetch(node, repo, digest, [(0, 100)], {}) == [blob[:100]]
        node.wait_idle()
        assert node.stored("blobs", digest).read_bytes() == blob
        assert stored_chunks(node, digest) == set()  # the blob serves every range: chunks dropped
        assert node.metrics()["imgaccel_cachenode_store_chunks"] == 0


def test_concurrent_requests_for_one_chunk_fetch_it_upstream_once(registry: Registry, tmp_path: Path) -> None:
    repo = "cachenode/chunkonce"
    (blob,) = random_blobs(registry, repo, [2 << 20])
    digest = sha256(blob)
    chunks = listing(blob, [(0, 1 << 20), (1 << 20, 2 << 20)])
    with (
        slow_proxy(registry, 2 << 20, slow_ranges=True) as proxy,  # the chunk takes ~0.5 s upstream
        cache_node(tmp_path / "data", [{"host": proxy.host}]) as node,
    ):
        url = node.url(f"/v2/{repo}/blobs/{digest}")
        http(url, BEARER, method="HEAD")  # the size is known: the requests below plan at once

        async def get_all(n: int) -> list[bytes]:
            async with aiohttp.ClientSession() as session:

                async def one() -> bytes:
                    headers = {**BEARER, **chunk_request([(0, 1 << 20)], chunks[:1])}
                    async with session.get(url, headers=headers) as r:
                        assert r.status == 206
                        return await r.read()

                return await asyncio.gather(*(one() for _ in range(n)))

        assert asyncio.run(get_all(8)) == [blob[: 1 << 20]] * 8
        assert len(blob_requests(proxy, digest)) == 2  # the HEAD, and one Range GET
        m = node.metrics()
        assert m["imgaccel_cachenode_upstream_bytes_total"] == 1 << 20
        assert m['imgaccel_cachenode_chunks_total{result="stored"}'] == 1
        assert m['imgaccel_cachenode_lookups_total{kind="chunk",result="joined"}'] == 7  # then read it stored
        assert m['imgaccel_cachenode_served_bytes_total{source="chunks"}'] == 7 << 20


def test_chunks_survive_a_restart_and_share_the_size_bound_with_blobs(registry: Registry, tmp_path: Path) -> None:
    repo = "cachenode/chunkstore"
    chunked, whole = random_blobs(registry, repo, [600_000, 700_000])
    digest = sha256(chunked)
    chunks = listing(chunked, [(0, 300_000), (300_000, 600_000)])
    ask = {CHUNKS_HEADER: format_chunks(chunks)}
    with slow_proxy(registry, FAST) as proxy:
        with cache_node(tmp_path / "data", [{"host": proxy.host}], max_size="1MiB") as node:
            assert fetch(node, repo, digest, [(0, 600_000)], ask) == [chunked]
        (tmp_path / "data" / "tmp" / "chunks-left-over.123").write_bytes(b"a fill cut short")
        with cache_node(tmp_path / "data", [{"host": proxy.host}], max_size="1MiB") as node:
            assert list((node.data / "tmp").iterdir()) == []
            m = node.metrics()
            assert m["imgaccel_cachenode_store_chunks"] == 2 and m["imgaccel_cachenode_store_bytes"] == 600_000
            seen = len(proxy.requests)
            assert fetch(node, repo, digest, [(0, 600_000)], ask) == [chunked]
            assert [s.method for s in blob_requests(proxy, digest, seen)] == ["HEAD"]  # its size, after the restart
            # A blob stored whole makes room by evicting the least recently used entries: here a chunk.
            assert http(node.url(f"/v2/{repo}/blobs/{sha256(whole)}"), BEARER).body == whole
            node.wait_idle()
            m = node.metrics()
            assert m["imgaccel_cachenode_evictions_total"] == 1 and m["imgaccel_cachenode_store_chunks"] == 1
            assert m["imgaccel_cachenode_store_bytes"] == 1_000_000 == node.disk_bytes()
            assert stored_chunks(node, digest) == {f"300000-300000-{chunks[1][2].split(':')[1]}"}
            a = http(node.url(f"/v2/{repo}/blobs/{digest}"), {**BEARER, **chunk_request([(0, 600_000)], chunks)})
            assert a.status == 206 and a.body == chunked  # the evicted one again from upstream


def test_a_listed_chunk_that_does_not_match_is_not_kept(registry: Registry, tmp_path: Path) -> None:
    repo = "cachenode/chunkbad"
    (blob,) = random_blobs(registry, repo, [1 << 20])
    digest = sha256(blob)
    good = listing(blob, [(0, 100_000)])[0]
    wrong = (100_000, 100_000, sha256(b"not these bytes"))
    with (
        slow_proxy(registry, FAST) as proxy,
        cache_node(tmp_path / "data", [{"host": proxy.host}]) as node,
    ):
        url = node.url(f"/v2/{repo}/blobs/{digest}")
        for _ in range(2):  # the wrong one is fetched again the second time: it was not kept
            a = http(url, {**BEARER, **chunk_request([(0, 200_000)], [good, wrong])})
            assert a.status == 206 and a.body == blob[:200_000]  # the client verifies its own chunks
        assert stored_chunks(node, digest) == {f"0-100000-{good[2].split(':')[1]}"}
        m = node.metrics()
        assert m['imgaccel_cachenode_chunks_total{result="stored"}'] == 1
        assert m['imgaccel_cachenode_chunks_total{result="mismatch"}'] == 2
        assert m["imgaccel_cachenode_upstream_bytes_total"] == 200_000 + 100_000
        assert [s.range for s in blob_requests(proxy, digest) if s.method == "GET"] == [
            "bytes=0-199999", "bytes=100000-199999"
        ]  # fmt: skip
        assert list((node.data / "tmp").iterdir()) == []

        d = good[2]
        for value, why in [
            ("0+10=sha256:abc", "is not <offset>+<length>=sha256:<hex>"),
            (f"0+100={d}, 50+100={d}", "out of order or overlaps"),
            (f"50+10={d},0+10={d}", "out of order or overlaps"),
            (f"0+{(1 << 20) + 1}={d}", "past the blob's"),
            (",".join(f"{i}+1={d}" for i in range(513)), "at most 512"),
        ]:
            a = http(url, {**BEARER, "Range": "bytes=0-99", CHUNKS_HEADER: value})
            assert a.status == 400, (value[:40], a.status)
            error = json.loads(a.body)["errors"][0]
            assert error["code"] == "RANGE_INVALID" and why in error["message"] and "\n" not in error["message"]


def test_a_header_of_the_most_chunks_allowed_is_accepted(registry: Registry, tmp_path: Path) -> None:
    repo = "cachenode/chunkmany"
    (blob,) = random_blobs(registry, repo, [600_000])
    digest = sha256(blob)
    chunks = listing(blob, [(1000 * i, 1000 * (i + 1)) for i in range(MAX_CHUNKS)])
    headers = chunk_request([(0, 1000 * MAX_CHUNKS)], chunks)
    assert len(headers[CHUNKS_HEADER]) > 40_000  # far over aiohttp's default 8190-byte field limit
    with cache_node(tmp_path / "data", [{"host": registry.host}]) as node:
        a = http(node.url(f"/v2/{repo}/blobs/{digest}"), {**BEARER, **headers})
        assert a.status == 206 and a.body == blob[: 1000 * MAX_CHUNKS]
        assert len(stored_chunks(node, digest)) == MAX_CHUNKS


def test_stored_chunks_are_read_only_by_who_may_pull(auth_registry: Registry, tmp_path: Path) -> None:
    blob = os.urandom(300_000)
    push_private(auth_registry, "private/chunky", blob)
    push_private(auth_registry, "private/elsewhere", os.urandom(1000))
    digest = sha256(blob)
    ask = chunk_request([(0, 200_000)], listing(blob, [(0, 100_000), (100_000, 200_000)]))
    upstream = {"host": auth_registry.host, "username": "alice", "password": {"value": "s3cret"}}
    with cache_node(tmp_path / "data", [upstream]) as node:
        path = f"/v2/private/chunky/blobs/{digest}"
        a = http(node.url(path), {**BEARER, **ask})
        assert a.status == 206 and a.body == blob[:200_000]
        assert len(stored_chunks(node, digest)) == 2
        for headers in [{}, {"Authorization": "Bearer not-the-token-0123456789"}, basic("alice", "wrong")]:
            a = http(node.url(path), {**headers, **ask})
            assert a.status in (401, 403), (headers, a.status)
            assert blob[:1000] not in a.body
        # Pull access to another repository does not read the chunks through it.
        a = http(node.url(f"/v2/private/elsewhere/blobs/{digest}"), {**basic("alice", "s3cret"), **ask})
        assert a.status == 404 and blob[:1000] not in a.body
        before = settled_log(auth_registry)
        a = http(node.url(path), {**basic("alice", "s3cret"), **ask})
        assert a.status == 206 and a.body == blob[:200_000]
        gets = [x for x in settled_log(auth_registry)[len(before) :] if x == ("GET", path)]
        assert gets == []  # alice's access was checked upstream (a HEAD); the bytes came from the chunks


# -- the lazy reader through the cache node ----------------------------------------------------


@pytest.mark.parametrize("mode", ["index", "full"])
def test_the_lazy_reader_reads_through_the_cache_node(
    registry: Registry, converted: dict[str, str], tmp_path: Path, mode: str
) -> None:
    tag = converted[mode].rsplit(":", 1)[1]
    files = ["/etc/motd", "/data/big.bin", "/usr/share/zlayer/big", "/unicode/日本語.txt", "/data/hl-b"]

    async def read_all(host: str, credentials: Credentials | None) -> dict[str, bytes]:
        async with RegistryClient(host, credentials=credentials) as client:
            image = await open_image(client, ImageRef(host, "fixtures/app", tag))
            return {f: await image.read_file(f) for f in files}

    expected = asyncio.run(read_all(registry.host, None))
    with cache_node(tmp_path / "data", [{"host": registry.host}]) as node:
        # RegistryClient has no static bearer token: it answers the node's Basic challenge with
        # the cluster token as the password.
        assert asyncio.run(read_all(node.host, Credentials("node", TOKEN))) == expected
        assert expected["/etc/motd"] == b"layer 2 motd\n"
        m = node.metrics()
        assert m['imgaccel_cachenode_served_bytes_total{source="upstream"}'] > 0
        assert m['imgaccel_cachenode_access_total{result="cluster"}'] > 0
        with pytest.raises(AuthError, match="401"):
            asyncio.run(read_all(node.host, Credentials("node", "not-the-cluster-token")))


# -- the command line ------------------------------------------------------------------------


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imgaccel.cli.main", "cachenode", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)  # fmt: skip


def test_cli_refuses_bad_config_and_unusable_data_dir(registry: Registry, tmp_path: Path) -> None:
    cases = {
        "upstreams: []\n": "upstreams: List should have at least 1 item",
        "upstreams: [{host: 'a b'}]\n": "upstreams.0.host: invalid registry host",
        f"upstreams: [{{host: {registry.host}}}]\nmax_size: lots\n": "max_size: 'lots' is not a size",
        f"upstreams: [{{host: {registry.host}}}]\ncluster_tokens: [{{value: short}}]\n": "at least 16 characters",
        f"upstreams: [{{host: {registry.host}}}]\nlisten: nowhere\n": "listen: 'nowhere': expected HOST:PORT",
        "upstreams: [\n": "not valid YAML",
        f"upstreams: [{{host: {registry.host}}}]\nsurprise: 1\n": "surprise: Extra inputs are not permitted",
    }
    for text, message in cases.items():
        (tmp_path / "c.yaml").write_text(text)
        r = cli("--config", str(tmp_path / "c.yaml"))
        assert r.returncode == 2, (text, r.stderr)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (text, r.stderr)
    r = cli("--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "cannot read config" in r.stderr
    (tmp_path / "c.yaml").write_text(f"upstreams: [{{host: {registry.host}}}]\n")
    (tmp_path / "a-file").write_text("")
    r = cli("--config", str(tmp_path / "c.yaml"), "--data-dir", str(tmp_path / "a-file"), "--listen", "127.0.0.1:0")
    assert r.returncode == 1, r.stderr
    assert "data_dir" in r.stderr and "cannot keep the store there" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_serves_until_terminated(registry: Registry, tmp_path: Path) -> None:
    (blob,) = random_blobs(registry, "cachenode/cli", [70_000])
    port = free_port()
    (tmp_path / "cachenode.yaml").write_text(
        f"cluster_tokens: [{{env: CACHENODE_TEST_TOKEN}}]\nupstreams: [{{host: '{registry.host}'}}]\n"
    )
    args = ["--config", str(tmp_path / "cachenode.yaml"), "--listen", f"127.0.0.1:{port}", "--data-dir",
            str(tmp_path / "data")]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgaccel.cli.main", "cachenode", *args], cwd=ROOT,
        env={**os.environ, "CACHENODE_TEST_TOKEN": TOKEN}, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if http(f"http://127.0.0.1:{port}/healthz").status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "cache node did not start"
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/v2/cachenode/cli/blobs/{sha256(blob)}"
        assert http(url, BEARER).body == blob
        assert http(url).status == 401
        stored = tmp_path / "data" / "blobs" / "sha256" / hashlib.sha256(blob).hexdigest()
        while not stored.exists():  # renamed into place just after the last block went out
            assert time.monotonic() < deadline + 10
            time.sleep(0.05)
        assert stored.read_bytes() == blob
        assert b"imgaccel_cachenode_served_bytes_total" in http(f"http://127.0.0.1:{port}/metrics").body
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr
    assert f"cache node listening on http://127.0.0.1:{port}" in stderr


def test_the_deployment_example_is_a_valid_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    docs = list(yaml.safe_load_all((ROOT / "deploy" / "cachenode.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Deployment", "Service"]
    monkeypatch.setenv("CACHENODE_TOKEN", TOKEN)
    monkeypatch.setenv("REGISTRY_PASSWORD", "s3cret")
    config = CacheNodeConfig.model_validate(yaml.safe_load(docs[0]["data"]["cachenode.yaml"]))
    assert config.max_size == 200 << 30 and config.host_port == ("0.0.0.0", 5100)
    assert docs[1]["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["imgaccel", "cachenode"]
