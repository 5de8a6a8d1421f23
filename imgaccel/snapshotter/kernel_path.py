"""How lazy layers reach this node's kernel (``NodeConfig.kernel_path``): the probe that picks a
mode, loop devices without util-linux, mounting a layer's EROFS image, and the per-layer FUSE
tree process of the "fuse" mode.

* ``file``: the EROFS metadata image mounted file-backed, ``device=`` the layer tar (Linux >= 6.12);
* ``loop``: the same image and tar each on a read-only, autoclearing loop device (EROFS before
  6.12 takes block devices only, for the mount source and for ``device=``; 512-byte blocks need
  >= 6.4). Unmounting the EROFS mount frees both devices;
* ``fuse``: no EROFS at all: ``imgaccel mount --layer`` serves the layer alone, in overlayfs
  form (whiteouts as 0/0 character devices, ``trusted.overlay.opaque=y`` on opaque
  directories), in a process of its own per layer (pyfuse3 allows one session per process),
  in its own session so that it outlives a restart of the node daemon. It mounts at
  ``layers/<hex>/tree`` (the layer is its directory ``0``), bind-mounted at ``layers/<hex>/fs``:
  the directory a snapshot gets is ``fs`` whatever the mode. Next to them: ``tree.pid``,
  ``tree.log`` and ``tree-settings.yaml`` (the registry's plain-HTTP setting and user name).

``probe`` tries them in that order with a tiny image of its own and says why it settled.
Every call here blocks (mount(2), ioctls, child processes): the daemon runs them in a worker
thread (``asyncio.to_thread``), never on the event loop that answers the FUSE data mount.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from imgaccel.formats.erofs import build_erofs_image
from imgaccel.formats.layer_index import Chunk, Entry, LayerIndex
from imgaccel.pusher.auth import Credentials
from imgaccel.snapshotter.mounts import MS_NODEV, MS_RDONLY, mount, mount_at, umount_or_detach

KernelPath = Literal["file", "loop", "fuse"]
MS_BIND = 4096  # mount(2) flag

# -- probe -------------------------------------------------------------------------------------------

_PROBE_FILE = "probe"
_PROBE_BYTES = b"imgaccel kernel path probe\n" * 20  # 540 bytes: two 512-byte blocks of device 1


def probe(workdir: Path) -> tuple[KernelPath, str]:
    """The first of "file", "loop", "fuse" this kernel serves, and one line saying why.

    Writes a one-file layer (tar-like data file + its EROFS image, from ``formats.erofs``) to
    ``workdir``, mounts it each way and reads the file back. Everything it mounted or attached
    is gone when it returns, and so are its files."""
    workdir.mkdir(parents=True, exist_ok=True)
    meta, data, mnt = workdir / "probe.erofs", workdir / "probe.tar", workdir / "mnt"
    mnt.mkdir(exist_ok=True)
    if mount_at(mnt) is not None:  # left by a probe that was killed mid-way
        umount_or_detach(mnt)
    _write_probe_layer(meta, data)
    refused: list[str] = []
    tries: tuple[tuple[KernelPath, str], ...] = (("file", "file-backed EROFS"), ("loop", "EROFS on loop devices"))
    try:
        for mode, what in tries:
            try:
                _try_mount(mode, meta, data, mnt)
            except OSError as e:
                refused.append(f"{what} refused: {e.strerror or e}")
                continue
            return mode, "; ".join(refused) or "file-backed EROFS mounts and reads back"
        return "fuse", "; ".join(refused)
    finally:
        for f in (meta, data):
            with suppress(OSError):
                f.unlink()


def _write_probe_layer(meta: Path, data: Path) -> None:
    """A data file laid out like a tar (a 512-byte header, then the file's bytes, padded to a
    block) and the EROFS image of a layer holding that one file."""
    body = b"\0" * 512 + _PROBE_BYTES
    body += b"\0" * (-len(body) % 512)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    index = LayerIndex(
        encoding="tar",
        blob_digest=digest,
        blob_size=len(body),
        diff_id=digest,
        uncompressed_size=len(body),
        chunks=[Chunk(c_offset=0, c_size=len(body), u_offset=0, u_size=len(body), digest=digest)],
        entries=[Entry(name=_PROBE_FILE, type="reg", size=len(_PROBE_BYTES), offset=512, mode=0o444)],
    )
    data.write_bytes(body)
    meta.write_bytes(build_erofs_image(index).data)


def _try_mount(mode: KernelPath, meta: Path, data: Path, mnt: Path) -> None:
    mount_layer(mode, meta, data, mnt)
    try:
        got = (mnt / _PROBE_FILE).read_bytes()
        if got != _PROBE_BYTES:
            raise OSError(errno.EIO, f"mounted, but the probe file reads back wrong ({len(got)} bytes)")
    finally:
        umount_or_detach(mnt)


def mount_layer(mode: str, meta: Path, data: Path, target: Path) -> None:
    """Mount the EROFS image ``meta`` read-only at ``target`` with ``data`` (the layer's tar)
    as its device 1: file-backed ("file") or through two loop devices ("loop") that free
    themselves when the mount goes (``mounts.umount_or_detach``)."""
    flags = MS_RDONLY | MS_NODEV
    if mode == "file":
        mount(meta, target, "erofs", flags, f"device={data}")
    elif mode == "loop":
        with attached(meta) as meta_dev, attached(data) as data_dev:
            mount(meta_dev.path, target, "erofs", flags, f"device={data_dev.path}")
    else:
        raise ValueError(f"kernel path {mode!r} mounts no EROFS image")


# -- loop devices ------------------------------------------------------------------------------------

# <linux/loop.h>
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_CONFIGURE = 0x4C0A  # Linux >= 5.8: attach and set status in one call
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4  # detach when the last opener closes the device
LO_NAME_SIZE = 64
LO_KEY_SIZE = 32

# struct loop_info64 (232 bytes, no padding: native byte order, standard sizes):
#   u64 lo_device, lo_inode, lo_rdevice (read-only), lo_offset, lo_sizelimit (0: the whole file)
#   u32 lo_number (read-only), lo_encrypt_type (obsolete), lo_encrypt_key_size, lo_flags
#   u8  lo_file_name[64], lo_crypt_name[64], lo_encrypt_key[32]
#   u64 lo_init[2]
LOOP_INFO64 = f"=5Q4I{LO_NAME_SIZE}s{LO_NAME_SIZE}s{LO_KEY_SIZE}s2Q"
# struct loop_config (304 bytes): u32 fd (the backing file), u32 block_size (0: default),
#   struct loop_info64 info (at offset 8), u64 __reserved[8] (must be zero)
LOOP_CONFIG = "=2I" + LOOP_INFO64[1:] + "8Q"
assert struct.calcsize(LOOP_INFO64) == 232 and struct.calcsize(LOOP_CONFIG) == 304

_ATTACH_TRIES = 32  # free devices another process took between GET_FREE and our attach


@dataclass
class LoopDevice:
    number: int
    path: Path
    fd: int  # open on the device: with autoclear, the device stays attached while it is open

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _loop_info(backing: Path, flags: int) -> tuple[int | bytes, ...]:
    name = os.fsencode(backing)[: LO_NAME_SIZE - 1]  # shown by losetup; the kernel keeps the real path
    return (0, 0, 0, 0, 0, 0, 0, 0, flags, name, b"", b"", 0, 0)


def attach_loop(backing: Path) -> LoopDevice:
    """A free loop device on ``backing``, read-only and autoclearing, open (``fd``): close it
    once a mount holds the device, and the device detaches itself when that mount goes."""
    flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR
    info = _loop_info(backing, flags)
    backing_fd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(_ATTACH_TRIES):
                number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                path = Path(f"/dev/loop{number}")
                dev = _open_device(path)
                try:
                    _configure(dev, backing_fd, info)
                except OSError as e:
                    os.close(dev)
                    if e.errno == errno.EBUSY:  # another process attached it first: take the next
                        continue
                    raise OSError(e.errno, f"attach {path} to {backing}: {os.strerror(e.errno or 0)}") from None
                return LoopDevice(number, path, dev)
        finally:
            os.close(ctl)
    finally:
        os.close(backing_fd)
    raise OSError(errno.EBUSY, f"attach a loop device to {backing}: every free device was taken first")


def _open_device(path: Path) -> int:
    """devtmpfs creates the node of a device LOOP_CTL_GET_FREE just added a moment later."""
    deadline = time.monotonic() + 2
    while True:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _configure(dev: int, backing_fd: int, info: tuple[int | bytes, ...]) -> None:
    config = struct.pack(LOOP_CONFIG, backing_fd, 512, *info, *([0] * 8))
    try:
        fcntl.ioctl(dev, LOOP_CONFIGURE, config)
        return
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
    # Before Linux 5.8 (no LOOP_CONFIGURE): attach, then set the flags. A device attached but
    # not yet autoclearing is detached again if the second step fails.
    fcntl.ioctl(dev, LOOP_SET_FD, backing_fd)
    try:
        fcntl.ioctl(dev, LOOP_SET_STATUS64, struct.pack(LOOP_INFO64, *info))
    except OSError:
        with suppress(OSError):
            fcntl.ioctl(dev, LOOP_CLR_FD, 0)
        raise


@contextmanager
def attached(backing: Path) -> Iterator[LoopDevice]:
    """``attach_loop`` for the duration of the block; on leaving, the device detaches itself
    unless something (a mount) still holds it."""
    dev = attach_loop(backing)
    try:
        yield dev
    finally:
        dev.close()


def loop_backing_files() -> dict[str, str]:
    """Attached loop devices: name (``loop3``) -> backing file, from /sys/block."""
    found = {}
    for f in Path("/sys/block").glob("loop*/loop/backing_file"):
        with suppress(OSError):
            found[f.parent.parent.name] = f.read_text().strip()
    return found


# -- fuse mode: one `imgaccel mount --layer` process per layer ---------------------------------------

LAYER_TREE_DIR = "0"  # the layer's directory inside its tree mount (``imgaccel mount --layer``)
TREE, TREE_PID, TREE_LOG, TREE_SETTINGS = "tree", "tree.pid", "tree.log", "tree-settings.yaml"
PASSWORD_ENV = "IMGACCEL_LAYER_REGISTRY_PASSWORD"
_START_TIMEOUT = 120.0  # ``mount --daemon`` itself gives up after 60 s


@dataclass(frozen=True)
class LayerTreeSource:
    """What the tree process needs to read a layer as the node daemon does."""

    ref: str  # the image reference
    registry: str  # its host[:port]
    layer_digest: str
    cache_dir: Path  # the node's chunk cache, shared with the daemon
    plain_http: bool
    credentials: Credentials | None


def serve_layer_tree(source: LayerTreeSource, layer_dir: Path, timeout: float = _START_TIMEOUT) -> bool:
    """Make ``layer_dir/fs`` show ``source``'s layer alone, in overlayfs form, as "fuse" mode
    does: a tree process (``imgaccel mount --layer``, in a session of its own) serves the
    layer at ``layer_dir/tree/0``, bind-mounted at ``fs`` so that a snapshot's directory is
    ``fs`` in every mode. A live tree process is kept (a restarted daemon starts no second
    one); a dead one's mounts are cleared first. True when a process was started.

    The process gets exactly the daemon's registry settings: plain HTTP or not, and the
    credentials (the password in its environment, never on disk), and no other credential
    source (``DOCKER_CONFIG`` names a directory holding no config.json)."""
    fs, tree = layer_dir / "fs", layer_dir / TREE
    started = False
    if layer_tree_pid(layer_dir) is None:
        stop_layer_tree(layer_dir)
        _start_tree(source, layer_dir, timeout)
        started = True
    if mount_at(fs) is None:
        fs.mkdir(parents=True, exist_ok=True)
        mount(tree / LAYER_TREE_DIR, fs, "none", MS_BIND)
    return started


def _start_tree(source: LayerTreeSource, layer_dir: Path, timeout: float) -> None:
    tree = layer_dir / TREE
    tree.mkdir(parents=True, exist_ok=True)
    registry: dict[str, object] = {"plain_http": source.plain_http}
    env = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
    if source.credentials is not None:
        registry |= {"username": source.credentials.username, "password_env": PASSWORD_ENV}
        env[PASSWORD_ENV] = source.credentials.password
    settings = layer_dir / TREE_SETTINGS
    settings.write_text(yaml.safe_dump({"registries": {source.registry: registry}}))
    env |= {"IMGACCEL_CONFIG": str(settings), "DOCKER_CONFIG": str(layer_dir)}
    # fmt: off
    cmd = [sys.executable, "-m", "imgaccel.cli.main", "-v", "mount", source.ref, str(tree),
           "--layer", source.layer_digest, "--cache-dir", str(source.cache_dir), "--no-prefetch",
           "--daemon", "--pid-file", str(layer_dir / TREE_PID), "--log-file", str(layer_dir / TREE_LOG)]
    # fmt: on
    what = f"layer {source.layer_digest}: FUSE tree at {tree}"
    try:
        r = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_layer_tree(layer_dir)
        raise OSError(errno.ETIMEDOUT, f"{what}: not up after {timeout:.0f} s") from None
    if r.returncode != 0 or layer_tree_pid(layer_dir) is None:
        why = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        stop_layer_tree(layer_dir)
        raise OSError(errno.EIO, f"{what}: not mounted: {why}{_tail(layer_dir / TREE_LOG)}")


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return f" (its log: {lines[-1]})" if lines else ""


def layer_tree_pid(layer_dir: Path) -> int | None:
    """The pid of the live process serving ``layer_dir``'s tree, or None."""
    try:
        pid = int((layer_dir / TREE_PID).read_text().strip())
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    ours = os.fsencode(layer_dir / TREE) in args and b"--layer" in args  # not a recycled pid
    return pid if ours and state not in ("Z", "X") else None


def stop_layer_tree(layer_dir: Path, grace: float = 10.0) -> list[str]:
    """Take down ``layer_dir``'s tree: the bind mount at ``fs``, the process (SIGTERM: it
    unmounts its tree; SIGKILL after ``grace`` seconds) and the tree mount if still there
    (each detached if busy). Returns the mount points taken down (none: no tree there)."""
    done = []
    fs, tree = layer_dir / "fs", layer_dir / TREE
    here, tree_mounted = mount_at(fs), mount_at(tree) is not None
    if here is not None and here.fstype.startswith("fuse"):
        umount_or_detach(fs)
        done.append(str(fs))
    pid = layer_tree_pid(layer_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if pid is None or layer_tree_pid(layer_dir) != pid:
            break
        with suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while layer_tree_pid(layer_dir) == pid and time.monotonic() < deadline:
            time.sleep(0.02)
    if mount_at(tree) is not None:  # the process was killed, or its own unmount failed
        umount_or_detach(tree)
    if tree_mounted:
        done.append(str(tree))
    with suppress(FileNotFoundError):
        (layer_dir / TREE_PID).unlink()
    return done
