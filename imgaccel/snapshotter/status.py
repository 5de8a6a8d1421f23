"""``imgaccel node status``: what the running node daemon reports about itself, and how.

The daemon answers ``GET /status`` with a ``NodeStatus`` JSON document on a unix socket of its
own (``status_socket``, default ``<root>/status.sock``, mode 0660: root and the socket's group
only), next to containerd's gRPC socket. ``fetch_status`` is the client the CLI uses;
``render`` turns a status into the lines it prints.
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ValidationError

from imgaccel.formats.prewarm import NodeReport

from .sockets import prepare_socket

STATUS_VERSION = 1


class LayerStatus(BaseModel):
    digest: str
    image: str  # the reference it was first mounted for
    mode: str  # "full" or "index"
    source: str  # where the kernel reads the tar from: "fuse" (lazily) or "local" (a verified file)
    size: int  # uncompressed tar bytes
    chunks: int
    chunks_cached: int
    bytes_fetched: int  # from the registry, by this daemon
    requests: int
    verification_failures: int
    snapshots: int  # snapshots using the mount


class ImageStatus(BaseModel):
    ref: str
    manifest: str
    mode: str
    layers: int
    profile: str
    recording: str
    background_fetch: str


class FuseStatus(BaseModel):
    requests: dict[str, int]
    read_bytes: int
    read_errors: int
    resent: int
    read_sizes: str  # READs by size bucket, one line


class CacheNodeStatus(BaseModel):
    address: str
    healthy: bool
    down_seconds_left: float  # until it is asked again (0 when healthy)
    requests: int  # Range requests it answered
    bytes_fetched: int  # blob bytes it answered with
    failures: int  # times it failed (connection error, timeout, 5xx) and was marked down
    last_error: str


class PrewarmStatus(BaseModel):
    """The prewarm agent: the service it polls and the assignments it works on."""

    service: str
    node_name: str
    labels: dict[str, str]
    polls: int  # answered polls
    last_error: str | None  # why the last poll failed (None: it succeeded)
    assignments: list[NodeReport]  # running, and finished ones not yet reported


class RemoteStatus(BaseModel):
    """What the lazy-layer side (``ErofsLayers.describe``) reports."""

    kernel_path: str = "none"  # how lazy layers reach the kernel: file, loop, fuse (none: no lazy layers)
    images: list[ImageStatus] = []
    layers: list[LayerStatus] = []
    fuse: FuseStatus | None = None
    counters: dict[str, int] = {}  # profile replays, recordings, background fetches, failures
    fallbacks: dict[str, int] = {}  # why layers were left to containerd's normal pull, and how often
    cache_nodes: list[CacheNodeStatus] = []  # where blob bytes are fetched from before the registry
    prewarm: PrewarmStatus | None = None


class NodeStatus(RemoteStatus):
    version: int = STATUS_VERSION
    pid: int
    uptime_seconds: float
    rss_bytes: int
    socket: str
    root: str
    snapshots: dict[str, int]  # by kind: active, view, committed
    remote_snapshots: int


class StatusError(Exception):
    """No daemon answers on the status socket, or it answers something else."""


def rss_bytes() -> int:
    """This process's resident set size now (not its peak)."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StatusServer:
    """Serves ``collect()`` as JSON on ``path`` until ``stop``."""

    def __init__(self, path: Path, collect: Callable[[], Awaitable[NodeStatus]]) -> None:
        self.path = path
        self.collect = collect
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/status", self._status)
        prepare_socket(self.path)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.UnixSite(runner, str(self.path)).start()
        os.chmod(self.path, 0o660)
        self._runner = runner

    async def _status(self, request: web.Request) -> web.Response:
        status = await self.collect()
        return web.Response(text=status.model_dump_json(), content_type="application/json")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


async def fetch_status(path: Path, timeout: float = 10.0) -> NodeStatus:
    """Ask the daemon behind ``path``; ``StatusError`` in one line when nothing (right) answers."""
    try:
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(path)), timeout=aiohttp.ClientTimeout(total=timeout)
            ) as session,
            session.get("http://imgaccel/status") as resp,
        ):
            if resp.status != 200:
                raise StatusError(f"{path}: the node daemon answered {resp.status}")
            body = await resp.read()
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        raise StatusError(f"no node daemon answers on {path}: {e or type(e).__name__}") from None
    try:
        return NodeStatus.model_validate_json(body)
    except ValidationError as e:
        raise StatusError(f"{path}: not a node status: {e.errors()[0]['msg']}") from None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def render(s: NodeStatus) -> list[str]:
    """The lines ``imgaccel node status`` prints."""
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(s.snapshots.items())) or "none"
    lines = [
        f"node daemon pid {s.pid}, up {s.uptime_seconds:.0f} s, RSS {_size(s.rss_bytes)}",
        f"  socket {s.socket}, root {s.root}, kernel path: {s.kernel_path}",
        f"snapshots: {kinds}; {s.remote_snapshots} lazy",
        f"images open: {len(s.images)}",
    ]
    for im in s.images:
        lines.append(f"  {im.ref} ({im.mode}, {im.layers} layers, manifest {im.manifest[:19]})")
        lines.append(f"    profile: {im.profile}; recording: {im.recording}; background fetch: {im.background_fetch}")
    lines.append(f"layers mounted: {len(s.layers)}")
    for la in s.layers:
        lines.append(
            f"  {la.digest[:19]} {la.mode:5} {la.source:5} {_size(la.size):>10}  cached {la.chunks_cached}/{la.chunks}"
            f" chunks  fetched {_size(la.bytes_fetched)} in {la.requests} requests"
            + (f"  {la.verification_failures} VERIFICATION FAILURES" if la.verification_failures else "")
        )
    if s.fuse is not None:
        ops = " ".join(f"{k}={v}" for k, v in sorted(s.fuse.requests.items())) or "none"
        lines.append(f"FUSE: {ops}; {_size(s.fuse.read_bytes)} read, {s.fuse.read_errors} errors, "
                     f"{s.fuse.resent} resent")  # fmt: skip
        if s.fuse.read_sizes:
            lines.append(f"  READ sizes: {s.fuse.read_sizes}")
    if s.cache_nodes:
        lines.append(f"cache nodes: {len(s.cache_nodes)}")
    for cn in s.cache_nodes:
        health = "healthy" if cn.healthy else f"DOWN for {cn.down_seconds_left:.0f} s more ({cn.last_error})"
        lines.append(
            f"  {cn.address} {health}; fetched {_size(cn.bytes_fetched)} in {cn.requests} requests,"
            f" {cn.failures} failures"
        )
    if s.prewarm is not None:
        p = s.prewarm
        state = f"polling failed: {p.last_error}" if p.last_error else f"{p.polls} polls answered"
        lines.append(f"prewarm: node {p.node_name} of {p.service}; {state}")
        lines += [f"  task {a.task_id} {a.reference}: {a.state} {_size(a.bytes_done)}/{_size(a.bytes_total)}"
                  + (f" {a.error}" if a.error else "") for a in p.assignments]  # fmt: skip
    counters = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in s.counters.items())
    lines.append(f"warm-up: {counters or 'nothing yet'}")
    if s.fallbacks:
        lines.append("pulled normally (no lazy form):")
        lines += [f"  {n}x {why}" for why, n in sorted(s.fallbacks.items(), key=lambda x: -x[1])]
    return lines
