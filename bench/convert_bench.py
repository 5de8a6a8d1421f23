"""Conversion and lazy-read benchmark on a ~1 GB layer of real system files.

    .venv/bin/python -m bench.convert_bench [--size 1GiB] [--reads 200]

Builds an uncompressed tar from /usr/lib and /usr/share, gzips it (-6), pushes a one-layer
image to a local registry, and prints each figure as a ratio against a baseline measured in
the same run:

* index-only conversion time / ``gzip -dc layer > /dev/null`` time   (target <= 1.0)
* index size / compressed layer size                                (target <= 0.5%)
* full-mode output size / gzip size                                  (target <= 0.95)
* full-mode conversion time / ``gzip -dc layer | zstd -3 -T2`` time  (target <= 1.0)
* random 64 KiB read latency (median, p99) and bytes fetched per read, each mode
* peak RSS of each conversion (the CLI in a child process, from wait4)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imgaccel.formats import oci
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.reference import parse_reference
from imgaccel.reader.accelerated_image import open_image
from tests.registry import start_registry

ROOT = Path(__file__).resolve().parent.parent


def real_files(size: int) -> list[str]:
    """Readable regular files under /usr/lib and /usr/share (paths without the leading /), in a
    stable order, about ``size`` bytes of data in all."""
    files, total = [], 0
    for base in ("/usr/lib", "/usr/share"):
        for dirpath, dirs, names in os.walk(base):
            dirs.sort()
            for n in sorted(names):
                p = os.path.join(dirpath, n)
                if os.path.islink(p) or not os.path.isfile(p) or not os.access(p, os.R_OK):
                    continue
                files.append(p.lstrip("/"))
                total += os.path.getsize(p)
                if total >= size:
                    return files
    return files


def build_tar(path: Path, size: int) -> int:
    """tar of real files from /usr/lib and /usr/share, about ``size`` bytes of file data."""
    files = real_files(size)
    listing = path.with_suffix(".list")
    listing.write_text("\n".join(files) + "\n")
    subprocess.run(["tar", "-C", "/", "-cf", str(path), "--no-recursion", "-T", str(listing)], check=True)
    return len(files)


def timed(cmd: str) -> float:
    t = time.perf_counter()
    subprocess.run(["bash", "-c", cmd], check=True)
    return time.perf_counter() - t


def run_cli(*args: str) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes, stdout) of one imgaccel CLI run."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "imgaccel.cli.main", *args], stdout=subprocess.PIPE, cwd=ROOT)
    out = proc.stdout.read().decode() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"imgaccel {' '.join(args)} failed")
    return elapsed, usage.ru_maxrss * 1024, out


async def push_layer(host: str, repo: str, blob_path: Path, diff_id: str) -> None:
    import hashlib

    h = hashlib.sha256()
    with open(blob_path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    digest = "sha256:" + h.hexdigest()
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    ).encode()
    async with RegistryClient(host) as client:
        await client.upload_blob(repo, digest, str(blob_path))
        await client.upload_blob(repo, oci.sha256_digest(config), config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": oci.OCI_MANIFEST,
            "config": {"mediaType": oci.OCI_CONFIG, "digest": oci.sha256_digest(config), "size": len(config)},
            "layers": [{"mediaType": oci.LAYER_GZIP, "digest": digest, "size": blob_path.stat().st_size}],
        }
        await client.put_manifest(repo, "v1", json.dumps(manifest).encode(), oci.OCI_MANIFEST)


async def random_reads(ref_text: str, n: int, seed: int = 7) -> dict[str, float]:
    ref = parse_reference(ref_text)
    async with RegistryClient(ref.registry) as client:
        image = await open_image(client, ref)
        files = [(p, node) for p, node in image.view.walk() if node.entry.type == "reg" and node.entry.size >= 64 << 10]
        rng = random.Random(seed)
        lat, fetched = [], []
        for _ in range(n):
            _path, node = rng.choice(files)
            off = rng.randrange(0, node.entry.size - (64 << 10) + 1)
            layer = image.layers[node.layer]
            layer._cache.clear()  # every read is cold: measure the fetch + decode + verify path
            before = layer.stats.bytes_fetched
            t = time.perf_counter()
            data = await image.read_node(node, off, 64 << 10)
            lat.append(time.perf_counter() - t)
            fetched.append(layer.stats.bytes_fetched - before)
            assert len(data) == 64 << 10
    lat.sort()
    return {
        "median_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "bytes_per_read": statistics.mean(fetched),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GiB", help="uncompressed file data to pack (default 1GiB)")
    ap.add_argument("--reads", type=int, default=200)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--span", default=None, help="index mode: distance between checkpoints (default: convert's)")
    ap.add_argument("--frame-size", default=None, help="full mode: frame size for small files (default: convert's)")
    ap.add_argument("--level", default=None, help="full mode: zstd level (default: convert's)")
    args = ap.parse_args()
    from imgaccel.cli.common import parse_size

    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="imgaccel-bench-", dir=args.workdir))
    reg = None
    try:
        tar, gz = work / "layer.tar", work / "layer.tar.gz"
        nfiles = build_tar(tar, size)
        subprocess.run(["bash", "-c", f"gzip -6 -c {tar} > {gz}"], check=True)
        import hashlib

        h = hashlib.sha256()
        with open(tar, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        diff_id = "sha256:" + h.hexdigest()
        tar_size, gz_size = tar.stat().st_size, gz.stat().st_size
        tar.unlink()
        print(f"layer: {nfiles} files, tar {tar_size / 1e6:.0f} MB, gzip -6 {gz_size / 1e6:.0f} MB", flush=True)

        reg = start_registry(work / "registry")
        repo = "bench/app"
        asyncio.run(push_layer(reg.host, repo, gz, diff_id))
        src = f"{reg.host}/{repo}:v1"

        t_gunzip = timed(f"gzip -dc {gz} > /dev/null")
        t_gunzip_zstd = timed(f"gzip -dc {gz} | zstd -q -3 -T2 > {work / 'baseline.zst'}")
        zstd_size = (work / "baseline.zst").stat().st_size
        (work / "baseline.zst").unlink()

        span = ["--span", args.span] if args.span else []
        t_index, rss_index, _ = run_cli("convert", src, "--mode", "index", "--no-cache", "--workdir", str(work), *span)
        full_opts = [*(["--frame-size", args.frame_size] if args.frame_size else []),
                     *(["--level", args.level] if args.level else [])]  # fmt: skip
        t_full, rss_full, _ = run_cli(
            "convert", src, "--mode", "full", "--no-cache", "--workdir", str(work), *full_opts
        )

        async def sizes() -> tuple[int, int]:
            ref = parse_reference(src + "_accelerated")
            async with RegistryClient(ref.registry) as client:
                idx = await open_image(client, ref)
                full = await open_image(client, parse_reference(src + "_containerd_accelerated"))
                return idx.layers[0].index_size, full.layers[0].blob_size

        index_size, full_size = asyncio.run(sizes())
        reads_index = asyncio.run(random_reads(src + "_accelerated", args.reads))
        reads_full = asyncio.run(random_reads(src + "_containerd_accelerated", args.reads))

        results = {
            "layer": {"files": nfiles, "tar_bytes": tar_size, "gzip_bytes": gz_size},
            "baseline": {"gzip_dc_s": t_gunzip, "gzip_dc_zstd3_T2_s": t_gunzip_zstd, "zstd3_bytes": zstd_size},
            "index": {"seconds": t_index, "peak_rss": rss_index, "index_bytes": index_size},
            "full": {"seconds": t_full, "peak_rss": rss_full, "bytes": full_size},
            "reads_index": reads_index,
            "reads_full": reads_full,
        }
        print(json.dumps(results, indent=2))
        print()
        print(f"index-only time / gzip -dc time            {t_index / t_gunzip:6.2f}   (target <= 1.0, stretch 0.6)")
        print(f"index size / gzip layer size               {100 * index_size / gz_size:6.3f}%  (target <= 0.5%)")
        print(f"full-mode size / gzip size                 {full_size / gz_size:6.3f}   (target <= 0.95)")
        print(f"full-mode time / (gzip -dc | zstd -3 -T2)  {t_full / t_gunzip_zstd:6.2f}   (target <= 1.0)")
        for label, r in (("index-only", reads_index), ("full      ", reads_full)):
            print(
                f"random 64 KiB read, {label}: median {r['median_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                f"{r['bytes_per_read'] / 1024:.0f} KiB fetched/read"
            )
        ratio = reads_index["median_ms"] / reads_full["median_ms"]
        print(f"index-only median / full median            {ratio:6.2f}   (target <= 2.0)")
        print(f"peak RSS: index {rss_index / 1e6:.0f} MB, full {rss_full / 1e6:.0f} MB")
    finally:
        if reg is not None:
            reg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
