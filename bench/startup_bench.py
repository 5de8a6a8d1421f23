"""Start-up over a realistic link: full pull + unpack vs lazy reads through the mount.

    .venv/bin/python -m bench.startup_bench [--size 1.5GiB] [--working-set 0.06]

Builds a one-layer image (gzip -6) from real files of this machine, with a start-up working
set of about 6% of its bytes spread over many files, and puts the registry behind a
throttling proxy on 127.0.0.1 (200 Mbit/s shared, 10 ms added per request). Reports, in one
run: the baseline (download the layer through the link, unpack it, read the working set); lazy
reads of the working set through `imgaccel mount` (index-only and full mode, empty cache), and
each again with a recorded hot-chunk profile prefetched; and bytes fetched / compressed bytes
of the working set (read amplification).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
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
        async with (
            aiohttp.ClientSession(auto_decompress=False) as s,
            s.request(
                request.method, f"http://{self.upstream}{request.path_qs}", headers=headers, data=body or None
            ) as up,
        ):
            out_headers = {k: v for k, v in up.headers.items() if k.lower() != "transfer-encoding"}
            resp = web.StreamResponse(status=up.status, headers=out_headers)
            await resp.prepare(request)
            async for block in up.content.iter_chunked(256 << 10):
                await self._pace(len(block))
                await resp.write(block)
            await resp.write_eof()
            return resp

    def start(self) -> ThrottlingProxy:
        self.host = f"127.0.0.1:{self._server.start()}"
        return self

    def stop(self) -> None:
        self._server.stop()


def cli(*args: str, capture: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imgaccel.cli.main", *args], cwd=ROOT, capture_output=capture,
                          text=True, check=True)  # fmt: skip


def read_all(root: Path, files: list[str]) -> float:
    t = time.perf_counter()
    for f in files:
        with open(root / f, "rb") as fh:
            while fh.read(1 << 20):
                pass
    return time.perf_counter() - t


def metric(path: Path, name: str) -> float:
    for line in path.read_text().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1.5GiB")
    ap.add_argument("--working-set", type=float, default=0.06)
    args = ap.parse_args()
    from imgaccel.cli.common import parse_size

    work = Path(tempfile.mkdtemp(prefix="imgaccel-startup-"))
    reg = proxy = None
    try:
        files = real_files(parse_size(args.size))
        rng = random.Random(7)
        budget = sum(os.path.getsize("/" + f) for f in files) * args.working_set
        order = files[:]
        rng.shuffle(order)
        ws, ws_bytes = [], 0
        for f in order:
            if ws_bytes >= budget:
                break
            ws.append(f)
            ws_bytes += os.path.getsize("/" + f)
        (work / "ws.list").write_text("\n".join("/" + f for f in ws) + "\n")
        listing = work / "files.list"
        listing.write_text("\n".join(files) + "\n")
        tar, gz = work / "layer.tar", work / "layer.tar.gz"
        subprocess.run(["tar", "-C", "/", "-cf", str(tar), "--no-recursion", "-T", str(listing)], check=True)
        subprocess.run(["tar", "-C", str(work), "-rf", str(tar), "ws.list"], check=True)
        subprocess.run(["tar", "-C", "/", "-rf", str(tar), "bin/busybox"], check=True)
        h = hashlib.sha256()
        with open(tar, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        tar_size = tar.stat().st_size
        subprocess.run(["bash", "-c", f"gzip -6 -c {tar} > {gz}"], check=True)
        tar.unlink()
        gz_size = gz.stat().st_size
        ws_compressed = ws_bytes * gz_size / tar_size
        print(f"image: {len(files)} files, tar {tar_size / 1e6:.0f} MB, gzip {gz_size / 1e6:.0f} MB; working set "
              f"{len(ws)} files, {ws_bytes / 1e6:.1f} MB ({100 * ws_bytes / tar_size:.1f}%)", flush=True)  # fmt: skip

        reg = start_registry(work / "registry")
        asyncio.run(push_layer(reg.host, "bench/app", gz, "sha256:" + h.hexdigest()))
        for mode in ("index", "full"):
            cli("convert", f"{reg.host}/bench/app:v1", "--mode", mode, "--no-cache", "--workdir", str(work))
        proxy = ThrottlingProxy(reg.host).start()

        # Baseline: pull the whole layer through the link, unpack it, read the working set.
        out = work / "unpacked"
        out.mkdir()
        t = time.perf_counter()
        digest = "sha256:" + hashlib.sha256(gz.read_bytes()).hexdigest()
        subprocess.run(["bash", "-c", f"curl -s http://{proxy.host}/v2/bench/app/blobs/{digest} | tar -xzf - -C {out}"],
                       check=True)  # fmt: skip
        read_all(out, ws)
        baseline = time.perf_counter() - t
        print(f"baseline (pull + unpack + read working set): {baseline:.1f} s", flush=True)

        results = {}
        for mode, suffix in (("index", "_accelerated"), ("full", "_containerd_accelerated")):
            ref = f"{proxy.host}/bench/app:v1{suffix}"
            cli("record", f"{reg.host}/bench/app:v1{suffix}", "--label", "startup", "--cache-dir", str(work / "rec"),
                "--", "/bin/busybox", "sh", "-c", "/bin/busybox sha256sum $(/bin/busybox cat /ws.list)")  # fmt: skip
            for profiled in (False, True):
                mnt, cache, metrics = (
                    work / f"mnt-{mode}-{profiled}",
                    work / f"cache-{mode}-{profiled}",
                    work / "m.prom",
                )
                mnt.mkdir()
                extra = ["--label", "startup"] if profiled else ["--no-prefetch"]
                t0 = time.perf_counter()
                cli("mount", ref, str(mnt), "--daemon", "--cache-dir", str(cache), "--metrics-file", str(metrics),
                    "--pid-file", str(work / "pid"), "--log-file", str(work / f"{mode}.log"), *extra)  # fmt: skip
                mounted = time.perf_counter() - t0
                reads = read_all(mnt, ws)
                cli("umount", str(mnt))
                time.sleep(0.5)
                fetched = metric(metrics, "imgaccel_node_registry_bytes_total")
                results[(mode, profiled)] = (mounted, reads, fetched)
                total = mounted + reads
                kind = "profile" if profiled else "lazy   "
                print(f"{mode:5} {kind}: mount {mounted:.2f} s + reads {reads:.2f} s = {total:.2f} s -> "
                      f"{baseline / total:.1f}x faster than baseline; fetched {fetched / 1e6:.1f} MB, "
                      f"amplification {fetched / ws_compressed:.2f}", flush=True)  # fmt: skip
        for mode in ("index", "full"):
            lazy, prof = results[(mode, False)][1], results[(mode, True)][1]
            print(f"{mode}: reads with a profile wait {prof:.2f} s vs {lazy:.2f} s without ({prof / lazy:.2f}; "
                  f"target < 0.25)")  # fmt: skip
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
