"""A real containerd for tests: its own root, state and sockets under a temp dir, on loopback only."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MISSING = [tool for tool in ("containerd", "ctr", "runc") if shutil.which(tool) is None]


@contextmanager
def running_containerd(workdir: Path, extra_config: str = "") -> Iterator[list[str]]:
    """Start containerd (CRI plugin disabled unless ``extra_config`` configures it); yields
    the ``ctr`` command line that talks to it. Stopped on exit."""
    sock = workdir / "containerd.sock"
    disabled = "" if "io.containerd.grpc.v1.cri" in extra_config else 'disabled_plugins = ["io.containerd.grpc.v1.cri"]'
    (workdir / "config.toml").write_text(
        f"""version = 2
root = "{workdir}/root"
state = "{workdir}/state"
{disabled}
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
{extra_config}
"""
    )
    log_path = workdir / "containerd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["containerd", "--config", str(workdir / "config.toml")], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log_path.read_text()[-3000:])
            time.sleep(0.1)
        yield ["ctr", "--address", str(sock)]
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
