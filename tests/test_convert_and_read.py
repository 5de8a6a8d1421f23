"""End to end against the real registry: convert the fixture images, read them back lazily."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path

import pytest

from fixtures.build_images import BIG_FILE_SIZE
from imgaccel.formats.layer_index import LayerIndex
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.reference import parse_reference
from imgaccel.reader.accelerated_image import open_image
from tests.helpers import get_bytes, get_json, run_cli, sha256
from tests.registry import Registry


@pytest.mark.parametrize("mode", ["index", "full"])
def test_check_passes(converted: dict[str, str], mode: str) -> None:
    r = run_cli("check", converted[mode])
    assert r.code == 0, r.out + r.err
    assert "entries identical" in r.out


@pytest.mark.parametrize("mode", ["index", "full"])
def test_cat_and_ls(converted: dict[str, str], mode: str) -> None:
    ref = converted[mode]
    assert run_cli("cat", ref, "/opq/c.txt").out == "only this survives in opq\n"
    assert run_cli("cat", ref, "/etc/motd").out == "layer 2 motd\n"
    assert run_cli("cat", ref, "/links/rel").raw == Path("/etc/os-release").read_bytes()
    assert run_cli("cat", ref, "/links/abs").raw == Path("/etc/os-release").read_bytes()
    assert run_cli("cat", ref, "/unicode/日本語.txt").out == "こんにちは\n"
    big = run_cli("cat", ref, "/data/big.bin").raw
    assert len(big) == BIG_FILE_SIZE
    listing = run_cli("ls", ref, "/opq").out.split()
    assert listing == ["c.txt"]  # the opaque dir hid a.txt and sub/
    assert "gone.txt" not in run_cli("ls", ref, "/old").out  # whiteout
    assert run_cli("cat", ref, "/data/hl-b").raw == run_cli("cat", ref, "/data/hl-a").raw
    r = run_cli("cat", ref, "/links/escape")  # ../../../etc/hostname stays inside the image
    assert r.code == 1 and "no such file" in r.err
    assert run_cli("cat", ref, "/links/dangling").code == 1


def test_full_mode_layers_decompress_to_diff_ids(registry: Registry, converted: dict[str, str]) -> None:
    repo_url = f"http://{registry.host}/v2/fixtures/app"
    manifest = get_json(f"{repo_url}/manifests/v1_containerd_accelerated")
    assert manifest["annotations"]["io.imgaccel.mode"] == "full"
    config = json.loads(get_bytes(f"{repo_url}/blobs/{manifest['config']['digest']}"))
    for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
        blob = get_bytes(f"{repo_url}/blobs/{layer['digest']}")
        tar = subprocess.run(["zstd", "-dc"], input=blob, capture_output=True, check=True).stdout
        assert sha256(tar) == diff_id


@pytest.mark.parametrize(("mode", "encodings"), [("index", {"gzip", "tar", "zstd"}), ("full", {"zstd"})])
def test_every_chunk_carries_the_digest_of_its_compressed_bytes(
    registry: Registry, converted: dict[str, str], mode: str, encodings: set[str]
) -> None:
    async def layers() -> list[tuple[str, LayerIndex]]:
        async with RegistryClient(registry.host) as client:
            image = await open_image(client, parse_reference(converted[mode]))
            return [(reader.blob_digest, reader.index) for reader in image.layers]

    found = asyncio.run(layers())
    assert {index.encoding for _, index in found} == encodings
    for digest, index in found:
        blob = get_bytes(f"http://{registry.host}/v2/fixtures/app/blobs/{digest}")
        assert index.chunks
        for c in index.chunks:
            assert c.c_digest == sha256(blob[c.c_offset : c.c_offset + c.c_size]), (digest, c)


def test_index_mode_leaves_source_untouched(
    registry: Registry, images: dict[str, str], converted: dict[str, str]
) -> None:
    repo_url = f"http://{registry.host}/v2/fixtures/app"
    source = get_bytes(f"{repo_url}/manifests/v1")  # the registry returns the stored bytes
    index = get_json(f"{repo_url}/manifests/v1_accelerated")
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert index["annotations"]["io.imgaccel.source.digest"] == sha256(source)
    runnable = [m for m in index["manifests"] if m["platform"]["os"] != "unknown"]
    assert [m["digest"] for m in runnable] == [sha256(source)]
    artifact = [m for m in index["manifests"] if m.get("artifactType") == "application/vnd.imgaccel.index.v1"]
    assert len(artifact) == 1
    # The same artifact is attached to the source manifest as a referrer (tag-schema fallback).
    referrers = get_json(f"{repo_url}/manifests/{sha256(source).replace(':', '-')}")
    assert artifact[0]["digest"] in [m["digest"] for m in referrers["manifests"]]
    # ...so the lazy reader also finds it from the untouched source tag.
    assert run_cli("cat", images["app"], "/etc/motd").out == "layer 2 motd\n"


def test_second_conversion_does_no_layer_work(images: dict[str, str], converted: dict[str, str]) -> None:
    r = run_cli("convert", images["app"], "--mode", "index")
    assert r.code == 0 and "already converted" in r.err
    assert re.fullmatch(re.escape(f"{images['app']} -> {images['app']}_accelerated@") + "sha256:[0-9a-f]{64}\n", r.out)
    # Another tag of the same image: per-layer work is skipped through the layer cache.
    r = run_cli("convert", images["app"], "--mode", "full", "--tag-suffix", "_again")
    assert r.code == 0, r.err
    assert "all 3 layers reused" in r.err
    assert r.out.startswith(f"{images['app']} -> {images['app']}_again@sha256:")


def test_cross_repository_reuse(registry: Registry, layouts: dict[str, Path], converted: dict[str, str]) -> None:
    from fixtures.build_images import push

    other = f"{registry.host}/elsewhere/app:v7"
    push(layouts["app"], "v1", other)
    r = run_cli("convert", other, "--mode", "index")
    assert r.code == 0, r.err
    assert "all 3 layers reused" in r.err
    assert run_cli("check", other + "_accelerated").code == 0


def test_multi_platform(images: dict[str, str]) -> None:
    for mode, suffix in (("index", "_accelerated"), ("full", "_containerd_accelerated")):
        r = run_cli("convert", images["multi"], "--mode", mode)
        assert r.code == 0, r.err
        for arch in ("amd64", "arm64"):
            out = run_cli("cat", images["multi"] + suffix, "/etc/arch", "--platform", f"linux/{arch}")
            assert out.out == f"{arch}\n", out.err
            assert run_cli("check", images["multi"] + suffix, "--platform", f"linux/{arch}").code == 0
    r = run_cli("convert", images["multi"], "--mode", "full", "--platform", "linux/arm64", "--tag-suffix", "_arm")
    assert r.code == 0, r.err
    r = run_cli("cat", images["multi"] + "_arm", "/etc/arch", "--platform", "linux/amd64")
    assert r.code == 1 and "no manifest for platform linux/amd64" in r.err


def test_single_frame_zstd(registry: Registry, images: dict[str, str]) -> None:
    r = run_cli("convert", images["onezstd"], "--mode", "index")
    assert r.code == 1
    assert "cannot" not in r.out and "index-only mode needs many small frames" in r.err
    assert "fallback full" in r.err
    assert registry.tags("fixtures/onezstd") == ["v1"]
    r = run_cli("convert", images["onezstd"], "--mode", "index", "--fallback", "full")
    assert r.code == 0, r.err
    assert run_cli("check", images["onezstd"] + "_accelerated").code == 0


def test_lz4_variant(registry: Registry, images: dict[str, str]) -> None:
    r = run_cli("convert", images["app"], "--mode", "full", "--compression", "lz4", "--tag-suffix", "_lz4")
    assert r.code == 0, r.err
    ref = images["app"] + "_lz4"
    assert run_cli("check", ref).code == 0
    manifest = get_json(f"http://{registry.host}/v2/fixtures/app/manifests/v1_lz4")
    config = json.loads(get_bytes(f"http://{registry.host}/v2/fixtures/app/blobs/{manifest['config']['digest']}"))
    for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        blob = get_bytes(f"http://{registry.host}/v2/fixtures/app/blobs/{layer['digest']}")
        tar = subprocess.run(["lz4", "-dc"], input=blob, capture_output=True, check=True).stdout
        assert sha256(tar) == diff_id


@pytest.mark.parametrize("mode", ["index", "full"])
def test_corrupted_chunk_fails_loudly(registry: Registry, tmp_path: Path, mode: str) -> None:
    from fixtures.build_images import push, unique_image

    ref = f"{registry.host}/corrupt-{mode}/app:v1"
    push(unique_image(tmp_path, f"corrupt-{mode}"), "v1", ref)
    suffix = "_accelerated" if mode == "index" else "_containerd_accelerated"
    assert run_cli("convert", ref, "--mode", mode, "--no-cache").code == 0
    target = get_json(f"http://{registry.host}/v2/corrupt-{mode}/app/manifests/v1{suffix}")
    if mode == "index":
        runnable = next(m for m in target["manifests"] if m["platform"]["os"] != "unknown")
        layer = get_json(f"http://{registry.host}/v2/corrupt-{mode}/app/manifests/{runnable['digest']}")["layers"][0]
    else:
        layer = target["layers"][0]
    # Flip bytes in the middle of the first layer's blob inside the registry's storage.
    path = registry.blob_path(layer["digest"])
    data = bytearray(path.read_bytes())
    mid = len(data) // 3
    data[mid : mid + 64] = bytes(b ^ 0x5A for b in data[mid : mid + 64])
    path.write_bytes(bytes(data))
    r = run_cli("cat", ref + suffix, "/data/big.bin")
    assert r.code == 1
    assert "failed verification" in r.err or "fetching" in r.err
    assert layer["digest"] in r.err
    assert len(r.raw) < BIG_FILE_SIZE  # never the whole file: the bad chunk was not returned
    if mode == "full":  # (index mode: the corrupted blob is the source check compares against)
        r = run_cli("check", ref + suffix)
        assert r.code == 1 and "/data/big.bin: read failed" in r.out and "difference(s)" in r.err
