"""Hostile images through the real registry and the real CLI: each fails fast with one line
naming the layer, the entry and the limit, and pushes nothing; or, where Docker accepts the
image (names that are not UTF-8), converts and reads back intact.

The layers are forged with ``tests.tar_forge`` and pushed with ``tests.raw_push``.
"""

from __future__ import annotations

import asyncio
import gzip
import json

import pytest

from imgaccel.formats import oci
from imgaccel.pusher.client import RegistryClient
from tests.helpers import get_json, run_cli, sha256
from tests.raw_push import push_image
from tests.registry import Registry
from tests.tar_forge import Header, Member, forge, regular
from tests.test_bad_input import GZ, assert_fails_cleanly

MODES = ["index", "full"]


def push_layers(registry: Registry, repo: str, *tars: bytes, diff_ids: list[str] | None = None) -> list[str]:
    """Push gzip layers of ``tars``; returns the layer digests."""
    blobs = [gzip.compress(t, 1) for t in tars]
    push_image(registry.host, repo, "v1", [(GZ, b) for b in blobs], diff_ids or [sha256(t) for t in tars])
    return [sha256(b) for b in blobs]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_negative_size_fails_fast(registry: Registry, mode: str) -> None:
    tar = forge([regular("ok", b"fine"), Member(Header(b"neg", b"0", -512), b"x" * 1024)])
    (layer,) = push_layers(registry, f"hostile/negative-{mode}", tar)
    assert_fails_cleanly(registry, f"hostile/negative-{mode}", layer, "'neg'", "negative size", mode=mode)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_size_beyond_any_stream_fails_fast(registry: Registry, mode: str) -> None:
    tar = forge([Member(Header(b"huge", b"0", 1 << 87), b"x" * 4096)])
    (layer,) = push_layers(registry, f"hostile/huge-{mode}", tar)
    assert_fails_cleanly(registry, f"hostile/huge-{mode}", layer, "'huge'", "max_expansion=1100", mode=mode)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", MODES)
def test_huge_pax_header_is_refused(registry: Registry, mode: str) -> None:
    """200 MB of PAX records: over Go archive/tar's 1 MiB, refused before it is read."""
    tar = forge([Member(Header(b"p", b"0", 3), b"abc", {b"comment": b"z" * (200 << 20)})])
    (layer,) = push_layers(registry, f"hostile/pax-{mode}", tar)
    line = assert_fails_cleanly(registry, f"hostile/pax-{mode}", layer, "max_header_bytes=1048576", mode=mode)
    assert "209715" in line  # the size it declared


@pytest.mark.timeout(120)
def test_long_gnu_name_is_refused(registry: Registry) -> None:
    tar = forge([Member(Header(b"x", b"0", 1), b"1", gnu_longname=b"n" * (2 << 20))])
    (layer,) = push_layers(registry, "hostile/longname", tar)
    assert_fails_cleanly(registry, "hostile/longname", layer, "max_header_bytes")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_nul_in_pax_path_is_refused(registry: Registry, mode: str) -> None:
    tar = forge([Member(Header(b"p", b"0", 3), b"abc", {b"path": b"a\x00b"})])
    (layer,) = push_layers(registry, f"hostile/nul-{mode}", tar)
    assert_fails_cleanly(registry, f"hostile/nul-{mode}", layer, "NUL byte", mode=mode)


@pytest.mark.timeout(120)
def test_entry_and_layer_counts_are_limited(registry: Registry) -> None:
    tar = forge([regular(f"f{i}", b"x") for i in range(11)])
    (layer,) = push_layers(registry, "hostile/entries", tar)
    assert_fails_cleanly(
        registry, "hostile/entries", layer, "'f10'", "max_entries=10", args=("--limit", "max_entries=10")
    )
    small = forge([regular("a", b"1")])
    push_layers(registry, "hostile/layers", small, small, small)
    assert_fails_cleanly(registry, "hostile/layers", "3 layers", "max_layers=2", args=("--limit", "max_layers=2"))


@pytest.mark.timeout(120)
def test_config_and_manifest_sizes_are_limited(registry: Registry) -> None:
    tar = forge([regular("a", b"1")])
    config = json.dumps({"os": "linux", "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]}, "pad": "x" * 4096})
    push_image(registry.host, "hostile/config", "v1", [(GZ, gzip.compress(tar))], config=config.encode())
    assert_fails_cleanly(registry, "hostile/config", "max_config_bytes=2048", args=("--limit", "max_config_bytes=2KiB"))
    push_layers(registry, "hostile/manifest", *(forge([regular(f"f{i}", b"1")]) for i in range(8)))  # ~1.4 KB
    assert_fails_cleanly(
        registry,
        "hostile/manifest",
        "manifest is",
        "max_manifest_bytes=1024",
        args=("--limit", "max_manifest_bytes=1024"),
    )


@pytest.mark.timeout(120)
def test_nested_indexes_are_limited(registry: Registry) -> None:
    tar = forge([regular("a", b"1")])
    push_layers(registry, "hostile/nested", tar)
    top = get_json(f"http://{registry.host}/v2/hostile/nested/manifests/v1")
    data = json.dumps(top).encode()
    desc = {"mediaType": oci.OCI_MANIFEST, "digest": sha256(data), "size": len(data)}
    desc["platform"] = {"os": "linux", "architecture": "amd64"}

    # manifest <- index <- index <- index: three levels of indexes
    async def nest() -> None:
        async with RegistryClient(registry.host) as client:
            await client.put_manifest("hostile/nested", str(desc["digest"]), data, oci.OCI_MANIFEST)
            inner = desc
            for level in range(3):
                body = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [inner]}).encode()
                ref = "v1" if level == 2 else sha256(body)
                await client.put_manifest("hostile/nested", ref, body, oci.OCI_INDEX)
                inner = {"mediaType": oci.OCI_INDEX, "digest": sha256(body), "size": len(body)}

    asyncio.run(nest())
    assert_fails_cleanly(registry, "hostile/nested", "max_index_depth=2")
    r = run_cli("convert", f"{registry.host}/hostile/nested:v1", "--limit", "max_index_depth=3")
    assert r.code == 0, r.err  # within the limit, nested indexes are followed


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", MODES)
def test_diff_ids_out_of_order_fail_even_when_layers_were_converted_before(registry: Registry, mode: str) -> None:
    a, b = forge([regular("a", b"layer a")]), forge([regular("b", b"layer b")])
    good = f"hostile/order-good-{mode}"
    push_layers(registry, good, a, b)
    r = run_cli("convert", f"{registry.host}/{good}:v1", "--mode", mode)
    assert r.code == 0, r.err  # records both layers in the conversion cache
    repo = f"hostile/order-{mode}"
    push_layers(registry, repo, a, b, diff_ids=[sha256(b), sha256(a)])
    assert_fails_cleanly(registry, repo, "diff_ids out of order", mode=mode)
    r = run_cli("convert", f"{registry.host}/{repo}:v1", "--mode", mode, "--no-cache")
    assert r.code == 1 and "diff_ids out of order" in r.err, r.err


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", MODES)
def test_names_that_are_not_utf8_convert_and_read_back(registry: Registry, mode: str) -> None:
    """Docker accepts such images; so do we: the raw bytes survive into the index."""
    tar = forge(
        [
            regular(b"caf\xe9.txt", b"latin-1 name"),
            Member(Header(b"link\xff", b"2", linkname=b"caf\xe9.txt")),
            regular(b"ok.txt", b"plain"),
        ]
    )
    repo = f"hostile/latin1-{mode}"
    push_layers(registry, repo, tar)
    r = run_cli("convert", f"{registry.host}/{repo}:v1", "--mode", mode)
    assert r.code == 0, r.err
    target = f"{registry.host}/{repo}:v1" + ("_accelerated" if mode == "index" else "_containerd_accelerated")
    r = run_cli("check", target)
    assert r.code == 0 and r.out.startswith("ok: 3 entries"), r.out + r.err
    r = run_cli("cat", target, "/caf\udce9.txt")
    assert r.raw == b"latin-1 name", r.err
