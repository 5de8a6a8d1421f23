"""``imgaccel mount`` through the kernel: a whole image as a read-only overlay of EROFS layers.

This module owns the standalone mount's kernel path (the node daemon's, ``erofs_layers``, for
one image at one mount point, for as long as one process runs): ``kernel_mount``

1. claims the mount point's state directory (``state_dir_for``: the flock of ``mount.lock``,
   which holds the mount process's pid) and clears what a killed predecessor left there;
2. asks ``kernel_path.probe`` how EROFS reaches this kernel ("file" or "loop"; "fuse", not
   root, or any failure before MOUNTPOINT is mounted raise ``KernelPathUnavailable``: the
   caller serves the pyfuse3 tree instead);
3. serves each layer's uncompressed tar (``lazy_layers.LayerTar``, through the image's
   verified readers) as one file of a ``BlobFS`` data mount with its holder process, writes
   each layer's EROFS metadata image and mounts it (``kernel_path.mount_layer``);
4. puts a read-only overlay of them at MOUNTPOINT (``lowerdir=top:...:bottom``; a single
   layer goes over an empty directory), nosuid and nodev like the pyfuse3 tree.

The kernel then answers lookups, stat, readdir and cached reads; only reads of uncached
file data reach this process, as READs of a layer's tar. ``KernelMount.wait`` returns when
MOUNTPOINT is unmounted (by ``unmount`` or anyone), the data mount goes, or on SIGTERM or
SIGINT; leaving the block takes everything down (the overlay, the EROFS layers, the data mount
and its holder) and removes the state directory. Every mount and unmount runs in a worker
thread: the kernel may read through the data mount, which this process's event loop serves.

``unmount`` (``imgaccel umount``) unmounts MOUNTPOINT and waits for the mount process to
clean up; a mount process that was killed (even with SIGKILL) leaves its state directory
locked by nobody, and ``unmount`` then takes its mounts down itself: it aborts the data
mount's FUSE connection first (reads waiting for the dead server fail instead of hanging).

State, per mount point, only for root (the kernel path needs it)::

    /run/imgaccel/mounts/<first 16 hex of sha256(absolute MOUNTPOINT)>/
        mount.lock      flock held by the mount process (and by ``unmount`` while it
                        cleans up); its text is the mount process's pid
        mountpoint      the absolute mount point, for people looking around
        probe/          ``kernel_path.probe``'s scratch directory
        lazy/           laid out as the node daemon's ``<root>/lazy`` (``erofs_layers``), so
                        that ``erofs_layers.unmount_all`` takes down what a killed process left:
            blobs/              the BlobFS data mount: file N is layer N's tar (0 = bottom)
            blobfs/             BlobFS state, its holder's socket and log
            layers/N/meta.erofs layer N's EROFS metadata image
            layers/N/fs         layer N's EROFS mount, a lowerdir of the overlay
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import select
import shutil
import signal
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgaccel.reader.accelerated_image import AcceleratedImage
from imgaccel.snapshotter import fuse_holder, kernel_path
from imgaccel.snapshotter.blob_fs import BlobFS, BlobFSError
from imgaccel.snapshotter.erofs_layers import unmount_all, write_erofs_image
from imgaccel.snapshotter.lazy_layers import READER_MEMORY_CACHE, LayerTar
from imgaccel.snapshotter.mounts import MS_NODEV, MS_NOSUID, MS_RDONLY, mount, mount_at, mounts, umount_or_detach

log = logging.getLogger(__name__)

STATE_ROOT = Path("/run/imgaccel/mounts")
LOCK_FILE = "mount.lock"
TOP_FSTYPES = ("overlay", "erofs")  # what ``kernel_mount`` puts at MOUNTPOINT (erofs: one layer, bound)
_MAX_OPTIONS = 4095  # mount(2) copies one page of options
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_CLAIM_WAIT = 10.0  # seconds a new mount waits for a predecessor at the same mount point to finish
_UNMOUNT_WAIT = 30.0  # seconds ``unmount`` gives the mount process to clean up before signalling it


class KernelPathUnavailable(Exception):
    """The image cannot be mounted through the kernel here; the message says why, in one line.
    Nothing was left mounted at MOUNTPOINT."""


def absolute(mountpoint: str | Path) -> Path:
    """The absolute mount point, its parent resolved, without touching the last component
    (stat of a FUSE mount whose server is gone hangs)."""
    path = os.path.abspath(mountpoint)
    return Path(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def state_dir_for(mountpoint: str | Path) -> Path:
    """Where the kernel-path mount at ``mountpoint`` keeps its state (see the module doc)."""
    digest = hashlib.sha256(os.fsencode(absolute(mountpoint))).hexdigest()
    return STATE_ROOT / digest[:16]


# -- the mount process ---------------------------------------------------------------------------


@dataclass
class KernelMount:
    """An image mounted through the kernel at ``mountpoint`` (see ``kernel_mount``)."""

    mountpoint: Path
    state_dir: Path
    mode: kernel_path.KernelPath = "file"
    """How EROFS reaches the kernel: "file" (file-backed) or "loop" (on loop devices)."""
    layers: list[Path] = field(default_factory=list)
    """The EROFS mounts, bottom layer first."""
    blobs: BlobFS | None = None
    mount_id: int | None = None
    """The mount at ``mountpoint`` (mountinfo's id), once made."""
    _stop: asyncio.Future[str] | None = None

    @property
    def lazy(self) -> Path:
        return self.state_dir / "lazy"

    def mounted(self) -> bool:
        """The overlay this made at ``mountpoint`` is still there."""
        target = str(self.mountpoint)
        return self.mount_id is not None and any(
            m.mount_id == self.mount_id and m.mountpoint == target for m in mounts()
        )

    def stop(self, why: str) -> None:
        """Make ``wait`` return ``why``."""
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(why)

    async def wait(self) -> str:
        """Until ``mountpoint`` is unmounted, the data mount goes, ``stop`` is called, or the
        process gets SIGTERM or SIGINT; why."""
        assert self._stop is not None and self.blobs is not None
        changed = asyncio.Event()
        gone = asyncio.ensure_future(self.blobs.wait_unmounted())
        watch = _MountTableWatch(changed)
        try:
            while True:
                changed.clear()
                if not self.mounted():
                    return "unmounted"
                if self._stop.done():
                    return self._stop.result()
                if gone.done():
                    return f"its data mount {self.lazy / 'blobs'} went away ({gone.result()})"
                change = asyncio.ensure_future(changed.wait())
                waiters: list[asyncio.Future[Any]] = [change, gone, self._stop]
                try:
                    await asyncio.wait(waiters, timeout=30, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    change.cancel()
        finally:
            gone.cancel()
            watch.close()


@asynccontextmanager
async def kernel_mount(
    image: AcceleratedImage, mountpoint: str | Path, state_dir: Path | None = None
) -> AsyncIterator[KernelMount]:
    """Mount ``image`` read-only at ``mountpoint`` through the kernel for the block (see the
    module doc). Raises ``KernelPathUnavailable`` (nothing mounted) when it cannot; SIGTERM
    and SIGINT make ``KernelMount.wait`` return from the moment this is entered."""
    if os.geteuid() != 0:
        raise KernelPathUnavailable("not running as root (EROFS and overlay mounts need it)")
    if not image.layers:
        raise KernelPathUnavailable("the image has no layers")
    target = absolute(mountpoint)
    m = KernelMount(target, state_dir or state_dir_for(target))
    _check_overlay_options(m, len(image.layers))
    loop = asyncio.get_running_loop()
    m._stop = loop.create_future()
    for sig in _SIGNALS:
        loop.add_signal_handler(sig, m.stop, f"got {sig.name}")
    lock_fd: int | None = None
    try:
        lock_fd = await asyncio.to_thread(_claim, m.state_dir, target)
        await _clear(m.state_dir, keep_lock=True)  # what a killed predecessor left
        try:
            await _setup(m, image)
        except (OSError, BlobFSError, fuse_holder.HolderError) as e:
            raise KernelPathUnavailable(f"mounting through the kernel failed: {e}") from e
        yield m
    finally:
        try:
            await _take_down(m, lock_fd)
        finally:
            for sig in _SIGNALS:
                loop.remove_signal_handler(sig)
            if lock_fd is not None:
                os.close(lock_fd)


def _check_overlay_options(m: KernelMount, n_layers: int) -> None:
    longest = "lowerdir=" + ":".join(str(m.lazy / "layers" / str(i) / "fs") for i in range(n_layers))
    if n_layers > 1 and len(longest) > _MAX_OPTIONS:
        raise KernelPathUnavailable(f"{n_layers} layers: the overlay's lowerdir option would exceed one page")


async def _setup(m: KernelMount, image: AcceleratedImage) -> None:
    mode, why = await asyncio.to_thread(kernel_path.probe, m.state_dir / "probe")
    if mode == "fuse":
        raise KernelPathUnavailable(f"the kernel path probe says fuse: {why}")
    m.mode = mode
    log.info("kernel path: %s (%s)", mode, why)
    layers_dir = m.lazy / "layers"
    layers_dir.mkdir(parents=True, exist_ok=True)
    m.blobs = await BlobFS.open(m.lazy / "blobs", m.lazy / "blobfs")
    for i, reader in enumerate(image.layers):
        # The kernel caches file pages; in memory only what partly read chunks need.
        reader.memory_cache = min(reader.memory_cache, READER_MEMORY_CACHE)
        blob = await m.blobs.add(str(i), LayerTar(reader, image.ref.registry))
        meta, fs = layers_dir / str(i) / "meta.erofs", layers_dir / str(i) / "fs"
        fs.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(write_erofs_image, reader, meta)
        await asyncio.to_thread(kernel_path.mount_layer, mode, meta, blob, fs)
        m.layers.append(fs)
        log.debug("layer %d (%s) mounted at %s", i, image.layer_digests[i], fs)
    await asyncio.to_thread(_mount_top, m)
    log.info("%s: an overlay of %d EROFS layer(s) (%s), state in %s", m.mountpoint, len(m.layers), mode, m.state_dir)


def _mount_top(m: KernelMount) -> None:
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV
    target = m.mountpoint
    lowers = [str(p) for p in reversed(m.layers)]
    if len(lowers) == 1:
        # overlayfs wants two lower layers (without an upper one); an empty bottom layer also
        # hides the layer's own whiteouts and opaque markers, as a bind mount would not.
        empty = m.lazy / "empty"
        empty.mkdir(exist_ok=True)
        lowers.append(str(empty))
    mount("imgaccel", target, "overlay", flags, "lowerdir=" + ":".join(lowers))
    m.mount_id = _mount_id(target)


def _mount_id(target: Path) -> int:
    here = mount_at(target)
    if here is None:
        raise OSError(errno.EIO, f"{target}: mounted, yet not in /proc/self/mountinfo")
    return here.mount_id


async def _take_down(m: KernelMount, lock_fd: int | None) -> None:
    """Unmount what ``kernel_mount`` made, top first; remove the state directory (when the
    lock was ours). A step that fails is logged; ``imgaccel umount`` can finish the job."""
    if m.mounted():
        try:
            await asyncio.to_thread(umount_or_detach, m.mountpoint)
        except OSError as e:
            log.error("%s: %s", m.mountpoint, e)
    if m.blobs is not None:
        log.info("FUSE data mount: %s", _summary(m.blobs))
        await m.blobs.close()
    if lock_fd is not None:
        await _clear(m.state_dir, keep_lock=False)


def _summary(blobs: BlobFS) -> str:
    st = blobs.stats
    return f"{sum(st.requests.values())} requests, {st.read_bytes} bytes read, {st.read_errors} errors"


async def _clear(state: Path, keep_lock: bool) -> None:
    """Take down every mount under ``state`` (``unmount_all``: the data mount's connection
    aborted first, then the EROFS layers, then the data mount and its holder) and remove the
    directory (but the lock file, with ``keep_lock``) — unless something stays mounted there."""
    try:
        done = await unmount_all(state)
    except (OSError, fuse_holder.HolderError) as e:
        log.error("%s: taking its mounts down failed: %s", state, e)
        return
    log.debug("%s: unmounted %s", state, done)
    await asyncio.to_thread(_remove_state, state, keep_lock)


def _remove_state(state: Path, keep_lock: bool) -> None:
    prefix = os.path.realpath(state) + "/"
    left = [m.mountpoint for m in mounts() if m.mountpoint.startswith(prefix)]
    if left:  # never walk into a mount (a FUSE mount nobody serves hangs whoever stats it)
        log.error("%s: still mounted under it, kept: %s", state, ", ".join(left))
        return
    for child in list(state.iterdir()) if state.is_dir() else []:
        if keep_lock and child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                child.unlink()
    if not keep_lock:
        with contextlib.suppress(OSError):
            state.rmdir()


# -- the state directory's lock --------------------------------------------------------------------


def _try_lock(state: Path, create: bool) -> int | None:
    """An fd holding ``state``'s lock, or None while another process holds it. Raises
    FileNotFoundError when the directory is gone (without ``create``): its owner finished."""
    if create:
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # its owner removed the directory as it finished
        if not create:
            raise FileNotFoundError(errno.ENOENT, f"{state} is gone")
        state.mkdir(parents=True, exist_ok=True, mode=0o700)


def _wait_lock(state: Path, timeout: float, create: bool) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        fd = _try_lock(state, create)
        if fd is not None or time.monotonic() > deadline:
            return fd
        time.sleep(0.05)


def _owner(state: Path) -> int | None:
    """The pid written in ``state``'s lock file."""
    try:
        return int((state / LOCK_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _claim(state: Path, target: Path) -> int:
    """The mount process's lock of ``state`` (waiting a little for a predecessor at the same
    mount point that is still cleaning up), with this process's pid written in it."""
    fd = _wait_lock(state, _CLAIM_WAIT, create=True)
    if fd is None:
        raise KernelPathUnavailable(f"another imgaccel mount (pid {_owner(state)}) still holds {state}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    (state / "mountpoint").write_text(f"{target}\n")
    return fd


# -- umount ------------------------------------------------------------------------------------------


def orphaned(mountpoint: str | Path) -> bool:
    """A kernel-path mount is at ``mountpoint`` and its mount process is gone (killed)."""
    target = absolute(mountpoint)
    state = state_dir_for(target)
    top = mount_at(target)
    if top is None or top.fstype not in TOP_FSTYPES or not state.is_dir():
        return False
    try:
        fd = _try_lock(state, create=False)
    except FileNotFoundError:
        return False
    if fd is None:
        return False
    os.close(fd)
    return True


def unmount(mountpoint: str | Path, timeout: float = _UNMOUNT_WAIT) -> bool:
    """Take down the kernel-path mount at ``mountpoint``: unmount it, let its mount process
    clean up and exit (SIGTERM, then SIGKILL, if it does not within ``timeout`` seconds), and
    clear what a killed one left. False when no kernel-path mount was made there (``mountpoint``
    untouched); OSError when something could not be taken down. Blocks: not for an event loop."""
    target = absolute(mountpoint)
    state = state_dir_for(target)
    if not state.is_dir():
        return False
    top = mount_at(target)
    ours = top is not None and top.fstype in TOP_FSTYPES
    if top is not None and not ours:
        return False  # (a pyfuse3 tree over leftovers: the next kernel-path mount clears them)
    pid = None
    try:
        fd = _try_lock(state, create=False)
        if fd is None:  # the mount process is alive: it cleans up once its mount is gone
            pid = _owner(state)
            if ours:
                _umount_if_mounted(target)
            fd = _wait_lock(state, timeout, create=False)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if fd is not None or pid is None:
                    break
                log.warning("mount process pid %d did not finish within %.0f s: sending %s", pid, timeout, sig.name)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                fd = _wait_lock(state, 10.0, create=False)
            if fd is None:
                raise OSError(errno.EBUSY, f"{state}: its mount process (pid {pid}) does not exit")
        else:  # nobody serves the data mount: fail the reads waiting for it before unmounting
            fuse_holder.abort_connection(state / "lazy" / "blobs")
            if ours:
                _umount_if_mounted(target)
    except FileNotFoundError:  # the mount process cleaned up and removed its state
        if pid is not None:
            _wait_exit(pid, 10.0)
        return True
    try:
        asyncio.run(_clear(state, keep_lock=False))
    finally:
        os.close(fd)
    if pid is not None:
        _wait_exit(pid, 10.0)
    left = [m.mountpoint for m in mounts() if m.mountpoint.startswith(os.path.realpath(state) + "/")]
    if left:
        raise OSError(errno.EBUSY, f"still mounted: {', '.join(left)}")
    return True


def _umount_if_mounted(target: Path) -> None:
    try:
        umount_or_detach(target)
    except OSError as e:
        if e.errno != errno.EINVAL or mount_at(target) is not None:  # EINVAL: not a mount (any more)
            raise


def _wait_exit(pid: int, timeout: float) -> None:
    """Wait until ``pid`` (a mount process that released its lock: it is finishing) is gone."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)


# -- watching the mount table -------------------------------------------------------------------------


class _MountTableWatch:
    """Sets ``changed`` (on the caller's loop) whenever this mount namespace's mount table
    changes: poll(2) reports POLLPRI on /proc/self/mountinfo. In a thread of its own."""

    def __init__(self, changed: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._changed = changed
        self._fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="mount-table-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLPRI)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            events = poller.poll()
            if any(fd == self._wake_r for fd, _ in events):
                return
            self._loop.call_soon_threadsafe(self._changed.set)

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join()
        for fd in (self._fd, self._wake_r, self._wake_w):
            os.close(fd)
