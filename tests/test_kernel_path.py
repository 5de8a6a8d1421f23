"""How lazy layers reach the kernel (``snapshotter.kernel_path``), on the real kernel and
through real containerd.

The probe settles on file-backed EROFS on this kernel; an EROFS image of a real layer index
mounted on loop devices shows exactly what the file-backed mount shows, and its loop devices
(read-only, autoclearing) are gone once it is unmounted; loop devices attached concurrently
(the race for a free one) and without LOOP_CONFIGURE (the pre-5.8 ioctls) are right too.
A "fuse" mode tree process reads a private registry with the credentials it is handed and
no others, never writes the password down, and is kept while alive.
Through containerd, with "auto" (file-backed here), "loop" and "fuse" set in the node
configuration: ``ctr-remote image rpull`` downloads no layer blob, ``ctr run`` sees the fixture
image's files (whiteouts, opaque directories, hardlinks), a daemon killed and restarted keeps
the mounts (and, in "fuse" mode, every live tree process: only a dead one is replaced), and
removing the image takes every mount, loop device and tree process down.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fixtures.build_images import push, unique_image
from imgaccel.formats.erofs import WRITER_VERSION, build_erofs_image
from imgaccel.pusher.auth import Credentials
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.reference import parse_reference
from imgaccel.snapshotter import kernel_path
from imgaccel.snapshotter.mounts import mounts, umount_or_detach
from tests import test_auth
from tests.containerd import MISSING
from tests.erofs_mount import missing_for_mounts
from tests.helpers import run_cli
from tests.registry import Registry
from tests.test_erofs_writer import _rich_layer, compare_mount, expected_tree, index_tar, write_tar
from tests.test_lazy_containerd import platform_layers, rpull
from tests.test_snapshotter import CTR_REMOTE, SCRIPT, DaemonProcess, blobs, check_image_view, ctr_run, node_with_daemon

EROFS_WHY = missing_for_mounts("erofs")
LOOP_WHY = EROFS_WHY or ("" if os.path.exists("/dev/loop-control") else "no /dev/loop-control")
KERNEL = tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])


def wait_for(what: str, done: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.05)


def loops_under(path: Path) -> dict[str, str]:
    """Attached loop devices whose backing file is under ``path``."""
    prefix = os.path.realpath(path) + "/"
    return {dev: f for dev, f in kernel_path.loop_backing_files().items() if f.startswith(prefix)}


def mounts_under(path: Path) -> list[str]:
    prefix = os.path.realpath(path) + "/"
    return [m.mountpoint for m in mounts() if m.mountpoint.startswith(prefix)]


def loop_attr(dev: str, name: str) -> str:
    """``ro`` is the device's own attribute; ``autoclear`` and the others sit under ``loop/``."""
    path = Path("/sys/block", dev, name) if name == "ro" else Path("/sys/block", dev, "loop", name)
    return path.read_text().strip()


# -- the kernel alone ----------------------------------------------------------------------------------


@pytest.mark.skipif(bool(EROFS_WHY), reason=EROFS_WHY or "-")
@pytest.mark.skipif(KERNEL < (6, 12), reason=f"file-backed EROFS needs Linux >= 6.12 (this is {os.uname().release})")
def test_probe_picks_file_backed_erofs_and_leaves_nothing(tmp_path: Path) -> None:
    work = tmp_path / "probe"
    mode, why = kernel_path.probe(work)
    assert (mode, why) == ("file", "file-backed EROFS mounts and reads back")
    assert mounts_under(tmp_path) == [] and loops_under(tmp_path) == {}
    assert sorted(p.name for p in work.iterdir()) == ["mnt"]  # its image and data file are gone
    assert kernel_path.probe(work)[0] == "file"  # again, over what the first left


@pytest.mark.skipif(bool(LOOP_WHY), reason=LOOP_WHY or "-")
def test_loop_mount_shows_the_same_layer_as_file_backed(tmp_path: Path) -> None:
    """A real layer (every entry kind, whiteouts, opaque dirs, hardlinks, xattrs, 3 MiB of
    data) indexed by imgaccel's indexer, its EROFS image mounted both ways."""
    tar = tmp_path / "layer.tar"
    write_tar(tar, _rich_layer())
    image = build_erofs_image(index_tar(tar))
    assert image.warnings == []
    meta = tmp_path / "meta.erofs"
    meta.write_bytes(image.data)
    expected = expected_tree(tar)
    views = {}
    for mode in ("file", "loop"):
        mnt = tmp_path / mode
        mnt.mkdir()
        kernel_path.mount_layer(mode, meta, tar, mnt)
        try:
            if mode == "loop":
                attached = loops_under(tmp_path)
                assert sorted(attached.values()) == [str(tar), str(meta)]
                assert all(loop_attr(d, "ro") == "1" and loop_attr(d, "autoclear") == "1" for d in attached)
                source = next(m.source for m in mounts() if m.mountpoint == str(mnt))
                assert source.startswith("/dev/loop") and source.removeprefix("/dev/") in attached
            compare_mount(mnt, expected)  # against an independent reading of the tar
            views[mode] = snapshot_tree(mnt)
        finally:
            umount_or_detach(mnt)
    assert views["loop"] == views["file"]
    wait_for("the loop devices to detach themselves", lambda: loops_under(tmp_path) == {})


def snapshot_tree(root: Path) -> dict[bytes, tuple[object, ...]]:
    """Everything a reader sees of every path under ``root``: metadata, bytes, targets, xattrs."""
    out: dict[bytes, tuple[object, ...]] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in [b"", *dirnames, *filenames] if dirpath == base else [*dirnames, *filenames]:
            full = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(full)
            data: object = None
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    data = f.read()
            elif stat.S_ISLNK(st.st_mode):
                data = os.readlink(full)
            xattrs: dict[str, bytes | int | None] = {}
            for x in os.listxattr(full, follow_symlinks=False):
                try:
                    xattrs[x] = os.getxattr(full, x, follow_symlinks=False)
                except OSError as e:
                    xattrs[x] = e.errno
            out[full[len(base) :]] = (st.st_mode, st.st_ino, st.st_nlink, st.st_uid, st.st_gid, st.st_size,
                                      st.st_mtime_ns, st.st_rdev, data, xattrs)  # fmt: skip
    return out


@pytest.mark.skipif(bool(LOOP_WHY), reason=LOOP_WHY or "-")
def test_loop_devices_attached_at_once_and_without_loop_configure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backing = tmp_path / "data"
    backing.write_bytes(os.urandom(4096))
    # Six threads racing for free devices: LOOP_CTL_GET_FREE hands several the same one, the
    # losers get EBUSY and take the next.
    got: list[kernel_path.LoopDevice] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def attach() -> None:
        start.wait()
        try:
            got.append(kernel_path.attach_loop(backing))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=attach) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert len({d.number for d in got}) == 6
        for d in got:
            assert kernel_path.loop_backing_files()[f"loop{d.number}"] == str(backing)
            assert loop_attr(f"loop{d.number}", "ro") == "1" and loop_attr(f"loop{d.number}", "autoclear") == "1"
            with open(d.path, "rb") as f:
                assert f.read() == backing.read_bytes()
    finally:
        for d in got:
            d.close()
    wait_for("the devices to detach on last close", lambda: loops_under(tmp_path) == {})

    # A kernel before 5.8 answers LOOP_CONFIGURE as an unknown ioctl (EINVAL): LOOP_SET_FD
    # then LOOP_SET_STATUS64 give the same device.
    monkeypatch.setattr(kernel_path, "LOOP_CONFIGURE", 0x4CFF)
    with kernel_path.attached(backing) as dev:
        assert loops_under(tmp_path) == {f"loop{dev.number}": str(backing)}
        assert loop_attr(f"loop{dev.number}", "ro") == "1" and loop_attr(f"loop{dev.number}", "autoclear") == "1"
    wait_for("the device to detach on last close", lambda: loops_under(tmp_path) == {})


# -- "fuse" mode's tree process, alone ------------------------------------------------------------------

auth_registry = test_auth.auth_registry  # a registry with htpasswd basic auth (alice / s3cret)
TREE_WHY = (
    "mounting FUSE needs root" if os.geteuid() != 0
    else "no /dev/fuse" if not os.path.exists("/dev/fuse")
    else "missing htpasswd (apache2-utils)" if shutil.which("htpasswd") is None
    else ""
)  # fmt: skip


def layer_digests_of(host: str, creds: Credentials, ref: str) -> list[str]:
    """The layers of ``ref``'s (first) platform manifest, from a registry that needs ``creds``."""
    parsed = parse_reference(ref)

    async def go() -> list[str]:
        async with RegistryClient(host, plain_http=True, credentials=creds) as client:
            top = (await client.get_manifest(parsed.repository, parsed.reference)).json()
            if "manifests" in top:
                top = (await client.get_manifest(parsed.repository, top["manifests"][0]["digest"])).json()
        return [layer["digest"] for layer in top["layers"]]

    return asyncio.run(go())


@pytest.mark.timeout(300)
@pytest.mark.skipif(bool(TREE_WHY), reason=TREE_WHY or "-")
def test_tree_process_reads_with_the_daemons_credentials_only(
    auth_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = auth_registry.host
    source = f"{host}/kernel-path/private:v1"
    push(unique_image(tmp_path, "kp-private"), "v1", source, creds="alice:s3cret")
    (tmp_path / "docker").mkdir()
    env = test_auth.docker_config(tmp_path / "docker", host, "alice", "s3cret")
    r = run_cli("convert", source, "--mode", "full", env=env)
    assert r.code == 0, r.err
    ref = source + "_containerd_accelerated"
    creds = Credentials("alice", "s3cret")
    (digest,) = layer_digests_of(host, creds, ref)
    # The daemon's own environment may name a Docker config with working credentials: the
    # tree process must use the daemon's settings, not that.
    monkeypatch.setenv("DOCKER_CONFIG", env["DOCKER_CONFIG"])
    layer_dir = tmp_path / "layer"

    def tree(credentials: Credentials | None) -> kernel_path.LayerTreeSource:
        return kernel_path.LayerTreeSource(ref=ref, registry=host, layer_digest=digest, cache_dir=tmp_path / "cache",
                                           plain_http=True, credentials=credentials)  # fmt: skip

    with pytest.raises(OSError, match="authentication required and no credentials"):
        kernel_path.serve_layer_tree(tree(None), layer_dir)
    assert mounts_under(tmp_path) == [] and tree_processes(tmp_path) == {}
    try:
        assert kernel_path.serve_layer_tree(tree(creds), layer_dir) is True
        pid = kernel_path.layer_tree_pid(layer_dir)
        assert pid is not None and os.getsid(pid) == pid  # a session of its own: it outlives the daemon
        fs = layer_dir / "fs"
        assert (fs / "salt.txt").read_text() == "kp-private"
        assert os.readlink(fs / "bin" / "sh") == "busybox"
        assert any(p.is_file() for p in (tmp_path / "cache").rglob("*"))  # it reads through the cache it is given
        assert sorted(mounts_under(layer_dir)) == [str(fs), str(layer_dir / "tree")]
        assert kernel_path.serve_layer_tree(tree(creds), layer_dir) is False  # served already: kept
        assert kernel_path.layer_tree_pid(layer_dir) == pid
        for f in layer_dir.glob("tree*"):
            assert f.is_dir() or b"s3cret" not in f.read_bytes(), f  # the password is never written
    finally:
        taken = kernel_path.stop_layer_tree(layer_dir)
    assert taken == [str(layer_dir / "fs"), str(layer_dir / "tree")]
    assert mounts_under(tmp_path) == [] and tree_processes(tmp_path) == {}
    assert kernel_path.stop_layer_tree(layer_dir) == []


# -- through containerd ------------------------------------------------------------------------------------


def _containerd_why(mode: str) -> str:
    if os.geteuid() != 0:
        return "containerd needs root"
    if MISSING:
        return f"missing {', '.join(MISSING)}"
    if CTR_REMOTE is None:
        return "missing ctr-remote (Debian package stargz-snapshotter)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if mode == "auto" and KERNEL < (6, 12):
        return f"auto picks file-backed EROFS on Linux >= 6.12 only (this is {os.uname().release})"
    return missing_for_mounts("overlay") or {"auto": EROFS_WHY, "loop": LOOP_WHY}.get(mode, "")


def tree_processes(root: Path) -> dict[int, list[bytes]]:
    """pid -> argv of every live ``imgaccel mount --layer`` process serving a layer under ``root``."""
    found = {}
    needle = os.fsencode(root)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"--layer" in args and any(a.startswith(needle) for a in args) and state != "Z":
            found[int(proc.name)] = args
    return found


@pytest.fixture(scope="module", params=["auto", "loop", "fuse"])
def node_in_mode(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, registry: Registry
) -> Iterator[tuple[str, list[str], DaemonProcess]]:
    """containerd pulling through the real daemon, ``kernel_path`` set in its node config."""
    mode = str(request.param)
    why = _containerd_why(mode)
    if why:
        pytest.skip(why)
    work = tmp_path_factory.mktemp(f"kernel-path-{mode}")
    config = work / "node.yaml"
    config.write_text(f"kernel_path: {mode}\n")  # (DaemonProcess gives the daemon <workdir>/chunk-cache)
    with node_with_daemon(work, registry) as (ctr, daemon):
        daemon.start(None, config)
        yield mode, ctr, daemon
    assert tree_processes(daemon.root) == {}, "unmount_all left a tree process"


@pytest.mark.timeout(600)
def test_kernel_path_through_containerd(
    node_in_mode: tuple[str, list[str], DaemonProcess], converted: dict[str, str], registry: Registry
) -> None:
    mode, ctr, daemon = node_in_mode
    ctr = [*ctr, "--namespace", f"kernel-path-{mode}"]
    ref = converted["full"]
    run = ["run", "--rm", "--snapshotter", "imgaccel", ref]
    layers_dir = daemon.root / "lazy" / "layers"
    if mode == "auto":
        assert "kernel path: file (file-backed EROFS mounts and reads back)" in daemon.log()
        mode = "file"
    else:
        assert f"kernel path: {mode} (set in the node configuration)" in daemon.log()

    rpull(ctr, ref)
    digests = platform_layers(ref)
    hexes = [d.split(":", 1)[1] for d in digests]
    assert not set(digests) & blobs(ctr), "containerd downloaded a layer blob"
    here = {m.mountpoint: m for m in mounts()}
    for hexd in hexes:
        m = here[str(layers_dir / hexd / "fs")]
        meta = str(layers_dir / hexd / f"meta-v{WRITER_VERSION}.erofs")
        if mode == "file":
            assert (m.fstype, m.source) == ("erofs", meta), m
        elif mode == "loop":
            assert m.fstype == "erofs" and m.source.startswith("/dev/loop"), m
            assert loops_under(daemon.root).get(m.source.removeprefix("/dev/")) == meta
            assert str(daemon.root / "lazy" / "blobs" / hexd) in loops_under(daemon.root).values()
        else:
            assert m.fstype == "fuse.imgaccel" and here[str(layers_dir / hexd / "tree")].fstype == m.fstype, m
            assert kernel_path.layer_tree_pid(layers_dir / hexd) is not None
    trees = tree_processes(daemon.root)
    assert len(trees) == (len(digests) if mode == "fuse" else 0)
    assert mode == "loop" or loops_under(daemon.root) == {}
    if mode == "fuse":
        for args in trees.values():  # the node's chunk cache, and its registry settings
            assert args[args.index(b"--cache-dir") + 1] == os.fsencode(daemon.workdir / "chunk-cache")
        settings = (layers_dir / hexes[0] / kernel_path.TREE_SETTINGS).read_text()
        assert f"{registry.host}:\n    plain_http: true\n" in settings and "password" not in settings
    check_image_view(ctr_run(ctr, *run, f"{mode}-1", "/bin/sh", "-c", SCRIPT))

    # A daemon killed and started again keeps every mount and serves on; in "fuse" mode it
    # keeps every live tree process and replaces only one that died meanwhile.
    before = tree_processes(daemon.root)
    served = daemon.log().count("served lazily by a new FUSE tree process")
    mounted = sorted(mounts_under(layers_dir))
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    dead = kernel_path.layer_tree_pid(layers_dir / hexes[0]) if mode == "fuse" else None
    if dead is not None:
        os.kill(dead, signal.SIGKILL)
        wait_for("the tree process to die", lambda: dead not in tree_processes(daemon.root))
    daemon.start(None)
    wait_for("the snapshots to be re-served", lambda: daemon.log().count("re-served remote snapshot") >= len(digests),
             timeout=60)  # fmt: skip
    after = tree_processes(daemon.root)
    assert sorted(mounts_under(layers_dir)) == mounted
    if dead is None:
        assert after == before
        assert daemon.log().count("served lazily by a new FUSE tree process") == served
    else:
        assert {p: a for p, a in after.items() if p in before} == {p: a for p, a in before.items() if p != dead}
        assert len(after) == len(before) and kernel_path.layer_tree_pid(layers_dir / hexes[0]) not in before
        assert daemon.log().count("served lazily by a new FUSE tree process") == served + 1
    check_image_view(ctr_run(ctr, *run, f"{mode}-2", "/bin/sh", "-c", SCRIPT))

    # Removing the image releases every layer: mounts, loop devices, tree processes.
    ctr_run(ctr, "images", "rm", "--sync", ref)
    wait_for("every layer to be released", lambda: mounts_under(layers_dir) == [], timeout=60)
    wait_for("the loop devices to detach", lambda: loops_under(daemon.root) == {})
    assert tree_processes(daemon.root) == {}
