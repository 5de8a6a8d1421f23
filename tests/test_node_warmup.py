"""The node daemon's warm-up and status through real containerd: an image pulled without a
profile is fetched whole in the background, its layers are written out as local tars checked
against their diff_ids, the container's start-up reads become a profile pushed to the
registry; after a restart that lost the mounts (a reboot) the layers are mounted from the local
copies (no FUSE read) and the profile is replayed; removing the image deletes the copies.
``imgaccel node status`` reports all of it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.reference import parse_reference
from imgaccel.reader.accelerated_image import open_image
from imgaccel.reader.profiles import find_profile
from imgaccel.snapshotter.erofs_layers import unmount_all
from tests.helpers import get_bytes, get_json, run_cli
from tests.registry import Registry
from tests.test_lazy_containerd import WHY, platform_layers, push_converted, rpull, source_files
from tests.test_snapshotter import DaemonProcess, blobs, ctr_run, node_with_daemon

pytestmark = pytest.mark.skipif(bool(WHY), reason=WHY or "-")
RECORD_SECONDS = 3


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[tuple[list[str], DaemonProcess]]:
    work = tmp_path_factory.mktemp("warm-node")
    (work / "node.yaml").write_text(
        f"record_profiles: true\nrecord_seconds: {RECORD_SECONDS}\nbackground_fetch: no-profile\nlog_level: debug\n"
    )
    with node_with_daemon(work, registry) as (ctr, daemon):
        daemon.start(None, work / "node.yaml")
        yield ctr, daemon


def status(daemon: DaemonProcess) -> dict[str, Any]:
    r = run_cli("node", "status", "--root", str(daemon.root), "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)  # type: ignore[no-any-return]


def wait_for(what: str, check: Callable[[], bool], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def diff_ids(ref: str) -> list[str]:
    host, rest = ref.split("/", 1)
    repo, tag = rest.rsplit(":", 1)
    manifest = get_json(f"http://{host}/v2/{repo}/manifests/{tag}")
    config = json.loads(get_bytes(f"http://{host}/v2/{repo}/blobs/{manifest['config']['digest']}"))
    return list(config["rootfs"]["diff_ids"])


def profile_chunks(ref: str) -> int | None:
    image_ref = parse_reference(ref)

    async def go() -> int | None:
        async with RegistryClient(image_ref.registry) as client:
            image = await open_image(client, image_ref)
            profile = await find_profile(client, image, "startup")
            return None if profile is None else len(profile.chunks)

    return asyncio.run(go())


@pytest.mark.timeout(900)
def test_warm_up_writes_local_layers_records_a_profile_and_replays_it(
    node: tuple[list[str], DaemonProcess], registry: Registry, tmp_path: Path
) -> None:
    ctr, daemon = [*node[0], "--namespace", "warm"], node[1]
    source, ref = push_converted(registry, tmp_path, "warm-app")
    layers = platform_layers(ref)
    want = source_files(source)["/data/big.bin"]

    rpull(ctr, ref)
    assert not set(layers) & blobs(ctr), "containerd downloaded a layer blob"
    out = ctr_run(ctr, "run", "--rm", "--snapshotter", "imgaccel", ref, "warm-1", "/bin/sha256sum", "/data/big.bin")
    assert out.split()[0] == want

    # No profile: the whole image is fetched in the background and written out layer by layer.
    def all_local() -> bool:
        mine = [la for la in status(daemon)["layers"] if la["digest"] in layers]
        return len(mine) == len(layers) and all(la["source"] == "local" for la in mine)

    wait_for("every layer to be local", all_local)
    for digest, diff_id in zip(layers, diff_ids(ref), strict=True):
        local = daemon.root / "lazy" / "layers" / digest.split(":")[1] / "layer.tar"
        assert "sha256:" + hashlib.sha256(local.read_bytes()).hexdigest() == diff_id
    st = status(daemon)
    (image,) = [im for im in st["images"] if im["ref"] == ref]
    assert image["profile"] == "none" and image["background_fetch"] == "done", image
    assert st["counters"]["background_fetches"] >= 1 and st["fuse"]["requests"]["READ"] > 0, st
    assert st["kernel_path"] in ("file", "loop") and st["snapshots"]["committed"] >= len(layers), st
    text = run_cli("node", "status", "--root", str(daemon.root))
    assert text.code == 0 and "layers mounted:" in text.out and ref in text.out, text.out + text.err

    # The start-up's reads became a profile, pushed as a referrer of the image.
    wait_for("the recorded profile", lambda: profile_chunks(ref) is not None, timeout=RECORD_SECONDS + 60)
    assert (profile_chunks(ref) or 0) > 0
    wait_for("the recording to be reported", lambda: "pushed sha256:" in str(status(daemon)["images"]))

    # A node restarted (its mounts gone, as after a reboot): the daemon mounts the layers again
    # from their local copies (the kernel reads them without FUSE) and replays the new profile.
    daemon.stop()
    asyncio.run(unmount_all(daemon.root))
    daemon.start(None)
    wait_for("the layers to be mounted again", lambda: len(status(daemon)["layers"]) >= len(layers))
    out = ctr_run(ctr, "run", "--rm", "--snapshotter", "imgaccel", ref, "warm-2", "/bin/sha256sum", "/data/big.bin")
    assert out.split()[0] == want
    st = status(daemon)
    assert "READ" not in st["fuse"]["requests"], f"reads went through FUSE: {st['fuse']}"
    assert all(la["source"] == "local" for la in st["layers"] if la["digest"] in layers), st["layers"]
    assert daemon.log().count("from its local copy") >= len(layers), daemon.log()[-3000:]
    wait_for("the profile replay", lambda: "replayed profile 'startup'" in daemon.log(), timeout=30)

    # Once no snapshot uses them, the layers are released, their local copies deleted and the
    # image closed.
    ctr_run(ctr, "images", "rm", "--sync", ref)
    wait_for("the layers to be released", lambda: not {la["digest"] for la in status(daemon)["layers"]} & set(layers))
    assert ref not in [im["ref"] for im in status(daemon)["images"]]
    assert not list((daemon.root / "lazy" / "layers").glob("*/layer.tar*"))


def test_node_status_without_a_daemon_is_one_line(tmp_path: Path) -> None:
    r = run_cli("node", "status", "--root", str(tmp_path))
    assert r.code == 1
    (line,) = r.err.strip().splitlines()
    assert line.startswith(f"Error: no node daemon answers on {tmp_path / 'status.sock'}: "), line
