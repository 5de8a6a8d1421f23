"""Retries: 429 (Retry-After honoured), 5xx and dropped connections, through a fault proxy."""

from __future__ import annotations

import time
from pathlib import Path

from fixtures.build_images import push, unique_image
from tests.fault_proxy import FaultProxy
from tests.helpers import run_cli
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
