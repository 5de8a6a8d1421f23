"""BlobFS on the real kernel: reads, listing, removal, errors, concurrency, restarts, EROFS on top.

Every test mounts through the real ``/dev/fuse`` (a holder process owns each mount) and reads
through the kernel; nothing of FUSE is mocked. In-process servers run on the test's event
loop, so every file operation on their mounts runs in a worker thread. The restart tests run
the server as a separate process (``tests.blobfs_server``) to kill it with SIGKILL while a
reader process (``tests.blobfs_reader``) keeps reading, and check the bytes it got.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import json
import logging
import os
import random
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from imgaccel.formats.erofs import build_erofs_image
from imgaccel.indexer.seekable_index import build_seekable_index
from imgaccel.snapshotter.blob_fs import BlobFS, BytesSource
from imgaccel.snapshotter.fuse_holder import FSTYPE, unmount
from imgaccel.snapshotter.mounts import MS_RDONLY, mount, mount_at, umount_or_detach
from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(300)
MiB = 1 << 20


def _missing_fuse() -> str:
    if os.geteuid() != 0:
        return "mounting FUSE with mount(2) needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse device"
    with open("/proc/filesystems") as f:
        if not any(line.split()[-1] == "fuse" for line in f if line.strip()):
            return "the kernel has no fuse file system"
    return ""


def _missing_erofs() -> str:
    with suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(["modprobe", "erofs"], capture_output=True, check=False, timeout=30)
    with open("/proc/filesystems") as f:
        if not any(line.split()[-1] == "erofs" for line in f if line.strip()):
            return "the kernel has no erofs file system"
    return ""


@pytest.fixture(autouse=True)
def _fuse_available() -> None:
    why = _missing_fuse()
    if why:
        pytest.skip(why)


@asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[BlobFS]:
    """A BlobFS mounted at tmp_path/mnt, served on this loop; unmounted afterwards."""
    mnt, state = tmp_path / "mnt", tmp_path / "state"
    fs = await BlobFS.open(mnt, state)
    try:
        yield fs
    finally:
        try:
            await fs.close(grace=1.0)
        finally:
            await unmount(mnt, state)
    assert mount_at(mnt) is None


def _read_at(path: Path, ranges: list[tuple[int, int]]) -> list[bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return [os.pread(fd, size, offset) for offset, size in ranges]
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class FailingSource:
    """In-memory bytes whose reads touching [bad_start, bad_end) fail with EIO."""

    data: bytes
    bad_start: int
    bad_end: int

    @property
    def size(self) -> int:
        return len(self.data)

    async def read(self, offset: int, size: int) -> bytes:
        if offset < self.bad_end and offset + size > self.bad_start:
            raise OSError(errno.EIO, "chunk failed verification")
        return self.data[offset : offset + size]


@dataclass(frozen=True)
class SlowSource:
    data: bytes
    delay: float

    @property
    def size(self) -> int:
        return len(self.data)

    async def read(self, offset: int, size: int) -> bytes:
        await asyncio.sleep(self.delay)
        return self.data[offset : offset + size]


# ---------------------------------------------------------------------------------------------
# In-process server


async def test_reads_listing_attributes_and_removal(tmp_path: Path) -> None:
    rnd = random.Random(1)
    files = {"a.tar": rnd.randbytes(3 * MiB + 12345), "b.tar": rnd.randbytes(5 * MiB + 7)}
    async with served(tmp_path) as fs:
        paths = {name: await fs.add(name, BytesSource(data)) for name, data in files.items()}
        assert sorted(await asyncio.to_thread(os.listdir, fs.mountpoint)) == ["a.tar", "b.tar"]
        root = await asyncio.to_thread(os.stat, fs.mountpoint)
        assert stat.S_ISDIR(root.st_mode) and stat.S_IMODE(root.st_mode) == 0o555
        for name, data in files.items():
            st = await asyncio.to_thread(os.stat, paths[name])
            assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o444, name
            assert st.st_size == len(data), name

        for name, data in files.items():
            ranges = [(rnd.randrange(len(data) + 100), int(2 ** rnd.uniform(0, 21))) for _ in range(150)]
            ranges += [(0, 2 * MiB), (len(data) - 10, 2 * MiB), (len(data), 4096)]
            got = await asyncio.to_thread(_read_at, paths[name], ranges)
            for (offset, size), chunk in zip(ranges, got, strict=True):
                assert chunk == data[offset : offset + size], (name, offset, size)
            assert await asyncio.to_thread(_sha256_file, paths[name]) == hashlib.sha256(data).hexdigest()
        assert max(fs.stats.read_sizes) == MiB, "READs should reach 1 MiB (max_read, max_pages)"
        assert fs.stats.read_errors == 0

        with pytest.raises(FileNotFoundError):
            await asyncio.to_thread(os.stat, fs.mountpoint / "missing")
        held = await asyncio.to_thread(os.open, paths["b.tar"], os.O_RDONLY)
        try:
            await fs.remove("b.tar")
            with pytest.raises(FileNotFoundError):
                await asyncio.to_thread(os.stat, paths["b.tar"])
            with pytest.raises(FileNotFoundError):
                await asyncio.to_thread(open, paths["b.tar"], "rb")
            assert await asyncio.to_thread(os.listdir, fs.mountpoint) == ["a.tar"]
            # a handle opened before the removal still reads
            assert await asyncio.to_thread(os.pread, held, 100, 1000) == files["b.tar"][1000:1100]
        finally:
            await asyncio.to_thread(os.close, held)
        assert fs.names() == ["a.tar"]


async def test_source_error_fails_only_that_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = random.Random(2).randbytes(2 * MiB)
    bad = FailingSource(data, bad_start=MiB, bad_end=MiB + 4096)
    caplog.set_level(logging.ERROR, logger="imgaccel.snapshotter.blob_fs")
    async with served(tmp_path) as fs:
        path = await fs.add("broken.tar", bad)
        with pytest.raises(OSError) as info:
            await asyncio.to_thread(_read_at, path, [(MiB + 100, 10)])
        assert info.value.errno == errno.EIO
        ok = await asyncio.to_thread(_read_at, path, [(0, 4096), (MiB + 8192, 4096), (MiB - 4096, 4096)])
        assert ok == [data[:4096], data[MiB + 8192 : MiB + 12288], data[MiB - 4096 : MiB]]
        assert fs.stats.read_errors == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("broken.tar" in m and str(MiB + 100) in m and "EIO" in m for m in messages), messages


async def test_slow_file_does_not_delay_other_files(tmp_path: Path) -> None:
    rnd = random.Random(3)
    slow_data, fast_data = rnd.randbytes(MiB), rnd.randbytes(4 * MiB)
    async with served(tmp_path) as fs:
        slow = await fs.add("slow.tar", SlowSource(slow_data, delay=2.0))
        fast = await fs.add("fast.tar", BytesSource(fast_data))
        t0 = time.monotonic()
        slow_read = asyncio.ensure_future(asyncio.to_thread(_read_at, slow, [(4096, 65536)]))
        await asyncio.sleep(0.2)
        ranges = [(rnd.randrange(len(fast_data)), 65536) for _ in range(50)]
        got = await asyncio.to_thread(_read_at, fast, ranges)
        fast_done = time.monotonic() - t0
        assert got == [fast_data[o : o + s] for o, s in ranges]
        assert not slow_read.done()
        assert fast_done < 1.5, f"50 reads of another file took until {fast_done:.2f} s"
        assert await slow_read == [slow_data[4096 : 4096 + 65536]]
        assert time.monotonic() - t0 >= 2.0
        print(f"\nconcurrency: 50 fast reads done at {fast_done:.3f} s while a 2 s read was pending")


async def test_node_ids_survive_a_server_restart(tmp_path: Path) -> None:
    data = random.Random(4).randbytes(MiB)
    mnt, state = tmp_path / "mnt", tmp_path / "state"
    fs = await BlobFS.open(mnt, state)
    try:
        path = await fs.add("x.tar", BytesSource(data))
        ino = (await asyncio.to_thread(os.stat, path)).st_ino
        held = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        await fs.close()
        fs = await BlobFS.open(mnt, state)  # a resume: no INIT, FUSE_NOTIFY_RESEND first
        assert fs.init_flags == 0
        reading = asyncio.ensure_future(asyncio.to_thread(os.pread, held, 4096, 8192))
        await asyncio.sleep(0.3)
        assert not reading.done(), "a READ before the daemon re-adds the source must wait for it"
        await fs.add("x.tar", BytesSource(data))
        assert await reading == data[8192 : 8192 + 4096]
        assert (await asyncio.to_thread(os.stat, path)).st_ino == ino
        await asyncio.to_thread(os.close, held)
    finally:
        await fs.close()
        await unmount(mnt, state)


# ---------------------------------------------------------------------------------------------
# Server processes, killed and restarted


@dataclass
class ServerProcs:
    mountpoint: Path
    state_dir: Path
    files: dict[str, Path]
    delay: float
    procs: list[subprocess.Popen[bytes]]

    def start(self) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "tests.blobfs_server", str(self.mountpoint), str(self.state_dir)]
        args += [f"{name}={path}" for name, path in self.files.items()] + ["--delay", str(self.delay)]
        log_file = open(self.state_dir.parent / f"server{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=log_file)
        log_file.close()
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == b"ready\n", f"server did not start: {line!r}; see {log_file.name}"
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> dict[str, object]:
        """SIGTERM ``proc``; its statistics."""
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        stats: dict[str, object] = json.loads(out.splitlines()[-1])
        return stats


@contextmanager
def server_processes(tmp_path: Path, files: dict[str, Path], delay: float) -> Iterator[ServerProcs]:
    mnt, state = tmp_path / "mnt", tmp_path / "state"
    state.mkdir()
    servers = ServerProcs(mnt, state, files, delay, [])
    try:
        yield servers
    finally:
        for proc in servers.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)
        asyncio.run(unmount(mnt, state))
    assert mount_at(mnt) is None


def _start_reader(tmp_path: Path, expect: dict[str, str], passes: int, drop_cache: bool) -> subprocess.Popen[bytes]:
    spec = tmp_path / "expect.json"
    spec.write_text(json.dumps(expect))
    args = [sys.executable, "-m", "tests.blobfs_reader", str(spec), "--passes", str(passes), "--threads", "2"]
    if drop_cache:
        args.append("--drop-cache")
    reader = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE)
    assert reader.stdout is not None
    assert reader.stdout.readline() == b"reading\n"
    return reader


def _kill_and_restart(servers: ServerProcs, reader: subprocess.Popen[bytes]) -> tuple[float, dict[str, object]]:
    """SIGKILL the running server mid-read, start another; (seconds to ready, reader result)."""
    time.sleep(0.7)
    victim = servers.procs[-1]
    t0 = time.monotonic()
    victim.kill()
    victim.wait(30)
    assert reader.poll() is None, "the reader finished before the kill: make it read longer"
    servers.start()
    down = time.monotonic() - t0
    out, _ = reader.communicate(timeout=240)
    result: dict[str, object] = json.loads(out.splitlines()[-1])
    assert reader.returncode == 0, result
    assert result["errors"] == []
    return down, result


def test_kill_9_and_restart_while_reading(tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(random.Random(5).randbytes(6 * MiB + 321))
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    with server_processes(tmp_path, {"layer.tar": blob}, delay=0.02) as servers:
        servers.start()
        before = mount_at(servers.mountpoint)
        assert before is not None and before.fstype == FSTYPE
        path = servers.mountpoint / "layer.tar"
        ino = os.stat(path).st_ino
        reader = _start_reader(tmp_path, {str(path): digest}, passes=12, drop_cache=False)
        down, result = _kill_and_restart(servers, reader)
        after = mount_at(servers.mountpoint)
        assert after is not None and (after.mount_id, after.device) == (before.mount_id, before.device)
        assert os.stat(path).st_ino == ino
        stats = servers.stop(servers.procs[-1])
        assert isinstance(stats["resent"], int) and stats["resent"] >= 1, stats
        print(
            f"\nrestart (plain file): new server ready {down:.2f} s after kill -9; reader's longest stall "
            f"{result['max_gap']} s; {result['bytes']} bytes in {result['seconds']} s, all sha256 correct; "
            f"{stats['resent']} requests resent"
        )


def _size_range(sizes: object) -> str:
    assert isinstance(sizes, dict)
    keys = sorted(int(k) for k in sizes)
    return f"{keys[0]} B to {keys[-1] // 1024} KiB" if keys else "nothing"


def _layer_members(rnd: random.Random) -> dict[str, bytes]:
    files = {f"usr/lib/mod{i:03d}.so": rnd.randbytes(int(2 ** rnd.uniform(0, 19))) for i in range(150)}
    files |= {f"usr/share/big{i}.dat": rnd.randbytes(3 * MiB + i) for i in range(2)}
    files["etc/empty"] = b""
    return files


def _write_layer(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))


def test_erofs_over_blobfs_survives_restart(tmp_path: Path) -> None:
    why = _missing_erofs()
    if why:
        pytest.skip(why)
    files = _layer_members(random.Random(6))
    tar = tmp_path / "layer.tar"
    _write_layer(tar, files)
    index = build_seekable_index(str(tar), "tar", "sha256:" + hashlib.sha256(tar.read_bytes()).hexdigest()).index
    image = tmp_path / "layer.erofs"
    image.write_bytes(build_erofs_image(index).data)
    erofs_mnt = tmp_path / "erofs"
    erofs_mnt.mkdir()
    with server_processes(tmp_path, {"layer.tar": tar}, delay=0.005) as servers:
        servers.start()
        blob = servers.mountpoint / "layer.tar"
        mount(image, erofs_mnt, "erofs", MS_RDONLY, f"device={blob}")
        try:
            seen = {
                str(p.relative_to(erofs_mnt)): p.read_bytes()
                for p in sorted(erofs_mnt.rglob("*"))
                if p.is_file() and not p.is_symlink()
            }
            assert seen == files
            expect = {str(erofs_mnt / name): hashlib.sha256(data).hexdigest() for name, data in files.items()}
            reader = _start_reader(tmp_path, expect, passes=6, drop_cache=True)
            down, result = _kill_and_restart(servers, reader)
            stats = servers.stop(servers.procs[-1])
            requests = stats["requests"]
            assert isinstance(requests, dict) and requests.get("READ", 0) > 0, "reads after the restart bypassed FUSE"
            print(
                f"\nrestart (EROFS on BlobFS): new server ready {down:.2f} s after kill -9; reader's longest "
                f"stall {result['max_gap']} s; {result['bytes']} bytes in {result['seconds']} s, all correct; "
                f"new server: {requests.get('READ')} READs of {_size_range(stats['read_sizes'])}, "
                f"{stats['resent']} resent"
            )
        finally:
            umount_or_detach(erofs_mnt)
