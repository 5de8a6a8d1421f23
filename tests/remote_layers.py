"""A test double of the snapshotter's ``RemoteLayers`` hook, and a launcher for the daemon using it.

``ExtractingLayers`` stands in for lazy layer mounts: it finds the layer blob named by the
Prepare labels (CRI's ``cri.layer-digest`` or ctr-remote's ``stargz.digest``) in the test
registry's storage directory and extracts it into a directory the way overlayfs wants a lower
layer (OCI whiteouts become 0/0 character devices, opaque markers the ``trusted.overlay.opaque``
xattr). Every call is appended as a JSON line to a record file the tests read.

    python -m tests.remote_layers --registry-root DIR --layers DIR --record FILE [--decline] -- DAEMON ARGS
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import shutil
import stat
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import zstandard

from imgaccel.snapshotter.metadata import Snapshot

LAYER_DIGEST_LABELS = ("containerd.io/snapshot/cri.layer-digest", "containerd.io/snapshot/remote/stargz.digest")


def _open_layer(blob: Path) -> IO[bytes]:
    f = open(blob, "rb")  # noqa: SIM115 - handed to the caller
    magic = f.read(4)
    f.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f)  # type: ignore[return-value]
    if magic == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
    return f


def extract_layer(blob: Path, out: Path) -> None:
    """Unpack one OCI layer blob (tar, tar+gzip, tar+zstd) into ``out`` as an overlayfs lower dir."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with _open_layer(blob) as stream, tarfile.open(fileobj=stream, mode="r|") as tf:
        for member in tf:
            path = Path(member.name.lstrip("/"))
            parent = tmp / path.parent
            if path.name == ".wh..wh..opq":
                parent.mkdir(parents=True, exist_ok=True)
                os.setxattr(parent, "trusted.overlay.opaque", b"y")
            elif path.name.startswith(".wh."):
                parent.mkdir(parents=True, exist_ok=True)
                os.mknod(parent / path.name.removeprefix(".wh."), stat.S_IFCHR | 0o000, os.makedev(0, 0))
            else:
                tf.extract(member, tmp, numeric_owner=True, filter="fully_trusted")
    tmp.rename(out)


class ExtractingLayers:
    """``RemoteLayers`` for tests: serves a layer as a directory extracted from the registry storage."""

    def __init__(self, registry_root: Path, layers: Path, record: Path, decline: bool = False) -> None:
        self.registry_root = registry_root
        self.layers = layers
        self.record = record
        self.decline = decline

    def _note(self, **entry: object) -> None:
        with open(self.record, "a") as f:
            f.write(json.dumps(entry) + "\n")

    async def start(self, served: Sequence[Snapshot]) -> None:
        pass  # extracted directories survive a daemon restart as they are

    async def close(self) -> None:
        pass

    async def prepare(self, namespace: str, key: str, parent: str | None, labels: dict[str, str]) -> str | None:
        self._note(op="prepare", namespace=namespace, key=key, parent=parent, labels=labels)
        digest = next((labels[k] for k in LAYER_DIGEST_LABELS if k in labels), None)
        if self.decline or digest is None:
            return None
        algo, hexd = digest.split(":", 1)
        blob = self.registry_root / "docker/registry/v2/blobs" / algo / hexd[:2] / hexd / "data"
        out = self.layers / f"{namespace}-{hexd}"
        if not out.exists():
            await asyncio.to_thread(extract_layer, blob, out)
        return str(out)

    async def remove(self, namespace: str, name: str, directory: str) -> None:
        self._note(op="remove", namespace=namespace, name=name, directory=directory)
        await asyncio.to_thread(shutil.rmtree, directory, True)


def main() -> None:
    import logging

    from imgaccel.snapshotter.config import load_node_config
    from imgaccel.snapshotter.daemon import run

    ap = argparse.ArgumentParser()
    ap.add_argument("--registry-root", type=Path, required=True)
    ap.add_argument("--layers", type=Path, required=True)
    ap.add_argument("--record", type=Path, required=True)
    ap.add_argument("--decline", action="store_true")
    ap.add_argument("--socket", type=Path, required=True)
    ap.add_argument("--root", type=Path, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("imgaccel").setLevel(logging.DEBUG)
    args.layers.mkdir(parents=True, exist_ok=True)
    hook = ExtractingLayers(args.registry_root, args.layers, args.record, args.decline)
    run(load_node_config(None, socket=args.socket, root=args.root), hook)


if __name__ == "__main__":
    main()
