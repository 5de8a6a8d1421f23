"""Kernel mounts for tests: file-backed EROFS through mount(2), overlayfs, and why they can't run.

util-linux ``mount`` would put a loop device under a regular file; calling mount(2) directly
gives the file-backed EROFS mount the node daemon uses (kernel >= 6.12).
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

MS_RDONLY = 1
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount(source: str | Path, target: str | Path, fstype: str, flags: int = 0, data: str = "") -> None:
    r = _libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags, data.encode() or None)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount -t {fstype} {source} {target} ({data}): {os.strerror(e)}")


def umount(target: str | Path) -> None:
    """Unmount ``target``; if it stays busy, detach it so that nothing is left behind."""
    if _libc.umount2(os.fsencode(target), 0) == 0:
        return
    e = ctypes.get_errno()
    if e == errno.EBUSY and _libc.umount2(os.fsencode(target), MNT_DETACH) == 0:
        return
    raise OSError(e, f"umount {target}: {os.strerror(e)}")


@contextmanager
def erofs_mounted(image: str | Path, device: str | Path, target: str | Path) -> Iterator[Path]:
    """``image`` mounted read-only at ``target`` with ``device`` as its extra device 1."""
    mount(image, target, "erofs", MS_RDONLY, f"device={os.fspath(device)}")
    try:
        yield Path(target)
    finally:
        umount(target)


@contextmanager
def overlay_mounted(lowers: list[Path], target: str | Path) -> Iterator[Path]:
    """A read-only overlay of ``lowers`` (uppermost first) at ``target``."""
    mount("overlay", target, "overlay", MS_RDONLY, "lowerdir=" + ":".join(os.fspath(p) for p in lowers))
    try:
        yield Path(target)
    finally:
        umount(target)


def _listed(name: str) -> bool:
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == name for line in f if line.strip())


def _has_filesystem(name: str) -> bool:
    if _listed(name):
        return True
    with suppress(OSError, subprocess.TimeoutExpired):  # no modprobe: nothing can be loaded
        subprocess.run(["modprobe", name], capture_output=True, check=False, timeout=30)
    return _listed(name)


def missing_for_mounts(*filesystems: str) -> str:
    """Why these tests cannot mount here ("" when they can)."""
    if os.geteuid() != 0:
        return "mounting EROFS needs root"
    for fs in filesystems:
        if not _has_filesystem(fs):
            return f"the kernel has no {fs} file system (not in /proc/filesystems after modprobe {fs})"
    return ""
