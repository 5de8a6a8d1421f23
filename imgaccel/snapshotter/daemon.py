"""The node daemon's gRPC face: containerd's Snapshots service on a unix socket (``grpc.aio``).

It owns the wire. Every call shares one snapshotter namespace, "": containerd's metadata layer
already prefixes every key it hands a snapshotter with ``<namespace>/<n>/``, and remote layers
are named by their chain ID so that every namespace pulling a layer shares it. containerd sends
the ``containerd-namespace`` gRPC header only on some calls (those its CRI plugin starts, not
those ``ctr`` starts), so honouring it would file one pull's snapshots under two namespaces: a
CRI pull's layers committed under "k8s.io" and looked up under "". The header is logged only.
It
turns protobuf requests into ``Snapshotter`` calls and results back into protobuf, maps the
snapshot errors to the gRPC codes containerd's errdefs understand, and runs the server until
SIGTERM/SIGINT (then it stops accepting calls, lets running ones finish for a few seconds and
closes the store). Everything it knows survives a restart: state lives in the metadata store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from .api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from .api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from .api.containerd.types import mount_pb2
from .config import NodeConfig
from .cri_proxy import CriProxy
from .keychain import Keychain, UsesKeychain
from .metadata import AlreadyExists, FailedPrecondition, Info, InvalidArgument, Kind, NotFound, SnapshotError
from .snapshots import Mount, RemoteLayers, Snapshotter
from .sockets import prepare_socket
from .status import NodeStatus, RemoteStatus, StatusServer, rss_bytes

log = logging.getLogger(__name__)

NAMESPACE_KEY = "containerd-namespace"
LIST_BATCH = 100  # infos per ListSnapshotsResponse message
STOP_GRACE = 5.0  # seconds running calls get to finish on SIGTERM

_CODES: dict[type[SnapshotError], Any] = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
}
_KINDS = {Kind.ACTIVE: pb.ACTIVE, Kind.VIEW: pb.VIEW, Kind.COMMITTED: pb.COMMITTED}

T = TypeVar("T")


def _timestamp(t: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(t)
    return ts


def info_to_pb(info: Info) -> pb.Info:
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=_KINDS[info.kind],
        created_at=_timestamp(info.created),
        updated_at=_timestamp(info.updated),
        labels=info.labels,
    )


def mounts_to_pb(mounts: Iterable[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options)) for m in mounts]


def _header_namespace(context: Any) -> str:
    return next((v for k, v in context.invocation_metadata() or () if k == NAMESPACE_KEY), "")


class SnapshotsService(pb_grpc.SnapshotsServicer):
    """containerd.services.snapshots.v1.Snapshots over a ``Snapshotter``."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.snapshotter = snapshotter

    async def _call(self, context: Any, what: str, fn: Callable[[str], Awaitable[T]]) -> T:
        namespace = ""  # see the module docstring: keys carry containerd's namespace already
        try:
            return await fn(namespace)
        except SnapshotError as e:
            level = logging.DEBUG if isinstance(e, AlreadyExists | NotFound) else logging.INFO
            log.log(level, "%s [%s]: %s", what, _header_namespace(context), e)
            await context.abort(_CODES.get(type(e), grpc.StatusCode.UNKNOWN), str(e))
        except Exception as e:
            log.error("%s [%s]: %s: %s", what, _header_namespace(context), type(e).__name__, e,
                      exc_info=log.isEnabledFor(logging.DEBUG))  # fmt: skip
            await context.abort(grpc.StatusCode.INTERNAL, f"{what}: {type(e).__name__}: {e}")
        raise AssertionError("unreachable")

    async def Prepare(self, request: pb.PrepareSnapshotRequest, context: Any) -> pb.PrepareSnapshotResponse:
        log.debug("prepare %s parent=%r labels=%s", request.key, request.parent, dict(request.labels))

        async def go(ns: str) -> pb.PrepareSnapshotResponse:
            mounts = await self.snapshotter.prepare(ns, request.key, request.parent, dict(request.labels))
            return pb.PrepareSnapshotResponse(mounts=mounts_to_pb(mounts))

        return await self._call(context, f"prepare {request.key}", go)

    async def View(self, request: pb.ViewSnapshotRequest, context: Any) -> pb.ViewSnapshotResponse:
        async def go(ns: str) -> pb.ViewSnapshotResponse:
            mounts = await self.snapshotter.view(ns, request.key, request.parent, dict(request.labels))
            return pb.ViewSnapshotResponse(mounts=mounts_to_pb(mounts))

        return await self._call(context, f"view {request.key}", go)

    async def Mounts(self, request: pb.MountsRequest, context: Any) -> pb.MountsResponse:
        async def go(ns: str) -> pb.MountsResponse:
            return pb.MountsResponse(mounts=mounts_to_pb(await self.snapshotter.mounts(ns, request.key)))

        return await self._call(context, f"mounts {request.key}", go)

    async def Commit(self, request: pb.CommitSnapshotRequest, context: Any) -> empty_pb2.Empty:
        async def go(ns: str) -> empty_pb2.Empty:
            await self.snapshotter.commit(ns, request.name, request.key, dict(request.labels), request.parent)
            return empty_pb2.Empty()

        return await self._call(context, f"commit {request.key} as {request.name}", go)

    async def Remove(self, request: pb.RemoveSnapshotRequest, context: Any) -> empty_pb2.Empty:
        async def go(ns: str) -> empty_pb2.Empty:
            await self.snapshotter.remove(ns, request.key)
            return empty_pb2.Empty()

        return await self._call(context, f"remove {request.key}", go)

    async def Stat(self, request: pb.StatSnapshotRequest, context: Any) -> pb.StatSnapshotResponse:
        async def go(ns: str) -> pb.StatSnapshotResponse:
            return pb.StatSnapshotResponse(info=info_to_pb(await self.snapshotter.stat(ns, request.key)))

        return await self._call(context, f"stat {request.key}", go)

    async def Update(self, request: pb.UpdateSnapshotRequest, context: Any) -> pb.UpdateSnapshotResponse:
        async def go(ns: str) -> pb.UpdateSnapshotResponse:
            paths = list(request.update_mask.paths)
            info = await self.snapshotter.update(ns, request.info.name, dict(request.info.labels), paths)
            return pb.UpdateSnapshotResponse(info=info_to_pb(info))

        return await self._call(context, f"update {request.info.name}", go)

    async def List(self, request: pb.ListSnapshotsRequest, context: Any) -> AsyncIterator[pb.ListSnapshotsResponse]:
        async def go(ns: str) -> list[Info]:
            return await self.snapshotter.walk(ns, list(request.filters))

        infos = await self._call(context, "list", go)
        for i in range(0, len(infos), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info_to_pb(x) for x in infos[i : i + LIST_BATCH]])

    async def Usage(self, request: pb.UsageRequest, context: Any) -> pb.UsageResponse:
        async def go(ns: str) -> pb.UsageResponse:
            u = await self.snapshotter.usage(ns, request.key)
            return pb.UsageResponse(size=u.size, inodes=u.inodes)

        return await self._call(context, f"usage {request.key}", go)

    async def Cleanup(self, request: pb.CleanupRequest, context: Any) -> empty_pb2.Empty:
        async def go(ns: str) -> empty_pb2.Empty:
            await self.snapshotter.cleanup()
            return empty_pb2.Empty()

        return await self._call(context, "cleanup", go)


class Daemon:
    """A running snapshotter server (``start``/``stop``), usable in-process by tests."""

    def __init__(self, config: NodeConfig, remote: RemoteLayers | None = None) -> None:
        self.config = config
        self.remote = remote
        self.snapshotter: Snapshotter | None = None
        self._server: Any = None
        # Registry credentials of Kubernetes pulls: the CRI proxy (config.cri_proxy) fills it,
        # remote layers that take credentials from a keychain (ErofsLayers) read it.
        self.keychain = Keychain()
        if isinstance(remote, UsesKeychain):
            remote.keychain = self.keychain
        self.cri_proxy: CriProxy | None = None

    async def start(self) -> None:
        self.snapshotter = Snapshotter(self.config.root, self.remote)
        if self.remote is not None:
            await self.remote.start(await self.snapshotter.remote_snapshots())
        for snap in await self.snapshotter.check_remote_dirs():
            log.warning("snapshot %s [%s]: its layer directory %s is gone; containers on it will fail",
                        snap.info.name, snap.namespace, snap.remote_dir)  # fmt: skip
        prepare_socket(self.config.socket)
        server = grpc.aio.server()
        pb_grpc.add_SnapshotsServicer_to_server(SnapshotsService(self.snapshotter), server)
        if server.add_insecure_port(f"unix://{self.config.socket}") == 0:
            raise RuntimeError(f"cannot listen on {self.config.socket}")
        await server.start()
        os.chmod(self.config.socket, 0o660)
        self._server = server
        log.info("serving containerd snapshots on %s (root %s)", self.config.socket, self.config.root)
        if self.config.cri_proxy is not None:
            proxy = CriProxy(self.config.cri_proxy, self.keychain)
            try:
                await proxy.start()
            except BaseException:
                await self.stop(0)
                raise
            self.cri_proxy = proxy

    async def stop(self, grace: float = STOP_GRACE) -> None:
        if self.cri_proxy is not None:  # first: no new pull (and its Prepares) starts while the rest stops
            await self.cri_proxy.stop(grace)
            self.cri_proxy = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self.snapshotter is not None:
            await self.snapshotter.close()
            self.snapshotter = None
        if self.remote is not None:
            await self.remote.close()
        with contextlib.suppress(FileNotFoundError):
            self.config.socket.unlink()


async def collect_status(daemon: Daemon, started: float) -> NodeStatus:
    """The daemon's ``NodeStatus`` now (``imgaccel node status``)."""
    snapshotter = daemon.snapshotter
    kinds: Counter[str] = Counter()
    remote_snapshots = 0
    if snapshotter is not None:
        kinds.update(info.kind.value for info in await snapshotter.walk("", []))
        remote_snapshots = len(await snapshotter.remote_snapshots())
    describe = getattr(daemon.remote, "describe", None)
    remote = describe() if describe is not None else RemoteStatus()
    return NodeStatus(
        **remote.model_dump(),
        pid=os.getpid(),
        uptime_seconds=time.monotonic() - started,
        rss_bytes=rss_bytes(),
        socket=str(daemon.config.socket),
        root=str(daemon.config.root),
        snapshots=dict(kinds),
        remote_snapshots=remote_snapshots,
    )


async def serve(config: NodeConfig, remote: RemoteLayers | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully."""
    started = time.monotonic()
    daemon = Daemon(config, remote)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await daemon.start()
    status = StatusServer(config.status_path, lambda: collect_status(daemon, started))
    try:
        await status.start()
        log.info("status on %s (imgaccel node status)", config.status_path)
        await stop.wait()
        log.info("stopping")
    finally:
        await status.stop()
        await daemon.stop()


def run(config: NodeConfig, remote: RemoteLayers | None = None) -> None:
    asyncio.run(serve(config, remote))
