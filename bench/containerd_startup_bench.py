"""Start-up through containerd: pull + run a container that reads a working set, over a slow link.

    .venv/bin/python -m bench.containerd_startup_bench [--size 512MiB] [--shapes tree,files]

The image and working sets are ``bench.startup_bench``'s (real files of this machine, gzip -6,
about 6% of the bytes read as whole directories or as single files); the registry sits behind
its throttling proxy (200 Mbit/s shared, 10 ms per request). Each run starts a fresh
containerd (and, for the lazy runs, a fresh ``imgaccel snapshotter`` with an empty cache) and
times, from the start of the pull to the end of the container's reads:

* baseline: containerd's overlayfs snapshotter, ``ctr images pull`` + unpack, ``ctr run``;
* imgaccel full and index-only: ``ctr-remote image rpull --snapshotter imgaccel`` (lazy),
  ``ctr run --snapshotter imgaccel``; each without a profile and with the working set's
  hot-chunk profile (recorded beforehand with ``imgaccel record``), which the daemon replays
  when the pull first opens the image.

Printed per run: seconds, the ratio baseline / run, and for lazy runs the daemon's peak RSS and
its FUSE request summary. Then, on a fresh lazy mount: warm per-file open+read+close through
the layers' EROFS mounts (overlaid when there are several: the container rootfs's kernel
path) against the same files on this machine's own disk, and the daemon's RSS while idle.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.convert_bench import push_layer, real_files
from bench.startup_bench import ROOT, ThrottlingProxy, build_image, peak_rss_mb, working_set
from imgaccel.formats.sizes import parse_size
from imgaccel.snapshotter.erofs_layers import unmount_all
from imgaccel.snapshotter.mounts import mount, umount_or_detach
from tests.containerd import running_containerd
from tests.registry import start_registry


@contextmanager
def node(
    work: Path, lazy: bool, profile: str | None = None, background_fetch: str = "no-profile"
) -> Iterator[tuple[list[str], subprocess.Popen[bytes] | None, Path]]:
    """A fresh containerd; with ``lazy``, the imgaccel daemon as its proxy snapshotter,
    replaying the image's ``profile`` (a label) when it first opens it, else fetching it whole
    in the background (``background_fetch``, the node daemon's default)."""
    work.mkdir(parents=True)
    (work / "node.yaml").write_text(f"profile_label: {profile or 'null'}\nbackground_fetch: '{background_fetch}'\n")
    sock, root = work / "imgaccel.sock", work / "imgaccel-root"
    daemon = None
    extra = f'[proxy_plugins.imgaccel]\n  type = "snapshot"\n  address = "{sock}"\n' if lazy else ""
    try:
        if lazy:
            log = open(work / "daemon.log", "wb")  # noqa: SIM115 - the daemon writes it
            daemon = subprocess.Popen(
                [sys.executable, "-m", "imgaccel.cli.main", "snapshotter", "--config", str(work / "node.yaml"),
                 "--socket", str(sock), "--root", str(root), "--cache-dir", str(work / "cache")],
                stdout=log, stderr=log, cwd=ROOT,
            )  # fmt: skip
            deadline = time.monotonic() + 30
            while not sock.exists():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((work / "daemon.log").read_text()[-2000:])
                time.sleep(0.05)
        (work / "ctd").mkdir()
        with running_containerd(work / "ctd", extra) as ctr:
            yield ctr, daemon, root
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(30)
        if lazy:
            asyncio.run(unmount_all(root))


def run(args: list[str]) -> None:
    r = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"{' '.join(args[:6])}...: {r.stderr[-1500:]}")


def startup(
    work: Path, ref: str, shape: str, mode: str | None, profile: str | None = None
) -> tuple[float, float, str, float]:
    """Seconds from pull to the end of the reads, of them the pull's; FUSE summary and daemon
    peak RSS (MB) if lazy."""
    with node(work, mode is not None, profile) as (ctr, daemon, _root):
        ctr = [*ctr, "--namespace", "bench"]
        reader = f"/bin/busybox xargs /bin/busybox cat < /ws-{shape}.list > /dev/null"
        t0 = time.monotonic()
        if mode is None:
            run([*ctr, "images", "pull", "--plain-http", ref])
            pulled = time.monotonic() - t0
            run([*ctr, "run", "--rm", ref, "c", "/bin/busybox", "sh", "-c", reader])
        else:
            address = ctr[ctr.index("--address") + 1]
            run(["ctr-remote", "--address", address, "--namespace", "bench", "image", "rpull", "--snapshotter",
                 "imgaccel", "--plain-http", ref])  # fmt: skip
            pulled = time.monotonic() - t0
            run([*ctr, "run", "--rm", "--snapshotter", "imgaccel", ref, "c", "/bin/busybox", "sh", "-c", reader])
        elapsed = time.monotonic() - t0
        rss = peak_rss_mb(daemon.pid) if daemon else 0.0
    summary = ""
    if mode is not None:
        found = re.findall(r"FUSE requests served: (.*)", (work / "daemon.log").read_text())
        summary = found[-1] if found else "(no summary)"
    return elapsed, pulled, summary, rss


SUFFIX = {"full": "_containerd_accelerated", "index": "_accelerated"}


def record(cache: Path, ref: str, shape: str) -> str:
    """Record the working set's hot-chunk profile (label = shape) and attach it to ``ref``;
    ``record``'s summary line. (The image has no /dev: the reads are piped to ``wc``.)"""
    script = f"/bin/busybox xargs /bin/busybox cat < /ws-{shape}.list | /bin/busybox wc -c"
    r = subprocess.run([sys.executable, "-m", "imgaccel.cli.main", "record", ref, "--label", shape, "--cache-dir",
                        str(cache), "--", "/bin/busybox", "sh", "-c", script], cwd=ROOT, check=True,
                       capture_output=True, text=True)  # fmt: skip
    shutil.rmtree(cache, ignore_errors=True)
    if "note: the command exited" in r.stderr:
        raise RuntimeError(f"recording {ref}: {r.stderr.strip()}")
    return r.stdout.strip().splitlines()[-1]


_PER_FILE = """
import sys, time
root, files = sys.argv[1], open(sys.argv[2]).read().split()
for _ in range(2):  # the first pass warms the caches
    t = time.perf_counter()
    for f in files:
        with open(root + f, "rb") as fh:
            while fh.read(1 << 20):
                pass
print((time.perf_counter() - t) / len(files) * 1000)
"""


def per_file_ms(root: str, files: list[str]) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".list") as listing:
        listing.write("\n".join("/" + f.lstrip("/") for f in files) + "\n")
        listing.flush()
        out = subprocess.run([sys.executable, "-c", _PER_FILE, root, listing.name], capture_output=True, text=True,
                             check=True)  # fmt: skip
    return float(out.stdout)


def warm_reads(work: Path, ref: str, files: list[str]) -> tuple[float, float, float]:
    """(ms per file through overlay-over-EROFS-over-FUSE, ms per file native, idle daemon RSS MB)."""
    with node(work, True) as (ctr, daemon, root):
        address = ctr[ctr.index("--address") + 1]
        run(["ctr-remote", "--address", address, "--namespace", "bench", "image", "rpull", "--snapshotter",
             "imgaccel", "--plain-http", ref])  # fmt: skip
        layers = sorted(str(p) for p in (root / "lazy" / "layers").glob("*/fs"))
        merged = work / "merged"
        merged.mkdir()
        if len(layers) > 1:  # overlayfs needs two lower layers at least (or an upper one)
            mount("overlay", merged, "overlay", 1, "lowerdir=" + ":".join(layers))  # MS_RDONLY
        try:
            lazy_ms = per_file_ms(str(merged) if len(layers) > 1 else layers[0], files)
        finally:
            if len(layers) > 1:
                umount_or_detach(merged)
        native_ms = per_file_ms("", files)
        wait_local(root, len(layers))  # idle: the background fetch is over
        time.sleep(5)
        assert daemon is not None
        rss = 0.0
        for line in Path(f"/proc/{daemon.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return lazy_ms, native_ms, rss


def spread_files(count: int, size: int) -> list[str]:
    """About ``count`` real files of this machine (paths without the leading /) holding about
    ``size`` bytes: every k-th file under /usr (a real tree's mix of small and big files), then
    the largest of the rest until the bytes are reached, in tree order."""
    found: list[tuple[str, int]] = []
    for dirpath, dirs, names in os.walk("/usr"):
        dirs.sort()
        for n in sorted(names):
            p = os.path.join(dirpath, n)
            if os.path.islink(p) or not os.path.isfile(p) or not os.access(p, os.R_OK) or any(c.isspace() for c in p):
                continue  # (the container's reader takes the working set through xargs)
            found.append((p.lstrip("/"), os.path.getsize(p)))
    step = max(len(found) // count, 1)
    picked = set(range(0, len(found), step)[:count])
    total = sum(found[i][1] for i in picked)
    for i in sorted(picked, key=lambda i: -found[i][1]):  # too many bytes: drop the biggest files
        if total <= size:
            break
        picked.discard(i)
        total -= found[i][1]
    for i in sorted(set(range(len(found))) - picked, key=lambda i: -found[i][1]):  # too few: add big ones
        if total >= size * 0.98:
            break
        if total + found[i][1] > size:
            continue
        picked.add(i)
        total += found[i][1]
    return [found[i][0] for i in sorted(picked)]


def wait_local(root: Path, layers: int, timeout: float = 1800) -> None:
    """Until the daemon has fetched and written out ``layers`` layers (its background fetch)."""
    deadline = time.monotonic() + timeout
    while len(list((root / "lazy" / "layers").glob("*/layer.tar"))) < layers:
        if time.monotonic() > deadline:
            raise RuntimeError("the background fetch did not finish")
        time.sleep(1)


def idle_rss(work: Path, refs: list[str]) -> tuple[float, float]:
    """Daemon RSS (MB) with every image of ``refs`` pulled lazily and one container run on each,
    once idle: (right after, with no background fetch; after the background fetch of all)."""
    out = []
    for fetch in ("off", "no-profile"):
        with node(work / f"idle-{fetch}", True, background_fetch=fetch) as (ctr, daemon, root):
            ctr = [*ctr, "--namespace", "bench"]
            address = ctr[ctr.index("--address") + 1]
            for i, ref in enumerate(refs):
                run(["ctr-remote", "--address", address, "--namespace", "bench", "image", "rpull", "--snapshotter",
                     "imgaccel", "--plain-http", ref])  # fmt: skip
                run([*ctr, "run", "--rm", "--snapshotter", "imgaccel", ref, f"c{i}", "/bin/busybox", "true"])
            assert daemon is not None
            if fetch != "off":
                wait_local(root, len(refs))
            time.sleep(5)
            for line in Path(f"/proc/{daemon.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out.append(int(line.split()[1]) / 1024)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512MiB")
    ap.add_argument("--working-set", type=float, default=0.06)
    ap.add_argument("--shapes", default="tree,files")
    ap.add_argument(
        "--files",
        type=int,
        default=0,
        help="about this many files spread over /usr (0: the first --size bytes of /usr/lib, /usr/share)",
    )
    ap.add_argument("--modes", default="full,index", help="imgaccel modes to run")
    ap.add_argument("--index-span", help="convert index mode with this checkpoint distance (default: convert's)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (daemon logs) and print it")
    ap.add_argument("--warm-only", action="store_true", help="only the warm per-file reads and idle RSS")
    ap.add_argument(
        "--idle-images",
        type=int,
        default=0,
        help="also measure the daemon's idle RSS with this many images (slices of the files) mounted",
    )
    args = ap.parse_args()
    if os.geteuid() != 0 or shutil.which("ctr-remote") is None:
        sys.exit("needs root, containerd and ctr-remote (scripts/install installs them)")
    prefix = "imgaccel-ctd-bench-"
    workdir = (
        contextlib.nullcontext(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
        if args.keep
        else tempfile.TemporaryDirectory(prefix=prefix, dir="/var/tmp")
    )
    with workdir as tmp:
        work = Path(tmp)
        if args.keep:
            print(f"work directory (kept): {work}", flush=True)
        files = spread_files(args.files, parse_size(args.size)) if args.files else real_files(parse_size(args.size))
        shapes = args.shapes.split(",")
        lists = {s: working_set(files, args.working_set, s) for s in shapes}
        gz, diff_id, tar_size = build_image(work, files, lists)
        reg = start_registry(work / "registry")
        proxy = ThrottlingProxy(reg.host).start()
        try:
            asyncio.run(push_layer(reg.host, "bench/app", gz, diff_id))
            for mode in ("full", "index"):
                span = ["--span", args.index_span] if mode == "index" and args.index_span else []
                subprocess.run([sys.executable, "-m", "imgaccel.cli.main", "convert", f"{reg.host}/bench/app:v1",
                                "--mode", mode, *span], cwd=ROOT, check=True, capture_output=True)  # fmt: skip
            print(f"image: {len(files)} files, tar {tar_size / 1e6:.0f} MB, gzip {gz.stat().st_size / 1e6:.0f} MB; "
                  f"link 200 Mbit/s + 10 ms per request", flush=True)  # fmt: skip
            refs = {
                None: f"{proxy.host}/bench/app:v1",
                "full": f"{proxy.host}/bench/app:v1_containerd_accelerated",
                "index": f"{proxy.host}/bench/app:v1_accelerated",
            }
            for shape in [] if args.warm_only else shapes:
                base, base_pull, _, _ = startup(work / f"base-{shape}", refs[None], shape, None)
                print(f"{shape:5s} baseline (overlayfs, pull + unpack + run): {base:6.2f} s (pull {base_pull:.2f} s)",
                      flush=True)  # fmt: skip
                for mode in args.modes.split(","):
                    summary = record(work / f"rec-{mode}-{shape}", f"{reg.host}/bench/app:v1{SUFFIX[mode]}", shape)
                    print(f"      recorded: {summary.split(': ', 1)[-1]}", flush=True)
                    for profile in (None, shape):
                        t, pulled, summary, rss = startup(work / f"{mode}-{shape}-{profile}", refs[mode], shape, mode,
                                                          profile)  # fmt: skip
                        how = "profile" if profile else "no profile"
                        print(f"{shape:5s} imgaccel {mode:5s} (lazy, {how:10s}): {t:6.2f} s (pull {pulled:.2f} s)  "
                              f"{base / t:5.2f}x  daemon peak RSS {rss:.0f} MB", flush=True)  # fmt: skip
                        print(f"      FUSE: {summary}", flush=True)
            lazy_ms, native_ms, idle = warm_reads(work / "warm", refs["full"], lists[shapes[0]])
            print(f"warm open+read per file ({len(lists[shapes[0]])} files): EROFS over FUSE {lazy_ms:.4f} ms, "
                  f"native {native_ms:.4f} ms ({lazy_ms / native_ms:.2f}x); daemon idle RSS {idle:.0f} MB "
                  "with one image mounted and fetched", flush=True)  # fmt: skip
            if args.idle_images:
                refs_idle = []
                for i in range(args.idle_images):
                    part = files[i :: args.idle_images]
                    (work / f"img{i}").mkdir()
                    gz_i, diff_i, _ = build_image(work / f"img{i}", part, {})
                    asyncio.run(push_layer(reg.host, f"bench/idle{i}", gz_i, diff_i))
                    gz_i.unlink()
                    idle_ref = f"{reg.host}/bench/idle{i}:v1"
                    subprocess.run([sys.executable, "-m", "imgaccel.cli.main", "convert", idle_ref, "--mode", "full"],
                                   cwd=ROOT, check=True, capture_output=True)  # fmt: skip
                    refs_idle.append(f"{reg.host}/bench/idle{i}:v1_containerd_accelerated")
                just_pulled, fetched = idle_rss(work, refs_idle)
                print(f"daemon idle RSS with {len(refs_idle)} images mounted ({len(files) // len(refs_idle)} files "
                      f"each): {just_pulled:.0f} MB after the pulls, {fetched:.0f} MB once all were fetched and "
                      "written out", flush=True)  # fmt: skip
        finally:
            proxy.stop()
            reg.stop()


if __name__ == "__main__":
    main()
