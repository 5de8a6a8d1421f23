"""The EROFS metadata writer against the real kernel.

Each kernel test builds a layer tar with tarfile (PAX), indexes it with imgaccel's own
indexer, writes the EROFS image, mounts it file-backed through mount(2) with the tar as
device 1, and compares every entry with an independent reading of the tar
(``expected_tree``): type, mode, owner, size, bytes, symlink target, hardlink identity,
xattrs, whiteouts, opaque directories and mtime.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import os
import posixpath
import random
import stat
import struct
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgaccel.formats.erofs import build_erofs_image
from imgaccel.formats.layer_index import Chunk, Entry, LayerIndex
from imgaccel.indexer.seekable_index import build_seekable_index
from tests.erofs_mount import erofs_mounted, missing_for_mounts, overlay_mounted


@pytest.fixture(scope="session")
def erofs_kernel() -> None:
    why = missing_for_mounts("erofs")
    if why:
        pytest.skip(why)


@pytest.fixture(scope="session")
def overlay_kernel(erofs_kernel: None) -> None:
    why = missing_for_mounts("overlay")
    if why:
        pytest.skip(why)


# ---------------------------------------------------------------------------------------------
# Writing layers


@dataclass
class Member:
    """A tar member to write."""

    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    linkname: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = 1_700_000_000
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


def write_tar(path: Path, members: list[Member]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        for m in members:
            ti = tarfile.TarInfo(m.name)
            ti.type, ti.linkname, ti.mode, ti.uid, ti.gid = m.type, m.linkname, m.mode, m.uid, m.gid
            ti.mtime, ti.devmajor, ti.devminor = m.mtime, m.devmajor, m.devminor
            ti.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape") for k, v in m.xattrs.items()}
            ti.size = len(m.data) if m.type == tarfile.REGTYPE else 0
            tf.addfile(ti, io.BytesIO(m.data) if ti.size else None)


def index_tar(path: Path) -> LayerIndex:
    digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    return build_seekable_index(str(path), "tar", digest).index


@contextmanager
def mounted_layer(tmp: Path, tar: Path, name: str = "mnt") -> Iterator[tuple[Path, list[str]]]:
    """``tar`` indexed, written as EROFS and mounted: (mount point, writer warnings)."""
    image = build_erofs_image(index_tar(tar))
    img_path = tmp / (name + ".erofs")
    img_path.write_bytes(image.data)
    mnt = tmp / name
    mnt.mkdir()
    with erofs_mounted(img_path, tar, mnt):
        yield mnt, image.warnings


# ---------------------------------------------------------------------------------------------
# The independent model: what a tar extraction, with OCI whiteouts as overlayfs ones, shows


@dataclass(eq=False)
class Expect:
    kind: int
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: float = 0
    data: bytes = b""
    target: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


def _norm(name: str) -> bytes | None:
    parts = [p for p in os.fsencode(name).split(b"/") if p not in (b"", b".")]
    return None if b".." in parts else b"/".join(parts)


def expected_tree(tar: Path) -> dict[bytes, Expect]:
    """Path (bytes, "" for the root) -> expected inode; hardlinked paths share one object."""
    tree: dict[bytes, Expect] = {b"": Expect(stat.S_IFDIR)}

    def remove(path: bytes) -> None:
        for p in [p for p in tree if p == path or p.startswith(path + b"/")]:
            del tree[p]

    def ensure_dir(path: bytes) -> None:
        if path in tree and tree[path].kind == stat.S_IFDIR:
            return
        if path:
            ensure_dir(posixpath.dirname(path))
        was_whiteout = path in tree and tree[path].kind == stat.S_IFCHR and tree[path].mode == 0
        remove(path)
        tree[path] = Expect(stat.S_IFDIR)
        if was_whiteout:
            tree[path].xattrs[b"trusted.overlay.opaque"] = b"y"

    kinds = {
        tarfile.DIRTYPE: stat.S_IFDIR,
        tarfile.SYMTYPE: stat.S_IFLNK,
        tarfile.CHRTYPE: stat.S_IFCHR,
        tarfile.BLKTYPE: stat.S_IFBLK,
        tarfile.FIFOTYPE: stat.S_IFIFO,
    }
    with tarfile.open(tar, encoding="utf-8", errors="surrogateescape") as tf:
        for m in tf:
            path = _norm(m.name)
            if path is None:
                continue
            parent, base = posixpath.split(path)
            if path:
                ensure_dir(parent)
            if base == b".wh..wh..opq":
                tree[parent].xattrs[b"trusted.overlay.opaque"] = b"y"
                continue
            if base.startswith(b".wh."):
                hidden = posixpath.join(parent, base[4:])
                if hidden not in tree:
                    tree[hidden] = Expect(stat.S_IFCHR, 0, m.uid, m.gid, m.mtime)
                elif tree[hidden].kind == stat.S_IFDIR:
                    tree[hidden].xattrs[b"trusted.overlay.opaque"] = b"y"
                continue
            if m.islnk():
                target = tree.get(_norm(m.linkname) or b"")
                if target is not None and target.kind in (stat.S_IFREG, stat.S_IFLNK) and path:
                    remove(path)
                    tree[path] = target
                continue
            xattrs = {
                k[len("SCHILY.xattr.") :].encode("utf-8", "surrogateescape"): v.encode("utf-8", "surrogateescape")
                for k, v in m.pax_headers.items()
                if k.startswith("SCHILY.xattr.")
            }
            kind = kinds.get(m.type, stat.S_IFREG)
            old = tree.get(path)
            e = Expect(kind, m.mode & 0o7777, m.uid, m.gid, m.mtime, xattrs=xattrs)
            if kind == stat.S_IFDIR and old is not None and old.kind == stat.S_IFDIR:
                old.mode, old.uid, old.gid, old.mtime = e.mode, e.uid, e.gid, e.mtime
                opaque = old.xattrs.get(b"trusted.overlay.opaque")
                old.xattrs = xattrs | ({b"trusted.overlay.opaque": opaque} if opaque else {})
                continue
            if kind == stat.S_IFREG:
                f = tf.extractfile(m)
                assert f is not None
                e.data = f.read()
            elif kind == stat.S_IFLNK:
                e.target = os.fsencode(m.linkname)
            elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                e.rdev = (m.devmajor, m.devminor)
            if not path:
                continue
            if kind == stat.S_IFDIR and old is not None and old.kind == stat.S_IFCHR and old.mode == 0:
                e.xattrs[b"trusted.overlay.opaque"] = b"y"
            remove(path)
            tree[path] = e
    return tree


def _xattrs(path: bytes) -> dict[bytes, bytes]:
    """The xattrs of ``path``. The VFS answers ENODATA for ``user.*`` on inodes other than
    regular files and directories, so for those only the name is compared (value b"?")."""
    out = {}
    for name in os.listxattr(path, follow_symlinks=False):
        try:
            out[os.fsencode(name)] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            mode = os.lstat(path).st_mode
            assert name.startswith("user.") and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)), (path, name)
            out[os.fsencode(name)] = b"?"
    return out


def compare_mount(mnt: Path, tree: dict[bytes, Expect]) -> None:
    """Every path of ``tree`` and nothing else is in ``mnt``, with the expected inode."""
    root = os.fsencode(mnt)
    seen: list[bytes] = [b""]
    for dirpath, dirnames, filenames in os.walk(root):
        rel = dirpath[len(root) :].lstrip(b"/")
        seen += [posixpath.join(rel, n) for n in dirnames + filenames]
    assert sorted(seen) == sorted(tree)
    links: dict[int, list[bytes]] = {}
    for path, e in tree.items():
        full = posixpath.join(root, path) if path else root
        st_ = os.lstat(full)
        assert stat.S_IFMT(st_.st_mode) == e.kind, path
        assert stat.S_IMODE(st_.st_mode) == e.mode, path
        assert (st_.st_uid, st_.st_gid) == (e.uid, e.gid), path
        assert st_.st_mtime_ns // 10**9 == math.floor(e.mtime), path
        assert abs(st_.st_mtime_ns - round(e.mtime * 1e9)) < 1000, path
        special = e.kind not in (stat.S_IFREG, stat.S_IFDIR)
        assert _xattrs(full) == {k: b"?" if special and k.startswith(b"user.") else v for k, v in e.xattrs.items()}
        if e.kind == stat.S_IFREG:
            assert st_.st_size == len(e.data), path
            with open(full, "rb") as f:
                assert f.read() == e.data, path
        elif e.kind == stat.S_IFLNK:
            assert os.readlink(full) == e.target, path
        elif e.kind in (stat.S_IFCHR, stat.S_IFBLK):
            assert (os.major(st_.st_rdev), os.minor(st_.st_rdev)) == e.rdev, path
        elif e.kind == stat.S_IFDIR:
            subdirs = sum(1 for p, c in tree.items() if p and posixpath.dirname(p) == path and c.kind == stat.S_IFDIR)
            assert st_.st_nlink == 2 + subdirs, path
        links.setdefault(id(e), []).append(path)
    for paths in links.values():
        inodes = {os.lstat(posixpath.join(root, p) if p else root).st_ino for p in paths}
        assert len(inodes) == 1, paths
        if tree[paths[0]].kind != stat.S_IFDIR:
            assert os.lstat(posixpath.join(root, paths[0])).st_nlink == len(paths), paths


# ---------------------------------------------------------------------------------------------
# Kernel tests


def _rich_layer() -> list[Member]:
    rnd = random.Random(7)
    members = [
        Member("./", tarfile.DIRTYPE, mode=0o750, uid=5, gid=6, mtime=1_600_000_000),
        Member("etc/", tarfile.DIRTYPE, mode=0o755, xattrs={"user.dir": b"d"}),
        Member("etc/passwd", data=b"root:x:0:0\n", mode=0o644),
        Member("implicit/parents/file", data=b"deep", mode=0o600, uid=70000, gid=80000),
        Member("bin/", tarfile.DIRTYPE, mode=0o755, mtime=1_700_000_000.75),
        Member("bin/tool", data=rnd.randbytes(3 << 20), mode=0o4755, uid=1000, gid=1000),
        Member("bin/empty", mode=0o644),
        Member("bin/b511", data=rnd.randbytes(511)),
        Member("bin/b512", data=rnd.randbytes(512)),
        Member("bin/b513", data=rnd.randbytes(513)),
        Member("bin/alias", tarfile.LNKTYPE, linkname="bin/tool"),
        Member("./bin/alias2", tarfile.LNKTYPE, linkname="./bin/tool"),
        Member("lib/short", tarfile.SYMTYPE, linkname="../bin/tool", mode=0o777),
        Member("lib/long", tarfile.SYMTYPE, linkname="x/" * 400 + "end", mode=0o777),
        Member("lib/mid", tarfile.SYMTYPE, linkname="m" * 450, mode=0o777, xattrs={"user.pad": b"p" * 20}),
        Member("lib/linked-symlink", tarfile.LNKTYPE, linkname="lib/short"),
        Member("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
        Member("dev/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0),
        Member("dev/big", tarfile.CHRTYPE, mode=0o600, devmajor=4095, devminor=1_000_000),
        Member("dev/fifo", tarfile.FIFOTYPE, mode=0o644),
        Member(
            "x/attrs",
            data=b"x",
            xattrs={
                "user.a": b"1",
                "user.empty": b"",
                "trusted.t": b"\x00\xffbinary",
                "security.capability": b"\x01\x00\x00\x02" + b"\0" * 16,
                "user." + "n" * 200: b"v" * 3000,
            },
        ),
        Member("x/\udcff\udcferaw-name", data=b"non-utf8 name"),
        Member("x/caf\u00e9", tarfile.SYMTYPE, linkname="\udcff-target"),
        Member("x/dup", data=b"first version"),
        Member("x/dup", data=b"second version, longer"),
        Member("x/was-file", data=b"file"),
        Member("x/was-file", tarfile.SYMTYPE, linkname="now a symlink"),
        Member("x/keep", data=b"old inode"),
        Member("x/keep-link", tarfile.LNKTYPE, linkname="x/keep"),
        Member("x/keep", data=b"new inode"),
        Member("etc/", tarfile.DIRTYPE, mode=0o700, uid=3, xattrs={"user.dir": b"second"}),
        Member("wh/.wh.gone", mode=0o644),
        Member("wh/.wh..wh..opq"),
        Member("wh/new", data=b"new"),
        Member("wh/.wh.redone"),
        Member("wh/redone/", tarfile.DIRTYPE),
        Member("frac", data=b"t", mtime=1_700_000_000.123456),
        Member("future", data=b"t", mtime=(1 << 33) + 5),
        Member("old", data=b"t", mtime=0),
    ]
    members += [Member(f"many/{'-' if i % 7 == 0 else ''}file{i:04d}", data=b"%d" % i) for i in range(400)]
    members += [Member("many/.hidden"), Member("many/A"), Member("many/\udc80")]
    return members


def test_layer_matches_tar(tmp_path: Path, erofs_kernel: None) -> None:
    tar = tmp_path / "layer.tar"
    write_tar(tar, _rich_layer())
    tree = expected_tree(tar)
    assert tree[b"wh/gone"].kind == stat.S_IFCHR and tree[b"wh/redone"].xattrs  # the model sees them
    with mounted_layer(tmp_path, tar) as (mnt, warnings):
        assert warnings == []
        compare_mount(mnt, tree)
        # Lookups (binary search over several directory blocks), not only readdir.
        for i in range(0, 400, 37):
            name = f"{'-' if i % 7 == 0 else ''}file{i:04d}"
            assert (mnt / "many" / name).read_bytes() == b"%d" % i
        assert not (mnt / "many" / "file9999").exists()
        assert os.stat(mnt / "dev" / "big").st_rdev == os.makedev(4095, 1_000_000)


def test_whiteouts_and_opaque_dirs_under_overlayfs(tmp_path: Path, overlay_kernel: None) -> None:
    lower, upper = tmp_path / "lower.tar", tmp_path / "upper.tar"
    write_tar(
        lower,
        [
            Member("d/keep", data=b"keep"),
            Member("d/gone", data=b"gone"),
            Member("d/sub/deep", data=b"deep"),
            Member("e/x", data=b"x"),
            Member("e/y/z", data=b"z"),
            Member("f", data=b"file"),
            Member("g/old", data=b"old"),
        ],
    )
    write_tar(
        upper,
        [
            Member("d/.wh.gone"),
            Member("d/.wh.sub"),
            Member("e/.wh..wh..opq"),
            Member("e/new", data=b"new"),
            Member(".wh.f"),
            Member(".wh.g"),
            Member("g/", tarfile.DIRTYPE),
            Member("g/fresh", data=b"fresh"),
        ],
    )
    merged = tmp_path / "merged"
    merged.mkdir()
    with (
        mounted_layer(tmp_path, lower, "lower") as (low, _),
        mounted_layer(tmp_path, upper, "upper") as (up, _),
        overlay_mounted([up, low], merged),
    ):
        assert sorted(os.listdir(merged)) == ["d", "e", "g"]
        assert sorted(os.listdir(merged / "d")) == ["keep"]
        assert (merged / "d" / "keep").read_bytes() == b"keep"
        assert sorted(os.listdir(merged / "e")) == ["new"]
        assert sorted(os.listdir(merged / "g")) == ["fresh"]
        assert not (merged / "f").exists()


def test_skipped_entries_are_warnings(tmp_path: Path, erofs_kernel: None) -> None:
    entries = [
        Entry(name="ok", type="reg", size=3, offset=512, mode=0o644),
        Entry(name="a/b/../../escape", type="reg", mode=0o644),
        Entry(name="../up", type="dir", mode=0o755),
        Entry(name="", type="reg"),
        Entry(name="./", type="symlink", linkname="x"),
        Entry(name="hl-missing", type="hardlink", linkname="nowhere"),
        Entry(name="dir", type="dir", mode=0o755),
        Entry(name="hl-dir", type="hardlink", linkname="dir"),
        Entry(name="hl-dotdot", type="hardlink", linkname="../ok"),
        Entry(name="fifo", type="fifo", mode=0o644),
        Entry(name="hl-fifo", type="hardlink", linkname="fifo"),
        Entry(name="unaligned", type="reg", size=3, offset=513),
        Entry(name="x" * 256, type="reg"),
        Entry(name="dir/.wh..wh.plnk", type="reg"),
        Entry(name="bad-xattrs", type="reg", xattrs={"user.ok": "b2s=", "other.ns": "eA==", "user.b": "!!"}),
        Entry(name="hl-ok", type="hardlink", linkname="/ok"),
    ]
    index = _index(entries, 2048)
    image = build_erofs_image(index)
    text = "\n".join(image.warnings)
    for name in ["escape", "../up", "'' (reg)", "'./' (symlink)", "hl-missing", "hl-dir", "hl-dotdot"]:
        assert name in text, name
    for name in ["hl-fifo", "unaligned", "x" * 256, ".wh..wh.plnk", "other.ns", "user.b"]:
        assert name in text, name
    assert "user.ok" not in text
    device = tmp_path / "layer.tar"
    device.write_bytes(b"\0" * 512 + b"abc".ljust(1536, b"\0"))
    img = tmp_path / "img"
    img.write_bytes(image.data)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with erofs_mounted(img, device, mnt):
        assert sorted(os.listdir(mnt)) == ["bad-xattrs", "dir", "fifo", "hl-ok", "ok"]
        assert (mnt / "hl-ok").read_bytes() == b"abc"
        assert os.stat(mnt / "ok").st_ino == os.stat(mnt / "hl-ok").st_ino
        assert os.stat(mnt / "ok").st_nlink == 2
        assert os.listxattr(mnt / "bad-xattrs") == ["user.ok"]


# ---------------------------------------------------------------------------------------------
# Property test: random small layers


_NAMES = st.sampled_from(["a", "b", "c", "dir", "x.txt", "-", ".hid", "A", "\u00e9t\u00e9", "\udcffraw", "n" * 120])
_SIZES = st.sampled_from([0, 0, 1, 100, 511, 512, 513, 4096, 70000, (1 << 20) + 12345])
_MODES = st.sampled_from([0o755, 0o700, 0o644, 0o600, 0o4755, 0o2711, 0o1777, 0o000])
_IDS = st.sampled_from([0, 1000, 65535, 65536, 1 << 31])
_TIMES = st.sampled_from([0, 1_700_000_000, 1_700_000_000.5, 1_234_567_890, (1 << 32) + 7])
_XATTRS = st.dictionaries(
    st.sampled_from(["user.a", "user.b" * 20, "trusted.t", "security.s"]), st.binary(max_size=64), max_size=3
)


@st.composite
def layer_members(draw: st.DrawFn) -> list[Member]:
    dirs, files, used = [""], [], {""}
    members: list[Member] = []
    if draw(st.booleans()):
        members.append(Member("./", tarfile.DIRTYPE, mode=draw(_MODES), mtime=draw(_TIMES)))
    for _ in range(draw(st.integers(1, 30))):
        parent = draw(st.sampled_from(dirs))
        path = posixpath.join(parent, draw(_NAMES))
        kind = draw(st.sampled_from(["dir", "dir", "deepdir", "file", "file", "file", "symlink", "hardlink", "other"]))
        kind = draw(st.sampled_from(["whiteout", "opaque"])) if kind == "other" and draw(st.booleans()) else kind
        if kind == "opaque":
            path = posixpath.join(parent, ".wh..wh..opq")
        if path in used:
            continue
        used.add(path)
        meta = Member(path, mode=draw(_MODES), uid=draw(_IDS), gid=draw(_IDS), mtime=draw(_TIMES))
        if kind in ("dir", "deepdir"):
            if kind == "deepdir":  # its parent is implicit
                dirs.append(path)
                path = posixpath.join(path, draw(_NAMES))
                used.add(path)
            members.append(replace(meta, name=path + "/", type=tarfile.DIRTYPE, xattrs=draw(_XATTRS)))
            dirs.append(path)
        elif kind == "file":
            data = random.Random(draw(st.integers(0, 1 << 32))).randbytes(draw(_SIZES))
            members.append(replace(meta, data=data, xattrs=draw(_XATTRS)))
            files.append(path)
        elif kind == "symlink":
            target = draw(st.one_of(st.text("ab/.\u00e9", min_size=1, max_size=30), st.just("t" * 700)))
            members.append(replace(meta, type=tarfile.SYMTYPE, linkname=target, xattrs=draw(_XATTRS)))
        elif kind == "hardlink" and files:
            members.append(Member(path, tarfile.LNKTYPE, linkname=draw(st.sampled_from(files))))
        elif kind == "whiteout":
            members.append(Member(posixpath.join(parent, ".wh." + draw(_NAMES))))
        elif kind == "opaque":
            members.append(Member(path))
        else:
            members.append(replace(meta, type=tarfile.FIFOTYPE))
    return members


@settings(max_examples=25, deadline=None, database=None)
@given(members=layer_members())
def test_random_layers_match_tar(
    tmp_path_factory: pytest.TempPathFactory, erofs_kernel: None, members: list[Member]
) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    tar = tmp / "layer.tar"
    write_tar(tar, members)
    with mounted_layer(tmp, tar) as (mnt, warnings):
        assert warnings == []
        compare_mount(mnt, expected_tree(tar))


# ---------------------------------------------------------------------------------------------
# Scale, format facts, determinism


def _index(entries: list[Entry], size: int) -> LayerIndex:
    chunk = Chunk(c_offset=0, c_size=size, u_offset=0, u_size=size, digest="sha256:" + "0" * 64)
    return LayerIndex.model_construct(
        encoding="tar",
        blob_digest="sha256:" + "1" * 64,
        blob_size=size,
        diff_id="sha256:" + "2" * 64,
        uncompressed_size=size,
        chunks=[chunk],
        entries=entries,
    )


def test_100k_entries_build_and_mount(tmp_path: Path, erofs_kernel: None) -> None:
    entries, offset = [], 512
    for d in range(1000):
        entries.append(Entry(name=f"dir{d:04d}", type="dir", mode=0o755, mtime=1_700_000_000))
        for f in range(99):
            name = f"dir{d:04d}/file-with-a-typical-name-{f:03d}.py"
            entries.append(Entry(name=name, type="reg", size=700, offset=offset, mode=0o644, mtime=1_700_000_000 + f))
            offset += 1536
    index = _index(entries, offset)
    start = time.perf_counter()
    image = build_erofs_image(index)
    elapsed = time.perf_counter() - start
    print(f"100k entries: {elapsed:.2f} s, {len(image.data)} bytes")
    assert image.warnings == [] and image.inodes == 100_001
    assert elapsed < 30  # ~1.5 s measured on 2 cores; generous for a busy machine
    device = tmp_path / "layer.tar"
    with open(device, "wb") as sparse:
        sparse.truncate(offset)
    img = tmp_path / "img"
    img.write_bytes(image.data)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with erofs_mounted(img, device, mnt):
        count = sum(len(dirs) + len(files) for _, dirs, files in os.walk(mnt))
        assert count == 100_000
        assert (mnt / "dir0999" / "file-with-a-typical-name-098.py").read_bytes() == b"\0" * 700


def test_superblock_and_determinism() -> None:
    entries = [Entry(name="f", type="reg", size=10, offset=512), Entry(name="d", type="dir")]
    index = _index(entries, 3000)
    image = build_erofs_image(index)
    assert image.data == build_erofs_image(index).data
    magic, _csum, compat, blkszbits, extslots, root_nid = struct.unpack_from("<IIIBBH", image.data, 1024)
    assert (magic, compat, blkszbits, extslots) == (0xE0F5E1E2, 0, 9, 0)
    assert root_nid == 40  # first slot after the device table; never 0
    incompat, _, extra_devices, slotoff = struct.unpack_from("<IHHH", image.data, 1024 + 80)
    assert (incompat, extra_devices, slotoff) == (0x4 | 0x8, 1, 9)
    tag, blocks, uniaddr = struct.unpack_from("<64sII", image.data, 1152)
    assert (tag, blocks, uniaddr) == (b"2" * 64, 6, 0)
    assert len(image.data) % 512 == 0
    assert struct.unpack_from("<I", image.data, 1024 + 36)[0] == len(image.data) // 512
    assert image.device_blocks == 6


def test_huge_files_and_xattrs_stay_in_format_limits() -> None:
    """A file over 1 TiB (largest chunk) gets two chunk indexes; xattrs beyond what an inode
    holds inline are dropped with a warning, not written past the u16 count."""
    tib = 1 << 40
    big = {f"user.k{i}": base64.b64encode(b"v" * 60000).decode() for i in range(6)}  # > 256 KiB
    entries = [
        Entry(name="huge", type="reg", size=tib + 512, offset=512),
        Entry(name="attrs", type="reg", xattrs=big),
    ]
    image = build_erofs_image(_index(entries, tib + 2048))
    assert any("xattr" in w and "dropped" in w for w in image.warnings)
    data = image.data
    for pos in range(1280, len(data) - 64, 32):  # find the chunk-based inode
        fmt, icount, mode = struct.unpack_from("<HHH", data, pos)
        if stat.S_ISREG(mode) and fmt >> 1 & 7 == 4:
            (chunk_format,) = struct.unpack_from("<H", data, pos + 16)  # i_u, both inode forms
            assert chunk_format == 0x20 | 31
            at = pos + (64 if fmt & 1 else 32) + (12 + 4 * (icount - 1) if icount else 0)
            at = -(-at // 8) * 8
            assert struct.unpack_from("<HHIHHI", data, at) == (0, 1, 1, 0, 1, 1 + (1 << 31))
            break
    else:
        raise AssertionError("no chunk-based inode found")
