"""Retries: 429 (Retry-After honoured), 5xx and dropped connections, through a fault proxy;
registries that ignore Range or multi-range requests."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from fixtures.build_images import BIG_FILE_SIZE, push, unique_image
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.reference import parse_reference
from imgaccel.reader.accelerated_image import open_image
from tests.fault_proxy import FaultProxy
from tests.helpers import get_json, run_cli
from tests.registry import Registry


def test_conversion_survives_429_503_and_dropped_blob(registry: Registry, tmp_path: Path) -> None:
    push(unique_image(tmp_path, "faults"), "v1", f"{registry.host}/faults/app:v1")

    def rule(method: str, path: str, n: int) -> str | None:
        if "/blobs/sha256:" in path and method == "GET" and n == 1:
            return "429"
        if "/blobs/sha256:" in path and method == "GET" and n == 2:
            return "drop"
        if "/manifests/" in path and method == "PUT" and n == 1:
            return "503"
        return None

    proxy = FaultProxy(registry.host, rule).start()
    try:
        started = time.monotonic()
        r = run_cli("convert", f"{proxy.host}/faults/app:v1", "--mode", "full", "--no-cache")
        elapsed = time.monotonic() - started
        assert r.code == 0, r.err
        assert proxy.faults["429"] >= 1 and proxy.faults["drop"] >= 1 and proxy.faults["503"] >= 1
        assert elapsed >= 1.0  # Retry-After: 1 was waited out
        # The result, read straight from the registry, is intact.
        assert run_cli("check", f"{registry.host}/faults/app:v1_containerd_accelerated").code == 0
    finally:
        proxy.stop()


def test_persistent_5xx_fails_without_a_tag(registry: Registry, tmp_path: Path) -> None:
    push(unique_image(tmp_path, "fail5xx"), "v1", f"{registry.host}/faults/down:v1")

    def rule(method: str, path: str, n: int) -> str | None:
        return "503" if method == "PUT" and "/manifests/" in path else None

    proxy = FaultProxy(registry.host, rule).start()
    try:
        r = run_cli("convert", f"{proxy.host}/faults/down:v1", "--mode", "index", "--no-cache")
        assert r.code == 1
        assert "answered 503" in r.err and "faults/down" in r.err
        assert registry.tags("faults/down") == ["v1"]
    finally:
        proxy.stop()


def test_registry_that_ignores_range_is_read_once(registry: Registry, tmp_path: Path) -> None:
    ref = f"{registry.host}/faults/norange:v1"
    push(unique_image(tmp_path, "norange"), "v1", ref)
    assert run_cli("convert", ref, "--mode", "full", "--no-cache").code == 0

    def rule(method: str, path: str, n: int) -> str | None:
        return "norange" if method == "GET" and "/blobs/sha256:" in path else None

    proxy = FaultProxy(registry.host, rule).start()
    try:
        r = run_cli("cat", f"{proxy.host}/faults/norange:v1_containerd_accelerated", "/data/big.bin")
        assert r.code == 0, r.err
        assert r.raw.startswith(b"norange") and len(r.raw) == BIG_FILE_SIZE + len("norange")
        assert "ignores Range requests" in r.err
        blob_gets = [k for k, n in proxy.seen.items() if k[0] == "GET" and "/blobs/sha256:" in k[1]]
        layer_gets = [proxy.seen[k] for k in blob_gets]
        assert max(layer_gets) == 1  # each blob was downloaded once, not once per chunk
    finally:
        proxy.stop()


def _prefetch_scattered(host: str, repo: str) -> tuple[list[int], int, int, bool]:
    """Open the full-mode image through ``host`` and prefetch chunks 0, 2 and 4 (not adjacent
    in the blob): (failed chunks, requests the reader sent, bytes it kept, multi-range refused)."""

    async def go() -> tuple[list[int], int, int, bool]:
        async with RegistryClient(host) as client:
            image = await open_image(client, parse_reference(f"{host}/{repo}:v1_containerd_accelerated"))
            layer = image.layers[0]
            assert len(layer.index.chunks) >= 5
            failed = await layer.prefetch([0, 2, 4], gap=0)
            assert all(layer.is_cached(p) for p in (0, 2, 4)) and not layer.is_cached(1)
            return failed, layer.stats.requests, layer.stats.bytes_fetched, client.multi_range_unsupported

    return asyncio.run(go())


def test_scattered_chunks_share_one_multi_range_request(registry: Registry, tmp_path: Path) -> None:
    ref = f"{registry.host}/faults/multirange:v1"
    push(unique_image(tmp_path, "multirange"), "v1", ref)
    assert run_cli("convert", ref, "--mode", "full", "--no-cache", "--frame-size", "16KiB").code == 0
    failed, requests, fetched, refused = _prefetch_scattered(registry.host, "faults/multirange")
    assert (failed, requests, refused) == ([], 1, False)  # the real registry answers multipart/byteranges

    def rule(method: str, path: str, n: int) -> str | None:
        return "nomultirange" if method == "GET" and "/blobs/sha256:" in path else None

    proxy = FaultProxy(registry.host, rule).start()
    try:
        failed2, _, fetched2, refused2 = _prefetch_scattered(proxy.host, "faults/multirange")
        assert (failed2, fetched2, refused2) == ([], fetched, True)  # one range at a time instead
        assert proxy.faults["nomultirange"] == 1  # detected once, not asked again
        layer = get_json(f"http://{registry.host}/v2/faults/multirange/manifests/v1_containerd_accelerated")
        assert proxy.sent["nomultirange"] < layer["layers"][0]["size"] // 2  # the whole blob was not read
    finally:
        proxy.stop()
