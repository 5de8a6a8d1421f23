"""Images made by stargz tooling (eStargz, zstd:chunked, via the real ``ctr-remote image
convert``) convert in both modes and pass ``check`` against an independent extraction."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.containerd import MISSING, running_containerd
from tests.helpers import run_cli
from tests.registry import Registry

MISSING_TOOLS = [*MISSING, *(["ctr-remote"] if shutil.which("ctr-remote") is None else [])]
pytestmark = [
    pytest.mark.skipif(
        bool(MISSING_TOOLS), reason=f"missing {', '.join(MISSING_TOOLS)} (scripts/install installs them)"
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="containerd needs root"),
]
KINDS = {"estargz": "--estargz", "zstdchunked": "--zstdchunked"}


def _run(*args: str) -> None:
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(args)}: {r.stderr[-2000:]}"


@pytest.fixture(scope="module")
def stargz_images(
    tmp_path_factory: pytest.TempPathFactory, registry: Registry, images: dict[str, str]
) -> Iterator[dict[str, str]]:
    """kind -> reference of the app image converted by ctr-remote and pushed to the registry."""
    source = images["app"]
    with running_containerd(tmp_path_factory.mktemp("ctd-stargz")) as ctr:
        _run(*ctr, "images", "pull", "--plain-http", source)
        out = {}
        for kind, flag in KINDS.items():
            target = f"{registry.host}/stargz/app:{kind}"
            _run("ctr-remote", "--address", ctr[2], "image", "convert", flag, "--oci", source, target)
            _run(*ctr, "images", "push", "--plain-http", target)
            out[kind] = target
        yield out


@pytest.mark.parametrize("mode", ["index", "full"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_stargz_tooling_images_convert_and_check(stargz_images: dict[str, str], kind: str, mode: str) -> None:
    source = stargz_images[kind]
    r = run_cli("convert", source, "--mode", mode)
    assert r.code == 0, r.err
    target = source + ("_accelerated" if mode == "index" else "_containerd_accelerated")
    assert target in r.out
    r = run_cli("check", target)
    assert r.code == 0, r.out + r.err
    assert r.out.startswith("ok: "), r.out
