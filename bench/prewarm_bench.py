"""Prewarm and cache nodes (issue 11): registry egress, start-up after a hot prewarm, cache-node
throughput and memory.

    .venv/bin/python -m bench.prewarm_bench [--files 460 --size 200MiB] [--nodes 1,3,6] [--quick]

Everything runs on this machine as real processes: ``docker-registry`` behind two proxies in
this process (``bench.startup_bench.ThrottlingProxy``: 200 Mbit/s shared + 10 ms per request,
the "remote" link; then ``tests.fault_proxy.FaultProxy``, which counts the body bytes the
registry sends per path), two ``imgaccel cachenode`` processes whose upstream is that link,
``imgaccel serve`` with a ``prewarm:`` section, and node daemons (``imgaccel snapshotter``, each
with its own root, chunk cache and socket). The image is one full-mode layer (default chunking)
of real files of this machine (``image_files``: a few hundred files of 64 KiB-16 MiB from /usr),
with a ``startup`` profile of a working set (whole directories, ``startup_bench.working_set``)
recorded in-process (``build_profile``/``push_profile``).

A node "starts" the image by a containerd-style Prepare over the daemon's gRPC socket (labels
``containerd.io/snapshot.ref`` + ``.../stargz.reference``/``stargz.digest``, as ``ctr-remote
rpull`` sends): the daemon opens the image, builds the EROFS metadata and mounts the layer
lazily; then a child process reads every working-set file in full from the mount (kernel
EROFS -> FUSE data file -> chunk cache -> cache node -> registry).

1. Registry egress of the image's blobs (layer + config) when N node daemons start it after a
   hot prewarm: a hot task to the cache nodes, a hot task targeting the N nodes (their agents
   replay the profile through the cache nodes into their chunk caches), then the N nodes start
   it at once. As a ratio to the hot bytes (the profile's chunks, compressed); the planner's
   own TOC reads (one per task, measured with a dry run) are shown apart. The same without
   cache nodes (nodes straight to the registry).
2. Start-up (Prepare + reading the working set) on a fresh node daemon, median of repeats:
   fully local (every chunk of the image in its chunk cache, filled in-process beforehand),
   after a hot prewarm of fresh cache nodes (empty chunk cache, reads through a cache node on
   loopback; with and without the daemon's own profile replay at pull), and without prewarm
   (registry over the slow link; with and without replay). Egress is counted only once
   in-flight fetches have settled; the cache nodes' /metrics show what they fetched and kept.
3. Cache-node throughput serving single byte ranges of a blob it stores, against
   docker-registry serving the same ranges of the same blob (8 concurrent aiohttp clients).
4. A cache node's RSS while idle and its peak (VmHWM) while 50 clients read ranges and whole
   blobs concurrently (stored blob), and while 50 clients pull one blob it does not hold yet.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import yaml

from bench.convert_bench import push_layer
from bench.startup_bench import ROOT, ThrottlingProxy, build_image, peak_rss_mb, read_all, working_set
from imgaccel.formats import layer_index as li
from imgaccel.formats import oci
from imgaccel.formats.rendezvous import rendezvous_order
from imgaccel.formats.sizes import parse_size
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.reference import parse_reference
from imgaccel.reader.accelerated_image import open_image
from imgaccel.reader.chunk_cache import ChunkCache
from imgaccel.reader.prefetch import fetch_rest
from imgaccel.reader.profiles import build_profile, push_profile
from imgaccel.snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from imgaccel.snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from imgaccel.snapshotter.erofs_layers import unmount_all
from imgaccel.snapshotter.lazy_layers import SNAPSHOT_REF, STARGZ_LAYER, STARGZ_REFERENCE
from tests.fault_proxy import FaultProxy
from tests.registry import Registry, free_port, start_registry
from tests.service import ServiceProcess, make_service
from tests.test_snapshotter import DaemonProcess

TOKEN = "bench-cluster-token-0123456789abcdef"  # the cache nodes' cluster token
API_TOKEN = "bench-api-token-0123456789"
NODE_TOKEN = "bench-node-token-0123456789"
REPO = "bench/app"
MB = 1e6


# ---------------------------------------------------------------------------------------------
# Processes


def vm(pid: int, name: str) -> float:
    """A /proc/PID/status size field in MB (0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class CacheNode:
    """An ``imgaccel cachenode`` process on a fixed port; ``reset`` restarts it on an empty store."""

    work: Path
    name: str
    upstream: str  # host:port it pulls through from
    port: int = field(default_factory=free_port)
    generation: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.work / f"{self.name}-store{self.generation}"

    def start(self) -> CacheNode:
        config = self.work / f"{self.name}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": self.address,
                    "data_dir": str(self.data_dir),
                    "cluster_tokens": [{"value": TOKEN}],
                    "upstreams": [{"host": self.upstream}],
                }
            )
        )
        log = self.work / f"{self.name}.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "imgaccel.cli.main", "cachenode", "--config", str(config)],
                stdout=out,
                stderr=out,
                cwd=ROOT,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{self.address}/healthz", timeout=2).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"cache node did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def reset(self, keep_store: bool = False) -> CacheNode:
        self.stop()
        if not keep_store:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.generation += 1
        return self.start()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def metrics(nodes: list[CacheNode]) -> dict[str, float]:
    """The cache nodes' ``/metrics`` samples (``name{labels}`` -> value), summed over the nodes."""
    out: dict[str, float] = {}
    for n in nodes:
        with urllib.request.urlopen(f"http://{n.address}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line and not line.startswith("#"):
                    key, value = line.rsplit(" ", 1)
                    out[key] = out.get(key, 0.0) + float(value)
    return out


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> str:
    """What the cache nodes did between two ``metrics`` samples, one line."""

    def d(name: str, **labels: str) -> float:
        key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        return after.get(key, 0.0) - before.get(key, 0.0)

    chunks = " ".join(f"{r} {d('imgaccel_cachenode_chunks_total', result=r):.0f}"
                      for r in ("stored", "failed", "mismatch", "too_big"))  # fmt: skip
    looks = " ".join(f"{r} {d('imgaccel_cachenode_lookups_total', kind='chunk', result=r):.0f}"
                     for r in ("hit", "miss", "joined"))  # fmt: skip
    served = " ".join(f"{s} {d('imgaccel_cachenode_served_bytes_total', source=s) / MB:.2f}"
                      for s in ("chunks", "cache", "upstream"))  # fmt: skip
    fills = d("imgaccel_cachenode_fills_total", result="stored")
    return (f"upstream {d('imgaccel_cachenode_upstream_bytes_total') / MB:.2f} MB; listed chunks fetched: {chunks}; "
            f"chunk segments: {looks}; served MB: {served}; whole-blob fills stored {fills:.0f}")  # fmt: skip


def node_config(
    path: Path, cache_nodes: list[str] | None, profile: str | None, prewarm: dict[str, Any] | None = None
) -> Path:
    """A node daemon configuration: no background fetch; ``profile``: the label replayed when an
    image is first opened by a pull (None: none); cache nodes; a prewarm agent."""
    cfg: dict[str, Any] = {"background_fetch": "off", "profile_label": profile}
    if cache_nodes:
        cfg |= {"cache_nodes": [{"address": a} for a in cache_nodes], "cache_node_token": TOKEN}
    if prewarm:
        cfg["prewarm"] = prewarm
    path.write_text(yaml.safe_dump(cfg))
    return path


@contextlib.contextmanager
def daemons(
    stack_dir: Path, registry: Registry, configs: list[Path], caches: list[Path | None] | None = None
) -> Iterator[list[DaemonProcess]]:
    """Node daemons (one per config, started in parallel), each with its own root, socket and
    chunk cache (a copy of ``caches[i]`` when given); afterwards each is stopped and every mount
    it made taken down."""
    procs = []
    for i in range(len(configs)):
        work = stack_dir / f"node{i}"
        work.mkdir(parents=True)
        if caches and caches[i] is not None:
            shutil.copytree(caches[i], work / "chunk-cache")  # type: ignore[arg-type]
        procs.append(DaemonProcess(work, registry))
    try:
        with concurrent.futures.ThreadPoolExecutor(len(procs)) as pool:
            list(pool.map(lambda dc: dc[0].start(None, dc[1]), zip(procs, configs, strict=True)))
        yield procs
    finally:
        for d in procs:
            try:
                if d.proc is not None:
                    d.stop()
            finally:
                asyncio.run(unmount_all(d.root))


def prepare(daemon: DaemonProcess, image: Image) -> Path:
    """A containerd-style Prepare of the image's layer (``ctr-remote rpull``'s labels): the daemon
    mounts it lazily and answers ALREADY_EXISTS. The layer's mount point."""
    labels = {SNAPSHOT_REF: image.diff_id, STARGZ_REFERENCE: image.ref, STARGZ_LAYER: image.layer}
    request = pb.PrepareSnapshotRequest(key=f"extract-{time.time_ns()} {image.diff_id}", labels=labels)
    with grpc.insecure_channel(f"unix://{daemon.socket}") as ch:
        try:
            pb_grpc.SnapshotsStub(ch).Prepare(request, metadata=(("containerd-namespace", "bench"),), timeout=600)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        else:
            raise RuntimeError(f"the layer was not served lazily: {daemon.log()[-2000:]}")
    return daemon.root / "lazy" / "layers" / image.layer.split(":", 1)[1] / "fs"


def from_cache_nodes(daemon: DaemonProcess) -> int:
    """Blob bytes the daemon got from cache nodes so far (``imgaccel node status``; -1: no answer)."""
    r = subprocess.run([sys.executable, "-m", "imgaccel.cli.main", "node", "status", "--root", str(daemon.root),
                        "--json"], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    return sum(n["bytes_fetched"] for n in json.loads(r.stdout)["cache_nodes"]) if r.returncode == 0 else -1


def start_image(daemon: DaemonProcess, image: Image) -> tuple[float, float]:
    """(seconds of the Prepare, seconds reading the working set from the mount)."""
    t = time.perf_counter()
    fs = prepare(daemon, image)
    prepared = time.perf_counter() - t
    return prepared, read_all(fs, image.files)


# ---------------------------------------------------------------------------------------------
# The image


def image_files(count: int, size: int, low: int = 64 << 10, high: int = 16 << 20) -> list[str]:
    """About ``count`` real files of this machine holding about ``size`` bytes (paths without the
    leading /, in tree order): evenly spread over the files of /usr of ``low`` to ``high`` bytes
    (a few hundred files of libraries, binaries and data, ~440 kB on average), then the largest
    dropped or others added until the bytes are reached."""
    found: list[tuple[str, int]] = []
    for dirpath, dirs, names in os.walk("/usr"):
        dirs.sort()
        for n in sorted(names):
            p = os.path.join(dirpath, n)
            if os.path.islink(p) or not os.path.isfile(p) or not os.access(p, os.R_OK) or any(c.isspace() for c in p):
                continue
            if low <= (n_bytes := os.path.getsize(p)) <= high:
                found.append((p.lstrip("/"), n_bytes))
    step = len(found) / count
    picked = {int(i * step) for i in range(min(count, len(found)))}
    total = sum(found[i][1] for i in picked)
    for i in sorted(picked, key=lambda i: -found[i][1]):  # too many bytes: drop the biggest files
        if total <= size:
            break
        picked.discard(i)
        total -= found[i][1]
    for i in sorted(set(range(len(found))) - picked, key=lambda i: -found[i][1]):  # too few: add big ones
        if total >= size * 0.98:
            break
        if total + found[i][1] <= size:
            picked.add(i)
            total += found[i][1]
    return [found[i][0] for i in sorted(picked)]


@dataclass
class Image:
    ref: str  # the accelerated reference through the slow link (what nodes and the service use)
    direct: str  # the same, at the registry itself
    diff_id: str
    layer: str
    layer_size: int
    config: str
    toc: int  # bytes of the layer's TOC
    hot: int  # compressed bytes of the profile's chunks
    hot_chunks: int
    files: list[str]  # the working set (the profile's files)
    ws_bytes: int


async def record_profile(direct: str, files: list[str]) -> tuple[str, str, int, int, int, int]:
    """Read the working set in-process and attach its ``startup`` profile: (layer digest, config
    digest, layer size, TOC size, hot bytes, hot chunks)."""
    ref = parse_reference(direct)
    async with RegistryClient(ref.registry) as client:
        image = await open_image(client, ref)
        for f in files:
            await image.read_file("/" + f)
        profile = build_profile(image, "startup")
        await push_profile(client, image, profile)
        chunks = [image.layers[c.layer].index.chunks[c.chunk] for c in profile.chunks]
        manifest = oci.ImageManifest.model_validate_json(
            (await client.get_manifest(ref.repository, image.manifest_digest)).data
        )
    (layer,) = manifest.layers
    toc = int((layer.annotations or {})[li.ANN_TOC_SIZE])
    return layer.digest, manifest.config.digest, layer.size, toc, sum(c.c_size for c in chunks), len(chunks)


# ---------------------------------------------------------------------------------------------
# The cluster


@dataclass
class Cluster:
    work: Path
    registry: Registry
    counter: FaultProxy  # in front of the registry: counts what it sends
    link: ThrottlingProxy  # in front of the counter: the slow link everyone uses
    image: Image
    cache_nodes: list[CacheNode]
    service: ServiceProcess
    runs: int = 0

    def egress(self) -> int:
        """Body bytes of the image's blobs (layer and config) the registry sent so far."""
        return sum(self.counter.body_bytes[f"/v2/{REPO}/blobs/{d}"] for d in (self.image.layer, self.image.config))

    def settled_egress(self, quiet: float = 1.0, timeout: float = 60) -> int:
        """``egress()`` once it has not changed for ``quiet`` seconds (background fetches that
        were still running, readahead above all, are counted in the phase that started them)."""
        last, since, deadline = self.egress(), time.monotonic(), time.monotonic() + timeout
        while time.monotonic() - since < quiet and time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.egress()
            if now != last:
                last, since = now, time.monotonic()
        return last

    def create(self, body: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        status, task = self.service.api("POST", "/api/v1/prewarm/tasks" + ("?dry_run=1" if dry_run else ""), body)
        if status not in (200, 201):
            raise RuntimeError(f"prewarm task refused ({status}): {task}")
        return dict(task)

    def run_task(self, body: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
        task = self.create(body)
        deadline = time.monotonic() + timeout
        while True:
            status, task = self.service.api("GET", f"/api/v1/prewarm/tasks/{task['id']}")
            assert status == 200, task
            if task["state"] in ("succeeded", "failed", "cancelled"):
                if task["state"] != "succeeded":
                    raise RuntimeError(f"prewarm task {task['state']}: {json.dumps(task)[:2000]}")
                return dict(task)
            if time.monotonic() > deadline:
                raise RuntimeError(f"prewarm task still {task['state']} after {timeout} s")
            time.sleep(0.1)

    def wait_polled(self, names: list[str]) -> None:
        deadline = time.monotonic() + 60
        while True:
            status, body = self.service.api("GET", "/api/v1/prewarm/nodes")
            if status == 200 and {n["name"] for n in body["nodes"]} >= set(names):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"node daemons did not poll the service: {body}")
            time.sleep(0.1)

    def prewarm_cache_nodes(self) -> None:
        """Empty the cache nodes' stores, then a hot prewarm task to them."""
        for n in self.cache_nodes:
            n.reset()
        self.run_task({"images": [self.image.ref], "mode": "hot"})


# ---------------------------------------------------------------------------------------------
# Part 1: registry egress


@dataclass
class EgressRow:
    cache_nodes: bool
    nodes: int
    to_cache_nodes: int  # egress of the hot task to the cache nodes (with its planning)
    node_task: int  # egress of the hot task to the nodes (with its planning)
    start: int  # egress while the nodes start the image (Prepare + reads)
    planner: int  # of all that, the planner's TOC reads
    start_s: list[float]  # per node: Prepare + reads
    cn_peak_mb: float  # the cache nodes' peak RSS
    served: int  # bytes the nodes got from cache nodes (their node task and their start), all N
    cn_activity: str  # what the cache nodes did for the nodes (node task and start)

    @property
    def total(self) -> int:
        return self.to_cache_nodes + self.node_task + self.start


def egress_run(c: Cluster, n: int, with_cache_nodes: bool, planner_read: int) -> EgressRow:
    c.runs += 1
    tag = f"r{c.runs}{'cn' if with_cache_nodes else 'reg'}{n}"
    work = c.work / tag
    work.mkdir()
    e0 = c.settled_egress()
    tasks = 0
    if with_cache_nodes:
        c.prewarm_cache_nodes()
        tasks += 1
    e1 = c.settled_egress()
    m1 = metrics(c.cache_nodes) if with_cache_nodes else {}
    addresses = [x.address for x in c.cache_nodes] if with_cache_nodes else None
    names = [f"{tag}-{i}" for i in range(n)]
    configs = [
        node_config(
            work / f"{name}.yaml",
            addresses,
            None,
            {
                "service": c.service.url,
                "token": {"value": NODE_TOKEN},
                "node_name": name,
                "labels": {"run": tag},
                "poll_seconds": 0.5,
            },
        )
        for name in names
    ]
    with daemons(work, c.registry, configs) as nodes:
        c.wait_polled(names)
        c.run_task({"images": [c.image.ref], "mode": "hot", "nodes": f"run={tag}"})
        tasks += 1
        e2 = c.settled_egress()
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            started = list(pool.map(lambda d: start_image(d, c.image), nodes))
        e3 = c.settled_egress()
        served = sum(from_cache_nodes(d) for d in nodes)
    activity = metrics_delta(m1, metrics(c.cache_nodes)) if with_cache_nodes else ""
    peak = max((peak_rss_mb(x.pid) for x in c.cache_nodes), default=0.0) if with_cache_nodes else 0.0
    return EgressRow(
        with_cache_nodes,
        n,
        e1 - e0,
        e2 - e1,
        e3 - e2,
        tasks * planner_read,
        [p + r for p, r in started],
        peak,
        served,
        activity,
    )


def part1(c: Cluster, counts: list[int]) -> list[EgressRow]:
    img = c.image
    before = c.egress()
    c.create({"images": [img.ref], "mode": "hot"}, dry_run=True)
    planner_read = c.egress() - before
    print(
        f"\n== Part 1: registry egress of the image's blobs, N node daemons start it after a hot prewarm\n"
        f"hot bytes (profile: {img.hot_chunks} chunks, compressed) {img.hot / MB:.2f} MB; TOC {img.toc / 1e3:.1f} kB;"
        f" planning a task reads {planner_read / 1e3:.1f} kB of the layer (dry run)",
        flush=True,
    )
    rows = []
    header = (
        f"{'cache nodes':>11} {'N':>2} | {'->cache nodes':>13} {'node task':>10} {'nodes start':>11} | "
        f"{'total MB':>8} {'planner':>8} | {'total/hot':>9} {'w/o planner':>11} | {'start s (median, max)':>21} | "
        f"{'nodes<-cn MB':>12} {'cn peak RSS':>11}"
    )
    lines = []
    for with_cn in (True, False):
        for n in counts:
            r = egress_run(c, n, with_cn, planner_read)
            rows.append(r)
            line = (
                f"{'yes' if with_cn else 'no':>11} {n:>2} | {r.to_cache_nodes / MB:>10.2f} MB "
                f"{r.node_task / MB:>7.2f} MB {r.start / MB:>8.3f} MB | {r.total / MB:>8.2f} "
                f"{r.planner / 1e3:>5.1f} kB | {r.total / img.hot:>9.3f} {(r.total - r.planner) / img.hot:>11.3f}"
                f" | {statistics.median(r.start_s):>14.2f}, {max(r.start_s):>5.2f} | {r.served / MB:>12.1f} "
                f"{r.cn_peak_mb:>8.0f} MB"
            )
            lines.append(line)
            print(line, flush=True)
            if r.cn_activity:
                print(f"     cache nodes, node task + start: {r.cn_activity}", flush=True)
    print("\n" + header + "\n" + "-" * len(header) + "\n" + "\n".join(lines))
    print(
        "(-> cache nodes: the hot task to the cache nodes; node task: the hot task targeting the N nodes, whose "
        "agents replay the profile into their chunk caches; nodes start: Prepare + reading the working set through "
        "the lazy mount on all N at once; planner: the TOC reads of the tasks' planning, included in total; "
        "nodes<-cn: blob bytes the N nodes got from the cache nodes in all)"
    )
    cn = [r for r in rows if r.cache_nodes]
    ratios = [r.total / img.hot for r in cn]
    growth = (cn[-1].total - cn[0].total) / img.hot if len(cn) > 1 else 0.0
    ok = max(ratios) <= 1.05 and growth <= 0.01
    print(
        f"VERDICT part 1: with cache nodes, egress / hot bytes = {', '.join(f'{x:.3f}' for x in ratios)} for "
        f"N = {', '.join(str(r.nodes) for r in cn)} (N={cn[-1].nodes} vs N={cn[0].nodes}: {growth:+.4f}); "
        f"target 1.0 whatever N: {'MET' if ok else 'MISSED'}; without cache nodes "
        f"{', '.join(f'{r.total / img.hot:.2f}' for r in rows if not r.cache_nodes)} (grows as N)",
        flush=True,
    )
    return rows


# ---------------------------------------------------------------------------------------------
# Part 2: start-up


@dataclass
class StartRun:
    prepare: float
    reads: float
    rss_mb: float
    from_cache_nodes: int

    @property
    def total(self) -> float:
        return self.prepare + self.reads


CASES = {
    # name: (cache nodes configured, chunk cache pre-filled, profile replayed at pull)
    "local": (True, True, False),
    "prewarmed": (True, False, False),
    "prewarmed+replay": (True, False, True),
    "no prewarm": (False, False, False),
    "no prewarm+replay": (False, False, True),
}
DESCRIBE = {
    "local": "(a) fully local: every chunk of the image already in the node's chunk cache",
    "prewarmed": "(b) fresh cache nodes + a hot prewarm task; node cache empty, reads through a cache node",
    "prewarmed+replay": "(b) the same, and the daemon replays the profile at pull (node.yaml profile_label)",
    "no prewarm": "(c) no prewarm: registry over 200 Mbit/s + 10 ms per request, on-demand reads",
    "no prewarm+replay": "(c) the same, and the daemon replays the profile at pull (from the registry)",
}


def startup_run(c: Cluster, case: str, golden: Path) -> StartRun:
    with_cn, local, replay = CASES[case]
    c.runs += 1
    work = c.work / f"s{c.runs}-{case.replace(' ', '-').replace('+', '-')}"
    work.mkdir()
    config = node_config(
        work / "node.yaml", [x.address for x in c.cache_nodes] if with_cn else None, "startup" if replay else None
    )
    with daemons(work, c.registry, [config], [golden if local else None]) as (node,):
        prepared, reads = start_image(node, c.image)
        rss = peak_rss_mb(node.proc.pid) if node.proc else 0.0
        served = from_cache_nodes(node)
    return StartRun(prepared, reads, rss, served)


async def fill_cache(direct: str, cache_dir: Path) -> int:
    """Every chunk of the image into a chunk cache at ``cache_dir`` (from the registry itself)."""
    ref = parse_reference(direct)
    async with RegistryClient(ref.registry) as client:
        image = await open_image(client, ref, cache=ChunkCache(cache_dir))
        return await fetch_rest(image, float("inf"))


def part2(c: Cluster, repeats: int) -> dict[str, list[StartRun]]:
    img = c.image
    print(
        f"\n== Part 2: start-up of the working set on a fresh node ({len(img.files)} files, {img.ws_bytes / MB:.1f} "
        f"MB; Prepare + reading every file in full through the lazy mount), median of {repeats}",
        flush=True,
    )
    c.prewarm_cache_nodes()
    golden = c.work / "golden-cache"  # what "local" nodes start with: every chunk of the image
    asyncio.run(fill_cache(img.direct, golden))
    runs: dict[str, list[StartRun]] = {k: [] for k in CASES}
    for i in range(repeats):
        for case in CASES:
            if case.startswith("prewarmed"):  # each on fresh cache nodes holding exactly the hot prewarm
                c.prewarm_cache_nodes()
            r = startup_run(c, case, golden)
            runs[case].append(r)
            print(
                f"  run {i + 1} {case:18s}: Prepare {r.prepare:.2f} s + reads {r.reads:.2f} s = {r.total:.2f} s; "
                f"from cache nodes {r.from_cache_nodes / MB:.1f} MB; daemon peak RSS {r.rss_mb:.0f} MB",
                flush=True,
            )
    med = {k: statistics.median(r.total for r in v) for k, v in runs.items()}
    base = med["local"]
    header = (
        f"{'case':18s} | {'Prepare s':>9} {'reads s':>8} {'total s':>8} | {'vs local':>8} | "
        f"{'cache nodes MB':>14} {'peak RSS MB':>11}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for k, v in runs.items():
        print(
            f"{k:18s} | {statistics.median(r.prepare for r in v):>9.2f} {statistics.median(r.reads for r in v):>8.2f} "
            f"{med[k]:>8.2f} | {med[k] / base:>7.2f}x | {statistics.median(r.from_cache_nodes for r in v) / MB:>14.1f} "
            f"{max(r.rss_mb for r in v):>11.0f}"
        )
    for k in runs:
        print(f"  {k}: {DESCRIBE[k]}")
    spread = {k: f"{min(r.total for r in v):.2f}-{max(r.total for r in v):.2f}" for k, v in runs.items()}
    print(f"  (range over the runs: {'; '.join(f'{k} {s} s' for k, s in spread.items())})")
    for k in ("prewarmed", "prewarmed+replay"):
        ratio = med[k] / base
        print(
            f"VERDICT part 2 ({k}): {med[k]:.2f} s vs fully local {base:.2f} s = {ratio:.2f}x (target <= 1.2x): "
            f"{'MET' if ratio <= 1.2 else 'MISSED'}; without prewarm {med['no prewarm']:.2f} s "
            f"({med['no prewarm'] / med[k]:.1f}x slower), with the daemon's replay from the registry "
            f"{med['no prewarm+replay']:.2f} s",
            flush=True,
        )
    return runs


# ---------------------------------------------------------------------------------------------
# Parts 3 and 4: a cache node serving a stored blob


async def _range_load(
    url: str, headers: dict[str, str], blob: int, size: int, clients: int, seconds: float
) -> tuple[int, int, float]:
    """``clients`` loops of single-range GETs of ``size`` bytes at random offsets for
    ``seconds``: (bytes, requests, elapsed)."""
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        stop = time.monotonic() + seconds

        async def client(i: int) -> tuple[int, int]:
            rng = random.Random(i)
            got = n = 0
            while time.monotonic() < stop:
                off = rng.randrange(0, blob - size)
                async with session.get(url, headers={"Range": f"bytes={off}-{off + size - 1}"}) as r:
                    if r.status != 206:
                        raise RuntimeError(f"{url}: {r.status} {(await r.text())[:300]}")
                    async for data in r.content.iter_any():
                        got += len(data)
                n += 1
            return got, n

        t = time.monotonic()
        done = await asyncio.gather(*(client(i) for i in range(clients)))
        return sum(d[0] for d in done), sum(d[1] for d in done), time.monotonic() - t


def part3(c: Cluster, node: CacheNode, sizes: list[int], clients: int, seconds: float, repeats: int) -> None:
    img = c.image
    print(
        f"\n== Part 3: single byte ranges of a {img.layer_size / MB:.0f} MB blob on loopback, {clients} concurrent "
        f"aiohttp clients, {seconds:.0f} s per size and server, best of {repeats}: cache node (stored blob) vs "
        "docker-registry (filesystem storage)",
        flush=True,
    )
    paths = {
        "registry": f"http://{c.registry.host}/v2/{REPO}/blobs/{img.layer}",
        "cache node": f"http://{node.address}/v2/{REPO}/blobs/{img.layer}",
    }
    auth = {"Authorization": f"Bearer {TOKEN}"}
    rows = []
    for size in sizes:
        best: dict[str, tuple[float, float]] = {}
        for _ in range(repeats):
            for server, url in paths.items():
                asyncio.run(_range_load(url, auth, img.layer_size, size, clients, 0.3))  # warm-up
                got, n, elapsed = asyncio.run(_range_load(url, auth, img.layer_size, size, clients, seconds))
                if got / elapsed > best.get(server, (0.0, 0.0))[0]:
                    best[server] = (got / elapsed, n / elapsed)
        rows.append((size, best))
        print(
            f"  {size >> 10:>5} KiB: registry {best['registry'][0] / MB:.0f} MB/s, cache node "
            f"{best['cache node'][0] / MB:.0f} MB/s",
            flush=True,
        )
    header = f"{'range':>9} | {'registry MB/s':>13} {'req/s':>7} | {'cache node MB/s':>15} {'req/s':>7} | {'ratio':>5}"
    print("\n" + header + "\n" + "-" * len(header))
    for size, best in rows:
        (rb, rr), (cb, cr) = best["registry"], best["cache node"]
        print(f"{size >> 10:>5} KiB | {rb / MB:>13.0f} {rr:>7.0f} | {cb / MB:>15.0f} {cr:>7.0f} | {cb / rb:>5.2f}")
    ratios = [best["cache node"][0] / best["registry"][0] for _, best in rows]
    print(
        f"VERDICT part 3: cache node / registry = {', '.join(f'{r:.2f}' for r in ratios)} for "
        f"{', '.join(f'{s >> 10} KiB' for s, _ in rows)} (target >= 1.0): "
        f"{'MET' if min(ratios) >= 1.0 else 'MISSED' if max(ratios) < 1.0 else 'MET for some sizes only'}",
        flush=True,
    )


async def _mixed_load(
    url: str, headers: dict[str, str], blob: int, clients: int, whole: int, seconds: float, once: bool = False
) -> tuple[int, int]:
    """``clients`` at once for at most ``seconds``: the first ``whole`` GET the whole blob, the
    others single ranges of 64 KiB to 4 MiB (``once``: one GET each). (bytes, requests)."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as session:
        stop = time.monotonic() + seconds

        async def client(i: int) -> tuple[int, int]:
            rng = random.Random(i)
            got = n = 0
            while time.monotonic() < stop and not (once and n):
                size = (64 << 10) << (2 * (i % 4))
                off = rng.randrange(0, blob - size)
                extra = {} if i < whole else {"Range": f"bytes={off}-{off + size - 1}"}
                async with session.get(url, headers=extra) as r:
                    if r.status not in (200, 206):
                        raise RuntimeError(f"{url}: {r.status} {(await r.text())[:300]}")
                    async for data in r.content.iter_chunked(1 << 20):
                        got += len(data)
                        if time.monotonic() > stop:
                            break
                n += 1
            return got, n

        done = await asyncio.gather(*(client(i) for i in range(clients)))
        return sum(d[0] for d in done), sum(d[1] for d in done)


class RssSampler:
    """The highest VmRSS of a process, sampled every 20 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, vm(self.pid, "VmRSS"))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def part4(c: Cluster, node: CacheNode, clients: int, seconds: float) -> None:
    img = c.image
    auth = {"Authorization": f"Bearer {TOKEN}"}
    url = f"http://{node.address}/v2/{REPO}/blobs/{img.layer}"
    whole = clients // 5
    print(
        f"\n== Part 4: cache node memory, {clients} concurrent clients ({img.layer_size / MB:.0f} MB blob)", flush=True
    )
    rows = []
    for cold in (False, True):
        node.reset(keep_store=not cold)  # a fresh process: its VmHWM is this scenario's
        time.sleep(1)
        idle = vm(node.pid, "VmRSS")
        t = time.monotonic()
        with RssSampler(node.pid) as sampler:
            if cold:  # every client GETs the blob the node does not hold: one upstream fill, 50 readers
                got, n = asyncio.run(_mixed_load(url, auth, img.layer_size, clients, clients, seconds * 3, once=True))
            else:
                got, n = asyncio.run(_mixed_load(url, auth, img.layer_size, clients, whole, seconds))
        elapsed = time.monotonic() - t
        hwm = vm(node.pid, "VmHWM")
        time.sleep(3)
        after = vm(node.pid, "VmRSS")
        what = (
            f"cold blob: all {clients} GET the whole blob while the node pulls it through once"
            if cold
            else f"stored blob: {whole} whole-blob readers + {clients - whole} range readers (64 KiB-4 MiB), "
            f"{seconds:.0f} s"
        )
        rows.append((what, idle, hwm, sampler.peak, after, got / elapsed, n))
    header = f"{'scenario':96s} | {'idle MB':>7} {'peak MB':>7} {'idle after':>10} | {'served MB/s':>11} {'GETs':>5}"
    print(header + "\n" + "-" * len(header))
    for what, idle, hwm, _, after, rate, n in rows:
        print(f"{what:96s} | {idle:>7.0f} {hwm:>7.0f} {after:>10.0f} | {rate / MB:>11.0f} {n:>5}")
    worst = max(r[2] - r[1] for r in rows)
    print(
        f"VERDICT part 4: idle RSS {rows[0][1]:.0f} MB; peak (VmHWM) with {clients} clients "
        f"{max(r[2] for r in rows):.0f} MB, i.e. {worst / clients:.2f} MB per client above idle (no target given; "
        f"the node holds at most a 1 MiB block per response by design)",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=460, help="about this many real files of /usr (64 KiB-16 MiB)")
    ap.add_argument("--size", default="200MiB", help="their bytes (tar), about")
    ap.add_argument("--working-set", type=float, default=0.15, help="fraction of the bytes the start-up reads")
    ap.add_argument("--nodes", default="1,3,6", help="part 1: node daemon counts")
    ap.add_argument("--repeats", type=int, default=5, help="part 2: runs per case (median); part 3: best of")
    ap.add_argument("--range-sizes", default="64KiB,256KiB,1MiB,4MiB")
    ap.add_argument("--range-clients", type=int, default=8)
    ap.add_argument("--range-seconds", type=float, default=4.0)
    ap.add_argument("--memory-clients", type=int, default=50)
    ap.add_argument("--memory-seconds", type=float, default=10.0)
    ap.add_argument("--parts", default="1,2,3,4")
    ap.add_argument("--quick", action="store_true", help="smoke run: small image, one repeat, short loads")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs) and print it")
    args = ap.parse_args()
    # The proxies in this process log a traceback whenever a client hangs up mid-body (a daemon
    # stopped while a readahead was in flight): expected here, and noise.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    if args.quick:
        args.files, args.size, args.repeats = 120, "50MiB", 1
        args.range_seconds, args.memory_seconds = 1.0, 3.0
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        sys.exit("needs root and /dev/fuse (node daemons mount EROFS over FUSE)")
    parts = {int(p) for p in args.parts.split(",")}
    work = Path(tempfile.mkdtemp(prefix="imgaccel-prewarm-bench-", dir="/var/tmp"))
    if args.keep:
        print(f"work directory (kept): {work}", flush=True)
    with contextlib.ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, work, True)
        files = image_files(args.files, parse_size(args.size))
        ws = working_set(files, args.working_set, "tree")
        gz, diff_id, tar_size = build_image(work, files, {})
        reg = start_registry(work / "registry")
        stack.callback(reg.stop)
        asyncio.run(push_layer(reg.host, REPO, gz, diff_id))
        gz_size = gz.stat().st_size
        gz.unlink()
        t = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "imgaccel.cli.main",
                "convert",
                f"{reg.host}/{REPO}:v1",
                "--mode",
                "full",
                "--no-cache",
                "--workdir",
                str(work),
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        converted = time.perf_counter() - t
        tag = "v1_containerd_accelerated"
        layer, config, layer_size, toc, hot, hot_chunks = asyncio.run(record_profile(f"{reg.host}/{REPO}:{tag}", ws))
        counter = FaultProxy(reg.host, lambda m, p, n: None).start()
        stack.callback(counter.stop)
        link = ThrottlingProxy(counter.host).start()
        stack.callback(link.stop)
        ws_bytes = sum(os.path.getsize("/" + f) for f in ws)
        image = Image(
            f"{link.host}/{REPO}:{tag}",
            f"{reg.host}/{REPO}:{tag}",
            diff_id,
            layer,
            layer_size,
            config,
            toc,
            hot,
            hot_chunks,
            ws,
            ws_bytes,
        )
        print(
            f"image: {len(files)} files, tar {tar_size / MB:.0f} MB, gzip {gz_size / MB:.0f} MB, full mode "
            f"{layer_size / MB:.0f} MB (converted in {converted:.1f} s); working set {len(ws)} files, "
            f"{ws_bytes / MB:.1f} MB ({100 * ws_bytes / tar_size:.0f}% of the tar); profile {hot_chunks} chunks, "
            f"{hot / MB:.2f} MB compressed\nremote link: 200 Mbit/s shared + 10 ms per request; egress counted "
            "at the registry",
            flush=True,
        )
        cache_nodes = []
        for i in range(2):  # two cache nodes; the layer's rendezvous owner holds what a hot task moves
            n = CacheNode(work, f"cachenode{i}", link.host)
            stack.callback(n.stop)
            cache_nodes.append(n.start())
        owner = rendezvous_order([n.address for n in cache_nodes], layer)[0]
        service = make_service(
            work / "service",
            {
                "workers": 1,
                "reconcile_interval": 0,
                "rules": [{"repository": "none", "enabled": False}],
                "api_auth": {"token": {"value": API_TOKEN}},
                "prewarm": {
                    "cache_nodes": [{"address": n.address} for n in cache_nodes],
                    "cache_node_token": {"value": TOKEN},
                    "node_token": {"value": NODE_TOKEN},
                    "node_poll_seconds": 0.5,
                    "node_timeout": 600,
                },
            },
            token=API_TOKEN,
        )
        stack.callback(service.stop)
        service.start()
        c = Cluster(work, reg, counter, link, image, cache_nodes, service)
        print(f"cache nodes: {', '.join(n.address for n in cache_nodes)} (the layer's owner: {owner})", flush=True)
        if 1 in parts:
            part1(c, [int(x) for x in args.nodes.split(",")])
        if 2 in parts:
            part2(c, args.repeats)
        if parts & {3, 4}:
            solo = CacheNode(work, "cachenode-solo", reg.host)  # upstream: the registry itself, no link
            stack.callback(solo.stop)
            solo.start()
            url = f"http://{solo.address}/v2/{REPO}/blobs/{layer}"
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
            with urllib.request.urlopen(req, timeout=600) as r:  # the whole blob: stored once read
                while r.read(1 << 20):
                    pass
            stored = solo.data_dir / "blobs" / "sha256" / layer.split(":", 1)[1]
            deadline = time.monotonic() + 60
            while not stored.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the cache node did not store the blob ({stored})")
                time.sleep(0.1)
            for path in (stored, reg.blob_path(layer)):  # both copies in the page cache
                subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
            if 3 in parts:
                sizes = [parse_size(s) for s in args.range_sizes.split(",")]
                part3(c, solo, sizes, args.range_clients, args.range_seconds, max(1, min(args.repeats, 2)))
            if 4 in parts:
                part4(c, solo, args.memory_clients, args.memory_seconds)


if __name__ == "__main__":
    main()
