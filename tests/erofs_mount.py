"""Kernel mounts for tests (through ``snapshotter.mounts``): file-backed EROFS, overlayfs, and
why they can't run here.

util-linux ``mount`` would put a loop device under a regular file; calling mount(2) directly
gives the file-backed EROFS mount the node daemon uses (kernel >= 6.12).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from imgaccel.snapshotter.mounts import MS_RDONLY, mount
from imgaccel.snapshotter.mounts import umount_or_detach as umount


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
