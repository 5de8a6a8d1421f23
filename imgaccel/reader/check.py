"""``check``: compare what the lazy reader shows with an independent full extraction.

The reference side deliberately shares no code with the lazy path: each *source* layer is
downloaded whole (digest-checked), decompressed with the standard decoders (``gzip``,
``zstandard``), read with ``tarfile``, and stacked with its own small whiteout logic based on
``posixpath.normpath``. Then every path of both trees is compared: type, mode, uid/gid,
symlink target, hardlink target, xattrs and content (sha256 of the bytes read lazily).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import posixpath
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, BinaryIO, cast

import zstandard

from imgaccel.formats import oci
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.reference import ImageRef
from imgaccel.reader.accelerated_image import AcceleratedImage

_KIND = {
    tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.CONTTYPE: "reg", tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo",
}  # fmt: skip


@dataclass
class Record:
    type: str
    mode: int
    uid: int
    gid: int
    link: str
    xattrs: dict[str, bytes]
    sha256: str | None  # content digest for regular files and hardlinks


def _clean(name: str) -> str | None:
    p = posixpath.normpath("/" + name.lstrip("/"))
    # normpath("/..") is "/": a name that climbs out must be detected before normalizing.
    depth = 0
    for part in name.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return None
        elif part not in ("", "."):
            depth += 1
    return p.lstrip("/")


def _decompressed(f: BinaryIO, media_type: str) -> IO[bytes]:
    """The layer's tar stream. Like containerd, the codec is picked by the blob's magic bytes
    (stargz tooling writes gzip blobs under tar+zstd); the media type only says it is compressed."""
    head = f.read(4)
    f.seek(0)
    if oci.LAYER_COMPRESSION.get(media_type, "tar") == "tar":
        return f
    if head[:2] == b"\x1f\x8b":
        return cast(IO[bytes], gzip.GzipFile(fileobj=f))
    if head == b"\x28\xb5\x2f\xfd" or (len(head) == 4 and head[0] & 0xF0 == 0x50 and head[1:] == b"\x2a\x4d\x18"):
        return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
    return f


def _layer_records(path: str, media_type: str) -> Iterator[tuple[str, Record]]:
    with open(path, "rb") as raw, tarfile.open(fileobj=_decompressed(raw, media_type), mode="r|") as tf:
        contents: dict[str, str] = {}
        for ti in tf:
            name = _clean(ti.name)
            if name is None or name == "":
                continue
            kind = _KIND.get(ti.type, "other")
            digest = None
            link = ti.linkname
            if kind == "reg":
                h = hashlib.sha256()
                src = tf.extractfile(ti)
                while src is not None and (block := src.read(1 << 20)):
                    h.update(block)
                digest = contents[name] = h.hexdigest()
            elif kind == "hardlink":
                link = _clean(ti.linkname) or ""
                digest = contents.get(link)
                if digest is not None:  # a later hardlink may name this one
                    contents[name] = digest
            xattrs = {
                k[len("SCHILY.xattr.") :]: v.encode("utf-8", "surrogateescape")
                for k, v in ti.pax_headers.items()
                if k.startswith("SCHILY.xattr.")
            }
            yield name, Record(kind, ti.mode & 0o7777, ti.uid, ti.gid, link, xattrs, digest)


def _stack(layers: list[list[tuple[str, Record]]]) -> dict[str, Record]:
    tree: dict[str, Record] = {}
    for records in layers:
        for name, _ in records:
            d, base = posixpath.split(name)
            if base == ".wh..wh..opq":
                prefix = d + "/" if d else ""  # an opaque root hides every lower entry
                for k in [k for k in tree if k.startswith(prefix)]:
                    del tree[k]
            elif base.startswith(".wh."):
                gone = posixpath.join(d, base[4:])
                for k in [k for k in tree if k == gone or k.startswith(gone + "/")]:
                    del tree[k]
        for name, rec in records:
            if posixpath.basename(name).startswith(".wh."):
                continue
            old = tree.get(name)
            if old is not None and old.type == "dir" and rec.type != "dir":
                for k in [k for k in tree if k.startswith(name + "/")]:
                    del tree[k]
            parent = posixpath.dirname(name)
            while parent and parent not in tree:
                tree[parent] = Record("dir", 0o755, 0, 0, "", {}, None)
                parent = posixpath.dirname(parent)
            tree[name] = rec
    return tree


async def reference_tree(
    client: RegistryClient, ref: ImageRef, manifest_digest: str, workdir: str | None = None
) -> dict[str, Record]:
    """The merged tree of the source image ``manifest_digest``, from full extraction."""
    m = await client.get_manifest(ref.repository, manifest_digest)
    manifest = oci.ImageManifest.model_validate_json(m.data)
    layers = []
    with tempfile.TemporaryDirectory(prefix="imgaccel-check-", dir=workdir) as tmp:
        for i, layer in enumerate(manifest.layers):
            path = os.path.join(tmp, f"layer{i}")
            await client.download_blob(ref.repository, layer.digest, path, layer.size)
            layers.append(list(_layer_records(path, layer.mediaType)))
            os.unlink(path)
    return _stack(layers)


async def compare(image: AcceleratedImage, expected: dict[str, Record]) -> list[str]:
    """Differences between the lazy view and the reference tree (empty: identical)."""
    problems: list[str] = []
    seen = set()
    for path, node in image.view.walk():
        seen.add(path)
        want = expected.get(path)
        e = node.entry
        if want is None:
            problems.append(f"/{path}: present lazily, absent in the source image")
            continue
        got_type = e.type
        if got_type != want.type:
            problems.append(f"/{path}: type {got_type}, expected {want.type}")
            continue
        if e.mode != want.mode and node.layer >= 0:
            problems.append(f"/{path}: mode {e.mode:o}, expected {want.mode:o}")
        if (e.uid, e.gid) != (want.uid, want.gid) and node.layer >= 0:
            problems.append(f"/{path}: owner {e.uid}:{e.gid}, expected {want.uid}:{want.gid}")
        if e.type == "symlink" and e.linkname != want.link:
            problems.append(f"/{path}: symlink to {e.linkname!r}, expected {want.link!r}")
        if e.type == "hardlink" and _clean(e.linkname) != want.link:
            problems.append(f"/{path}: hardlink to {e.linkname!r}, expected {want.link!r}")
        xattrs = {k: base64.b64decode(v) for k, v in e.xattrs.items()}
        if xattrs != want.xattrs:
            problems.append(f"/{path}: xattrs {sorted(xattrs)}, expected {sorted(want.xattrs)}")
        if e.type in ("reg", "hardlink"):
            try:
                h = hashlib.sha256()
                data_entry = image.view.data_entry(node)
                for off in range(0, data_entry.size, 4 << 20):
                    h.update(await image.read_node(node, off, 4 << 20))
                if h.hexdigest() != want.sha256:
                    problems.append(f"/{path}: content differs")
            except Exception as ex:  # report every failure, keep checking the rest
                problems.append(f"/{path}: read failed: {ex}")
    for path in sorted(set(expected) - seen):
        problems.append(f"/{path}: missing from the lazy view")
    return problems
