"""The node daemon's unix sockets: making room for one at start (shared by every server it runs)."""

from __future__ import annotations

import stat
from pathlib import Path


def prepare_socket(path: Path) -> None:
    """Create the socket's directory; remove a stale socket a dead daemon left (refuse other files)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RuntimeError(f"{path} exists and is not a socket: refusing to replace it")
    path.unlink()
