"""containerd runs accelerated images lazily through the real node daemon (``imgaccel
snapshotter``): EROFS metadata built from the verified index, the layer tar served by the
daemon's own FUSE server, overlay on top. containerd downloads no layer blob, the container
sees exactly the source image's files, a daemon killed mid-read is replaced without breaking
the container, and a corrupt chunk is an I/O error, never wrong bytes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from fixtures.build_images import push, unique_image
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.reference import parse_reference
from imgaccel.reader.check import reference_tree
from imgaccel.snapshotter.api.runtime.v1 import api_pb2 as cri
from imgaccel.snapshotter.api.runtime.v1 import api_pb2_grpc as cri_grpc
from tests.containerd import MISSING
from tests.erofs_mount import missing_for_mounts
from tests.helpers import get_json, run_cli
from tests.registry import Registry
from tests.test_snapshotter import SCRIPT, DaemonProcess, blobs, check_image_view, ctr_run, node_with_daemon

WHY = missing_for_mounts("erofs", "overlay") or (f"missing {', '.join(MISSING)}" if MISSING else "")
if not os.path.exists("/dev/fuse"):
    WHY = WHY or "no /dev/fuse"
pytestmark = pytest.mark.skipif(bool(WHY), reason=WHY or "-")
SUFFIX = {"index": "_accelerated", "full": "_containerd_accelerated"}


def push_converted(registry: Registry, tmp_path: Path, name: str) -> tuple[str, str]:
    """A fresh fixture image pushed as ``<registry>/lazy/<name>:v1`` and converted in full mode:
    (source reference, accelerated reference)."""
    source = f"{registry.host}/lazy/{name}:v1"
    push(unique_image(tmp_path, f"lazy-{name}"), "v1", source)
    assert run_cli("convert", source, "--mode", "full").code == 0
    return source, source + SUFFIX["full"]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[tuple[list[str], DaemonProcess]]:
    """containerd pulling through the real daemon; every mount it made is taken down after."""
    work = tmp_path_factory.mktemp("lazy-node")
    # No background fetch: these tests need reads to reach the registry when the container makes
    # them (a corrupt chunk fetched before it was damaged would hide the damage).
    (work / "node.yaml").write_text("background_fetch: 'off'\n")
    with node_with_daemon(work, registry) as (ctr, daemon):
        daemon.start(None, work / "node.yaml")
        yield ctr, daemon


def platform_layers(ref: str) -> list[str]:
    host, rest = ref.split("/", 1)
    repo, tag = rest.rsplit(":", 1)
    top = get_json(f"http://{host}/v2/{repo}/manifests/{tag}")
    if "manifests" in top:
        top = get_json(f"http://{host}/v2/{repo}/manifests/{top['manifests'][0]['digest']}")
    return [layer["digest"] for layer in top["layers"]]


def rpull(ctr: list[str], ref: str) -> None:
    address = ctr[ctr.index("--address") + 1]
    namespace = ctr[ctr.index("--namespace") + 1]
    r = subprocess.run(
        ["ctr-remote", "--address", address, "--namespace", namespace, "image", "rpull", "--snapshotter",
         "imgaccel", "--plain-http", ref],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]


def source_files(source: str) -> dict[str, str]:
    """path -> sha256 of every regular file of the source image, from a full extraction."""
    ref = parse_reference(source)

    async def go() -> dict[str, str]:
        async with RegistryClient(ref.registry) as client:
            digest = (await client.get_manifest(ref.repository, ref.reference)).digest
            tree = await reference_tree(client, ref, digest)
        return {"/" + path: rec.sha256 for path, rec in tree.items() if rec.type in ("reg", "hardlink") and rec.sha256}

    return asyncio.run(go())


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["full", "index"])
def test_rpull_downloads_no_layer_and_the_container_sees_the_source_files(
    node: tuple[list[str], DaemonProcess], images: dict[str, str], converted: dict[str, str], mode: str
) -> None:
    ctr = [*node[0], "--namespace", f"lazy-{mode}"]
    ref = converted[mode]
    rpull(ctr, ref)
    assert not set(platform_layers(ref)) & blobs(ctr), "containerd downloaded a layer blob"
    out = ctr_run(ctr, "run", "--rm", "--snapshotter", "imgaccel", ref, f"view-{mode}", "/bin/sh", "-c", SCRIPT)
    check_image_view(out)
    expected = source_files(images["app"])
    listing = ctr_run(ctr, "run", "--rm", "--snapshotter", "imgaccel", ref, f"sums-{mode}", "/bin/sh", "-c",
                      "/bin/busybox find / -xdev -type f -exec /bin/busybox sha256sum {} +")  # fmt: skip
    seen = {}
    for line in listing.splitlines():
        digest, _, path = line.partition("  ")
        seen[path] = digest
    for path, digest in expected.items():
        if "\n" in path or "\\" in path:
            continue  # sha256sum escapes such names; the byte-level checks cover them
        assert seen.get(path) == digest, f"{path}: {seen.get(path)} != {digest}"
    assert "lazily" in node[1].log()


def cri_pull(ctr: list[str], ref: str) -> str:
    """PullImage through containerd's CRI plugin (the kubelet's path); the image id."""
    address = ctr[ctr.index("--address") + 1]
    with grpc.insecure_channel(f"unix://{address}") as ch:
        pulled = cri_grpc.ImageServiceStub(ch).PullImage(
            cri.PullImageRequest(image=cri.ImageSpec(image=ref)), timeout=300
        )
    return str(pulled.image_ref)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("which", ["full", "index", "original tag"])
def test_cri_pull_is_lazy_even_for_the_original_tag(
    node: tuple[list[str], DaemonProcess], images: dict[str, str], converted: dict[str, str], which: str
) -> None:
    """Kubernetes pulls through CRI; a pod spec naming the *original* tag is lazy too, through
    the index-only artifact attached to its manifest as a referrer."""
    ctr = [*node[0], "--namespace", "k8s.io"]
    ref = images["app"] if which == "original tag" else converted[which]
    cri_pull(ctr, ref)
    assert not set(platform_layers(ref)) & blobs(ctr), "containerd downloaded a layer blob"
    name = "cri-" + which.replace(" ", "-")
    out = ctr_run(ctr, "run", "--rm", "--snapshotter", "imgaccel", ref, name, "/bin/sh", "-c", SCRIPT)
    check_image_view(out)


@pytest.mark.timeout(600)
def test_image_without_twin_pulls_and_runs_normally(
    node: tuple[list[str], DaemonProcess], registry: Registry, tmp_path: Path
) -> None:
    ctr = [*node[0], "--namespace", "plain"]
    ref = f"{registry.host}/lazy/plain:v1"
    push(unique_image(tmp_path, "lazy-plain"), "v1", ref)  # never converted
    rpull(ctr, ref)  # labels present, but no lazy form: containerd pulls the layers itself
    assert set(platform_layers(ref)) <= blobs(ctr)
    out = ctr_run(ctr, "run", "--rm", "--snapshotter", "imgaccel", ref, "plain", "/bin/cat", "/salt.txt")
    assert out == "lazy-plain"
    assert "no lazy form" in node[1].log()


def sums(ctr: list[str], task: str) -> list[str]:
    """The lines the reader loop has written so far (the task writes them to /sums)."""
    r = subprocess.run([*ctr, "tasks", "exec", "--exec-id", f"cat-{time.monotonic_ns()}", task, "/bin/cat", "/sums"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


@pytest.mark.timeout(900)
def test_daemon_killed_while_a_container_reads(
    node: tuple[list[str], DaemonProcess], registry: Registry, tmp_path: Path
) -> None:
    ctr, daemon = [*node[0], "--namespace", "lazy"], node[1]
    source, ref = push_converted(registry, tmp_path, "restart")
    rpull(ctr, ref)
    want = f"{source_files(source)['/data/big.bin']}  /data/big.bin"
    loop = "while true; do /bin/sha256sum /data/big.bin >> /sums 2>&1; done"
    subprocess.run([*ctr, "run", "-d", "--snapshotter", "imgaccel", ref, "reader", "/bin/sh", "-c", loop],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    try:
        time.sleep(1)
        before = len(sums(ctr, "reader"))
        daemon.stop(signal.SIGKILL)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")  # the next reads must reach FUSE: they wait
        time.sleep(1)
        daemon.start(None)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        time.sleep(3)
        lines = sums(ctr, "reader")
    finally:
        subprocess.run([*ctr, "tasks", "kill", "-s", "KILL", "reader"], capture_output=True, timeout=30)
        time.sleep(1)
        subprocess.run([*ctr, "tasks", "rm", "-f", "reader"], capture_output=True, timeout=30)
        subprocess.run([*ctr, "containers", "rm", "reader"], capture_output=True, timeout=30)
    assert len(lines) > before, "the container made no progress after the restart"
    assert set(lines) == {want}, [line for line in lines if line != want][:5]
    assert "re-served remote snapshot" in daemon.log()


@pytest.mark.timeout(600)
def test_a_corrupt_chunk_is_an_io_error(node: tuple[list[str], DaemonProcess], registry: Registry,
                                        tmp_path: Path) -> None:  # fmt: skip
    ctr = [*node[0], "--namespace", "corrupt"]
    source, ref = push_converted(registry, tmp_path, "corrupt")
    rpull(ctr, ref)
    # Damage the middle of the biggest layer blob in the registry's storage.
    layer = max(platform_layers(ref), key=lambda d: registry.blob_path(d).stat().st_size)
    path = registry.blob_path(layer)
    data = bytearray(path.read_bytes())
    mid = len(data) // 3
    data[mid : mid + 64] = bytes(64)
    path.write_bytes(bytes(data))
    expected = source_files(source)
    r = subprocess.run(
        [*ctr, "run", "--rm", "--snapshotter", "imgaccel", ref, "corrupt", "/bin/sh", "-c",
         "/bin/busybox find / -xdev -type f -exec /bin/busybox sha256sum {} +"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "Input/output error" in r.stderr + r.stdout, r.stdout[-1000:] + r.stderr[-1000:]
    for line in r.stdout.splitlines():
        digest, _, p = line.partition("  ")
        if p in expected:
            assert digest == expected[p], f"{p}: wrong bytes were returned"
    log = node[1].log()
    assert layer in log and registry.host in log, log[-3000:]
    assert hashlib.sha256(bytes(data)).hexdigest() != layer.split(":")[1]


@pytest.mark.timeout(600)
def test_first_pull_replays_the_images_profile(node: tuple[list[str], DaemonProcess], registry: Registry,
                                              tmp_path: Path) -> None:  # fmt: skip
    ctr = [*node[0], "--namespace", "profiled"]
    source, ref = push_converted(registry, tmp_path, "profiled")
    r = run_cli("record", ref, "--label", "startup", "--cache-dir", str(tmp_path / "rec"), "--plain-http", "--",
                "/bin/sha256sum", "/data/big.bin")  # fmt: skip
    assert r.code == 0, r.err
    rpull(ctr, ref)
    out = ctr_run(ctr, "run", "--rm", "--snapshotter", "imgaccel", ref, "profiled", "/bin/sha256sum", "/data/big.bin")
    assert out.split()[0] == source_files(source)["/data/big.bin"]
    replayed = re.findall(r"replayed profile 'startup': (\d+) chunks", node[1].log())
    assert replayed and int(replayed[-1]) > 0, node[1].log()[-2000:]
