"""Start-up over a realistic link: full pull + unpack vs lazy reads through the mount.

    .venv/bin/python -m bench.startup_bench [--size 1.5GiB] [--working-set 0.06] [--shapes tree,files]

Builds a one-layer image (gzip -6) from real files of this machine and two start-up working
sets of about 6% of its bytes each, read in a shuffled order:

* ``tree``: whole directories picked at random (a program importing package trees: every
  file of a package directory, none of the others);
* ``files``: single files picked at random across the image (the worst case for locality).

The registry sits behind a throttling proxy on 127.0.0.1 (200 Mbit/s shared, 10 ms added per
request). Reports, in one run: the baseline (download the layer through the link, unpack it,
read the working set); lazy reads of the working set through ``imgaccel mount --daemon``
(index-only and full mode, empty cache; the time includes the mount), and each again with a
hot-chunk profile recorded beforehand (``imgaccel record``) and replayed by the mount;
bytes fetched (chunks + index) / compressed bytes of the working set (read amplification);
the mount daemon's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.convert_bench import push_layer, real_files
from tests.registry import start_registry
from tests.threaded_app import ThreadedApp

ROOT = Path(__file__).resolve().parent.parent
RATE = 200e6 / 8  # bytes per second
RTT = 0.010


class ThrottlingProxy:
    """Forwards to the registry; all response bodies share RATE; each request waits RTT."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self._next_free = 0.0
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_cleanup.append(self._close)
        self._session: aiohttp.ClientSession | None = None  # kept-alive connections, like a client's
        self._server = ThreadedApp(app)
        self.host = ""

    async def _pace(self, n: int) -> None:
        now = time.monotonic()
        start = max(now, self._next_free)
        self._next_free = start + n / RATE
        await asyncio.sleep(self._next_free - now)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(RTT)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        body = await request.read()
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        async with self._session.request(
            request.method, f"http://{self.upstream}{request.path_qs}", headers=headers, data=body or None
        ) as up:
            out_headers = {k: v for k, v in up.headers.items() if k.lower() != "transfer-encoding"}
            resp = web.StreamResponse(status=up.status, headers=out_headers)
            await resp.prepare(request)
            async for block in up.content.iter_chunked(256 << 10):
                await self._pace(len(block))
                await resp.write(block)
            await resp.write_eof()
            return resp

    async def _close(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    def start(self) -> ThrottlingProxy:
        self.host = f"127.0.0.1:{self._server.start()}"
        return self

    def stop(self) -> None:
        self._server.stop()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imgaccel.cli.main", *args], cwd=ROOT, capture_output=True,
                          text=True, check=True)  # fmt: skip


_READER = """
import sys, time
root, files = sys.argv[1], open(sys.argv[2]).read().split()
t = time.perf_counter()
for f in files:
    with open(root + f, "rb") as fh:
        while fh.read(1 << 20):
            pass
print(time.perf_counter() - t)
"""


def read_all(root: Path, files: list[str]) -> float:
    """Seconds to read every file in full, one after another, in a child process (the proxy's
    thread in this process would otherwise hold the GIL while the reads wait for it)."""
    with tempfile.NamedTemporaryFile("w", suffix=".list") as listing:
        listing.write("\n".join("/" + f.lstrip("/") for f in files) + "\n")
        listing.flush()
        out = subprocess.run([sys.executable, "-c", _READER, str(root), listing.name], capture_output=True, text=True,
                             check=True)  # fmt: skip
    return float(out.stdout)


def metric(path: Path, name: str) -> float:
    for line in path.read_text().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def working_set(files: list[str], fraction: float, shape: str, seed: int = 7) -> list[str]:
    """About ``fraction`` of the files' bytes: whole directories (``tree``) or single files
    (``files``), picked at random; returned in a shuffled read order."""
    rng = random.Random(seed)
    size = {f: os.path.getsize("/" + f) for f in files}
    budget = sum(size.values()) * fraction
    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(os.path.dirname(f) if shape == "tree" else f, []).append(f)
    keys = sorted(groups)
    rng.shuffle(keys)
    chosen: list[str] = []
    total = 0
    for k in keys:
        group_bytes = sum(size[f] for f in groups[k])
        if total + group_bytes > budget * 1.05:
            continue  # keep close to the budget: skip groups that overshoot it
        chosen += groups[k]
        total += group_bytes
        if total >= budget * 0.95:
            break
    rng.shuffle(chosen)
    return chosen


def build_image(work: Path, files: list[str], lists: dict[str, list[str]]) -> tuple[Path, str, int]:
    """The layer (gzip -6): the files, each working-set list as /ws-<shape>.list, busybox."""
    listing = work / "files.list"
    listing.write_text("\n".join(files) + "\n")
    tar, gz = work / "layer.tar", work / "layer.tar.gz"
    subprocess.run(["tar", "-C", "/", "-cf", str(tar), "--no-recursion", "-T", str(listing)], check=True)
    for shape, ws in lists.items():
        (work / f"ws-{shape}.list").write_text("\n".join("/" + f for f in ws) + "\n")
        subprocess.run(["tar", "-C", str(work), "-rf", str(tar), f"ws-{shape}.list"], check=True)
    subprocess.run(["tar", "-C", "/", "-rf", str(tar), "bin/busybox"], check=True)
    h = hashlib.sha256()
    with open(tar, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    tar_size = tar.stat().st_size
    subprocess.run(["bash", "-c", f"gzip -6 -c {tar} > {gz}"], check=True)
    tar.unlink()
    return gz, "sha256:" + h.hexdigest(), tar_size


@dataclass
class LazyRun:
    mounted: float
    reads: float
    chunk_bytes: float
    index_bytes: float
    rss_mb: float
    waited: float  # seconds reads waited on Range requests
    requests: float  # Range requests sent (one multi-range request counts once)
    replay: str  # the daemon's log line on the profile replay

    @property
    def total(self) -> float:
        return self.mounted + self.reads


def lazy_run(work: Path, ref: str, name: str, ws: list[str], label: str | None) -> LazyRun:
    """Mount (empty cache), read the working set, unmount; what it cost."""
    mnt, cache, metrics, pid_file = work / f"mnt-{name}", work / f"cache-{name}", work / f"{name}.prom", work / "pid"
    mnt.mkdir()
    extra = ["--label", label] if label else ["--no-prefetch"]
    t0 = time.perf_counter()
    cli("mount", ref, str(mnt), "--daemon", "--cache-dir", str(cache), "--metrics-file", str(metrics),
        "--pid-file", str(pid_file), "--log-file", str(work / f"{name}.log"), *extra)  # fmt: skip
    mounted = time.perf_counter() - t0
    reads = read_all(mnt, ws)
    pid = int(pid_file.read_text())
    rss = peak_rss_mb(pid)
    cli("umount", str(mnt))
    with contextlib.suppress(ProcessLookupError):
        for _ in range(100):  # the daemon writes its metrics file once more as it exits
            os.kill(pid, 0)
            time.sleep(0.05)
    replay = [ln.split(": ", 1)[1] for ln in (work / f"{name}.log").read_text().splitlines() if "chunks cached" in ln]
    return LazyRun(mounted, reads, metric(metrics, "imgaccel_node_registry_bytes_total"),
                   metric(metrics, "imgaccel_node_index_bytes"), rss,
                   metric(metrics, "imgaccel_node_read_wait_seconds_total"),
                   metric(metrics, "imgaccel_node_registry_requests_total"), replay[0] if replay else "")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1.5GiB")
    ap.add_argument("--working-set", type=float, default=0.06)
    ap.add_argument("--shapes", default="tree,files", help="working sets to run (tree, files)")
    args = ap.parse_args()
    from imgaccel.formats.sizes import parse_size

    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    work = Path(tempfile.mkdtemp(prefix="imgaccel-startup-"))
    reg = proxy = None
    try:
        files = real_files(parse_size(args.size))
        lists = {shape: working_set(files, args.working_set, shape) for shape in shapes}
        gz, diff_id, tar_size = build_image(work, files, lists)
        gz_size = gz.stat().st_size
        print(f"image: {len(files)} files, tar {tar_size / 1e6:.0f} MB, gzip {gz_size / 1e6:.0f} MB", flush=True)
        reg = start_registry(work / "registry")
        asyncio.run(push_layer(reg.host, "bench/app", gz, diff_id))
        for mode in ("index", "full"):
            cli("convert", f"{reg.host}/bench/app:v1", "--mode", mode, "--no-cache", "--workdir", str(work))
        proxy = ThrottlingProxy(reg.host).start()

        # Baseline: pull the whole layer through the link and unpack it; then read a working set.
        out = work / "unpacked"
        out.mkdir()
        t = time.perf_counter()
        digest = "sha256:" + hashlib.sha256(gz.read_bytes()).hexdigest()
        subprocess.run(["bash", "-c", f"curl -s http://{proxy.host}/v2/bench/app/blobs/{digest} | tar -xzf - -C {out}"],
                       check=True)  # fmt: skip
        pulled = time.perf_counter() - t
        print(f"baseline pull + unpack: {pulled:.1f} s", flush=True)

        for shape, ws in lists.items():
            ws_bytes = sum(os.path.getsize("/" + f) for f in ws)
            ws_compressed = ws_bytes * gz_size / tar_size
            baseline = pulled + read_all(out, ws)
            print(f"\n[{shape}] working set: {len(ws)} files, {ws_bytes / 1e6:.1f} MB "
                  f"({100 * ws_bytes / tar_size:.1f}% of the tar, ~{ws_compressed / 1e6:.1f} MB compressed); "
                  f"baseline {baseline:.1f} s", flush=True)  # fmt: skip
            reads = {}
            for mode, suffix in (("index", "_accelerated"), ("full", "_containerd_accelerated")):
                script = f"/bin/busybox sha256sum $(/bin/busybox cat /ws-{shape}.list)"
                cli("record", f"{reg.host}/bench/app:v1{suffix}", "--label", shape, "--cache-dir", str(work / "rec"),
                    "--", "/bin/busybox", "sh", "-c", script)  # fmt: skip
                shutil.rmtree(work / "rec")
                for profiled in (False, True):
                    name = f"{shape}-{mode}-{'profile' if profiled else 'lazy'}"
                    r = lazy_run(work, f"{proxy.host}/bench/app:v1{suffix}", name, ws, shape if profiled else None)
                    reads[(mode, profiled)] = r.waited
                    fetched = r.chunk_bytes + r.index_bytes
                    print(f"  {mode:5} {'profile' if profiled else 'lazy   '}: mount {r.mounted:.2f} s + reads "
                          f"{r.reads:.2f} s = {r.total:.2f} s -> {baseline / r.total:.1f}x faster; fetched "
                          f"{r.chunk_bytes / 1e6:.1f} MB chunks in {r.requests:.0f} requests + "
                          f"{r.index_bytes / 1e6:.2f} MB index, amplification "
                          f"{fetched / ws_compressed:.2f}; reads waited on the network {r.waited:.2f} s; "
                          f"mount peak RSS {r.rss_mb:.0f} MB {r.replay}", flush=True)  # fmt: skip
            for mode in ("index", "full"):
                lazy, prof = reads[(mode, False)], reads[(mode, True)]
                print(f"  {mode}: with a profile, reads wait on the network {prof:.2f} s vs {lazy:.2f} s without "
                      f"({prof / lazy:.2f}; target < 0.25)", flush=True)  # fmt: skip
    finally:
        for d in work.glob("mnt-*"):
            subprocess.run(["fusermount3", "-u", str(d)], capture_output=True)
        if proxy:
            proxy.stop()
        if reg:
            reg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
