"""The console's nodes page in a real headless Chromium: a node's chunk-cache stats as its poll
reported them (through the real poll API of a real ``imgaccel serve``), and each configured
cache node's stats as its own ``/metrics`` says (a real ``imgaccel cachenode`` in front of the
real registry, read once, then twice from its store), next to one configured cache node that
nothing listens for. Then the scraper behind the page on its own: answers kept for its ttl,
a cache node that accepts but never answers costs its timeout only (the others are asked
concurrently), and the last time an address answered outlives it."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import yaml

from imgaccel.formats.sizes import format_size
from imgaccel.prewarm.config import CacheNodeTarget
from imgaccel.service.cache_node_stats import CacheNodeScraper
from tests.browser import WHY, By, Page, artifacts_dir, chromium
from tests.helpers import ROOT, sha256
from tests.raw_push import push_image
from tests.registry import Registry, free_port
from tests.service import make_service

pytestmark = [pytest.mark.skipif(bool(WHY), reason=WHY or "-"), pytest.mark.timeout(120)]

API_TOKEN = "nodes-api-token-0123"
NODE_TOKEN = "nodes-node-token-0123"
TOKEN = "nodes-cluster-token-0123456789"  # the cache node's cluster token
BEARER = {"Authorization": f"Bearer {TOKEN}"}
OCTET = "application/octet-stream"
NODE_STATS = {"cached_bytes": (5 << 20) + 123, "hits": 30, "misses": 10}


def _get(url: str, headers: dict[str, str] | None = None) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
        return bytes(r.read())


def metrics(address: str) -> dict[str, float]:
    """The cache node's /metrics, read here with a regex (not the parser under test)."""
    text = _get(f"http://{address}/metrics").decode()
    return {k: float(v) for k, v in re.findall(r"^(imgaccel_cachenode_\S+) (\S+)$", text, re.M)}


@contextmanager
def cachenode_process(work: Path, registry: Registry) -> Iterator[str]:
    """A real ``imgaccel cachenode`` on 127.0.0.1 in front of ``registry``; its address."""
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    (work / "cachenode.yaml").write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "data_dir": str(work / "data"), "cluster_tokens": [{"value": TOKEN}],
        "upstreams": [{"host": registry.host}],
    }))  # fmt: skip
    with open(work / "cachenode.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "imgaccel.cli.main", "cachenode", "--config",
                                 str(work / "cachenode.yaml")], stdout=log, stderr=log, cwd=ROOT)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                _get(f"http://127.0.0.1:{port}/healthz")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (work / "cachenode.log").read_text()
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(20)


def read_twice_more(address: str, work: Path, registry: Registry) -> tuple[str, bytes]:
    """A fresh blob read through the cache node: a miss (stored as it goes out), then two hits."""
    blob = os.urandom(300_000)
    push_image(registry.host, "console-nodes/blob", "v1", [(OCTET, blob)])
    url = f"http://{address}/v2/console-nodes/blob/blobs/{sha256(blob)}"
    assert _get(url, BEARER) == blob
    stored = work / "data" / "blobs" / "sha256" / sha256(blob).split(":", 1)[1]
    deadline = time.monotonic() + 20
    while not stored.exists():  # renamed into place just after its last byte went out
        assert time.monotonic() < deadline, "the blob was not stored"
        time.sleep(0.05)
    for _ in range(2):
        assert _get(url, BEARER) == blob
    return url, blob


def test_the_nodes_page_shows_each_node_and_cache_node_with_its_cache(registry: Registry, tmp_path: Path) -> None:
    with ExitStack() as stack:
        address = stack.enter_context(cachenode_process(tmp_path / "cachenode", registry))
        read_twice_more(address, tmp_path / "cachenode", registry)
        m = metrics(address)
        assert m['imgaccel_cachenode_lookups_total{kind="blob",result="miss"}'] == 1
        assert m['imgaccel_cachenode_lookups_total{kind="blob",result="hit"}'] == 2
        dead = f"127.0.0.1:{free_port()}"  # nothing listens there
        service = make_service(tmp_path / "service", {
            "reconcile_interval": 0, "rules": [{"repository": "none", "enabled": False}],
            "api_auth": {"token": {"value": API_TOKEN}},
            "prewarm": {"cache_nodes": [{"address": address}, {"address": dead}],
                        "cache_node_token": {"value": TOKEN}, "node_token": {"value": NODE_TOKEN}},
        }, token=API_TOKEN).start()  # fmt: skip
        stack.callback(service.stop)
        poll = {"labels": {"region": "r1", "card": "h200"}, "reports": [], "chunk_cache": NODE_STATS}
        status, answer = service.api("POST", "/api/v1/prewarm/nodes/gpu-7/poll", poll, NODE_TOKEN)
        assert status == 200, answer
        status, answer = service.api("POST", "/api/v1/prewarm/nodes/old-daemon/poll", {"labels": {}}, NODE_TOKEN)
        assert status == 200, answer  # a poll without stats (a daemon older than them) still counts
        driver = stack.enter_context(chromium())
        page = Page(driver, service.url, artifacts_dir(tmp_path / "screenshots"), service.log_path)
        page.login(API_TOKEN)
        page.get("/ui/nodes")

        node = 'tr[data-node="gpu-7"]'
        assert page.text(f"{node} [data-field=labels]") == "card=h200 region=r1"
        assert page.text(f"{node} [data-field=cached]") == "5.0 MiB"
        value = driver.find_element(By.CSS_SELECTOR, f"{node} [data-field=cached] data").get_attribute("value")
        assert value == str(NODE_STATS["cached_bytes"])
        assert page.text(f"{node} [data-field=hits]") == "75.0 % (30 hits, 10 misses)"
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(\d+ s ago\)", page.text(f"{node} [data-field=seen]"))
        assert "not reported" in page.text('tr[data-node="old-daemon"] [data-field=cached]')

        m = metrics(address)  # what the cache node says now (the page's scrape moved no counter)
        live = f'tr[data-cache-node="{address}"]'
        assert page.text(f"{live} [data-field=state]") == "reachable"
        stored, bound = int(m["imgaccel_cachenode_store_bytes"]), int(m["imgaccel_cachenode_store_max_bytes"])
        assert stored >= 300_000
        assert page.text(f"{live} [data-field=cached]") == f"{format_size(stored)} of {format_size(bound)}"
        values = [e.get_attribute("value") for e in driver.find_elements(By.CSS_SELECTOR, f"{live} data")]
        served = sum(v for k, v in m.items() if k.startswith("imgaccel_cachenode_served_bytes_total{"))
        assert values == [str(stored), str(bound), str(int(served))]
        assert served == 3 * 300_000
        assert page.text(f"{live} [data-field=hits]") == "66.7 % (2 hits, 1 miss)"
        from_store = m['imgaccel_cachenode_served_bytes_total{source="cache"}']
        assert (
            page.text(f"{live} [data-field=served]")
            == f"{format_size(served)} ({format_size(from_store)} from its store)"
        )
        assert "s ago)" in page.text(f"{live} [data-field=seen]")

        gone = f'tr[data-cache-node="{dead}"]'
        assert page.text(f"{gone} [data-field=state]").startswith("unreachable")
        assert f"Cannot connect to host {dead}" in page.text(f"{gone} [data-field=error]")
        assert page.text(f"{gone} [data-field=seen]") == "never"
        page.shot("nodes-stats")


async def test_the_scraper_keeps_answers_for_its_ttl_and_waits_for_no_hung_cache_node(
    registry: Registry, tmp_path: Path
) -> None:
    with ExitStack() as stack:
        address = stack.enter_context(cachenode_process(tmp_path / "cachenode", registry))
        url, _ = await asyncio.to_thread(read_twice_more, address, tmp_path / "cachenode", registry)
        hung = stack.enter_context(socket.socket())  # accepts connections (the backlog), answers nothing
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        targets = [CacheNodeTarget(address=address), CacheNodeTarget(address=f"127.0.0.1:{hung.getsockname()[1]}")]
        scraper = CacheNodeScraper(lambda: targets, ttl=600, timeout=0.5)

        started = time.monotonic()
        first, stuck = await scraper.stats()
        assert time.monotonic() - started < 1.5  # one timeout, not one per cache node
        assert (first.hits, first.misses, first.hit_ratio) == (2, 1, 2 / 3)
        assert first.reachable and first.last_seen is not None and first.served_bytes == 900_000
        assert not stuck.reachable and stuck.error == "no answer within 0.5 s" and stuck.last_seen is None

        await asyncio.to_thread(_get, url, BEARER)  # a third hit
        again, _ = await scraper.stats()
        assert again == first  # within the ttl: the answer kept, no cache node asked
        scraper.ttl = 0
        fresh, _ = await scraper.stats()
        assert (fresh.hits, fresh.misses) == (3, 1) and fresh.last_seen is not None
        assert fresh.last_seen > first.last_seen

    stopped, _ = await scraper.stats()  # the cache node has stopped
    assert not stopped.reachable and stopped.error and "Cannot connect" in stopped.error
    assert stopped.last_seen == fresh.last_seen and stopped.cached_bytes is None
