"""mount(2) and umount2(2) through ctypes, and what /proc/self/mountinfo says about a path.

The node daemon mounts FUSE (``fd=N``), file-backed EROFS and overlayfs with these calls
rather than util-linux ``mount``, which silently puts a loop device under a regular file.
All calls block: never make them on the event-loop thread that answers a FUSE file system
the mount may read through (EROFS reads its device while mounting); use a worker thread
(``asyncio.to_thread``) or another process.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MNT_DETACH = 2
"""umount2 flag: detach now, free the mount once it is no longer busy."""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


def mount(source: str | Path, target: str | Path, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); OSError naming the file system, source, target and cause on failure."""
    r = _libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags, data.encode() or None)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount -t {fstype} {source} on {target} ({data or 'no options'}): {os.strerror(e)}")


def umount(target: str | Path, detach: bool = False) -> None:
    """umount2(2); with ``detach`` the mount disappears now and is freed when no longer busy."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH if detach else 0) != 0:
        e = ctypes.get_errno()
        how = "lazy umount" if detach else "umount"
        raise OSError(e, f"{how} {target}: {os.strerror(e)}")


def umount_or_detach(target: str | Path) -> None:
    """Unmount ``target``; if it is busy, detach it so that nothing is left mounted there."""
    try:
        umount(target)
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        umount(target, detach=True)


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    device: str
    """major:minor of the mounted file system (for FUSE, minor = the connection number)."""
    mountpoint: str
    options: str
    fstype: str
    source: str
    super_options: str


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as ``\\ooo`` octal."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[MountInfo]:
    """Every mount of this process's mount namespace, in mountinfo order."""
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            result.append(
                MountInfo(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    device=fields[2],
                    mountpoint=_unescape(fields[4]),
                    options=fields[5],
                    fstype=fields[sep + 1],
                    source=_unescape(fields[sep + 2]),
                    super_options=fields[sep + 3] if len(fields) > sep + 3 else "",
                )
            )
    return result


def mount_at(path: str | Path) -> MountInfo | None:
    """The topmost mount whose mount point is ``path`` (resolved), or None."""
    # Resolve the parent only: stat of the path itself would ask its file system, which hangs
    # when it is a FUSE mount whose server is gone.
    path = os.path.abspath(path)
    target = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    found = None
    for m in mounts():
        if m.mountpoint == target:
            found = m
    return found


def is_mountpoint(path: str | Path) -> bool:
    """Something is mounted exactly at ``path``."""
    return mount_at(path) is not None
