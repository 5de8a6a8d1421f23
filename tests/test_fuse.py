"""Real mounts of converted images (``imgaccel mount``: as root through the kernel, EROFS over
FUSE; ``--fuse-tree``: the pyfuse3 tree): the whole tree, read-only, EIO on bad bytes, runc."""

from __future__ import annotations

import asyncio
import errno
import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.build_images import BIG_FILE_SIZE, push, unique_image
from imgaccel.cli.mount_commands import mounts_at
from imgaccel.formats.layer_index import BLOCK_SIZE
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.reference import parse_reference
from imgaccel.reader.accelerated_image import open_image
from imgaccel.reader.check import Record, reference_tree
from tests.helpers import get_json, run_cli
from tests.registry import Registry, start_registry

MISSING = [t for t in ("fusermount3",) if shutil.which(t) is None]
pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing"),
    pytest.mark.skipif(bool(MISSING), reason="fusermount3 is missing (scripts/install installs fuse3)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the mount tests run as root (allow_other, runc)"),
]
_KIND = {stat.S_IFREG: "reg", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
         stat.S_IFBLK: "block", stat.S_IFIFO: "fifo"}  # fmt: skip


class Mount:
    def __init__(self, ref: str, where: Path, cache: Path, metrics: Path | None = None, *args: str) -> None:
        self.ref, self.where, self.cache, self.metrics, self.args = ref, where, cache, metrics, args
        where.mkdir(parents=True, exist_ok=True)
        self.log = where.parent / f"{where.name}.log"

    def __enter__(self) -> Path:
        pid_file = self.where.parent / f"{self.where.name}.pid"
        extra = [*self.args, *(["--metrics-file", str(self.metrics)] if self.metrics else [])]
        r = run_cli("mount", self.ref, str(self.where), "--daemon", "--cache-dir", str(self.cache),
                    "--log-file", str(self.log), "--pid-file", str(pid_file), *extra)  # fmt: skip
        assert r.code == 0, r.err + (self.log.read_text() if self.log.exists() else "")
        return self.where

    def __exit__(self, *exc: object) -> None:
        run_cli("umount", str(self.where))
        pid = int((self.where.parent / f"{self.where.name}.pid").read_text())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, 9)


def expected_tree(source_ref: str) -> dict[str, Record]:
    ref = parse_reference(source_ref)

    async def go() -> dict[str, Record]:
        async with RegistryClient(ref.registry) as client:
            digest = (await client.get_manifest(ref.repository, ref.reference)).digest
            return await reference_tree(client, ref, digest)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def expected(images: dict[str, str]) -> dict[str, Record]:
    return expected_tree(images["app"])


# ``imgaccel mount`` as root: the kernel path (overlay of EROFS layers), or the pyfuse3 tree.
PATHS = {"kernel": ("overlay", ()), "fuse-tree": ("fuse.imgaccel", ("--fuse-tree",))}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mode", ["index", "full"])
def test_mounted_tree_matches_full_extraction(
    converted: dict[str, str], expected: dict[str, Record], tmp_path: Path, mode: str, path: str
) -> None:
    fstype, args = PATHS[path]
    with Mount(converted[mode], tmp_path / "mnt", tmp_path / "cache", None, *args) as root:
        assert mounts_at(str(root)) == [fstype]
        seen = {}
        for dirpath, dirs, files in os.walk(root):
            for name in dirs + files:
                p = Path(dirpath) / name
                seen[str(p.relative_to(root))] = p
        assert set(seen) == set(expected)
        for rel, want in expected.items():
            p = seen[rel]
            st = os.lstat(p)
            kind = "reg" if want.type == "hardlink" else want.type
            assert _KIND[stat.S_IFMT(st.st_mode)] == kind, rel
            if want.type != "dir" or rel in ("tmp", "bin"):
                assert stat.S_IMODE(st.st_mode) == want.mode, rel
            assert (st.st_uid, st.st_gid) == (want.uid, want.gid), rel
            if want.type == "symlink":
                assert os.readlink(p) == want.link, rel
            if want.type in ("reg", "hardlink"):
                assert hashlib.sha256(p.read_bytes()).hexdigest() == want.sha256, rel
            xattrs = {k: os.getxattr(p, k, follow_symlinks=False) for k in os.listxattr(p, follow_symlinks=False)}
            assert xattrs == want.xattrs, rel
        assert os.stat(root / "data/hl-a").st_ino == os.stat(root / "data/hl-b").st_ino
        assert os.stat(root / "data/hl-a").st_nlink == 2
        assert os.stat(root / "data/setuid").st_mode & stat.S_ISUID
        # Read-only: every kind of write fails with EROFS.
        for attempt in (lambda: (root / "etc/motd").write_text("x"), lambda: (root / "newdir").mkdir(),
                        lambda: (root / "etc/motd").unlink(), lambda: os.chmod(root / "etc/motd", 0o777)):  # fmt: skip
            with pytest.raises(OSError) as err:
                attempt()
            assert err.value.errno == errno.EROFS


def test_second_mount_reads_from_the_shared_cache(converted: dict[str, str], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    metrics = tmp_path / "metrics.prom"
    with Mount(converted["index"], tmp_path / "a", cache, metrics) as root:
        first = (root / "data/big.bin").read_bytes()
    text = metrics.read_text()  # written once more when the mount ends
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    fetched = float(values["imgaccel_node_registry_bytes_total"])
    assert fetched > 1_000_000 and "imgaccel_node_fetch_seconds_bucket" in text
    cached = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    assert cached >= BIG_FILE_SIZE
    with Mount(converted["index"], tmp_path / "b", cache) as root:
        assert (root / "data/big.bin").read_bytes() == first
    assert sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) == cached  # nothing new fetched
    r = run_cli("cache", "stats", "--cache-dir", str(cache))
    assert r.code == 0 and f"{cached} bytes" in r.out
    victim = next(p for p in cache.rglob("*") if p.is_file())
    victim.write_bytes(b"damaged")
    r = run_cli("cache", "verify", "--cache-dir", str(cache))
    assert r.code == 1 and "1 damaged" in r.out and not victim.exists()
    r = run_cli("cache", "gc", "--cache-dir", str(cache), "--max-size", "1MiB")
    assert r.code == 0 and sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) <= 1 << 20


@pytest.mark.parametrize("how", list(PATHS))
def test_corrupt_registry_blob_gives_eio(registry: Registry, tmp_path: Path, how: str) -> None:
    ref = f"{registry.host}/fuse-corrupt-{how}/app:v1"
    push(unique_image(tmp_path, f"fuse-corrupt-{how}"), "v1", ref)
    assert run_cli("convert", ref, "--mode", "full", "--no-cache").code == 0
    manifest = get_json(f"http://{registry.host}/v2/fuse-corrupt-{how}/app/manifests/v1_containerd_accelerated")
    layer = manifest["layers"][0]
    path = registry.blob_path(layer["digest"])
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with Mount(ref + "_containerd_accelerated", tmp_path / "mnt", tmp_path / "cache", None, *PATHS[how][1]) as root:
        assert mounts_at(str(root)) == ["overlay" if how == "kernel" else "fuse.imgaccel"]
        assert (root / "etc/motd").read_bytes() == b"unique\n"  # other chunks still read
        with pytest.raises(OSError) as err:
            (root / "data/big.bin").read_bytes()
        assert err.value.errno == errno.EIO
    log = (tmp_path / "mnt.log").read_text()
    assert "failed verification" in log and layer["digest"] in log


def test_registry_outage_gives_eio_and_the_mount_recovers(tmp_path: Path) -> None:
    reg = start_registry(tmp_path / "reg")
    port = int(reg.host.rsplit(":", 1)[1])
    layout = unique_image(tmp_path, "outage")
    ref = f"{reg.host}/outage/app:v1"
    try:
        push(layout, "v1", ref)
        assert run_cli("convert", ref, "--mode", "full", "--no-cache").code == 0
        with Mount(ref + "_containerd_accelerated", tmp_path / "mnt", tmp_path / "cache") as root:
            assert (root / "etc/motd").read_bytes() == b"unique\n"
            reg.stop()
            with pytest.raises(OSError) as err:
                (root / "data/big.bin").read_bytes()
            assert err.value.errno == errno.EIO
            assert os.path.ismount(root)  # the mount stays up
            reg = start_registry(tmp_path / "reg", port=port)
            data = (root / "data/big.bin").read_bytes()
            assert len(data) == BIG_FILE_SIZE + len("outage")
    finally:
        reg.stop()


@pytest.mark.skipif(shutil.which("runc") is None, reason="runc is missing (scripts/install installs it)")
def test_runc_runs_on_the_mount(converted: dict[str, str], tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    with Mount(converted["full"], tmp_path / "rootfs", tmp_path / "cache") as root:
        spec = json.loads((bundle / "config.json").read_text())
        spec["root"] = {"path": str(root), "readonly": True}
        spec["process"]["terminal"] = False
        # runc's default spec keeps no CAP_DAC_OVERRIDE: the 0640 uid-1000 file must be refused.
        script = "cat /opq/c.txt; sha256sum /bin/busybox; cat /data/big.bin >/dev/null 2>&1 || echo denied"
        spec["process"]["args"] = ["/bin/sh", "-c", script]
        (bundle / "config.json").write_text(json.dumps(spec))
        run = subprocess.run(["runc", "run", "--bundle", str(bundle), f"imgaccel-{os.getpid()}"],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert lines[0] == "only this survives in opq"
        assert lines[1].split()[0] == hashlib.sha256(Path("/bin/busybox").read_bytes()).hexdigest()
        assert lines[2] == "denied"


@pytest.fixture(autouse=True)
def _no_leftover_mounts(tmp_path: Path) -> Iterator[None]:
    yield
    for p in tmp_path.iterdir():
        if p.is_dir() and os.path.ismount(p):
            subprocess.run(["fusermount3", "-u", str(p)], check=False)


def test_profile_record_push_and_prefetch(registry: Registry, tmp_path: Path) -> None:
    ref = f"{registry.host}/profiled/app:v1"
    push(unique_image(tmp_path, "profiled"), "v1", ref)
    assert run_cli("convert", ref, "--mode", "full", "--no-cache").code == 0
    target = ref + "_containerd_accelerated"
    r = run_cli("record", target, "--label", "startup", "--cache-dir", str(tmp_path / "rec-cache"),
                "--", "/bin/sha256sum", "/etc/motd", "/data/big.bin")  # fmt: skip
    assert r.code == 0, r.err
    assert "profile 'startup'" in r.out
    # prefetch warms an empty cache with exactly what the command read.
    r = run_cli("prefetch", target, "--label", "startup", "--cache-dir", str(tmp_path / "warm"))
    assert r.code == 0, r.err
    warm = sum(p.stat().st_size for p in (tmp_path / "warm").rglob("*") if p.is_file())
    assert warm >= BIG_FILE_SIZE
    assert run_cli("prefetch", target, "--label", "nope", "--cache-dir", str(tmp_path / "x")).code == 1
    # A mount with an empty cache fetches the profile's chunks before anything asks for them.
    metrics = tmp_path / "metrics.prom"
    with Mount(target, tmp_path / "mnt", tmp_path / "empty-cache", metrics, "--label", "startup") as root:
        deadline = time.monotonic() + 30
        while sum(p.stat().st_size for p in (tmp_path / "empty-cache").rglob("*") if p.is_file()) < warm:
            assert time.monotonic() < deadline, "the profile was not prefetched"
            time.sleep(0.1)
        assert (root / "data/big.bin").stat().st_size == BIG_FILE_SIZE + len("profiled")
        assert len((root / "data/big.bin").read_bytes()) == BIG_FILE_SIZE + len("profiled")
    values = dict(line.rsplit(" ", 1) for line in metrics.read_text().splitlines() if not line.startswith("#"))
    layer = get_json(f"http://{registry.host}/v2/profiled/app/manifests/v1_containerd_accelerated")["layers"][0]
    assert float(values["imgaccel_node_registry_bytes_total"]) <= layer["size"]  # no chunk was fetched twice


@pytest.mark.parametrize("mode", ["index", "full"])
def test_layer_directories_stack_with_overlayfs(
    converted: dict[str, str], expected: dict[str, Record], tmp_path: Path, mode: str
) -> None:
    """``mount --layers`` gives one directory per layer; the kernel's overlayfs stacks them
    into the same tree as the image (whiteouts and opaque directories in overlay form)."""
    with Mount(converted[mode], tmp_path / "layers", tmp_path / "cache", None, "--layers") as root:
        layers = sorted((p for p in root.iterdir()), key=lambda p: int(p.name))
        assert [p.name for p in layers] == ["0", "1", "2"]
        wh = os.lstat(layers[1] / "old/gone.txt")
        assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
        assert os.getxattr(layers[1] / "opq", "trusted.overlay.opaque") == b"y"
        merged = tmp_path / "merged"
        merged.mkdir()
        lower = ":".join(str(p) for p in reversed(layers))
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower}", str(merged)], check=True)
        try:
            seen = set()
            for dirpath, dirs, files in os.walk(merged):
                for name in dirs + files:
                    seen.add(str((Path(dirpath) / name).relative_to(merged)))
            assert seen == set(expected)
            assert (merged / "opq/c.txt").read_text() == "only this survives in opq\n"
            assert hashlib.sha256((merged / "data/big.bin").read_bytes()).hexdigest() == expected["data/big.bin"].sha256
        finally:
            subprocess.run(["umount", str(merged)], check=False)


def test_images_sharing_a_base_layer_fetch_it_once(registry: Registry, tmp_path: Path) -> None:
    from fixtures.build_images import Layout, Member, real_bytes, tar_bytes

    shared = tar_bytes([Member("base/shared.bin", b"shared" + real_bytes(3 << 20, "share"))])
    base = ("application/vnd.oci.image.layer.v1.tar+gzip", gzip.compress(shared))
    refs = []
    for name in ("one", "two"):
        top = ("application/vnd.oci.image.layer.v1.tar", tar_bytes([Member(f"{name}.txt", name.encode())]))
        layout = Layout(tmp_path / f"layout-{name}")
        layout.tag(layout.image([base, top]), "v1")
        ref = f"{registry.host}/shared-base/{name}:v1"
        push(layout.root, "v1", ref)
        assert run_cli("convert", ref, "--mode", "index").code == 0
        refs.append(ref + "_accelerated")
    cache = tmp_path / "cache"
    fetched = []
    for i, ref in enumerate(refs):
        metrics = tmp_path / f"m{i}.prom"
        with Mount(ref, tmp_path / f"mnt{i}", cache, metrics) as root:
            assert (root / "base/shared.bin").read_bytes().startswith(b"shared")
        values = dict(line.rsplit(" ", 1) for line in metrics.read_text().splitlines() if not line.startswith("#"))
        fetched.append(float(values["imgaccel_node_registry_bytes_total"]))
    assert fetched[0] > 1_000_000 and fetched[1] == 0  # the second image found the base layer's chunks cached


def cacheable_bytes(ref_text: str) -> int:
    """Bytes the chunk cache holds once every chunk (index mode: every 1 MiB block) of the
    image is cached, identical ones counted once."""
    ref = parse_reference(ref_text)

    async def go() -> int:
        async with RegistryClient(ref.registry) as client:
            image = await open_image(client, ref)
        sizes: dict[str, int] = {}
        for layer in image.layers:
            for c in layer.index.chunks:
                if not c.blocks:
                    sizes[c.digest] = c.u_size
                for i, d in enumerate(c.blocks):
                    sizes[d] = min(BLOCK_SIZE, c.u_size - i * BLOCK_SIZE)
        return sum(sizes.values())

    return asyncio.run(go())


@pytest.mark.parametrize("mode", ["index", "full"])
def test_background_fetch_caches_the_whole_image(tmp_path: Path, mode: str) -> None:
    reg = start_registry(tmp_path / "reg")
    ref = f"{reg.host}/background/app:v1"
    suffix = "_accelerated" if mode == "index" else "_containerd_accelerated"
    try:
        push(unique_image(tmp_path, f"background-{mode}"), "v1", ref)
        assert run_cli("convert", ref, "--mode", mode, "--no-cache").code == 0
        want = cacheable_bytes(ref + suffix)
        cache = tmp_path / "cache"
        args = ("--no-prefetch", "--background-fetch", "64MiB")
        with Mount(ref + suffix, tmp_path / "mnt", cache, None, *args) as root:
            deadline = time.monotonic() + 60
            while sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) < want:
                assert time.monotonic() < deadline, "the background fetch did not cache the image"
                time.sleep(0.1)
            reg.stop()  # from now on every byte must come from the cache
            assert (root / "data/big.bin").read_bytes()[: len(f"background-{mode}")] == f"background-{mode}".encode()
            assert (root / "etc/motd").read_bytes() == b"unique\n"
        assert "background fetch: done" in (tmp_path / "mnt.log").read_text()
    finally:
        reg.stop()
