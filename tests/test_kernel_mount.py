"""``imgaccel mount`` through the kernel (``snapshotter.image_mount``), on the real kernel with the
real registry fixtures.

As root, ``mount --daemon`` puts a read-only overlay of EROFS layers at the mount point (one
EROFS mount per layer and the FUSE data mount under the mount point's state directory), and
every regular file reads back with the sha256 an independent full extraction of the source
image gives; whiteouts and opaque directories behave. A one-layer image is an overlay of its
EROFS layer over an empty one. ``--fuse-tree`` still gives the pyfuse3 tree. ``umount``, SIGTERM,
SIGINT and an unmount by anyone else take everything down (mounts, loop devices, processes,
state); after a SIGKILL of the mount process, ``umount`` does it, failing the reads that were
waiting for the dead server.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures.build_images import BIG_FILE_SIZE, push, unique_image
from imgaccel.snapshotter import kernel_path
from imgaccel.snapshotter.image_mount import state_dir_for
from imgaccel.snapshotter.mounts import MountInfo, mount_at, mounts, umount
from tests.erofs_mount import missing_for_mounts
from tests.helpers import run_cli
from tests.registry import Registry
from tests.test_lazy_containerd import source_files

WHY = missing_for_mounts("erofs", "overlay") or ("" if os.path.exists("/dev/fuse") else "no /dev/fuse")
pytestmark = [pytest.mark.skipif(bool(WHY), reason=WHY or "-"), pytest.mark.timeout(300)]


@dataclass
class Mounted:
    where: Path
    state: Path
    pid: int
    log: Path


def wait_for(what: str, done: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def leftovers(m: Mounted) -> dict[str, object]:
    """Whatever of the mount is still there (mountinfo and /proc only: a FUSE mount whose
    server is gone must not be stat'ed)."""
    prefix = os.path.realpath(m.state) + "/"
    procs = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with suppress(OSError):
            if str(m.state).encode() in cmdline.read_bytes() and alive(int(cmdline.parent.name)):
                procs.append(cmdline.parent.name)
    found = {
        "mount at the mount point": mount_at(m.where),
        "mounts under the state dir": [x.mountpoint for x in mounts() if x.mountpoint.startswith(prefix)],
        "loop devices": [d for d, f in kernel_path.loop_backing_files().items() if f.startswith(prefix)],
        "mount process": m.pid if alive(m.pid) else None,
        "processes naming the state dir": procs,
        "state dir": m.state if m.state.exists() else None,
    }
    return {k: v for k, v in found.items() if v}


@contextmanager
def mounted(ref: str, tmp_path: Path, *args: str, name: str = "mnt") -> Iterator[Mounted]:
    """``imgaccel mount --daemon``; whatever a failing test leaves is taken down after."""
    where = tmp_path / name
    where.mkdir()
    log, pid_file = tmp_path / f"{name}.log", tmp_path / f"{name}.pid"
    r = run_cli("-v", "mount", ref, str(where), "--daemon", "--cache-dir", str(tmp_path / f"{name}-cache"),
                "--log-file", str(log), "--pid-file", str(pid_file), *args)  # fmt: skip
    assert r.code == 0, r.err + (log.read_text() if log.exists() else "")
    m = Mounted(where, state_dir_for(where), int(pid_file.read_text()), log)
    try:
        yield m
    finally:
        if alive(m.pid) or mount_at(where) is not None or m.state.exists():
            run_cli("umount", str(where))
        if alive(m.pid):
            os.kill(m.pid, signal.SIGKILL)
            run_cli("umount", str(where))


def umount_cli(m: Mounted) -> None:
    r = run_cli("umount", str(m.where))
    assert r.code == 0, r.err
    assert leftovers(m) == {}, m.log.read_text()


def lower_dirs(top: MountInfo) -> list[str]:
    options = dict(o.split("=", 1) for o in top.super_options.split(",") if "=" in o)
    return options["lowerdir"].split(":")


def walk(root: Path) -> dict[str, os.stat_result]:
    """'/path' -> lstat of everything under ``root``."""
    seen = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            seen["/" + str(p.relative_to(root))] = os.lstat(p)
    return seen


@pytest.mark.parametrize("mode", ["full", "index"])
def test_overlay_of_erofs_layers_shows_the_source_image(
    converted: dict[str, str], images: dict[str, str], tmp_path: Path, mode: str
) -> None:
    with mounted(converted[mode], tmp_path) as m:
        top = mount_at(m.where)
        assert top is not None and top.fstype == "overlay", top
        assert {"ro", "nosuid", "nodev"} <= set(top.options.split(","))
        layers = [str(m.state / "lazy" / "layers" / str(i) / "fs") for i in (2, 1, 0)]
        assert lower_dirs(top) == layers  # top first
        erofs = {x.mountpoint for x in mounts() if x.fstype == "erofs"}
        assert set(layers) <= erofs
        data = mount_at(m.state / "lazy" / "blobs")
        assert data is not None and data.fstype == "fuse.imgaccel"
        log = m.log.read_text()
        assert "kernel path: file" in log or "kernel path: loop" in log, log
        assert "mounted " in log and " after " in log

        tree = walk(m.where)
        regular = {p for p, st in tree.items() if stat.S_ISREG(st.st_mode)}
        expected = source_files(images["app"])
        assert regular == set(expected)
        for path in sorted(regular):
            assert hashlib.sha256((m.where / path[1:]).read_bytes()).hexdigest() == expected[path], path
        # Whiteouts and opaque directories act, and their overlay form does not show.
        assert sorted(os.listdir(m.where / "old")) == ["keep.txt"]
        assert sorted(os.listdir(m.where / "opq")) == ["c.txt"]
        assert (m.where / "opq/c.txt").read_text() == "only this survives in opq\n"
        assert (m.where / "etc/motd").read_text() == "layer 2 motd\n"
        assert (m.where / "replaced-dir").read_text() == "now a file\n"
        assert not [p for p, st in tree.items() if stat.S_ISCHR(st.st_mode)], "a whiteout shows"
        assert "trusted.overlay.opaque" not in os.listxattr(m.where / "opq")
        assert os.stat(m.where / "data/hl-a").st_ino == os.stat(m.where / "data/hl-b").st_ino
        with pytest.raises(OSError) as err:
            (m.where / "etc/motd").write_text("x")
        assert err.value.errno == errno.EROFS
        umount_cli(m)
    assert "taking the mount down (unmounted)" in m.log.read_text()


def test_one_layer_image_is_an_overlay_over_an_empty_layer(registry: Registry, tmp_path: Path) -> None:
    ref = f"{registry.host}/kernel-mount/one:v1"
    push(unique_image(tmp_path, "kernel-one"), "v1", ref)
    assert run_cli("convert", ref, "--mode", "full", "--no-cache").code == 0
    with mounted(ref + "_containerd_accelerated", tmp_path) as m:
        top = mount_at(m.where)
        assert top is not None and top.fstype == "overlay", top
        assert {"ro", "nosuid", "nodev"} <= set(top.options.split(","))
        assert f"lowerdir={m.state}/lazy/layers/0/fs:{m.state}/lazy/empty" in top.super_options.split(","), top
        assert (m.where / "etc/motd").read_bytes() == b"unique\n"
        big = (m.where / "data/big.bin").read_bytes()
        assert len(big) == BIG_FILE_SIZE + len("kernel-one") and big.startswith(b"kernel-one")
        umount_cli(m)


def test_fuse_tree_flag_keeps_the_pyfuse3_tree(converted: dict[str, str], tmp_path: Path) -> None:
    with mounted(converted["full"], tmp_path, "--fuse-tree") as m:
        top = mount_at(m.where)
        assert top is not None and top.fstype == "fuse.imgaccel", top
        assert not m.state.exists()
        assert (m.where / "etc/motd").read_text() == "layer 2 motd\n"
        assert sorted(os.listdir(m.where / "old")) == ["keep.txt"]
        assert "kernel path" not in m.log.read_text()
        r = run_cli("umount", str(m.where))
        assert r.code == 0, r.err
        wait_for("the tree process to exit", lambda: not alive(m.pid))
        assert leftovers(m) == {}


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "umount(2)"])
def test_mount_process_cleans_up_when_signalled_or_unmounted(
    converted: dict[str, str], tmp_path: Path, how: str
) -> None:
    with mounted(converted["index"], tmp_path) as m:
        assert (m.where / "etc/motd").read_text() == "layer 2 motd\n"
        if how == "umount(2)":
            umount(m.where)  # not through imgaccel: the mount process notices by itself
        else:
            os.kill(m.pid, getattr(signal, how))
        wait_for("the mount process to exit", lambda: not alive(m.pid))
        assert leftovers(m) == {}, m.log.read_text()
        why = "unmounted" if how == "umount(2)" else f"got {how}"
        assert f"taking the mount down ({why})" in m.log.read_text()


def test_umount_after_sigkill_cleans_up_and_fails_waiting_reads(converted: dict[str, str], tmp_path: Path) -> None:
    with mounted(converted["index"], tmp_path) as m:
        assert (m.where / "etc/motd").read_text() == "layer 2 motd\n"
        os.kill(m.pid, signal.SIGKILL)
        wait_for("the mount process to die", lambda: not alive(m.pid))
        left = leftovers(m)
        assert left["mount at the mount point"] is not None and left["processes naming the state dir"], left
        # Nobody serves the layers' data now; the holder keeps the connection, so this waits.
        reader = subprocess.Popen(["cat", str(m.where / "data/big.bin")], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)  # fmt: skip
        try:
            time.sleep(1)
            assert reader.poll() is None, "a read of uncached data did not wait for the server"
            umount_cli(m)
            assert reader.wait(30) != 0  # the aborted connection failed it
        finally:
            if reader.poll() is None:
                reader.kill()


def test_mount_replaces_a_mount_whose_process_was_killed(converted: dict[str, str], tmp_path: Path) -> None:
    with mounted(converted["full"], tmp_path) as m:
        os.kill(m.pid, signal.SIGKILL)
        wait_for("the mount process to die", lambda: not alive(m.pid))
        killed = m.pid
        r = run_cli("mount", converted["full"], str(m.where), "--daemon", "--cache-dir", str(tmp_path / "cache2"),
                    "--log-file", str(m.log), "--pid-file", str(tmp_path / "mnt.pid"))  # fmt: skip
        assert r.code == 0, r.err
        assert "imgaccel mount process is gone" in r.err and "taking it down" in r.err
        m.pid = int((tmp_path / "mnt.pid").read_text())
        assert m.pid != killed and alive(m.pid)
        assert [x.fstype for x in mounts() if x.mountpoint == str(m.where)] == ["overlay"]  # not stacked
        assert (m.where / "etc/motd").read_text() == "layer 2 motd\n"
        umount_cli(m)
