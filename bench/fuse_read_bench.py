"""READ throughput of BlobFS (our FUSE protocol loop) vs pyfuse3 serving the same file.

    .venv/bin/python -m bench.fuse_read_bench [--size-mib 256] [--seconds 5] [--threaded]

One local file (page-cached) is served read-only by each server in turn, each in its own
process, both with direct I/O (every read reaches the server) and 1 MiB ``max_read``:

* BlobFS (``imgaccel.snapshotter.blob_fs``) through its holder, source = pread;
* pyfuse3 (libfuse 3), the way ``imgaccel.reader.fuse_fs`` runs it (asyncio, its ready-fd
  fast path), read handler = pread.

``--threaded`` makes both do the pread in a worker thread instead of on the loop. Workloads,
each for ``--seconds``, into page-aligned buffers: sequential 1 MiB reads (1 thread), random
4-128 KiB reads (4 threads), random 4 KiB reads (2 threads). Reports per workload and
server: MB/s, READ requests/s as the server counted them, the request-size histogram,
BlobFS/pyfuse3 ratios, and each server's peak RSS (VmHWM; BlobFS's holder separately).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import mmap
import os
import random
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imgaccel.snapshotter.mounts import is_mountpoint, umount

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Servers (run in child processes)


def _vm(field: str, pid: int | str = "self") -> int:
    """A /proc/PID/status size field in bytes (0 if absent)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _report(reads: Counter[int]) -> None:
    print(json.dumps({"read_sizes": {str(k): v for k, v in reads.items()}}), flush=True)


async def _serve_blobfs(path: Path, mountpoint: Path, state_dir: Path, threaded: bool) -> None:
    from imgaccel.snapshotter.blob_fs import BlobFS, FileSource
    from imgaccel.snapshotter.fuse_holder import unmount

    fs = await BlobFS.open(mountpoint, state_dir)
    await fs.add("blob", FileSource(path, threaded=threaded))
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await fs.close()
    await unmount(mountpoint, state_dir)
    _report(fs.stats.read_sizes)


async def _serve_pyfuse3(path: Path, mountpoint: Path, threaded: bool) -> None:
    import pyfuse3
    import pyfuse3.asyncio

    from imgaccel.reader.fuse_fs import _use_ready_fd_fast_path

    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    reads: Counter[int] = Counter()

    class OneFile(pyfuse3.Operations):
        def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
            a = pyfuse3.EntryAttributes()
            a.st_ino = inode
            a.st_mode = (stat.S_IFDIR | 0o555) if inode == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o444)
            a.st_nlink = 2 if inode == pyfuse3.ROOT_INODE else 1
            a.st_size = 0 if inode == pyfuse3.ROOT_INODE else size
            a.st_blksize = MiB
            a.attr_timeout = a.entry_timeout = 3600
            return a

        async def lookup(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
            if parent != pyfuse3.ROOT_INODE or name != b"blob":
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(2)

        async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
            return self._attr(inode)

        async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
            return pyfuse3.FileInfo(fh=inode, direct_io=True)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            reads[size] += 1
            if threaded:
                return await asyncio.to_thread(os.pread, fd, size, off)
            return os.pread(fd, size, off)

        async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
            return inode

        async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
            if start_id == 0:
                pyfuse3.readdir_reply(token, b"blob", self._attr(2), 1)

    pyfuse3.asyncio.enable()
    _use_ready_fd_fast_path()
    options = set(pyfuse3.default_options) | {"ro", "fsname=bench", "allow_other"}  # libfuse refuses max_read=
    pyfuse3.init(OneFile(), str(mountpoint), options)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, pyfuse3.terminate)
    print("ready", flush=True)
    try:
        await pyfuse3.main()
    finally:
        pyfuse3.close(unmount=True)
    _report(reads)


# ---------------------------------------------------------------------------------------------
# Readers


@dataclass
class Load:
    name: str
    threads: int
    pick: Callable[[random.Random, int, int], tuple[int, int]]
    """(rng, file size, previous end) -> (offset, size)."""


def _seq_1m(rnd: random.Random, size: int, prev: int) -> tuple[int, int]:
    off = prev if prev + MiB <= size else 0
    return off, MiB


def _rand_4k_128k(rnd: random.Random, size: int, prev: int) -> tuple[int, int]:
    n = 4096 * rnd.randint(1, 32)
    return rnd.randrange(0, size - n) // 4096 * 4096, n


def _rand_4k(rnd: random.Random, size: int, prev: int) -> tuple[int, int]:
    return rnd.randrange(0, size - 4096) // 4096 * 4096, 4096


LOADS = [
    Load("sequential 1 MiB x1", 1, _seq_1m),
    Load("random 4-128 KiB x4", 4, _rand_4k_128k),
    Load("random 4 KiB x2", 2, _rand_4k),
]


def _run_load(path: Path, load: Load, seconds: float) -> tuple[int, int, float]:
    """(bytes, reads, elapsed) of ``load`` on ``path``."""
    size = os.stat(path).st_size
    totals = [0, 0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        fd = os.open(path, os.O_RDONLY)
        buf = memoryview(mmap.mmap(-1, MiB))  # page-aligned: a 1 MiB read is one 1 MiB READ
        got = count = 0
        prev = rnd.randrange(0, size // MiB) * MiB
        try:
            while time.monotonic() < deadline:
                off, n = load.pick(rnd, size, prev)
                done = os.preadv(fd, [buf[:n]], off)
                if done != n:
                    raise OSError(errno.EIO, f"short read of {path} at {off}: {done} of {n}")
                prev = off + n
                got += n
                count += 1
        finally:
            os.close(fd)
        with lock:
            totals[0] += got
            totals[1] += count

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(load.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return totals[0], totals[1], time.monotonic() - t0


@dataclass
class Result:
    mb_s: float
    req_s: float
    sizes: Counter[int]
    peak_rss: int
    holder_rss: int


def _holder_pid(mountpoint: Path) -> int | None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"imgaccel.snapshotter.fuse_holder" in cmd and os.fsencode(mountpoint) in cmd:
                return int(entry)
    return None


def _measure(server: str, blob: Path, work: Path, load: Load, seconds: float, threaded: bool) -> Result:
    mnt, state = work / f"mnt-{server}", work / f"state-{server}"
    mnt.mkdir(exist_ok=True)
    args = [sys.executable, "-m", "bench.fuse_read_bench", "--serve", server, "--file", str(blob)]
    args += ["--mountpoint", str(mnt), "--state-dir", str(state)] + (["--threaded"] if threaded else [])
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline() != b"ready\n":
            raise RuntimeError(f"{server} server did not start")
        path = mnt / "blob"
        nbytes, _reads, elapsed = _run_load(path, load, seconds)
        peak = _vm("VmHWM", proc.pid)
        holder = _holder_pid(mnt)
        holder_rss = _vm("VmHWM", holder) if holder else 0
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if is_mountpoint(mnt):  # a server that died: leave nothing mounted
            umount(mnt, detach=True)
    sizes = Counter({int(k): v for k, v in json.loads(out.splitlines()[-1])["read_sizes"].items()})
    return Result(nbytes / elapsed / 1e6, sum(sizes.values()) / elapsed, sizes, peak, holder_rss)


def _histogram(sizes: Counter[int]) -> str:
    buckets: Counter[int] = Counter()
    for size, n in sizes.items():
        buckets[max(4096, 1 << max(0, (size - 1).bit_length()))] += n
    total = sum(buckets.values()) or 1
    parts = [f"<={b // 1024}K:{100 * n / total:.0f}%" for b, n in sorted(buckets.items())]
    return " ".join(parts)


def run(size_mib: int, seconds: float, threaded: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="fuse-read-bench-") as tmp:
        work = Path(tmp)
        blob = work / "blob.bin"
        with open(blob, "wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(MiB))
        print(
            f"file {size_mib} MiB (page-cached), {seconds:.0f} s per run, pread {'threaded' if threaded else 'inline'}"
        )
        print(f"{'workload':<22} {'server':<8} {'MB/s':>8} {'READ/s':>8}  request sizes")
        peaks: dict[str, int] = {}
        holder_peak = 0
        for load in LOADS:
            res = {s: _measure(s, blob, work, load, seconds, threaded) for s in ("blobfs", "pyfuse3")}
            for server, r in res.items():
                print(f"{load.name:<22} {server:<8} {r.mb_s:8.0f} {r.req_s:8.0f}  {_histogram(r.sizes)}")
                peaks[server] = max(peaks.get(server, 0), r.peak_rss)
            holder_peak = max(holder_peak, res["blobfs"].holder_rss)
            b, p = res["blobfs"], res["pyfuse3"]
            print(f"{'':<22} {'ratio':<8} {b.mb_s / p.mb_s:7.2f}x {b.req_s / p.req_s:7.2f}x")
        print(
            f"peak RSS: blobfs server {peaks['blobfs'] / MiB:.1f} MiB (+ holder {holder_peak / MiB:.1f} MiB), "
            f"pyfuse3 server {peaks['pyfuse3'] / MiB:.1f} MiB"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threaded", action="store_true", help="pread in a worker thread in both servers")
    parser.add_argument("--serve", choices=["blobfs", "pyfuse3"], help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mountpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("fuse_read_bench: mounting FUSE through mount(2) needs root", file=sys.stderr)
        return 2
    if args.serve == "blobfs":
        asyncio.run(_serve_blobfs(args.file, args.mountpoint, args.state_dir, args.threaded))
    elif args.serve == "pyfuse3":
        asyncio.run(_serve_pyfuse3(args.file, args.mountpoint, args.threaded))
    else:
        run(args.size_mib, args.seconds, args.threaded)
    return 0


if __name__ == "__main__":
    sys.exit(main())
