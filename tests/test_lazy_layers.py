"""Prepare labels -> a layer's lazy form, against the real registry: every layer of both
accelerated forms (and of the source image, through its index-only referrer) reads back as
exactly the tar its config's diff_id names; plain images and plain pulls have no lazy form."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from fixtures.build_images import push, unique_image
from imgaccel.pusher.client import RegistryClient
from imgaccel.snapshotter.image_warmup import WarmUp
from imgaccel.snapshotter.lazy_layers import (
    CRI_IMAGE_REF,
    CRI_LAYER,
    CRI_MANIFEST,
    STARGZ_LAYER,
    STARGZ_REFERENCE,
    LayerTar,
    LazyImages,
    NoLazyForm,
    layer_target,
    write_local_tar,
)
from tests.helpers import get_bytes, get_json
from tests.registry import Registry

NO_WARM_UP = WarmUp(profile_label=None, background_fetch="off")


def manifest_and_diff_ids(ref: str) -> tuple[str, list[str], list[str]]:
    """(platform manifest digest, its layer digests, the config's diff_ids) of a single-platform ref."""
    host, rest = ref.split("/", 1)
    repo, tag = rest.rsplit(":", 1)
    top = get_json(f"http://{host}/v2/{repo}/manifests/{tag}")
    if "manifests" in top:  # the _accelerated index: the source manifest comes first
        digest = top["manifests"][0]["digest"]
    else:
        digest = "sha256:" + hashlib.sha256(get_bytes(f"http://{host}/v2/{repo}/manifests/{tag}")).hexdigest()
    manifest = get_json(f"http://{host}/v2/{repo}/manifests/{digest}")
    config = json.loads(get_bytes(f"http://{host}/v2/{repo}/blobs/{manifest['config']['digest']}"))
    return digest, [layer["digest"] for layer in manifest["layers"]], config["rootfs"]["diff_ids"]


@asynccontextmanager
async def lazy_images(host: str) -> AsyncIterator[LazyImages]:
    """``LazyImages`` reading from the registry at ``host`` only, with no warm-up."""
    async with RegistryClient(host) as client:

        async def client_for(registry: str) -> RegistryClient:
            assert registry == host
            return client

        yield LazyImages(client_for, warm_up=NO_WARM_UP)


async def read_all(source: LayerTar) -> str:
    h = hashlib.sha256()
    for off in range(0, source.size, 4 << 20):
        h.update(await source.read(off, 4 << 20))
    assert await source.read(source.size, 10) == b""
    return "sha256:" + h.hexdigest()


def check_layers(ref: str, labels_for: object) -> int:
    """Every layer of ``ref`` resolves and reads back as its diff_id; returns images opened."""
    manifest, layers, diff_ids = manifest_and_diff_ids(ref)
    host = ref.split("/", 1)[0]

    async def go() -> int:
        async with lazy_images(host) as lazy:
            for layer, diff_id in zip(layers, diff_ids, strict=True):
                labels = labels_for(ref, manifest, layer)  # type: ignore[operator]
                reader = await lazy.layer(layer_target(labels))
                assert await read_all(LayerTar(reader, host)) == diff_id
            return len(lazy._images)

    return asyncio.run(go())


def cri_labels(ref: str, manifest: str, layer: str) -> dict[str, str]:
    return {CRI_IMAGE_REF: ref, CRI_MANIFEST: manifest, CRI_LAYER: layer, "containerd.io/snapshot.ref": "x"}


def stargz_labels(ref: str, manifest: str, layer: str) -> dict[str, str]:
    return {STARGZ_REFERENCE: ref, STARGZ_LAYER: layer, "containerd.io/snapshot.ref": "x"}


@pytest.mark.parametrize("labels", [cri_labels, stargz_labels], ids=["cri", "ctr-remote"])
@pytest.mark.parametrize("which", ["source", "index", "full"])
def test_every_layer_reads_back_as_its_diff_id(
    images: dict[str, str], converted: dict[str, str], which: str, labels: object
) -> None:
    ref = images["app"] if which == "source" else converted[which]
    assert check_layers(ref, labels) == 1  # one image opened for all its layers


def test_plain_images_and_pulls_have_no_lazy_form(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(NoLazyForm, match="plain pull"):
        layer_target({"containerd.io/snapshot.ref": "x"})
    with pytest.raises(NoLazyForm, match="unusable image labels"):
        layer_target({CRI_IMAGE_REF: "127.0.0.1:1/../x:v1", CRI_LAYER: "sha256:" + "0" * 64})
    ref = f"{registry.host}/lazy/never-converted:v1"
    push(unique_image(tmp_path, "never-converted"), "v1", ref)
    with pytest.raises(NoLazyForm, match="not an accelerated image"):
        check_layers(ref, cri_labels)


def test_a_local_copy_is_checked_against_the_diff_id(converted: dict[str, str], tmp_path: Path) -> None:
    """A fully read layer written out is the tar its diff_id names; a copy that does not hash to
    it is refused and nothing is left behind."""
    ref = converted["full"]
    manifest, layers, diff_ids = manifest_and_diff_ids(ref)
    host = ref.split("/", 1)[0]

    async def go() -> None:
        async with lazy_images(host) as lazy:
            reader = await lazy.layer(layer_target(cri_labels(ref, manifest, layers[-1])))
            good = tmp_path / "layer.tar"
            await write_local_tar(reader, good, piece=100_000)
            assert "sha256:" + hashlib.sha256(good.read_bytes()).hexdigest() == diff_ids[-1]
            assert reader.first_reads == {}  # a copy is no workload: a profile being recorded ignores it
            assert await read_all(LayerTar(reader, host, local=good)) == diff_ids[-1]
            assert len(reader.first_reads) == len(reader.index.chunks)  # reads of the copy still count
            reader.index = reader.index.model_copy(update={"diff_id": "sha256:" + "0" * 64})
            with pytest.raises(OSError, match="diff_id is sha256:0000"):
                await write_local_tar(reader, tmp_path / "bad.tar")
            assert sorted(p.name for p in tmp_path.iterdir()) == ["layer.tar"]

    asyncio.run(go())


def test_an_image_is_closed_when_none_of_its_layers_is_in_use(converted: dict[str, str]) -> None:
    ref = converted["index"]
    manifest, layers, _ = manifest_and_diff_ids(ref)
    host = ref.split("/", 1)[0]

    async def go() -> None:
        async with lazy_images(host) as lazy:
            for layer in layers:
                await lazy.layer(layer_target(cri_labels(ref, manifest, layer)))
            assert len(lazy.opened()) == 1
            for layer in layers[:-1]:
                lazy.release(layer)
                assert len(lazy.opened()) == 1  # one of its layers is still mounted
            lazy.release(layers[-1])
            assert lazy.opened() == []
            await lazy.layer(layer_target(cri_labels(ref, manifest, layers[0])))  # opens it again
            assert len(lazy.opened()) == 1

    asyncio.run(go())


def test_readahead_of_a_layer_tar_stops_at_the_end_of_the_file_being_read() -> None:
    """The kernel reads a file as reads of the layer tar: readahead must not run on into the
    next files of the tar (a node would fetch chunks no profile names)."""
    from types import SimpleNamespace

    from imgaccel.formats.layer_index import Entry
    from imgaccel.snapshotter.lazy_layers import LayerTar

    entries = [Entry("a", "reg", size=1000, offset=512), Entry("d", "dir"), Entry("b", "reg", size=10, offset=2048),
               Entry("empty", "reg", size=0, offset=2560)]  # fmt: skip
    tar = LayerTar(SimpleNamespace(index=SimpleNamespace(entries=entries)), "r.example")  # type: ignore[arg-type]
    assert tar.data_end(512, 4096) == 1512  # the start of a
    assert tar.data_end(1000, 100) == 1512  # the middle of a
    assert tar.data_end(1512, 100) == 1612  # padding after a: no readahead
    assert tar.data_end(0, 512) == 512  # a header
    assert tar.data_end(2050, 4096) == 2058  # b
    assert tar.data_end(9000, 10) == 9010  # past every file
