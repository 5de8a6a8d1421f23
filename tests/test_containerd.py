"""Both converted images run under real containerd + runc, and the container sees intact files."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.build_images import BIG_FILE_SIZE, real_bytes
from tests.containerd import MISSING, running_containerd
from tests.helpers import get_json
from tests.registry import Registry

pytestmark = [
    pytest.mark.skipif(bool(MISSING), reason=f"missing {', '.join(MISSING)} (scripts/install installs them)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="containerd needs root"),
]


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    with running_containerd(tmp_path_factory.mktemp("ctd")) as ctr:
        yield ctr


@pytest.mark.parametrize("mode", ["index", "full"])
def test_runs_under_containerd(containerd: list[str], registry: Registry, converted: dict[str, str], mode: str) -> None:
    ref = converted[mode]
    ctr = [*containerd, "--namespace", f"imgaccel-{mode}"]  # own namespace: the layers are really unpacked
    pull = subprocess.run([*ctr, "images", "pull", "--plain-http", ref], capture_output=True, text=True, timeout=300)
    assert pull.returncode == 0, pull.stderr
    script = (
        "cat /opq/c.txt /etc/motd; ls /old; sha256sum /data/big.bin /bin/busybox /data/hl-b; cat /links/abs | head -1"
    )
    run = subprocess.run(
        [*ctr, "run", "--rm", ref, f"check-{mode}", "/bin/sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "only this survives in opq"
    assert lines[1] == "layer 2 motd"
    assert lines[2] == "keep.txt"  # gone.txt was whited out
    big = hashlib.sha256(real_bytes(BIG_FILE_SIZE)).hexdigest()
    assert lines[3].split() == [big, "/data/big.bin"]
    assert lines[4].split() == [hashlib.sha256(Path("/bin/busybox").read_bytes()).hexdigest(), "/bin/busybox"]
    assert lines[5].split()[0] == hashlib.sha256(real_bytes(70_000, "libz")).hexdigest()
    assert lines[6] == Path("/etc/os-release").read_text().splitlines()[0]
    if mode == "full":  # containerd really fetched (and unpacked) the zstd layers
        content = subprocess.run([*ctr, "content", "ls"], capture_output=True, text=True, check=True).stdout
        manifest = get_json(f"http://{registry.host}/v2/fixtures/app/manifests/v1_containerd_accelerated")
        for layer in manifest["layers"]:
            assert layer["mediaType"].endswith("tar+zstd")
            assert layer["digest"] in content
